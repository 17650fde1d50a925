"""A deliberately naive reference book, for comparing what reached Kafka with the source."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

from pipeline.gemini.capture import received_frames

Books = dict[str, dict[str, dict[Decimal, Decimal]]]  # symbol -> side -> price -> qty


def apply(books: Books, symbol: str, side: str, price: str, quantity: str) -> None:
    levels = books.setdefault(symbol, {"BID": {}, "ASK": {}})[side]
    if Decimal(quantity) == 0:
        levels.pop(Decimal(price), None)
    else:
        levels[Decimal(price)] = Decimal(quantity)


def books_from_records(l2_records: list[dict]) -> Books:
    """Apply L2Update records in order; a snapshot replaces the symbol's book."""
    books: Books = {}
    for record in l2_records:
        if record["snapshot"]:
            books[record["symbol"]] = {"BID": {}, "ASK": {}}
        for change in record["changes"]:
            apply(books, record["symbol"], change["side"], change["price"], change["quantity"])
    return books


def books_from_capture(path: Path) -> Books:
    """Apply the capture's raw v2 frames directly."""
    books: Books = {}
    for frame in received_frames(path):
        data = json.loads(frame.text)
        if data["type"] != "l2_updates":
            continue
        for side, price, quantity in data["changes"]:
            apply(books, data["symbol"], "BID" if side == "buy" else "ASK", price, quantity)
    return books


def as_decimals(book) -> dict:
    """An ``L2Book``'s levels as the reference book's shape (Decimal prices and sizes)."""
    return {side: {Decimal(p): Decimal(q) for p, q in levels.items()}
            for side, levels in book.levels().items()}


def follow_capture(symbol: str, records: list[dict], raw_frames: list[dict]) -> Books:
    """Apply ``records`` (a symbol's L2Update records in order) to the pipeline's book and
    the capture's raw v2 ``l2_updates`` of that symbol to the reference, one pair at a
    time, asserting the two books are equal after every update; the reference at the end."""
    from pipeline.market.orderbook import L2Book

    book, reference = L2Book(symbol), {}
    assert len(records) == len(raw_frames), symbol
    for n, (record, raw) in enumerate(zip(records, raw_frames)):
        book.apply_snapshot(record["changes"]) if record["snapshot"] else \
            book.apply(record["changes"])
        for side, price, quantity in raw["changes"]:
            apply(reference, symbol, "BID" if side == "buy" else "ASK", price, quantity)
        assert as_decimals(book) == reference[symbol], f"{symbol} after update {n}"
    return reference
