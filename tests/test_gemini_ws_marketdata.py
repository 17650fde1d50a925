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

from pipeline.avro import schemas
from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Decoder, Encoder
from pipeline.gemini.capture import received_frames
from pipeline.gemini.marketdata import FrameError, UpdateGap, WsNormalizer
from pipeline.kafka.catalog import ensure_topics
from pipeline.venue.server import RunningVenue, VenueConfig
from tests.support.books import books_from_records, follow_capture
from tests.support.processes import CAPTURE, CAPTURE_SYMBOLS, Producer
from tests.support.processes import venue_status as status
from tests.support.records import SAMPLES
from tests.support.waiting import wait_for
from tests.test_ingest import decoded

RELEASED = Path(__file__).parent / "support" / "schemas_md_released"
SNAPSHOT = ('{"e":"depthUpdate","E":1700000000000000001,"s":"btcusd","U":10,"u":10,'
            '"b":[["100.50","1"],["100","2.5"]],"a":[["101","0.00001"]]}')


def update(first: int, last: int, bids=(), asks=(), symbol: str = "btcusd") -> str:
    return json.dumps({"e": "depthUpdate", "E": 1_700_000_000_123_456_789, "s": symbol,
                       "U": first, "u": last, "b": [list(b) for b in bids],
                       "a": [list(a) for a in asks]})


def values(records) -> list[dict]:
    return [r.value for r in records]


def subscribed(*symbols: str) -> WsNormalizer:
    n = WsNormalizer("c")
    for symbol in symbols:
        n.expect_snapshot(symbol)
    return n


# --------------------------------------------------------------------------- the normalizer


def test_the_first_depth_update_is_the_snapshot_then_updates_continue_its_ids():
    n = subscribed("BTCUSD")
    (snap,) = values(n.normalize_text(SNAPSHOT, 1))
    assert snap["symbol"] == "BTCUSD" and snap["snapshot"] is True
    assert snap["changes"] == [{"side": "BID", "price": "100.50", "quantity": "1"},
                               {"side": "BID", "price": "100", "quantity": "2.5"},
                               {"side": "ASK", "price": "101", "quantity": "0.00001"}]
    assert (snap["first_update_id"], snap["last_update_id"], snap["sequence"]) == (10, 10, 0)
    # the first update may start before the snapshot's id, as long as it covers the next one
    (first,) = values(n.normalize_text(update(9, 11, bids=[("100.50", "0")]), 2))
    assert first["snapshot"] is False and (first["first_update_id"], first["last_update_id"]) \
        == (9, 11)
    assert first["changes"] == [{"side": "BID", "price": "100.50", "quantity": "0"}]
    assert first["exchange_ts_ns"] == 1_700_000_000_123_456_789
    assert first["exchange_ts_ms"] == 1_700_000_000_123 and first["sequence"] == 1
    (second,) = values(n.normalize_text(update(12, 12, asks=[("101.5", "3")]), 3))
    assert second["changes"] == [{"side": "ASK", "price": "101.5", "quantity": "3"}]
    # Gemini's live feed overlaps by one id (U == the previous u): contiguous, not a gap
    (third,) = values(n.normalize_text(update(12, 15), 4))
    assert third["last_update_id"] == 15 and n.skipped == {}


def test_updates_entirely_older_than_the_book_are_skipped_and_counted():
    n = subscribed("BTCUSD")
    n.normalize_text(SNAPSHOT, 1)
    assert n.normalize_text(update(5, 8), 2) == []
    assert n.normalize_text(update(9, 10), 3) == []
    assert n.skipped["stale depthUpdate"] == 2
    (applied,) = values(n.normalize_text(update(11, 11, bids=[("99", "1")]), 4))
    assert applied["first_update_id"] == 11


@pytest.mark.parametrize("updates,match", [
    ([(12, 13)], r"depthUpdate 12\.\.13 after update id 10 on"),
    ([(11, 12), (14, 14)], r"depthUpdate 14\.\.14 after update id 12 on"),
    ([(11, 12), (12, 13), (15, 16)], r"depthUpdate 15\.\.16 after update id 13 on"),
])
def test_a_gap_in_update_ids_raises_and_the_symbol_waits_for_its_resubscription(updates, match):
    n = subscribed("BTCUSD", "ETHUSD")
    n.normalize_text(SNAPSHOT, 1)
    n.normalize_text(update(5, 5, symbol="ethusd"), 1)  # ETHUSD's snapshot
    *fine, bad = updates
    for first, last in fine:
        assert len(n.normalize_text(update(first, last), 2)) == 1
    with pytest.raises(UpdateGap, match=match) as gap:
        n.normalize_text(update(*bad), 3)
    assert gap.value.symbol == "BTCUSD" and not n.has_book("BTCUSD") and n.has_book("ETHUSD")
    assert n.normalize_text(update(bad[1] + 1, bad[1] + 1), 4) == []  # no book: skipped
    # The feed resubscribes: frames of the old subscription may still come until the
    # UNSUBSCRIBE's answer; the first depthUpdate after it is the new snapshot.
    n.expect_snapshot("btcusd", after="u-1")
    assert n.normalize_text(update(bad[1] + 2, bad[1] + 2), 4) == []
    assert len(n.normalize_text(update(6, 6, symbol="ethusd"), 4)) == 1  # others go on
    assert n.normalize_text('{"id":"u-1","status":200}', 5) == []
    (again,) = values(n.normalize_text(update(40, 40, bids=[("1", "1")]), 6))
    assert again["snapshot"] is True and again["last_update_id"] == 40
    assert values(n.normalize_text(update(41, 41), 7))[0]["snapshot"] is False
    assert n.skipped == {"depthUpdate awaiting a snapshot": 1,
                         "depthUpdate of an ended subscription": 1}


def test_a_depth_update_of_a_symbol_never_subscribed_is_skipped():
    n = subscribed("BTCUSD")
    assert n.normalize_text(update(1, 1, symbol="ethusd"), 1) == []
    assert n.skipped == {"depthUpdate awaiting a snapshot": 1}


def test_trades_and_method_responses():
    n = WsNormalizer("c")
    # Gemini's documented trade frame: no "e", "m" is whether the buyer was the maker
    (trade,) = values(n.normalize_text(
        '{"E":1759873803503023900,"s":"btcusd","t":2840140956529623,"p":"120649.97000",'
        '"q":"0.0046190900","m":true}', 7))
    assert trade == {"symbol": "BTCUSD", "trade_id": 2840140956529623, "price": "120649.97000",
                     "quantity": "0.0046190900", "taker_side": "SELL",
                     "exchange_ts_ms": 1759873803503, "received_ts_us": 7,
                     "connection_id": "c", "sequence": 0, "from_snapshot": False,
                     "exchange_ts_ns": 1759873803503023900}
    (buy,) = values(n.normalize_text(
        '{"e":"trade","E":1,"s":"ethbtc","t":43,"p":"1","q":"1","m":false}', 8))
    assert buy["taker_side"] == "BUY" and buy["symbol"] == "ETHBTC"
    assert n.normalize_text('{"id":"1","status":200}', 9) == []
    assert n.normalize_text('{"id":2,"status":200,"result":["btcusd@trade"]}', 9) == []
    assert n.normalize_text('{"id":"3","status":400,"error":{"code":-1013,'
                            '"msg":"Invalid stream name: x@trade"}}', 9) == []
    assert n.skipped == {"error response": 1}


def test_frames_of_unknown_types_or_streams_are_counted_and_logged_once(caplog):
    n = WsNormalizer("c")
    with caplog.at_level(logging.INFO, logger="pipeline.gemini.marketdata"):
        for _ in range(3):
            assert n.normalize_text('{"e":"markPrice","E":1,"s":"btcusd","p":"1"}', 1) == []
        assert n.normalize_text('{"u":1,"E":1,"s":"btcusd","b":"1","B":"1","a":"2","A":"1"}',
                                1) == []
        assert n.normalize_text('{"lastUpdateId":1,"bids":[],"asks":[]}', 1) == []
        assert n.normalize_text('{"x":1}', 1) == []
    assert n.skipped == {"unknown 'markPrice'": 3, "unknown bookTicker": 1,
                         "unknown partial depth": 1, "unknown frame with keys x": 1}
    logged = [r.getMessage() for r in caplog.records]
    assert sum("markPrice" in m for m in logged) == 1, logged
    assert n.sequence == 5


@pytest.mark.parametrize("text,match", [
    ('{"e":"depthUpdate","E":1,"s":"btcusd","U":11,"u":11,"b":[["1.5","-1"]],"a":[]}',
     "not a non-negative decimal"),
    ('{"e":"depthUpdate","E":1,"s":"btcusd","U":11,"u":11,"b":[["1e3","1"]],"a":[]}',
     "not a non-negative decimal"),
    ('{"e":"depthUpdate","E":1,"s":"btcusd","U":11,"u":11,"b":[["1","1","x"]],"a":[]}',
     r"not \[price, quantity\]"),
    ('{"e":"depthUpdate","E":1,"s":"btcusd","U":11,"u":11,"b":{},"a":[]}', "BID is not a list"),
    ('{"e":"depthUpdate","E":1,"s":"btcusd","U":12,"u":11,"b":[],"a":[]}', "U 12 > u 11"),
    ('{"e":"depthUpdate","E":1,"s":"btcusd","U":"11","u":11,"b":[],"a":[]}', "not a non-neg"),
    ('{"e":"depthUpdate","E":1,"s":"btc/usd","U":11,"u":11,"b":[],"a":[]}', "invalid symbol"),
    ('{"e":"depthUpdate","s":"btcusd","U":11,"u":11,"b":[],"a":[]}', "E None"),
    ('{"E":1,"s":"btcusd","t":1,"p":1.5,"q":"1","m":true}', "not a non-negative decimal"),
    ('{"E":1,"s":"btcusd","t":-4,"p":"1.5","q":"1","m":true}', "trade id t -4"),
    ('[1,2]', "expected a JSON object"),
    ('{"e":"depthUpdate","E":1,"s":"btcusd","U":11,"u":1', "not JSON"),
])
def test_malformed_frames_are_refused_with_a_reason(text, match):
    n = subscribed("BTCUSD")
    n.normalize_text(SNAPSHOT, 0)
    with pytest.raises(FrameError, match=match):
        n.normalize_text(text, 1)
    assert n.has_book("BTCUSD"), "a refused frame changes no book state"
    assert len(n.normalize_text(update(11, 11), 2)) == 1


# --------------------------------------------------------------------------- the venue


def test_the_venue_answers_methods_and_refuses_bad_requests_in_gemini_shapes():
    venue = RunningVenue(VenueConfig(symbols=["BTCUSD", "ETHUSD"], rate=200,
                                     start_on_subscribe=False))
    try:
        wait_for(lambda: {"BTCUSD", "ETHUSD"} <= set(status(venue)["symbols"]), 10, "books")
        ws = websocket.create_connection(f"{venue.ws_url}/?snapshot=5", timeout=5)
        ws.send(json.dumps({"id": "1", "method": "SUBSCRIBE", "params": ["btcusd@depth@100ms"]}))
        snapshot = json.loads(ws.recv())  # the initial book: a depthUpdate of absolute levels
        assert snapshot["e"] == "depthUpdate" and snapshot["s"] == "btcusd"
        assert snapshot["U"] == snapshot["u"] and len(snapshot["b"]) == len(snapshot["a"]) == 5
        assert Decimal(snapshot["b"][0][0]) > Decimal(snapshot["b"][1][0]), "best first"
        frames = [json.loads(ws.recv()) for _ in range(20)]
        assert frames[0] == {"id": "1", "status": 200}, "the answer after the snapshot"
        depth = [snapshot] + [f for f in frames if f.get("e") == "depthUpdate"]
        assert all(b["U"] == a["u"] + 1 and b["U"] == b["u"] for a, b in zip(depth, depth[1:]))
        assert {f["s"] for f in depth} == {"btcusd"} and len(depth) > 10
        assert _ask(ws, {"id": "2", "method": "LIST_SUBSCRIPTIONS"})["result"] == \
            ["btcusd@depth@100ms"]
        assert _ask(ws, {"id": 3, "method": "ping", "params": {}}) == {"id": 3, "status": 200}
        server_ms = _ask(ws, {"id": "4", "method": "time"})["result"]
        assert abs(server_ms - time.time() * 1000) < 5000
        book = _ask(ws, {"id": "5", "method": "depth", "params": {"symbol": "ethusd",
                                                                   "limit": 3}})["result"]
        assert len(book["bids"]) == len(book["asks"]) == 3 and book["lastUpdateId"] > 0
        assert Decimal(book["bids"][0][0]) < Decimal(book["asks"][0][0])
        for request, status_code, code, msg in (
                ({"id": "6", "method": "order.place", "params": {}}, 401, -1002,
                 "Authentication required"),
                ({"id": "7", "method": "SUBSCRIBE", "params": ["orders@account"]}, 401, -1002,
                 "Authentication required"),
                ({"id": "8", "method": "nope"}, 400, -1020, "Unsupported operation"),
                ({"id": "9", "method": "", "params": {}}, 400, -1020, "Unsupported operation"),
                ({"id": "10", "method": "subscribe", "params": ["btcusd@trade", "dogeusd@trade"]},
                 400, -1013, "Invalid stream name: dogeusd@trade"),
                ({"id": "11", "method": "SUBSCRIBE", "params": ["btcusd@kline_1m"]}, 400, -1013,
                 "Invalid stream name: btcusd@kline_1m"),
                ({"id": "12", "method": "SUBSCRIBE", "params": {"streams": ["btcusd@trade"]}},
                 400, -1013, None),
                ({"id": "13", "method": "depth", "params": {"symbol": "nope"}}, 400, -1013,
                 "Invalid symbol: nope"),
                ({"id": "14", "method": "depth", "params": {"symbol": "btcusd", "limit": 0}},
                 400, -1013, None)):
            answer = _ask(ws, request)
            assert (answer["status"], answer["error"]["code"]) == (status_code, code), answer
            assert answer["error"]["msg"] == msg if msg else answer["error"]["msg"]
        # one bad name refused the whole request: btcusd@trade was not subscribed
        assert _ask(ws, {"id": "15", "method": "list_subscriptions"})["result"] == \
            ["btcusd@depth@100ms"]
        ws.send("not json")
        refused = json.loads(_skip_to_error(ws))
        assert refused["id"] is None and refused["error"]["code"] == -1013
        assert _ask(ws, {"id": "16", "method": "UNSUBSCRIBE",
                         "params": ["btcusd@depth@100ms"]}) == {"id": "16", "status": 200}
        assert _ask(ws, {"id": "17", "method": "LIST_SUBSCRIPTIONS"})["result"] is None
        ws.settimeout(0.5)
        with pytest.raises(websocket.WebSocketTimeoutException):
            ws.recv()  # nothing comes after the UNSUBSCRIBE's answer
        ws.close()
        # Without ?snapshot the answer comes first, then only updates; trades have no "e".
        ws = websocket.create_connection(venue.ws_url, timeout=5)
        assert _ask(ws, {"id": 1, "method": "subscribe",
                         "params": ["ETHUSD@depth", "ethusd@trade"]}) == {"id": 1, "status": 200}
        frames = [json.loads(ws.recv()) for _ in range(60)]
        trades = [f for f in frames if "t" in f]
        assert trades and all(set(t) == {"E", "s", "t", "p", "q", "m"} for t in trades)
        depth = [f for f in frames if f.get("e") == "depthUpdate"]
        assert all(b["U"] == a["u"] + 1 for a, b in zip(depth, depth[1:]))
        ws.close()
    finally:
        venue.stop()


def _ask(ws, request: dict) -> dict:
    ws.send(json.dumps(request))
    while True:
        frame = json.loads(ws.recv())
        if "id" in frame and frame.get("id") == request["id"]:
            return frame


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
