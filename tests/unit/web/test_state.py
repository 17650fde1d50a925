"""The dashboard's views folded from records, and the subscribe protocol (pure)."""

from __future__ import annotations

import pytest

from pipeline.web.server import parse_subscription
from pipeline.web.state import Dashboard, Limits, depth_curve


def book(symbol: str, bid: str, ask: str, at_us: int) -> dict:
    return {"symbol": symbol, "bids": [{"price": bid, "quantity": "2"},
                                       {"price": "9", "quantity": "1.5"}],
            "asks": [{"price": ask, "quantity": "1"}], "published_ts_us": at_us}


def event(cid: str, kind: str, ms: int, **extra) -> dict:
    return {"client_order_id": cid, "strategy_id": "s", "symbol": "BTCUSD", "side": "buy",
            "kind": kind, "event_ms": ms, "price": "10", "amount": "1", "filled_amount": "0",
            "reason": None, "last_fill_amount": None, "last_fill_price": None, **extra}


def test_depth_is_cumulative_from_the_best_level():
    assert depth_curve([{"price": "10", "quantity": "2"}, {"price": "9", "quantity": "1.5"}]) \
        == {"price": [10.0, 9.0], "cumulative": [2.0, 3.5]}


def test_books_bars_and_trades_make_the_symbol_view_and_bump_its_version():
    d = Dashboard(["BTCUSD", "ETHUSD"], bar_interval="1s", limits=Limits(bars=2, trades=2))
    d.on_book(book("BTCUSD", "10", "11", 5_000_000))
    d.on_book(book("XRPUSD", "1", "2", 6_000_000))  # not in the topology: ignored
    for start in (1000, 2000, 3000):
        d.on_bar({"symbol": "BTCUSD", "interval": "1s", "start_ms": start, "end_ms": start + 1000,
                  "open": "1", "high": "2", "low": "0.5", "close": "1.5", "volume": "3"})
    d.on_bar({"symbol": "BTCUSD", "interval": "5s", "start_ms": 0, "end_ms": 5000,
              "open": "1", "high": "2", "low": "0.5", "close": "1.5", "volume": "3"})
    for i in range(3):
        d.on_trade({"symbol": "BTCUSD", "exchange_ts_ms": 4000 + i, "price": f"1{i}",
                    "quantity": "1", "taker_side": "BUY"})
    view = d.symbol_view("btcusd")
    assert view["top"]["bid"]["price"] == "10" and view["top"]["spread"] == "1"
    assert view["depth"]["bids"]["cumulative"] == [2.0, 3.5]
    assert view["candles"]["start_ms"] == [2000, 3000]  # the newest two, of 1s only
    assert view["trades"]["price"] == [11.0, 12.0]
    assert view["version"] == 1 + 3 + 3 and view["newest_ms"] == 5000
    assert d.symbol_view("ETHUSD")["top"] is None and d.versions["ETHUSD"] == 0


def test_orders_open_until_done_fills_and_rejections_are_kept_newest_first():
    d = Dashboard(["BTCUSD"])
    d.on_order_event(event("a", "ACCEPTED", 1))
    d.on_order_event(event("a", "BOOKED", 2))
    d.on_order_event(event("b", "ACCEPTED", 3))
    d.on_order_event(event("b", "REJECTED", 4, reason="risk:kill_switch"))
    d.on_order_event(event("a", "PARTIALLY_FILLED", 5, last_fill_amount="0.4",
                           last_fill_price="10", filled_amount="0.4"))
    assert [o["client_order_id"] for o in d.trading_view()["open_orders"]] == ["a"]
    d.on_order_event(event("a", "FILLED", 6, last_fill_amount="0.6", last_fill_price="10"))
    d.on_order_event(event("a", "CANCEL_REJECTED", 7, reason="order_closed"))
    view = d.trading_view()
    assert view["open_orders"] == []
    assert [f["last_fill_amount"] for f in view["fills"]] == ["0.6", "0.4"]
    assert [(r["client_order_id"], r["reason"]) for r in view["rejections"]] == \
        [("a", "order_closed"), ("b", "risk:kill_switch")]
    assert view["counts"] == {"ACCEPTED": 2, "BOOKED": 1, "CANCEL_REJECTED": 1, "FILLED": 1,
                              "PARTIALLY_FILLED": 1, "REJECTED": 1}


def test_pnl_records_make_the_equity_curve_and_positions_the_latest_per_symbol():
    d = Dashboard(["BTCUSD"])
    for ms, equity in ((1, "100"), (2, None), (3, "101.5")):
        d.on_pnl({"strategy_id": "s", "event_ms": ms, "equity": equity, "currency": "USD"})
    d.on_position({"strategy_id": "s", "symbol": "BTCUSD", "quantity": "1", "updated_ms": 2})
    d.on_position({"strategy_id": "s", "symbol": "BTCUSD", "quantity": "2", "updated_ms": 3})
    view = d.trading_view()
    assert view["strategies"]["s"]["equity"] == {"ms": [1, 3], "value": [100.0, 101.5]}
    assert [p["quantity"] for p in view["positions"]] == ["2"]


@pytest.mark.parametrize("text, error", [
    ("nope", "not JSON"), ("[]", "expected"), ('{"view": "x"}', "expected"),
    ('{"subscribe": "orders"}', "unknown view"), ('{"subscribe": 3}', "unknown view"),
    ('{"subscribe": "symbol", "symbol": "ETHUSD"}', "unknown symbol"),
    ('{"subscribe": "symbol", "symbol": ["BTCUSD"]}', "unknown symbol")])
def test_a_bad_subscription_says_what_is_wrong(text, error):
    with pytest.raises(ValueError, match=error):
        parse_subscription(text, Dashboard(["BTCUSD"]))


def test_a_good_subscription_names_the_view():
    d = Dashboard(["BTCUSD"])
    assert parse_subscription('{"subscribe": "trading"}', d) == ("trading", None)
    assert parse_subscription('{"subscribe": "symbol", "symbol": "btcusd"}', d) == \
        ("symbol", "BTCUSD")
