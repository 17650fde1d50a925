"""The venue's market: one book per symbol, moved by a source of events. No I/O.

A source yields :class:`MarketEvent`s: a recorded capture replayed frame by frame, or a
seeded generator of realistic books. The market applies each event to its books (so a
client that connects later gets a true snapshot, and REST orders fill against the same
book) and the server renders it in Gemini's v2 or v1 format.
"""

from __future__ import annotations

import json
import random
from collections import deque
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Iterator

from pipeline.core.errors import PipelineError
from pipeline.gemini.capture import read_capture

RECENT_TRADES = 50


@dataclass(slots=True)
class MarketEvent:
    """One exchange frame's worth of change for one symbol, in Gemini's own terms."""

    symbol: str
    changes: list[list[str]]  # [side "buy"/"sell", price, remaining quantity]
    trades: list[dict] = field(default_factory=list)  # v2 trade objects
    snapshot: bool = False  # the changes are the whole book (replaces it)
    ts_ms: int = 0  # exchange time
    at_s: float = 0.0  # when it happened in the source's time (for replay speed)
    raw_v2: str | None = None  # the recorded v2 frame text, sent unchanged when possible


class Book:
    """Price levels of one symbol as decimal strings (exactly what Gemini sends)."""

    __slots__ = ("bids", "asks")

    def __init__(self) -> None:
        self.bids: dict[str, str] = {}
        self.asks: dict[str, str] = {}

    def apply(self, side: str, price: str, quantity: str) -> None:
        levels = self.bids if side == "buy" else self.asks
        if Decimal(quantity) == 0:
            levels.pop(price, None)
        else:
            levels[price] = quantity

    def clear(self) -> None:
        self.bids.clear()
        self.asks.clear()

    def sorted_levels(self, side: str) -> list[tuple[str, str]]:
        """Best first: bids high to low, asks low to high."""
        levels = self.bids if side == "bid" else self.asks
        return sorted(levels.items(), key=lambda kv: Decimal(kv[0]), reverse=side == "bid")

    def snapshot_changes(self) -> list[list[str]]:
        return ([["buy", p, q] for p, q in self.sorted_levels("bid")] +
                [["sell", p, q] for p, q in self.sorted_levels("ask")])


class Market:
    """Books and recent trades per symbol; also the venue's ``BookSource`` for REST fills."""

    def __init__(self, listed: set[str] | None = None) -> None:
        self.books: dict[str, Book] = {}
        self.recent_trades: dict[str, deque] = {}
        self.events_applied = 0
        # The symbols the venue trades before their first book arrives (Gemini lists a
        # symbol whether or not its market has moved yet).
        self.listed: set[str] = set(listed or ())

    def apply(self, event: MarketEvent) -> None:
        book = self.books.get(event.symbol)
        if book is None:
            book = self.books[event.symbol] = Book()
            self.recent_trades[event.symbol] = deque(maxlen=RECENT_TRADES)
        if event.snapshot:
            book.clear()
        for side, price, quantity in event.changes:
            book.apply(side, price, quantity)
        self.recent_trades[event.symbol].extend(event.trades)
        self.events_applied += 1

    def has_book(self, symbol: str) -> bool:
        return symbol in self.books

    # BookSource for the REST exchange
    def symbols(self) -> set[str]:
        return set(self.books) | self.listed

    def levels(self, symbol: str, side: str) -> list[tuple[Decimal, Decimal]]:
        book = self.books.get(symbol)
        if book is None:
            return []
        return [(Decimal(p), Decimal(q)) for p, q in book.sorted_levels(side)]


# --------------------------------------------------------------------------- sources


def capture_events(path: str | Path) -> Iterator[MarketEvent]:
    """The market events of a recorded v2 capture, in order (heartbeats dropped: the
    venue sends its own)."""
    seen: set[str] = set()
    for line in read_capture(path):
        if line.kind != "recv":
            continue
        frame = json.loads(line.text)
        kind = frame.get("type")
        at_s = line.received_us / 1e6
        if kind == "l2_updates":
            symbol = frame["symbol"]
            snapshot = symbol not in seen
            seen.add(symbol)
            yield MarketEvent(symbol, frame["changes"], frame.get("trades") or [], snapshot,
                              at_s=at_s, raw_v2=line.text)
        elif kind == "trade":
            yield MarketEvent(frame["symbol"], [], [frame], False, ts_ms=frame["timestamp"],
                              at_s=at_s, raw_v2=line.text)
        elif kind != "heartbeat":
            raise PipelineError(f"{path}:{line.line_no}: unexpected frame type {kind!r}")


def looped_capture_events(path: str | Path) -> Iterator[MarketEvent]:
    """The capture again and again, each pass moved past the one before it: receive and
    exchange times by the capture's span plus a second, trade ids by its id range. A looped
    demo then looks like a market that goes on (bars keep closing, trade ids keep rising)
    instead of the same thirty seconds repeated, which every time-keyed consumer would drop
    as late or duplicate. The snapshot's recent trades are history, sent on the first pass
    only."""
    events = list(capture_events(path))
    if not events:
        return
    span_s = max(e.at_s for e in events) - min(e.at_s for e in events) + 1.0
    tids = [t["event_id"] for e in events for t in e.trades]
    tid_span = max(tids) - min(tids) + 1 if tids else 0
    yield from events
    passes = 1
    while True:
        for event in events:
            yield _shifted(event, passes * span_s, passes * round(span_s * 1000),
                           passes * tid_span)
        passes += 1


def _shifted(event: MarketEvent, seconds: float, ms: int, tids: int) -> MarketEvent:
    trades = [] if event.snapshot else [
        {**t, "timestamp": t["timestamp"] + ms, "event_id": t["event_id"] + tids}
        for t in event.trades]
    raw = None
    if event.raw_v2 is not None:
        frame = json.loads(event.raw_v2)
        if frame.get("type") == "trade":
            frame = trades[0]
        else:
            frame["trades"] = trades
        raw = json.dumps(frame, separators=(",", ":"))
    return replace(event, trades=trades, ts_ms=event.ts_ms + ms if event.ts_ms else 0,
                   at_s=event.at_s + seconds, raw_v2=raw)


# Tick sizes and starting prices for generated books (Gemini's real ticks for these).
_TICKS = {"BTCUSD": ("0.01", "34000"), "ETHUSD": ("0.01", "1900"), "ETHBTC": ("0.00001", "0.055"),
          "LTCUSD": ("0.01", "130"), "SOLUSD": ("0.001", "35"), "DOGEUSD": ("0.00001", "0.25")}
_DEFAULT_TICK = ("0.0001", "10")


class _GenBook:
    """A generated book held in integer ticks and integer quantity units (1e-8)."""

    def __init__(self, symbol: str, rng: random.Random, depth: int) -> None:
        tick, start = _TICKS.get(symbol, _DEFAULT_TICK)
        self.symbol = symbol
        self.decimals = len(tick.split(".")[1]) if "." in tick else 0
        self.tick = Decimal(tick)
        mid = int(Decimal(start) / self.tick)
        self.bids = {mid - i: rng.randint(1, 500) * 10**6 for i in range(1, depth + 1)}
        self.asks = {mid + i: rng.randint(1, 500) * 10**6 for i in range(1, depth + 1)}
        self.best_bid, self.best_ask = mid - 1, mid + 1

    def refresh_best(self) -> None:
        self.best_bid, self.best_ask = max(self.bids), min(self.asks)

    def price(self, ticks: int) -> str:
        if self.decimals == 0:
            return str(ticks)
        whole, frac = divmod(ticks, 10**self.decimals)
        return f"{whole}.{frac:0{self.decimals}d}"

    @staticmethod
    def qty(units: int) -> str:
        whole, frac = divmod(units, 10**8)
        return f"{whole}.{frac:08d}".rstrip("0").rstrip(".") if frac else str(whole)


def generated_events(symbols: list[str], seed: int = 1, depth: int = 50,
                     start_ms: int = 1_700_000_000_000) -> Iterator[MarketEvent]:
    """An endless, reproducible stream of realistic book activity for ``symbols``.

    Each symbol starts with ``depth`` levels a side at its tick size. Then, in bursts:
    levels near the top change size, appear or disappear (never crossing the book), and
    market orders print trades that consume the top levels. Same seed, same stream.
    """
    rng = random.Random(seed)
    books = {s: _GenBook(s.upper(), rng, depth) for s in symbols}
    for book in books.values():
        yield MarketEvent(book.symbol, [["buy", book.price(t), book.qty(q)]
                                        for t, q in sorted(book.bids.items(), reverse=True)] +
                          [["sell", book.price(t), book.qty(q)]
                           for t, q in sorted(book.asks.items())],
                          snapshot=True, ts_ms=start_ms)
    names = list(books)
    tid, now_ms = 10**10, start_ms
    rand = rng.random

    def randrange(n: int) -> int:  # random.randrange is ~10x slower, and this stays seeded
        return int(rand() * n)

    while True:
        book = books[names[randrange(len(names))]]
        now_ms += randrange(4)
        if rand() < 0.12:
            tid = yield from _market_order(book, rng, tid, now_ms)
            continue
        changes = []
        for _ in range((1, 1, 2, 3, 5)[randrange(5)]):
            bid = rand() < 0.5
            levels, sign = (book.bids, -1) if bid else (book.asks, 1)
            best = book.best_bid if bid else book.best_ask
            # thin books refill deeper down; full ones churn near the top
            reach = depth if len(levels) < depth else 20
            ticks = best + sign * randrange(reach)
            if rand() < 0.3 and len(levels) > depth // 2 and ticks in levels:
                del levels[ticks]
                if ticks == best:
                    book.refresh_best()
                changes.append(["buy" if bid else "sell", book.price(ticks), "0"])
                continue
            if rand() < 0.25:  # improve the price by a tick, never crossing
                ticks = (min(best + 1, book.best_ask - 1) if bid
                         else max(best - 1, book.best_bid + 1))
            units = (1 + randrange(500)) * 10**6 + randrange(10**6)
            levels[ticks] = units
            if bid and ticks > book.best_bid:
                book.best_bid = ticks
            elif not bid and ticks < book.best_ask:
                book.best_ask = ticks
            changes.append(["buy" if bid else "sell", book.price(ticks), book.qty(units)])
        yield MarketEvent(book.symbol, changes, ts_ms=now_ms)


def _market_order(book: _GenBook, rng: random.Random, tid: int, now_ms: int):
    """A market order that trades through up to three levels; returns the last trade id."""
    side = "buy" if rng.random() < 0.5 else "sell"
    levels = book.asks if side == "buy" else book.bids
    book_side = "sell" if side == "buy" else "buy"
    changes, trades = [], []
    wanted = rng.randint(1, 800) * 10**6
    for ticks in sorted(levels, reverse=side == "sell")[:3]:
        take = min(wanted, levels[ticks])
        tid += 1
        trades.append({"type": "trade", "symbol": book.symbol, "event_id": tid,
                       "timestamp": now_ms, "price": book.price(ticks),
                       "quantity": book.qty(take), "side": side})
        left = levels[ticks] - take
        wanted -= take
        if left == 0 and len(levels) > 5:
            del levels[ticks]
            changes.append([book_side, book.price(ticks), "0"])
        else:
            levels[ticks] = left or 10**6  # a hidden order refills an emptied last level
            changes.append([book_side, book.price(ticks), book.qty(levels[ticks])])
        if wanted <= 0:
            break
    book.refresh_best()
    yield MarketEvent(book.symbol, changes, trades, ts_ms=now_ms)
    return tid


def render_v2(event: MarketEvent, full_book: list[list[str]] | None = None,
              recent: list[dict] | None = None) -> list[str]:
    """The v2 frames for an event (or, with ``full_book``, a snapshot of the book)."""
    if full_book is not None:
        return [json.dumps({"type": "l2_updates", "symbol": event.symbol, "changes": full_book,
                            "trades": recent or [], "auction_events": []},
                           separators=(",", ":"))]
    if event.raw_v2 is not None:
        return [event.raw_v2]
    # Hand-built: symbols, sides and decimal strings never need JSON escaping, and this
    # is the venue's hot path (json.dumps costs twice as much).
    frames = [_TRADE % (t["symbol"], t["event_id"], t["timestamp"], t["price"], t["quantity"],
                        t["side"]) for t in event.trades]
    if event.changes:
        frames.append(_L2 % (event.symbol, ",".join(_CHANGE % (c[0], c[1], c[2])
                                                    for c in event.changes)))
    return frames


_TRADE = ('{"type":"trade","symbol":"%s","event_id":%d,"timestamp":%d,"price":"%s",'
          '"quantity":"%s","side":"%s"}')
_L2 = '{"type":"l2_updates","symbol":"%s","changes":[%s]}'
_CHANGE = '["%s","%s","%s"]'
