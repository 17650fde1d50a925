"""OHLCV bars from trades by exchange event time. Pure logic: no Kafka, no I/O.

The bars consumer group, the backtests and the benchmarks call these same functions.

**Bars.** Each configured interval (default 1m, 5m, 1h, 1d) is aligned to the epoch in
UTC; a bar covers ``[start_ms, end_ms)``, so a trade at exactly 12:01:00.000 belongs to the
12:01 bar. A bar has open/high/low/close (open and close by exchange time, ties by arrival
order), volume, trade_count, buy/sell volume (by ``taker_side``; ``UNKNOWN`` counts in
neither) and a VWAP rounded half-even to 12 decimal places. The finest interval is built
from trades; every coarser one from the finest bars as they close, so a 1h bar is exactly
the aggregate of its 1m bars. (Every interval must divide the next; 1s, 5s, 10s, 30s, 1m,
5m, 15m, 1h, 4h and 1d do, and so does 15s with 30s but not with 10s.)

**Exact decimals.** Prices and quantities are ``Decimal``; sums and products run in a
100-digit context that *traps* inexact results, so a bar is exact or an error, never
silently rounded. VWAP is ``notional / volume`` rounded half-even to 12 places by exact
rational arithmetic. Outputs are canonical plain decimal strings (:func:`decimal_text`):
no exponent, no trailing fractional zeros, no trailing point, ``"0"`` for zero; so
``"302.750"`` in a trade is ``"302.75"`` in a bar.

**When a bar closes; late trades.** Each symbol has an event clock: the largest
``exchange_ts_ms`` seen for it, moved forward by the wall clock while no newer trade
comes (``now + max(exchange_ts - wall time it was seen)``). Live, that is the wall clock
less the feed's latency; in a replay of history it stays with the replayed trades. All
bars that end at or before ``clock - lateness`` are closed, in start order: so a bar
closes when the symbol's event time reaches its end plus the allowed lateness *or* that
much wall-clock time passes without newer trades (a quiet symbol still gets its last
bar). A trade is **late** when the bar of the finest interval it falls in has closed; a
late trade changes no bar of any interval and is returned in ``Emitted.late`` (the group
publishes it to ``bars.late``). A restored builder restarts its wall-clock extrapolation
at the symbol's latest trade, so downtime never closes bars early.

**Gaps.** Intervals without trades are skipped, or with ``fill_gaps`` emitted as
``filled`` bars (OHLC = previous close, volume 0, trade_count 0, no VWAP), only after a
symbol's first bar of that interval.

**Snapshot trades and duplicates.** Gemini replays its recent trades, newest first, in the
first ``l2_updates`` of every (re)subscription (``from_snapshot``). The builder holds a
run of them (same connection and frame) and applies it oldest first when the run ends
(another frame or a live trade of that symbol, or ``snapshot_hold_ms`` of wall time). Any
trade whose ``trade_id`` is among the symbol's last ``dedupe_window`` ids is a duplicate
and is dropped, so a replayed trade never counts twice.

**Invalid trades** (price <= 0, negative quantity, a side other than BUY/SELL/UNKNOWN, a
price or quantity that is not a plain decimal string, missing fields) raise
``ValueError`` before any state changes; the group dead-letters them.
"""

from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import dataclass, field
from decimal import Context, Decimal, DivisionByZero, Inexact, InvalidOperation, Overflow, Rounded
from fractions import Fraction
from typing import Any, Callable, Iterable, Mapping

from pipeline.core.decimals import plain
from pipeline.core.vocabulary import TakerSide

INTERVALS_MS: dict[str, int] = {
    "1s": 1_000, "5s": 5_000, "10s": 10_000, "15s": 15_000, "30s": 30_000,
    "1m": 60_000, "5m": 300_000, "15m": 900_000,
    "1h": 3_600_000, "4h": 14_400_000, "1d": 86_400_000,
}
DEFAULT_INTERVALS: tuple[str, ...] = ("1m", "5m", "1h", "1d")
VWAP_PLACES = 12
TAKER_SIDES = tuple(t.value for t in TakerSide)
_BUY, _SELL = TakerSide.BUY.value, TakerSide.SELL.value
STATE_VERSION = 1

# Exact arithmetic or an exception: 100 significant digits, inexact results trapped.
EXACT = Context(prec=100, traps=[Inexact, Rounded, Overflow, InvalidOperation, DivisionByZero])
_PLAIN = re.compile(r"^-?\d+(\.\d+)?$")
_ZERO = Decimal(0)

Clock = Callable[[], int]  # epoch milliseconds


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


REPLAY_IDLE_MS = 5_000


class RecordClock:
    """The clock of one partition of a replay, in place of the wall clock.

    A replay copies the original Kafka timestamps, which are the original producer's wall
    clock; so the newest timestamp read from the partition is the wall clock of the
    original run as its records saw it, and bars close (and trades count as late) as they
    did there, at any replay speed. While nothing newer arrives for ``REPLAY_IDLE_MS`` of
    real time (the replay ended or paused), it moves on with the wall clock from there, so
    a replay's last bars still close; shorter pauses (a busy machine) change nothing.
    """

    def __init__(self, start_ms: int | None = None, wall: Clock = wall_clock_ms,
                 idle_ms: int = REPLAY_IDLE_MS) -> None:
        self.newest, self._wall, self._idle = start_ms, wall, idle_ms
        self._at = wall()

    def see(self, timestamp_ms: int) -> None:
        """A record with this Kafka timestamp was read."""
        if self.newest is None or timestamp_ms > self.newest:
            self.newest, self._at = timestamp_ms, self._wall()

    def __call__(self) -> int:
        if self.newest is None:
            return 0  # nothing read yet: nothing to close either
        return self.newest + max(0, self._wall() - self._at - self._idle)


#: The canonical plain text of a decimal (``302.75``, ``100``, ``0.00001``, ``0``): the
#: one in :mod:`pipeline.core.decimals`, under the name this module has always exported.
decimal_text = plain


def round_half_even(numerator: Decimal, denominator: Decimal, places: int = VWAP_PLACES) -> Decimal:
    """``numerator / denominator`` rounded half-even to ``places``, exactly (no double rounding)."""
    value = Fraction(numerator) / Fraction(denominator) * 10**places
    q, r = divmod(value.numerator, value.denominator)
    if 2 * r > value.denominator or (2 * r == value.denominator and q % 2):
        q += 1
    return Decimal(q).scaleb(-places)


@dataclass(frozen=True)
class BarSettings:
    """How bars are built. ``max_places``/``max_digits`` reject trades with more decimal
    places or integer digits than a sink stores exactly (the Parquet store: 18 and 15,
    which leaves sums of bars 5 digits of headroom in ``decimal(38, 18)``)."""

    intervals: tuple[str, ...] = DEFAULT_INTERVALS
    lateness_ms: int = 5_000
    fill_gaps: bool = False
    dedupe_window: int = 1_000
    snapshot_hold_ms: int = 1_000
    max_places: int | None = None
    max_digits: int | None = None

    def __post_init__(self) -> None:
        unknown = [i for i in self.intervals if i not in INTERVALS_MS]
        if unknown or not self.intervals:
            raise ValueError(f"unknown interval(s) {unknown or '(none)'}: "
                             f"use {', '.join(INTERVALS_MS)}")
        ordered = sorted(set(self.intervals), key=INTERVALS_MS.__getitem__)
        if list(self.intervals) != ordered:
            object.__setattr__(self, "intervals", tuple(ordered))
        lengths = [INTERVALS_MS[i] for i in ordered]
        for fine, coarse in zip(lengths, lengths[1:]):
            if coarse % fine:
                raise ValueError(f"intervals must divide each other: {ordered}")
        if self.lateness_ms < 0:
            raise ValueError("lateness_ms must be >= 0")
        if self.dedupe_window < 1:
            raise ValueError("dedupe_window must be >= 1")


@dataclass(frozen=True, slots=True)
class Bar:
    """One closed bar; decimals are exact ``Decimal`` (see :meth:`record` for the Avro form)."""

    symbol: str
    interval: str
    start_ms: int
    end_ms: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    trade_count: int
    vwap: Decimal | None
    buy_volume: Decimal
    sell_volume: Decimal
    filled: bool = False

    def record(self, source: str = "trades") -> dict[str, Any]:
        """The bar as a ``Bar`` record (schemas/Bar.avsc): canonical decimal strings."""
        return {
            "symbol": self.symbol, "interval": self.interval, "start_ms": self.start_ms,
            "end_ms": self.end_ms, "open": decimal_text(self.open), "high": decimal_text(self.high),
            "low": decimal_text(self.low), "close": decimal_text(self.close),
            "volume": decimal_text(self.volume), "trade_count": self.trade_count,
            "vwap": None if self.vwap is None else decimal_text(self.vwap),
            "buy_volume": decimal_text(self.buy_volume),
            "sell_volume": decimal_text(self.sell_volume), "filled": self.filled,
            "source": source,
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "Bar":
        return cls(rec["symbol"], rec["interval"], rec["start_ms"], rec["end_ms"],
                   Decimal(rec["open"]), Decimal(rec["high"]), Decimal(rec["low"]),
                   Decimal(rec["close"]), Decimal(rec["volume"]), rec["trade_count"] or 0,
                   None if rec["vwap"] is None else Decimal(rec["vwap"]),
                   Decimal(rec["buy_volume"] or 0), Decimal(rec["sell_volume"] or 0),
                   rec["filled"])


@dataclass(slots=True)
class Emitted:
    """What feeding the builder produced: closed bars in order, late trades, duplicates."""

    bars: list[Bar] = field(default_factory=list)
    late: list[dict[str, Any]] = field(default_factory=list)
    duplicates: int = 0

    def __bool__(self) -> bool:
        return bool(self.bars or self.late or self.duplicates)


# --------------------------------------------------------------------------- trades


@dataclass(frozen=True, slots=True)
class _Trade:
    raw: Mapping[str, Any]
    symbol: str
    trade_id: int
    ts: int
    price: Decimal
    qty: Decimal
    notional: Decimal
    side: str
    snapshot: bool
    frame: tuple[str, int]


def _decimal(value: Any, what: str, places: int | None, digits: int | None) -> Decimal:
    if not isinstance(value, str) or not _PLAIN.match(value):
        raise ValueError(f"{what} {value!r} is not a plain decimal string")
    number = Decimal(value)
    if places is not None and -number.as_tuple().exponent > places:  # type: ignore[operator]
        raise ValueError(f"{what} {value} has more than {places} decimal places")
    if digits is not None and number and number.adjusted() >= digits:
        raise ValueError(f"{what} {value} has more than {digits} integer digits")
    return number


def parse_trade(raw: Mapping[str, Any], max_places: int | None = None,
                max_digits: int | None = None) -> _Trade:
    """Validate a ``Trade`` record; ``ValueError`` says what is wrong with it."""
    try:
        symbol, trade_id, ts = raw["symbol"], raw["trade_id"], raw["exchange_ts_ms"]
        price_text, qty_text, side = raw["price"], raw["quantity"], raw["taker_side"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a Trade record: missing {exc}") from None
    if not isinstance(symbol, str) or not symbol:
        raise ValueError(f"invalid symbol {symbol!r}")
    if not isinstance(trade_id, int) or not isinstance(ts, int) or ts < 0:
        raise ValueError(f"{symbol}: trade_id {trade_id!r} and exchange_ts_ms {ts!r} must be "
                         "integers (time >= 0)")
    price = _decimal(price_text, f"{symbol} trade {trade_id}: price", max_places, max_digits)
    if price <= 0:
        raise ValueError(f"{symbol} trade {trade_id}: price {price_text} is not positive")
    qty = _decimal(qty_text, f"{symbol} trade {trade_id}: quantity", max_places, max_digits)
    if qty < 0:
        raise ValueError(f"{symbol} trade {trade_id}: quantity {qty_text} is negative")
    if side not in TAKER_SIDES:
        raise ValueError(f"{symbol} trade {trade_id}: unknown taker_side {side!r} "
                         f"(expected {', '.join(TAKER_SIDES)})")
    try:
        notional = EXACT.multiply(price, qty)
    except ArithmeticError:
        raise ValueError(f"{symbol} trade {trade_id}: price x quantity has more than "
                         f"{EXACT.prec} digits") from None
    snapshot = bool(raw.get("from_snapshot", False))
    frame = (str(raw.get("connection_id", "")), int(raw.get("sequence", 0) or 0))
    return _Trade(raw, symbol, trade_id, ts, price, qty, notional, side, snapshot, frame)


# --------------------------------------------------------------------------- aggregation


class _Agg:
    """An open bar's running aggregate (exact)."""

    __slots__ = ("open", "open_key", "high", "low", "close", "close_key", "volume",
                 "notional", "count", "buy", "sell")

    def __init__(self) -> None:
        self.open = self.high = self.low = self.close = _ZERO
        self.open_key = self.close_key = (0, 0)
        self.volume = self.notional = self.buy = self.sell = _ZERO
        self.count = 0

    def add_trade(self, price: Decimal, qty: Decimal, notional: Decimal, side: str,
                  key: tuple[int, int]) -> None:
        # Everything that can raise runs before the first assignment: all or nothing.
        notional = EXACT.add(self.notional, notional)
        volume = EXACT.add(self.volume, qty)
        buy = EXACT.add(self.buy, qty) if side == _BUY else self.buy
        sell = EXACT.add(self.sell, qty) if side == _SELL else self.sell
        if not self.count:
            self.open = self.high = self.low = self.close = price
            self.open_key = self.close_key = key
        else:
            if price > self.high:
                self.high = price
            elif price < self.low:
                self.low = price
            if key < self.open_key:
                self.open, self.open_key = price, key
            if key >= self.close_key:
                self.close, self.close_key = price, key
        self.notional, self.volume, self.buy, self.sell = notional, volume, buy, sell
        self.count += 1

    def add_bar(self, other: "_Agg") -> None:
        """Merge a closed finer bar; finer bars arrive in start order."""
        notional = EXACT.add(self.notional, other.notional)
        volume = EXACT.add(self.volume, other.volume)
        buy, sell = EXACT.add(self.buy, other.buy), EXACT.add(self.sell, other.sell)
        if not self.count:
            self.open, self.high, self.low = other.open, other.high, other.low
        else:
            self.high = max(self.high, other.high)
            self.low = min(self.low, other.low)
        self.close = other.close
        self.notional, self.volume, self.buy, self.sell = notional, volume, buy, sell
        self.count += other.count

    def bar(self, symbol: str, interval: str, start: int, length: int) -> Bar:
        vwap = round_half_even(self.notional, self.volume) if self.volume else None
        return Bar(symbol, interval, start, start + length, self.open, self.high, self.low,
                   self.close, self.volume, self.count, vwap, self.buy, self.sell)

    def state(self) -> list[Any]:
        return [str(self.open), list(self.open_key), str(self.high), str(self.low), str(self.close),
                list(self.close_key), str(self.volume), str(self.notional), self.count,
                str(self.buy), str(self.sell)]

    @classmethod
    def restore(cls, s: list[Any]) -> "_Agg":
        agg = cls()
        (o, ok, h, low, c, ck, v, n, agg.count, b, sl) = s
        agg.open, agg.high, agg.low, agg.close = Decimal(o), Decimal(h), Decimal(low), Decimal(c)
        agg.open_key, agg.close_key = tuple(ok), tuple(ck)
        agg.volume, agg.notional = Decimal(v), Decimal(n)
        agg.buy, agg.sell = Decimal(b), Decimal(sl)
        return agg


class _Symbol:
    """One symbol's bars in every interval, its event clock and its recent trade ids."""

    __slots__ = ("name", "event_ms", "offset_ms", "frontier", "open", "last", "seen", "seen_set",
                 "arrivals", "held", "held_frame", "held_since")

    def __init__(self, name: str, intervals: int) -> None:
        self.name = name
        self.event_ms: int | None = None  # largest exchange time seen
        self.offset_ms: int | None = None  # max(exchange time - wall time when seen)
        self.frontier: list[int | None] = [None] * intervals  # bars starting before: closed
        self.open: list[dict[int, _Agg]] = [{} for _ in range(intervals)]
        self.last: list[tuple[int, Decimal] | None] = [None] * intervals  # (end, close) emitted
        self.seen: deque[int] = deque()
        self.seen_set: set[int] = set()
        self.arrivals = 0
        self.held: list[_Trade] = []
        self.held_frame: tuple[str, int] | None = None
        self.held_since = 0


class BarBuilder:
    """Builds bars for any number of symbols; feed it trades in arrival order.

    ``clock`` is the wall clock in epoch ms (injected so tests are deterministic). The
    builder's whole state is :meth:`state` (JSON-able) and :meth:`restore` brings it back.
    """

    def __init__(self, settings: BarSettings | None = None, clock: Clock = wall_clock_ms) -> None:
        self.settings = settings or BarSettings()
        self.clock = clock
        self._names = self.settings.intervals
        self._lengths = [INTERVALS_MS[i] for i in self._names]
        self._symbols: dict[str, _Symbol] = {}

    @property
    def symbols(self) -> list[str]:
        return sorted(self._symbols)

    def open_bars(self) -> int:
        return sum(len(o) for s in self._symbols.values() for o in s.open)

    # -- feeding

    def add(self, raw: Mapping[str, Any], into: Emitted | None = None) -> Emitted:
        """Feed one trade record; closed bars, late trades and duplicates go to ``into``."""
        out = into if into is not None else Emitted()
        limits = self.settings.max_places, self.settings.max_digits
        trade = parse_trade(raw, *limits)  # raises before any change
        sym = self._symbols.get(trade.symbol)
        if sym is None:
            sym = self._symbols[trade.symbol] = _Symbol(trade.symbol, len(self._lengths))
        now = self.clock()
        if trade.snapshot:
            if sym.held and sym.held_frame != trade.frame:
                self._release(sym, now, out)
            if not sym.held:
                sym.held_frame, sym.held_since = trade.frame, now
            sym.held.append(trade)
            return out
        if sym.held:
            self._release(sym, now, out)
        self._apply(sym, trade, now, out)
        return out

    def advance(self, into: Emitted | None = None) -> Emitted:
        """Let wall-clock time pass: release held snapshot runs that are due, close what is due."""
        out = into if into is not None else Emitted()
        now = self.clock()
        for sym in self._symbols.values():
            if sym.held and now - sym.held_since >= self.settings.snapshot_hold_ms:
                self._release(sym, now, out)
            self._close_due(sym, now, out)
        return out

    def drain(self, into: Emitted | None = None) -> Emitted:
        """End of input (a finite replay): apply held trades and close every open bar,
        without filling past each symbol's last bar."""
        out = into if into is not None else Emitted()
        now = self.clock()
        for sym in self._symbols.values():
            if sym.held:
                self._release(sym, now, out)
            for i, length in enumerate(self._lengths):  # finest first: it feeds the others
                if sym.open[i]:
                    self._close_interval(sym, i, max(sym.open[i]) + length, out)
            # Keep the invariant that finer frontiers are never behind coarser ones.
            top = max((f for f in sym.frontier if f is not None), default=None)
            sym.frontier = [top] * len(self._lengths)
        return out

    # -- internals

    def _release(self, sym: _Symbol, now: int, out: Emitted) -> None:
        held, sym.held, sym.held_frame = sym.held, [], None
        for trade in sorted(held, key=lambda t: (t.ts, t.trade_id)):
            self._apply(sym, trade, now, out)

    def _apply(self, sym: _Symbol, trade: _Trade, now: int, out: Emitted) -> None:
        if trade.trade_id in sym.seen_set:
            out.duplicates += 1
            return
        length = self._lengths[0]
        start = trade.ts - trade.ts % length
        sym.arrivals += 1
        key = (trade.ts, sym.arrivals)
        agg = None
        if sym.event_ms is None or trade.ts > sym.event_ms:
            sym.event_ms = trade.ts
        lead = trade.ts - now
        if sym.offset_ms is None or lead > sym.offset_ms:
            sym.offset_ms = lead
        self._close_due(sym, now, out)
        frontier = sym.frontier[0]
        if frontier is None or start >= frontier:
            agg = sym.open[0].get(start)
            if agg is None:
                agg = sym.open[0][start] = _Agg()
            agg.add_trade(trade.price, trade.qty, trade.notional, trade.side, key)
        else:
            out.late.append(dict(trade.raw))
        self._remember(sym, trade.trade_id)

    def _remember(self, sym: _Symbol, trade_id: int) -> None:
        sym.seen.append(trade_id)
        sym.seen_set.add(trade_id)
        if len(sym.seen) > self.settings.dedupe_window:
            sym.seen_set.discard(sym.seen.popleft())

    def _close_due(self, sym: _Symbol, now: int, out: Emitted) -> None:
        if sym.event_ms is None or sym.offset_ms is None:
            return
        clock = max(sym.event_ms, now + sym.offset_ms)
        watermark = clock - self.settings.lateness_ms
        first = sym.frontier[0]
        if first is not None and watermark - watermark % self._lengths[0] <= first:
            return  # the common case: nothing new to close
        self._close_until(sym, watermark, out)

    def _close_until(self, sym: _Symbol, watermark: int, out: Emitted) -> None:
        """Close, in every interval, the bars ending at or before ``watermark``."""
        for i, length in enumerate(self._lengths):
            self._close_interval(sym, i, watermark - watermark % length, out)

    def _close_interval(self, sym: _Symbol, i: int, new: int, out: Emitted) -> None:
        """Close interval ``i``'s bars starting before ``new``; merge them into coarser ones."""
        old = sym.frontier[i]
        if old is not None and new <= old:
            return
        fill = self.settings.fill_gaps
        length, interval, opened = self._lengths[i], self._names[i], sym.open[i]
        for start in sorted(s for s in opened if s < new):
            agg = opened.pop(start)
            if fill:
                self._fill(sym, i, start, out)
            bar = agg.bar(sym.name, interval, start, length)
            out.bars.append(bar)
            sym.last[i] = (bar.end_ms, bar.close)
            if i + 1 < len(self._lengths):  # the next coarser interval; it feeds the next
                coarse = start - start % self._lengths[i + 1]
                target = sym.open[i + 1].get(coarse)
                if target is None:
                    target = sym.open[i + 1][coarse] = _Agg()
                target.add_bar(agg)
        if fill:
            self._fill(sym, i, new, out)
        sym.frontier[i] = new

    def _fill(self, sym: _Symbol, i: int, until: int, out: Emitted) -> None:
        """Forward-fill the empty bars of interval ``i`` from the last emitted one to ``until``."""
        last = sym.last[i]
        if last is None:
            return
        start, close = last
        length, interval = self._lengths[i], self._names[i]
        while start < until:
            out.bars.append(Bar(sym.name, interval, start, start + length, close, close, close,
                                close, _ZERO, 0, None, _ZERO, _ZERO, filled=True))
            start += length
        sym.last[i] = (start, close)

    # -- state

    def state(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this builder is (JSON-able)."""
        symbols = {}
        for name, s in self._symbols.items():
            symbols[name] = {
                "event_ms": s.event_ms,
                "frontier": s.frontier,
                "open": [{str(start): agg.state() for start, agg in o.items()} for o in s.open],
                "last": [None if x is None else [x[0], str(x[1])] for x in s.last],
                "seen": list(s.seen),
                "arrivals": s.arrivals,
                "held": [dict(t.raw) for t in s.held],
            }
        return {"version": STATE_VERSION, "intervals": list(self._names),
                "lateness_ms": self.settings.lateness_ms, "symbols": symbols}

    @classmethod
    def restore(cls, state: Mapping[str, Any], settings: BarSettings | None = None,
                clock: Clock = wall_clock_ms) -> "BarBuilder":
        """A builder continuing from :meth:`state`; its wall-clock extrapolation restarts now."""
        builder = cls(settings, clock)
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"bar state version {state.get('version')!r} is not {STATE_VERSION}")
        if list(state["intervals"]) != list(builder._names):
            raise ValueError(f"bar state is for intervals {state['intervals']}, "
                             f"not {list(builder._names)}: start a new state (group) for "
                             "new intervals")
        now = clock()
        for name, s in state["symbols"].items():
            sym = _Symbol(name, len(builder._lengths))
            sym.event_ms = s["event_ms"]
            sym.offset_ms = None if sym.event_ms is None else sym.event_ms - now
            sym.frontier = list(s["frontier"])
            sym.open = [{int(k): _Agg.restore(v) for k, v in o.items()} for o in s["open"]]
            sym.last = [None if x is None else (x[0], Decimal(x[1])) for x in s["last"]]
            sym.seen = deque(s["seen"])
            sym.seen_set = set(sym.seen)
            sym.arrivals = s["arrivals"]
            held = [parse_trade(raw) for raw in s["held"]]
            if held:
                sym.held, sym.held_frame, sym.held_since = held, held[0].frame, now
            builder._symbols[name] = sym
        return builder


def build_bars(trades: Iterable[Mapping[str, Any]], settings: BarSettings | None = None,
               ) -> tuple[list[Bar], list[dict[str, Any]], int]:
    """Bars of a finite list of trades (a replay, a test): (bars, late trades, duplicates).

    The wall clock stands still, so only event time closes bars; the end drains.
    """
    builder = BarBuilder(settings, clock=lambda: 0)
    out = Emitted()
    for trade in trades:
        builder.add(trade, out)
    builder.drain(out)
    return out.bars, out.late, out.duplicates


__all__ = ["Bar", "BarBuilder", "BarSettings", "Emitted", "INTERVALS_MS", "DEFAULT_INTERVALS",
           "build_bars", "decimal_text", "parse_trade", "round_half_even", "wall_clock_ms",
           "RecordClock"]
