"""One order model: the state machine every order follows and the ``OrderEvent`` records
that tell its steps, the same in backtests, paper trading and at Gemini.

    NEW ─▶ ACCEPTED ─▶ BOOKED ─▶ PARTIALLY_FILLED* ─▶ FILLED
     │         │          └──────────┬─────────────▶ CANCELLED / EXPIRED
     └▶ REJECTED                     (a taker fills first, then books or cancels the rest)

A cancel that finds the order closed (filled, cancelled) changes nothing and is told as
CANCEL_REJECTED. Every fill is its own event with its own price, amount, liquidity (MAKER
or TAKER) and fee; ``filled_amount``, ``avg_fill_price`` and ``fee`` are the running totals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any, Mapping

from pipeline.core.decimals import ZERO, plain
from pipeline.core.records import OrderEvent
from pipeline.core.symbols import quote_currency
from pipeline.core.vocabulary import (
    FILL_KINDS,
    Liquidity,
    OrderEventKind,
    OrderOption,
    OrderType,
    Side,
)

K = OrderEventKind
# Reasons an order is refused or closed, in Gemini's names where Gemini has one.
MOC_WOULD_TAKE = "MakerOrCancelWouldTake"
IOC_WOULD_POST = "ImmediateOrCancelWouldPost"
FOK_WOULD_NOT_FILL = "FillOrKillWouldNotFill"
REQUESTED = "Requested"
EXPIRED = "expired"
NO_BOOK = "no_book"  # a MARKET order for a symbol with no book yet
UNKNOWN_ORDER, NOT_OWNER, ORDER_CLOSED = "unknown_order", "not_owner", "order_closed"


class OrderStatus(StrEnum):
    NEW = "NEW"  # asked for, not yet at the exchange
    ACCEPTED = "ACCEPTED"
    BOOKED = "BOOKED"
    PARTIALLY_FILLED = "PARTIALLY_FILLED"
    FILLED = "FILLED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"
    REJECTED = "REJECTED"


S = OrderStatus
OPEN_STATUSES = frozenset({S.NEW, S.ACCEPTED, S.BOOKED, S.PARTIALLY_FILLED})
_STATUS_OF = {kind: S(kind.value) for kind in K if kind.value in S.__members__}
_NEXT: dict[OrderStatus, frozenset[OrderStatus]] = {
    S.NEW: frozenset({S.ACCEPTED, S.REJECTED}),
    S.ACCEPTED: frozenset({S.BOOKED, S.PARTIALLY_FILLED, S.FILLED, S.CANCELLED, S.EXPIRED}),
    S.BOOKED: frozenset({S.PARTIALLY_FILLED, S.FILLED, S.CANCELLED, S.EXPIRED}),
    S.PARTIALLY_FILLED: frozenset({S.PARTIALLY_FILLED, S.BOOKED, S.FILLED, S.CANCELLED,
                                   S.EXPIRED}),
}


_FILLED, _PARTIAL = K.FILLED, K.PARTIALLY_FILLED
_WIRE = {side: side.wire for side in Side}  # plain str
_TEXT = {member: member.value for enum in (K, Liquidity) for member in enum}  # plain str


class OrderStateError(ValueError):
    """A step the state machine does not allow (a bug in whoever reported it)."""


@dataclass(frozen=True, slots=True)
class Fill:
    """One fill. ``liquidity`` and ``fee`` are None where the exchange's answer does not
    say (Gemini's REST order status gives running totals only)."""

    price: Decimal
    amount: Decimal
    liquidity: Liquidity | None
    fee: Decimal | None


@dataclass(slots=True)
class Order:
    """An order and what has happened to it so far. ``price_text``/``amount_text`` are the
    exact strings it was asked with, echoed in every event."""

    client_order_id: str
    strategy_id: str
    symbol: str
    side: Side
    order_type: OrderType
    price: Decimal | None  # limit; None for MARKET
    amount: Decimal
    options: tuple[str, ...] = ()
    created_ms: int = 0
    expires_ms: int | None = None
    price_text: str | None = None
    amount_text: str = ""
    status: OrderStatus = S.NEW
    exchange_order_id: str | None = None
    filled: Decimal = ZERO
    notional: Decimal = ZERO
    fees: Decimal | None = ZERO  # None once a fill's fee was unknown
    fee_currency: str = field(default="")
    # The running totals as event text, worked out once per fill (events are many).
    totals: tuple[str, str | None, str | None] = ("0", None, "0")  # filled, avg, fees

    def __post_init__(self) -> None:
        if not self.amount_text:
            self.amount_text = plain(self.amount)
        if self.price is not None and self.price_text is None:
            self.price_text = plain(self.price)
        if not self.fee_currency:
            self.fee_currency = quote_currency(self.symbol)
        if self.filled or self.fees != ZERO:
            self._totals()

    def _totals(self) -> None:
        filled = self.filled
        self.totals = (plain(filled), plain(self.notional / filled) if filled else None,
                       None if self.fees is None else plain(self.fees))

    @property
    def remaining(self) -> Decimal:
        return self.amount - self.filled

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES

    @property
    def option(self) -> str | None:
        return self.options[0] if self.options else None

    def step(self, kind: OrderEventKind) -> None:
        """Move to the status ``kind`` reports; CANCEL_REJECTED changes nothing."""
        target = _STATUS_OF.get(kind)
        if target is None:  # CANCEL_REJECTED (and UNKNOWN): the order is unchanged
            return
        if target not in _NEXT.get(self.status, ()):
            raise OrderStateError(f"order {self.client_order_id}: {self.status} -> {target} "
                                  "is not a step an order can take")
        self.status = target

    def add_fill(self, fill: Fill) -> OrderEventKind:
        """Book a fill; the event kind it makes (PARTIALLY_FILLED or FILLED)."""
        if fill.amount <= 0 or fill.amount > self.remaining:
            raise OrderStateError(f"order {self.client_order_id}: a fill of {fill.amount} "
                                  f"with {self.remaining} remaining")
        self.filled += fill.amount
        self.notional += fill.price * fill.amount
        self.fees = None if fill.fee is None or self.fees is None else self.fees + fill.fee
        self._totals()
        kind = _FILLED if self.filled == self.amount else _PARTIAL
        self.step(kind)
        return kind


def order_from_event(event: OrderEvent) -> Order:
    """The order as its latest ``OrderEvent`` tells it (to follow it after a restart)."""
    filled = Decimal(event["filled_amount"])
    avg = event.get("avg_fill_price")
    price = event.get("price")
    fee = event.get("fee")
    status = S(event["kind"]) if event["kind"] in S.__members__ else S.ACCEPTED
    return Order(event["client_order_id"], event["strategy_id"], event["symbol"],
                 Side.parse(event["side"]),
                 OrderType.LIMIT if price is not None else OrderType.MARKET,
                 Decimal(price) if price is not None else None, Decimal(event["amount"]),
                 price_text=price, amount_text=event["amount"], status=status,
                 exchange_order_id=event.get("exchange_order_id"), filled=filled,
                 notional=Decimal(avg) * filled if avg is not None and filled else ZERO,
                 fees=Decimal(fee) if fee is not None else None,
                 fee_currency=event.get("fee_currency") or "")


def check_options(options: tuple[str, ...] | list[str]) -> str | None:
    """Gemini's reason for refusing ``options``, or None when they are fine: at most one,
    each one of Gemini's."""
    known = {o.value for o in OrderOption}
    if any(o not in known for o in options):
        return "UnsupportedOption"
    if len(options) > 1:
        return "ConflictingOptions"
    return None


def order_event(order: Order, kind: OrderEventKind, when_ms: int, mode: str, *,
                reason: str | None = None, fill: Fill | None = None,
                request_id: str | None = None) -> OrderEvent:
    """The ``OrderEvent`` record of one step of ``order`` (already applied to it)."""
    last = fill if fill is not None and kind in FILL_KINDS else None  # the fill this event tells
    filled, avg, fees = order.totals
    return {
        "client_order_id": order.client_order_id, "strategy_id": order.strategy_id,
        "symbol": order.symbol, "kind": _TEXT[kind], "reason": reason, "mode": mode,
        "exchange_order_id": order.exchange_order_id, "side": _WIRE[order.side],
        "price": order.price_text, "amount": order.amount_text,
        "filled_amount": filled, "avg_fill_price": avg, "fee": fees,
        "fee_currency": order.fee_currency, "event_ms": when_ms,
        "last_fill_price": plain(last.price) if last is not None else None,
        "last_fill_amount": plain(last.amount) if last is not None else None,
        "liquidity": None if last is None or last.liquidity is None else _TEXT[last.liquidity],
        "last_fill_fee": plain(last.fee) if last is not None and last.fee is not None else None,
        "request_id": request_id,
    }


def new_order(request: Mapping[str, Any], *, price: Decimal | None = None,
              options: tuple[str, ...] | None = None) -> Order:
    """The :class:`Order` an ``OrderRequest`` asks for. ``price`` (and ``options``) override
    the request's: a MARKET request goes out as an immediate-or-cancel limit at the price
    band's edge, as at Gemini."""
    text = request.get("price") if price is None else plain(price)
    return Order(request["client_order_id"], request["strategy_id"], request["symbol"],
                 Side.parse(request["side"]),
                 OrderType(request["order_type"]) if price is None else OrderType.LIMIT,
                 Decimal(text) if text is not None else None, Decimal(request["amount"]),
                 tuple(request.get("options") or ()) if options is None else options,
                 request["created_ms"], request.get("expires_ms"), price_text=text,
                 amount_text=request["amount"])
