"""Book changes applied per second in the book logic alone (no Kafka), on the generator's
stream and on the real capture, next to two baselines fed the same changes in the same
run: a plain dict update per change (the floor) and the ``order-book`` package (the C
book cryptofeed uses) with Decimal prices. Target: >= 1,000,000 changes/s and no slower
than ``order-book``.
"""

from __future__ import annotations

import itertools
import json
from decimal import Decimal
from pathlib import Path

from order_book import OrderBook

from bench.figures import Figure, best_rate
from pipeline.orderbook import L2Book
from pipeline.venue.market import generated_events

CAPTURE = Path(__file__).resolve().parents[2] / "shared" / "data" / \
    "gemini_v2_l2_capture_2021-06-24.txt"
Updates = list[tuple[str, bool, list[dict]]]


def generated(events: int) -> Updates:
    return [(e.symbol, e.snapshot, [{"side": "BID" if s == "buy" else "ASK", "price": p,
                                     "quantity": q} for s, p, q in e.changes])
            for e in itertools.islice(generated_events(["BTCUSD", "ETHUSD", "SOLUSD"], 3),
                                      events)]


def captured(events: int) -> Updates:
    """The capture's L2 frames, repeated to ``events`` updates (each pass starts with its
    snapshots again, so the books stay those of the capture)."""
    from pipeline.gemini.capture import received_frames

    once = []
    seen: set[str] = set()
    for frame in received_frames(CAPTURE):
        data = json.loads(frame.text)
        if data["type"] == "l2_updates":
            once.append((data["symbol"], data["symbol"] not in seen,
                         [{"side": "BID" if s == "buy" else "ASK", "price": p, "quantity": q}
                          for s, p, q in data["changes"]]))
            seen.add(data["symbol"])
    return list(itertools.islice(itertools.cycle(once), events))


def ours(updates: Updates) -> None:
    books: dict[str, L2Book] = {}
    for symbol, snapshot, changes in updates:
        book = books.get(symbol) or books.setdefault(symbol, L2Book(symbol))
        if snapshot:
            book.apply_snapshot(changes)
        else:
            book.apply(changes)


def dict_floor(updates: Updates) -> None:
    books: dict[str, tuple[dict, dict]] = {}
    for symbol, _, changes in updates:
        bids, asks = books.get(symbol) or books.setdefault(symbol, ({}, {}))
        for c in changes:
            (bids if c["side"] == "BID" else asks)[c["price"]] = c["quantity"]


def apply_to_order_book(book: OrderBook, changes: list[dict]) -> None:
    """Apply L2 changes to cryptofeed's ``order-book`` with exact ``Decimal`` prices (the
    peer our book is measured and checked against)."""
    for c in changes:
        side = book.bids if c["side"] == "BID" else book.asks
        price, quantity = Decimal(c["price"]), Decimal(c["quantity"])
        if quantity == 0:
            if price in side:
                del side[price]
        else:
            side[price] = quantity


def order_book(updates: Updates) -> None:
    books: dict[str, OrderBook] = {}
    for symbol, snapshot, changes in updates:
        book = books.get(symbol)
        if book is None or snapshot:
            book = books[symbol] = OrderBook()
        apply_to_order_book(book, changes)


def run(events: int) -> list[Figure]:
    figures = []
    streams = [("generator", generated(events))]
    if CAPTURE.exists():
        streams.append(("real capture", captured(max(events // 5, 655))))
    for name, updates in streams:
        changes = sum(len(c) for _, _, c in updates)
        rates = {fn.__name__: best_rate(lambda: fn(updates), changes)
                 for fn in (ours, dict_floor, order_book)}
        figures += [
            Figure(f"book changes/s ({name})", rates["ours"], "changes/s", changes,
                   "order-book (C, Decimal prices)", rates["order_book"],
                   ">= 1,000,000/s and ratio >= 1"),
            Figure(f"book changes/s ({name}) vs the floor", rates["ours"], "changes/s", changes,
                   "plain dict update per change", rates["dict_floor"], ""),
        ]
    return figures
