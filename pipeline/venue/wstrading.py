"""The venue's trading over Gemini's new WebSocket API: the authenticated handshake, the
order methods and the ``orders@account`` / ``orders@session`` streams.

It plugs into :class:`~pipeline.venue.wsapi.WsApi` (its methods table and connection
hooks) and trades on the same :class:`~pipeline.venue.exchange.Exchange` as the REST side,
so an order placed either way is one order, and its events reach every authenticated
connection of its key.

Authentication, as developer.gemini.com/websocket/authentication documents: on the upgrade,
``X-GEMINI-APIKEY``, ``X-GEMINI-NONCE`` (epoch seconds), ``X-GEMINI-PAYLOAD`` =
base64(nonce text) and ``X-GEMINI-SIGNATURE`` = hex HMAC-SHA384 of the payload under the
secret. Only account-scoped keys with a time-based nonce are accepted (a master key, or an
increasing-nonce key, gets HTTP 401, as Gemini documents for master keys). A connection
without the headers is a market-data connection; its private calls get 401 / -1002.

What the docs leave open, and this venue does (one place: the client in
``pipeline/gemini/ws_execution.py`` reads exactly this):
- the nonce window is REST's +/- 30 s; an upgrade outside it, a bad signature or an unknown
  key is refused with HTTP 401 and a text saying which;
- ``order.place`` answers ``{"orderId": "<id>", "clientOrderId": ...}``; a refused order is
  ``status 400, code -2010`` with ``msg`` = ``"<Reason>: <text>"`` (Gemini's reason names of
  the order-event list where one fits: UnknownInstrument, DuplicateOrder, InvalidPrice,
  InvalidQuantity, InsufficientFunds, MarketNotOpen), and a REJECTED order event follows;
- ``order.cancel`` answers ``{"orderId", "status"}``; an unknown order is ``400, -1013``
  with ``msg`` ``"OrderNotFound: ..."``; ``order.cancel_all`` / ``order.cancel_session``
  answer ``{"cancelledOrders": [ids]}``. The session is the connection: cancel_session and
  ``cancelOnDisconnect=true`` cancel the live orders placed over this connection (the
  latter with the reason ``CancelOnDisconnect``, in its events and the REST status);
- order events (``e: orderUpdate``): NEW when accepted, OPEN when it rests, PARTIALLY_FILLED
  / FILLED per fill (``Z`` the fill's amount, ``L`` its price, ``t`` its trade id, ``n`` its
  fee, ``N`` the fee currency as Gemini's Go SDK names it, ``m`` true for a maker fill),
  CANCELED (``r`` the system reason, ``Requested`` for a user's cancel, ``Z`` cumulative),
  REJECTED (``r``). Symbols upper case, as the docs' order-event example; times in ns;
- orders are LIMIT only (MARKET is refused with -1013): the pipeline sends market orders as
  immediate-or-cancel limits. The rate is REST's (10 a second, 5 queued), then 429 / -1003.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pipeline.venue.exchange import Exchange, ExchangeError, Fill, Order
from pipeline.venue.rest import NONCE_WINDOW_S, RateGate, RestFaults, VenueKey, decimal_text

if TYPE_CHECKING:
    from pipeline.venue.wsapi import WsApi, WsConnection

from pipeline.venue.wsapi import AUTH_REQUIRED, INVALID_PARAMETERS, NO_RESULT, ApiError

RATE_LIMITED = (429, -1003)
ORDER_REJECTED = (400, -2010)
PRIVATE_STREAMS = ("orders@account", "orders@session")  # balances@account: not emulated
TIME_IN_FORCE = {"GTC": (), "IOC": ("immediate-or-cancel",), "FOK": ("fill-or-kill",),
                 "MOC": ("maker-or-cancel",)}
# The exchange's REST reason names, as the order-event list spells them.
EVENT_REASONS = {"InvalidSymbol": "UnknownInstrument", "DuplicateClientOrderId": "DuplicateOrder"}
_JSON = {"separators": (",", ":")}


@dataclass
class Session:
    """An authenticated connection: its key, what it placed, what it follows."""

    api_key: str
    cancel_on_disconnect: bool
    streams: set[str] = field(default_factory=set)
    placed: set[int] = field(default_factory=set)  # order ids placed over this connection


class WsTrading:
    """Registers the trading methods and streams on ``api``; listens to ``exchange``."""

    def __init__(self, api: "WsApi", exchange: Exchange, keys: dict[str, VenueKey],
                 faults: RestFaults | None = None) -> None:
        self.api, self.exchange, self.keys = api, exchange, keys
        self.faults = faults if faults is not None else RestFaults()
        self.gate = RateGate()
        self.log: list[dict[str, Any]] = []  # one per order method call (tests' witness)
        self._public = {name: api.methods[name] for name in
                        ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS")}
        api.methods.update({
            "SUBSCRIBE": self._subscribe, "UNSUBSCRIBE": self._unsubscribe,
            "LIST_SUBSCRIPTIONS": self._list_subscriptions, "subscribe": self._subscribe,
            "unsubscribe": self._unsubscribe, "list_subscriptions": self._list_subscriptions,
            "order.place": self._place, "order.cancel": self._cancel,
            "order.cancel_all": self._cancel_all, "order.cancel_session": self._cancel_session,
        })
        api.authenticate = self.authenticate
        api.on_close.append(self.closed)
        exchange.listeners.append(self._on_exchange)

    # -- connections

    def authenticate(self, request: web.Request) -> Session | None:
        """The upgrade's session, None without credentials; raises 401 when they are bad."""
        headers = request.headers
        names = ("X-GEMINI-APIKEY", "X-GEMINI-NONCE", "X-GEMINI-PAYLOAD", "X-GEMINI-SIGNATURE")
        given = [headers.get(name) for name in names]
        if not any(given):
            return None
        if not all(given):
            missing = [name for name, value in zip(names, given) if not value]
            raise web.HTTPUnauthorized(text=f"missing {missing}")
        api_key, nonce, payload, signature = given
        key = self.keys.get(api_key)
        if key is None:
            raise web.HTTPUnauthorized(text="unknown API key")
        if key.accounts or not key.time_nonce:
            raise web.HTTPUnauthorized(text="only account-scoped keys with a time-based nonce "
                                            "are accepted")
        try:
            claimed = base64.b64decode(payload, validate=True).decode("ascii")
        except (binascii.Error, UnicodeDecodeError):
            raise web.HTTPUnauthorized(text="the payload is not base64") from None
        expected = hmac.new(key.secret.encode(), payload.encode(), hashlib.sha384).hexdigest()
        if claimed != nonce or not hmac.compare_digest(expected, signature):
            raise web.HTTPUnauthorized(text="the signature does not match the payload")
        if not nonce.isdigit() or abs(int(nonce) - time.time()) > NONCE_WINDOW_S:
            raise web.HTTPUnauthorized(text=f"the nonce must be the time in seconds, within "
                                            f"{NONCE_WINDOW_S} s of the server's")
        cancel = request.query.get("cancelOnDisconnect", "false").lower() == "true"
        return Session(api_key, cancel)

    async def closed(self, conn: "WsConnection") -> None:
        session = conn.session
        if session is not None and session.cancel_on_disconnect:
            for order in self._live_placed(session):
                self.exchange.cancel(session.api_key, order.order_id, "CancelOnDisconnect")

    def _live_placed(self, session: Session) -> list[Order]:
        """The live orders placed over this connection, by order id."""
        return [order for order in self.exchange.active_orders(session.api_key)
                if order.order_id in session.placed]

    def _session(self, conn: "WsConnection") -> Session:
        session = conn.session
        if session is None:
            raise ApiError(AUTH_REQUIRED, "Authentication required")
        return session

    # -- subscriptions: the private streams here, the rest to the market-data side

    def _split(self, params: Any) -> tuple[list[str], list[str]]:
        if not (isinstance(params, list) and all(isinstance(p, str) for p in params)):
            raise ApiError(INVALID_PARAMETERS,
                           "Invalid parameters: params must be an array of stream names")
        return ([p for p in params if p in PRIVATE_STREAMS],
                [p for p in params if p not in PRIVATE_STREAMS])

    async def _subscribe(self, conn: "WsConnection", params: Any) -> Any:
        private, public = self._split(params)
        if private:
            self._session(conn).streams.update(private)
        return await self._public["SUBSCRIBE"](conn, public) if public else NO_RESULT

    async def _unsubscribe(self, conn: "WsConnection", params: Any) -> Any:
        private, public = self._split(params)
        if private and conn.session is not None:
            conn.session.streams.difference_update(private)
        return await self._public["UNSUBSCRIBE"](conn, public) if public else NO_RESULT

    async def _list_subscriptions(self, conn: "WsConnection", params: Any) -> list[str]:
        public = await self._public["LIST_SUBSCRIPTIONS"](conn, params)
        session = conn.session
        return sorted(list(public or ()) + sorted(session.streams if session else ()))

    # -- orders

    async def _admit(self, session: Session) -> None:
        wait = self.gate.admit(session.api_key)
        if wait is None:
            raise ApiError(RATE_LIMITED, "Rate limit exceeded")
        if wait:
            await asyncio.sleep(wait)

    async def _place(self, conn: "WsConnection", params: Any) -> dict:
        session = self._session(conn)
        if not isinstance(params, dict):
            raise ApiError(INVALID_PARAMETERS, "params must be an object")
        cid = params.get("clientOrderId")
        fault = self.faults.take("order.place")
        action = fault["action"] if fault else None
        entry = {"method": "order.place", "api_key": session.api_key, "client_order_id": cid}
        self.log.append(entry)
        if action == "rate_limit":
            entry["outcome"] = "RateLimit"
            raise ApiError(RATE_LIMITED, "Rate limit exceeded")
        if action == "error_before":
            entry["outcome"] = "System"
            raise ApiError((int(fault.get("status", 500)), -1000), "Internal server error")
        await self._admit(session)
        missing = [f for f in ("symbol", "side", "type", "timeInForce", "quantity")
                   if f not in params]
        if missing:
            entry["outcome"] = "InvalidParameters"
            raise ApiError(INVALID_PARAMETERS, f"missing {', '.join(missing)}")
        if params["type"] != "LIMIT" or params["timeInForce"] not in TIME_IN_FORCE or \
                params["side"] not in ("BUY", "SELL") or "price" not in params:
            entry["outcome"] = "InvalidParameters"
            raise ApiError(INVALID_PARAMETERS, "the venue takes LIMIT orders with a price, side "
                           "BUY or SELL and timeInForce GTC, IOC, FOK or MOC")
        try:
            order = self.exchange.new_order(
                session.api_key, str(params["symbol"]), params["quantity"], params["price"],
                params["side"].lower(), options=TIME_IN_FORCE[params["timeInForce"]],
                client_order_id=cid)
        except ExchangeError as exc:
            reason = EVENT_REASONS.get(exc.reason, exc.reason)
            entry["outcome"] = reason
            self._broadcast(session.api_key, None, _rejected(params, reason))
            raise ApiError(ORDER_REJECTED, f"{reason}: {exc.message}") from None
        entry["outcome"] = "accepted"
        entry["at"] = time.perf_counter()  # when acknowledged (latency benchmarks)
        session.placed.add(order.order_id)
        if action == "error_after":
            raise ApiError((int(fault.get("status", 500)), -1000), "Internal server error")
        if action == "drop_after":
            conn.base.drop()  # executed; the answer never leaves
        if action == "stall_after":
            await asyncio.sleep(float(fault.get("seconds", 2.0)))
        return {"orderId": str(order.order_id), "clientOrderId": cid}

    async def _cancel(self, conn: "WsConnection", params: Any) -> dict:
        session = self._session(conn)
        order_id = params.get("orderId") if isinstance(params, dict) else None
        if isinstance(order_id, bool) or not str(order_id).isdigit():
            raise ApiError(INVALID_PARAMETERS, f"orderId must be an order id, got {order_id!r}")
        await self._admit(session)
        self.log.append({"method": "order.cancel", "api_key": session.api_key,
                         "order_id": int(order_id)})
        try:
            order = self.exchange.cancel(session.api_key, int(order_id))
        except ExchangeError as exc:
            raise ApiError(INVALID_PARAMETERS, f"{exc.reason}: {exc.message}") from None
        return {"orderId": str(order.order_id), "status": _status(order)}

    async def _cancel_all(self, conn: "WsConnection", params: Any) -> dict:
        session = self._session(conn)
        await self._admit(session)
        self.log.append({"method": "order.cancel_all", "api_key": session.api_key})
        cancelled = self.exchange.cancel_all(session.api_key)
        return {"cancelledOrders": [str(o.order_id) for o in cancelled]}

    async def _cancel_session(self, conn: "WsConnection", params: Any) -> dict:
        session = self._session(conn)
        await self._admit(session)
        self.log.append({"method": "order.cancel_session", "api_key": session.api_key})
        cancelled = [self.exchange.cancel(session.api_key, order.order_id)
                     for order in self._live_placed(session)]
        return {"cancelledOrders": [str(order.order_id) for order in cancelled]}

    # -- events

    def _on_exchange(self, status: str, order: Order, fill: Fill | None) -> None:
        self._broadcast(order.api_key, order.order_id, _order_update(status, order, fill))

    def _broadcast(self, api_key: str, order_id: int | None, frame: str) -> None:
        for conn in list(self.api.connections):
            session = conn.session
            if session is None or session.api_key != api_key or conn.base.closed:
                continue
            if "orders@account" in session.streams or (
                    "orders@session" in session.streams and order_id in session.placed):
                try:
                    conn.base.queue.put_nowait(frame)
                except Exception:  # noqa: BLE001 - a full queue: the client is too slow
                    conn.base.drop()


def _ns() -> int:
    return time.time_ns()


def _status(order: Order) -> str:
    if order.is_cancelled:
        return "CANCELED"
    if not order.is_live:
        return "FILLED"
    return "PARTIALLY_FILLED" if order.executed_amount else "OPEN"


def _order_update(status: str, order: Order, fill: Fill | None) -> str:
    now = _ns()
    event: dict[str, Any] = {
        "e": "orderUpdate", "E": now, "s": order.symbol, "i": order.order_id,
        "c": order.client_order_id, "S": order.side.upper(), "o": "LIMIT", "X": status,
        "p": decimal_text(order.price), "q": decimal_text(order.original_amount),
        "z": decimal_text(order.remaining_amount), "T": now}
    if fill is not None:
        event.update({"Z": decimal_text(fill.amount), "L": decimal_text(fill.price), "t": fill.tid,
                      "n": decimal_text(fill.fee), "N": fill.fee_currency,
                      "m": not fill.aggressor})
    else:
        event["Z"] = decimal_text(order.executed_amount)
    if status == "CANCELED":
        event["r"] = order.cancel_reason or "Requested"
    return json.dumps(event, **_JSON)


def _rejected(params: dict, reason: str) -> str:
    now = _ns()
    return json.dumps({"e": "orderUpdate", "E": now, "s": str(params.get("symbol", "")).upper(),
                       "c": params.get("clientOrderId"), "S": params.get("side"),
                       "o": params.get("type"), "X": "REJECTED", "r": reason, "T": now},
                      **_JSON)
