"""The live portfolio's pure logic: fills, marks, staleness, risk stops, bad input, state."""

from __future__ import annotations

from decimal import Decimal as D

import pytest

from pipeline.core.errors import PipelineError
from pipeline.trading.portfolio import BadFill, Portfolio, PortfolioConfig, RiskStop

T0 = 1_700_000_000_000


def fill(cid: str, side: str, amount: str, price: str, fee: str, ms: int, *,
         total: str | None = None, kind: str = "FILLED", strategy: str = "s1",
         symbol: str = "BTCUSD") -> dict:
    return {"client_order_id": cid, "strategy_id": strategy, "symbol": symbol, "kind": kind,
            "reason": None, "mode": "PAPER", "exchange_order_id": None, "side": side,
            "price": price, "amount": total or amount, "filled_amount": total or amount,
            "avg_fill_price": price, "fee": fee, "fee_currency": "USD", "event_ms": ms,
            "last_fill_price": price, "last_fill_amount": amount, "liquidity": "MAKER",
            "last_fill_fee": fee, "request_id": None}


def book(symbol: str, bid: str, ask: str, ms: int) -> dict:
    return {"symbol": symbol, "bids": [{"price": bid, "quantity": "1"}],
            "asks": [{"price": ask, "quantity": "1"}], "received_ts_us": ms * 1000}


def portfolio(**options) -> Portfolio:
    options.setdefault("default_capital", D(1000))
    options.setdefault("symbols", frozenset({"BTCUSD", "ETHUSD"}))
    return Portfolio(PortfolioConfig(**options))


def records(out, kind):
    return [r for k, r in out if k == kind]


def test_fills_give_positions_and_pnl_marked_at_the_mid():
    p = portfolio()
    p.on_book(book("BTCUSD", "99", "101", T0))
    out = p.on_event(fill("a", "buy", "2", "100", "0.4", T0), T0)
    position, = records(out, "position")
    assert (position["quantity"], position["average_entry"], position["mark"],
            position["unrealized_pnl"], position["realized_pnl"]) == \
        ("2", "100", "100", "0", "-0.4")
    pnl, = records(out, "pnl")
    assert (pnl["equity"], pnl["realized_pnl"], pnl["fees"], pnl["seq"], pnl["stale"]) == \
        ("999.6", "-0.4", "0.4", 1, False)
    p.on_book(book("BTCUSD", "109", "111", T0 + 1000))
    out = p.on_event(fill("b", "sell", "1", "110", "0.22", T0 + 1000), T0 + 1000)
    pnl, = records(out, "pnl")
    # realized: -0.4 + 10 - 0.22; unrealized: 1 x (110 - 100)
    assert (pnl["realized_pnl"], pnl["unrealized_pnl"], pnl["equity"]) == \
        ("9.38", "10", "1019.38")
    assert p.on_event(fill("b", "sell", "1", "110", "0.22", T0 + 1000), T0 + 1000) == []  # seen


def test_a_stale_mark_makes_the_figures_null_not_old():
    p = portfolio(max_mark_age_ms=5_000)
    p.on_book(book("BTCUSD", "99", "101", T0))
    p.on_event(fill("a", "buy", "1", "100", "0", T0), T0)
    pnl, = records(p.tick(T0 + 6_000), "pnl")
    assert pnl["stale"] and pnl["stale_symbols"] == ["BTCUSD"]
    assert pnl["equity"] is None and pnl["unrealized_pnl"] is None
    assert pnl["realized_pnl"] == "0"  # needs no mark
    position, = records(p.tick(T0 + 20_000), "position")
    assert position["mark"] is None and position["unrealized_pnl"] is None


def test_crossing_max_drawdown_halts_once_and_a_resume_measures_afresh():
    p = portfolio(limits={"s1": RiskStop.parse({"max_drawdown": "5"})})
    p.on_book(book("BTCUSD", "100", "100", T0))
    p.on_event(fill("a", "buy", "1", "100", "0", T0), T0)
    p.on_book(book("BTCUSD", "110", "110", T0 + 1))
    assert records(p.tick(T0 + 1), "control") == []  # peak 1010
    p.on_book(book("BTCUSD", "104", "104", T0 + 2))
    out = p.tick(T0 + 20_000)
    control, = records(out, "control")
    assert control["halted"] and control["reason"] == "max_drawdown"
    assert control["detail"] == "drawdown 6 USD > limit 5"
    assert records(out, "pnl")[0]["halted"] is True
    p.on_book(book("BTCUSD", "90", "90", T0 + 30_000))
    assert records(p.tick(T0 + 40_000), "control") == []  # halted already: no second halt
    resumed = p.on_control({"strategy_id": "s1", "halted": False, "reason": "operator",
                            "detail": "", "at_ms": T0 + 41_000, "by": "operator"}, T0 + 41_000)
    pnl, = records(resumed, "pnl")
    assert pnl["halted"] is False and pnl["peak_equity"] == "990" and pnl["drawdown"] == "0"


def test_daily_loss_and_percent_drawdown_limits():
    stop = RiskStop.parse({"max_drawdown": "50%", "max_daily_loss": "20"})
    assert stop == RiskStop(max_drawdown_pct=D("0.5"), max_daily_loss=D(20))
    with pytest.raises(PipelineError):
        RiskStop.parse({"max_loss": "1"})
    with pytest.raises(PipelineError):
        RiskStop.parse({"max_daily_loss": "-3"})
    p = portfolio(limits={"*": stop})
    p.on_book(book("ETHUSD", "10", "10", T0))
    p.on_event(fill("a", "buy", "10", "10", "0", T0, symbol="ETHUSD"), T0)
    p.on_book(book("ETHUSD", "7.9", "7.9", T0 + 1))
    control, = records(p.tick(T0 + 1), "control")
    assert control["reason"] == "max_daily_loss" and control["detail"] == \
        "daily loss 21 USD > limit 20"


def test_bad_fills_raise_and_change_nothing():
    p = portfolio()
    p.on_event(fill("a", "buy", "1", "100", "0.1", T0), T0)
    before = p.dump()
    with pytest.raises(BadFill, match="unknown symbol 'DOGEUSD'"):
        p.on_event(fill("b", "buy", "1", "1", "0", T0, symbol="DOGEUSD"), T0)
    with pytest.raises(BadFill, match="must be (positive|zero or more), not .-1."):
        p.on_event(fill("c", "buy", "-1", "100", "0", T0), T0)
    with pytest.raises(BadFill, match="not a decimal"):
        p.on_event(fill("d", "buy", "1", "1e", "0", T0), T0)
    assert p.dump() == before


def test_rejections_are_counted_by_reason_and_open_orders_followed():
    p = portfolio()
    rejected = dict(fill("r", "buy", "1", "100", "0", T0), kind="REJECTED",
                    reason="risk:max_notional", last_fill_amount=None, filled_amount="0")
    p.on_event(rejected, T0)
    booked = dict(fill("o", "buy", "2", "100", "0", T0), kind="BOOKED",
                  last_fill_amount=None, filled_amount="0")
    p.on_event(booked, T0)
    assert set(p.open_orders) == {"o"}
    p.on_event(fill("o", "buy", "1", "100", "0", T0 + 1, total="2", kind="PARTIALLY_FILLED")
               | {"filled_amount": "1"}, T0 + 1)
    assert p.open_orders["o"]["filled_amount"] == "1"
    pnl, = records(p.on_event(fill("o", "buy", "1", "100", "0", T0 + 2, total="2"), T0 + 2),
                   "pnl")
    assert pnl["rejections"] == {"risk:max_notional": 1} and pnl["fills"] == 2
    assert p.open_orders == {}
    assert p.holdings() == {"USD": D(-200), "BTC": D(2)}


def test_state_round_trip_continues_identically():
    def run(p: Portfolio, events):
        return [p.on_event(e, e["event_ms"]) for e in events]
    events = [fill("a", "buy", "1", "100", "0.1", T0), fill("b", "sell", "2", "101", "0.2", T0 + 1),
              fill("c", "buy", "1", "99", "0.1", T0 + 2)]
    one = portfolio()
    one.on_book(book("BTCUSD", "100", "102", T0))
    run(one, events[:1])
    two = portfolio()
    two.load(one.dump())
    assert run(one, events[1:]) == run(two, events[1:])
    assert one.dump() == two.dump()


def test_reconciliation_order_mismatch_grace_and_baseline():
    from pipeline.trading.reconciliation import ExchangeView, reconcile

    p = portfolio()
    booked = dict(fill("o1", "buy", "2", "100", "0", T0), kind="BOOKED", mode="LIVE",
                  exchange_order_id="77", last_fill_amount=None, filled_amount="0")
    p.on_event(booked, T0)
    order = {"order_id": "77", "client_order_id": "o1", "symbol": "btcusd", "side": "buy",
             "price": "100", "remaining_amount": "1.5", "timestampms": T0}
    young = {"order_id": "78", "client_order_id": None, "symbol": "btcusd", "side": "sell",
             "price": "120", "remaining_amount": "1", "timestampms": T0 + 9_000}
    balances = [{"currency": "USD", "amount": "500"}, {"currency": "BTC", "amount": "1"}]
    events, baseline = reconcile(p, ExchangeView(balances, [order, young], []), None, "LIVE",
                                 T0 + 10_000, grace_ms=5_000)
    assert [(e["kind"], e["subject"], e["expected"], e["actual"]) for e in events[:-1]] == \
        [("ORDER_MISMATCH", "o1", "2", "1.5")]  # the young unknown order waits a check
    assert events[-1]["kind"] == "CHECKED" and events[-1]["differences"] == 1
    assert "baseline taken" in events[-1]["detail"]
    assert baseline == {"BTC": D(1), "USD": D(500)}
    events, _ = reconcile(p, ExchangeView([{"currency": "USD", "amount": "499"},
                                           {"currency": "BTC", "amount": "1"}], [order], []),
                          baseline, "LIVE", T0 + 20_000, grace_ms=5_000)
    assert [(e["kind"], e["subject"], e["expected"], e["actual"]) for e in events[:-1]] == [
        ("ORDER_MISMATCH", "o1", "2", "1.5"), ("BALANCE", "USD", "500", "499")]



def test_reconciliation_of_an_unknown_order_whose_trades_add_up_to_nothing():
    """Gemini trades of an order the pipeline never had, summing to zero (or unreadable
    amounts): nothing to compare, no crash (reconcile raised TypeError on None)."""
    from pipeline.trading.reconciliation import ExchangeView, reconcile

    p = portfolio()
    trades = [{"order_id": "91", "client_order_id": None, "symbol": "btcusd", "amount": "0",
               "fee_amount": "0", "timestampms": T0},
              {"order_id": "92", "client_order_id": "zz", "symbol": "btcusd",
               "amount": "oops", "fee_amount": "0", "timestampms": T0}]
    balances = [{"currency": "USD", "amount": "500"}]
    events, _ = reconcile(p, ExchangeView(balances, [], trades), None, "LIVE", T0 + 60_000,
                          grace_ms=5_000)
    assert [e["kind"] for e in events] == ["CHECKED"] and events[-1]["differences"] == 0

def test_every_portfolio_metric_is_in_the_exposition():
    from pipeline.ops.portfolio_view import PortfolioView
    from pipeline.ops.status import Snapshot, prometheus

    p = portfolio()
    p.on_book(book("BTCUSD", "99", "101", T0))
    out = p.on_event(fill("a", "buy", "2", "100", "0.4", T0), T0)
    view = PortfolioView(positions=records(out, "position"), pnl={"s1": records(out, "pnl")[0]},
                         reconciliation={"differences": 2, "detail": "x"})
    text = prometheus(Snapshot(0.0, [], {}, {}, None, {"mode": "paper", "kill_switch": False},
                               portfolio=view), "sim")
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
               if line and not line.startswith("#")}
    for name in ("pipeline_strategy_equity", "pipeline_strategy_realized_pnl",
                 "pipeline_strategy_unrealized_pnl", "pipeline_strategy_fees",
                 "pipeline_strategy_drawdown", "pipeline_strategy_halted",
                 "pipeline_strategy_position", "pipeline_strategy_fills_total",
                 "pipeline_reconciliation_differences"):
        assert name in samples, name
    assert 'pipeline_strategy_equity{strategy="s1",currency="USD"} 999.6' in text
    assert 'pipeline_strategy_position{strategy="s1",symbol="BTCUSD"} 2' in text
