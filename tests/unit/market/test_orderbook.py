"""The L2 book and the orderbook group, against the real capture and a real broker.

The tests that need Kafka: tests/integration/test_orderbook.py."""

from __future__ import annotations

import itertools
import random
from decimal import Decimal

import pytest
from order_book import OrderBook

from bench.book import apply_to_order_book
from pipeline.market.orderbook import BookError, L2Book
from pipeline.venue.market import generated_events
from tests.support.books import as_decimals


def ch(side: str, price: str, quantity: str) -> dict:
    return {"side": side, "price": price, "quantity": quantity}


def test_changes_set_and_zero_removes_levels_exactly():
    book = L2Book("BTCUSD")
    book.apply_snapshot([ch("BID", "100.10", "1.5"), ch("BID", "99.9", "2"),
                         ch("ASK", "100.2", "0.00001"), ch("ASK", "101", "3")])
    assert book.best_bid() == ("100.1", "1.5") and book.best_ask() == ("100.2", "0.00001")
    book.apply([ch("BID", "100.1", "0"), ch("ASK", "100.20", "4.250")])
    assert book.best_bid() == ("99.9", "2") and book.best_ask() == ("100.2", "4.250")
    assert book.size_at("ASK", "100.200") == "4.250" and book.size_at("BID", "100.1") is None
    assert book.mid() == Decimal("100.05") and book.spread() == Decimal("0.3")
    assert book.depth(1) == ([("99.9", "2")], [("100.2", "4.250")])
    assert book.depth() == ([("99.9", "2")], [("100.2", "4.250"), ("101", "3")])
    book.apply([ch("BID", "99.9", "0.000")])  # any spelling of zero removes
    assert book.best_bid() is None and book.state() == "one-sided"


def test_crossed_and_locked_books_are_detected():
    book = L2Book("X")
    book.apply_snapshot([ch("BID", "10", "1"), ch("ASK", "11", "1")])
    assert book.state() == "ok"
    book.apply([ch("BID", "11.0", "1")])
    assert book.state() == "locked"
    book.apply([ch("BID", "11.5", "1")])
    assert book.state() == "crossed"


def test_a_snapshot_replaces_the_book():
    book = L2Book("X")
    book.apply_snapshot([ch("BID", "10", "1"), ch("ASK", "11", "1")])
    book.apply_snapshot([ch("BID", "9", "2")])
    assert book.levels() == {"BID": {"9": "2"}, "ASK": {}}


@pytest.mark.parametrize("change,match", [(ch("MID", "1", "1"), "unknown side"),
                                          (ch("BID", "1", "-2"), "negative quantity"),
                                          (ch("BID", "0", "1"), "not a positive"),
                                          (ch("ASK", "abc", "1"), "not a decimal")])
def test_bad_changes_are_refused(change, match):
    with pytest.raises(BookError, match=match):
        L2Book("X").apply([change])


def test_the_book_equals_cryptofeeds_order_book_on_a_long_generated_stream():
    ours: dict[str, L2Book] = {}
    theirs: dict[str, OrderBook] = {}
    rng = random.Random(3)
    for event in itertools.islice(generated_events(["BTCUSD", "ETHBTC"], seed=9), 60_000):
        book = ours.setdefault(event.symbol, L2Book(event.symbol))
        other = theirs.setdefault(event.symbol, OrderBook())
        changes = [ch("BID" if s == "buy" else "ASK", p, q) for s, p, q in event.changes]
        book.apply_snapshot(changes) if event.snapshot else book.apply(changes)
        apply_to_order_book(other, changes)
        if rng.random() < 0.02:  # check the top often, the whole book sometimes
            bids, asks = book.depth(5)
            assert [(Decimal(p), Decimal(q)) for p, q in bids] == \
                [other.bids.index(i) for i in range(min(5, len(other.bids)))]
            assert [(Decimal(p), Decimal(q)) for p, q in asks] == \
                [other.asks.index(i) for i in range(min(5, len(other.asks)))]
    for symbol, book in ours.items():
        assert as_decimals(book) == {"BID": dict(theirs[symbol].bids.to_dict()),
                                     "ASK": dict(theirs[symbol].asks.to_dict())}


