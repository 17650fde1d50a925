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
====================================  ==========================  ======

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

import base64
import binascii
import hashlib
import hmac
import json
from decimal import Decimal
from typing import Any, Callable

from aiohttp import web

from pipeline.venue.exchange import Balance, Exchange, ExchangeError, Fill, Order

HTTP_STATUS = {"OrderNotFound": 404, "InsufficientFunds": 406}  # every other reason: 400
MAX_TRADES = 500


class Refused(Exception):
    """A request refused before it reached the exchange."""

    def __init__(self, reason: str, message: str, payload: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.payload = payload or {}  # as decoded, if it got that far (for the log only)


def _text(number: Decimal) -> str:
    """A Decimal as a plain decimal string, without exponent or trailing zeros."""
    return format(number.normalize(), "f") if number else "0"


def order_json(order: Order) -> dict[str, Any]:
    """An order in the shape of Gemini's order status."""
    body: dict[str, Any] = {
        "order_id": str(order.order_id),
        "id": str(order.order_id),
        "symbol": order.symbol.lower(),
        "exchange": "gemini",
        "avg_execution_price": _text(order.avg_execution_price) if order.executed_amount else "0.00",
        "side": order.side,
        "type": "exchange limit",
        "timestamp": str(order.timestamp_ms // 1000),
        "timestampms": order.timestamp_ms,
        "is_live": order.is_live,
        "is_cancelled": order.is_cancelled,
        "is_hidden": False,
        "was_forced": False,
        "executed_amount": _text(order.executed_amount),
        "remaining_amount": _text(order.remaining_amount),
        "options": list(order.options),
        "price": _text(order.price),
        "original_amount": _text(order.original_amount),
    }
    if order.client_order_id is not None:
        body["client_order_id"] = order.client_order_id
    if order.cancel_reason is not None:
        body["reason"] = order.cancel_reason
    return body


def trade_json(fill: Fill) -> dict[str, Any]:
    """A fill in the shape of Gemini's ``mytrades`` entries."""
    body: dict[str, Any] = {
        "price": _text(fill.price),
        "amount": _text(fill.amount),
        "timestamp": fill.timestamp_ms // 1000,
        "timestampms": fill.timestamp_ms,
        "type": "Buy" if fill.side == "buy" else "Sell",
        "aggressor": fill.aggressor,
        "fee_currency": fill.fee_currency,
        "fee_amount": _text(fill.fee),
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
        "amount": _text(balance.amount),
        "available": _text(balance.available),
        "availableForWithdrawal": _text(balance.available),
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

    def __init__(self, secrets: dict[str, str]) -> None:
        self._secrets = {key: secret.encode("utf-8") for key, secret in secrets.items()}
        self.last_nonce: dict[str, int] = {}

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
        last = self.last_nonce.get(api_key)
        if last is not None and nonce <= last:
            raise Refused("InvalidNonce", f"nonce {nonce} is not greater than {last}", payload)
        self.last_nonce[api_key] = nonce
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
    secrets: dict[str, str],
    log: list | None = None,
) -> None:
    """Serve Gemini's private order and account endpoints on ``app``.

    ``secrets`` maps API keys to their secrets. With ``log``, one dict per request is
    appended (path, api_key, nonce, outcome "accepted" or the reason, client_order_id,
    status), so tests can prove what reached the venue; secrets are never in it. The
    nonce and client_order_id are as the payload claimed, also when it was refused.
    """
    auth = Authenticator(secrets)

    def handler(path: str, operation: Operation) -> Callable:
        async def handle(request: web.Request) -> web.Response:
            payload: dict[str, Any] = {}
            try:
                payload, _ = auth.check(path, request.headers)
                response = web.json_response(
                    operation(exchange, request.headers["X-GEMINI-APIKEY"], payload)
                )
                outcome = "accepted"
            except Refused as refusal:
                payload = refusal.payload or _peek(request.headers.get("X-GEMINI-PAYLOAD"))
                response = _error(refusal.reason, refusal.message)
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
                })
            return response

        return handle

    for path, operation in OPERATIONS.items():
        app.router.add_post(path, handler(path, operation))
    add_symbol_routes(app, exchange)


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
