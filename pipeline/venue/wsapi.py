"""The venue's side of Gemini's new WebSocket API (``wss://ws.gemini.com``), market data only.

Served at ``/`` (the only path Gemini documents) on the venue's aiohttp app, from the same
:class:`MarketEvent`s the v1 and v2 endpoints render; shapes follow /work/gemini_ws_spec.md.
A connection may ask for an initial book per depth subscription with ``?snapshot=-1`` (the
whole book) or ``?snapshot=N`` (N levels a side); without it (or 0) only updates come.
Requests are ``{"id", "method", "params"}``; answers ``{"id", "status": 200[, "result"]}``
(SUBSCRIBE, UNSUBSCRIBE and ping carry no result, as Gemini's examples) or
``{"id", "status": 4xx, "error": {"code", "msg"}}`` with Gemini's documented codes.

Streams: ``{symbol}@depth@100ms`` and ``{symbol}@depth`` (``depthUpdate`` frames) and
``{symbol}@trade`` (trade frames, which have no ``e``, as documented).

Update ids: the venue keeps one counter per symbol, moved by one for every market event
that changes the symbol's book; a ``depthUpdate``'s ``U``..``u`` are the ids it covers
(Binance's inclusive reading: the next frame starts at ``u + 1``). The initial book is, as
Gemini's AsyncAPI contract says, the first ``depthUpdate`` after subscribing, holding
absolute levels, with ``U == u`` the id of the last event in it; it is sent before the
subscription's answer (as third parties observe on Gemini) or, when the symbol has no book
yet, with the event that creates it. The venue sends one ``depthUpdate`` per market event
and does NOT batch by 100 ms: clients must accept any batching, and one frame per event
lets tests compare books at every change.

Also emulated where the docs are silent: the recent trades a recorded v2 snapshot carries
are history and are not sent as trade frames; event times ``E`` (nanoseconds) are the
event's exchange time, else its recorded time; ``time`` answers milliseconds as a bare
number; stream names are read case-insensitively; WebSocket pings every 20 s.

Adding methods: every request goes through :attr:`WsApi.methods`, a table of method name to
``async handler(conn, params) -> result`` (return :data:`NO_RESULT` for a bare answer, raise
:class:`ApiError` to refuse). Authenticated trading (``order.place``, ``order.cancel``,
``order.cancel_all``, ``order.cancel_session``) and the ``orders@account`` stream plug in
here: until they do, they answer ``-1002 Authentication required`` (no connection is
authenticated); a trading module replaces those entries of :attr:`WsApi.methods`,
authenticates the handshake in :meth:`WsApi.handle` (a session per connection) and serves
the account streams beside :meth:`WsApi.publish`. This module implements none of it.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import web

from pipeline.venue.market import Book, MarketEvent

if TYPE_CHECKING:
    from pipeline.venue.server import Venue

# Gemini's documented (status, code) of each way a request can be refused, in one place.
INVALID_PARAMETERS = (400, -1013)  # also unknown streams and symbols, and unparsable requests
UNSUPPORTED = (400, -1020)  # an unknown method
AUTH_REQUIRED = (401, -1002)

STREAM = re.compile(r"^([a-z0-9]+)@([a-z0-9@]+)$")
DEPTH_STREAMS = ("depth@100ms", "depth")
STREAM_KINDS = DEPTH_STREAMS + ("trade",)
ACCOUNT_STREAMS = ("orders@account", "orders@session", "balances@account",
                   "balances@account@1s")  # need an authenticated connection
TRADING_METHODS = ("order.place", "order.cancel", "order.cancel_all", "order.cancel_session")
NO_RESULT = object()  # a handler's answer without a ``result`` key
_JSON = {"separators": (",", ":")}


class ApiError(Exception):
    """A refused request: its HTTP-like status, Gemini's error code and message."""

    def __init__(self, kind: tuple[int, int], msg: str) -> None:
        super().__init__(msg)
        self.status, self.code, self.msg = kind[0], kind[1], msg


def snapshot_frame(symbol: str, update_id: int, book: Book, levels: int | None,
                   event_ns: int) -> str:
    """The initial book of a depth subscription: a ``depthUpdate`` of absolute levels."""
    depth = _depth(book, levels)
    return _DEPTH % (event_ns, symbol.lower(), update_id, update_id,
                     ",".join(_LEVEL % tuple(level) for level in depth["bids"]),
                     ",".join(_LEVEL % tuple(level) for level in depth["asks"]))


def _depth(book: Book, levels: int | None) -> dict:
    bids, asks = book.sorted_levels("bid"), book.sorted_levels("ask")
    if levels is not None:
        bids, asks = bids[:levels], asks[:levels]
    return {"bids": [list(level) for level in bids], "asks": [list(level) for level in asks]}


def _event_ns(event: MarketEvent) -> int:
    if event.ts_ms:
        return event.ts_ms * 1_000_000
    if event.at_s:
        return int(round(event.at_s * 1e6)) * 1000
    return time.time_ns()


class WsApi:
    """The new API on one venue: connections, per-symbol update ids, method dispatch."""

    def __init__(self, venue: Venue) -> None:
        self.venue = venue
        self.update_ids: Counter[str] = Counter()  # symbol -> id of its last book change
        self.connections: set[WsConnection] = set()
        Handler = Callable[["WsConnection", Any], Awaitable[Any]]
        self.methods: dict[str, Handler] = {
            "SUBSCRIBE": self._subscribe, "subscribe": self._subscribe,
            "UNSUBSCRIBE": self._unsubscribe, "unsubscribe": self._unsubscribe,
            "LIST_SUBSCRIPTIONS": self._list_subscriptions,
            "list_subscriptions": self._list_subscriptions,
            "depth": self._depth_method,
            "ping": self._ping,
            "time": self._time,
            # trading: pipeline.venue.wstrading replaces these when the venue has API keys
            **{name: self._authentication_required for name in TRADING_METHODS},
        }
        # The trading side's hooks (pipeline.venue.wstrading): the upgrade's session (None:
        # market data only; it may refuse the upgrade with a 401), and a connection's end.
        self.authenticate: Callable[[web.Request], Any] | None = None
        self.on_close: list[Callable[["WsConnection"], Awaitable[None]]] = []

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/", self.handle)]

    # -- connections

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        from pipeline.venue.server import Connection  # the venue's, not re-implemented

        raw = request.query.get("snapshot", "0")
        try:
            levels = int(raw)  # 0: none (the default), negative: the whole book, N: N levels
        except ValueError:
            raise web.HTTPBadRequest(text=f"snapshot must be an integer, not {raw!r}") from None
        session = self.authenticate(request) if self.authenticate is not None else None
        ws = web.WebSocketResponse(autoping=True, heartbeat=20.0, max_msg_size=2**20)
        await ws.prepare(request)
        conn = WsConnection(Connection(ws, request, "ws"), levels)
        conn.session = session
        if self.venue.config.record_sends:  # every frame, as the producer numbers them
            conn.base.sent_at = []
        self.connections.add(conn)
        try:
            return await self.venue._serve(request, conn.base,
                                           lambda text: self._on_text(conn, text))
        finally:
            self.connections.discard(conn)
            for hook in self.on_close:
                await hook(conn)

    async def _on_text(self, conn: WsConnection, text: str) -> None:
        request_id = None
        try:
            try:
                message = json.loads(text)
            except ValueError:
                raise ApiError(INVALID_PARAMETERS, "Invalid parameters: not JSON") from None
            if not isinstance(message, dict):
                raise ApiError(INVALID_PARAMETERS, "Invalid parameters: not a JSON object")
            request_id = message.get("id")
            handler = self.methods.get(message.get("method"))
            if handler is None:
                raise ApiError(UNSUPPORTED, "Unsupported operation")
            result = await handler(conn, message.get("params"))
        except ApiError as exc:
            await conn.put(json.dumps({"id": request_id, "status": exc.status,
                                       "error": {"code": exc.code, "msg": exc.msg}}, **_JSON))
            return
        answer = {"id": request_id, "status": 200}
        if result is not NO_RESULT:
            answer["result"] = result
        await conn.put(json.dumps(answer, **_JSON))

    # -- methods

    def _streams(self, params: Any) -> list[tuple[str, str, str]]:
        """(name, SYMBOL, kind) of each stream; one bad name refuses them all (as Gemini)."""
        if not (isinstance(params, list) and params and all(isinstance(p, str) for p in params)):
            raise ApiError(INVALID_PARAMETERS, "Invalid parameters: params must be an array "
                                               "of stream names")
        if any(name in ACCOUNT_STREAMS for name in params):
            raise ApiError(AUTH_REQUIRED, "Authentication required")
        out = []
        for name in params:
            match = STREAM.match(name.lower())
            if (match is None or match.group(2) not in STREAM_KINDS
                    or match.group(1).upper() not in self._known_symbols()):
                raise ApiError(INVALID_PARAMETERS, f"Invalid stream name: {name}")
            out.append((name.lower(), match.group(1).upper(), match.group(2)))
        return out

    def _symbol(self, raw: Any) -> str:
        symbol = raw.upper() if isinstance(raw, str) else ""
        if symbol not in self._known_symbols():
            raise ApiError(INVALID_PARAMETERS, f"Invalid symbol: {raw}")
        return symbol

    def _known_symbols(self) -> set[str]:
        """What the venue serves: the capture's or generator's symbols, and any book."""
        return self.venue.market.symbols()

    async def _subscribe(self, conn: WsConnection, params: Any) -> object:
        for name, symbol, kind in self._streams(params):
            new_depth = kind in DEPTH_STREAMS and not conn.has_depth(symbol)
            conn.streams.add(name)
            conn.base.symbols.add(symbol)
            if new_depth and conn.snapshot_levels:
                if self.venue.market.has_book(symbol):
                    await conn.put(self._snapshot(conn, symbol, time.time_ns()))
                else:
                    conn.awaiting.add(symbol)  # sent with the event that creates the book
        self.venue._subscribed.set()
        return NO_RESULT

    async def _unsubscribe(self, conn: WsConnection, params: Any) -> object:
        for name, symbol, _kind in self._streams(params):
            conn.streams.discard(name)
            if not conn.has_depth(symbol):
                conn.awaiting.discard(symbol)
            if not any(STREAM.match(s).group(1) == symbol.lower() for s in conn.streams):
                conn.base.symbols.discard(symbol)
        return NO_RESULT

    async def _list_subscriptions(self, conn: WsConnection, params: Any) -> list[str] | None:
        return sorted(conn.streams) or None  # Gemini's example: null with none

    async def _depth_method(self, conn: WsConnection, params: Any) -> dict:
        if not isinstance(params, dict):
            raise ApiError(INVALID_PARAMETERS, "Invalid parameters: params must be "
                                               "{symbol, limit}")
        symbol = self._symbol(params.get("symbol"))
        limit = params.get("limit", 100)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 5000:
            raise ApiError(INVALID_PARAMETERS, f"Invalid parameters: limit {limit!r} is not "
                                               "1 to 5000")
        book = self.venue.market.books.get(symbol, Book())
        return {"lastUpdateId": self.update_ids[symbol], **_depth(book, limit)}

    async def _ping(self, conn: WsConnection, params: Any) -> object:
        return NO_RESULT

    async def _time(self, conn: WsConnection, params: Any) -> int:
        return time.time_ns() // 1_000_000  # "milliseconds since Unix epoch"

    async def _authentication_required(self, conn: WsConnection, params: Any) -> object:
        raise ApiError(AUTH_REQUIRED, "Authentication required")

    # -- market events

    def _snapshot(self, conn: WsConnection, symbol: str, event_ns: int) -> str:
        levels = None if conn.snapshot_levels < 0 else conn.snapshot_levels
        return snapshot_frame(symbol, self.update_ids[symbol], self.venue.market.books[symbol],
                              levels, event_ns)

    async def publish(self, event: MarketEvent, changes: list[list[str]]) -> None:
        """After the market applied ``event``: give it its update id, send its frames.
        ``changes`` are the event's level changes (for a new full book, the difference)."""
        symbol = event.symbol
        changed = bool(event.changes) or event.snapshot
        if changed:
            self.update_ids[symbol] += 1
        uid = self.update_ids[symbol]
        subscribers = [c for c in self.connections if symbol in c.base.symbols
                       and not c.base.closed]
        if not subscribers:
            return
        low, event_ns = symbol.lower(), _event_ns(event)
        trades = [] if event.snapshot else [_trade_frame(t, low) for t in event.trades]
        update = (_DEPTH % (event_ns, low, uid, uid,
                            ",".join(_LEVEL % (c[1], c[2]) for c in changes if c[0] == "buy"),
                            ",".join(_LEVEL % (c[1], c[2]) for c in changes if c[0] == "sell"))
                  if changed else None)
        for conn in subscribers:
            if f"{low}@trade" in conn.streams:
                for frame in trades:
                    await conn.put(frame)
            if update is None or not conn.has_depth(symbol):
                continue
            if symbol in conn.awaiting:
                conn.awaiting.discard(symbol)
                await conn.put(self._snapshot(conn, symbol, event_ns))
            elif not conn.lose_update(symbol):
                await conn.put(update)

    def lose_update_ids(self, conn_base: Any, fault: dict) -> bool:
        """Fault ``skip_update_id``: the next ``depthUpdate`` of a symbol (``fault["symbol"]``,
        else whichever comes first) on this connection is never sent, so the one after
        starts an id late. False if ``conn_base`` is not a new-API connection."""
        for conn in self.connections:
            if conn.base is conn_base:
                key = str(fault.get("symbol") or "*").upper()
                conn.lost[key] += int(fault.get("count", 1))
                return True
        return False


class WsConnection:
    """A new-API client: the venue's :class:`Connection` (queue, faults) plus its streams."""

    def __init__(self, base: Any, snapshot_levels: int | None) -> None:
        self.base = base
        self.snapshot_levels = snapshot_levels  # 0: no initial book; < 0: the whole book
        self.streams: set[str] = set()
        self.awaiting: set[str] = set()  # depth subscriptions whose book does not exist yet
        self.lost: Counter[str] = Counter()  # skip_update_id faults still to apply
        self.session: Any = None  # the authenticated trading session (wstrading), if any

    def has_depth(self, symbol: str) -> bool:
        low = symbol.lower()
        return any(f"{low}@{kind}" in self.streams for kind in DEPTH_STREAMS)

    def lose_update(self, symbol: str) -> bool:
        for key in (symbol, "*"):
            if self.lost[key] > 0:
                self.lost[key] -= 1
                return True
        return False

    async def put(self, frame: str) -> None:
        await self.base.put(frame)


def _trade_frame(trade: dict, symbol: str) -> str:
    # v2's side is the taker's: a taker selling hit a buyer who was the maker
    return _TRADE % (trade["timestamp"] * 1_000_000, symbol,
                     trade.get("tid", trade.get("event_id")), trade["price"], trade["quantity"],
                     "true" if trade.get("side") == "sell" else "false")


# Hand-built like render_v2: symbols and decimal strings never need JSON escaping.
_DEPTH = '{"e":"depthUpdate","E":%d,"s":"%s","U":%d,"u":%d,"b":[%s],"a":[%s]}'
_LEVEL = '["%s","%s"]'
_TRADE = '{"E":%d,"s":"%s","t":%d,"p":"%s","q":"%s","m":%s}'
