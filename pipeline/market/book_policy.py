"""The one book policy: how ``md.l2`` updates become books, health events and the
``BookSnapshot`` records strategies see. The live ``orderbook`` group, the backtest engine
and paper execution all call it, so a backtest's strategy sees the very snapshots the live
group publishes (``published_ts_us`` aside: the wall clock live, event time in replays).

Rules, per symbol:

* a snapshot record replaces the book (a RESNAPSHOT health event when one was live);
* changes before the first snapshot are ignored (one CHANGE_BEFORE_SNAPSHOT per wait);
* a crossed book (best bid above best ask) is a CROSSED event and is dropped until the
  next snapshot (no invented state); a locked one (equal) is a LOCKED event and is kept;
* a snapshot is published whenever the top of book (best bid and ask, price and quantity)
  differs from the last one published; a dropped book publishes one empty snapshot;
* books whose deeper levels changed are published again once ``snapshot_interval_us`` has
  passed since the last such round (:meth:`BookPolicy.due`): wall time live, event time in
  backtests.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from decimal import Decimal
from typing import Iterable

from pipeline.core.records import BookSnapshot, L2Update, Level, LevelChange
from pipeline.core.vocabulary import BookHealthKind, BookSide
from pipeline.market.orderbook import _PRICES, BID, L2Book, price_key

IGNORED, APPLIED, TOP_CHANGED = 0, 1, 2
CROSSED, LOCKED, CHANGE_BEFORE_SNAPSHOT, RESNAPSHOT = (
    BookHealthKind.CROSSED, BookHealthKind.LOCKED, BookHealthKind.CHANGE_BEFORE_SNAPSHOT,
    BookHealthKind.RESNAPSHOT)

_Top = tuple[tuple[str, str] | None, tuple[str, str] | None]  # (best bid, best ask)


@dataclass(slots=True)
class Source:
    """Where a book's state comes from: the last ``md.l2`` record applied to it."""

    partition: int = -1
    offset: int = -1
    connection_id: str = ""
    sequence: int = -1
    received_ts_us: int = 0
    exchange_ts_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Health:
    kind: str
    detail: str
    best_bid: str | None
    best_ask: str | None


class Depth:
    """One book's level prices kept sorted, best first, beside its :class:`L2Book` (which
    keeps only the best of each side), so a depth-N snapshot costs N lookups, not a sort."""

    __slots__ = ("bids", "asks", "bid_set", "ask_set")

    def __init__(self) -> None:
        self.bids: list[tuple[Decimal, str]] = []  # (-value, price), ascending = best first
        self.asks: list[tuple[Decimal, str]] = []  # (value, price)
        self.bid_set: set[str] = set()
        self.ask_set: set[str] = set()

    def rebuild(self, book: L2Book) -> None:
        self.bids = sorted((-price_key(p)[1], p) for p in book.bids)
        self.asks = sorted((price_key(p)[1], p) for p in book.asks)
        self.bid_set, self.ask_set = set(book.bids), set(book.asks)

    def update(self, book: L2Book, changes: Iterable[LevelChange]) -> None:
        """Follow ``changes`` that were just applied to ``book`` (most only resize a level:
        two lookups; a level that appears or goes is one sorted insert or delete)."""
        prices, bid_levels, ask_levels = _PRICES, book.bids, book.asks
        bid_set, ask_set = self.bid_set, self.ask_set
        bid = BID
        for change in changes:
            raw = change["price"]
            found = prices.get(raw) or price_key(raw)
            canonical = found[0]
            if change["side"] == bid:
                if canonical in bid_levels:
                    if canonical not in bid_set:
                        bid_set.add(canonical)
                        insort(self.bids, (-found[1], canonical))
                elif canonical in bid_set:
                    bid_set.discard(canonical)
                    keys = self.bids
                    del keys[bisect_left(keys, (-found[1], canonical))]
            elif canonical in ask_levels:
                if canonical not in ask_set:
                    ask_set.add(canonical)
                    insort(self.asks, (found[1], canonical))
            elif canonical in ask_set:
                ask_set.discard(canonical)
                keys = self.asks
                del keys[bisect_left(keys, (found[1], canonical))]

    def top(self, book: L2Book, n: int) -> tuple[list[Level], list[Level]]:
        bids, asks = book.bids, book.asks
        return ([{"price": p, "quantity": bids[p]} for _, p in self.bids[:n]],
                [{"price": p, "quantity": asks[p]} for _, p in self.asks[:n]])


class BookPolicy:
    """Books of many symbols under the rules above. ``depth`` is N of the snapshots."""

    def __init__(self, depth: int = 10, snapshot_interval_us: int = 1_000_000,
                 books: dict[str, L2Book] | None = None) -> None:
        if depth < 1:
            raise ValueError(f"book depth must be at least 1, not {depth}")
        self.depth = depth
        self.snapshot_interval_us = snapshot_interval_us
        #: symbol -> book; pass a dict to share the books (e.g. with a simulated exchange).
        self.books: dict[str, L2Book] = {} if books is None else books
        #: depth > 1: each book's sorted level index (depth 1 needs only the best levels)
        self.levels: dict[str, Depth] = {}
        self.changed: set[str] = set()  # below the top since their last snapshot
        self.counts: dict[str, int] = {"resnapshot": 0, "change_before_snapshot": 0,
                                       "crossed": 0, "locked": 0, "snapshots": 0}
        self.changes = 0  # level changes applied
        # symbol -> (partition, offset, record) applied last
        self._last: dict[str, tuple[int, int, L2Update]] = {}
        self._restored: dict[str, Source] = {}  # symbol -> source of a restored book
        self._top: dict[str, _Top] = {}
        self._waiting: set[str] = set()  # reported as waiting for a snapshot
        self._last_round_us: int | None = None
        #: The next time :meth:`due` can have something (callers may skip it before).
        self.next_round_us: float = float("-inf")

    def symbols(self) -> list[str]:
        """Every symbol with a book, sorted."""
        return sorted(self.books)

    def source(self, symbol: str) -> Source:
        """Where ``symbol``'s book comes from: the last record applied to it."""
        last = self._last.get(symbol)
        if last is None:
            return self._restored.get(symbol) or Source()
        partition, offset, update = last
        return Source(partition, offset, update["connection_id"], update["sequence"],
                      update["received_ts_us"], update["exchange_ts_ms"])

    # -- updates

    def apply(self, update: L2Update, partition: int, offset: int
              ) -> tuple[int, tuple[Health, ...]]:
        """Apply one ``md.l2`` record: (IGNORED | APPLIED | TOP_CHANGED, health events).
        TOP_CHANGED means a snapshot is due now (:meth:`snapshot`)."""
        symbol = update["symbol"]
        book = self.books.get(symbol)
        if book is None:
            book = self.books[symbol] = L2Book(symbol)
            if self.depth > 1:
                self.levels[symbol] = Depth()
        changes = update["changes"]
        health: tuple[Health, ...] = ()
        self._last[symbol] = (partition, offset, update)
        if update["snapshot"]:
            if book.has_snapshot:
                self.counts["resnapshot"] += 1
                health = (self._health(book, RESNAPSHOT, "new snapshot on connection "
                                       f"{update['connection_id']} replaces the book"),)
            book.apply_snapshot(changes)
            if self.depth > 1:
                self.levels[symbol].rebuild(book)
            self._waiting.discard(symbol)
        elif not book.has_snapshot:
            self.counts["change_before_snapshot"] += 1
            if symbol not in self._waiting:  # once per wait, not once per record
                self._waiting.add(symbol)
                return IGNORED, (self._health(book, CHANGE_BEFORE_SNAPSHOT,
                                              "changes ignored until the next snapshot"),)
            return IGNORED, ()
        else:
            book.apply(changes)
            if self.depth > 1:
                self.levels[symbol].update(book, changes)
        self.changes += len(changes)
        bid, ask = book.best_bid(), book.best_ask()
        top: _Top = (bid, ask)
        if top == self._top.get(symbol):
            self.changed.add(symbol)
            return APPLIED, health  # the same top as the last one published: not crossed
        if bid is not None and ask is not None:
            b, a = (_PRICES.get(bid[0]) or price_key(bid[0]))[1], \
                (_PRICES.get(ask[0]) or price_key(ask[0]))[1]
            if b >= a:
                health = health + (self._cross(symbol, book, b > a, bid, ask),)
                if b > a:
                    top = (None, None)
        self._top[symbol] = top
        self.changed.discard(symbol)
        return TOP_CHANGED, health

    def _cross(self, symbol: str, book: L2Book, crossed: bool, bid: tuple[str, str],
               ask: tuple[str, str]) -> Health:
        detail = f"best bid {bid[0]} x {bid[1]}, best ask {ask[0]} x {ask[1]}"
        if not crossed:
            self.counts["locked"] += 1
            return self._health(book, LOCKED, detail)
        self.counts["crossed"] += 1
        event = self._health(book, CROSSED, detail + "; book dropped, waiting for the next "
                             "snapshot")
        book.clear()  # no invented state: wait for the next snapshot
        if self.depth > 1:
            self.levels[symbol].rebuild(book)
        self._waiting.add(symbol)
        return event

    @staticmethod
    def _health(book: L2Book, kind: str, detail: str) -> Health:
        bid, ask = book.best_bid(), book.best_ask()
        return Health(kind, detail, bid[0] if bid else None, ask[0] if ask else None)

    # -- snapshots

    def top_levels(self, symbol: str) -> tuple[list[Level], list[Level]]:
        """The best ``depth`` levels a side of ``symbol``'s book, best first."""
        book = self.books[symbol]
        if self.depth > 1:
            return self.levels[symbol].top(book, self.depth)
        bid, ask = book.best_bid(), book.best_ask()
        return ([{"price": bid[0], "quantity": bid[1]}] if bid else [],
                [{"price": ask[0], "quantity": ask[1]}] if ask else [])

    def snapshot(self, symbol: str, published_ts_us: int) -> BookSnapshot:
        """The ``BookSnapshot`` of ``symbol``'s book now."""
        bids: list[Level]
        asks: list[Level]
        if self.depth > 1:
            bids, asks = self.levels[symbol].top(self.books[symbol], self.depth)
        else:  # the top apply() just found (a dropped book's is empty)
            bid, ask = self._top.get(symbol) or (None, None)
            bids = [{"price": bid[0], "quantity": bid[1]}] if bid else []
            asks = [{"price": ask[0], "quantity": ask[1]}] if ask else []
        self.changed.discard(symbol)
        self.counts["snapshots"] += 1
        last = self._last.get(symbol)
        if last is None:
            source = self.source(symbol)
            partition, offset, connection, sequence, received, exchange = (
                source.partition, source.offset, source.connection_id, source.sequence,
                source.received_ts_us, source.exchange_ts_ms)
        else:
            partition, offset, update = last
            connection, sequence, received, exchange = (
                update["connection_id"], update["sequence"], update["received_ts_us"],
                update["exchange_ts_ms"])
        return {"symbol": symbol, "depth": self.depth, "bids": bids, "asks": asks,
                "exchange_ts_ms": exchange, "received_ts_us": received,
                "published_ts_us": published_ts_us, "source_partition": partition,
                "source_offset": offset, "connection_id": connection, "sequence": sequence}

    def due(self, now_us: int) -> list[str]:
        """Symbols whose deeper levels changed, once ``snapshot_interval_us`` has passed
        since the last round (the round's clock starts at the first call); sorted."""
        if self._last_round_us is None:
            self._last_round_us = now_us
            self.next_round_us = now_us + self.snapshot_interval_us
        if not self.changed or now_us - self._last_round_us < self.snapshot_interval_us:
            return []
        self._last_round_us = now_us
        self.next_round_us = now_us + self.snapshot_interval_us
        due = sorted(s for s in self.changed if self.books[s].has_snapshot)
        self.changed.clear()
        return due

    # -- restore

    def restore(self, symbol: str, bids: Iterable[Level], asks: Iterable[Level],
                has_snapshot: bool, source: Source) -> None:
        """A book from a checkpoint (levels as ``{"price", "quantity"}``)."""
        book = self.books[symbol] = L2Book(symbol)
        if has_snapshot:
            bid_changes: list[LevelChange] = [{"side": BookSide.BID, **lvl} for lvl in bids]
            ask_changes: list[LevelChange] = [{"side": BookSide.ASK, **lvl} for lvl in asks]
            book.apply_snapshot(bid_changes + ask_changes)
        if self.depth > 1:
            depth = self.levels[symbol] = Depth()
            depth.rebuild(book)
        self._last.pop(symbol, None)
        self._restored[symbol] = source
        self._top[symbol] = (book.best_bid(), book.best_ask())
        if not has_snapshot:
            self._waiting.add(symbol)

    def forget(self, symbols: Iterable[str]) -> None:
        for symbol in list(symbols):
            for table in (self.books, self._last, self._restored, self.levels, self._top):
                table.pop(symbol, None)
            self.changed.discard(symbol)
            self._waiting.discard(symbol)

