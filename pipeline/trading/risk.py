"""Execution's risk rules: plain Python, no Kafka, no I/O, Decimal everywhere.

``check`` decides one order request against the ``RiskLimits`` and the ``RiskState``
(positions, open orders, recent orders per strategy) and the latest book of its symbol.
The live execution group and any backtest call the same function.

Rules, in the order they are checked (the first that fails names the rejection):

``risk:kill_switch``   the kill switch is on: every request is refused.
``risk:price_band``    no book is known for the symbol, the book is older than
                       ``max_book_age_ms`` or one-sided, or the limit price is more than
                       ``price_band_bps`` away from the mid ((best bid + best ask) / 2).
                       A MARKET order gets the band's edge as its price (mid x (1 + band)
                       for a buy, rounded down to the price step; mid x (1 - band) for a
                       sell, rounded up), so it can never trade outside the band. The step
                       is the symbol's rules' ``price_step`` where known, else
                       ``RiskLimits.price_steps``, else the book's finest decimals.
``risk:max_notional``  price x amount (in the quote currency) is above ``max_notional``.
``risk:max_position``  the symbol's position if this order and every open order on the
                       same side filled completely would exceed ``max_position`` (base
                       currency) in absolute value (an order that brings the position
                       closer to zero always passes). Positions are per symbol for the
                       whole account (all strategies), signed: buys add, sells subtract.
``risk:rate_limit``    the strategy already had ``max_orders_per_minute`` orders accepted
                       in the last 60 s (a sliding window per strategy; only accepted
                       orders count, so a burst of rejected requests does not lock it out).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any, Iterable, Mapping, cast

from pipeline.core.decimals import ZERO
from pipeline.core.vocabulary import BUY_WIRE, SELL_WIRE, TERMINAL_KINDS, OrderEventKind, OrderType

BPS = Decimal(10_000)
MINUTE_MS = 60_000
# Events that move neither a position nor an open order.
_NO_CHANGE = frozenset({OrderEventKind.REJECTED, OrderEventKind.CANCEL_REJECTED,
                        OrderEventKind.UNKNOWN})

KILL_SWITCH = "risk:kill_switch"
STRATEGY_HALTED = "risk:strategy_halted"
PRICE_BAND = "risk:price_band"
MAX_NOTIONAL = "risk:max_notional"
MAX_POSITION = "risk:max_position"
RATE_LIMIT = "risk:rate_limit"


@dataclass(frozen=True)
class RiskLimits:
    """Limits from configuration; ``None`` switches a limit off (the band cannot be)."""

    max_notional: Decimal | None = Decimal("10000")
    max_position: Decimal | None = Decimal("1")
    max_position_by_symbol: Mapping[str, Decimal] = field(default_factory=dict)
    price_band_bps: Decimal = Decimal("100")  # 1% either side of the mid
    max_orders_per_minute: int | None = 60  # per strategy
    max_book_age_ms: int | None = 60_000
    #: The price step per symbol that a MARKET order's band edge is rounded to (Gemini's
    #: ``quote_increment``, :attr:`SymbolRules.price_step`); else the book's finest
    #: decimals. It used to be called ``tick_sizes``, which in Gemini's symbol details is
    #: the *amount* step: :attr:`tick_sizes` still reads it.
    price_steps: Mapping[str, Decimal] = field(default_factory=dict)

    @property
    def tick_sizes(self) -> Mapping[str, Decimal]:
        """The old name of :attr:`price_steps` (a price step, not Gemini's tick_size)."""
        return self.price_steps

    def position_limit(self, symbol: str) -> Decimal | None:
        return self.max_position_by_symbol.get(symbol, self.max_position)


@dataclass(frozen=True)
class BookTop:
    """The part of a book snapshot execution needs: levels best first, as Decimals."""

    symbol: str
    bids: tuple[tuple[Decimal, Decimal], ...]
    asks: tuple[tuple[Decimal, Decimal], ...]
    ts_ms: int  # when the orderbook group published it
    tick: Decimal  # the finest price step seen in the snapshot

    @classmethod
    def from_snapshot(cls, snapshot: Mapping[str, Any]) -> "BookTop":
        """From a ``BookSnapshot`` record (prices and quantities are decimal strings)."""
        bids = tuple((Decimal(lv["price"]), Decimal(lv["quantity"])) for lv in snapshot["bids"])
        asks = tuple((Decimal(lv["price"]), Decimal(lv["quantity"])) for lv in snapshot["asks"])
        # a snapshot's prices are finite (the book refuses others): int exponents
        exponents = [cast(int, p.as_tuple().exponent) for p, _ in bids + asks]
        tick = Decimal(1).scaleb(min(exponents)) if exponents else Decimal("0.01")
        return cls(snapshot["symbol"], bids, asks, snapshot["published_ts_us"] // 1000, tick)

    @property
    def mid(self) -> Decimal | None:
        if not self.bids or not self.asks:
            return None
        return (self.bids[0][0] + self.asks[0][0]) / 2


@dataclass
class OpenOrder:
    symbol: str
    side: str  # BUY_WIRE or SELL_WIRE
    remaining: Decimal


class RiskState:
    """What the limits are checked against: positions, open orders, recent orders."""

    def __init__(self) -> None:
        self.positions: dict[str, Decimal] = {}
        self.open_orders: dict[str, OpenOrder] = {}  # client_order_id -> remaining
        self.recent: dict[str, deque[int]] = {}  # strategy -> accepted-at ms, oldest first
        self._filled: dict[str, Decimal] = {}  # open order -> filled so far (on_event)

    def position(self, symbol: str) -> Decimal:
        return self.positions.get(symbol, ZERO)

    def apply_fill(self, symbol: str, side: str, amount: Decimal) -> None:
        signed = amount if side == BUY_WIRE else -amount
        self.positions[symbol] = self.position(symbol) + signed

    def note_open(self, client_order_id: str, symbol: str, side: str, remaining: Decimal) -> None:
        if remaining > 0:
            self.open_orders[client_order_id] = OpenOrder(symbol, side, remaining)
        else:
            self.open_orders.pop(client_order_id, None)

    def note_closed(self, client_order_id: str) -> None:
        self.open_orders.pop(client_order_id, None)

    def note_accepted(self, strategy_id: str, at_ms: int) -> None:
        window = self.recent.setdefault(strategy_id, deque())
        window.append(at_ms)
        while window[0] <= at_ms - MINUTE_MS:  # only the last minute is ever asked for
            window.popleft()

    def restore_accepted(self, items: Iterable[tuple[str, int]]) -> None:
        """(strategy, accepted-at ms) from history, in any order."""
        for strategy_id, at_ms in sorted(items, key=lambda item: item[1]):
            self.note_accepted(strategy_id, at_ms)

    def orders_in_last_minute(self, strategy_id: str, now_ms: int) -> int:
        window = self.recent.get(strategy_id)
        if not window:
            return 0
        while window and window[0] <= now_ms - MINUTE_MS:
            window.popleft()
        return len(window)

    def open_exposure(self, symbol: str, side: str, exclude: str | None = None) -> Decimal:
        return sum((o.remaining for cid, o in self.open_orders.items()
                    if o.symbol == symbol and o.side == side and cid != exclude), ZERO)

    def on_event(self, event: Mapping[str, Any]) -> None:
        """Follow an ``OrderEvent`` of any execution client: fills (from the running
        ``filled_amount``) move the position, open orders their remainder."""
        cid, kind = event["client_order_id"], event["kind"]
        if kind in _NO_CHANGE:
            return
        symbol, side = event["symbol"], event["side"].lower()
        filled = Decimal(event["filled_amount"])
        before = self._filled.get(cid, ZERO)
        if filled > before:
            self.apply_fill(symbol, side, filled - before)
        if kind in TERMINAL_KINDS:
            self._filled.pop(cid, None)
            self.note_closed(cid)
        else:
            self._filled[cid] = max(filled, before)
            self.note_open(cid, symbol, side, Decimal(event["amount"]) - filled)


@dataclass(frozen=True)
class Decision:
    reason: str | None  # None: accepted
    price: Decimal | None  # the limit price to send (a MARKET order's band edge)
    detail: str = ""  # for the log: the numbers behind a rejection (never a secret)

    @property
    def accepted(self) -> bool:
        return self.reason is None


def band_edge(book: BookTop, side: str, band_bps: Decimal) -> Decimal:
    """The most aggressive price inside the band, on the tick grid."""
    mid = book.mid
    assert mid is not None
    if side == BUY_WIRE:
        edge = mid * (1 + band_bps / BPS)
        return (edge / book.tick).to_integral_value(ROUND_FLOOR) * book.tick
    edge = mid * (1 - band_bps / BPS)
    return (edge / book.tick).to_integral_value(ROUND_CEILING) * book.tick


def check(limits: RiskLimits, state: RiskState, book: BookTop | None, *, strategy_id: str,
          symbol: str, side: str, order_type: str, price: Decimal | None, amount: Decimal,
          now_ms: int, kill_switch: bool = False, replacing: str | None = None,
          price_step: Decimal | None = None) -> Decision:
    """Accept or reject one order; ``side`` is "buy"/"sell", ``order_type`` LIMIT/MARKET.
    ``replacing``: the open order this one replaces (cancelled first, so not counted).
    ``price_step``: the symbol's (its rules'), before ``limits.price_steps`` and the book's.

    Pure: it changes nothing. The caller records an accepted order with
    ``state.note_accepted`` (and its fills and open remainder) once it acts on it.
    """
    if kill_switch:
        return Decision(KILL_SWITCH, None, "kill switch is on")
    if book is None:
        return Decision(PRICE_BAND, None, f"no book snapshot known for {symbol}")
    if limits.max_book_age_ms is not None and now_ms - book.ts_ms > limits.max_book_age_ms:
        return Decision(PRICE_BAND, None, f"book of {symbol} is {now_ms - book.ts_ms} ms old")
    mid = book.mid
    if mid is None:
        return Decision(PRICE_BAND, None, f"book of {symbol} is one-sided")
    step = price_step or limits.price_steps.get(symbol)
    if step is not None and step != book.tick:
        book = BookTop(book.symbol, book.bids, book.asks, book.ts_ms, step)
    if order_type == OrderType.MARKET:
        price = band_edge(book, side, limits.price_band_bps)
    elif price is None:
        return Decision(PRICE_BAND, None, "a LIMIT order without a price")
    if abs(price - mid) * BPS > limits.price_band_bps * mid:
        return Decision(PRICE_BAND, price, f"price {price} is {abs(price - mid) * BPS / mid:.1f} "
                        f"bps from the mid {mid}, the band is {limits.price_band_bps} bps")
    notional = price * amount
    if limits.max_notional is not None and notional > limits.max_notional:
        return Decision(MAX_NOTIONAL, price,
                        f"notional {notional} is above {limits.max_notional}")
    cap = limits.position_limit(symbol)
    if cap is not None:
        position = state.position(symbol)
        if side == BUY_WIRE:
            worst = position + state.open_exposure(symbol, BUY_WIRE, replacing) + amount
        else:
            worst = position - state.open_exposure(symbol, SELL_WIRE, replacing) - amount
        if abs(worst) > cap and abs(worst) > abs(position):  # reducing is always fine
            return Decision(MAX_POSITION, price, f"position {position} would reach {worst}, "
                            f"the limit is {cap}")
    if limits.max_orders_per_minute is not None and \
            state.orders_in_last_minute(strategy_id, now_ms) >= limits.max_orders_per_minute:
        return Decision(RATE_LIMIT, price, f"{strategy_id} already sent "
                        f"{limits.max_orders_per_minute} orders in the last minute")
    return Decision(None, price)
