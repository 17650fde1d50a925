"""The Gemini execution client: orders over the private REST API, behind the execution
client interface (:class:`~pipeline.trading.execution.ExecutionClient`).

An order is sent as ``POST /v1/order/new`` (``exchange limit``, with the request's
``client_order_id``; a MARKET request as an immediate-or-cancel limit at the price band's
edge), signed with the key's nonces (:class:`~pipeline.gemini.rest.NonceSource`, a file
strictly increasing across restarts, or :class:`~pipeline.gemini.rest.TimeNonce` for a key
with a time-based nonce), through a token bucket that every private call shares (a
:class:`~pipeline.gemini.ratelimit.SharedTokenBucket` when several processes use one key).
Orders still live after placement are followed with ``order/status`` every
``follow_interval_s`` until they fill or are cancelled; their fills are the changes of
the running ``executed_amount`` (the REST status gives neither per-fill fees nor
liquidity: those fields stay empty). A cancel is ``/v1/order/cancel``; a replace cancels,
then places the new order once the cancel is confirmed; the kill switch cancels the
session's orders (``/v1/order/cancel/session``).

**At most once.** Before any order leaves the process, ``record_intent`` (the execution
group's durable write of ``SeenOrder(outcome="sending")``) must succeed. A timeout, a lost
connection, a 5xx or an answer that is not JSON while sending is "in doubt": ``order/status``
by client_order_id decides, never a blind resend. "Not found" is final once the lost
request can no longer be executed: at once with increasing nonces (the status call's nonce
is above the lost request's, and Gemini refuses any nonce at or below the last it
accepted); with a time-based nonce only after the lost request's nonce has left Gemini's
+/- 30 s window, so the status is asked again then. If the status cannot be had either,
:class:`ExecutionHalted` stops the group without committing, and the restarted group
reconciles (:meth:`GeminiExecution.reconcile`).

**Refusals that executed nothing** are not final rejections of the request: an
``InvalidNonce`` moves the nonce file forward and is retried once; a 429 (``RateLimit``) is
retried after a doubling pause. ``Maintenance`` and ``MarketNotOpen`` reject the order and
pause the symbol: its next orders are rejected here, without a call, for ``pause_s``.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NoReturn

from pipeline.core.decimals import ZERO, plain
from pipeline.core.errors import PipelineError
from pipeline.core.records import OrderEvent, OrderRequest
from pipeline.core.vocabulary import OrderEventKind, OrderOption, OrderType, Side
from pipeline.gemini.ratelimit import SharedTokenBucket, TokenBucket
from pipeline.gemini.rest import (
    NONCE_WINDOW_S,
    GeminiApiError,
    GeminiError,
    GeminiRateLimited,
    GeminiRestClient,
    Nonces,
    NonceSource,
    TimeNonce,
)
from pipeline.trading.execution import ExecutionHalted, Seen, request_event
from pipeline.trading.orders import (
    EXPIRED,
    ORDER_CLOSED,
    REQUESTED,
    Fill,
    Order,
    new_order,
    order_event,
    order_from_event,
)
from pipeline.trading.risk import BookTop
from pipeline.trading.signing import read_private_json

log = logging.getLogger(__name__)
K = OrderEventKind
IOC = (OrderOption.IMMEDIATE_OR_CANCEL.value,)
SENT = "sent"


NONCE_SETTINGS = ("increasing", "time")


class GeminiCredentials:
    """A Gemini API key and secret, the key's nonce setting (``increasing``, or ``time``
    for a key with "Uses a time-based nonce") and, for a master key, the ``account`` its
    orders go to. The secret is never shown (repr, str, logs)."""

    def __init__(self, api_key: str, api_secret: str, nonce: str = "increasing",
                 account: str | None = None) -> None:
        if not api_key or not api_secret:
            raise PipelineError("a Gemini API key and secret are both needed")
        if nonce not in NONCE_SETTINGS:
            raise PipelineError(f"unknown Gemini nonce setting {nonce!r}: increasing or time")
        self.api_key = api_key
        self.__secret = api_secret
        self.nonce, self.account = nonce, account or None

    def __repr__(self) -> str:
        return (f"GeminiCredentials(api_key={self.api_key!r}, api_secret=***, "
                f"nonce={self.nonce!r}, account={self.account!r})")

    __str__ = __repr__

    def nonces(self, nonce_file: Path) -> Nonces:
        """The key's nonce source: the durable file for increasing nonces, else the clock."""
        return TimeNonce() if self.nonce == "time" else NonceSource(nonce_file)

    def client(self, url: str, nonces: Nonces, timeout_s: float) -> GeminiRestClient:
        return GeminiRestClient(url, self.api_key, self.__secret, nonces, timeout_s,
                                account=self.account)

    def secret_for_signing(self) -> str:
        """The secret, for a signer that needs it (the WebSocket handshake); never log it."""
        return self.__secret

    @classmethod
    def load(cls, key_file: str | Path | None = None,
             environ: Mapping[str, str] | None = None) -> "GeminiCredentials | None":
        """From a 0600 JSON file ``{"api_key": ..., "api_secret": ..., "nonce": "time",
        "account": ...}`` (the last two optional), else from ``GEMINI_API_KEY``,
        ``GEMINI_API_SECRET``, ``GEMINI_NONCE`` and ``GEMINI_ACCOUNT``; None when neither
        has a key and secret."""
        env = os.environ if environ is None else environ
        if key_file is not None:
            path = Path(key_file)
            data = read_private_json(path, "API key file")
            if not isinstance(data, dict) or not all(isinstance(data.get(k), str) and data[k]
                                                     for k in ("api_key", "api_secret")):
                raise PipelineError(f"API key file {path} must be a JSON object with "
                                    "\"api_key\" and \"api_secret\"")
            return cls(data["api_key"], data["api_secret"],
                       str(data.get("nonce") or env.get("GEMINI_NONCE") or "increasing"),
                       data.get("account") or env.get("GEMINI_ACCOUNT"))
        if env.get("GEMINI_API_KEY") and env.get("GEMINI_API_SECRET"):
            return cls(env["GEMINI_API_KEY"], env["GEMINI_API_SECRET"],
                       env.get("GEMINI_NONCE") or "increasing", env.get("GEMINI_ACCOUNT"))
        return None


@dataclass(frozen=True)
class GeminiSettings:
    rate_per_s: float = 5.0  # every private call goes through this token bucket
    burst: int = 5
    timeout_s: float = 10.0
    status_attempts: int = 3  # order/status tries to settle an order in doubt
    status_backoff_s: float = 0.5
    follow_interval_s: float = 2.0  # how often a live order's status is polled
    nonce_jump_us: int = 60_000_000  # how far past the clock an InvalidNonce moves the nonce
    rate_limit_retries: int = 5  # a 429 is retried this often (nothing was executed)
    rate_limit_backoff_s: float = 0.5  # first pause after a 429, doubled each time (max 8 s)
    pause_s: float = 30.0  # Maintenance / MarketNotOpen: the symbol's orders wait this long
    fence_margin_s: float = 5.0  # time-based nonces: clock skew allowed past the window
    check_key: bool = True  # one harmless call at start-up tells the key's nonce setting
    transport: str = "ws"  # orders over the WebSocket API ("ws") or REST ("rest")


class _Followed:
    """An order live at Gemini whose fills we still publish."""

    __slots__ = ("order", "seen_ms", "next_poll", "booked", "tids")

    def __init__(self, order: Order, seen_ms: int, booked: bool = False) -> None:
        self.order, self.seen_ms, self.next_poll, self.booked = order, seen_ms, 0.0, booked
        self.tids: set[int] = set()  # trade ids of the fills published (WebSocket, mytrades)


class GeminiExecution:
    """See the module doc. ``record_intent(client_order_id, strategy_id, seen_ms)`` must
    make the intent durable or raise."""

    def __init__(self, rest: GeminiRestClient, nonces: Nonces, mode: str,
                 record_intent: Callable[[str, str, int], None],
                 settings: GeminiSettings = GeminiSettings(),
                 clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
                 bucket: TokenBucket | SharedTokenBucket | None = None) -> None:
        self.rest, self.nonces, self.mode = rest, nonces, mode
        self.record_intent, self.settings, self.clock_ms = record_intent, settings, clock_ms
        # One budget per key: pass a SharedTokenBucket when several processes use the key.
        self.bucket = bucket or TokenBucket(settings.rate_per_s, settings.burst)
        self.followed: dict[str, _Followed] = {}
        self.books: dict[str, BookTop] = {}
        self.paused: dict[str, tuple[float, str]] = {}  # symbol -> (until, Gemini's reason)
        self.counts: dict[str, int] = {"in_doubt": 0, "reconciled": 0, "invalid_nonce": 0,
                                       "rate_limited": 0}
        self.halted: str | None = None
        self._owned: set[int] = set()
        self._partitions = 0

    # -- books and ownership

    def on_snapshot(self, snapshot: Mapping[str, Any]) -> None:
        top = BookTop.from_snapshot(snapshot)
        known = self.books.get(top.symbol)
        if known is None or known.ts_ms <= top.ts_ms:  # an older one re-read: keep the newer
            self.books[top.symbol] = top

    def book(self, symbol: str) -> BookTop | None:
        return self.books.get(symbol)

    def own(self, partitions: Iterable[int], count: int) -> None:
        """The requests partitions this instance owns, of ``count``: only their orders are
        followed here, so exactly one instance follows each order."""
        self._owned, self._partitions = set(partitions), count

    def _owns(self, symbol: str) -> bool:
        if not self._partitions or len(self._owned) >= self._partitions:
            return True
        return zlib.crc32(symbol.encode()) % self._partitions in self._owned  # librdkafka's

    # -- orders

    def place(self, request: OrderRequest, price: Decimal | None, now_ms: int,
              seen_ms: int | None = None) -> tuple[list[OrderEvent], str]:
        order = new_order(request, price=price if request["order_type"] == OrderType.MARKET
                          else None,
                          options=IOC if request["order_type"] == OrderType.MARKET else None)
        seen_ms = now_ms if seen_ms is None else seen_ms
        cid = order.client_order_id
        paused = self._paused(order.symbol)
        if paused is not None:  # Gemini said the market is shut: do not ask again yet
            reason = f"gemini:{paused}"
            return [request_event(request, K.REJECTED, self.clock_ms(), self.mode,
                                  reason=reason, price=order.price_text)], f"rejected:{reason}"
        try:
            self.record_intent(cid, order.strategy_id, seen_ms)
        except Exception as exc:  # noqa: BLE001 - without the intent nothing may be sent
            self._halt(f"cannot record the intent for {cid}: {exc}")
        try:
            return self._place(request, order, seen_ms)
        except ExecutionHalted:
            raise
        except Exception as exc:  # noqa: BLE001 - an order may be live: never dead-letter it
            log.exception("order %s: unexpected error after its intent", cid)
            self._halt(f"order {cid}: {type(exc).__name__} after its intent")

    def reconcile(self, request: OrderRequest, seen: Seen) -> tuple[list[OrderEvent], str] | None:
        """An intent with no outcome (a predecessor died after recording it): the order
        found at Gemini is adopted (its events published, nothing sent); None when it is
        not there, which is final (see the module doc)."""
        self.counts["reconciled"] += 1
        # The lost request went out after its intent was recorded, within the rate's wait.
        found = self._status_fence(request["client_order_id"],
                                   sent_by_s=seen.seen_ms / 1000 + self.settings.timeout_s)
        if found is None:
            log.info("%s: in doubt after a restart; not at the exchange (fenced)",
                     request["client_order_id"])
            return None
        log.info("%s: in doubt after a restart; found at the exchange, adopting it",
                 request["client_order_id"])
        price = found.get("price")
        order = new_order(request, price=Decimal(price) if price is not None and
                          request["order_type"] == OrderType.MARKET else None,
                          options=IOC if request["order_type"] == OrderType.MARKET else None)
        return self._adopt(order, found, seen.seen_ms)

    def _place(self, request: OrderRequest, order: Order, seen_ms: int
               ) -> tuple[list[OrderEvent], str]:
        cid = order.client_order_id
        price_text = order.price_text

        def send() -> dict:
            return self.rest.new_order(order.symbol, order.amount_text, price_text,
                                       order.side.wire, client_order_id=cid,
                                       options=list(order.options))

        for attempt in (1, 2):
            try:
                found = self._call(f"new order {cid}", send)
                break
            except GeminiApiError as exc:  # refused: nothing was executed
                log.info("REJECTED %s by Gemini: %s (HTTP %s)", cid, exc.reason, exc.http_status)
                if exc.reason in PAUSING:
                    self._pause(order.symbol, exc.reason)
                reason = f"gemini:{exc.reason}"
                return [request_event(request, K.REJECTED, self.clock_ms(), self.mode,
                                      reason=reason, price=price_text)], f"rejected:{reason}"
            except GeminiError as exc:  # timeout, lost connection, 5xx, not JSON: in doubt
                self.counts["in_doubt"] += 1
                log.warning("%s: %s while sending; asking for its status instead of resending",
                            cid, exc)
                status = self._status_fence(cid, sent_by_s=_nonce_time(exc))
                if status is not None:
                    found = status
                    break
                if attempt == 2:
                    reason = "gemini:unreachable"
                    return [request_event(request, K.REJECTED, self.clock_ms(), self.mode,
                                          reason=reason, price=price_text)], f"rejected:{reason}"
                log.info("%s: not at the exchange and fenced by the status call: sending once "
                         "more", cid)
        return self._adopt(order, found, seen_ms)

    def _adopt(self, order: Order, status: dict, seen_ms: int) -> tuple[list[OrderEvent], str]:
        """Events and state for an order Gemini has (just placed, or found)."""
        order.exchange_order_id = str(status["order_id"])
        now = self.clock_ms()
        order.step(K.ACCEPTED)
        events = [order_event(order, K.ACCEPTED, now, self.mode)]
        followed = _Followed(order, seen_ms)
        events += self._exact_fills(followed, status)
        events += self._progress(followed, status)
        if order.is_open:
            self.followed[order.client_order_id] = followed
            followed.next_poll = time.monotonic() + self.settings.follow_interval_s
            return events, f"open:{order.exchange_order_id}"
        return events, SENT

    def _exact_fills(self, followed: _Followed, status: dict) -> list[OrderEvent]:
        """Fill events with their own price, fee and liquidity, where the client can have
        them; REST's status gives only the running totals, so here none (``_progress``
        tells the change of ``executed_amount`` as one fill)."""
        return []

    def _progress(self, followed: _Followed, status: dict, request_id: str | None = None,
                  reason: str | None = None) -> list[OrderEvent]:
        """Events for what changed in a Gemini order since we last looked."""
        order = followed.order
        now = self.clock_ms()
        events: list[OrderEvent] = []
        executed = Decimal(status["executed_amount"])
        new = executed - order.filled
        if new > 0:
            avg = Decimal(status.get("avg_execution_price") or "0")
            price = (avg * executed - order.notional) / new
            fill = Fill(Decimal(plain(price)), new, None, None)
            events.append(order_event(order, order.add_fill(fill), now, self.mode, fill=fill))
        if order.is_open:
            if status.get("is_cancelled"):
                order.step(K.CANCELLED)
                events.append(order_event(order, K.CANCELLED, now, self.mode,
                                          reason=reason or status.get("reason") or "Cancelled",
                                          request_id=request_id))
            elif status.get("is_live") and not followed.booked:
                followed.booked = True
                order.step(K.BOOKED)
                events.append(order_event(order, K.BOOKED, now, self.mode))
        if not order.is_open:
            self.followed.pop(order.client_order_id, None)
        return events

    def cancel(self, request: OrderRequest, now_ms: int) -> tuple[list[OrderEvent], str]:
        return self._cancel(request["target_client_order_id"], request), "cancel"

    def _cancel(self, target: str, request: OrderRequest, reason: str = REQUESTED
                ) -> list[OrderEvent]:
        followed = self.followed.get(target)
        if followed is None:  # acted on (decide checked), no longer live
            return [self._cancel_rejected(target, request, ORDER_CLOSED)]
        order_id = int(followed.order.exchange_order_id)  # type: ignore[arg-type]
        try:
            status = self._call(f"cancel {target}", lambda: self.rest.cancel_order(order_id))
        except GeminiError as exc:
            why = getattr(exc, "reason", type(exc).__name__)
            log.warning("%s: cancel failed: %s", target, why)
            return [self._cancel_rejected(target, request, f"gemini:{why}")]
        events = self._progress(followed, status, request["client_order_id"], reason)
        if not events or events[-1]["kind"] != K.CANCELLED.value:
            events.append(self._cancel_rejected(target, request, ORDER_CLOSED))
        return events

    def _cancel_rejected(self, target: str, request: OrderRequest, why: str) -> OrderEvent:
        followed = self.followed.get(target)
        order = followed.order if followed is not None else Order(
            target, request["strategy_id"], request["symbol"], Side.parse(request["side"]),
            OrderType.LIMIT, None, ZERO, amount_text="0")
        return order_event(order, K.CANCEL_REJECTED, self.clock_ms(), self.mode, reason=why,
                           request_id=request["client_order_id"])

    def cancel_all(self, request: OrderRequest | None, now_ms: int, reason: str
                   ) -> tuple[list[OrderEvent], str]:
        if request is not None:
            events: list[OrderEvent] = []
            for cid, followed in sorted(self.followed.items()):
                order = followed.order
                if order.strategy_id == request["strategy_id"] and \
                        order.symbol == request["symbol"]:
                    events += self._cancel(cid, request)
            return events, "cancel"
        # The kill switch: every order of the session, in one call.
        try:
            answer = self._call("cancel session", self.rest.cancel_session)
        except GeminiError as exc:
            self._halt(f"the kill switch could not cancel the session's orders: "
                       f"{getattr(exc, 'reason', type(exc).__name__)}")
        cancelled = {str(i) for i in (answer.get("details") or {}).get("cancelledOrders", ())}
        events = []
        for cid, followed in sorted(self.followed.items()):
            try:
                status = self._call(f"status {cid}", lambda: self.rest.order_status(
                    order_id=int(followed.order.exchange_order_id)))  # type: ignore[arg-type]  # noqa: B023 - _call calls it at once
            except GeminiError:
                continue  # followed on: the next poll tells
            kill = reason if followed.order.exchange_order_id in cancelled else None
            events += self._progress(followed, status, reason=kill)
        return events, "cancel"

    def cancel_strategy(self, strategy_id: str, now_ms: int, reason: str) -> list[OrderEvent]:
        """One cancel per open order of the strategy (the session is every strategy's)."""
        events: list[OrderEvent] = []
        for cid, followed in sorted(self.followed.items()):
            order = followed.order
            if order.strategy_id == strategy_id:
                request = {"client_order_id": f"halt-{cid}", "strategy_id": strategy_id,
                           "symbol": order.symbol, "side": order.side.wire}
                events += self._cancel(cid, request, reason)  # type: ignore[arg-type]
        return events

    def replace(self, request: OrderRequest, price: Decimal | None, now_ms: int
                ) -> tuple[list[OrderEvent], str]:
        events = self._cancel(request["target_client_order_id"], request)
        if events[-1]["kind"] != K.CANCELLED.value:
            reason = f"replace:{events[-1]['reason']}"
            events.append(request_event(request, K.REJECTED, self.clock_ms(), self.mode,
                                        reason=reason))
            return events, f"rejected:{reason}"
        placed, outcome = self.place(request, price, now_ms)
        return events + placed, outcome

    def poll(self, now_ms: int) -> list[OrderEvent]:
        """Orders past their ``expires_ms`` cancelled (EXPIRED, as in paper: Gemini itself
        has no expiry), then the status of the followed orders that are due (at most the
        rate's worth a call)."""
        if not self.followed:
            return []
        events: list[OrderEvent] = []
        for cid, followed in sorted(self.followed.items()):
            expires = followed.order.expires_ms
            if expires is not None and expires <= now_ms and self._owns(followed.order.symbol):
                events += self._expire(cid, followed)
        now = time.monotonic()
        due = [f for f in self.followed.values()
               if f.next_poll <= now and self._owns(f.order.symbol)]
        for followed in due[:max(1, int(self.settings.rate_per_s))]:
            followed.next_poll = now + self.settings.follow_interval_s
            cid = followed.order.client_order_id
            try:
                status = self._call(f"follow {cid}", lambda: self.rest.order_status(
                    order_id=int(followed.order.exchange_order_id)))  # type: ignore[arg-type]  # noqa: B023 - _call calls it at once
            except GeminiError as exc:  # read-only: try again next time
                log.warning("%s: status poll failed: %s", cid,
                            getattr(exc, "reason", type(exc).__name__))
                continue
            events += self._progress(followed, status)
        return events

    def _expire(self, cid: str, followed: _Followed) -> list[OrderEvent]:
        order_id = int(followed.order.exchange_order_id)  # type: ignore[arg-type]
        try:
            status = self._call(f"expire {cid}", lambda: self.rest.cancel_order(order_id))
        except GeminiError as exc:
            log.warning("%s: cancel at expiry failed: %s", cid,
                        getattr(exc, "reason", type(exc).__name__))
            return []
        events: list[OrderEvent] = []
        order = followed.order
        executed = Decimal(status["executed_amount"])
        if executed > order.filled:  # fills before the cancel: told as fills first
            events += self._progress(followed, {**status, "is_cancelled": False,
                                                "is_live": True})
        if order.is_open and status.get("is_cancelled"):
            order.step(K.EXPIRED)
            self.followed.pop(cid, None)
            events.append(order_event(order, K.EXPIRED, self.clock_ms(), self.mode,
                                      reason=EXPIRED))
        elif order.is_open:
            events += self._progress(followed, status)
        return events

    # -- restore

    def restore(self, seen: Mapping[str, Seen], latest: Mapping[str, OrderEvent]) -> int:
        """Follow again the orders ``seen`` says are open, from their latest event."""
        self.followed = {}
        for cid, s in seen.items():
            if not s.outcome.startswith("open:"):
                continue
            event = latest.get(cid)
            if event is None:
                log.error("%s is open at the exchange (order %s) but has no event: not followed",
                          cid, s.outcome[5:])
                continue
            order = order_from_event(event)
            order.exchange_order_id = s.outcome[5:]
            self.followed[cid] = _Followed(order, s.seen_ms, booked=True)
        return len(self.followed)

    # -- calls

    def check_key(self) -> str:
        """One harmless call (``/v1/balances``) that proves the key works with the configured
        nonce setting, or raises a PipelineError that says which setting the key has."""
        return check_key(self.rest, self.nonces, self.settings.nonce_jump_us)

    def _paused(self, symbol: str) -> str | None:
        until, reason = self.paused.get(symbol, (0.0, ""))
        if until <= time.monotonic():
            self.paused.pop(symbol, None)
            return None
        return reason

    def _pause(self, symbol: str, reason: str) -> None:
        log.warning("%s: Gemini answered %s; its orders are rejected here for %g s",
                    symbol, reason, self.settings.pause_s)
        self.paused[symbol] = (time.monotonic() + self.settings.pause_s, reason)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """One private call through the rate limit. Refusals that executed nothing are
        retried: an InvalidNonce once, after moving the nonce source forward; a 429 with a
        doubling pause, ``rate_limit_retries`` times, then the refusal stands."""
        nonce_retried, limited = False, 0
        while True:
            self.bucket.take()
            try:
                return fn()
            except GeminiRateLimited:
                self.counts["rate_limited"] += 1
                if limited >= self.settings.rate_limit_retries:
                    raise
                pause = min(8.0, self.settings.rate_limit_backoff_s * 2 ** limited)
                limited += 1
                log.warning("%s: Gemini's rate limit (429); retrying in %.1f s", what, pause)
                time.sleep(pause)
            except GeminiApiError as exc:
                if exc.reason != "InvalidNonce" or nonce_retried:
                    raise
                nonce_retried = True
                self.counts["invalid_nonce"] += 1
                moved = self.nonces.advance(self.settings.nonce_jump_us)
                log.warning("%s: Gemini refused the nonce; nonce file moved forward to %d, "
                            "retrying once", what, moved)

    def _status_fence(self, cid: str, sent_by_s: float | None = None) -> dict | None:
        """The order with ``cid`` at the exchange, or None if it is not there (final: see
        the module doc). Raises ExecutionHalted when the exchange cannot be asked.

        With increasing nonces, "not found" is final at once: the status call's nonce is
        above the lost request's. A time-based nonce fences nothing (any nonce within 30 s
        of Gemini's clock is good), so "not found" is only final once the lost request,
        sent by ``sent_by_s``, is too old to be accepted: until then it is asked again."""
        while True:
            found = self._status_once(cid)
            if found is not None or not self.nonces.time_based:
                return found
            final_at = (sent_by_s if sent_by_s is not None else time.time()) + \
                NONCE_WINDOW_S + self.settings.fence_margin_s
            if time.time() >= final_at:
                return None
            log.info("%s: not at the exchange yet; a time-based nonce is good for %d s, so "
                     "asking again at %.0f", cid, NONCE_WINDOW_S, final_at)
            time.sleep(max(0.0, final_at - time.time()))
            sent_by_s = time.time() - NONCE_WINDOW_S - self.settings.fence_margin_s

    def _status_once(self, cid: str) -> dict | None:
        for attempt in range(self.settings.status_attempts):
            try:
                return self._call(f"status {cid}",
                                  lambda: self.rest.order_status(client_order_id=cid))
            except GeminiApiError as exc:
                if exc.reason == "OrderNotFound":
                    return None
                failure = f"{exc.reason} ({exc.http_status})"
            except GeminiError as exc:
                failure = type(exc).__name__
            log.warning("%s: order status unknown (%s), attempt %d", cid, failure, attempt + 1)
            time.sleep(self.settings.status_backoff_s * (attempt + 1))
        self._halt(f"order {cid} is in doubt and its status cannot be had: stopping "
                   "without committing; a restart reconciles it")

    def _halt(self, why: str) -> NoReturn:
        """Stop without committing this batch (see ``ExecutionHalted``)."""
        self.halted = why
        log.critical("execution halted: %s", why)
        raise ExecutionHalted(why)

    def close(self) -> None:
        self.rest.close()


PAUSING = frozenset({"Maintenance", "MarketNotOpen"})  # the symbol's market is shut for now


def _nonce_time(exc: GeminiError) -> float | None:
    """When a request was sent, from its nonce (a time-based nonce is in seconds)."""
    return float(exc.nonce) if exc.nonce is not None else None


def check_key(rest: GeminiRestClient, nonces: Nonces, jump_us: int) -> str:
    """Prove the key works with the configured nonce setting by harmless balance reads, or
    raise a PipelineError that says which setting the key has.

    A key with "Uses a time-based nonce" refuses an increasing (microsecond) nonce, which
    is far outside its 30 s window, even after the nonce file moved forward. A key with
    increasing nonces refuses a time-based nonce once it has seen a larger one, and in any
    case refuses the same seconds nonce twice."""
    setting = "time-based" if nonces.time_based else "increasing"
    try:
        return _check_key(rest, nonces, jump_us, setting)
    except GeminiApiError:
        raise
    except GeminiError as exc:  # unreachable: nothing learnt; orders will tell (in doubt)
        log.warning("could not check the Gemini API key (%s); going on", exc)
        return f"Gemini API key {rest.api_key}: not checked ({type(exc).__name__})"


def _check_key(rest: GeminiRestClient, nonces: Nonces, jump_us: int, setting: str) -> str:
    try:
        if nonces.time_based:
            nonce = nonces.next()
            rest.balances(nonce)
            rest.balances(nonce)  # an increasing key refuses a repeated nonce
        else:
            try:
                rest.balances()
            except GeminiApiError as exc:
                if exc.reason != "InvalidNonce":
                    raise
                nonces.advance(jump_us)  # a stale nonce file: move past what Gemini saw
                rest.balances()
    except GeminiApiError as exc:
        if exc.reason == "InvalidNonce" and nonces.time_based:
            raise PipelineError(
                "Gemini refused a time-based nonce (seconds): the API key uses increasing "
                "nonces (\"Uses a time-based nonce\" is not set), or this machine's clock "
                "is more than 30 s off. Configure nonce = \"increasing\" for this key "
                "(GEMINI_NONCE or \"nonce\" in the key file), or create a key with a "
                "time-based nonce") from None
        if exc.reason == "InvalidNonce":
            raise PipelineError(
                "Gemini refused increasing nonces even after moving past its last one: the "
                "API key has \"Uses a time-based nonce\" set. Configure nonce = \"time\" for "
                "this key (GEMINI_NONCE=time or \"nonce\": \"time\" in the key file)") from None
        raise PipelineError(f"the Gemini API key does not work: {exc.reason} "
                            f"(HTTP {exc.http_status})") from None
    return f"Gemini API key {rest.api_key} works with {setting} nonces"
