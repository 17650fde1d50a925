"""A strategy's view of its own orders, positions and equity, folded from the requests it
sends and the order events that come back. The backtest engine and the live ``strategy``
group both keep one and show it to the strategy, so ``open_orders()``, ``position()`` and
``equity()`` mean the same in a backtest and live.

Orders are open from the moment they are sent (status NEW, before any answer), so a
strategy never sends a second quote while the first is on its way. Fills go into a
:class:`~pipeline.trading.accounting.Ledger`, the one the backtest's reports and the live
``portfolio`` group keep: positions (FIFO lots), cash, fees, realized PnL; equity is that
ledger at the latest marks (the mid of the last book snapshot, a bar's close or a trade's
price the strategy saw), in the currency of the strategy's capital.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any, Mapping

from pipeline.core.decimals import ZERO, plain
from pipeline.core.vocabulary import (
    FILL_KINDS,
    TERMINAL_KINDS,
    OrderAction,
    OrderEventKind,
    OrderType,
)
from pipeline.trading.accounting import Ledger, new_fill
from pipeline.trading.orders import ORDER_CLOSED, OrderStatus

K = OrderEventKind
_CANCEL_REJECTED, _ACCEPTED = K.CANCEL_REJECTED.value, K.ACCEPTED.value
_NEW = OrderStatus.NEW.value


@dataclass
class OpenOrder:
    """One of the strategy's orders that is not closed yet."""

    client_order_id: str
    symbol: str
    side: str  # BUY | SELL
    order_type: str  # LIMIT | MARKET
    price: str | None
    amount: str
    options: tuple[str, ...] = ()
    filled: str = "0"
    status: str = _NEW  # NEW (sent), ACCEPTED, BOOKED, PARTIALLY_FILLED
    cancel_requested: bool = False  # a cancel or replace of it was sent
    expires_ms: int | None = None

    @property
    def remaining(self) -> Decimal:
        return Decimal(self.amount) - Decimal(self.filled)


@dataclass
class OrderTracker:
    """See the module doc. ``cash`` None: no capital given, so no equity."""

    def __post_init__(self) -> None:
        if self.cash is not None and not self.ledger.fills:
            self.ledger = Ledger(self.cash, keep_trades=False)

    @property
    def positions(self) -> dict[str, Decimal]:
        return {s: p for s, p in self.ledger.position.items() if p}

    @property
    def fills(self) -> int:
        return self.ledger.fills

    strategy_id: str
    cash: Decimal | None = None  # the capital: None, no equity
    orders: dict[str, OpenOrder] = field(default_factory=dict)
    marks: dict[str, Decimal] = field(default_factory=dict)
    ledger: Ledger = field(default_factory=lambda: Ledger(keep_trades=False))
    _filled: dict[str, Decimal] = field(default_factory=dict)  # per open order, for old events
    _books: dict[str, Mapping[str, Any] | str] = field(default_factory=dict)  # marks unread

    # -- in

    def sent(self, request: Mapping[str, Any]) -> None:
        """A request the strategy sent (an ``OrderRequest``, signed or not)."""
        action = request.get("action") or OrderAction.NEW.value
        target = request.get("target_client_order_id")
        if (action in (OrderAction.CANCEL.value, OrderAction.REPLACE.value)
                and target in self.orders):
            self.orders[target].cancel_requested = True
        if action == OrderAction.CANCEL_ALL.value:
            for order in self.orders.values():
                if order.symbol == request["symbol"]:
                    order.cancel_requested = True
        if action in (OrderAction.NEW.value, OrderAction.REPLACE.value):
            cid = request["client_order_id"]
            self.orders[cid] = OpenOrder(cid, request["symbol"], request["side"],
                                         request["order_type"], request.get("price"),
                                         request["amount"], tuple(request.get("options") or ()),
                                         expires_ms=request.get("expires_ms"))

    def on_event(self, event: Mapping[str, Any]) -> bool:
        """An ``OrderEvent``; False (and nothing changes) when it is not this strategy's."""
        if event["strategy_id"] != self.strategy_id:
            return False
        cid, kind = event["client_order_id"], event["kind"]
        order = self.orders.get(cid)
        if kind == _CANCEL_REJECTED:
            if order is not None and event.get("reason") == ORDER_CLOSED:
                # the exchange says it is closed: its end came (or was lost); never
                # hold it open for ever
                self.orders.pop(cid, None)
            elif order is not None:
                order.cancel_requested = False
            return True
        if order is None and kind not in TERMINAL_KINDS:  # sent before this view began
            order = self.orders[cid] = OpenOrder(
                cid, event["symbol"], event["side"].upper(),
                OrderType.LIMIT if event.get("price") is not None else OrderType.MARKET,
                event.get("price"),
                event["amount"])
        fill = kind in FILL_KINDS
        if fill:
            self._fill(cid, event)
        if order is not None:
            order.filled = event["filled_amount"]
            if not fill:
                order.status = kind
            elif order.status == _NEW:
                order.status = _ACCEPTED
        if kind in TERMINAL_KINDS:
            self.orders.pop(cid, None)
            self._filled.pop(cid, None)
        return True

    def _fill(self, cid: str, event: Mapping[str, Any]) -> None:
        fill = new_fill(event, self._filled)
        if fill is not None:
            size, price, fee, fee_currency = fill
            self.ledger.fill(event["symbol"], size, price, event.get("event_ms") or 0,
                             fee=fee, fee_currency=fee_currency)

    def expire(self, now_ms: int) -> int:
        """Forget orders that can no longer be live: never acknowledged and past their
        expiry (execution refuses an expired request; resting orders expire at the
        exchange, which tells). Returns how many were forgotten."""
        gone = [cid for cid, o in self.orders.items() if o.status == _NEW
                and o.expires_ms is not None and o.expires_ms < now_ms]
        for cid in gone:
            del self.orders[cid]
        return len(gone)

    def mark(self, symbol: str, price: Decimal) -> None:
        self.marks[symbol] = price
        self._books.pop(symbol, None)

    def mark_book(self, snapshot: Mapping[str, Any]) -> None:
        """Mark ``snapshot``'s symbol at its mid, worked out only when asked for (most
        marks are overwritten unread)."""
        if snapshot["bids"] and snapshot["asks"]:
            self._books[snapshot["symbol"]] = snapshot

    def mark_text(self, symbol: str, price: str) -> None:
        """Mark ``symbol`` at a price string (a bar's close), parsed only when asked for."""
        self._books[symbol] = price

    def mark_of(self, symbol: str) -> Decimal | None:
        self._resolve()
        return self.marks.get(symbol)

    def _resolve(self) -> None:
        for symbol, mark in self._books.items():
            if isinstance(mark, str):
                self.marks[symbol] = Decimal(mark)
            else:
                self.marks[symbol] = (Decimal(mark["bids"][0]["price"]) +
                                      Decimal(mark["asks"][0]["price"])) / 2
        self._books.clear()

    # -- out

    def open_orders(self, symbol: str | None = None) -> list[OpenOrder]:
        return [o for o in self.orders.values() if symbol is None or o.symbol == symbol]

    def position(self, symbol: str) -> Decimal:
        return self.ledger.position.get(symbol, ZERO)

    @property
    def fees(self) -> Decimal:
        """Fees paid, in the capital's currency (at the marks, for fees in another)."""
        self._resolve()
        return self.ledger.fees_total(self.marks) or ZERO

    def equity(self) -> Decimal | None:
        """The ledger at the latest marks; None without capital or without a mark for
        what is held."""
        if self.cash is None:
            return None
        self._resolve()
        return self.ledger.equity(self.marks)

    # -- state

    def dump(self) -> dict[str, Any]:
        """JSON-safe state, saved with the strategy's own."""
        self._resolve()
        return {"cash": None if self.cash is None else plain(self.cash),
                "orders": [{**asdict(o), "options": list(o.options)} for o in self.orders.values()],
                "ledger": self.ledger.dump(),
                "marks": {s: plain(p) for s, p in self.marks.items()},
                "filled": {c: plain(f) for c, f in self._filled.items()}}

    def load(self, state: Mapping[str, Any]) -> None:
        self.cash = None if state.get("cash") is None else Decimal(state["cash"])
        self.orders = {o["client_order_id"]: OpenOrder(**{**o, "options": tuple(o["options"])})
                       for o in state.get("orders", ())}
        self.marks = {s: Decimal(p) for s, p in state.get("marks", {}).items()}
        if "ledger" in state:
            self.ledger = Ledger.load(state["ledger"])
        else:  # saved before the ledger: positions and cash, no lots (cost at the marks)
            self.ledger = Ledger(self.cash or ZERO, keep_trades=False)
            for symbol, position in state.get("positions", {}).items():
                position = Decimal(position)
                if position:
                    mark = self.marks.get(symbol, ZERO)
                    self.ledger.fill(symbol, position, mark)
                    self.ledger.cash = self.ledger.cash + position * mark
        self._filled = {c: Decimal(f) for c, f in state.get("filled", {}).items()}
        self._books = {}
