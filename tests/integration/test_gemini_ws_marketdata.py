"""Gemini's new WebSocket API for market data: the normalizer's rules (pure), the venue's side over
real sockets, and the producer into the real broker (the capture's books after every update, an
update-id gap resnapshotting one symbol, a quiet connection kept): the tests that need Kafka (those
that do not: tests/unit/gemini/test_ws_marketdata.py)."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import pytest
import requests

from pipeline.avro import schemas
from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Decoder, Encoder
from pipeline.gemini.capture import received_frames
from pipeline.kafka.catalog import ensure_topics
from pipeline.venue.server import RunningVenue, VenueConfig
from tests.integration.test_ingest import decoded
from tests.support.books import books_from_records, follow_capture
from tests.support.processes import CAPTURE, CAPTURE_SYMBOLS, Producer
from tests.support.processes import venue_status as status
from tests.support.records import SAMPLES
from tests.support.waiting import wait_for
from tests.unit.gemini.test_ws_marketdata import values  # noqa: F401 - shared with the unit tests

RELEASED = Path(__file__).resolve().parents[1] / "support" / "schemas_md_released"


@pytest.fixture
def ingest_topics(kafka, namespace):
    ensure_topics(kafka, namespace, ["raw.frames", "md.l2", "md.trades", "dlq"])
    return {name: namespace.topic(name) for name in ("raw.frames", "md.l2", "md.trades", "dlq")}


def per_symbol(records: list[dict]) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for record in sorted(records, key=lambda r: (r["connection_id"], r["sequence"])):
        out[record["symbol"]].append(record)
    return out


def venue_books(venue: RunningVenue) -> dict:
    return {symbol: {"BID": {Decimal(p): Decimal(q) for p, q in book.bids.items()},
                     "ASK": {Decimal(p): Decimal(q) for p, q in book.asks.items()}}
            for symbol, book in venue.venue.market.books.items()}


@pytest.mark.broker
def test_the_capture_over_the_new_api_gives_the_same_book_after_every_update(
        kafka, registry, namespace, ingest_topics, shared_data, tmp_path):
    """The oracle the v2 path is held to (the raw capture's book after each of its frames),
    on the new protocol: the venue sends one depthUpdate per capture frame, so every record
    is a boundary to compare at. The replay ends in seconds and the connection then stays
    quiet: pinging keeps it, with no reconnect."""
    capture = shared_data / CAPTURE
    venue = RunningVenue(VenueConfig(capture=capture))
    producer = Producer(kafka, registry.url, namespace, venue.ws_url, CAPTURE_SYMBOLS, tmp_path,
                        protocol="ws", heartbeat_timeout=1.0)
    try:
        wait_for(lambda: status(venue)["source_done"], 60, "the venue to replay the capture")
        l2 = decoded(kafka, registry.url, ingest_topics["md.l2"], expect=655)
        trades = decoded(kafka, registry.url, ingest_topics["md.trades"], expect=16)
        time.sleep(3.5)  # quiet for over three heartbeat timeouts
        final_books = venue_books(venue)
    finally:
        code, out = producer.stop()
        venue.stop()
    log = producer.log_text()
    assert code == 0, log[-2000:]
    assert "0 dead letters, 0 reconnects, 0 update gaps" in out, out
    assert "reconnecting" not in log and "heartbeat timeout" not in log
    assert len({r["connection_id"] for r in l2 + trades}) == 1
    raw_per_symbol = defaultdict(list)
    expected_trades = defaultdict(list)
    for frame in received_frames(capture):
        data = json.loads(frame.text)
        if data["type"] == "l2_updates":
            raw_per_symbol[data["symbol"]].append(data)
        elif data["type"] == "trade":
            expected_trades[data["symbol"]].append((data["event_id"], data["price"],
                                                    data["quantity"], data["timestamp"]))
    got = per_symbol(l2)
    assert sorted(got) == sorted(CAPTURE_SYMBOLS) == sorted(raw_per_symbol)
    compared = 0
    for symbol, records in got.items():
        assert len(records) == len(raw_per_symbol[symbol]), symbol
        assert [r["snapshot"] for r in records] == [True] + [False] * (len(records) - 1)
        ids = [(r["first_update_id"], r["last_update_id"]) for r in records]
        assert ids[0][0] == ids[0][1] and all(first == last == ids[0][1] + i + 1
                                              for i, (first, last) in enumerate(ids[1:]))
        assert all(r["exchange_ts_ns"] and r["exchange_ts_ms"] == r["exchange_ts_ns"] // 10**6
                   for r in records)
        reference = follow_capture(symbol, records, raw_per_symbol[symbol])
        compared += len(records)
        assert reference[symbol] == final_books[symbol]
    assert compared == 655
    # Live trades only (a v2 snapshot's recent trades are history), with their exact times.
    got_trades = per_symbol(trades)
    assert {s: [(t["trade_id"], t["price"], t["quantity"], t["exchange_ts_ms"]) for t in ts]
            for s, ts in got_trades.items()} == dict(expected_trades)
    assert all(t["exchange_ts_ns"] == t["exchange_ts_ms"] * 10**6 for t in trades)
    # The quiet connection was pinged, and the answers are on the raw topic like any frame.
    raw = decoded(kafka, registry.url, ingest_topics["raw.frames"])
    answers = [json.loads(r["text"]) for r in raw if r["text"].startswith('{"id"')]
    assert answers == [{"id": str(i), "status": 200} for i in range(1, len(answers) + 1)]
    assert len(answers) >= 4, "the SUBSCRIBE answer and pings every half heartbeat timeout"


@pytest.mark.broker
def test_a_lost_update_id_resnapshots_that_symbol_on_the_same_connection(
        kafka, registry, namespace, ingest_topics, shared_data, tmp_path):
    capture = shared_data / CAPTURE
    venue = RunningVenue(VenueConfig(capture=capture, speed=8.0))
    fault = {"action": "skip_update_id", "symbol": "FILUSD", "after_events": 200}
    assert requests.post(f"{venue.http_url}/_venue/faults", json=fault, timeout=5).ok
    producer = Producer(kafka, registry.url, namespace, venue.ws_url, CAPTURE_SYMBOLS, tmp_path,
                        protocol="ws", heartbeat_timeout=2.0)
    try:
        wait_for(lambda: status(venue)["source_done"], 60, "the venue to replay the capture")
        time.sleep(1.5)
        l2 = decoded(kafka, registry.url, ingest_topics["md.l2"])
        final_books = venue_books(venue)
    finally:
        code, out = producer.stop()
        venue.stop()
    log = producer.log_text()
    assert code == 0, log[-2000:]
    assert "0 reconnects, 1 update gaps" in out, out
    assert "UpdateGap" not in out and "resnapshotting FILUSD" in log
    assert len({r["connection_id"] for r in l2}) == 1, "a gap does not reconnect"
    got = per_symbol(l2)
    for symbol, records in got.items():
        flags = [r["snapshot"] for r in records]
        if symbol == "FILUSD":
            assert flags.count(True) == 2 and flags[0], "the initial book, then the new one"
            again = flags.index(True, 1)
            before, after = records[again - 1], records[again]
            assert after["last_update_id"] >= before["last_update_id"] + 2, "an id was lost"
            assert all(b["first_update_id"] == a["last_update_id"] + 1
                       for a, b in zip(records[again:], records[again + 1:]))
        else:
            assert flags == [True] + [False] * (len(flags) - 1), symbol
    assert books_from_records(sorted(l2, key=lambda r: r["sequence"])) == final_books


@pytest.mark.broker
def test_the_new_fields_are_backward_compatible_and_old_records_still_read(registry,
                                                                          namespace):
    reg = SchemaRegistry(registry.url)
    for name, topic in (("L2Update", "md.l2"), ("Trade", "md.trades")):
        old = json.loads((RELEASED / f"{name}.avsc").read_text())
        new = schemas.load(name)
        added = [f["name"] for f in new["fields"][len(old["fields"]):]]
        assert [f["name"] for f in new["fields"][:len(old["fields"])]] == \
            [f["name"] for f in old["fields"]], "new fields go last"
        assert all(f["type"][0] == "null" and f["default"] is None
                   for f in new["fields"] if f["name"] in added)
        record = {k: v for k, v in SAMPLES[name].items() if k not in added}
        data = Encoder(reg, namespace.topic(topic), old)(record)
        subject = f"{namespace.topic(topic)}-value"
        assert reg.compatibility_messages(subject, new) is None, "BACKWARD compatible"
        reg.register(subject, new)
        assert reg.versions(subject) == [1, 2]
        assert Decoder(reg, [new])(data) == {**record, **{f: None for f in added}}
        # and the other way: a reader still on the old schema reads a new-API record
        assert Decoder(reg, [old])(Encoder(reg, namespace.topic(topic))(SAMPLES[name])) == record


@pytest.mark.broker
def test_a_dropped_connection_reconnects_and_every_symbol_starts_from_a_new_snapshot(
        kafka, registry, namespace, ingest_topics, shared_data, tmp_path):
    capture = shared_data / CAPTURE
    venue = RunningVenue(VenueConfig(capture=capture, speed=8.0))
    assert requests.post(f"{venue.http_url}/_venue/faults",
                         json={"action": "drop", "after_events": 250}, timeout=5).ok
    producer = Producer(kafka, registry.url, namespace, venue.ws_url, CAPTURE_SYMBOLS, tmp_path,
                        protocol="ws", heartbeat_timeout=2.0)
    try:
        wait_for(lambda: status(venue)["source_done"], 60, "the venue to replay the capture")
        time.sleep(1.5)
        l2 = decoded(kafka, registry.url, ingest_topics["md.l2"])
        final_books = venue_books(venue)
    finally:
        code, out = producer.stop()
        venue.stop()
    assert code == 0, producer.log_text()[-2000:]
    assert "connection lost" in producer.log_text() and "1 reconnects, 0 update gaps" in out
    by_epoch = defaultdict(list)
    for record in l2:
        by_epoch[(record["connection_id"], record["symbol"])].append(record)
    assert len({conn for conn, _ in by_epoch}) == 2
    for records in by_epoch.values():
        records.sort(key=lambda r: r["sequence"])
        assert records[0]["snapshot"] and not any(r["snapshot"] for r in records[1:])
    ordered = sorted(l2, key=lambda r: r["received_ts_us"])
    assert books_from_records(ordered) == final_books


