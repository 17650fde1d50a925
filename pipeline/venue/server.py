"""The local Gemini venue's server: market data over WebSockets (the new API at ``/``, in
``pipeline/venue/wsapi.py``; the archived v2 and v1), the private REST API, and a control
endpoint for fault injection. Everything listens on loopback.

A single market task moves the books (replaying a capture or generating) and fans each
event out to the connections subscribed to its symbol. Every connection gets its own
snapshot first, exactly as Gemini does: the recorded snapshot frame if it was there from
the start, otherwise the venue's current book.

Control (JSON over HTTP, for tests and demos):
    POST /_venue/faults {"action": "drop" | "stall" | "skip_sequence" | "malformed"
                                   | "skip_update_id",
                         "seconds": 3, "after_events": 200}
    (skip_sequence: v1's next socket_sequence jumps; skip_update_id: the new API's next
    depthUpdate of a symbol, ``"symbol"`` or any, is lost, so the following one's U jumps)
    GET  /_venue/status

Public history, served whatever the keys (``pipeline/venue/history.py``):
    GET /v1/trades/{symbol}, GET /v2/candles/{symbol}/{time_frame}
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator

from aiohttp import WSMsgType, web

from pipeline.core.errors import PipelineError
from pipeline.venue.history import HistoryApi, TradeHistory
from pipeline.venue.market import (
    Book,
    Market,
    MarketEvent,
    capture_events,
    generated_events,
    looped_capture_events,
    render_v2,
)
from pipeline.venue.wsapi import WsApi

log = logging.getLogger(__name__)
MALFORMED = '{"type":"l2_updates","symbol":"BTCUSD","changes":[["buy","1'
FAULTS = ("drop", "stall", "skip_sequence", "malformed", "skip_update_id")


@dataclass
class VenueConfig:
    host: str = "127.0.0.1"
    port: int = 0
    capture: Path | None = None  # replay this recorded capture...
    symbols: list[str] = field(default_factory=lambda: ["BTCUSD", "ETHUSD"])  # ...or generate
    seed: int = 1
    depth: int = 50
    speed: float | None = None  # replay: None = as fast as possible, 1.0 = recorded speed
    rate: float | None = 200.0  # generator: events per second, None = as fast as possible
    heartbeat_s: float = 5.0
    start_on_subscribe: bool = True  # the market waits for the first subscriber
    loop: bool = False  # replay the capture again when it ends
    # REST: key -> secret, or VenueKey / {"secret", "time_nonce", "accounts"}
    api_keys: dict[str, Any] = field(default_factory=dict)
    record_sends: bool = False  # keep each connection's frame send times (latency benchmark)
    # keep the text of every frame sent on every connection, closed ones too (the chaos
    # run's witness of what the producer must have written to raw.frames)
    record_frames: bool = False
    # Public history (GET /v1/trades, /v2/candles; pipeline/venue/history.py): how many
    # trades each listed symbol has, ending when (epoch ms; None: the venue's start, to the
    # minute) and spanning how long; the public rate (Gemini: 120 requests a minute).
    history_trades: int = 2000
    history_end_ms: int | None = None
    history_span_ms: int = 3 * 86_400_000
    public_rate_per_min: int = 120


class Connection:
    """One client WebSocket: what it subscribed to, its queue, and its injected faults."""

    _ids = itertools.count(1)

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, version: str) -> None:
        self.id = next(self._ids)
        self.ws, self.request, self.version = ws, request, version
        self.symbols: set[str] = set()
        self.snapshotted: set[str] = set()
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize=4096)
        self.socket_sequence = 0
        self.stalled_until = 0.0
        self.closed = False
        self.heartbeats = False
        self.frames_sent = 0
        # time.perf_counter() as each frame went out, indexed like the producer's v2
        # ``sequence`` (the frame's 0-based index on its connection); None: not recorded.
        self.sent_at: list[float] | None = None
        self.sent: list[str] | None = None  # each frame's text, in order (record_frames)
        self.dropped = False  # ended by a drop fault (frames in flight are lost with it)

    @property
    def is_trading(self) -> bool:
        """An authenticated (order entry) connection of the new API, not market data."""
        return "X-GEMINI-APIKEY" in self.request.headers

    def next_sequence(self) -> int:
        sequence, self.socket_sequence = self.socket_sequence, self.socket_sequence + 1
        return sequence

    async def put(self, frame: str) -> None:
        if not self.closed:
            await self.queue.put(frame)

    async def sender(self) -> None:
        try:
            while not self.closed:
                frame = await self.queue.get()
                while time.monotonic() < self.stalled_until:
                    await asyncio.sleep(min(0.05, self.stalled_until - time.monotonic()))
                if self.sent_at is not None:
                    self.sent_at.append(time.perf_counter())
                if self.sent is not None:
                    self.sent.append(frame)
                await self.ws.send_str(frame)
                self.frames_sent += 1
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        self.closed = True
        while not self.queue.empty():  # unblock a market waiting on our queue
            self.queue.get_nowait()

    def drop(self) -> None:
        """Cut the TCP connection with no close frame, as a network failure would."""
        transport = self.request.transport
        if transport is not None:
            transport.abort()
        self.dropped = True
        self.close()


class Venue:
    def __init__(self, config: VenueConfig) -> None:
        self.config = config
        self.market = Market(listed=({e.symbol for e in capture_events(config.capture)}
                                     if config.capture is not None
                                     else {s.upper() for s in config.symbols}))
        self.connections: set[Connection] = set()
        self.history: list[Connection] = []  # every connection ever (record_frames)
        self.paused = False  # the market holds still (pause()) until resumed
        self.events = 0
        self.source_done = False
        self._scheduled: list[tuple[int, dict]] = []
        self._subscribed = asyncio.Event()
        self.wsapi = WsApi(self)
        self.app = web.Application()
        self.app.add_routes([
            *self.wsapi.routes(),
            web.get("/v2/marketdata", self.handle_v2),
            web.get("/v2/marketdata/", self.handle_v2),
            web.get("/v1/marketdata/{symbol}", self.handle_v1),
            web.post("/_venue/faults", self.handle_faults),
            web.get("/_venue/status", self.handle_status),
        ])
        self._add_rest()
        self.public_history = HistoryApi(TradeHistory(self.market.listed, config.history_trades,
                                               config.seed, config.history_end_ms,
                                               config.history_span_ms),
                                  config.public_rate_per_min)
        self.public_history.add_routes(self.app)
        self.app.on_startup.append(self._start_market)
        self.app.on_shutdown.append(self._close_connections)
        self.app.on_cleanup.append(self._stop_market)

    def _add_rest(self) -> None:
        if not self.config.api_keys:
            return
        from pipeline.venue.exchange import Exchange
        from pipeline.venue.rest import RestFaults, add_rest_routes
        from pipeline.venue.wstrading import WsTrading

        self.rest_log: list = []
        self.exchange = Exchange(self.market)
        self.order_faults = RestFaults()  # one set for both ways of trading
        auth = add_rest_routes(self.app, self.exchange, self.config.api_keys, self.rest_log,
                               self.order_faults)
        self.wstrading = WsTrading(self.wsapi, self.exchange, auth.keys, self.order_faults)

    # -- the market

    def _source(self) -> Iterator[MarketEvent]:
        if self.config.capture is not None:
            yield from (looped_capture_events if self.config.loop else capture_events)(
                self.config.capture)
        else:
            yield from generated_events(self.config.symbols, self.config.seed, self.config.depth)

    async def _start_market(self, app: web.Application) -> None:
        self._market_task = asyncio.create_task(self._run_market())

    async def _close_connections(self, app: web.Application) -> None:
        """Close every WebSocket, so a shutdown does not wait on open connections."""
        for conn in list(self.connections):
            conn.close()
            await conn.ws.close(code=1001, message=b"venue shutting down")

    async def _stop_market(self, app: web.Application) -> None:
        self._market_task.cancel()
        for conn in list(self.connections):
            conn.close()

    async def _run_market(self) -> None:
        if self.config.start_on_subscribe:
            await self._subscribed.wait()
        started, first_at = time.monotonic(), None
        pace = (1.0 / self.config.rate) if (self.config.capture is None and self.config.rate) \
            else None
        for n, event in enumerate(self._source()):
            if self.paused:
                held = time.monotonic()
                while self.paused:
                    await asyncio.sleep(0.05)
                started += time.monotonic() - held  # paced sources go on where they were
            if self.config.capture is not None and self.config.speed:
                first_at = event.at_s if first_at is None else first_at
                due = started + (event.at_s - first_at) / self.config.speed
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
            elif pace is not None:
                due = started + n * pace
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
            elif n % 64 == 0:
                await asyncio.sleep(0)
            await self._publish(event)
            self.events += 1
            await self._fire_scheduled()
        self.source_done = True
        log.info("venue: source exhausted after %d events", self.events)

    async def _publish(self, event: MarketEvent) -> None:
        subscribers = [c for c in self.connections if event.symbol in c.symbols and not c.closed
                       and c.version != "ws"]  # the new API's are the wsapi's to serve
        book = self.market.books.get(event.symbol)
        # Only v1 deltas and the diff of a new full book need the state before the event.
        needs_before = event.snapshot or any(c.version == "v1" for c in subscribers)
        before = _copy(book) if needs_before and book is not None else Book()
        self.market.apply(event)
        after = self.market.books[event.symbol]
        if hasattr(self, "exchange"):
            self.exchange.on_book_update(event.symbol)
        await self.wsapi.publish(event, _book_diff(before, after) if event.snapshot
                                 else event.changes)
        for conn in subscribers:
            if conn.version == "v2":
                for frame in self._v2_frames(conn, event, before, after):
                    await conn.put(frame)
            elif event.symbol not in conn.snapshotted:
                conn.snapshotted.add(event.symbol)
                await conn.put(self._v1_initial(conn, event.symbol))
            else:
                await conn.put(self._v1_frame(conn, event, before, after))

    def _v2_frames(self, conn: Connection, event: MarketEvent, before: Book, after: Book):
        if event.symbol not in conn.snapshotted:
            conn.snapshotted.add(event.symbol)
            if event.snapshot:
                return render_v2(event)  # the recorded snapshot, unchanged
            return render_v2(event, after.snapshot_changes(),
                             list(self.market.recent_trades[event.symbol]))
        if event.snapshot:  # a new full book on a live connection: send the difference
            diff = MarketEvent(event.symbol, _book_diff(before, after), event.trades)
            return render_v2(diff)
        return render_v2(event)

    def _v1_frame(self, conn: Connection, event: MarketEvent, before: Book, after: Book) -> str:
        changes = _book_diff(before, after) if event.snapshot else event.changes
        events = []
        for trade in event.trades:
            events.append({"type": "trade", "tid": trade["event_id"], "price": trade["price"],
                           "amount": trade["quantity"],
                           "makerSide": "ask" if trade.get("side") == "buy" else "bid"})
        reason = "trade" if event.trades else "place"
        for side, price, remaining in changes:
            old = (before.bids if side == "buy" else before.asks).get(price, "0")
            events.append({"type": "change", "side": "bid" if side == "buy" else "ask",
                           "price": price, "remaining": remaining,
                           "delta": str(Decimal(remaining) - Decimal(old)),
                           "reason": "cancel" if Decimal(remaining) == 0 and not event.trades
                           else reason})
        ts_ms = event.ts_ms or int(time.time() * 1000)
        return json.dumps({"type": "update", "eventId": self.events + 1, "timestamp": ts_ms // 1000,
                           "timestampms": ts_ms, "socket_sequence": conn.next_sequence(),
                           "events": events}, separators=(",", ":"))

    # -- WebSocket handlers

    async def _serve(self, request: web.Request, conn: Connection, on_text=None
                     ) -> web.WebSocketResponse:
        self.connections.add(conn)
        if self.config.record_frames:
            conn.sent = []
            self.history.append(conn)
        sender = asyncio.create_task(conn.sender())
        beats = asyncio.create_task(self._heartbeats(conn))
        try:
            async for msg in conn.ws:
                if msg.type == WSMsgType.TEXT and on_text is not None:
                    await on_text(msg.data)
                elif msg.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
                    break
        finally:
            conn.close()
            self.connections.discard(conn)
            sender.cancel()
            beats.cancel()
        return conn.ws

    async def handle_v2(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True, max_msg_size=2**20)
        await ws.prepare(request)
        conn = Connection(ws, request, "v2")
        conn.heartbeats = True
        if self.config.record_sends:
            conn.sent_at = []

        async def on_text(text: str) -> None:
            try:
                message = json.loads(text)
                assert message.get("type") == "subscribe"
                symbols = [s.upper() for sub in message["subscriptions"]
                           if sub.get("name") == "l2" for s in sub["symbols"]]
            except (ValueError, KeyError, TypeError, AssertionError):
                await conn.put(json.dumps({"type": "error", "reason": "InvalidJson",
                                           "message": "expected a subscribe request"}))
                return
            for symbol in symbols:
                conn.symbols.add(symbol)
                if self.market.has_book(symbol) and symbol not in conn.snapshotted:
                    conn.snapshotted.add(symbol)
                    snapshot = MarketEvent(symbol, [])
                    for frame in render_v2(snapshot, self.market.books[symbol].snapshot_changes(),
                                           list(self.market.recent_trades[symbol])):
                        conn.queue.put_nowait(frame)
            self._subscribed.set()

        return await self._serve(request, conn, on_text)

    async def handle_v1(self, request: web.Request) -> web.WebSocketResponse:
        symbol = request.match_info["symbol"].upper()
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        conn = Connection(ws, request, "v1")
        conn.heartbeats = request.query.get("heartbeat", "false").lower() == "true"
        conn.symbols.add(symbol)
        if self.market.has_book(symbol):
            conn.snapshotted.add(symbol)
            conn.queue.put_nowait(self._v1_initial(conn, symbol))
        self._subscribed.set()
        return await self._serve(request, conn)

    def _v1_initial(self, conn: Connection, symbol: str) -> str:
        book = self.market.books[symbol]
        events = [{"type": "change", "reason": "initial", "price": p, "delta": q, "remaining": q,
                   "side": "bid" if side == "buy" else "ask"}
                  for side, p, q in book.snapshot_changes()]
        return json.dumps({"type": "update", "eventId": self.events, "socket_sequence":
                           conn.next_sequence(), "events": events}, separators=(",", ":"))

    async def _heartbeats(self, conn: Connection) -> None:
        while not conn.closed:
            await asyncio.sleep(self.config.heartbeat_s)
            if not conn.heartbeats:
                continue
            if conn.version == "v2":
                await conn.put(json.dumps({"type": "heartbeat",
                                           "timestamp": int(time.time() * 1000)}))
            else:
                await conn.put(json.dumps({"type": "heartbeat",
                                           "socket_sequence": conn.next_sequence()}))

    # -- faults and status

    async def handle_faults(self, request: web.Request) -> web.Response:
        try:
            fault = await request.json()
            if fault.get("action") not in FAULTS:
                raise ValueError(f"action must be one of {', '.join(FAULTS)}")
        except ValueError as exc:
            return web.json_response({"result": "error", "message": str(exc)}, status=400)
        after = fault.get("after_events")
        if after is not None and after > self.events:
            self._scheduled.append((int(after), fault))
            return web.json_response({"result": "scheduled", "at_event": after})
        hit = await self.apply_fault(fault)
        return web.json_response({"result": "applied", "connections": hit})

    async def _fire_scheduled(self) -> None:
        due = [f for at, f in self._scheduled if at <= self.events]
        if due:
            self._scheduled = [(at, f) for at, f in self._scheduled if at > self.events]
            for fault in due:
                await self.apply_fault(fault)

    async def apply_fault(self, fault: dict, market_only: bool = False) -> int:
        """Apply ``fault`` (as ``POST /_venue/faults`` takes it) now; ``market_only``: only
        to market-data connections, not to authenticated trading ones. How many it hit."""
        targets = [c for c in self.connections if not c.closed and
                   (not fault.get("version") or c.version == fault["version"]) and
                   not (market_only and c.is_trading)]
        log.info("venue: fault %s on %d connection(s) at event %d", fault, len(targets),
                 self.events)
        for conn in targets:
            action = fault["action"]
            if action == "drop":
                conn.drop()
            elif action == "stall":
                conn.stalled_until = time.monotonic() + float(fault.get("seconds", 10))
            elif action == "skip_sequence":
                conn.socket_sequence += int(fault.get("count", 1))
            elif action == "malformed":
                await conn.put(MALFORMED)
            elif action == "skip_update_id":
                self.wsapi.lose_update_ids(conn, fault)
        return len(targets)

    async def handle_status(self, request: web.Request) -> web.Response:
        return web.json_response({
            "events": self.events, "source_done": self.source_done,
            "connections": [{"id": c.id, "version": c.version, "symbols": sorted(c.symbols),
                             "frames_sent": c.frames_sent} for c in self.connections],
            "symbols": sorted(self.market.books)})


def _copy(book: Book) -> Book:
    copy = Book()
    copy.bids, copy.asks = dict(book.bids), dict(book.asks)
    return copy


def _book_diff(before: Book, after: Book) -> list[list[str]]:
    """Level changes that turn ``before`` into ``after``."""
    changes = []
    for side, old, new in (("buy", before.bids, after.bids), ("sell", before.asks, after.asks)):
        changes += [[side, p, "0"] for p in old if p not in new]
        changes += [[side, p, q] for p, q in new.items() if old.get(p) != q]
    return changes


# --------------------------------------------------------------------------- running it


class RunningVenue:
    """A venue serving from a background thread (tests, demos): ``url``, ``stop()``."""

    def __init__(self, config: VenueConfig) -> None:
        self.config = config
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="venue", daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise PipelineError(f"the local venue did not start: {self._error}")

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.venue = Venue(self.config)
            self.runner = web.AppRunner(self.venue.app, handle_signals=False)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, self.config.host, self.config.port)
            self.loop.run_until_complete(site.start())
            self.port = self.runner.addresses[0][1]
        except BaseException as exc:  # noqa: BLE001 - reported by the constructor
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    @property
    def http_url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.config.host}:{self.port}"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(15)


def serve_forever(config: VenueConfig) -> None:
    """Run the venue in the foreground until SIGINT/SIGTERM (``pipeline venue``)."""
    venue = Venue(config)
    web.run_app(venue.app, host=config.host, port=config.port or 8090, print=None,
                handle_signals=True, shutdown_timeout=2.0)
