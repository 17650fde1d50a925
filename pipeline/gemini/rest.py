"""Gemini's private REST API, client side: request signing, nonces, order calls, errors.

Gemini authenticates a private call by three headers instead of a body: the JSON payload
(with ``request`` = the path and a ``nonce``) base64-encoded in ``X-GEMINI-PAYLOAD``, its
hex HMAC-SHA384 under the API secret in ``X-GEMINI-SIGNATURE``, and the key in
``X-GEMINI-APIKEY``. The secret never appears in a log line, a repr or an exception.

A key has one of two nonce settings (developer.gemini.com/authentication/api-key):
- increasing (the default): the nonce must grow strictly per key, forever, also after our
  process restarts, so :class:`NonceSource` keeps the last one in a file;
- "Uses a time-based nonce": the nonce is the time in **seconds** and must be within
  +/- 30 s of Gemini's clock (:class:`TimeNonce`). The WebSocket API accepts only such keys.
Which one a key has cannot be read from Gemini; :func:`check_key` tells by a harmless call.

Answers are classified so that the caller never mistakes "maybe executed" for "refused":
- :class:`GeminiApiError`: Gemini refused (its ``reason``), nothing was executed;
- :class:`GeminiRateLimited` (429 / ``RateLimit``): refused for the rate, nothing executed,
  worth retrying after a pause;
- :class:`GeminiInDoubt`: a timeout, a lost connection, a 5xx or an answer that is not
  JSON: the request may have been executed (an order may be live), ask before resending.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import requests

from pipeline.core.decimals import decimal_string
from pipeline.core.errors import (
    GeminiApiError,
    GeminiError,
    GeminiInDoubt,
    GeminiRateLimited,
    PipelineError,
)

LIVE_URL = "https://api.gemini.com"
SANDBOX_URL = "https://api.sandbox.gemini.com"


class GeminiTimeout(GeminiInDoubt):
    """No answer in time: the request may or may not have been executed."""


# Refusals that say nothing was executed, whatever the HTTP status (Maintenance is a
# 503): every other 5xx is in doubt.
NOT_EXECUTED = frozenset({"RateLimit", "RateLimited", "Maintenance", "MarketNotOpen",
                          "InvalidNonce", "InvalidSignature"})
NONCE_WINDOW_S = 30  # a time-based nonce: within +/- 30 s of Gemini's clock


def sign_request(
    path: str, payload: dict[str, Any], api_key: str, api_secret: str, nonce: int
) -> dict[str, str]:
    """Gemini's headers for a private call of ``path`` with ``payload``'s parameters."""
    if "request" in payload or "nonce" in payload:
        raise ValueError("payload must not set 'request' or 'nonce'; sign_request adds them")
    body = {"request": path, "nonce": nonce, **payload}
    encoded = base64.b64encode(json.dumps(body).encode("utf-8")).decode("ascii")
    signature = hmac.new(api_secret.encode("utf-8"), encoded.encode("ascii"), hashlib.sha384)
    return {
        "Content-Type": "text/plain",
        "Content-Length": "0",
        "Cache-Control": "no-cache",
        "X-GEMINI-APIKEY": api_key,
        "X-GEMINI-PAYLOAD": encoded,
        "X-GEMINI-SIGNATURE": signature.hexdigest(),
    }


def _now_us() -> int:
    return time.time_ns() // 1000


class Nonces(Protocol):
    """Where a key's nonces come from (see the module doc for the two settings)."""

    time_based: bool

    def next(self) -> int: ...

    def advance(self, jump_us: int) -> int: ...


class TimeNonce:
    """Nonces for a key with "Uses a time-based nonce": the clock in whole seconds.

    Gemini only asks that such a nonce be within +/- 30 s of its clock; several calls in
    one second share a nonce (the docs ask for no more). Nothing is stored, and after an
    ``InvalidNonce`` there is nothing to move: the local clock is off.
    """

    time_based = True

    def __init__(self, clock_s: Callable[[], float] = time.time) -> None:
        self._clock_s = clock_s

    def next(self) -> int:
        return int(self._clock_s())

    def advance(self, jump_us: int) -> int:
        raise PipelineError(
            "Gemini refused a time-based nonce: this machine's clock is more than "
            f"{NONCE_WINDOW_S} s from Gemini's (synchronise it with NTP), or the key does not "
            "have 'Uses a time-based nonce' set (then configure nonce = \"increasing\")")


class NonceSource:
    """Nonces strictly increasing for one API key, across restarts and processes.

    The last nonce lives in ``path`` (mode 0600). Each ``next()`` takes an exclusive
    ``fcntl`` lock on ``path`` + ``.lock``, computes max(last + 1, now in microseconds),
    and makes it durable (temp file, fsync, rename, fsync of the directory) before
    returning it: a nonce handed out is never handed out again, even after a crash.
    Processes that share one API key must share one file.
    """

    time_based = False

    def __init__(self, path: str | Path, clock_us: Callable[[], int] = _now_us) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._clock_us = clock_us

    def next(self) -> int:
        return self._move(lambda last, now: max(last + 1, now))

    def advance(self, jump_us: int) -> int:
        """Move past any nonce the exchange may have seen (it refused ours with
        InvalidNonce): store max(last, clock) + ``jump_us``; the next nonce is above it."""
        return self._move(lambda last, now: max(last, now) + jump_us)

    def _move(self, to: Callable[[int, int], int]) -> int:
        """Under the file lock: store ``to(last, clock)`` durably, return it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            nonce = to(self._last(), self._clock_us())
            self._store(nonce)
            return nonce
        finally:
            os.close(lock_fd)  # closing releases the lock

    def _last(self) -> int:
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return 0
        if not text.isdigit():
            # Starting over could reuse a nonce the exchange has seen: refuse instead.
            raise PipelineError(
                f"nonce file {self.path} is corrupt ({text[:40]!r}); write a number at least"
                " as large as the last nonce used with this API key into it, or delete it"
                " if the clock is known to be past that nonce"
            )
        return int(text)

    def _store(self, nonce: int) -> None:
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as out:  # mkstemp makes it 0600
                out.write(f"{nonce}\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# Gemini wants amounts as decimal strings; a float would not be exact, so it is refused.
_decimal_text = decimal_string


class GeminiRestClient:
    """Gemini's private order and account calls over one ``requests`` session.

    Every method returns Gemini's JSON as parsed (amounts stay strings) and raises the
    classified errors of the module doc. With ``account`` (a master key's sub-account,
    which Gemini requires on a master key's order calls) every payload names it.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        api_secret: str,
        nonce_source: Nonces,
        timeout_s: float = 10.0,
        account: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.__secret = api_secret
        self.nonce_source = nonce_source
        self.timeout_s = timeout_s
        self.account = account
        self.session = requests.Session()

    def __repr__(self) -> str:
        return f"GeminiRestClient({self.base_url!r}, api_key={self.api_key!r})"

    def close(self) -> None:
        self.session.close()

    def new_order(
        self,
        symbol: str,
        amount: Decimal | str | int,
        price: Decimal | str | int,
        side: str,
        type: str = "exchange limit",
        client_order_id: str | None = None,
        options: Iterable[str] = (),
    ) -> dict[str, Any]:
        """Place a limit order; the answer is the order's status right after matching."""
        payload: dict[str, Any] = {
            "symbol": symbol,
            "amount": _decimal_text(amount, "amount"),
            "price": _decimal_text(price, "price"),
            "side": side,
            "type": type,
        }
        if client_order_id is not None:
            payload["client_order_id"] = client_order_id
        options = list(options)
        if options:
            payload["options"] = options
        return self._post("/v1/order/new", payload)

    def order_status(
        self, order_id: int | None = None, client_order_id: str | None = None
    ) -> dict[str, Any]:
        """One order's status, by Gemini's ``order_id`` or by our ``client_order_id``.

        If Gemini answers a list (several orders share a client_order_id), the newest wins.
        """
        if (order_id is None) == (client_order_id is None):
            raise ValueError("give exactly one of order_id and client_order_id")
        payload = {"order_id": int(order_id)} if order_id is not None else {
            "client_order_id": client_order_id
        }
        answer = self._post("/v1/order/status", payload)
        if isinstance(answer, list):
            if not answer:
                raise GeminiApiError("OrderNotFound", f"no order {payload}", 404)
            return max(answer, key=lambda order: (order.get("timestampms", 0), order["order_id"]))
        return answer

    def cancel_order(self, order_id: int) -> dict[str, Any]:
        """Cancel an order; the answer is its status afterwards."""
        return self._post("/v1/order/cancel", {"order_id": int(order_id)})

    def cancel_all(self) -> dict[str, Any]:
        """Cancel every live order of the account, from every session and the UI.

        The answer: ``{"result": "ok", "details": {"cancelledOrders": [order ids],
        "cancelRejects": [...]}}``.
        """
        return self._post("/v1/order/cancel/all", {})

    def cancel_session(self) -> dict[str, Any]:
        """Cancel every live order placed with this API key's session; answers as
        ``cancel_all``."""
        return self._post("/v1/order/cancel/session", {})

    def active_orders(self) -> list[dict[str, Any]]:
        """The account's live orders, each in the shape of ``order_status``."""
        return self._post("/v1/orders", {})

    def balances(self, nonce: int | None = None) -> list[dict[str, Any]]:
        """The account's balances; ``nonce`` signs with exactly that nonce instead of the
        next one (the key check's repeated time-based nonce)."""
        return self._post("/v1/balances", {}, nonce)

    def my_trades(self, symbol: str, limit_trades: int | None = None,
                  timestamp_ms: int | None = None) -> list[dict[str, Any]]:
        """This key's trades in ``symbol``, newest first; with ``timestamp_ms`` only those
        at or after it (Gemini's ``timestamp`` parameter, given here in milliseconds)."""
        payload: dict[str, Any] = {"symbol": symbol}
        if limit_trades is not None:
            payload["limit_trades"] = int(limit_trades)
        if timestamp_ms is not None:
            payload["timestamp"] = int(timestamp_ms)
        return self._post("/v1/mytrades", payload)

    def _post(self, path: str, payload: dict[str, Any], nonce: int | None = None) -> Any:
        if self.account is not None:
            payload = {**payload, "account": self.account}
        nonce = self.nonce_source.next() if nonce is None else nonce
        headers = sign_request(path, payload, self.api_key, self.__secret, nonce)
        url = self.base_url + path
        try:
            return _classify(url, self.session.post(url, headers=headers, timeout=self.timeout_s))
        except requests.Timeout:
            error: GeminiError = GeminiTimeout(
                f"POST {url}: no answer within {self.timeout_s}s; the request may have been"
                " executed, check the order status before sending it again")
        except requests.RequestException as exc:
            error = GeminiInDoubt(f"POST {url}: {type(exc).__name__}: {exc}")
        except GeminiError as exc:
            error = exc
        error.nonce = nonce
        raise error from None


def _classify(url: str, response: requests.Response) -> Any:
    """Gemini's answer, or the classified error (see the module doc)."""
    status = response.status_code
    try:
        answer = response.json()
    except ValueError:
        if status == 429:
            raise GeminiRateLimited("RateLimit", "429 Too Many Requests", status) from None
        raise GeminiInDoubt(f"POST {url}: HTTP {status}, not JSON: {response.text[:200]!r}; "
                            "the request may have been executed") from None
    if isinstance(answer, dict) and answer.get("result") == "error":
        reason = str(answer.get("reason"))
        if status == 429 or reason in ("RateLimit", "RateLimited"):
            raise GeminiRateLimited(reason, str(answer.get("message")), status)
        if status >= 500 and reason not in NOT_EXECUTED:
            raise GeminiInDoubt(f"POST {url}: HTTP {status} {reason}: "
                                f"{str(answer.get('message'))[:200]}; the request may have "
                                "been executed")
        raise GeminiApiError(reason, str(answer.get("message")), status)
    if status == 429:
        raise GeminiRateLimited("RateLimit", "429 Too Many Requests", status)
    if status != 200:
        raise GeminiInDoubt(f"POST {url}: HTTP {status}, unexpected answer {answer!r:.200}; "
                            "the request may have been executed")
    return answer
