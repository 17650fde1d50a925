"""An L2 order book per symbol: exact, fast, and free of I/O.

Levels are dicts from a price to the quantity string exactly as the exchange sent it, so
applying a change is a dict update. Prices are compared exactly: each distinct price
string is parsed once into a ``Decimal`` (cached) and used as the ordering key, and the
best bid/ask come from lazy heaps over those keys. A price written two ways ("1.10",
"1.1") is one level: keys are the canonical text (no trailing fractional zeros).

Why not ``Decimal`` keys in a sorted container? Measured: hashing and comparing
``Decimal`` on every change costs more than a string dict plus a heap push when a new
level appears (see ``make bench``).
"""

from __future__ import annotations

import heapq
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Iterable

from pipeline.core.vocabulary import BookSide

if TYPE_CHECKING:
    from pipeline.core.records import LevelChange

_PRICES: dict[str, tuple[str, Decimal]] = {}  # raw price text -> (canonical text, value)
_PRICE_CACHE_LIMIT = 2_000_000
BID, ASK = BookSide.BID.value, BookSide.ASK.value  # plain str: compared once per change


class BookError(ValueError):
    """A change that cannot be applied to a book (the caller dead-letters the record)."""


def price_key(raw: str) -> tuple[str, Decimal]:
    """(canonical text, exact value) of a price string; cached, since books see few prices."""
    found = _PRICES.get(raw)
    if found is not None:
        return found
    try:
        value = Decimal(raw)
    except (InvalidOperation, TypeError):
        raise BookError(f"price {raw!r} is not a decimal number") from None
    if not value.is_finite() or value <= 0:
        raise BookError(f"price {raw!r} is not a positive decimal")
    canonical = raw.rstrip("0").rstrip(".") if "." in raw else raw
    if len(_PRICES) >= _PRICE_CACHE_LIMIT:
        _PRICES.clear()
    found = _PRICES[raw] = (canonical, value)
    return found


class L2Book:
    """One symbol's book. ``bids``/``asks`` map canonical price text to quantity text."""

    __slots__ = ("symbol", "bids", "asks", "_bid_heap", "_ask_heap", "has_snapshot")

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.bids: dict[str, str] = {}
        self.asks: dict[str, str] = {}
        self._bid_heap: list[tuple[Decimal, str]] = []  # (-value, price): max-heap
        self._ask_heap: list[tuple[Decimal, str]] = []  # (value, price): min-heap
        self.has_snapshot = False

    # -- changes

    def apply_snapshot(self, changes: Iterable[LevelChange]) -> None:
        """Replace the whole book with ``changes`` (a full book)."""
        self.clear()
        self.apply(changes)
        self.has_snapshot = True

    def clear(self) -> None:
        self.bids.clear()
        self.asks.clear()
        self._bid_heap.clear()
        self._ask_heap.clear()
        self.has_snapshot = False

    def apply(self, changes: Iterable[LevelChange]) -> int:
        """Apply L2 changes (``{"side": "BID"|"ASK", "price", "quantity"}``): set the
        level's quantity, or remove it when the quantity is zero. Returns the count."""
        bids, asks = self.bids, self.asks
        bid_heap, ask_heap, prices, push = self._bid_heap, self._ask_heap, _PRICES, heapq.heappush
        bid, ask = BID, ASK
        n = 0
        for change in changes:  # the hot loop of every book: kept flat on purpose
            side, raw, quantity = change["side"], change["price"], change["quantity"]
            found = prices.get(raw) or price_key(raw)
            price = found[0]
            if side == bid:
                levels = bids
            elif side == ask:
                levels = asks
            else:
                raise BookError(f"{self.symbol}: unknown side {side!r}")
            if quantity[:1] == "-":
                raise BookError(f"{self.symbol}: negative quantity {quantity} at {raw}")
            if not quantity.strip("0."):  # zero, however written: remove the level
                levels.pop(price, None)
            else:
                if price not in levels:
                    if levels is bids:
                        push(bid_heap, (-found[1], price))
                    else:
                        push(ask_heap, (found[1], price))
                levels[price] = quantity
            n += 1
        if len(self._bid_heap) > 4 * len(bids) + 64:
            self._bid_heap = _rebuild(bids, -1)
        if len(self._ask_heap) > 4 * len(asks) + 64:
            self._ask_heap = _rebuild(asks, 1)
        return n

    # -- queries

    def best_bid(self) -> tuple[str, str] | None:
        return _top(self._bid_heap, self.bids)

    def best_ask(self) -> tuple[str, str] | None:
        return _top(self._ask_heap, self.asks)

    def state(self) -> str:
        """"ok", "crossed" (best bid above best ask), "locked" (equal) or "one-sided"."""
        bid, ask = self.best_bid(), self.best_ask()
        if bid is None or ask is None:
            return "one-sided"
        b, a = _value(bid[0]), _value(ask[0])
        return "crossed" if b > a else "locked" if b == a else "ok"

    def mid(self) -> Decimal | None:
        bid, ask = self.best_bid(), self.best_ask()
        if bid is None or ask is None:
            return None
        return (Decimal(bid[0]) + Decimal(ask[0])) / 2

    def spread(self) -> Decimal | None:
        bid, ask = self.best_bid(), self.best_ask()
        if bid is None or ask is None:
            return None
        return Decimal(ask[0]) - Decimal(bid[0])

    def size_at(self, side: str, price: str) -> str | None:
        """Quantity resting at ``price`` on ``side`` ("BID"/"ASK"), or None."""
        levels = self.bids if side == BID else self.asks
        return levels.get(price_key(price)[0])

    def depth(self, n: int | None = None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(bids, asks), best first, at most ``n`` levels a side (all when n is None)."""
        return _sorted(self.bids, n, reverse=True), _sorted(self.asks, n, reverse=False)

    def levels(self) -> dict[str, dict[str, str]]:
        """The whole book as plain dicts (for comparisons and checkpoints)."""
        return {BID: dict(self.bids), ASK: dict(self.asks)}


def _value(price: str) -> Decimal:
    found = _PRICES.get(price)
    return found[1] if found is not None else price_key(price)[1]


def _top(heap: list[tuple[Decimal, str]], levels: dict[str, str]) -> tuple[str, str] | None:
    while heap:
        price = heap[0][1]
        quantity = levels.get(price)
        if quantity is not None:
            return price, quantity
        heapq.heappop(heap)  # a level removed since it was pushed
    return None


def _rebuild(levels: dict[str, str], sign: int) -> list[tuple[Decimal, str]]:
    heap = [(sign * _value(p), p) for p in levels]
    heapq.heapify(heap)
    return heap


def _sorted(levels: dict[str, str], n: int | None, reverse: bool) -> list[tuple[str, str]]:
    if n is None or n >= len(levels):
        prices = sorted(levels, key=_value, reverse=reverse)
    elif reverse:
        prices = heapq.nlargest(n, levels, key=_value)
    else:
        prices = heapq.nsmallest(n, levels, key=_value)
    return [(p, levels[p]) for p in prices]
