"""The local venue's private REST API: Gemini's endpoints, authentication and JSON.

Every request is checked as Gemini checks it, in this order, and refused with Gemini's
error shape ``{"result": "error", "reason": ..., "message": ...}``:

====================================  ==========================  ======
check                                 reason                      status
====================================  ==========================  ======
``X-GEMINI-APIKEY`` present           MissingApikeyHeader         400
``X-GEMINI-PAYLOAD`` present          MissingPayloadHeader        400
``X-GEMINI-SIGNATURE`` present        MissingSignatureHeader      400
the API key is known                  InvalidSignature            400
HMAC-SHA384 of the payload matches    InvalidSignature            400
payload is base64 of a JSON object    InvalidJson                 400
payload ``request`` is present        EndpointNotFound            400
payload ``request`` equals the path   EndpointMismatch            400
nonce > last accepted for the key     InvalidNonce                400
(time-based key) nonce within 30 s    InvalidNonce                400
(master key) ``account`` is its own   MissingAccount              400
under the key's rate                  RateLimit                   429
====================================  ==========================  ======

A key is an increasing-nonce key unless configured (:class:`VenueKey`) with a time-based
nonce: then the nonce is in seconds and must be within +/- 30 s of the venue's clock, as
Gemini documents; Gemini does not say whether a time-based nonce may repeat, and here it
may (several calls in one second share one). A master key names the sub-account of each
call in ``account``; Gemini documents no reason for a missing one, so it is
``MissingAccount`` here. The rate follows developer.gemini.com/rate-limit: 600 requests a
minute per key (10 a second), five more queued and served late, any further one refused
with 429 until the rate drops.

Faults for tests (:class:`RestFaults`, ``POST /_venue/order-faults``): the next matching
calls (a REST path, or a WebSocket method such as ``order.place``) can answer 500 after the
exchange executed them, an error (500, 429 or a given reason and status) before, a text
that is not JSON after executing (REST), stall past the client's timeout after executing,
or (WebSocket) drop the connection after executing, before the answer.

Gemini documents no reason for an unknown key, so it gets ``InvalidSignature`` (the
message says "unknown API key"). Gemini answers 400 to missing or malformed
authentication (403 is its "key lacks the role"), 404 to an unknown order and 406 to
insufficient funds; the venue does the same, and 400 for every other refusal.

Only a request that passes every check above uses up its nonce: a forged or replayed
request cannot move a key's nonce. An authenticated request that the exchange then
refuses (say InsufficientFunds) has used its nonce, as on Gemini, so it can never be
replayed to succeed later.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from aiohttp import web

from pipeline.core.decimals import plain
from pipeline.venue.exchange import Balance, Exchange, ExchangeError, Fill, Order

HTTP_STATUS = {"OrderNotFound": 404, "InsufficientFunds": 406, "RateLimit": 429,
               "Maintenance": 503, "System": 500}  # every other reason: 400
MAX_TRADES = 500
NONCE_WINDOW_S = 30
RATE_PER_S, RATE_QUEUED = 10.0, 5  # 600 a minute; five more are queued


@dataclass(frozen=True)
class VenueKey:
    """An API key's settings at the venue: its secret, whether its nonce is time-based,
    and (a master key) the sub-accounts its calls must name in ``account``."""

    secret: str
    time_nonce: bool = False
    accounts: tuple[str, ...] = ()

    @classmethod
    def of(cls, value: "str | VenueKey | Mapping[str, Any]") -> "VenueKey":
        """From a secret (an increasing-nonce account key), a VenueKey, or a mapping
        ``{"secret", "time_nonce", "accounts"}`` (the venue's keys file)."""
        if isinstance(value, VenueKey):
            return value
        if isinstance(value, str):
            return cls(value)
        return cls(str(value["secret"]), bool(value.get("time_nonce", False)),
                   tuple(value.get("accounts") or ()))


class RateGate:
    """Gemini's rate rule per key (or, public endpoints, per client): ``rate_per_s``
    sustained (a bucket of one second's worth), up to ``queued`` more waiting for their
    turn, any further one refused."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 rate_per_s: float = RATE_PER_S, queued: int = RATE_QUEUED) -> None:
        self.clock, self.rate, self.queued = clock, rate_per_s, queued
        self.size = max(1.0, rate_per_s)
        self._state: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def admit(self, api_key: str) -> float | None:
        """Seconds this request must wait before it is served, or None: refused (429)."""
        now = self.clock()
        tokens, at = self._state.get(api_key, (self.size, now))
        tokens = min(self.size, tokens + (now - at) * self.rate) - 1
        if tokens < -self.queued:
            return None
        self._state[api_key] = (tokens, now)
        return max(0.0, -tokens / self.rate)


REST_FAULTS = ("error_after", "error_before", "rate_limit", "not_json_after", "stall_after",
               "drop_after")


class RestFaults:
    """Armed faults: each ``{"action", "path", "count", "status", "seconds"}`` hits the
    next ``count`` calls of ``path`` (any path when absent)."""

    def __init__(self) -> None:
        self.armed: list[dict[str, Any]] = []

    def arm(self, fault: dict[str, Any]) -> None:
        if fault.get("action") not in REST_FAULTS:
            raise ValueError(f"unknown REST fault {fault.get('action')!r}: {REST_FAULTS}")
        self.armed.append({"count": 1, **fault})

    def take(self, path: str) -> dict[str, Any] | None:
        for fault in self.armed:
            if fault.get("path") in (None, path):
                fault["count"] -= 1
                if fault["count"] <= 0:
                    self.armed.remove(fault)
                return fault
        return None


class Refused(Exception):
    """A request refused before it reached the exchange."""

    def __init__(self, reason: str, message: str, payload: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.payload = payload or {}  # as decoded, if it got that far (for the log only)


#: A Decimal as a plain decimal string, without exponent or trailing zeros (the venue's
#: JSON numbers): :func:`pipeline.core.decimals.plain`.
decimal_text = plain


def order_json(order: Order) -> dict[str, Any]:
    """An order in the shape of Gemini's order status."""
    body: dict[str, Any] = {
        "order_id": str(order.order_id),
        "id": str(order.order_id),
        "symbol": order.symbol.lower(),
        "exchange": "gemini",
        "avg_execution_price": decimal_text(order.avg_execution_price)
        if order.executed_amount else "0.00",
        "side": order.side,
        "type": "exchange limit",
        "timestamp": str(order.timestamp_ms // 1000),
        "timestampms": order.timestamp_ms,
        "is_live": order.is_live,
        "is_cancelled": order.is_cancelled,
        "is_hidden": False,
        "was_forced": False,
        "executed_amount": decimal_text(order.executed_amount),
        "remaining_amount": decimal_text(order.remaining_amount),
        "options": list(order.options),
        "price": decimal_text(order.price),
        "original_amount": decimal_text(order.original_amount),
    }
    if order.client_order_id is not None:
        body["client_order_id"] = order.client_order_id
    if order.cancel_reason is not None:
        body["reason"] = order.cancel_reason
    return body


def trade_json(fill: Fill) -> dict[str, Any]:
    """A fill in the shape of Gemini's ``mytrades`` entries."""
    body: dict[str, Any] = {
        "price": decimal_text(fill.price),
        "amount": decimal_text(fill.amount),
        "timestamp": fill.timestamp_ms // 1000,
        "timestampms": fill.timestamp_ms,
        "type": "Buy" if fill.side == "buy" else "Sell",
        "aggressor": fill.aggressor,
        "fee_currency": fill.fee_currency,
        "fee_amount": decimal_text(fill.fee),
        "tid": fill.tid,
        "order_id": str(fill.order_id),
        "exchange": "gemini",
        "is_auction_fill": False,
    }
    if fill.client_order_id is not None:
        body["client_order_id"] = fill.client_order_id
    return body


def cancel_all_json(cancelled: list[Order]) -> dict[str, Any]:
    """The answer of Gemini's ``/v1/order/cancel/all`` and ``/v1/order/cancel/session``.

    Not documented: Gemini's pages for both endpoints (developer.gemini.com "Cancel All
    Active Orders", "Cancel All Session Orders") describe the answer only as "JSON
    response", with no fields. The shape ``{"result": "ok", "details": {"cancelledOrders":
    [...], "cancelRejects": [...]}}`` and the ids as JSON integers (not strings, unlike
    ``order_id`` in order status) follow what published Gemini clients parse (both lists
    as integer order ids). Not documented either: the order of ``cancelledOrders`` (here:
    by order id) and what a ``cancelRejects`` entry means or looks like (the venue never
    refuses to cancel a live order, so it is always empty here).
    """
    return {
        "result": "ok",
        "details": {
            "cancelledOrders": [order.order_id for order in cancelled],
            "cancelRejects": [],
        },
    }


def balance_json(balance: Balance) -> dict[str, Any]:
    return {
        "type": "exchange",
        "currency": balance.currency,
        "amount": decimal_text(balance.amount),
        "available": decimal_text(balance.available),
        "availableForWithdrawal": decimal_text(balance.available),
    }


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _order_id(payload: dict[str, Any]) -> int:
    value = payload.get("order_id")
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not _digits(str(value)):
        raise ExchangeError("OrderNotFound", f"order_id must be an integer, got {value!r}")
    return int(value)


def _new_order(exchange: Exchange, api_key: str, payload: dict[str, Any]) -> Any:
    missing = [f for f in ("symbol", "amount", "price", "side", "type") if f not in payload]
    if missing:
        raise ExchangeError("MissingOrderField", f"missing {', '.join(missing)}")
    options = payload.get("options", [])
    if not isinstance(options, list):
        raise ExchangeError("OptionsMustBeArray", "options must be an array")
    order = exchange.new_order(
        api_key,
        payload["symbol"],
        payload["amount"],
        payload["price"],
        payload["side"],
        type=payload["type"],
        options=options,
        client_order_id=payload.get("client_order_id"),
    )
    return order_json(order)


def _order_status(exchange: Exchange, api_key: str, payload: dict[str, Any]) -> Any:
    if "client_order_id" in payload and "order_id" not in payload:
        order = exchange.order(api_key, client_order_id=payload["client_order_id"])
    else:
        order = exchange.order(api_key, order_id=_order_id(payload))
    return order_json(order)


def _cancel(exchange: Exchange, api_key: str, payload: dict[str, Any]) -> Any:
    return order_json(exchange.cancel(api_key, _order_id(payload)))


def _cancel_all(exchange: Exchange, api_key: str, payload: dict[str, Any]) -> Any:
    """Both cancel-all endpoints: the venue has one session per account (its API key)."""
    return cancel_all_json(exchange.cancel_all(api_key))


def _active_orders(exchange: Exchange, api_key: str, payload: dict[str, Any]) -> Any:
    # Gemini: "Get all active orders for your account", a list of order status objects
    # (its order events "maintain compatibility with the Order Status and Get Active
    # Orders APIs"). The order of the list is not documented; here it is by order id.
    return [order_json(order) for order in exchange.active_orders(api_key)]


def _balances(exchange: Exchange, api_key: str, payload: dict[str, Any]) -> Any:
    return [balance_json(b) for b in exchange.balances(api_key)]


def _my_trades(exchange: Exchange, api_key: str, payload: dict[str, Any]) -> Any:
    limit = payload.get("limit_trades", 50)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_TRADES:
        raise ExchangeError("InvalidQuantity", f"limit_trades must be 1..{MAX_TRADES}")
    if "symbol" not in payload:
        raise ExchangeError("InvalidSymbol", "symbol is required")
    return [trade_json(f) for f in exchange.trades(api_key, payload["symbol"], limit)]


Operation = Callable[[Exchange, str, dict[str, Any]], Any]
OPERATIONS: dict[str, Operation] = {
    "/v1/order/new": _new_order,
    "/v1/order/status": _order_status,
    "/v1/order/cancel": _cancel,
    "/v1/order/cancel/all": _cancel_all,
    "/v1/order/cancel/session": _cancel_all,
    "/v1/orders": _active_orders,
    "/v1/balances": _balances,
    "/v1/mytrades": _my_trades,
}


class Authenticator:
    """Checks Gemini's headers and keeps the last accepted nonce of each API key."""

    def __init__(self, keys: Mapping[str, "str | VenueKey"],
                 clock_s: Callable[[], float] = time.time) -> None:
        self.keys = {key: VenueKey.of(value) for key, value in keys.items()}
        self._secrets = {key: k.secret.encode("utf-8") for key, k in self.keys.items()}
        self.last_nonce: dict[str, int] = {}
        self.clock_s = clock_s

    def check(self, path: str, headers: Any) -> tuple[dict[str, Any], int]:
        """The decoded payload and its nonce; raises ``Refused``. Uses up the nonce."""
        api_key = headers.get("X-GEMINI-APIKEY")
        encoded = headers.get("X-GEMINI-PAYLOAD")
        signature = headers.get("X-GEMINI-SIGNATURE")
        if not api_key:
            raise Refused("MissingApikeyHeader", "the X-GEMINI-APIKEY header is missing")
        if not encoded:
            raise Refused("MissingPayloadHeader", "the X-GEMINI-PAYLOAD header is missing")
        if not signature:
            raise Refused("MissingSignatureHeader", "the X-GEMINI-SIGNATURE header is missing")
        secret = self._secrets.get(api_key)
        if secret is None:
            raise Refused("InvalidSignature", "unknown API key")
        expected = hmac.new(secret, encoded.encode("utf-8"), hashlib.sha384).hexdigest()
        if not hmac.compare_digest(expected.encode("ascii"), signature.encode("utf-8")):
            raise Refused("InvalidSignature", "the signature does not match the payload")
        payload = _decode(encoded)
        if "request" not in payload:
            raise Refused("EndpointNotFound", "the payload has no 'request'", payload)
        if payload["request"] != path:
            message = f"payload request {payload['request']!r} was sent to {path!r}"
            raise Refused("EndpointMismatch", message, payload)
        nonce = _nonce(payload)
        key = self.keys[api_key]
        if key.time_nonce:
            now = self.clock_s()
            if abs(nonce - now) > NONCE_WINDOW_S:
                raise Refused("InvalidNonce", f"nonce {nonce} is not within {NONCE_WINDOW_S} "
                              f"seconds of the server time {int(now)} (this key uses a "
                              "time-based nonce, in seconds)", payload)
        else:
            last = self.last_nonce.get(api_key)
            if last is not None and nonce <= last:
                raise Refused("InvalidNonce", f"nonce {nonce} is not greater than {last}",
                              payload)
            self.last_nonce[api_key] = nonce
        if key.accounts and payload.get("account") not in key.accounts:
            raise Refused("MissingAccount", "a master key must name one of its accounts in "
                          f"'account', got {payload.get('account')!r}", payload)
        return payload, nonce


def _decode(encoded: str) -> dict[str, Any]:
    try:
        payload = json.loads(base64.b64decode(encoded, validate=True))
    except (binascii.Error, ValueError):
        raise Refused("InvalidJson", "the payload is not base64-encoded JSON") from None
    if not isinstance(payload, dict):
        raise Refused("InvalidJson", "the payload is not a JSON object")
    return payload


def _peek(encoded: str | None) -> dict[str, Any]:
    """What an unauthenticated payload claims, for the log only; {} if it is unreadable."""
    try:
        return _decode(encoded or "")
    except Refused:
        return {}


def _nonce(payload: dict[str, Any]) -> int:
    value = payload.get("nonce")
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not _digits(str(value)):
        message = f"the nonce must be a positive integer, got {value!r}"
        raise Refused("InvalidNonce", message, payload)
    return int(value)


def _error(reason: str, message: str) -> web.Response:
    return web.json_response(
        {"result": "error", "reason": reason, "message": message},
        status=HTTP_STATUS.get(reason, 400),
    )


def add_rest_routes(
    app: web.Application,
    exchange: Exchange,
    secrets: Mapping[str, "str | VenueKey"],
    log: list | None = None,
    faults: RestFaults | None = None,
) -> Authenticator:
    """Serve Gemini's private order and account endpoints on ``app``.

    ``secrets`` maps API keys to their secrets (or :class:`VenueKey` settings). With
    ``log``, one dict per request is appended (path, api_key, nonce, outcome "accepted" or
    the reason, client_order_id, status, and ``at``: perf_counter when answered), so tests
    can prove what reached the venue and benchmarks time it;
    secrets are never in it. The nonce and client_order_id are as the payload claimed,
    also when it was refused. ``faults`` are served on ``POST /_venue/order-faults``.
    """
    auth = Authenticator(secrets)
    gate = RateGate()
    faults = faults if faults is not None else RestFaults()

    async def arm(request: web.Request) -> web.Response:
        try:
            faults.arm(await request.json())
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"armed": len(faults.armed)})

    app.router.add_post("/_venue/order-faults", arm)

    def handler(path: str, operation: Operation) -> Callable:
        async def handle(request: web.Request) -> web.Response:
            payload: dict[str, Any] = {}
            fault = faults.take(path)
            action = fault["action"] if fault else None
            try:
                wait = gate.admit(request.headers.get("X-GEMINI-APIKEY") or "")
                if wait is None or action == "rate_limit":
                    raise Refused("RateLimit", "Requests were made too frequently",
                                  _peek(request.headers.get("X-GEMINI-PAYLOAD")))
                if wait:
                    await asyncio.sleep(wait)  # queued, as Gemini queues a burst of five
                if action == "error_before":
                    raise Refused(str(fault.get("reason", "System")),
                                  "injected error before executing",
                                  _peek(request.headers.get("X-GEMINI-PAYLOAD")))
                payload, _ = auth.check(path, request.headers)
                result = operation(exchange, request.headers["X-GEMINI-APIKEY"], payload)
                response = web.json_response(result)
                outcome = "accepted"
                if action == "error_after":
                    response = web.json_response({"result": "error", "reason": "System",
                                                  "message": "injected server error"},
                                                 status=int(fault.get("status", 500)))
                elif action == "not_json_after":
                    response = web.Response(text="<html>502 Bad Gateway</html>", status=502,
                                            content_type="text/html")
                elif action == "stall_after":
                    await asyncio.sleep(float(fault.get("seconds", 2.0)))
            except Refused as refusal:
                payload = refusal.payload or _peek(request.headers.get("X-GEMINI-PAYLOAD"))
                response = _error(refusal.reason, refusal.message)
                if action == "error_before" and "status" in fault:  # type: ignore[operator]
                    response = web.json_response(
                        {"result": "error", "reason": refusal.reason, "message": refusal.message},
                        status=int(fault["status"]))  # type: ignore[index]
                outcome = refusal.reason
            except ExchangeError as refusal:
                response = _error(refusal.reason, refusal.message)
                outcome = refusal.reason
            if log is not None:
                log.append({
                    "path": path,
                    "api_key": request.headers.get("X-GEMINI-APIKEY"),
                    "nonce": payload.get("nonce"),
                    "outcome": outcome,
                    "client_order_id": payload.get("client_order_id"),
                    "status": response.status,
                    "at": time.perf_counter(),  # when answered (latency benchmarks)
                })
            return response

        return handle

    for path, operation in OPERATIONS.items():
        app.router.add_post(path, handler(path, operation))
    add_symbol_routes(app, exchange)
    return auth


def add_symbol_routes(app: web.Application, exchange: Exchange) -> None:
    """Gemini's public, unsigned ``GET /v1/symbols`` (the symbols, lower case) and
    ``GET /v1/symbols/details/{symbol}`` (its rules; an unknown symbol is 400
    InvalidSymbol), from the exchange's rules table. Not in the request log: that one
    tells what private (signed) requests reached the venue."""

    async def symbols(request: web.Request) -> web.Response:
        return web.json_response([rule.symbol.lower() for rule in exchange.symbol_rules()])

    async def details(request: web.Request) -> web.Response:
        rule = exchange.rules(request.match_info["symbol"])
        if rule is None:
            return _error("InvalidSymbol", f"unknown symbol {request.match_info['symbol']!r}")
        return web.json_response(rule.to_details())

    app.router.add_get("/v1/symbols", symbols)
    app.router.add_get("/v1/symbols/details/{symbol}", details)
