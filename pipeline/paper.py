"""Paper fills: an order filled against the latest book snapshot, with no exchange at all.

Plain Python, no Kafka, no I/O, Decimal everywhere. The model, stated once:

* The order is a taker at the moment it is handled: a buy takes the snapshot's asks at or
  below its limit price, best first, at each level's price; a sell takes the bids at or
  above its limit. It pays ``fee_rate`` of each fill's notional in the quote currency.
* Paper orders never rest. What the snapshot cannot fill is cancelled at once, so every
  paper order ends in FILLED or CANCELLED right away (partial fills are possible:
  PARTIALLY_FILLED, then CANCELLED for the remainder). Reasons follow Gemini's names:
  ``ImmediateOrCancelWouldPost`` for an immediate-or-cancel remainder,
  ``FillOrKillWouldNotFill`` (nothing fills unless everything can),
  ``MakerOrCancelWouldTake`` (a maker-or-cancel order that would take is cancelled
  unfilled), and ``paper:no_resting_orders`` where Gemini would have rested the rest.
* Liquidity is used up: each snapshot level can be taken once. What orders took from a
  level is remembered until the next snapshot of that symbol replaces the book (a new
  snapshot is the market's new state, with our earlier fills already in it or not: a
  price taker cannot tell).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Iterable

from pipeline.venue.exchange import split_symbol

ZERO = Decimal(0)
DEFAULT_FEE_RATE = Decimal("0.0035")  # Gemini's API taker fee, lowest tier
NO_RESTING = "paper:no_resting_orders"


@dataclass(frozen=True)
class PaperResult:
    fills: tuple[tuple[Decimal, Decimal], ...]  # (price, amount) taken, best first
    amount: Decimal
    fee: Decimal
    fee_currency: str
    cancel_reason: str | None  # None when the order filled completely

    @property
    def filled(self) -> Decimal:
        return sum((qty for _, qty in self.fills), ZERO)

    @property
    def notional(self) -> Decimal:
        return sum((price * qty for price, qty in self.fills), ZERO)

    @property
    def avg_price(self) -> Decimal | None:
        filled = self.filled
        return self.notional / filled if filled else None


@dataclass
class PaperBook:
    """One symbol's latest snapshot levels and what paper orders took from them."""

    bids: tuple[tuple[Decimal, Decimal], ...] = ()
    asks: tuple[tuple[Decimal, Decimal], ...] = ()
    taken: dict[tuple[str, Decimal], Decimal] = field(default_factory=dict)

    def replace(self, bids: Iterable[tuple[Decimal, Decimal]],
                asks: Iterable[tuple[Decimal, Decimal]]) -> None:
        self.bids, self.asks = tuple(bids), tuple(asks)
        self.taken.clear()

    def fill(self, symbol: str, side: str, limit: Decimal, amount: Decimal,
             options: Iterable[str] = (), fee_rate: Decimal = DEFAULT_FEE_RATE) -> PaperResult:
        """Fill one order (``side`` "buy"/"sell") and use up the liquidity it took."""
        book_side = "ask" if side == "buy" else "bid"
        levels = self.asks if side == "buy" else self.bids
        plan: list[tuple[Decimal, Decimal]] = []
        left = amount
        for price, quantity in levels:
            if left <= 0 or (price > limit if side == "buy" else price < limit):
                break
            take = min(left, quantity - self.taken.get((book_side, price), ZERO))
            if take > 0:
                plan.append((price, take))
                left -= take
        options = set(options)
        quote = split_symbol(symbol)[1]
        if "maker-or-cancel" in options:
            reason = "MakerOrCancelWouldTake" if plan else NO_RESTING
            return PaperResult((), amount, ZERO, quote, reason)
        if "fill-or-kill" in options and left > 0:
            return PaperResult((), amount, ZERO, quote, "FillOrKillWouldNotFill")
        for price, take in plan:
            self.taken[(book_side, price)] = self.taken.get((book_side, price), ZERO) + take
        fee = sum((price * qty * fee_rate for price, qty in plan), ZERO)
        reason = None
        if left > 0:
            reason = "ImmediateOrCancelWouldPost" if "immediate-or-cancel" in options \
                else NO_RESTING
        return PaperResult(tuple(plan), amount, fee, quote, reason)
