"""Gemini ingest: the local venue over real WebSockets, the producer as a real process,
records checked in the real Kafka topics.

The tests that need Kafka: tests/integration/test_ingest.py."""

from __future__ import annotations

import itertools
import json

import pytest

from pipeline.gemini.marketdata import FrameError, SequenceGap, V1Normalizer, V2Normalizer
from pipeline.venue.market import (
    Market,
    capture_events,
    generated_events,
    looped_capture_events,
    render_v2,
)
from pipeline.venue.server import MALFORMED, RunningVenue, VenueConfig
from tests.support.processes import CAPTURE
from tests.support.processes import venue_status as status
from tests.support.waiting import wait_for


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


