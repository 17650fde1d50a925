"""Gemini ingest: the local venue over real WebSockets, the producer as a real process, records
checked in the real Kafka topics: the tests that need Kafka (those that do not:
tests/unit/producers/test_ingest.py)."""

from __future__ import annotations

import json
import time
from collections import defaultdict

import pytest
import requests

from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Decoder
from pipeline.gemini.capture import received_frames
from pipeline.kafka.catalog import ensure_topics
from pipeline.kafka.deadletter import STAGE_INGEST, parse_dead_letter
from pipeline.venue.server import MALFORMED, RunningVenue, VenueConfig
from tests.support.books import books_from_capture, books_from_records
from tests.support.kafka_io import read_all
from tests.support.processes import CAPTURE, CAPTURE_SYMBOLS, Producer
from tests.support.processes import venue_status as status
from tests.support.waiting import wait_for


def decoded(kafka: str, registry_url: str, topic: str, expect: int | None = None) -> list[dict]:
    decode = Decoder(SchemaRegistry(registry_url))
    return [decode(r.value) for r in read_all(kafka, topic, expect=expect, timeout=60)]


def per_symbol_in_order(records: list[dict]) -> dict[str, list[dict]]:
    """Records per symbol in the order the producer read them (one key: one partition)."""
    out = defaultdict(list)
    for record in sorted(records, key=lambda r: (r["received_ts_us"], r["sequence"])):
        out[record["symbol"]].append(record)
    return out


@pytest.fixture
def ingest_topics(kafka, namespace):
    ensure_topics(kafka, namespace, ["raw.frames", "md.l2", "md.trades", "dlq"])
    return {name: namespace.topic(name) for name in ("raw.frames", "md.l2", "md.trades", "dlq")}


@pytest.mark.broker
def test_the_real_capture_reaches_kafka_complete_and_in_order(kafka, registry, namespace,
                                                             ingest_topics, shared_data,
                                                             tmp_path):
    capture = shared_data / CAPTURE
    venue = RunningVenue(VenueConfig(capture=capture, heartbeat_s=1.0))
    producer = Producer(kafka, registry.url, namespace, venue.ws_url, CAPTURE_SYMBOLS, tmp_path)
    try:
        wait_for(lambda: status(venue)["source_done"], 60, "the venue to replay the capture")
        l2 = decoded(kafka, registry.url, ingest_topics["md.l2"], expect=655)
        trades = decoded(kafka, registry.url, ingest_topics["md.trades"], expect=516)
    finally:
        code, out = producer.stop()
        venue.stop()
    assert code == 0, producer.log_text()[-2000:]
    assert "stopped: " in out and "0 dead letters" in out
    expected_l2, expected_trades = defaultdict(list), defaultdict(list)
    frames = received_frames(capture)
    for frame in frames:
        data = json.loads(frame.text)
        if data["type"] == "l2_updates":
            expected_l2[data["symbol"]].append([
                {"side": "BID" if s == "buy" else "ASK", "price": p, "quantity": q}
                for s, p, q in data["changes"]])
            expected_trades[data["symbol"]] += [t["event_id"] for t in data.get("trades") or []]
        elif data["type"] == "trade":
            expected_trades[data["symbol"]].append(data["event_id"])
    got_l2 = per_symbol_in_order(l2)
    assert sorted(got_l2) == sorted(CAPTURE_SYMBOLS)
    for symbol in CAPTURE_SYMBOLS:
        assert [r["changes"] for r in got_l2[symbol]] == expected_l2[symbol], symbol
        assert [r["snapshot"] for r in got_l2[symbol]] == [True] + [False] * (
            len(expected_l2[symbol]) - 1)
    got_trades = per_symbol_in_order(trades)
    for symbol in CAPTURE_SYMBOLS:
        assert [t["trade_id"] for t in got_trades[symbol]] == expected_trades[symbol], symbol
    # The raw topic holds every market frame exactly as Gemini sent it.
    raw = decoded(kafka, registry.url, ingest_topics["raw.frames"])
    market_texts = [r["text"] for r in sorted(raw, key=lambda r: r["sequence"])
                    if '"heartbeat"' not in r["text"]]
    assert market_texts == [f.text for f in frames if '"heartbeat"' not in f.text]


@pytest.mark.broker
def test_a_dropped_connection_and_a_heartbeat_stall_lose_and_double_nothing(kafka, registry,
                                                                           namespace,
                                                                           ingest_topics,
                                                                           shared_data,
                                                                           tmp_path):
    capture = shared_data / CAPTURE
    venue = RunningVenue(VenueConfig(capture=capture, speed=4.0, heartbeat_s=0.3))
    for fault in ({"action": "drop", "after_events": 150},
                  {"action": "stall", "seconds": 4, "after_events": 400}):
        assert requests.post(f"{venue.http_url}/_venue/faults", json=fault, timeout=5).ok
    producer = Producer(kafka, registry.url, namespace, venue.ws_url, CAPTURE_SYMBOLS, tmp_path,
                        heartbeat_timeout=1.0)
    try:
        wait_for(lambda: status(venue)["source_done"], 90, "the venue to replay the capture")
        time.sleep(1.5)
        l2 = decoded(kafka, registry.url, ingest_topics["md.l2"])
    finally:
        code, _ = producer.stop()
        venue.stop()
    log = producer.log_text()
    assert code == 0, log[-2000:]
    assert "connection lost" in log and "heartbeat timeout" in log
    connections = {r["connection_id"] for r in l2}
    assert len(connections) >= 3, "initial, after the drop, after the stall"
    by_epoch = defaultdict(list)
    for record in l2:
        by_epoch[(record["connection_id"], record["symbol"])].append(record)
    for (conn, symbol), records in by_epoch.items():
        sequences = [r["sequence"] for r in records]
        assert len(sequences) == len(set(sequences)), f"duplicate within {conn}/{symbol}"
        records.sort(key=lambda r: r["sequence"])
        assert records[0]["snapshot"] and not any(r["snapshot"] for r in records[1:]), \
            "each connection starts every symbol with a flagged snapshot, and only then"
    # Reconnections resnapshot every symbol, so the final books equal the capture's.
    ordered = sorted(l2, key=lambda r: r["received_ts_us"])
    assert books_from_records(ordered) == books_from_capture(capture)


@pytest.mark.broker
def test_a_v1_sequence_gap_forces_a_resubscribe_and_a_flagged_snapshot(kafka, registry,
                                                                       namespace, ingest_topics,
                                                                       tmp_path):
    venue = RunningVenue(VenueConfig(symbols=["BTCUSD", "ETHUSD"], rate=300, heartbeat_s=0.5,
                                     start_on_subscribe=False))
    producer = Producer(kafka, registry.url, namespace, venue.ws_url, ["BTCUSD", "ETHUSD"],
                        tmp_path, protocol="v1")
    try:
        wait_for(lambda: len([c for c in status(venue)["connections"] if c["frames_sent"] > 20])
                 == 2, 30, "two v1 connections streaming")
        requests.post(f"{venue.http_url}/_venue/faults",
                      json={"action": "skip_sequence", "version": "v1"}, timeout=5)
        wait_for(lambda: "SequenceGap" in producer.log_text(), 30, "the gap to be noticed")
        time.sleep(2)
        l2 = decoded(kafka, registry.url, ingest_topics["md.l2"])
    finally:
        code, _ = producer.stop()
        venue.stop()
    assert code == 0
    for symbol in ("BTCUSD", "ETHUSD"):
        snapshots = [r for r in l2 if r["symbol"] == symbol and r["snapshot"]]
        assert len(snapshots) >= 2, f"{symbol}: a new flagged snapshot after the gap"
        assert len({r["connection_id"] for r in snapshots}) == len(snapshots)
        assert all(r["exchange_ts_ms"] is None or r["exchange_ts_ms"] > 0 for r in snapshots)


@pytest.mark.broker
def test_a_malformed_frame_is_dead_lettered_and_the_producer_goes_on(kafka, registry, namespace,
                                                                     ingest_topics, tmp_path):
    venue = RunningVenue(VenueConfig(symbols=["BTCUSD"], rate=200, heartbeat_s=0.5,
                                     start_on_subscribe=False))
    producer = Producer(kafka, registry.url, namespace, venue.ws_url, ["BTCUSD"], tmp_path)
    try:
        wait_for(lambda: any(c["frames_sent"] > 10 for c in status(venue)["connections"]), 30,
                 "streaming")
        requests.post(f"{venue.http_url}/_venue/faults", json={"action": "malformed"}, timeout=5)
        dead = read_all(kafka, ingest_topics["dlq"], expect=1, timeout=30)
        count_at_fault = len(read_all(kafka, ingest_topics["md.l2"]))
        wait_for(lambda: len(read_all(kafka, ingest_topics["md.l2"])) > count_at_fault + 20, 30,
                 "records after the bad frame")
    finally:
        code, _ = producer.stop()
        venue.stop()
    assert code == 0
    (letter,) = [parse_dead_letter(d.key, d.value, list(d.headers)) for d in dead]
    assert letter.value == MALFORMED.encode()
    assert letter.stage == STAGE_INGEST and "not JSON" in letter.error_message
    assert letter.source_topic.endswith("/v2/marketdata")


