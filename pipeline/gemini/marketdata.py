"""Gemini market-data frames to the pipeline's records. Pure logic: no I/O, no Kafka.

Three feeds, one normalizer each, all with ``normalize_text``/``normalize`` returning
:class:`Normalized` records:

- ``WsNormalizer``, Gemini's new WebSocket API (``wss://ws.gemini.com``): ``depthUpdate``
  frames of ``{symbol}@depth@100ms`` with Binance-style update ids, ``trade`` frames of
  ``{symbol}@trade``, the initial book that the connection's ``?snapshot=`` parameter
  delivers, and method responses (``{id,status,result}`` / ``{id,status,error}``), which
  carry no data.
- ``V2Normalizer``, the archived ``/v2/marketdata`` (``l2`` subscription): the first
  ``l2_updates`` of a symbol on a connection is its full book (a snapshot) and carries
  recent ``trades``; later ones are incremental. ``trade`` frames are trades;
  ``heartbeat`` frames carry nothing to keep; ``auction_*`` frames are skipped (counted).
- ``V1Normalizer``, the archived per-symbol ``/v1/marketdata/{symbol}`` with
  ``socket_sequence``.

Prices and quantities stay the exact decimal strings Gemini sent (see schemas/README.md).
Frames that are valid but carry nothing the pipeline keeps (auctions, a type or stream
this code does not know) are counted in ``skipped`` by kind, never dead-lettered; frames
that are not valid market data raise :class:`FrameError` (the producer dead-letters them).

The new API's initial book (/work/gemini_ws_spec.md section 4.3, from Gemini's AsyncAPI
contract): on a connection opened with ``?snapshot=-1`` (or N), the FIRST ``depthUpdate``
of a symbol after subscribing its depth stream holds absolute levels: the snapshot. There
is no separate snapshot message and no marker, so the caller says when one is due
(:meth:`WsNormalizer.expect_snapshot`).

The update-id rule. Gemini documents only "if a frame's U skips ahead of the last applied
u, discard the book and resubscribe"; this module uses Binance's rule for the first update
after a snapshot and applies it to every update. With L the last applied ``u``:

- ``u <= L``: entirely older, skipped (counted);
- ``U <= L + 1 <= u``: applied. For later updates Binance's contiguity is ``U == L + 1``;
  the rule also accepts an overlap such as ``U == L``, which third parties observe on
  every frame of Gemini's live feed: levels are absolute, so applying one twice is harmless
  (a strict ``U == L + 1`` would resnapshot on every live frame);
- ``U > L + 1``: an :class:`UpdateGap`. The symbol's book is unreliable: its updates are
  skipped until a new snapshot, and the caller resubscribes its depth stream.

ASSUMPTION (not documented): after a gap the caller sends UNSUBSCRIBE then SUBSCRIBE;
requests on one connection are handled in order, so once the UNSUBSCRIBE's answer arrives
no frame of the old subscription follows, and the symbol's next ``depthUpdate`` is the new
snapshot (see ``expect_snapshot(symbol, after=...)``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pipeline.core.decimals import UNSIGNED
from pipeline.core.vocabulary import BUY_WIRE, SELL_WIRE, BookSide, TakerSide

log = logging.getLogger(__name__)

# ASCII digits only, the whole string (``\d`` would take other scripts' digits, ``$`` a
# trailing newline).
DECIMAL = UNSIGNED
LONG_MAX = 2**63 - 1  # Avro long: a larger id or time cannot be published
# The records' spellings as plain str (the values of the vocabulary's members).
_BID, _ASK = BookSide.BID.value, BookSide.ASK.value
_BUY, _SELL, _UNKNOWN = TakerSide.BUY.value, TakerSide.SELL.value, TakerSide.UNKNOWN.value
# Gemini's side words -> the book side of a level, the taker side of a trade.
_BOOK_SIDES = {BUY_WIRE: _BID, "bid": _BID, SELL_WIRE: _ASK, "ask": _ASK}
_TAKER_SIDES = {BUY_WIRE: _BUY, SELL_WIRE: _SELL}
_TAKER_OF_MAKER = {"bid": _SELL, "ask": _BUY}  # the maker rested on one side: the taker


class FrameError(ValueError):
    """A frame that is not valid Gemini market data; the message says what is wrong."""


class SequenceGap(Exception):
    """A v1 feed skipped a ``socket_sequence``: frames were lost, the book is unreliable."""


class UpdateGap(Exception):
    """A new-API ``depthUpdate`` does not continue its symbol's update ids: changes were
    lost, that symbol's book is unreliable until a new snapshot (other symbols are fine)."""

    def __init__(self, symbol: str, message: str) -> None:
        super().__init__(message)
        self.symbol = symbol


@dataclass(frozen=True, slots=True)
class Normalized:
    topic: str  # catalog name: "md.l2" or "md.trades"
    key: str  # the symbol
    value: dict[str, Any]  # an L2Update or Trade record


def _decimal(value: Any, what: str) -> str:
    if not isinstance(value, str) or not DECIMAL.fullmatch(value):
        raise FrameError(f"{what} {value!r} is not a non-negative decimal string")
    return value


def _symbol(frame: dict, key: str = "symbol") -> str:
    symbol = frame.get(key)
    if not isinstance(symbol, str) or not (symbol.isascii() and symbol.isalnum()):
        raise FrameError(f"missing or invalid symbol {symbol!r}")
    return symbol.upper()


def _long(value: Any) -> bool:
    """An integer an Avro long holds (JSON ``true`` is not one)."""
    return (isinstance(value, int) and not isinstance(value, bool)
            and -LONG_MAX - 1 <= value <= LONG_MAX)


def _lookup(table: dict[str, str], value: Any) -> str | None:
    """``table[value]`` for a string, else None (a JSON list or object is not hashable)."""
    return table.get(value) if isinstance(value, str) else None


def count_once(counter: Counter, kind: str, what: str) -> None:
    """Count a frame of ``kind`` that is not kept; log the first of each kind only."""
    if not counter[kind]:
        log.info("%s of kind %r: not kept (logged once, counted)", what, kind)
    counter[kind] += 1


def _skip(skipped: Counter, kind: str) -> list:
    """Count a frame (or event) that is valid but carries nothing kept; log a kind once."""
    count_once(skipped, kind, "Gemini market-data frames")
    return []


AUCTION_TYPES = ("auction_open", "auction_indicative", "auction_result")


class _Numbered:
    """What the one-connection normalizers share: every frame is numbered on its connection
    (``sequence``, also a frame that is not JSON) and must be a JSON object."""

    sequence: int

    def normalize_text(self, text: str, received_us: int) -> list[Normalized]:
        try:
            frame = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            self.sequence += 1
            raise FrameError(f"not JSON: {exc}") from None
        return self.normalize(frame, received_us)

    def normalize(self, frame: Any, received_us: int) -> list[Normalized]:
        raise NotImplementedError

    def _numbered(self, frame: Any) -> dict:
        self.sequence += 1
        if not isinstance(frame, dict):
            raise FrameError(f"expected a JSON object, got {type(frame).__name__}")
        return frame


class V2Normalizer(_Numbered):
    """Normalizes the frames of one v2 connection, in order.

    It numbers frames (``sequence``) and marks the first ``l2_updates`` per symbol as the
    snapshot. Make a new one for every connection: a new connection starts new epochs.
    ``skipped`` counts frames kept out of the records by kind (pass the feed's own to
    share it across connections).
    """

    def __init__(self, connection_id: str, skipped: Counter | None = None) -> None:
        self.connection_id = connection_id
        self.sequence = -1
        self.skipped = Counter() if skipped is None else skipped
        self._books: set[str] = set()

    def normalize(self, frame: Any, received_us: int) -> list[Normalized]:
        frame = self._numbered(frame)
        kind = frame.get("type")
        if kind == "l2_updates":
            return self._l2(frame, received_us)
        if kind == "trade":
            return [self._trade(frame, received_us, from_snapshot=False)]
        if kind in ("heartbeat", "subscription_ack"):
            return []
        if kind in AUCTION_TYPES:
            return _skip(self.skipped, kind)  # auctions carry no book change
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
            side = _lookup(_BOOK_SIDES, change[0])
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
            "sequence": self.sequence, "event_id": None, "first_update_id": None,
            "last_update_id": None, "exchange_ts_ns": None})]
        trades = frame.get("trades") or []
        if not isinstance(trades, list):
            raise FrameError(f"{symbol}: l2_updates trades is not a list")
        for trade in trades:
            out.append(self._trade(trade, received_us, from_snapshot=True))
        return out

    def _trade(self, frame: Any, received_us: int, from_snapshot: bool) -> Normalized:
        if not isinstance(frame, dict):
            raise FrameError(f"a trade is not a JSON object: {type(frame).__name__}")
        symbol = _symbol(frame)
        # Gemini's trade id is ``tid``; captures older than it (the 2021 one) only carry the
        # ``event_id`` of the event that printed the trade, unique per trade there too.
        trade_id = frame.get("tid", frame.get("event_id"))
        timestamp = frame.get("timestamp")
        if not _long(trade_id) or not _long(timestamp):
            raise FrameError(f"{symbol}: trade without integer tid/event_id and timestamp: "
                             f"{frame!r}")
        return Normalized("md.trades", symbol, {
            "symbol": symbol, "trade_id": trade_id,
            "price": _decimal(frame.get("price"), f"{symbol}: trade price"),
            "quantity": _decimal(frame.get("quantity"), f"{symbol}: trade quantity"),
            "taker_side": _lookup(_TAKER_SIDES, frame.get("side")) or _UNKNOWN,
            "exchange_ts_ms": timestamp, "received_ts_us": received_us,
            "connection_id": self.connection_id, "sequence": self.sequence,
            "from_snapshot": from_snapshot, "exchange_ts_ns": None})


class V1Normalizer:
    """Normalizes the frames of one v1 connection (``/v1/marketdata/{symbol}``).

    v1 numbers every message with ``socket_sequence`` from 0; a gap raises
    :class:`SequenceGap` so the caller resubscribes. The first ``update`` (its changes
    have reason ``initial``) is the snapshot.
    """

    def __init__(self, connection_id: str, symbol: str, skipped: Counter | None = None) -> None:
        self.connection_id = connection_id
        self.symbol = symbol.upper()
        self.sequence = -1
        self.skipped = Counter() if skipped is None else skipped
        self._snapshot_seen = False

    def normalize_text(self, text: str, received_us: int) -> list[Normalized]:
        try:
            frame = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            raise FrameError(f"not JSON: {exc}") from None
        return self.normalize(frame, received_us)

    def normalize(self, frame: Any, received_us: int) -> list[Normalized]:
        if not isinstance(frame, dict):
            raise FrameError(f"expected a JSON object, got {type(frame).__name__}")
        sequence = frame.get("socket_sequence")
        if not _long(sequence):
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
                side = _lookup(_BOOK_SIDES, event.get("side"))
                if side is None:
                    raise FrameError(f"{self.symbol}: event {i} has unknown side "
                                     f"{event.get('side')!r}")
                changes.append({"side": side,
                                "price": _decimal(event.get("price"),
                                                  f"{self.symbol}: event {i} price"),
                                "quantity": _decimal(event.get("remaining"),
                                                     f"{self.symbol}: event {i} remaining")})
                initial = initial or event.get("reason") == "initial"
            elif etype == "trade":
                tid = event.get("tid")
                if not _long(tid) or not _long(timestamp_ms):
                    raise FrameError(f"{self.symbol}: trade event {i} without tid/timestampms")
                maker = event.get("makerSide")
                trades.append(Normalized("md.trades", self.symbol, {
                    "symbol": self.symbol, "trade_id": tid,
                    "price": _decimal(event.get("price"), f"{self.symbol}: trade {i} price"),
                    "quantity": _decimal(event.get("amount"), f"{self.symbol}: trade {i} amount"),
                    # the maker rested on one side, so the taker came from the other
                    "taker_side": _lookup(_TAKER_OF_MAKER, maker) or _UNKNOWN,
                    "exchange_ts_ms": timestamp_ms, "received_ts_us": received_us,
                    "connection_id": self.connection_id, "sequence": sequence,
                    "from_snapshot": False, "exchange_ts_ns": None}))
            elif etype in AUCTION_TYPES or etype == "block_trade":
                _skip(self.skipped, etype)  # auctions carry no book change
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
                "exchange_ts_ms": timestamp_ms if _long(timestamp_ms) else None,
                "received_ts_us": received_us, "connection_id": self.connection_id,
                "sequence": sequence, "event_id": event_id if _long(event_id) else None,
                "first_update_id": None, "last_update_id": None, "exchange_ts_ns": None}))
        return out + trades


# --------------------------------------------------------------------------- the new API


def _int(value: Any, what: str) -> int:
    if not _long(value) or value < 0:
        raise FrameError(f"{what} {value!r} is not a non-negative 64-bit integer")
    return value


def _levels(raw: Any, side: str, what: str) -> list[dict]:
    if not isinstance(raw, list):
        raise FrameError(f"{what}: {side} is not a list of [price, quantity]")
    out = []
    for i, level in enumerate(raw):
        if not (isinstance(level, list) and len(level) == 2):
            raise FrameError(f"{what}: {side} level {i} is not [price, quantity]: {level!r}")
        out.append({"side": side, "price": _decimal(level[0], f"{what}: {side} {i} price"),
                    "quantity": _decimal(level[1], f"{what}: {side} {i} quantity")})
    return out


class WsNormalizer(_Numbered):
    """Normalizes the frames of one connection to Gemini's new WebSocket API, in order.

    It numbers frames (``sequence``: the 0-based index of the frame on its connection, as
    for v2) and keeps, per symbol, the last update id applied to its book; the snapshot and
    update-id rules are in the module docstring. A gap raises :class:`UpdateGap`; the
    symbol's next snapshot is flagged ``snapshot: true``. Make a new one for every
    connection.
    """

    def __init__(self, connection_id: str, skipped: Counter | None = None) -> None:
        self.connection_id = connection_id
        self.sequence = -1
        self.skipped = Counter() if skipped is None else skipped
        self._books: dict[str, int] = {}  # symbol -> last update id applied to its book
        # symbol -> the request whose answer must come before its snapshot (None: none)
        self._expected: dict[str, Any] = {}

    def expect_snapshot(self, symbol: str, after: Any = None) -> None:
        """``symbol``'s depth stream was (re)subscribed on a ``?snapshot=`` connection: its
        next ``depthUpdate`` is the initial book, or, with ``after`` (the id of the
        UNSUBSCRIBE sent first), the first one after that request's answer."""
        symbol = symbol.upper()
        self._books.pop(symbol, None)
        self._expected[symbol] = after

    def has_book(self, symbol: str) -> bool:
        return symbol.upper() in self._books

    def normalize(self, frame: Any, received_us: int) -> list[Normalized]:
        frame = self._numbered(frame)
        kind = frame.get("e")
        if kind == "depthUpdate":
            return self._update(frame, received_us)
        if kind == "trade" or (kind is None and "t" in frame and "p" in frame
                               and "q" in frame):  # documented trade frames have no ``e``
            return [self._trade(frame, received_us)]
        if kind is None and "id" in frame and "status" in frame:
            return self._response(frame)
        if kind is None:
            name = ("bookTicker" if "B" in frame and "A" in frame else
                    "partial depth" if "lastUpdateId" in frame else
                    f"frame with keys {','.join(sorted(frame)[:8])}")
            return _skip(self.skipped, f"unknown {name}")
        return _skip(self.skipped, f"unknown {kind!r}")

    def _response(self, frame: dict) -> list[Normalized]:
        """An answer carries no market data; one the feed waits for releases a snapshot."""
        for symbol, after in list(self._expected.items()):
            if after is not None and after == frame.get("id"):
                self._expected[symbol] = None  # the old subscription has ended
        if frame.get("error") is not None:
            log.warning("Gemini refused request %r (status %s): %s", frame.get("id"),
                        frame.get("status"), frame.get("error"))
            return _skip(self.skipped, "error response")
        return []

    def _update(self, frame: dict, received_us: int) -> list[Normalized]:
        symbol = _symbol(frame, "s")
        first = _int(frame.get("U"), f"{symbol}: depthUpdate U")
        last = _int(frame.get("u"), f"{symbol}: depthUpdate u")
        event_ns = _int(frame.get("E"), f"{symbol}: depthUpdate E")
        if first > last:
            raise FrameError(f"{symbol}: depthUpdate U {first} > u {last}")
        changes = (_levels(frame.get("b"), _BID, f"{symbol}: depthUpdate")
                   + _levels(frame.get("a"), _ASK, f"{symbol}: depthUpdate"))
        if symbol in self._expected:
            if self._expected[symbol] is not None:
                return _skip(self.skipped, "depthUpdate of an ended subscription")
            del self._expected[symbol]
            self._books[symbol] = last
            return [self._l2(symbol, True, changes, first, last, event_ns, received_us)]
        applied = self._books.get(symbol)
        if applied is None:
            return _skip(self.skipped, "depthUpdate awaiting a snapshot")
        if last <= applied:
            return _skip(self.skipped, "stale depthUpdate")  # entirely older
        if first > applied + 1:
            del self._books[symbol]
            raise UpdateGap(symbol, f"{symbol}: depthUpdate {first}..{last} after update id "
                                    f"{applied} on connection {self.connection_id}")
        self._books[symbol] = last
        return [self._l2(symbol, False, changes, first, last, event_ns, received_us)]

    def _l2(self, symbol: str, snapshot: bool, changes: list[dict], first: int, last: int,
            event_ns: int, received_us: int) -> Normalized:
        return Normalized("md.l2", symbol, {
            "symbol": symbol, "snapshot": snapshot, "changes": changes,
            "exchange_ts_ms": event_ns // 1_000_000, "received_ts_us": received_us,
            "connection_id": self.connection_id, "sequence": self.sequence, "event_id": None,
            "first_update_id": first, "last_update_id": last, "exchange_ts_ns": event_ns})

    def _trade(self, frame: dict, received_us: int) -> Normalized:
        symbol = _symbol(frame, "s")
        trade_id = _int(frame.get("t"), f"{symbol}: trade id t")
        event_ns = _int(frame.get("E"), f"{symbol}: trade E")
        maker_buyer = frame.get("m")  # the buyer was the maker, so the taker sold
        return Normalized("md.trades", symbol, {
            "symbol": symbol, "trade_id": trade_id,
            "price": _decimal(frame.get("p"), f"{symbol}: trade price"),
            "quantity": _decimal(frame.get("q"), f"{symbol}: trade quantity"),
            "taker_side": (_SELL if maker_buyer else _BUY) if isinstance(maker_buyer, bool)
            else _UNKNOWN,
            "exchange_ts_ms": event_ns // 1_000_000, "received_ts_us": received_us,
            "connection_id": self.connection_id, "sequence": self.sequence,
            "from_snapshot": False, "exchange_ts_ns": event_ns})
