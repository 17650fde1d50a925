"""Strategy plug-ins and the strategy group: signed, deterministic, exactly-once requests.

The tests that need Kafka: tests/integration/test_strategy.py."""

from __future__ import annotations

import json
import random
from decimal import Decimal

import pytest

from pipeline.core.errors import PipelineError
from pipeline.strategy import MidQuoter, OrderIntent, SmaCross, load_strategy
from pipeline.trading.requests import build_requests

HOUR = 3_600_000


def bar(close: str, i: int, symbol: str = "BTCUSD") -> dict:
    return {"symbol": symbol, "interval": "1h", "start_ms": 1_500_000_000_000 + i * HOUR,
            "end_ms": 1_500_000_000_000 + (i + 1) * HOUR, "open": close, "high": close,
            "low": close, "close": close, "volume": "1", "trade_count": None, "vwap": None,
            "buy_volume": None, "sell_volume": None, "filled": False, "source": "test"}


def random_walk(n: int, seed: int = 5) -> list[str]:
    rng, price, out = random.Random(seed), Decimal("100.00"), []
    for _ in range(n):
        price = max(Decimal("1.00"), price + Decimal(rng.randint(-150, 150)) / 100)
        out.append(str(price))
    return out


def reference_crossovers(closes: list[str], fast: int, slow: int) -> list[tuple[int, str]]:
    """(bar index, 'up'|'down') by backtesting.py's crossover rule, computed directly."""
    values = [Decimal(c) for c in closes]
    f = [sum(values[i - fast + 1:i + 1]) / fast if i >= fast - 1 else None
         for i in range(len(values))]
    s = [sum(values[i - slow + 1:i + 1]) / slow if i >= slow - 1 else None
         for i in range(len(values))]
    out = []
    for i in range(slow, len(values)):
        if f[i - 1] < s[i - 1] and f[i] > s[i]:
            out.append((i, "up"))
        elif f[i - 1] > s[i - 1] and f[i] < s[i]:
            out.append((i, "down"))
    return out


def test_sma_cross_trades_exactly_at_the_crossovers():
    closes = random_walk(600)
    strategy = SmaCross(fast=5, slow=12, amount="0.5")
    got = []
    for i, close in enumerate(closes):
        for intent in strategy.on_bar(bar(close, i)):
            got.append((i, intent.side, intent.amount, intent.order_type))
    expected, position = [], Decimal(0)
    for i, direction in reference_crossovers(closes, 5, 12):
        if position:
            expected.append((i, "SELL" if position > 0 else "BUY", str(abs(position)), "MARKET"))
        position = Decimal("0.5") if direction == "up" else Decimal("-0.5")
        expected.append((i, "BUY" if direction == "up" else "SELL", "0.5", "MARKET"))
    assert len(expected) > 10 and got == expected


def test_sma_cross_ignores_other_symbols_and_intervals_and_checks_its_windows():
    strategy = SmaCross(fast=2, slow=3)
    assert strategy.on_bar(bar("1", 0, "ETHUSD")) == []
    assert strategy.on_bar({**bar("1", 0), "interval": "1m"}) == []
    with pytest.raises(ValueError, match="fast < slow"):
        SmaCross(fast=5, slow=5)


def snapshot(bid: str, ask: str) -> dict:
    return {"symbol": "BTCUSD", "bids": [{"price": bid, "quantity": "1"}],
            "asks": [{"price": ask, "quantity": "1"}]}


def test_mid_quoter_keeps_one_quote_a_side_replaces_it_and_respects_inventory():
    quoter = MidQuoter(spread_bps=20, requote_bps=5, amount="0.01", max_inventory="0.01")
    view = quoter.tracker  # what the runner keeps: requests sent, events back

    def send(intents, trigger):
        requests, refused = build_requests(intents, strategy_id=quoter.strategy_id,
                                           tracker=view, trigger=trigger, now_ms=0,
                                           ttl_ms=30_000, lot=Decimal("0.01"),
                                           price_of=lambda symbol, side: None)
        assert not refused
        for request in requests:
            view.sent(request)
        return requests

    first = send(quoter.on_book(snapshot("99.99", "100.01")), "md.l2/0/1")  # mid 100.00
    assert [(r["action"], r["side"], r["price"], r["options"]) for r in first] == [
        ("NEW", "BUY", "99.9", ["maker-or-cancel"]), ("NEW", "SELL", "100.1", ["maker-or-cancel"])]
    assert quoter.on_book(snapshot("100.00", "100.02")) == []  # mid moved < 5 bps
    bid, ask = (r["client_order_id"] for r in first)
    # The mid moves: each quote is replaced (cancel, then new), never a second one added.
    moved = send(quoter.on_book(snapshot("100.99", "101.01")), "md.l2/0/2")  # mid 101.00
    assert [(r["action"], r["target_client_order_id"], r["price"]) for r in moved] == [
        ("REPLACE", bid, "100.89"), ("REPLACE", ask, "101.11")]
    assert [o.client_order_id for o in quoter.open_orders() if not o.cancel_requested] == \
        [r["client_order_id"] for r in moved]
    # The new bid fills: at the inventory limit, the bid is no longer quoted.
    new_bid = moved[0]["client_order_id"]
    for cid in (bid, ask):
        view.on_event({"client_order_id": cid, "strategy_id": quoter.strategy_id,
                       "symbol": "BTCUSD", "kind": "CANCELLED", "side": "buy",
                       "amount": "0.01", "filled_amount": "0", "price": "99.9"})
    view.on_event({"client_order_id": new_bid, "strategy_id": quoter.strategy_id,
                   "symbol": "BTCUSD", "kind": "FILLED", "side": "buy", "amount": "0.01",
                   "filled_amount": "0.01", "last_fill_amount": "0.01",
                   "last_fill_price": "100.89", "last_fill_fee": "0.002", "price": "100.89"})
    assert quoter.inventory == Decimal("0.01")
    intents = quoter.on_book(snapshot("102.00", "102.02"))
    assert [(type(i).__name__, getattr(i, "side", None) or i.client_order_id) for i in intents] \
        == [("ReplaceIntent", moved[1]["client_order_id"])], "no buying at the limit"
    # Its state is JSON: a fresh instance loaded from it requotes alike.
    saved = json.loads(json.dumps(quoter.save_state()))
    again = MidQuoter(spread_bps=20, requote_bps=5, amount="0.01", max_inventory="0.01")
    again.load_state(saved, again.state_version)
    assert again.on_book(snapshot("102.00", "102.02")) == []  # same mid as last quoted


@pytest.mark.parametrize("kwargs,match", [
    (dict(side="HOLD"), "side"), (dict(amount="0"), "amount"),
    (dict(order_type="LIMIT"), "needs a price"), (dict(price="1"), "needs a price"),
    (dict(options=("post-only",)), "unknown order option")])
def test_bad_intents_are_refused(kwargs, match):
    base = dict(symbol="BTCUSD", side="BUY", amount="1")
    with pytest.raises(ValueError, match=match):
        OrderIntent(**{**base, **kwargs})


@pytest.mark.parametrize("spec,params,match", [
    ("nope", {}, "module:Class"), ("pipeline.strategy:Nope", {}, "cannot load"),
    ("pipeline.strategy:OrderIntent", {}, "not a Strategy"),
    ("pipeline.strategy:SmaCross", {"speed": 3}, "does not take")])
def test_unknown_strategies_are_one_clear_error(spec, params, match):
    with pytest.raises(PipelineError, match=match):
        load_strategy(spec, params)


def test_the_view_drops_an_order_the_exchange_says_is_closed():
    """Regression: an order whose end never reached the strategy (lost in a restart) was
    open in its view for ever, so every requote was a replace of it, refused."""
    from pipeline.trading.tracker import OrderTracker

    view = OrderTracker("s", cash=None)
    view.sent({"client_order_id": "a", "strategy_id": "s", "symbol": "BTCUSD", "side": "BUY",
               "order_type": "LIMIT", "price": "100", "amount": "1", "action": "NEW"})
    base = {"client_order_id": "a", "strategy_id": "s", "symbol": "BTCUSD", "side": "buy",
            "price": "100", "amount": "1", "filled_amount": "0", "avg_fill_price": None,
            "last_fill_amount": None, "reason": None}
    view.on_event({**base, "kind": "BOOKED"})
    view.on_event({**base, "kind": "CANCEL_REJECTED", "reason": "gemini:RateLimited"})
    assert [o.client_order_id for o in view.open_orders()] == ["a"]  # not known closed
    view.on_event({**base, "kind": "CANCEL_REJECTED", "reason": "order_closed"})
    assert view.open_orders() == []


