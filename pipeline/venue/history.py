"""The local venue's public history: Gemini's ``GET /v1/trades/{symbol}`` and
``GET /v2/candles/{symbol}/{time_frame}``, from one deterministic trade history per symbol.

The history is the venue's own seeded generator (``market.generated_events``): its trades,
for every listed symbol at once (so trade ids are global and strictly increasing, as on
Gemini), until each symbol has ``depth`` of them, then re-timed to span ``span_ms`` ending
at ``end_ms``; trades printed by one taker order keep one timestamp. Candles are computed
from that same history, so the two endpoints agree to the last digit.

``GET /v1/trades/{symbol}`` (developer.gemini.com "List Trades", docs.gemini.com
"Timestamps"):

- ``since_tid``: trades with a tid greater than it; it trumps ``timestamp``; ``0`` is the
  earliest trade there is;
- ``timestamp`` (alias ``since``): seconds or milliseconds since the epoch; a value below
  10^11 is seconds (as in ``producers/csv_bars.py``). NOT DOCUMENTED whether "after this
  timestamp" includes it: here it does (trades at or after it, the rule Gemini documents
  for its ``mytrades`` walk, "set timestamp to X+1"). An unreadable one is 400
  ``InvalidTimestampInPayload``, as documented;
- neither: the most recent trades;
- ``limit_trades``: default 50, "at most 500 records" per request: a larger value gets
  500. NOT DOCUMENTED: the reason for a limit or tid that is not a positive (non-negative)
  integer; here 400 ``InvalidQuantity`` (Gemini's "a negative or otherwise invalid
  quantity");
- a page is the OLDEST ``limit_trades`` trades after ``since_tid``/``timestamp`` (so a
  client pages forward from the last tid it has), listed newest first, as every Gemini
  trade list is. The documents say "return the trades that have executed since the
  specified timestamp" and that the list is sorted newest first; that a page past the limit
  starts at the oldest trade is what published clients that page forward rely on (they
  take the next ``timestamp`` from the page's first, newest, element);
- ``include_breaks`` (``true``/``1``): each trade carries ``"broken": false`` (the venue's
  history has no broken trades; without it Gemini leaves broken trades out);
- an unknown symbol is 400 ``InvalidSymbol``.

Not emulated: the seven-day window of the public endpoint and the 90-day limit on
``timestamp`` (the venue's history spans a few days).

``GET /v2/candles/{symbol}/{time_frame}``: ``[[time_ms, open, high, low, close, volume],
...]`` newest first, prices and volume as JSON numbers (written from the exact decimal
text, so no digit is lost), one candle per interval with at least one trade (NOT
DOCUMENTED what Gemini does with an interval without trades; here it has no candle). An
unknown time frame is 400 ``InvalidTimeframe`` (NOT DOCUMENTED). All of the history's
candles are returned (Gemini does not say how far back each time frame reaches).

Rate (docs.gemini.com/rate-limit): public entry points allow 120 requests a minute per
client (here per remote address); five more are queued and served late, any further one
gets 429 ``RateLimit`` (the reason Gemini's error table lists for "requests were made too
frequently"; the private API here answers the same) until the rate drops. Every request
is logged (path, status, time) so tests can count what reached the venue.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Callable, Iterable

from aiohttp import web

from pipeline.core.decimals import fixed
from pipeline.venue.market import generated_events
from pipeline.venue.rest import RateGate

MAX_TRADES = 500
DEFAULT_TRADES = 50
SECONDS_BELOW = 10**11  # a timestamp below this is seconds (1e11 s is the year 5138)
DAY_MS = 86_400_000
TIME_FRAMES_MS = {"1m": 60_000, "5m": 300_000, "15m": 900_000, "30m": 1_800_000,
                  "1hr": 3_600_000, "6hr": 21_600_000, "1day": DAY_MS}
PUBLIC_PER_MINUTE, PUBLIC_QUEUED = 120, 5


@dataclass(frozen=True, slots=True)
class HistoryTrade:
    """One trade of the venue's history, in Gemini's terms (``side``: the taker's)."""

    tid: int
    timestamp_ms: int
    price: str
    amount: str
    side: str  # "buy" / "sell"


class HistoryError(Exception):
    """A request Gemini would refuse: its reason and HTTP status."""

    def __init__(self, reason: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.reason, self.message, self.status = reason, message, status


class TradeHistory:
    """Every symbol's trades, oldest first; built on first use (a venue that never serves
    history never pays for it)."""

    def __init__(self, symbols: Iterable[str], depth: int = 2000, seed: int = 1,
                 end_ms: int | None = None, span_ms: int = 3 * DAY_MS) -> None:
        if depth < 0 or span_ms <= 0:
            raise ValueError("history depth must be >= 0 and its span > 0")
        self.symbols = sorted({s.upper() for s in symbols})
        self.depth, self.seed, self.span_ms = depth, seed, span_ms
        self.end_ms = end_ms if end_ms is not None else int(time.time() * 1000) // 60_000 * 60_000
        self._trades: dict[str, list[HistoryTrade]] | None = None

    def trades(self, symbol: str) -> list[HistoryTrade]:
        """The symbol's whole history, oldest first; raises InvalidSymbol if not listed."""
        trades = self._built().get(symbol.upper())
        if trades is None:
            raise HistoryError("InvalidSymbol", f"unknown symbol {symbol!r}")
        return trades

    def _built(self) -> dict[str, list[HistoryTrade]]:
        if self._trades is None:
            self._trades = _generate(self.symbols, self.depth, self.seed, self.end_ms,
                                     self.span_ms)
        return self._trades

    def page(self, symbol: str, since_tid: int | None = None, since_ms: int | None = None,
             limit: int = DEFAULT_TRADES) -> list[HistoryTrade]:
        """Gemini's page: the oldest ``limit`` trades after ``since_tid`` (else at or after
        ``since_ms``, else the newest ``limit``), newest first."""
        trades = self.trades(symbol)
        if since_tid is not None:
            chosen = [t for t in trades if t.tid > since_tid][:limit]
        elif since_ms is not None:
            chosen = [t for t in trades if t.timestamp_ms >= since_ms][:limit]
        else:
            chosen = trades[-limit:] if limit else []
        return chosen[::-1]

    def candles(self, symbol: str, time_frame: str) -> list[tuple[int, str, str, str, str, str]]:
        """(start_ms, open, high, low, close, volume) per interval with trades, newest first;
        exact decimal text."""
        step = TIME_FRAMES_MS.get(time_frame)
        if step is None:
            raise HistoryError("InvalidTimeframe", f"unknown time frame {time_frame!r}: use "
                               f"{', '.join(TIME_FRAMES_MS)}")
        out: list[tuple[int, str, str, str, str, str]] = []
        bucket: list[HistoryTrade] = []
        for trade in self.trades(symbol) + [None]:  # type: ignore[list-item]
            if bucket and (trade is None or
                           trade.timestamp_ms // step != bucket[0].timestamp_ms // step):
                prices = [Decimal(t.price) for t in bucket]
                volume = sum((Decimal(t.amount) for t in bucket), Decimal(0))
                out.append((bucket[0].timestamp_ms // step * step, bucket[0].price,
                            _text(max(prices)), _text(min(prices)), bucket[-1].price,
                            _text(volume)))
                bucket = []
            if trade is not None:
                bucket.append(trade)
        return out[::-1]


_text = fixed


def _generate(symbols: list[str], depth: int, seed: int, end_ms: int,
              span_ms: int) -> dict[str, list[HistoryTrade]]:
    raw: dict[str, list[dict]] = {s: [] for s in symbols}
    missing = set(symbols) if depth else set()
    for event in generated_events(symbols, seed):
        if not missing:
            break
        kept = raw[event.symbol]
        for trade in event.trades:
            if len(kept) < depth:
                kept.append(trade)
        if len(kept) >= depth:
            missing.discard(event.symbol)
    stamps = sorted({t["timestamp"] for trades in raw.values() for t in trades})
    if not stamps:
        return {s: [] for s in symbols}
    first, last = stamps[0], stamps[-1]
    start = end_ms - span_ms

    def retime(ms: int) -> int:  # the generator's milliseconds stretched over the span
        return start + (ms - first) * (span_ms - 1) // max(1, last - first)

    return {s: [HistoryTrade(t["event_id"], retime(t["timestamp"]), t["price"], t["quantity"],
                             t["side"]) for t in trades] for s, trades in raw.items()}


def trade_json(trade: HistoryTrade, include_breaks: bool) -> dict:
    """A trade in the shape of Gemini's public trade history."""
    body = {"timestamp": trade.timestamp_ms // 1000, "timestampms": trade.timestamp_ms,
            "tid": trade.tid, "price": trade.price, "amount": trade.amount,
            "exchange": "gemini", "type": trade.side}
    if include_breaks:
        body["broken"] = False
    return body


def candles_text(candles: list[tuple[int, str, str, str, str, str]]) -> str:
    """Gemini's candle array with the exact decimals written as JSON numbers."""
    return "[" + ",".join("[" + ",".join(str(v) for v in c) + "]" for c in candles) + "]"


# --------------------------------------------------------------------------- parameters


def _count(text: str | None, name: str, default: int | None, minimum: int) -> int | None:
    if text is None or text == "":
        return default
    if not (text.isascii() and text.isdigit()) or int(text) < minimum:
        raise HistoryError("InvalidQuantity", f"{name} must be an integer >= {minimum}, "
                           f"got {text!r}")
    return int(text)


def _timestamp_ms(text: str | None) -> int | None:
    if text is None or text == "":
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 15:
        raise HistoryError("InvalidTimestampInPayload",
                           f"timestamp {text!r} is not seconds or milliseconds since the epoch")
    value = int(text)
    return value * 1000 if value < SECONDS_BELOW else value


def trades_query(query) -> tuple[int | None, int | None, int, bool]:
    """(since_tid, since_ms, limit, include_breaks) of a ``/v1/trades`` query."""
    since_tid = _count(query.get("since_tid"), "since_tid", None, 0)
    since_ms = _timestamp_ms(query.get("timestamp", query.get("since")))
    limit = min(MAX_TRADES, _count(query.get("limit_trades"), "limit_trades", DEFAULT_TRADES, 1))
    include_breaks = (query.get("include_breaks") or "").lower() in ("true", "1")
    return since_tid, since_ms, limit, include_breaks


# --------------------------------------------------------------------------- serving


class HistoryApi:
    """The two public history endpoints on an aiohttp app, with their request log."""

    def __init__(self, history: TradeHistory, per_minute: int = PUBLIC_PER_MINUTE) -> None:
        self.history = history
        self.gate = RateGate(rate_per_s=per_minute / 60.0, queued=PUBLIC_QUEUED)
        self.log: list[dict] = []  # {"path", "status", "reason", "at" (time.time())}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/trades/{symbol}", self._trades)
        app.router.add_get("/v2/candles/{symbol}/{time_frame}", self._candles)

    async def _serve(self, request: web.Request, answer: Callable[[], web.Response]
                     ) -> web.Response:
        wait = self.gate.admit(request.remote or "")
        try:
            if wait is None:
                raise HistoryError("RateLimit", "Requests were made too frequently", 429)
            if wait:
                await asyncio.sleep(wait)  # queued, as Gemini queues a burst of five
            response = answer()
            reason = None
        except HistoryError as refusal:
            response = web.json_response({"result": "error", "reason": refusal.reason,
                                          "message": refusal.message}, status=refusal.status)
            reason = refusal.reason
        self.log.append({"path": request.path_qs, "status": response.status, "reason": reason,
                         "at": time.time()})
        return response

    async def _trades(self, request: web.Request) -> web.Response:
        def answer() -> web.Response:
            since_tid, since_ms, limit, breaks = trades_query(request.query)
            page = self.history.page(request.match_info["symbol"], since_tid, since_ms, limit)
            return web.json_response([trade_json(t, breaks) for t in page])

        return await self._serve(request, answer)

    async def _candles(self, request: web.Request) -> web.Response:
        def answer() -> web.Response:
            candles = self.history.candles(request.match_info["symbol"],
                                           request.match_info["time_frame"])
            return web.Response(text=candles_text(candles), content_type="application/json")

        return await self._serve(request, answer)

    def max_per_minute(self) -> int:
        """The most requests answered in any 60 s window (the rate tests assert on)."""
        times = sorted(entry["at"] for entry in self.log)
        most, first = 0, 0
        for i, at in enumerate(times):
            while at - times[first] >= 60.0:
                first += 1
            most = max(most, i - first + 1)
        return most
