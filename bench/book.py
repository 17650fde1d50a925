"""Book changes applied per second in the book logic alone (no Kafka), on the generator's
stream and on the real capture, next to two baselines fed the same changes in the same
run: a plain dict update per change (the floor) and the ``order-book`` package (the C
book cryptofeed uses) with Decimal prices. Target: >= 1,000,000 changes/s and no slower
than ``order-book``.

And the simulated exchange on the same streams: the book policy (what every consumer of
``md.l2`` runs) with the simulator watching two resting orders a side per symbol, queue
model on (placed at the second and fourth levels of each side's first snapshot, and
placed again where they filled), next to the bare book and to the policy alone.
"""

from __future__ import annotations

import itertools
import json
from decimal import Decimal
from pathlib import Path

from order_book import OrderBook

from bench.figures import Figure, best_rate
from pipeline.core.vocabulary import OrderType, Side
from pipeline.market.book_policy import IGNORED, TOP_CHANGED, BookPolicy
from pipeline.market.orderbook import L2Book
from pipeline.trading.orders import Order
from pipeline.trading.simulator import SimulatedExchange, SimulatorConfig
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


def _records(updates: Updates) -> list[dict]:
    return [{"symbol": s, "snapshot": snap, "changes": changes, "exchange_ts_ms": None,
             "received_ts_us": i, "connection_id": "bench", "sequence": i, "event_id": None}
            for i, (s, snap, changes) in enumerate(updates)]


def policy_alone(records: list[dict]) -> None:
    policy = BookPolicy(10)
    for i, record in enumerate(records):
        policy.apply(record, 0, i)


def simulated(records: list[dict]) -> int:
    """The policy and the simulator with two resting orders a side; returns the fills."""
    policy = BookPolicy(10)
    sim = SimulatedExchange(policy.books, SimulatorConfig(queue="risk-averse"))
    resting: dict[str, int] = {}
    fills = 0
    for i, record in enumerate(records):
        symbol = record["symbol"]
        code = policy.apply(record, 0, i)[0]
        if code == IGNORED:
            continue
        events = sim.on_book(symbol, None if record["snapshot"] else record["changes"], i,
                             code == TOP_CHANGED)
        if events:
            fills += sum(1 for e in events if e["kind"] == "FILLED")
            resting[symbol] = resting.get(symbol, 4) - sum(1 for e in events
                                                           if e["kind"] == "FILLED")
        if resting.get(symbol, 0) < 4:
            book = policy.books[symbol]
            bids, asks = book.depth(4)
            for side, levels in ((Side.BUY, bids), (Side.SELL, asks)):
                for price, _ in levels[1:4:2]:
                    order = Order(f"b{i}{side}{price}", "bench", symbol, side, OrderType.LIMIT,
                                  Decimal(price), Decimal("0.001"))
                    sim.submit(order, i)
            resting[symbol] = len(sim.open_orders(symbol=symbol))
    return fills


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
        rates = {fn.__name__: best_rate(lambda: fn(updates), changes)  # noqa: B023 - best_rate calls it at once
                 for fn in (ours, dict_floor, order_book)}
        figures += [
            Figure(f"book changes/s ({name})", rates["ours"], "changes/s", changes,
                   "order-book (C, Decimal prices)", rates["order_book"],
                   ">= 1,000,000/s and ratio >= 1"),
            Figure(f"book changes/s ({name}) vs the floor", rates["ours"], "changes/s", changes,
                   "plain dict update per change", rates["dict_floor"], ""),
        ]
        records = _records(updates)
        policy = best_rate(lambda: policy_alone(records), changes)  # noqa: B023 - best_rate calls it at once
        sim = best_rate(lambda: simulated(records), changes)  # noqa: B023 - best_rate calls it at once
        figures += [
            Figure(f"simulator: policy + 2 resting orders a side, queue on ({name})", sim,
                   "changes/s", changes, "bare book (L2Book.apply)", rates["ours"], ""),
            Figure(f"simulator vs the book policy alone ({name})", sim, "changes/s", changes,
                   "book policy alone (snapshots, health, depth index)", policy, ""),
        ]
    return figures
