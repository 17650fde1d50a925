"""Gemini's public history, client side, as pure logic: where a backfill starts, which
request comes next, what a page of ``/v1/trades`` means, and the records it becomes.
No I/O: the HTTP calls are in ``pipeline/gemini/public_rest.py``.

Paging (developer.gemini.com "List Trades"): a page is at most ``limit_trades`` (500)
trades after ``since_tid`` (or at/after ``timestamp``), listed newest first. A backfill
asks for the first page by time (or by tid), then always by the last tid it has, so no
trade is skipped or read twice even when many share one millisecond; a page shorter than
the limit is the end of the history.

A trade from REST becomes the same ``Trade`` record the WebSocket producer writes
(schemas/Trade.avsc), with ``connection_id`` ``rest-backfill-<run>`` (a backfill is one
"connection") and ``sequence`` the page's number in the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pipeline.core.decimals import fixed
from pipeline.core.errors import PipelineError
from pipeline.gemini.marketdata import (
    _TAKER_SIDES,
    _UNKNOWN,
    FrameError,
    _decimal,
    _long,
    _lookup,
)
from pipeline.market.bars import INTERVALS_MS
from pipeline.replay.ranges import to_ms

MAX_TRADES = 500  # Gemini: "Each request will show at most 500 records"
CONNECTION_PREFIX = "rest-backfill-"
# The pipeline's bar intervals and Gemini's candle time frames for them (30m and 6hr have
# no bar interval in the pipeline, see pipeline/market/bars.py INTERVALS_MS).
TIME_FRAMES = {"1m": "1m", "5m": "5m", "15m": "15m", "1h": "1hr", "1d": "1day"}
CANDLE_SOURCE = "gemini:/v2/candles"


@dataclass(frozen=True)
class Since:
    """Where the user asked a backfill to start: after a trade id, or at a time."""

    tid: int | None = None
    ms: int | None = None

    def __str__(self) -> str:
        if self.tid is not None:
            return f"tid {self.tid}"
        from pipeline.replay.ranges import utc_text

        return utc_text(self.ms) if self.ms is not None else "the beginning"


def parse_since(text: str | None) -> Since:
    """``tid:N`` (after trade N), else a time: epoch ms or an ISO date-time (UTC unless it
    says otherwise); None: the earliest trade Gemini has."""
    if text is None or not text.strip():
        return Since()
    text = text.strip()
    if text.lower().startswith("tid:"):
        digits = text[4:].strip()
        if not (digits.isascii() and digits.isdigit()):
            raise PipelineError(f"--since {text!r}: a trade id is tid:<digits>, e.g. tid:12345")
        return Since(tid=int(digits))
    return Since(ms=to_ms(text, "--since"))


@dataclass(frozen=True)
class Cursor:
    """The next request of a backfill: by tid once it has one, else by time."""

    since_tid: int | None
    since_ms: int | None
    limit: int = MAX_TRADES

    def params(self) -> dict[str, int]:
        """The query of ``GET /v1/trades/{symbol}`` for this page."""
        if self.since_tid is not None:
            return {"since_tid": self.since_tid, "limit_trades": self.limit}
        if self.since_ms is not None:
            return {"timestamp": self.since_ms, "limit_trades": self.limit}
        return {"since_tid": 0, "limit_trades": self.limit}  # Gemini: 0 is the earliest


def start_cursor(since: Since, resume: tuple[int, int] | None,
                 limit: int = MAX_TRADES) -> Cursor:
    """The first request: after the newest trade already loaded (``resume`` = its tid and
    time) unless the user asked to start later than it."""
    if not 1 <= limit <= MAX_TRADES:
        raise PipelineError(f"limit_trades must be 1..{MAX_TRADES}, got {limit}")
    if resume is not None:
        tid, ms = resume
        if since.tid is not None and since.tid > tid:
            return Cursor(since.tid, None, limit)
        if since.ms is not None and since.ms > ms:
            return Cursor(None, since.ms, limit)
        return Cursor(tid, None, limit)
    return Cursor(since.tid, since.ms, limit)


@dataclass(frozen=True)
class Page:
    """One answered page: its trades oldest first (only those wanted), the next request,
    and whether the history ends here."""

    trades: list[dict]  # Gemini's trade objects, oldest first, before ``until``
    cursor: Cursor
    done: bool


def read_page(entries: Any, cursor: Cursor, until_ms: int | None = None) -> Page:
    """Check a ``/v1/trades`` answer and move the cursor past it.

    Raises :class:`FrameError` for an answer that is not a list of trades, or whose tids
    are not strictly decreasing (newest first) and after the cursor's tid: a page like that
    would make the backfill skip or repeat trades.
    """
    if not isinstance(entries, list):
        raise FrameError(f"/v1/trades answered {type(entries).__name__}, not a list")
    trades = entries[::-1]
    last = cursor.since_tid
    for trade in trades:
        tid = trade.get("tid") if isinstance(trade, dict) else None
        if not _long(tid) or (last is not None and tid <= last):
            raise FrameError(f"/v1/trades page out of order: tid {tid!r} after {last}")
        last = tid
    full = len(trades) >= cursor.limit
    wanted = [t for t in trades if until_ms is None or _ms(t) < until_ms]
    done = not full or len(wanted) < len(trades)
    return Page(wanted, Cursor(last, None, cursor.limit) if last is not None else cursor, done)


def _ms(trade: dict) -> int:
    value = trade.get("timestampms")
    if not _long(value):
        raise FrameError(f"trade {trade.get('tid')!r} has no integer timestampms")
    return value


def trade_record(entry: dict, symbol: str, received_us: int, connection_id: str,
                 sequence: int) -> dict:
    """A ``/v1/trades`` entry as the pipeline's Trade record (schemas/Trade.avsc)."""
    return {
        "symbol": symbol, "trade_id": entry["tid"],
        "price": _decimal(entry.get("price"), f"{symbol}: trade {entry['tid']} price"),
        "quantity": _decimal(entry.get("amount"), f"{symbol}: trade {entry['tid']} amount"),
        "taker_side": _lookup(_TAKER_SIDES, entry.get("type")) or _UNKNOWN,
        "exchange_ts_ms": _ms(entry), "received_ts_us": received_us,
        "connection_id": connection_id, "sequence": sequence, "from_snapshot": False,
        "exchange_ts_ns": None}


# --------------------------------------------------------------------------- candles


def time_frame(interval: str) -> tuple[str, str]:
    """(the pipeline's interval, Gemini's time frame) for ``1h`` or ``1hr`` and the like."""
    for name, frame in TIME_FRAMES.items():
        if interval in (name, frame):
            return name, frame
    raise PipelineError(f"unknown interval {interval!r}: use one of "
                        f"{', '.join(f'{n} ({f})' for n, f in TIME_FRAMES.items())}")


def _number(value: Any, what: str) -> str:
    """A candle's JSON number (read as Decimal or int) as exact plain decimal text."""
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        raise FrameError(f"{what} {value!r} is not a number")
    number = Decimal(value)
    if not number.is_finite() or number < 0:
        raise FrameError(f"{what} {value!r} is not a finite non-negative number")
    return fixed(number)


def candle_bars(rows: Any, symbol: str, interval: str, now_ms: int) -> list[dict]:
    """Gemini's candles (newest first) as Bar records, oldest first; only closed ones
    (the newest candle is still open until its interval has passed)."""
    if not isinstance(rows, list):
        raise FrameError(f"/v2/candles answered {type(rows).__name__}, not a list")
    step = INTERVALS_MS[interval]
    bars: dict[int, dict] = {}
    for row in rows:
        if not isinstance(row, list) or len(row) != 6 or not _long(row[0]):
            raise FrameError(f"a candle is not [time_ms, open, high, low, close, volume]: "
                             f"{row!r}")
        start = row[0]
        if start % step:
            raise FrameError(f"candle at {start} is not aligned to {interval}")
        o, h, low, c, v = (_number(x, f"{symbol} candle {start} {name}") for x, name in
                           zip(row[1:], ("open", "high", "low", "close", "volume")))
        if start + step > now_ms:
            continue
        bars[start] = {"symbol": symbol, "interval": interval, "start_ms": start,
                       "end_ms": start + step, "open": o, "high": h, "low": low, "close": c,
                       "volume": v, "trade_count": None, "vwap": None, "buy_volume": None,
                       "sell_volume": None, "filled": False,
                       "source": f"{CANDLE_SOURCE}/{symbol}/{TIME_FRAMES[interval]}"}
    return [bars[start] for start in sorted(bars)]
