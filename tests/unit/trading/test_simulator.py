"""The simulated exchange on scripted books: pure logic, no broker."""

from __future__ import annotations

from decimal import Decimal

import pytest

from pipeline.core.vocabulary import OrderEventKind, OrderType, Side
from pipeline.market.orderbook import L2Book
from pipeline.trading.fees import FeeSchedule
from pipeline.trading.orders import Order, OrderStateError, OrderStatus
from pipeline.trading.simulator import SimulatedExchange, SimulatorConfig

D = Decimal
SYMBOL = "BTCUSD"
FEES = FeeSchedule(maker=D("0.001"), taker=D("0.004"))


class Market:
    """A book the test scripts, and the simulator watching it."""

    def __init__(self, queue: str = "risk-averse", latency_ms: int = 0,
                 cancel_latency_ms: int | None = None) -> None:
        self.book = L2Book(SYMBOL)
        self.book.apply_snapshot(
            [{"side": "BID", "price": p, "quantity": q} for p, q in
             (("100", "5"), ("99", "5"), ("98", "10"))] +
            [{"side": "ASK", "price": p, "quantity": q} for p, q in
             (("101", "2"), ("102", "3"), ("103", "10"))])
        self.sim = SimulatedExchange({SYMBOL: self.book}, SimulatorConfig(
            fees=FEES, queue=queue, latency_ms=latency_ms, cancel_latency_ms=cancel_latency_ms))
        self.now_us = 1_000_000_000
        self._ids = 0

    def tick(self, ms: int = 1) -> list[dict]:
        self.now_us += ms * 1000
        return self.sim.advance(self.now_us)

    def order(self, side: str, amount: str, price: str | None = None, options=(),
              strategy: str = "s1", expires_ms: int | None = None, cid: str | None = None) -> Order:
        self._ids += 1
        return Order(cid or f"o{self._ids}", strategy, SYMBOL, Side(side),
                     OrderType.LIMIT if price else OrderType.MARKET,
                     D(price) if price else None, D(amount), tuple(options),
                     created_ms=self.now_us // 1000, expires_ms=expires_ms)

    def submit(self, *args, **kw) -> tuple[Order, list[dict]]:
        order = self.order(*args, **kw)
        return order, self.sim.submit(order, self.now_us)

    def change(self, side: str, price: str, quantity: str) -> list[dict]:
        changes = [{"side": side, "price": price, "quantity": quantity}]
        self.book.apply(changes)
        return self.sim.on_book(SYMBOL, changes, self.now_us) or []

    def snapshot(self, bids, asks) -> list[dict]:
        self.book.apply_snapshot([{"side": "BID", "price": p, "quantity": q} for p, q in bids] +
                                 [{"side": "ASK", "price": p, "quantity": q} for p, q in asks])
        return self.sim.on_book(SYMBOL, None, self.now_us) or []

    def trade(self, taker: str, price: str, quantity: str, from_snapshot: bool = False
              ) -> list[dict]:
        return self.sim.on_trade({"symbol": SYMBOL, "price": price, "quantity": quantity,
                                  "taker_side": taker, "from_snapshot": from_snapshot},
                                 self.now_us) or []


def kinds(events: list[dict]) -> list[str]:
    return [e["kind"] for e in events]


def fills(events: list[dict]) -> list[tuple[str, str, str, str]]:
    return [(e["last_fill_price"], e["last_fill_amount"], e["liquidity"], e["last_fill_fee"])
            for e in events if e["kind"] in ("PARTIALLY_FILLED", "FILLED")]


# --------------------------------------------------------------------------- takers


def test_a_marketable_limit_takes_level_by_level_at_each_levels_price_and_books_the_rest():
    m = Market()
    order, events = m.submit("BUY", "6", "102")
    assert kinds(events) == ["ACCEPTED", "PARTIALLY_FILLED", "PARTIALLY_FILLED", "BOOKED"]
    assert fills(events) == [("101", "2", "TAKER", "0.808"), ("102", "3", "TAKER", "1.224")]
    assert events[-1]["filled_amount"] == "5" and order.status is OrderStatus.BOOKED
    assert m.sim.open_orders() == [order]


def test_a_taker_fills_completely_and_the_running_totals_are_exact():
    m = Market()
    order, events = m.submit("BUY", "3", "102")
    assert kinds(events) == ["ACCEPTED", "PARTIALLY_FILLED", "FILLED"]
    last = events[-1]
    assert (last["filled_amount"], last["avg_fill_price"], last["fee"]) == \
        ("3", str(D(101 * 2 + 102) / 3), "1.216")  # (202 + 102) x 0.004
    assert order.status is OrderStatus.FILLED and not m.sim.open_orders()


def test_liquidity_our_orders_took_is_not_taken_twice_until_the_feed_changes_the_level():
    m = Market()
    _, first = m.submit("BUY", "2", "101")
    assert fills(first) == [("101", "2", "TAKER", "0.808")]
    _, second = m.submit("BUY", "1", "101", options=["immediate-or-cancel"])
    assert kinds(second) == ["ACCEPTED", "CANCELLED"] and \
        second[-1]["reason"] == "ImmediateOrCancelWouldPost"
    m.change("ASK", "101", "1.5")  # the market's new state at that price: takeable again
    _, third = m.submit("BUY", "1", "101", options=["immediate-or-cancel"])
    assert fills(third) == [("101", "1", "TAKER", "0.404")]


def test_maker_or_cancel_cancels_when_it_would_take_and_rests_when_it_would_not():
    m = Market()
    _, crossing = m.submit("BUY", "1", "101", options=["maker-or-cancel"])
    assert kinds(crossing) == ["ACCEPTED", "CANCELLED"]
    assert crossing[-1]["reason"] == "MakerOrCancelWouldTake" and not fills(crossing)
    resting, passive = m.submit("BUY", "1", "100.5", options=["maker-or-cancel"])
    assert kinds(passive) == ["ACCEPTED", "BOOKED"] and resting.is_open


def test_immediate_or_cancel_fills_what_crosses_and_cancels_the_rest():
    m = Market()
    _, events = m.submit("BUY", "6", "102", options=["immediate-or-cancel"])
    assert kinds(events) == ["ACCEPTED", "PARTIALLY_FILLED", "PARTIALLY_FILLED", "CANCELLED"]
    assert events[-1]["filled_amount"] == "5" and not m.sim.open_orders()
    _, none = m.submit("SELL", "1", "101", options=["immediate-or-cancel"])  # best bid is 100
    assert kinds(none) == ["ACCEPTED", "CANCELLED"]


def test_fill_or_kill_fills_whole_or_not_at_all():
    m = Market()
    _, killed = m.submit("BUY", "6", "102", options=["fill-or-kill"])  # 5 within 102
    assert kinds(killed) == ["ACCEPTED", "CANCELLED"] and killed[-1]["reason"] == \
        "FillOrKillWouldNotFill" and killed[-1]["filled_amount"] == "0"
    _, filled = m.submit("BUY", "5", "102", options=["fill-or-kill"])
    assert kinds(filled) == ["ACCEPTED", "PARTIALLY_FILLED", "FILLED"]


def test_two_options_and_options_the_simulator_cannot_honour_are_rejected():
    m = Market()
    _, two = m.submit("BUY", "1", "100", options=["maker-or-cancel", "immediate-or-cancel"])
    assert kinds(two) == ["REJECTED"] and two[0]["reason"] == "rules:ConflictingOptions"
    _, auction = m.submit("BUY", "1", "100", options=["auction-only"])
    assert kinds(auction) == ["REJECTED"] and auction[0]["reason"] == "UnsupportedOption"


def test_a_market_order_walks_the_book_and_cancels_what_it_cannot_fill():
    m = Market()
    _, events = m.submit("SELL", "25")
    assert fills(events) == [("100", "5", "TAKER", "2"), ("99", "5", "TAKER", "1.98"),
                             ("98", "10", "TAKER", "3.92")]
    assert kinds(events)[-1] == "CANCELLED" and events[-1]["filled_amount"] == "20"


# --------------------------------------------------------------------------- resting, queue


def test_a_resting_buy_fills_only_after_the_size_ahead_of_it_has_traded():
    m = Market()
    order, booked = m.submit("BUY", "2", "100")  # joins behind the 5 shown at 100
    assert kinds(booked) == ["ACCEPTED", "BOOKED"]
    assert m.trade("SELL", "100", "3") == []  # 2 still ahead
    assert m.change("BID", "100", "2") == []  # the level shrinks to what is ahead: no move
    partial = m.trade("SELL", "100", "3")  # 2 ahead trade, 1 reaches us
    assert fills(partial) == [("100", "1", "MAKER", "0.1")]
    done = m.trade("SELL", "100", "4")
    assert fills(done) == [("100", "1", "MAKER", "0.1")] and kinds(done) == ["FILLED"]
    assert order.status is OrderStatus.FILLED


def test_level_decreases_come_off_the_front_only_as_far_as_the_level_is_now_smaller():
    m = Market()
    m.submit("BUY", "1", "100")  # 5 ahead
    m.change("BID", "100", "7")  # others join behind: still 5 ahead
    m.change("BID", "100", "6")  # could be from behind: still 5
    m.change("BID", "100", "2")  # must have come from ahead: 2 ahead
    assert m.trade("SELL", "100", "2") == []
    assert fills(m.trade("SELL", "100", "1")) == [("100", "1", "MAKER", "0.1")]


def test_without_a_queue_model_a_resting_order_fills_at_the_first_trade_at_its_price():
    m = Market(queue="none")
    m.submit("BUY", "2", "100")
    assert fills(m.trade("SELL", "100", "1")) == [("100", "1", "MAKER", "0.1")]


def test_a_trade_through_the_price_fills_for_at_most_the_trades_quantity():
    m = Market()
    m.submit("BUY", "3", "100.5")  # a new best bid: nothing ahead
    assert fills(m.trade("SELL", "100", "2")) == [("100.5", "2", "MAKER", "0.201")]
    assert m.trade("BUY", "100", "5") == []  # a buyer's trade does not touch our bid


def test_one_trade_fills_our_orders_best_price_first_and_no_more_than_its_quantity():
    m = Market(queue="none")
    m.submit("SELL", "2", "101.5", cid="a")
    m.submit("SELL", "2", "101.2", cid="b")
    events = m.trade("BUY", "101.5", "3")
    assert [(e["client_order_id"], e["last_fill_amount"]) for e in events] == \
        [("b", "2"), ("a", "1")]


def test_the_opposite_side_reaching_a_resting_order_fills_it_from_what_is_shown():
    m = Market()
    order, _ = m.submit("BUY", "3", "100")
    events = m.change("ASK", "99.5", "2")  # an ask at or below our bid: the queue is gone
    assert fills(events) == [("100", "2", "MAKER", "0.2")]
    assert m.change("BID", "98", "11") == []  # the 2 at 99.5 were taken: not again
    more = m.change("ASK", "99.5", "4")  # the level changed: 4 shown now
    assert fills(more) == [("100", "1", "MAKER", "0.1")] and order.status is OrderStatus.FILLED


def test_a_new_snapshot_keeps_queues_at_most_what_it_shows_and_fills_what_it_crosses():
    m = Market()
    bid, _ = m.submit("BUY", "1", "100")
    ask, _ = m.submit("SELL", "1", "104")
    events = m.snapshot([("100", "1"), ("99", "3")], [("103.5", "2")])  # asks moved below
    assert m.trade("SELL", "100", "1") == []  # 1 ahead now, not 5
    assert fills(m.trade("SELL", "100", "1")) == [("100", "1", "MAKER", "0.1")]
    assert events == [] and ask.is_open and bid.status is OrderStatus.FILLED
    crossed = m.snapshot([("105", "1")], [("106", "1")])
    assert fills(crossed) == [("104", "1", "MAKER", "0.104")]


def test_trades_from_a_snapshots_history_and_of_unknown_side_move_nothing():
    m = Market(queue="none")
    m.submit("BUY", "1", "100")
    assert m.trade("SELL", "100", "5", from_snapshot=True) == []
    assert m.trade("UNKNOWN", "100", "5") == []


# --------------------------------------------------------------------------- cancels


def test_a_cancel_before_the_fill_wins_and_a_late_one_is_cancel_rejected():
    m = Market(queue="none")
    order, _ = m.submit("BUY", "1", "100")
    cancelled = m.sim.cancel(SYMBOL, order.client_order_id, "s1", m.now_us, request_id="c1")
    assert kinds(cancelled) == ["CANCELLED"] and cancelled[0]["reason"] == "Requested"
    assert cancelled[0]["request_id"] == "c1" and m.trade("SELL", "100", "1") == []
    late = m.sim.cancel(SYMBOL, order.client_order_id, "s1", m.now_us, request_id="c2")
    assert kinds(late) == ["CANCEL_REJECTED"] and late[0]["reason"] == "order_closed"


def test_partial_fills_then_a_cancel_keeps_what_filled():
    m = Market(queue="none")
    order, _ = m.submit("SELL", "5", "101.5")
    assert fills(m.trade("BUY", "101.5", "2")) == [("101.5", "2", "MAKER", "0.203")]
    cancelled = m.sim.cancel(SYMBOL, order.client_order_id, "s1", m.now_us)
    assert kinds(cancelled) == ["CANCELLED"] and cancelled[0]["filled_amount"] == "2"


def test_a_cancel_of_an_unknown_or_another_strategys_order_changes_nothing():
    m = Market()
    order, _ = m.submit("BUY", "1", "100", strategy="s1")
    unknown = m.sim.cancel(SYMBOL, "nope", "s2", m.now_us)
    foreign = m.sim.cancel(SYMBOL, order.client_order_id, "s2", m.now_us)
    assert [(e["kind"], e["reason"], e["strategy_id"]) for e in unknown + foreign] == \
        [("CANCEL_REJECTED", "unknown_order", "s2"), ("CANCEL_REJECTED", "not_owner", "s2")]
    assert foreign[0]["price"] is None  # nothing of s1's order is told to s2
    assert order.is_open and m.sim.open_orders("s1") == [order]


def test_cancel_all_cancels_one_strategys_orders_in_a_symbol():
    m = Market()
    a, _ = m.submit("BUY", "1", "99", strategy="s1")
    b, _ = m.submit("SELL", "1", "104", strategy="s1")
    c, _ = m.submit("SELL", "1", "105", strategy="s2")
    events = m.sim.cancel_all(m.now_us, strategy_id="s1", symbol=SYMBOL, request_id="all")
    assert [(e["client_order_id"], e["kind"]) for e in events] == \
        [(a.client_order_id, "CANCELLED"), (b.client_order_id, "CANCELLED")]
    assert c.is_open


def test_replace_cancels_then_places_and_a_replace_of_a_filled_order_is_rejected():
    m = Market(queue="none")
    old, _ = m.submit("BUY", "1", "99")
    new = m.order("BUY", "2", "99.5", cid="r1")
    events = m.sim.replace(old.client_order_id, new, m.now_us)
    assert [(e["client_order_id"], e["kind"]) for e in events] == \
        [(old.client_order_id, "CANCELLED"), ("r1", "ACCEPTED"), ("r1", "BOOKED")]
    assert events[0]["request_id"] == "r1"
    m.trade("SELL", "99.5", "5")
    again = m.sim.replace("r1", m.order("BUY", "1", "99", cid="r2"), m.now_us)
    assert [(e["client_order_id"], e["kind"], e["reason"]) for e in again] == \
        [("r1", "CANCEL_REJECTED", "order_closed"), ("r2", "REJECTED", "replace:order_closed")]


# --------------------------------------------------------------------------- time


def test_latency_delays_orders_and_cancels():
    m = Market(queue="none", latency_ms=10, cancel_latency_ms=5)
    order, sent = m.submit("BUY", "1", "100")
    assert sent == [] and m.sim.open_orders() == [order]  # on its way
    assert m.trade("SELL", "100", "1") == []  # it is not at the exchange yet
    assert kinds(m.tick(9)) == []
    assert kinds(m.tick(1)) == ["ACCEPTED", "BOOKED"]
    assert m.sim.cancel(SYMBOL, order.client_order_id, "s1", m.now_us) == []
    assert fills(m.trade("SELL", "100", "0.5")) == [("100", "0.5", "MAKER", "0.05")]
    assert kinds(m.tick(4)) == []
    assert kinds(m.tick(1)) == ["CANCELLED"]


def test_a_resting_order_expires_at_its_expiry():
    m = Market()
    order, _ = m.submit("BUY", "1", "99", expires_ms=m.now_us // 1000 + 100)
    assert m.tick(99) == []
    expired = m.tick(1)
    assert kinds(expired) == ["EXPIRED"] and expired[0]["reason"] == "expired"
    assert expired[0]["event_ms"] == order.expires_ms and not order.is_open


def test_state_dumped_and_loaded_goes_on_exactly_as_before():
    def script(m: Market, restart: bool) -> list[dict]:
        events = []
        m.submit("BUY", "3", "100", cid="a")
        m.submit("SELL", "2", "101", options=["maker-or-cancel"], cid="b")  # cancelled
        m.submit("SELL", "2", "102", cid="c")  # behind 3
        events += m.trade("SELL", "100", "6")
        events += m.change("ASK", "101", "0")
        if restart:
            state = m.sim.dump(SYMBOL)
            m.sim = SimulatedExchange({SYMBOL: m.book}, m.sim.config)
            m.sim.load(SYMBOL, state)
        events += m.trade("BUY", "102", "4")
        events += m.trade("SELL", "100", "5")
        events += m.sim.cancel(SYMBOL, "c", "s1", m.now_us)
        return events

    assert script(Market(), True) == script(Market(), False)


def test_the_order_state_machine_refuses_impossible_steps():
    order = Order("x", "s", SYMBOL, Side.BUY, OrderType.LIMIT, D(1), D(1))
    with pytest.raises(OrderStateError):
        order.step(OrderEventKind.FILLED)  # NEW -> FILLED skips ACCEPTED
    order.step(OrderEventKind.ACCEPTED)
    order.step(OrderEventKind.CANCELLED)
    with pytest.raises(OrderStateError):
        order.step(OrderEventKind.BOOKED)
