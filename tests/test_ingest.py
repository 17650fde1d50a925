"""Gemini ingest: the local venue over real WebSockets, the producer as a real process,
records checked in the real Kafka topics."""

from __future__ import annotations

import itertools
import json
import time
from collections import defaultdict

import pytest
import requests

from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Decoder
from pipeline.gemini.capture import received_frames
from pipeline.gemini.marketdata import FrameError, SequenceGap, V1Normalizer, V2Normalizer
from pipeline.kafka.catalog import ensure_topics
from pipeline.kafka.deadletter import STAGE_INGEST, parse_dead_letter
from pipeline.venue.market import (
    Market,
    capture_events,
    generated_events,
    looped_capture_events,
    render_v2,
)
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


# --------------------------------------------------------------------------- pure logic


def test_v2_normalizer_flags_the_first_book_per_symbol_and_keeps_strings_exact():
    n = V2Normalizer("c")
    first = n.normalize_text('{"type":"l2_updates","symbol":"BTCUSD","changes":[["buy","1.50",'
                             '"0.00001"],["sell","2","3"]],"trades":[{"type":"trade","symbol":'
                             '"BTCUSD","event_id":5,"timestamp":7,"price":"1.6","quantity":"2",'
                             '"side":"sell"}]}', 11)
    assert [r.topic for r in first] == ["md.l2", "md.trades"]
    assert first[0].value["snapshot"] is True and first[0].value["sequence"] == 0
    assert first[0].value["changes"][0] == {"side": "BID", "price": "1.50", "quantity": "0.00001"}
    assert first[1].value["from_snapshot"] and first[1].value["taker_side"] == "SELL"
    again = n.normalize_text('{"type":"l2_updates","symbol":"BTCUSD",'
                             '"changes":[["sell","2","0"]]}', 12)
    assert again[0].value["snapshot"] is False and again[0].value["sequence"] == 1


@pytest.mark.parametrize("text,match", [
    ('{"type":"l2_updates","symbol":"BTCUSD","changes":[["hold","1","1"]]}', "unknown side"),
    ('{"type":"l2_updates","symbol":"BTCUSD","changes":[["buy","1","-1"]]}', "not a non-negative"),
    ('{"type":"l2_updates","symbol":"BTCUSD","changes":[["buy","1e3","1"]]}', "not a non-negative"),
    ('{"type":"trade","symbol":"BTCUSD","event_id":1,"timestamp":2,"price":1.5,"quantity":"1"}',
     "not a non-negative"),
    ('{"type":"l2_updates","symbol":"BTC/USD","changes":[]}', "invalid symbol"),
    ('{"type":"candles_1m_updates","symbol":"BTCUSD"}', "unknown frame type"),
    (MALFORMED, "not JSON"),
])
def test_v2_normalizer_refuses_bad_frames_with_a_reason(text, match):
    with pytest.raises(FrameError, match=match):
        V2Normalizer("c").normalize_text(text, 0)


def test_v2_trade_id_is_gemini_tid_and_falls_back_to_event_id_in_older_frames():
    n = V2Normalizer("c")
    (current,) = n.normalize({"type": "trade", "symbol": "BTCUSD", "event_id": 3575573053,
                              "tid": 2840140800, "timestamp": 1624493651491, "price": "1",
                              "quantity": "2", "side": "buy"}, 1)
    assert current.value["trade_id"] == 2840140800 and current.value["taker_side"] == "BUY"
    # The 2021 capture's trades predate tid: their event_id is their only id.
    (older,) = n.normalize({"type": "trade", "symbol": "ALCXUSD", "event_id": 45465785975,
                            "timestamp": 1624493651491, "price": "302.53",
                            "quantity": "0.992143", "side": "buy"}, 2)
    assert older.value["trade_id"] == 45465785975


def test_v2_auction_frames_are_skipped_and_counted_not_refused():
    n = V2Normalizer("c")
    auction = {"symbol": "BTCUSD", "time_ms": 1560974400000, "result": "success",
               "highest_bid_price": "9150.80", "lowest_ask_price": "9150.81",
               "collar_price": "9146.93"}
    for kind in ("auction_open", "auction_indicative", "auction_result", "auction_result"):
        assert n.normalize({"type": kind, **auction}, 1) == []
    assert n.skipped == {"auction_open": 1, "auction_indicative": 1, "auction_result": 2}
    assert n.sequence == 3, "counted as frames of the connection all the same"


def test_v1_normalizer_detects_a_socket_sequence_gap_and_flags_the_initial_book():
    n = V1Normalizer("c", "BTCUSD")
    initial = n.normalize({"type": "update", "eventId": 1, "socket_sequence": 0, "events": [
        {"type": "change", "reason": "initial", "side": "bid", "price": "10", "remaining": "2",
         "delta": "2"}]}, 1)
    assert initial[0].value["snapshot"] is True
    trade = n.normalize({"type": "update", "eventId": 2, "socket_sequence": 1, "timestampms": 5,
                         "events": [{"type": "trade", "tid": 9, "price": "10", "amount": "1",
                                     "makerSide": "bid"},
                                    {"type": "change", "reason": "trade", "side": "bid",
                                     "price": "10", "remaining": "1", "delta": "-1"}]}, 2)
    assert [r.topic for r in trade] == ["md.l2", "md.trades"]
    assert trade[0].value["snapshot"] is False and trade[1].value["taker_side"] == "SELL"
    assert n.normalize({"type": "heartbeat", "socket_sequence": 2}, 3) == []
    with pytest.raises(SequenceGap, match="socket_sequence 4 after 2"):
        n.normalize({"type": "heartbeat", "socket_sequence": 4}, 4)


def test_the_generator_is_reproducible_realistic_and_never_crossed():
    def frames(seed):
        return [f for e in itertools.islice(generated_events(["BTCUSD", "ETHBTC"], seed), 20000)
                for f in render_v2(e)]

    assert frames(5) == frames(5)
    assert frames(5) != frames(6)
    market, trades = Market(), 0
    for event in itertools.islice(generated_events(["BTCUSD", "ETHBTC"], 5), 20000):
        market.apply(event)
        trades += len(event.trades)
        book = market.books[event.symbol]
        assert max(book.bids, key=float) < min(book.asks, key=float), "crossed"
    assert trades > 1000
    for symbol, book in market.books.items():
        assert len(book.bids) >= 25 and len(book.asks) >= 25, symbol
    eth = market.books["ETHBTC"]
    assert all(len(p.split(".")[1]) == 5 for p in eth.bids), "ETHBTC tick is 0.00001"


# --------------------------------------------------------------------------- through Kafka


@pytest.fixture
def ingest_topics(kafka, namespace):
    ensure_topics(kafka, namespace, ["raw.frames", "md.l2", "md.trades", "dlq"])
    return {name: namespace.topic(name) for name in ("raw.frames", "md.l2", "md.trades", "dlq")}


def test_a_looped_capture_moves_each_pass_past_the_one_before(shared_data):
    """make demo loops the 30 s capture: every pass after the first is the same market
    moved on in time and trade ids (bars keep closing, no id repeats), the snapshot's recent
    trades are not sent again, and the frames sent say what the events say."""
    import itertools

    first = list(capture_events(shared_data / CAPTURE))
    looped = list(itertools.islice(looped_capture_events(shared_data / CAPTURE), 3 * len(first)))
    assert looped[:len(first)] == first
    span_s = max(e.at_s for e in first) - min(e.at_s for e in first) + 1.0
    for n in (1, 2):
        again = looped[n * len(first):(n + 1) * len(first)]
        assert [e.symbol for e in again] == [e.symbol for e in first]
        assert [e.changes for e in again] == [e.changes for e in first]
        assert {round(b.at_s - a.at_s, 3) for a, b in zip(first, again)} == {round(n * span_s, 3)}
        assert all(not e.trades for e in again if e.snapshot)
        for event in again:
            frame = json.loads(event.raw_v2)
            sent = [frame] if frame["type"] == "trade" else frame.get("trades", [])
            assert sent == event.trades
    live = [t for e in looped if not e.snapshot for t in e.trades]
    assert len(live) == 3 * sum(len(e.trades) for e in first if not e.snapshot) > 0
    for symbol in {t["symbol"] for t in live}:
        ids = [t["event_id"] for t in live if t["symbol"] == symbol]
        times = [t["timestamp"] for t in live if t["symbol"] == symbol]
        assert ids == sorted(set(ids)) and times == sorted(times)
    assert live[len(live) // 3]["timestamp"] - live[0]["timestamp"] == round(span_s * 1000)

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


# --------------------------------------------------------------------------- one venue, both sides


def test_the_running_venue_fills_signed_orders_against_the_market_it_streams(tmp_path):
    from decimal import Decimal

    from pipeline.gemini.rest import GeminiApiError, GeminiRestClient, NonceSource

    venue = RunningVenue(VenueConfig(symbols=["BTCUSD"], rate=500, start_on_subscribe=False,
                                     api_keys={"key-1": "secret-1"}))
    try:
        wait_for(lambda: "BTCUSD" in status(venue)["symbols"], 10, "the generated book")
        best_ask = venue.venue.market.levels("BTCUSD", "ask")[0][0]
        client = GeminiRestClient(venue.http_url, "key-1", "secret-1",
                                  NonceSource(tmp_path / "nonce"))
        order = client.new_order("BTCUSD", "0.001", str(best_ask + 50), "buy",
                                 client_order_id="c-1", options=["immediate-or-cancel"])
        assert order["client_order_id"] == "c-1" and Decimal(order["executed_amount"]) == \
            Decimal("0.001")
        assert Decimal(order["avg_execution_price"]) <= best_ask + 50
        forged = GeminiRestClient(venue.http_url, "key-1", "not-the-secret",
                                  NonceSource(tmp_path / "nonce2"))
        with pytest.raises(GeminiApiError) as refused:
            forged.new_order("BTCUSD", "0.001", str(best_ask), "buy", client_order_id="c-2")
        assert refused.value.reason == "InvalidSignature"
        outcomes = [(entry["client_order_id"], entry["outcome"]) for entry in venue.venue.rest_log]
        assert outcomes == [("c-1", "accepted"), ("c-2", "InvalidSignature")]
    finally:
        venue.stop()
