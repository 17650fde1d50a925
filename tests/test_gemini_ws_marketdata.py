"""Gemini's new WebSocket API for market data: the normalizer's rules (pure), the venue's
side over real sockets, and the producer into the real broker (the capture's books after
every update, an update-id gap resnapshotting one symbol, a quiet connection kept)."""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import pytest
import requests
import websocket

from pipeline import schemas
from pipeline.catalog import ensure_topics
from pipeline.gemini.capture import received_frames
from pipeline.gemini.marketdata import FrameError, UpdateGap, WsNormalizer
from pipeline.orderbook import L2Book
from pipeline.registry import SchemaRegistry
from pipeline.serde import Decoder, Encoder
from pipeline.venue.server import RunningVenue, VenueConfig
from tests.support.books import apply as reference_apply
from tests.support.books import books_from_records
from tests.support.kafka_io import read_all
from tests.support.processes import CAPTURE, CAPTURE_SYMBOLS, Producer
from tests.support.processes import venue_status as status
from tests.support.records import SAMPLES
from tests.support.waiting import wait_for

RELEASED = Path(__file__).parent / "support" / "schemas_md_released"
SNAPSHOT = '{"lastUpdateId":10,"s":"btcusd","bids":[["100.50","1"],["100","2.5"]],"asks":[["101","0.00001"]]}'


def update(first: int, last: int, bids=(), asks=(), symbol: str = "btcusd") -> str:
    return json.dumps({"e": "depthUpdate", "E": 1_700_000_000_123_456_789, "s": symbol,
                       "U": first, "u": last, "b": [list(b) for b in bids],
                       "a": [list(a) for a in asks]})


def values(records) -> list[dict]:
    return [r.value for r in records]


# --------------------------------------------------------------------------- the normalizer


def test_the_snapshot_then_updates_that_continue_its_ids_become_records():
    n = WsNormalizer("c")
    (snap,) = values(n.normalize_text(SNAPSHOT, 1))
    assert snap["symbol"] == "BTCUSD" and snap["snapshot"] is True
    assert snap["changes"] == [{"side": "BID", "price": "100.50", "quantity": "1"},
                               {"side": "BID", "price": "100", "quantity": "2.5"},
                               {"side": "ASK", "price": "101", "quantity": "0.00001"}]
    assert (snap["first_update_id"], snap["last_update_id"], snap["sequence"]) == (None, 10, 0)
    # the first update may start before the snapshot's id, as long as it covers the next one
    (first,) = values(n.normalize_text(update(9, 11, bids=[("100.50", "0")]), 2))
    assert first["snapshot"] is False and (first["first_update_id"], first["last_update_id"]) \
        == (9, 11)
    assert first["changes"] == [{"side": "BID", "price": "100.50", "quantity": "0"}]
    assert first["exchange_ts_ns"] == 1_700_000_000_123_456_789
    assert first["exchange_ts_ms"] == 1_700_000_000_123 and first["sequence"] == 1
    (second,) = values(n.normalize_text(update(12, 12, asks=[("101.5", "3")]), 3))
    assert second["changes"] == [{"side": "ASK", "price": "101.5", "quantity": "3"}]
    assert n.skipped == {}


def test_updates_entirely_older_than_the_snapshot_are_skipped_and_counted():
    n = WsNormalizer("c")
    n.normalize_text(SNAPSHOT, 1)
    assert n.normalize_text(update(5, 8), 2) == []
    assert n.normalize_text(update(9, 10), 3) == []
    assert n.skipped["stale depthUpdate"] == 2
    (applied,) = values(n.normalize_text(update(11, 11, bids=[("99", "1")]), 4))
    assert applied["first_update_id"] == 11


@pytest.mark.parametrize("updates,match", [
    ([(12, 13)], r"depthUpdate 12\.\.13 after update id 10 \(the snapshot\)"),
    ([(11, 12), (14, 14)], r"depthUpdate 14\.\.14 after update id 12 on"),
    ([(11, 12), (12, 13)], r"depthUpdate 12\.\.13 after update id 12 on"),  # overlap
])
def test_a_gap_in_update_ids_raises_and_the_symbol_waits_for_a_new_snapshot(updates, match):
    n = WsNormalizer("c")
    n.normalize_text(SNAPSHOT, 1)
    n.normalize_text(update(30, 30, symbol="ethusd"), 1)  # no ETHUSD book: skipped
    n.normalize_text('{"lastUpdateId":5,"s":"ethusd","bids":[],"asks":[]}', 1)
    *fine, bad = updates
    for first, last in fine:
        assert len(n.normalize_text(update(first, last), 2)) == 1
    with pytest.raises(UpdateGap, match=match) as gap:
        n.normalize_text(update(*bad), 3)
    assert gap.value.symbol == "BTCUSD" and not n.has_book("BTCUSD") and n.has_book("ETHUSD")
    # until the new snapshot, BTCUSD's updates are skipped (not another gap), ETHUSD's go on
    assert n.normalize_text(update(bad[1] + 1, bad[1] + 1), 4) == []
    assert len(n.normalize_text(update(6, 6, symbol="ethusd"), 4)) == 1
    assert n.skipped["depthUpdate awaiting a snapshot"] == 2
    (again,) = values(n.normalize_text(SNAPSHOT.replace('"lastUpdateId":10', '"lastUpdateId":40'),
                                       5))
    assert again["snapshot"] is True and again["last_update_id"] == 40
    assert len(n.normalize_text(update(41, 41), 6)) == 1


def test_trades_and_method_responses():
    n = WsNormalizer("c")
    (trade,) = values(n.normalize_text(
        '{"e":"trade","E":1700000000123456789,"s":"ethbtc","t":42,"p":"0.05501","q":"1.50",'
        '"T":1700000000123,"m":true}', 7))
    assert trade == {"symbol": "ETHBTC", "trade_id": 42, "price": "0.05501", "quantity": "1.50",
                     "taker_side": "SELL", "exchange_ts_ms": 1_700_000_000_123,
                     "received_ts_us": 7, "connection_id": "c", "sequence": 0,
                     "from_snapshot": False, "exchange_ts_ns": 1_700_000_000_123_456_789}
    (buy,) = values(n.normalize_text(
        '{"e":"trade","E":1,"s":"ethbtc","t":43,"p":"1","q":"1","m":false}', 8))
    assert buy["taker_side"] == "BUY"
    assert n.normalize_text('{"id":"1","status":200,"result":null}', 9) == []
    assert n.normalize_text('{"id":"2","status":200,"result":{}}', 9) == []
    assert n.normalize_text('{"id":"3","status":400,"error":{"code":-1121,"msg":"no"}}', 9) == []
    assert n.skipped == {"error response": 1}
    # a depth call's answer is that symbol's book, a snapshot like the initial one
    n.expect_depth("4", "btcusd")
    (book,) = values(n.normalize_text('{"id":"4","status":200,"result":{"lastUpdateId":77,'
                                      '"bids":[["1","2"]],"asks":[]}}', 10))
    assert book["symbol"] == "BTCUSD" and book["snapshot"] and book["last_update_id"] == 77
    assert len(n.normalize_text(update(78, 78), 11)) == 1


def test_frames_of_unknown_types_or_streams_are_counted_and_logged_once(caplog):
    n = WsNormalizer("c")
    with caplog.at_level(logging.INFO, logger="pipeline.gemini.marketdata"):
        for _ in range(3):
            assert n.normalize_text('{"e":"kline","E":1,"s":"btcusd","k":{}}', 1) == []
        assert n.normalize_text('{"stream":"btcusd@x","data":{"e":"x"}}', 1) == []
        assert n.normalize_text('{"u":1,"s":"btcusd","b":"1","B":"1","a":"2","A":"1"}', 1) == []
    assert n.skipped["unknown 'kline'"] == 3 and n.skipped["unknown 'x'"] == 1
    assert n.skipped["unknown frame with keys A,B,a,b,s,u"] == 1
    logged = [r.getMessage() for r in caplog.records]
    assert sum("'kline'" in m for m in logged) == 1, logged
    assert n.sequence == 4


@pytest.mark.parametrize("text,match", [
    ('{"e":"depthUpdate","E":1,"s":"btcusd","U":11,"u":11,"b":[["1.5","-1"]],"a":[]}',
     "not a non-negative decimal"),
    ('{"e":"depthUpdate","E":1,"s":"btcusd","U":11,"u":11,"b":[["1e3","1"]],"a":[]}',
     "not a non-negative decimal"),
    ('{"e":"depthUpdate","E":1,"s":"btcusd","U":11,"u":11,"b":[["1","1","x"]],"a":[]}',
     r"not \[price, quantity\]"),
    ('{"e":"depthUpdate","E":1,"s":"btcusd","U":12,"u":11,"b":[],"a":[]}', "U 12 > u 11"),
    ('{"e":"depthUpdate","E":1,"s":"btcusd","U":"11","u":11,"b":[],"a":[]}', "not a non-neg"),
    ('{"e":"depthUpdate","E":1,"s":"btc/usd","U":11,"u":11,"b":[],"a":[]}', "invalid symbol"),
    ('{"e":"depthUpdate","s":"btcusd","U":11,"u":11,"b":[],"a":[]}', "E None"),
    ('{"e":"trade","E":1,"s":"btcusd","t":1,"p":1.5,"q":"1"}', "not a non-negative decimal"),
    ('{"lastUpdateId":-1,"s":"btcusd","bids":[],"asks":[]}', "lastUpdateId -1"),
    ('{"lastUpdateId":3,"s":"btcusd","bids":{},"asks":[]}', "BID is not a list"),
    ('[1,2]', "expected a JSON object"),
    ('{"e":"depthUpdate","E":1,"s":"btcusd","U":11,"u":1', "not JSON"),
])
def test_malformed_frames_are_refused_with_a_reason(text, match):
    n = WsNormalizer("c")
    n.normalize_text(SNAPSHOT, 0)
    with pytest.raises(FrameError, match=match):
        n.normalize_text(text, 1)
    assert n.has_book("BTCUSD"), "a refused frame changes no book state"


# --------------------------------------------------------------------------- the venue


def _ask(ws, request: dict) -> dict:
    ws.send(json.dumps(request))
    while True:
        frame = json.loads(ws.recv())
        if frame.get("id") == request["id"]:
            return frame


def test_the_venue_answers_methods_and_refuses_bad_requests_in_gemini_shapes():
    venue = RunningVenue(VenueConfig(symbols=["BTCUSD", "ETHUSD"], rate=200,
                                     start_on_subscribe=False))
    try:
        wait_for(lambda: {"BTCUSD", "ETHUSD"} <= set(status(venue)["symbols"]), 10, "books")
        ws = websocket.create_connection(f"{venue.ws_url}/?snapshot=5", timeout=5)
        ws.send(json.dumps({"id": "1", "method": "SUBSCRIBE", "params": ["btcusd@depth@100ms"]}))
        assert json.loads(ws.recv()) == {"id": "1", "status": 200, "result": None}
        snapshot = json.loads(ws.recv())  # the initial book comes right after the answer
        assert snapshot["s"] == "btcusd" and len(snapshot["bids"]) == len(snapshot["asks"]) == 5
        frames = [json.loads(ws.recv()) for _ in range(20)]
        depth = [f for f in frames if f.get("e") == "depthUpdate"]
        assert depth[0]["U"] == snapshot["lastUpdateId"] + 1
        assert all(b["U"] == a["u"] + 1 and b["U"] == b["u"] for a, b in zip(depth, depth[1:]))
        assert {f["s"] for f in depth} == {"btcusd"}
        assert _ask(ws, {"id": "2", "method": "LIST_SUBSCRIPTIONS"})["result"] == \
            ["btcusd@depth@100ms"]
        assert _ask(ws, {"id": 3, "method": "ping"}) == {"id": 3, "status": 200, "result": {}}
        server_ns = _ask(ws, {"id": "4", "method": "time"})["result"]["serverTime"]
        assert abs(server_ns - time.time_ns()) < 5e9
        book = _ask(ws, {"id": "5", "method": "depth", "params": {"symbol": "ethusd",
                                                                   "limit": 3}})["result"]
        assert len(book["bids"]) == 3 and book["lastUpdateId"] > 0
        assert Decimal(book["bids"][0][0]) < Decimal(book["asks"][0][0])
        for request, code in (
                ({"id": "6", "method": "order.place", "params": {}}, -1002),
                ({"id": "7", "method": "SUBSCRIBE", "params": ["dogeusd@trade"]}, -1121),
                ({"id": "8", "method": "SUBSCRIBE", "params": ["btcusd@kline_1m"]}, -1100),
                ({"id": "9", "method": "SUBSCRIBE", "params": "btcusd@trade"}, -1102),
                ({"id": "10", "method": "depth", "params": {"symbol": "nope"}}, -1121)):
            answer = _ask(ws, request)
            assert answer["status"] == 400 and answer["error"]["code"] == code, answer
            assert isinstance(answer["error"]["msg"], str) and answer["error"]["msg"]
        ws.send("not json")
        assert json.loads(_skip_to_error(ws)) == {
            "id": None, "status": 400, "error": {"code": -1102, "msg": "the request is not JSON"}}
        assert _ask(ws, {"id": "11", "method": "UNSUBSCRIBE",
                         "params": ["btcusd@depth@100ms"]})["status"] == 200
        assert _ask(ws, {"id": "12", "method": "LIST_SUBSCRIPTIONS"})["result"] == []
        ws.settimeout(0.5)
        with pytest.raises(websocket.WebSocketTimeoutException):
            while True:  # frames already queued drain, then nothing more comes
                assert json.loads(ws.recv()).get("e") == "depthUpdate"
        ws.close()
    finally:
        venue.stop()


def _skip_to_error(ws) -> str:
    while True:
        text = ws.recv()
        if '"error"' in text:
            return text


# --------------------------------------------------------------------------- through Kafka


@pytest.fixture
def ingest_topics(kafka, namespace):
    ensure_topics(kafka, namespace, ["raw.frames", "md.l2", "md.trades", "dlq"])
    return {name: namespace.topic(name) for name in ("raw.frames", "md.l2", "md.trades", "dlq")}


def decoded(kafka: str, registry_url: str, topic: str, expect: int | None = None) -> list[dict]:
    decode = Decoder(SchemaRegistry(registry_url))
    return [decode(r.value) for r in read_all(kafka, topic, expect=expect, timeout=60)]


def per_symbol(records: list[dict]) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for record in sorted(records, key=lambda r: (r["connection_id"], r["sequence"])):
        out[record["symbol"]].append(record)
    return out


def as_decimals(book: L2Book) -> dict:
    return {side: {Decimal(p): Decimal(q) for p, q in levels.items()}
            for side, levels in book.levels().items()}


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
        assert ids[0][0] is None and all(first == last == ids[0][1] + i + 1
                                         for i, (first, last) in enumerate(ids[1:]))
        assert all(r["exchange_ts_ns"] and r["exchange_ts_ms"] == r["exchange_ts_ns"] // 10**6
                   for r in records[1:])
        book, reference = L2Book(symbol), {}
        for record, raw in zip(records, raw_per_symbol[symbol]):
            book.apply_snapshot(record["changes"]) if record["snapshot"] else \
                book.apply(record["changes"])
            for side, price, quantity in raw["changes"]:
                reference_apply(reference, symbol, "BID" if side == "buy" else "ASK", price,
                                quantity)
            assert as_decimals(book) == reference[symbol], f"{symbol} after update {compared}"
            compared += 1
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
    assert {"status": 200, "result": {}} in [{k: a[k] for k in ("status", "result")}
                                            for a in answers], answers
    assert len(answers) >= 3, "the SUBSCRIBE answer and at least two pings"


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
