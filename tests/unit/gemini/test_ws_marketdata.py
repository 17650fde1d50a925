"""Gemini's new WebSocket API for market data: the normalizer's rules (pure), the venue's
side over real sockets, and the producer into the real broker (the capture's books after
every update, an update-id gap resnapshotting one symbol, a quiet connection kept).

The tests that need Kafka: tests/integration/test_gemini_ws_marketdata.py."""

from __future__ import annotations

import json
import logging
import time
from decimal import Decimal

import pytest
import websocket

from pipeline.gemini.marketdata import FrameError, UpdateGap, WsNormalizer
from pipeline.venue.server import RunningVenue, VenueConfig
from tests.support.processes import venue_status as status
from tests.support.waiting import wait_for

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


