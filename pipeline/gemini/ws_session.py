"""One authenticated connection to Gemini's WebSocket API (``wss://ws.gemini.com``).

The handshake carries the key (developer.gemini.com/websocket/authentication): the nonce is
the time in seconds, the payload its base64 text, the signature the hex HMAC-SHA384 of the
payload under the secret. Only account-scoped keys with "Uses a time-based nonce" are
accepted. ``cancelOnDisconnect=true`` is always asked for: if the connection drops, Gemini
cancels the orders it placed, so nothing rests unwatched (execution then re-reads them).

A reader thread matches answers to requests by ``id`` and queues every ``orderUpdate``;
anything else is counted per kind and logged once. When the connection ends, every waiting
request fails with :class:`WsDisconnected`: whether such a request was executed is then in
doubt, and the caller settles it over REST once the connection is gone (a request cannot
be executed after its connection closed: Gemini does not document this, and it is the
assumption the execution client's at-most-once rests on).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import logging
import queue
import threading
import time
from collections import Counter
from typing import Any, Callable

import websocket

from pipeline.core.errors import PipelineError, WsDisconnected, WsError, WsTimeout
from pipeline.gemini.marketdata import count_once

log = logging.getLogger(__name__)

WS_LIVE = "wss://ws.gemini.com"
WS_SANDBOX = "wss://ws.sandbox.gemini.com"  # Gemini's AsyncAPI contract names it


def ws_auth_headers(api_key: str, api_secret: str, nonce_s: int) -> dict[str, str]:
    """Gemini's four handshake headers for ``nonce_s`` (epoch seconds)."""
    payload = base64.b64encode(str(nonce_s).encode("ascii")).decode("ascii")
    signature = hmac.new(api_secret.encode("utf-8"), payload.encode("ascii"), hashlib.sha384)
    return {"X-GEMINI-APIKEY": api_key, "X-GEMINI-NONCE": str(nonce_s),
            "X-GEMINI-PAYLOAD": payload, "X-GEMINI-SIGNATURE": signature.hexdigest()}


class WsSession:
    """See the module doc. ``connect`` opens it; ``request`` sends one method and waits."""

    def __init__(self, url: str, api_key: str, api_secret: str, timeout_s: float = 10.0,
                 clock_s: Callable[[], float] = time.time) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.__secret = api_secret
        self.timeout_s, self.clock_s = timeout_s, clock_s
        self.events: queue.Queue[dict] = queue.Queue()
        self.unknown: Counter[str] = Counter()
        self.connections = 0
        self._ws: websocket.WebSocket | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, list] = {}  # id -> [threading.Event, answer]
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self.alive = False

    def __repr__(self) -> str:
        return f"WsSession({self.url!r}, api_key={self.api_key!r})"

    def connect(self) -> None:
        """Open an authenticated connection (closing a previous one first)."""
        self.close()
        headers = ws_auth_headers(self.api_key, self.__secret, int(self.clock_s()))
        try:
            ws = websocket.create_connection(
                f"{self.url}/?cancelOnDisconnect=true", timeout=self.timeout_s,
                header=[f"{k}: {v}" for k, v in headers.items()], enable_multithread=True)
        except websocket.WebSocketBadStatusException as exc:
            if exc.status_code == 401:
                raise PipelineError(
                    f"Gemini refused the WebSocket login (401): {_body(exc)}. The WebSocket "
                    "API takes only account-scoped keys with \"Uses a time-based nonce\" and "
                    "the Trading role, and needs this machine's clock within 30 s") from None
            raise WsDisconnected(f"WebSocket upgrade refused: {exc}") from None
        except (OSError, websocket.WebSocketException) as exc:
            raise WsDisconnected(f"cannot connect to {self.url}: {exc}") from None
        ws.settimeout(None)
        self._ws, self.alive = ws, True
        self.connections += 1
        self._reader = threading.Thread(target=self._read, args=(ws,), daemon=True,
                                        name="gemini-ws-reader")
        self._reader.start()

    def request(self, method: str, params: Any = None, timeout_s: float | None = None) -> dict:
        """The answer ``{"id", "status", "result" | "error"}`` to one method call."""
        ws = self._ws
        if ws is None or not self.alive:
            raise WsDisconnected("not connected")
        request_id = next(self._ids)
        waiter = [threading.Event(), None]
        with self._lock:
            self._pending[request_id] = waiter
        try:
            ws.send(json.dumps({"id": request_id, "method": method,
                                "params": {} if params is None else params}))
        except (OSError, websocket.WebSocketException) as exc:
            self._fail(f"send failed: {exc}")
        if not waiter[0].wait(self.timeout_s if timeout_s is None else timeout_s):
            with self._lock:
                self._pending.pop(request_id, None)
            raise WsTimeout(f"{method}: no answer within {timeout_s or self.timeout_s} s")
        answer = waiter[1]
        if isinstance(answer, WsError):
            raise answer
        return answer  # type: ignore[return-value]

    def close(self) -> None:
        ws, self._ws = self._ws, None
        self.alive = False
        if ws is not None:
            try:
                ws.close(timeout=1)
            except (OSError, websocket.WebSocketException):
                pass
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(2)
        self._fail("connection closed")

    # -- the reader

    def _read(self, ws: websocket.WebSocket) -> None:
        while True:
            try:
                opcode, data = ws.recv_data()
            except (OSError, websocket.WebSocketException, AttributeError):
                break
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                break
            if opcode not in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                continue
            try:
                message = json.loads(data)
            except ValueError:
                self._unknown("not JSON")
                continue
            if not isinstance(message, dict):
                self._unknown(type(message).__name__)
            elif "id" in message and "status" in message:
                with self._lock:
                    waiter = self._pending.pop(message["id"], None)
                if waiter is not None:
                    waiter[1] = message
                    waiter[0].set()
            elif message.get("e") == "orderUpdate" or ("X" in message and "s" in message):
                self.events.put(message)
            else:
                self._unknown(str(message.get("e") or sorted(message)[:3]))
        if self._ws is ws:
            self.alive = False
        self._fail("connection lost")

    def _unknown(self, kind: str) -> None:
        count_once(self.unknown, kind, "Gemini WebSocket frames on the order session")

    def _fail(self, why: str) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for waiter in pending.values():
            waiter[1] = WsDisconnected(why)
            waiter[0].set()


def _body(exc: websocket.WebSocketBadStatusException) -> str:
    body = getattr(exc, "resp_body", None)
    if isinstance(body, bytes):
        return body.decode("utf-8", errors="replace")[:200]
    return str(body or exc)[:200]
