"""The venue's side of Gemini's new WebSocket API (``wss://ws.gemini.com``), market data only.

Served at ``/`` on the venue's aiohttp app, from the same :class:`MarketEvent`s the v1 and v2
endpoints render. A connection may ask for an initial book per depth subscription with
``?snapshot=-1`` (the whole book) or ``?snapshot=N`` (N levels a side). Requests are
``{"id", "method", "params"}``; answers ``{"id", "status": 200, "result"}`` or
``{"id", "status": 4xx, "error": {"code", "msg"}}``.

Streams: ``{symbol}@depth@100ms`` and ``{symbol}@depth`` (``depthUpdate`` frames) and
``{symbol}@trade`` (``trade`` frames), symbols in lower case.

Update ids: the venue keeps one counter per symbol, moved by one for every market event
that changes the symbol's book; a ``depthUpdate``'s ``U``..``u`` are the ids it covers and a
snapshot's ``lastUpdateId`` is the id of the last event in it. The venue sends one
``depthUpdate`` per market event (so ``U == u``) and does NOT batch by 100 ms: clients must
accept any batching, and one frame per event lets tests compare books at every change.

What the docs leave open, and this venue does (the client reads the same; see
``pipeline/gemini/marketdata.py``):

- the initial book is one frame ``{"lastUpdateId", "s", "bids", "asks"}`` (the ``depth``
  method's result plus the symbol), sent when the depth subscription is made, or, when the
  symbol has no book yet, with the event that creates it (:func:`snapshot_frame`);
- the recent trades a recorded v2 snapshot carries are history, not sent as ``trade`` frames;
- event times ``E`` are nanoseconds: the event's exchange time, else its recorded time.

Adding methods: every request goes through :attr:`WsApi.methods`, a table of method name to
``async handler(conn, params) -> result`` (raise :class:`ApiError` to refuse). Authenticated
trading (``order.place``, ``order.cancel``...) and an ``orders@account`` stream belong in this
module later: register the handlers in ``WsApi.__init__`` (authentication per connection on
:class:`WsConnection`) and add the stream kind to :data:`STREAM_KINDS`. Not implemented here.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import web

from pipeline.venue.market import Book, MarketEvent, capture_events

if TYPE_CHECKING:
    from pipeline.venue.server import Venue

# The status and error code of each way a request can be refused, in one place.
BAD_REQUEST = (400, -1102)  # not JSON, no method, params of the wrong shape
UNKNOWN_METHOD = (400, -1002)
UNKNOWN_SYMBOL = (400, -1121)
UNKNOWN_STREAM = (400, -1100)

STREAM = re.compile(r"^([a-z0-9]+)@([a-z0-9@]+)$")
DEPTH_STREAMS = ("depth@100ms", "depth")
STREAM_KINDS = DEPTH_STREAMS + ("trade",)  # an orders@account stream would join here
_JSON = {"separators": (",", ":")}


class ApiError(Exception):
    """A refused request: its HTTP-like status, Gemini's error code and message."""

    def __init__(self, kind: tuple[int, int], msg: str) -> None:
        super().__init__(msg)
        self.status, self.code, self.msg = kind[0], kind[1], msg


def snapshot_frame(symbol: str, last_update_id: int, book: Book, levels: int | None) -> str:
    """The initial-book frame of a depth subscription (this venue's reading of the docs)."""
    return json.dumps({"lastUpdateId": last_update_id, "s": symbol.lower(),
                       **_depth(book, levels)}, **_JSON)


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
        self._known: set[str] | None = None
        Handler = Callable[["WsConnection", Any], Awaitable[Any]]
        self.methods: dict[str, Handler] = {
            "SUBSCRIBE": self._subscribe,
            "UNSUBSCRIBE": self._unsubscribe,
            "LIST_SUBSCRIPTIONS": self._list_subscriptions,
            "depth": self._depth_method,
            "ping": self._ping,
            "time": self._time,
            # trading methods (order.place, ...) register here, see the module docstring
        }

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/", self.handle)]

    # -- connections

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        from pipeline.venue.server import Connection  # the venue's, not re-implemented

        raw = request.query.get("snapshot")
        try:
            levels = None if raw is None else int(raw)
            if levels is not None and levels < -1:
                raise ValueError(raw)
        except ValueError:
            raise web.HTTPBadRequest(text=f"snapshot must be -1 or a number of levels, "
                                          f"not {raw!r}") from None
        ws = web.WebSocketResponse(autoping=True, max_msg_size=2**20)
        await ws.prepare(request)
        conn = WsConnection(Connection(ws, request, "ws"), levels)
        self.connections.add(conn)
        try:
            return await self.venue._serve(request, conn.base,
                                           lambda text: self._on_text(conn, text))
        finally:
            self.connections.discard(conn)

    async def _on_text(self, conn: WsConnection, text: str) -> None:
        request_id = None
        try:
            try:
                message = json.loads(text)
            except ValueError:
                raise ApiError(BAD_REQUEST, "the request is not JSON") from None
            if not isinstance(message, dict):
                raise ApiError(BAD_REQUEST, "the request is not a JSON object")
            request_id = message.get("id")
            method = message.get("method")
            if not isinstance(method, str):
                raise ApiError(BAD_REQUEST, "the request has no method")
            handler = self.methods.get(method)
            if handler is None:
                raise ApiError(UNKNOWN_METHOD, f"unknown method {method!r}")
            result = await handler(conn, message.get("params"))
        except ApiError as exc:
            await conn.put(json.dumps({"id": request_id, "status": exc.status,
                                       "error": {"code": exc.code, "msg": exc.msg}}, **_JSON))
            return
        finally:
            follow, conn.follow = conn.follow, []
        await conn.put(json.dumps({"id": request_id, "status": 200, "result": result}, **_JSON))
        for frame in follow:  # what the method started comes after its answer
            await conn.put(frame)

    # -- methods

    def _streams(self, params: Any) -> list[tuple[str, str, str]]:
        if not (isinstance(params, list) and params and all(isinstance(p, str) for p in params)):
            raise ApiError(BAD_REQUEST, "params must be a list of stream names")
        out = []
        for name in params:
            match = STREAM.match(name)
            if match is None or match.group(2) not in STREAM_KINDS:
                raise ApiError(UNKNOWN_STREAM, f"unknown stream {name!r}")
            out.append((name, self._symbol(match.group(1)), match.group(2)))
        return out

    def _symbol(self, raw: Any) -> str:
        symbol = raw.upper() if isinstance(raw, str) else ""
        if symbol not in self._known_symbols():
            raise ApiError(UNKNOWN_SYMBOL, f"unknown symbol {raw!r}")
        return symbol

    def _known_symbols(self) -> set[str]:
        if self._known is None:
            config = self.venue.config
            self._known = ({e.symbol for e in capture_events(config.capture)}
                           if config.capture is not None else {s.upper() for s in config.symbols})
        return self._known | set(self.venue.market.books)

    async def _subscribe(self, conn: WsConnection, params: Any) -> None:
        for name, symbol, kind in self._streams(params):
            new_depth = kind in DEPTH_STREAMS and not conn.has_depth(symbol)
            conn.streams.add(name)
            conn.base.symbols.add(symbol)
            if new_depth and conn.snapshot_levels is not None:
                if self.venue.market.has_book(symbol):
                    conn.follow.append(self._snapshot(conn, symbol))
                else:
                    conn.awaiting.add(symbol)  # sent with the event that creates the book
        self.venue._subscribed.set()

    async def _unsubscribe(self, conn: WsConnection, params: Any) -> None:
        for name, symbol, kind in self._streams(params):
            conn.streams.discard(name)
            if not conn.has_depth(symbol):
                conn.awaiting.discard(symbol)
            if not any(STREAM.match(s).group(1) == symbol.lower() for s in conn.streams):
                conn.base.symbols.discard(symbol)

    async def _list_subscriptions(self, conn: WsConnection, params: Any) -> list[str]:
        return sorted(conn.streams)

    async def _depth_method(self, conn: WsConnection, params: Any) -> dict:
        if not isinstance(params, dict):
            raise ApiError(BAD_REQUEST, "params must be {symbol, limit}")
        symbol = self._symbol(params.get("symbol"))
        limit = params.get("limit")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ApiError(BAD_REQUEST, f"limit must be a positive integer, not {limit!r}")
        book = self.venue.market.books.get(symbol, Book())
        return {"lastUpdateId": self.update_ids[symbol], **_depth(book, limit)}

    async def _ping(self, conn: WsConnection, params: Any) -> dict:
        return {}

    async def _time(self, conn: WsConnection, params: Any) -> dict:
        return {"serverTime": time.time_ns()}

    # -- market events

    def _snapshot(self, conn: WsConnection, symbol: str) -> str:
        levels = None if conn.snapshot_levels in (-1, 0) else conn.snapshot_levels
        return snapshot_frame(symbol, self.update_ids[symbol], self.venue.market.books[symbol],
                              levels)

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
                await conn.put(self._snapshot(conn, symbol))
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
        self.snapshot_levels = snapshot_levels  # None: no initial book; -1: whole book
        self.streams: set[str] = set()
        self.awaiting: set[str] = set()  # depth subscriptions whose book does not exist yet
        self.lost: Counter[str] = Counter()  # skip_update_id faults still to apply
        self.follow: list[str] = []  # frames to send after the answer being prepared

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
    trade_id = trade.get("tid", trade.get("event_id"))
    side = trade.get("side")
    maker = "" if side not in ("buy", "sell") else \
        f',"m":{"true" if side == "sell" else "false"}'  # the buyer made the market
    return _TRADE % (trade["timestamp"] * 1_000_000, symbol, trade_id, trade["price"],
                     trade["quantity"], trade["timestamp"], maker)


# Hand-built like render_v2: symbols and decimal strings never need JSON escaping.
_DEPTH = '{"e":"depthUpdate","E":%d,"s":"%s","U":%d,"u":%d,"b":[%s],"a":[%s]}'
_LEVEL = '["%s","%s"]'
_TRADE = '{"e":"trade","E":%d,"s":"%s","t":%d,"p":"%s","q":"%s","T":%d%s}'
