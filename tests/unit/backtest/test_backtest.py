"""Backtests over Kafka topics: parity with backtesting.py, determinism, bad input,
sweeps, book-driven fills, the event-time merge.

The parity test loads the real hourly BTCUSD file into the bars topic and checks that
our next-open fill model reproduces backtesting.py's trade list and final equity exactly.
Floats: backtesting.py computes in binary floats, we in exact decimals. Sizes are whole
units and prices are the bars' own prices (the same decimal text parsed once by each
side), so those compare exactly; the final equity carries ~1,900 float additions of P&L
and commissions on backtesting.py's side, so it compares to a relative 1e-9 (the
difference seen is ~1e-13); the other statistics to 1e-6 relative.

The tests that need Kafka: tests/integration/test_backtest.py."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest

from pipeline.backtest.engine import BAR, L2, EventMerger, backtest_events, event_time_us
from pipeline.backtest.report import trades_csv
from pipeline.core.decimals import plain
from pipeline.strategy import FULL_EQUITY, OrderIntent, Strategy


def test_fraction_and_close_intents_are_sized_from_the_strategys_own_view_live_and_in_backtests():
    from pipeline.trading.requests import build_requests
    from pipeline.trading.tracker import OrderTracker

    view = OrderTracker("s", cash=Decimal("10000"))
    asks = {"BTCUSD": Decimal("100")}

    def requests(*intents):
        return build_requests(intents, strategy_id="s", tracker=view, trigger="bars/0/7",
                              now_ms=1000, ttl_ms=5000, lot=Decimal("0.01"),
                              price_of=lambda symbol, side: asks.get(symbol),
                              fee_rate=Decimal("0.004"))

    made, refused = requests(OrderIntent("BTCUSD", "BUY", fraction="0.5"),
                             OrderIntent.close("BTCUSD"))
    # 0.5 x 10000 / (100 x 1.004) = 49.80..: 49.80 in lots of 0.01, at the ask
    assert [(r["side"], r["amount"], r["order_type"]) for r in made] == [("BUY", "49.8", "MARKET")]
    assert [r.reason for r in refused] == ["no position to close"]
    view.on_event({"client_order_id": made[0]["client_order_id"], "strategy_id": "s",
                   "symbol": "BTCUSD", "kind": "FILLED", "side": "buy", "amount": "49.8",
                   "filled_amount": "49.8", "last_fill_amount": "49.8",
                   "last_fill_price": "100", "last_fill_fee": "19.92", "price": None})
    view.mark("BTCUSD", Decimal("110"))
    assert view.equity() == Decimal("10000") - Decimal("4980") - Decimal("19.92") + \
        Decimal("49.8") * 110
    made, refused = requests(OrderIntent.close("BTCUSD"))
    assert [(r["side"], r["amount"]) for r in made] == [("SELL", "49.8")] and not refused
    assert made[0]["expires_ms"] == 6000 and made[0]["trigger"] == "bars/0/7"
    _, refused = build_requests([OrderIntent("BTCUSD", "BUY", fraction="0.5")], strategy_id="s",
                                tracker=OrderTracker("s"), trigger="t", now_ms=0, ttl_ms=1,
                                lot=Decimal(1), price_of=lambda *a: Decimal(1))
    assert [r.reason for r in refused] == ["no equity or price yet to size a fraction of equity"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(side="BUY"), "exactly one of amount and fraction"),
    (dict(side="BUY", amount="1", fraction="0.5"), "exactly one of amount and fraction"),
    (dict(side="BUY", fraction="1.5"), r"fraction must be in \(0, 1\]"),
    (dict(side="BUY", fraction="0"), r"fraction must be in \(0, 1\]"),
    (dict(side="BUY", close_position=True), "no side, amount or fraction"),
    (dict(side=None, close_position=True, order_type="LIMIT", price="1"), "plain MARKET")])
def test_intents_size_by_exactly_one_of_amount_fraction_close(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OrderIntent("BTCUSD", **kwargs)


def l2(offset: int, changes: list[tuple[str, str, str]], snapshot: bool = False,
       symbol: str = "BTCUSD") -> tuple:
    record = {"symbol": symbol, "snapshot": snapshot,
              "changes": [{"side": s, "price": p, "quantity": q} for s, p, q in changes],
              "exchange_ts_ms": None, "received_ts_us": 1_700_000_000_000_000 + offset * 1000,
              "connection_id": "c", "sequence": offset, "event_id": None}
    return (event_time_us(L2, record), "sim.md.l2", 0, offset, L2, record)


BOOK = [("BID", "100", "1"), ("BID", "99", "2"), ("ASK", "101", "1"), ("ASK", "102", "2"),
        ("ASK", "103", "5")]


def scripted(script, events, **options):
    from tests.support.backtest_strategies import Scripted

    strategy = Scripted(script)
    result = backtest_events(strategy, events, fill="book", commission="0.001", **options)
    return strategy, result


def test_a_buy_limit_takes_the_ask_levels_up_to_its_limit():
    strategy, result = scripted(
        {0: [dict(side="BUY", amount="2.5", order_type="LIMIT", price="102")]},
        [l2(0, BOOK, snapshot=True)], finalize_trades=False)
    assert [(e["kind"], e["last_fill_price"], e["last_fill_amount"], e["liquidity"])
            for e in strategy.events] == [("ACCEPTED", None, None, None),
                                          ("PARTIALLY_FILLED", "101", "1", "TAKER"),
                                          ("FILLED", "102", "1.5", "TAKER")]
    event = strategy.events[-1]
    assert event["filled_amount"] == "2.5"
    assert Decimal(event["avg_fill_price"]) == \
        (Decimal("101") + Decimal("102") * Decimal("1.5")) / Decimal("2.5")
    lots = result.open_lots
    assert [(lot.size, lot.entry_price) for lot in lots] == [(Decimal(1), Decimal(101)),
                                                             (Decimal("1.5"), Decimal(102))]
    fee = (Decimal(101) + Decimal(153)) * Decimal("0.001")
    assert result.final_cash == Decimal(1_000_000) - fee
    assert Decimal(event["fee"]) == fee


def test_resting_orders_fill_when_the_book_reaches_them_and_options_are_honoured():
    script = {0: [dict(side="BUY", amount="1", order_type="LIMIT", price="101",
                       options=("maker-or-cancel",)),   # would take: cancelled
                  dict(side="BUY", amount="1", order_type="LIMIT", price="100.5",
                       options=("maker-or-cancel",)),   # rests
                  dict(side="BUY", amount="10", order_type="LIMIT", price="103",
                       options=("immediate-or-cancel",)),  # takes 8, rest cancelled
                  dict(side="SELL", amount="5", order_type="LIMIT", price="99",
                       options=("fill-or-kill",)),   # only 3 at or above 99: killed
                  dict(side="SELL", amount="1.5")]}  # market: 1 @ 100, 0.5 @ 99
    events = [l2(0, BOOK, snapshot=True),
              l2(1, [("ASK", "100.5", "0.3")]),  # reaches the resting bid: 0.3 fills
              l2(2, [("ASK", "100.5", "0"), ("ASK", "100.4", "5")])]  # the other 0.7
    strategy, result = scripted(script, events, finalize_trades=False)
    seen = [(e["kind"], e["side"], e["filled_amount"], e["avg_fill_price"], e["reason"])
            for e in strategy.events]
    ioc = [plain(Decimal(101) / 1), plain(Decimal(101 + 204) / 3),
           plain(Decimal(101 + 204 + 515) / 8)]
    assert seen == [
        ("ACCEPTED", "buy", "0", None, None),
        ("CANCELLED", "buy", "0", None, "MakerOrCancelWouldTake"),
        ("ACCEPTED", "buy", "0", None, None),
        ("BOOKED", "buy", "0", None, None),
        ("ACCEPTED", "buy", "0", None, None),
        ("PARTIALLY_FILLED", "buy", "1", ioc[0], None),
        ("PARTIALLY_FILLED", "buy", "3", ioc[1], None),
        ("PARTIALLY_FILLED", "buy", "8", ioc[2], None),
        ("CANCELLED", "buy", "8", ioc[2], "ImmediateOrCancelWouldPost"),
        ("ACCEPTED", "sell", "0", None, None),
        ("CANCELLED", "sell", "0", None, "FillOrKillWouldNotFill"),
        ("ACCEPTED", "sell", "0", None, None),
        ("PARTIALLY_FILLED", "sell", "1", "100", None),
        ("FILLED", "sell", "1.5", plain((Decimal(100) + Decimal("49.5")) / Decimal("1.5")), None),
        # The resting bid is a maker: the market came to it, at its own price.
        ("PARTIALLY_FILLED", "buy", "0.3", "100.5", None),
        ("FILLED", "buy", "1", "100.5", None),
    ]
    assert [e["liquidity"] for e in strategy.events[-2:]] == ["MAKER", "MAKER"]
    assert sum(lot.size for lot in result.open_lots) == Decimal("8") - Decimal("1.5") + 1
    assert result.orders.filled == 2 and result.orders.cancelled == 3


def test_book_fills_are_settled_at_the_end_and_sampled_equity_is_marked_at_the_mid():
    strategy, result = scripted({0: [dict(side="BUY", amount="1")]},
                                [l2(0, BOOK, snapshot=True), l2(5000, [("BID", "100.2", "1")])],
                                sample_ms=1000)
    (trade,) = result.trades
    assert (trade.entry_price, trade.exit_price, trade.size) == (101, Decimal("100.2"), 1)
    assert result.open_lots == [] and len(result.equity) == 2
    assert result.equity[0] == Decimal(1_000_000) - Decimal("0.101") - Decimal("0.5")  # mid 100.5


def test_the_merge_is_by_event_time_then_topic_partition_offset_whatever_the_batching():
    rng = random.Random(7)
    sources = [("a.bars", 0), ("a.bars", 1), ("a.md.trades", 0)]
    per_source = {}
    for topic, partition in sources:
        t, records = 0, []
        for offset in range(300):
            t += rng.choice([0, 0, 1000, 5000])  # many equal times: ties
            if rng.random() < 0.05:
                t -= 20_000  # late data: keeps its place in its partition
            kind = BAR if "bars" in topic else "trade"
            record = {"end_ms": t} if kind == BAR else {"received_ts_us": t * 1000}
            records.append((offset, kind, record))
        per_source[(topic, partition)] = records

    def merged(seed: int) -> list[tuple]:
        chooser = random.Random(seed)
        merger = EventMerger(sources)
        cursors = dict.fromkeys(sources, 0)
        out = []
        while not merger.done:
            source = chooser.choice(sources)
            records = per_source[source]
            n = chooser.randint(0, 40)
            for offset, kind, record in records[cursors[source]:cursors[source] + n]:
                merger.add(source[0], source[1], offset, kind, record)
            cursors[source] = min(len(records), cursors[source] + n)
            if cursors[source] == len(records):
                merger.finish(*source)
            out += [e[:4] for e in merger.ready()]
        return out

    first = merged(1)
    assert len(first) == 900
    assert all(merged(seed) == first for seed in range(2, 6))
    assert first == sorted(first)
    for source in sources:  # each partition in offset order
        offsets = [e[3] for e in first if e[1:3] == source]
        assert offsets == sorted(offsets) == list(range(300))


def test_bars_become_known_at_their_end_and_everything_else_when_received():
    bar = {"start_ms": 0, "end_ms": 3_600_000}
    assert event_time_us(BAR, bar) == 3_600_000_000
    # A trade's exchange time is another clock (a venue replaying a 2021 capture now).
    assert event_time_us("trade", {"exchange_ts_ms": 5, "received_ts_us": 11}) == 11
    assert event_time_us(L2, {"received_ts_us": 7}) == 7
    assert event_time_us("book", {"received_ts_us": 9}) == 9


def test_out_dir_is_all_or_nothing(tmp_path):
    from pipeline.backtest.report import OutputDir

    target = tmp_path / "deep" / "out"
    output = OutputDir(target)
    (output.path / "a.txt").write_text("x")
    assert not target.exists()
    output.commit()
    assert (target / "a.txt").read_text() == "x"
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["out"]
    assert trades_csv([]).splitlines()[0].startswith("symbol,size,entry_bar")


def bars_of(closes: list[str], symbol: str = "BTCUSD") -> list[tuple]:
    out = []
    for i, close in enumerate(closes):
        bar = {"symbol": symbol, "interval": "1h", "start_ms": i * 3_600_000,
               "end_ms": (i + 1) * 3_600_000, "open": close, "high": close, "low": close,
               "close": close, "volume": "1", "trade_count": None, "vwap": None,
               "buy_volume": None, "sell_volume": None, "filled": False, "source": "test"}
        out.append((event_time_us(BAR, bar), "sim.bars", 0, i, BAR, bar))
    return out


class Once(Strategy):  # one intent on its first bar
    strategy_id = "once"

    def __init__(self, **intent) -> None:
        self.intent, self.done = intent, False

    def on_bar(self, bar):
        if self.done:
            return []
        self.done = True
        return [OrderIntent(bar["symbol"], **self.intent)]


def test_fractions_fill_at_the_next_open_in_whole_lots():
    result = backtest_events(Once(side="BUY", fraction="0.5"), bars_of(["100", "103", "104"]),
                             cash="10000", commission="0.01", lot="0.1", finalize_trades=False)
    (lot,) = result.open_lots
    # 0.5 * 10000 / (103 * 1.01) = 48.06...: 48.0 in lots of 0.1, bought at the next open
    assert (lot.size, lot.entry_price, lot.entry_bar) == (Decimal("48.0"), Decimal(103), 1)
    assert result.final_cash == Decimal(10000) - Decimal("48.0") * 103 * Decimal("0.01")
    assert result.final_equity == result.final_cash + Decimal("48.0") * (104 - 103)


def test_a_short_that_runs_out_of_money_stops_the_run_like_backtesting_py():
    result = backtest_events(Once(side="SELL", fraction=FULL_EQUITY),
                             bars_of(["100", "100", "150", "300", "400"]), cash="10000")
    assert result.stopped and result.stopped.startswith("out of money")
    assert result.final_equity == 0 and result.open_lots == []
    assert result.events == 4, "the run ends on the bar equity went negative"
    (trade,) = result.trades
    assert (trade.size, trade.exit_price) == (-99, Decimal(300))


def test_book_snapshot_records_and_trades_replay_too():
    from tests.support.backtest_strategies import Scripted

    snapshot = {"symbol": "ETHUSD", "depth": 2,
                "bids": [{"price": "10", "quantity": "1"}],
                "asks": [{"price": "11", "quantity": "2"}, {"price": "12", "quantity": "5"}],
                "exchange_ts_ms": None, "received_ts_us": 5_000_000, "published_ts_us": 0,
                "source_partition": 0, "source_offset": 0, "connection_id": "c", "sequence": 1}
    trade = {"symbol": "ETHUSD", "trade_id": 1, "price": "11.5", "quantity": "1",
             "taker_side": "BUY", "exchange_ts_ms": 6000, "received_ts_us": 6_000_000,
             "connection_id": "c", "sequence": 2, "from_snapshot": False}
    strategy = Scripted({0: [dict(side="BUY", amount="3", order_type="LIMIT", price="12")]})
    result = backtest_events(strategy, [(5_000_000, "s.book.snapshots", 0, 0, "book", snapshot),
                                        (6_000_000, "s.md.trades", 0, 0, "trade", trade)],
                             fill="book", finalize_trades=False)
    assert strategy.snapshots == [snapshot]
    assert [(e["kind"], e["filled_amount"]) for e in strategy.events] == \
        [("ACCEPTED", "0"), ("PARTIALLY_FILLED", "2"), ("FILLED", "3")]
    assert result.by_kind == {"bar": 0, "book": 1, "trade": 1, "l2": 0}
    assert sum(lot.size for lot in result.open_lots) == 3


