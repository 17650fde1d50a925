"""Gemini's public history without sockets: the client's paging and records
(pipeline/gemini/history.py) and the venue's history and page rule (pipeline/venue/history.py)."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from pipeline.core.errors import PipelineError
from pipeline.gemini.history import (
    MAX_TRADES,
    Cursor,
    Since,
    candle_bars,
    parse_since,
    read_page,
    start_cursor,
    time_frame,
    trade_record,
)
from pipeline.gemini.marketdata import FrameError
from pipeline.kafka.catalog import Namespace
from pipeline.venue.history import (
    HistoryError,
    HistoryTrade,
    TradeHistory,
    candles_text,
    trade_json,
    trades_query,
)
from producers.gemini_history import refuse_live

END_MS = 1_750_000_000_000  # 2025-06-15 15:06:40 UTC
HOUR = 3_600_000


def entry(tid: int, ms: int, price: str = "100.5", amount: str = "0.25", side: str = "buy"):
    return {"timestamp": ms // 1000, "timestampms": ms, "tid": tid, "price": price,
            "amount": amount, "exchange": "gemini", "type": side}


# --------------------------------------------------------------------------- --since


def test_since_is_a_tid_a_time_or_the_beginning():
    assert parse_since("tid:12345") == Since(tid=12345)
    assert parse_since(" TID: 7 ") == Since(tid=7)
    assert parse_since("2025-06-15T00:00:00Z") == Since(ms=1_749_945_600_000)
    assert parse_since("2025-06-15") == Since(ms=1_749_945_600_000)
    assert parse_since("1749945600000") == Since(ms=1_749_945_600_000)
    assert parse_since(None) == Since() and parse_since("  ") == Since()
    with pytest.raises(PipelineError, match="tid:<digits>"):
        parse_since("tid:abc")
    with pytest.raises(PipelineError, match="not epoch ms or an ISO date-time"):
        parse_since("yesterday")


def test_live_is_refused():
    with pytest.raises(PipelineError, match="not live data"):
        refuse_live(Namespace("live"))
    refuse_live(Namespace("sim-x"))  # no error


# --------------------------------------------------------------------------- cursor


def test_first_request_resumes_after_the_newest_loaded_trade():
    assert start_cursor(Since(), None).params() == {"since_tid": 0, "limit_trades": 500}
    assert start_cursor(Since(ms=5000), None).params() == {"timestamp": 5000,
                                                           "limit_trades": 500}
    assert start_cursor(Since(tid=9), None, 50).params() == {"since_tid": 9, "limit_trades": 50}
    # the topic's newest trade (tid 40 at 4000 ms) wins over an earlier start...
    assert start_cursor(Since(ms=1000), (40, 4000)).params()["since_tid"] == 40
    assert start_cursor(Since(tid=3), (40, 4000)).params()["since_tid"] == 40
    assert start_cursor(Since(), (40, 4000)).params()["since_tid"] == 40
    # ...a later one wins over it
    assert start_cursor(Since(ms=9000), (40, 4000)).params() == {"timestamp": 9000,
                                                                 "limit_trades": 500}
    assert start_cursor(Since(tid=77), (40, 4000)).params()["since_tid"] == 77
    for bad in (0, MAX_TRADES + 1):
        with pytest.raises(PipelineError, match="limit_trades must be 1..500"):
            start_cursor(Since(), None, bad)


def test_a_page_is_reversed_checked_and_moves_the_cursor_to_its_last_tid():
    cursor = Cursor(10, None, limit=3)
    page = read_page([entry(13, 300), entry(12, 200), entry(11, 200)], cursor)
    assert [t["tid"] for t in page.trades] == [11, 12, 13]
    assert page.cursor == Cursor(13, None, 3) and not page.done  # full: there may be more
    short = read_page([entry(14, 400)], page.cursor)
    assert [t["tid"] for t in short.trades] == [14] and short.done
    empty = read_page([], short.cursor)
    assert empty.trades == [] and empty.done and empty.cursor == short.cursor
    # by time, the first page has no tid yet; the cursor then goes by tid
    by_time = read_page([entry(21, 900), entry(20, 800)], Cursor(None, 800, 2))
    assert by_time.cursor == Cursor(21, None, 2)


def test_until_cuts_the_page_and_ends_the_backfill():
    page = read_page([entry(13, 300), entry(12, 200), entry(11, 100)], Cursor(10, None, 3),
                     until_ms=300)
    assert [t["tid"] for t in page.trades] == [11, 12] and page.done


@pytest.mark.parametrize("entries, why", [
    ({"result": "error"}, "not a list"),
    ([entry(11, 1), entry(12, 2)], "out of order"),  # oldest first: not Gemini's order
    ([entry(10, 1)], "out of order"),  # not after since_tid
    ([entry(12, 1), entry(12, 1)], "out of order"),  # a tid twice
    ([{"tid": "12"}], "out of order"),
])
def test_a_page_that_would_skip_or_repeat_trades_is_refused(entries, why):
    with pytest.raises(FrameError, match=why):
        read_page(entries, Cursor(10, None, 5))


def test_trade_record_is_the_websocket_producers_trade():
    record = trade_record(entry(42, 1_700_000_000_123, "34000.10", "0.00100000", "sell"),
                          "BTCUSD", 1_700_000_001_000_000, "rest-backfill-abc", 3)
    assert record == {"symbol": "BTCUSD", "trade_id": 42, "price": "34000.10",
                      "quantity": "0.00100000", "taker_side": "SELL",
                      "exchange_ts_ms": 1_700_000_000_123, "received_ts_us": 1_700_000_001_000_000,
                      "connection_id": "rest-backfill-abc", "sequence": 3,
                      "from_snapshot": False, "exchange_ts_ns": None}
    assert trade_record(entry(1, 1, side="auction"), "BTCUSD", 0, "c", 0)["taker_side"] == "UNKNOWN"
    with pytest.raises(FrameError, match="price"):
        trade_record(entry(1, 1, price="1e5"), "BTCUSD", 0, "c", 0)


# --------------------------------------------------------------------------- candles


def test_intervals_map_to_gemini_time_frames():
    assert time_frame("1h") == ("1h", "1hr") and time_frame("1hr") == ("1h", "1hr")
    assert time_frame("1d") == ("1d", "1day") and time_frame("5m") == ("5m", "5m")
    for unknown in ("30m", "6hr", "2h"):
        with pytest.raises(PipelineError, match="unknown interval"):
            time_frame(unknown)


def test_candles_become_closed_bars_oldest_first_with_exact_decimals():
    text = ("[[1750003200000,34000.5,34010,33990.25,34001.00,12.50000001],"
            "[1749999600000,33990,34000.5,33980,34000.5,0.1]]")
    rows = json.loads(text, parse_float=Decimal)
    bars = candle_bars(rows, "BTCUSD", "1h", now_ms=1_750_003_200_000 + HOUR)
    assert [b["start_ms"] for b in bars] == [1_749_999_600_000, 1_750_003_200_000]
    assert (bars[1]["open"], bars[1]["high"], bars[1]["low"], bars[1]["close"],
            bars[1]["volume"]) == ("34000.5", "34010", "33990.25", "34001.00", "12.50000001")
    assert bars[0]["end_ms"] == 1_750_003_200_000 and bars[0]["interval"] == "1h"
    assert bars[0]["source"] == "gemini:/v2/candles/BTCUSD/1hr"
    # the newest candle's hour has not passed: it is still open, not published
    assert len(candle_bars(rows, "BTCUSD", "1h", now_ms=1_750_003_200_000 + HOUR - 1)) == 1
    with pytest.raises(FrameError, match="not aligned"):
        candle_bars([[1_750_003_200_001, 1, 1, 1, 1, 1]], "BTCUSD", "1h", now_ms=2 * END_MS)
    with pytest.raises(FrameError, match="not a number"):
        candle_bars([[1_750_003_200_000, "1", 1, 1, 1, 1]], "BTCUSD", "1h", now_ms=2 * END_MS)


# --------------------------------------------------------------------------- the venue


@pytest.fixture(scope="module")
def history() -> TradeHistory:
    return TradeHistory(["BTCUSD", "ETHUSD"], depth=1500, seed=1, end_ms=END_MS)


def test_history_is_deterministic_with_global_increasing_tids(history):
    again = TradeHistory(["ethusd", "btcusd"], depth=1500, seed=1, end_ms=END_MS)
    assert again.trades("BTCUSD") == history.trades("BTCUSD")
    btc, eth = history.trades("BTCUSD"), history.trades("ETHUSD")
    assert len(btc) == len(eth) == 1500
    for trades in (btc, eth):
        assert all(a.tid < b.tid for a, b in zip(trades, trades[1:]))
        assert all(a.timestamp_ms <= b.timestamp_ms for a, b in zip(trades, trades[1:]))
        assert all(t.side in ("buy", "sell") for t in trades)
    assert not {t.tid for t in btc} & {t.tid for t in eth}  # one tid sequence, as on Gemini
    span = max(btc[-1].timestamp_ms, eth[-1].timestamp_ms) - min(btc[0].timestamp_ms,
                                                                  eth[0].timestamp_ms)
    assert 2 * 86_400_000 < span < 3 * 86_400_000 and btc[-1].timestamp_ms < END_MS
    with pytest.raises(HistoryError, match="unknown symbol") as refused:
        history.trades("FOOUSD")
    assert refused.value.reason == "InvalidSymbol" and refused.value.status == 400


def test_a_page_is_the_oldest_after_the_point_listed_newest_first(history):
    btc = history.trades("BTCUSD")
    page = history.page("BTCUSD", since_tid=btc[9].tid, limit=5)
    assert page == btc[10:15][::-1]
    assert history.page("BTCUSD", since_tid=0, limit=3) == btc[:3][::-1]
    at = btc[20].timestamp_ms
    first_at = next(i for i, t in enumerate(btc) if t.timestamp_ms == at)
    assert history.page("BTCUSD", since_ms=at, limit=4) == btc[first_at:first_at + 4][::-1]
    assert history.page("BTCUSD", limit=3) == btc[-3:][::-1]  # no point: the most recent
    # since_tid trumps timestamp
    assert history.page("BTCUSD", since_tid=btc[0].tid, since_ms=END_MS, limit=1) == [btc[1]]
    assert history.page("BTCUSD", since_tid=btc[-1].tid) == []


def test_query_parameters_as_gemini_reads_them():
    assert trades_query({}) == (None, None, 50, False)
    assert trades_query({"limit_trades": "9999"})[2] == 500  # "at most 500 records"
    assert trades_query({"timestamp": "1749945600"})[1] == 1_749_945_600_000  # seconds
    assert trades_query({"since": "1749945600123"})[1] == 1_749_945_600_123  # alias, ms
    assert trades_query({"since_tid": "0", "include_breaks": "true"}) == (0, None, 50, True)
    assert trades_query({"include_breaks": "1"})[3]
    assert not trades_query({"include_breaks": "no"})[3]
    for query, reason in (({"timestamp": "soon"}, "InvalidTimestampInPayload"),
                          ({"limit_trades": "0"}, "InvalidQuantity"),
                          ({"limit_trades": "-5"}, "InvalidQuantity"),
                          ({"since_tid": "x"}, "InvalidQuantity")):
        with pytest.raises(HistoryError) as refused:
            trades_query(query)
        assert refused.value.reason == reason


def test_trade_json_is_gemini_shape():
    trade = HistoryTrade(5, 1_750_000_000_123, "34000.10", "0.5", "buy")
    assert trade_json(trade, False) == {"timestamp": 1_750_000_000, "timestampms":
                                        1_750_000_000_123, "tid": 5, "price": "34000.10",
                                        "amount": "0.5", "exchange": "gemini", "type": "buy"}
    assert trade_json(trade, True)["broken"] is False


def test_candles_are_computed_from_the_same_trades(history):
    btc = history.trades("BTCUSD")
    candles = history.candles("BTCUSD", "1hr")
    assert [c[0] for c in candles] == sorted((c[0] for c in candles), reverse=True)
    by_hour: dict[int, list[HistoryTrade]] = {}
    for trade in btc:
        by_hour.setdefault(trade.timestamp_ms // HOUR * HOUR, []).append(trade)
    assert len(candles) == len(by_hour)
    for start, o, h, low, c, v in candles:
        trades = by_hour[start]
        assert (o, c) == (trades[0].price, trades[-1].price)
        assert Decimal(h) == max(Decimal(t.price) for t in trades)
        assert Decimal(low) == min(Decimal(t.price) for t in trades)
        assert Decimal(v) == sum(Decimal(t.amount) for t in trades)
    assert sum(Decimal(c[5]) for c in history.candles("BTCUSD", "1day")) == \
        sum(Decimal(t.amount) for t in btc)
    parsed = json.loads(candles_text(candles), parse_float=Decimal)
    assert [[str(x) for x in row] for row in parsed] == [[str(x) for x in c] for c in candles]
    with pytest.raises(HistoryError, match="unknown time frame"):
        history.candles("BTCUSD", "1h")


def test_paging_forward_reads_every_trade_once_even_across_shared_milliseconds(history):
    """The client's paging against the venue's page rule, in memory: small pages whose
    boundaries fall inside runs of trades with one timestamp."""
    btc = history.trades("BTCUSD")
    assert any(a.timestamp_ms == b.timestamp_ms for a, b in zip(btc, btc[1:]))
    at = btc[500].timestamp_ms
    for since, expected in ((Since(), btc), (Since(tid=btc[99].tid), btc[100:]),
                            (Since(ms=at), [t for t in btc if t.timestamp_ms >= at])):
        cursor, got, pages = start_cursor(since, None, limit=7), [], 0
        while True:
            params = cursor.params()
            answer = history.page("BTCUSD", params.get("since_tid"), params.get("timestamp"),
                                  params["limit_trades"])
            page = read_page([trade_json(t, False) for t in answer], cursor)
            got += [t["tid"] for t in page.trades]
            cursor, pages = page.cursor, pages + 1
            if page.done:
                break
        assert got == [t.tid for t in expected]
        assert pages == len(expected) // 7 + 1
