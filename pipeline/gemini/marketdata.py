"""Gemini market-data frames to the pipeline's records. Pure logic: no I/O, no Kafka.

v2 (``/v2/marketdata``, ``l2`` subscription): the first ``l2_updates`` of a symbol on a
connection is its full book (a snapshot) and carries recent ``trades``; later ones are
incremental. ``trade`` frames are trades; ``heartbeat`` frames carry nothing to keep.
Prices and quantities stay the exact decimal strings Gemini sent (see schemas/README.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

DECIMAL = re.compile(r"^\d+(\.\d+)?$")
_BOOK_SIDES = {"buy": "BID", "bid": "BID", "sell": "ASK", "ask": "ASK"}
_TAKER_SIDES = {"buy": "BUY", "sell": "SELL"}


class FrameError(ValueError):
    """A frame that is not valid Gemini market data; the message says what is wrong."""


class SequenceGap(Exception):
    """A v1 feed skipped a ``socket_sequence``: frames were lost, the book is unreliable."""


@dataclass(frozen=True, slots=True)
class Normalized:
    topic: str  # catalog name: "md.l2" or "md.trades"
    key: str  # the symbol
    value: dict[str, Any]  # an L2Update or Trade record


def _decimal(value: Any, what: str) -> str:
    if not isinstance(value, str) or not DECIMAL.match(value):
        raise FrameError(f"{what} {value!r} is not a non-negative decimal string")
    return value


def _symbol(frame: dict) -> str:
    symbol = frame.get("symbol")
    if not isinstance(symbol, str) or not symbol.isalnum():
        raise FrameError(f"missing or invalid symbol {symbol!r}")
    return symbol.upper()


class V2Normalizer:
    """Normalizes the frames of one v2 connection, in order.

    It numbers frames (``sequence``) and marks the first ``l2_updates`` per symbol as the
    snapshot. Make a new one for every connection: a new connection starts new epochs.
    """

    def __init__(self, connection_id: str) -> None:
        self.connection_id = connection_id
        self.sequence = -1
        self._books: set[str] = set()

    def normalize_text(self, text: str, received_us: int) -> list[Normalized]:
        try:
            frame = json.loads(text)
        except ValueError as exc:
            self.sequence += 1
            raise FrameError(f"not JSON: {exc}") from None
        return self.normalize(frame, received_us)

    def normalize(self, frame: Any, received_us: int) -> list[Normalized]:
        self.sequence += 1
        if not isinstance(frame, dict):
            raise FrameError(f"expected a JSON object, got {type(frame).__name__}")
        kind = frame.get("type")
        if kind == "l2_updates":
            return self._l2(frame, received_us)
        if kind == "trade":
            return [self._trade(frame, received_us, from_snapshot=False)]
        if kind in ("heartbeat", "subscription_ack"):
            return []
        raise FrameError(f"unknown frame type {kind!r}")

    def _l2(self, frame: dict, received_us: int) -> list[Normalized]:
        symbol = _symbol(frame)
        raw_changes = frame.get("changes")
        if not isinstance(raw_changes, list):
            raise FrameError(f"{symbol}: l2_updates without a changes list")
        changes = []
        for i, change in enumerate(raw_changes):
            if not (isinstance(change, list) and len(change) == 3):
                raise FrameError(f"{symbol}: change {i} is not [side, price, quantity]: {change!r}")
            side = _BOOK_SIDES.get(change[0])
            if side is None:
                raise FrameError(f"{symbol}: change {i} has unknown side {change[0]!r}")
            changes.append({"side": side,
                            "price": _decimal(change[1], f"{symbol}: change {i} price"),
                            "quantity": _decimal(change[2], f"{symbol}: change {i} quantity")})
        snapshot = symbol not in self._books
        self._books.add(symbol)
        out = [Normalized("md.l2", symbol, {
            "symbol": symbol, "snapshot": snapshot, "changes": changes, "exchange_ts_ms": None,
            "received_ts_us": received_us, "connection_id": self.connection_id,
            "sequence": self.sequence, "event_id": None})]
        for trade in frame.get("trades") or ():
            out.append(self._trade(trade, received_us, from_snapshot=True))
        return out

    def _trade(self, frame: dict, received_us: int, from_snapshot: bool) -> Normalized:
        symbol = _symbol(frame)
        trade_id = frame.get("event_id", frame.get("tid"))
        timestamp = frame.get("timestamp")
        if not isinstance(trade_id, int) or not isinstance(timestamp, int):
            raise FrameError(f"{symbol}: trade without integer event_id and timestamp: {frame!r}")
        return Normalized("md.trades", symbol, {
            "symbol": symbol, "trade_id": trade_id,
            "price": _decimal(frame.get("price"), f"{symbol}: trade price"),
            "quantity": _decimal(frame.get("quantity"), f"{symbol}: trade quantity"),
            "taker_side": _TAKER_SIDES.get(frame.get("side"), "UNKNOWN"),
            "exchange_ts_ms": timestamp, "received_ts_us": received_us,
            "connection_id": self.connection_id, "sequence": self.sequence,
            "from_snapshot": from_snapshot})


class V1Normalizer:
    """Normalizes the frames of one v1 connection (``/v1/marketdata/{symbol}``).

    v1 numbers every message with ``socket_sequence`` from 0; a gap raises
    :class:`SequenceGap` so the caller resubscribes. The first ``update`` (its changes
    have reason ``initial``) is the snapshot.
    """

    def __init__(self, connection_id: str, symbol: str) -> None:
        self.connection_id = connection_id
        self.symbol = symbol.upper()
        self.sequence = -1
        self._snapshot_seen = False

    def normalize_text(self, text: str, received_us: int) -> list[Normalized]:
        try:
            frame = json.loads(text)
        except ValueError as exc:
            raise FrameError(f"not JSON: {exc}") from None
        return self.normalize(frame, received_us)

    def normalize(self, frame: Any, received_us: int) -> list[Normalized]:
        if not isinstance(frame, dict):
            raise FrameError(f"expected a JSON object, got {type(frame).__name__}")
        sequence = frame.get("socket_sequence")
        if not isinstance(sequence, int):
            raise FrameError(f"{self.symbol}: frame without an integer socket_sequence")
        if sequence != self.sequence + 1:
            expected, self.sequence = self.sequence + 1, sequence
            raise SequenceGap(f"{self.symbol}: socket_sequence {sequence} after "
                              f"{expected - 1} on connection {self.connection_id}")
        self.sequence = sequence
        kind = frame.get("type")
        if kind == "heartbeat":
            return []
        if kind != "update":
            raise FrameError(f"{self.symbol}: unknown frame type {kind!r}")
        events = frame.get("events")
        if not isinstance(events, list):
            raise FrameError(f"{self.symbol}: update without an events list")
        timestamp_ms = frame.get("timestampms")
        event_id = frame.get("eventId")
        changes, trades, initial = [], [], False
        for i, event in enumerate(events):
            etype = event.get("type") if isinstance(event, dict) else None
            if etype == "change":
                side = _BOOK_SIDES.get(event.get("side"))
                if side is None:
                    raise FrameError(f"{self.symbol}: event {i} has unknown side {event.get('side')!r}")
                changes.append({"side": side,
                                "price": _decimal(event.get("price"), f"{self.symbol}: event {i} price"),
                                "quantity": _decimal(event.get("remaining"),
                                                     f"{self.symbol}: event {i} remaining")})
                initial = initial or event.get("reason") == "initial"
            elif etype == "trade":
                tid = event.get("tid")
                if not isinstance(tid, int) or not isinstance(timestamp_ms, int):
                    raise FrameError(f"{self.symbol}: trade event {i} without tid/timestampms")
                maker = event.get("makerSide")
                trades.append(Normalized("md.trades", self.symbol, {
                    "symbol": self.symbol, "trade_id": tid,
                    "price": _decimal(event.get("price"), f"{self.symbol}: trade {i} price"),
                    "quantity": _decimal(event.get("amount"), f"{self.symbol}: trade {i} amount"),
                    # the maker rested on one side, so the taker came from the other
                    "taker_side": {"bid": "SELL", "ask": "BUY"}.get(maker, "UNKNOWN"),
                    "exchange_ts_ms": timestamp_ms, "received_ts_us": received_us,
                    "connection_id": self.connection_id, "sequence": sequence,
                    "from_snapshot": False}))
            elif etype in ("auction_open", "auction_indicative", "auction_result", "block_trade"):
                continue  # auctions carry no book change
            else:
                raise FrameError(f"{self.symbol}: event {i} of unknown type {etype!r}")
        out = []
        if changes or not self._snapshot_seen:
            snapshot = not self._snapshot_seen
            if snapshot and not initial and changes:
                raise FrameError(f"{self.symbol}: first update is not the initial book")
            self._snapshot_seen = True
            out.append(Normalized("md.l2", self.symbol, {
                "symbol": self.symbol, "snapshot": snapshot, "changes": changes,
                "exchange_ts_ms": timestamp_ms if isinstance(timestamp_ms, int) else None,
                "received_ts_us": received_us, "connection_id": self.connection_id,
                "sequence": sequence, "event_id": event_id if isinstance(event_id, int) else None}))
        return out + trades
