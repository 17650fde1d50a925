"""The Gemini execution client over the WebSocket API: orders, cancels and the kill switch
on one authenticated socket, the account's order events for acknowledgements and fills.

It is :class:`~pipeline.gemini.execution.GeminiExecution` (the same intents, risk, expiry,
restore and REST status fence) with the order path moved to the socket:

- ``order.place`` / ``order.cancel`` / ``order.cancel_session`` instead of REST; a market
  request still goes out as an immediate-or-cancel limit at the band's edge;
- fills come from ``orders@account`` with their own price (``L``), amount (``Z``), fee
  (``n``) and liquidity (``m``), deduplicated by trade id (``t``); nothing is polled;
- the socket asks for ``cancelOnDisconnect=true``: if it drops, Gemini cancels what it
  placed. On every (re)connect, before any new order goes out, each followed order is
  re-read over REST: its fills while away from ``mytrades`` (exact, with fees; those
  already published are skipped by their running amount, so each is published once), then
  its status (cancelled by the disconnect, filled, or still live);
- an answer that is lost (timeout, the socket drops, a 5xx) leaves the order in doubt:
  the socket is closed, so the request cannot be executed later, and ``order/status``
  by client_order_id over REST decides, as for REST orders;
- a refusal (``-2010``) is a REJECTED with Gemini's reason; ``-1003`` (rate) is retried
  after a pause like a REST 429; ``-1002`` (not authenticated) halts.

Order-event and answer shapes that Gemini leaves undocumented are read as the local venue
emulates them (see :mod:`pipeline.venue.wstrading`): the reason of a refused order is the
text before the first ``:`` of ``msg``; the fee currency is ``N`` when present, else the
symbol's quote currency. An order event for an order this process does not follow is
published as an ``UNKNOWN`` event (strategy ``external``), never dropped; the portfolio's
reconciliation reports such orders.
"""

from __future__ import annotations

import logging
import queue
import time
from decimal import Decimal
from typing import Any, Callable, Mapping

from pipeline.core.errors import GeminiError, WsError
from pipeline.core.records import OrderEvent, OrderRequest
from pipeline.core.symbols import quote_currency
from pipeline.core.vocabulary import Liquidity, OrderEventKind, OrderType, Side
from pipeline.gemini.execution import GeminiExecution, GeminiSettings, _Followed
from pipeline.gemini.ratelimit import SharedTokenBucket, TokenBucket
from pipeline.gemini.rest import GeminiRestClient, Nonces
from pipeline.gemini.ws_session import WsSession
from pipeline.trading.execution import request_event
from pipeline.trading.orders import EXPIRED, ORDER_CLOSED, REQUESTED, Fill, Order, order_event

log = logging.getLogger(__name__)
K = OrderEventKind
TIME_IN_FORCE = {(): "GTC", ("immediate-or-cancel",): "IOC", ("fill-or-kill",): "FOK",
                 ("maker-or-cancel",): "MOC"}
EXTERNAL = "external"  # the strategy of an order event no one here placed


class GeminiWsExecution(GeminiExecution):
    """See the module doc. ``session`` is the (not yet connected) WebSocket session."""

    def __init__(self, session: WsSession, rest: GeminiRestClient, nonces: Nonces, mode: str,
                 record_intent: Callable[[str, str, int], None],
                 settings: GeminiSettings = GeminiSettings(),
                 clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
                 bucket: TokenBucket | SharedTokenBucket | None = None) -> None:
        super().__init__(rest, nonces, mode, record_intent, settings, clock_ms, bucket)
        self.session = session
        self.counts.update({"ws_connections": 0, "recovered_fills": 0, "unknown_events": 0})
        self._refused: dict[str, None] = {}  # recently refused ids (their REJECTED events)
        self._pending: list[OrderEvent] = []  # events made outside a call, for the next one
        self._recover_due = False  # restored orders not re-read yet (see restore)

    # -- the connection

    def restore(self, seen, latest) -> int:
        """Follow the restored orders, and re-read each of them before the next call: the
        session that placed them died with the last process, and Gemini's cancel-on-
        disconnect (or a fill) closed them meanwhile; the startup key check may already
        have connected this process's session, so a reconnect alone would not re-read
        them (their CANCELLED was never published, and they stayed followed forever)."""
        restored = super().restore(seen, latest)
        self._recover_due = restored > 0
        return restored

    def _ensure_connected(self) -> None:
        """Connect (again) if needed; after a reconnect, recover before anything is sent."""
        if self.session.alive:
            if self._recover_due:
                self._recover_due = False
                self._pending += self._recover()
            return
        self._recover_due = False  # the (re)connect below re-reads every followed order
        reconnect = self.session.connections > 0
        try:
            self.session.connect()
            answer = self.session.request("SUBSCRIBE", ["orders@account"])
        except WsError as exc:
            self._halt(f"the Gemini WebSocket cannot be reached: {exc}")
        if answer.get("status") != 200:
            self._halt(f"Gemini refused the order events subscription: {answer.get('error')}")
        self.counts["ws_connections"] += 1
        self._drain()  # what arrived before the subscription answer
        if reconnect or self.followed:
            log.info("Gemini WebSocket (re)connected: re-reading %d followed order(s)",
                     len(self.followed))
            self._pending += self._recover()

    def _recover(self) -> list[OrderEvent]:
        """Fills missed while away (``mytrades``, exactly once) and each followed order's
        status now (the disconnect cancelled what rested)."""
        events: list[OrderEvent] = []
        by_symbol: dict[str, list[_Followed]] = {}
        for followed in self.followed.values():
            by_symbol.setdefault(followed.order.symbol, []).append(followed)
        for symbol, followed_orders in sorted(by_symbol.items()):
            since = min(f.order.created_ms or f.seen_ms for f in followed_orders)
            try:
                trades = self._call(f"mytrades {symbol}", lambda: self.rest.my_trades(
                    symbol, limit_trades=500, timestamp_ms=since))  # noqa: B023 - _call calls it at once
            except GeminiError as exc:
                self._halt(f"cannot recover the fills of {symbol} after a reconnect: {exc}")
            for followed in followed_orders:
                events += self._missed_fills(followed, trades)
        for cid, followed in sorted(self.followed.items()):
            order_id = int(followed.order.exchange_order_id)  # type: ignore[arg-type]
            try:
                status = self._call(f"status {cid}",
                                    lambda: self.rest.order_status(order_id=order_id))  # noqa: B023 - _call calls it at once
            except GeminiError as exc:
                self._halt(f"cannot re-read order {cid} after a reconnect: {exc}")
            events += self._progress(followed, status)  # its cancel reason, as Gemini says
        return events

    def _missed_fills(self, followed: _Followed, trades: list[dict]) -> list[OrderEvent]:
        """The order's trades beyond what was published, oldest first, each a fill."""
        order = followed.order
        mine = sorted((t for t in trades if str(t.get("order_id")) == order.exchange_order_id),
                      key=lambda t: (t.get("timestampms", 0), t.get("tid", 0)))
        seen_amount, events = Decimal(0), []
        for trade in mine:
            amount = Decimal(trade["amount"])
            # published before (by the stream, or before a restart: within its running amount)
            known = trade.get("tid") in followed.tids or seen_amount + amount <= order.filled
            seen_amount += amount
            followed.tids.add(trade.get("tid"))
            if known or amount > order.remaining:
                continue
            fill = Fill(Decimal(trade["price"]), amount,
                        Liquidity.TAKER if trade.get("aggressor") else Liquidity.MAKER,
                        Decimal(trade["fee_amount"]) if trade.get("fee_amount") else None)
            self.counts["recovered_fills"] += 1
            events.append(order_event(order, order.add_fill(fill), self.clock_ms(), self.mode,
                                      fill=fill))
        return events

    def _exact_fills(self, followed: _Followed, status: dict) -> list[OrderEvent]:
        """An order found over REST (in doubt, reconciled): its fills from ``mytrades``."""
        order = followed.order
        if Decimal(status.get("executed_amount") or "0") <= order.filled:
            return []
        try:
            trades = self._call(f"mytrades {order.symbol}", lambda: self.rest.my_trades(
                order.symbol, limit_trades=500, timestamp_ms=order.created_ms or followed.seen_ms))
        except GeminiError as exc:
            self._halt(f"cannot read the fills of order {order.client_order_id}: {exc}")
        return self._missed_fills(followed, trades)

    # -- orders

    def _place(self, request: OrderRequest, order: Order, seen_ms: int
               ) -> tuple[list[OrderEvent], str]:
        self._ensure_connected()
        cid = order.client_order_id
        params = {"symbol": order.symbol.lower(), "side": order.side.name,
                  "type": "LIMIT", "timeInForce": TIME_IN_FORCE[tuple(order.options)],
                  "price": order.price_text, "quantity": order.amount_text,
                  "clientOrderId": cid}
        events = self._take_pending()
        try:
            answer = self._request(f"order.place {cid}", "order.place", params)
        except WsError as exc:  # lost: in doubt; the socket is closed, so it is fenced
            self.counts["in_doubt"] += 1
            log.warning("%s: %s while placing over the WebSocket; asking its status over REST",
                        cid, exc)
            self.session.close()
            found = self._status_fence(cid, sent_by_s=0.0)  # dead socket: nothing later
            if found is None:
                reason = "gemini:in_doubt_not_placed"
                return events + [request_event(request, K.REJECTED, self.clock_ms(),
                                               self.mode, reason=reason,
                                               price=order.price_text)], f"rejected:{reason}"
            placed, outcome = self._adopt(order, found, seen_ms)
            return events + placed, outcome
        error = answer.get("error") or {}
        if answer.get("status") != 200:
            reason = f"gemini:{_reason(error)}"
            self._refused[cid] = None  # its REJECTED order event is this answer's echo
            while len(self._refused) > 1000:
                del self._refused[next(iter(self._refused))]
            events += self._drain()
            log.info("REJECTED %s by Gemini: %s", cid, error)
            return events + [request_event(request, K.REJECTED, self.clock_ms(), self.mode,
                                           reason=reason, price=order.price_text)], \
                f"rejected:{reason}"
        order.exchange_order_id = str((answer.get("result") or {}).get("orderId") or "") or None
        order.step(K.ACCEPTED)
        events.append(order_event(order, K.ACCEPTED, self.clock_ms(), self.mode))
        self.followed[cid] = _Followed(order, seen_ms)
        events += self._drain()  # its events so far (they may come before the answer)
        if order.is_open:
            return events, f"open:{order.exchange_order_id}"
        return events, "sent"

    def _request(self, what: str, method: str, params: Any) -> dict:
        """One method call through the rate limit; -1003 (rate) retried, -1002 halts."""
        for attempt in range(self.settings.rate_limit_retries + 1):
            self.bucket.take()
            answer = self.session.request(method, params, self.settings.timeout_s)
            status, code = answer.get("status"), (answer.get("error") or {}).get("code")
            if status == 429 or code == -1003:
                self.counts["rate_limited"] += 1
                if attempt < self.settings.rate_limit_retries:
                    time.sleep(min(8.0, self.settings.rate_limit_backoff_s * 2 ** attempt))
                    continue
            if status == 401 or code == -1002:
                self._halt(f"{what}: Gemini says the WebSocket is not authenticated")
            if isinstance(status, int) and status >= 500:
                raise WsError(f"{what}: Gemini answered {status} {answer.get('error')}")
            return answer
        raise AssertionError("unreachable: the last attempt returns")

    def _cancel(self, target: str, request: OrderRequest, reason: str = REQUESTED
                ) -> list[OrderEvent]:
        followed = self.followed.get(target)
        if followed is None:
            return self._take_pending() + [self._cancel_rejected(target, request, ORDER_CLOSED)]
        self._ensure_connected()
        events = self._take_pending()
        if target not in self.followed:  # closed by what the reconnect found
            return events + [self._cancel_rejected(target, request, ORDER_CLOSED)]
        order_id = followed.order.exchange_order_id
        try:
            answer = self._request(f"cancel {target}", "order.cancel", {"orderId": order_id})
        except WsError as exc:
            log.warning("%s: cancel lost (%s); the reconnect re-reads it", target, exc)
            self.session.close()
            self._ensure_connected()  # cancelOnDisconnect cancelled it, or it filled
            events += self._take_pending()
            if target in self.followed:
                events.append(self._cancel_rejected(target, request, "gemini:in_doubt"))
            return events
        if answer.get("status") != 200:
            events += self._drain()
            if target in self.followed:
                events.append(self._cancel_rejected(
                    target, request, f"gemini:{_reason(answer.get('error') or {})}"))
            return events
        events += self._wait_closed({target}, request["client_order_id"], reason)
        events += self._settle({target}, request["client_order_id"], reason)
        if target in self.followed:
            events.append(self._cancel_rejected(target, request, ORDER_CLOSED))
        return events

    def _wait_closed(self, targets: set[str], request_id: str | None, reason: str
                     ) -> list[OrderEvent]:
        """The stream's events until every target is closed (or the timeout)."""
        deadline = time.monotonic() + self.settings.timeout_s
        events: list[OrderEvent] = []
        while True:
            events += self._drain(request_id, reason)
            if not targets & set(self.followed) or time.monotonic() >= deadline:
                return events
            try:
                update = self.session.events.get(timeout=0.05)
            except queue.Empty:
                continue
            events += self._apply(update, request_id, reason)

    def _settle(self, targets: set[str], request_id: str | None, reason: str
                ) -> list[OrderEvent]:
        """Orders a cancel was answered for but the stream never closed: their status over
        REST says what happened (closed before the cancel, e.g. by a disconnect; filled)."""
        events: list[OrderEvent] = []
        for cid in sorted(targets & set(self.followed)):
            followed = self.followed[cid]
            order_id = int(followed.order.exchange_order_id)  # type: ignore[arg-type]
            try:
                status = self._call(f"status {cid}",
                                    lambda: self.rest.order_status(order_id=order_id))  # noqa: B023 - _call calls it at once
            except GeminiError as exc:
                log.warning("%s: no order event after its cancel, and no status: %s", cid, exc)
                continue
            events += self._progress(followed, status, request_id=request_id,
                                     reason=None if status.get("reason") else reason)
        return events

    def cancel_all(self, request: OrderRequest | None, now_ms: int, reason: str
                   ) -> tuple[list[OrderEvent], str]:
        if request is not None:
            return super().cancel_all(request, now_ms, reason)
        # The kill switch: the session's orders, in one call.
        self._ensure_connected()
        events = self._take_pending()
        try:
            answer = self._request("cancel session", "order.cancel_session", {})
        except WsError as exc:
            self._halt(f"the kill switch could not cancel the session's orders: {exc}")
        if answer.get("status") != 200:
            self._halt(f"the kill switch could not cancel the session's orders: "
                       f"{answer.get('error')}")
        events += self._wait_closed(set(self.followed), None, reason)
        events += self._settle(set(self.followed), None, reason)
        return events, "cancel"

    def poll(self, now_ms: int) -> list[OrderEvent]:
        """Orders past their expiry cancelled (EXPIRED); the stream's events since the last
        call; a dropped socket reconnected (and recovered)."""
        if not self.followed and not self._pending and self.session.alive:
            return self._drain()
        self._ensure_connected()
        events = self._take_pending() + self._drain()
        for cid, followed in sorted(self.followed.items()):
            expires = followed.order.expires_ms
            if expires is not None and expires <= now_ms and self._owns(followed.order.symbol):
                events += self._expire(cid, followed)
        return events

    def _expire(self, cid: str, followed: _Followed) -> list[OrderEvent]:
        try:
            answer = self._request(f"expire {cid}", "order.cancel",
                                   {"orderId": followed.order.exchange_order_id})
        except WsError as exc:
            log.warning("%s: cancel at expiry lost (%s)", cid, exc)
            self.session.close()
            return []
        if answer.get("status") != 200:
            return self._drain()
        return self._wait_closed({cid}, None, EXPIRED)

    def check_key(self) -> str:
        """The REST key check, then the WebSocket login (which also proves the key is an
        account key with a time-based nonce)."""
        checked = super().check_key()
        self._ensure_connected()
        return f"{checked}; WebSocket {self.session.url} logged in"

    def close(self) -> None:
        self.session.close()
        super().close()

    # -- order events

    def _take_pending(self) -> list[OrderEvent]:
        events, self._pending = self._pending, []
        return events

    def _drain(self, request_id: str | None = None, reason: str = REQUESTED
               ) -> list[OrderEvent]:
        events: list[OrderEvent] = []
        while True:
            try:
                update = self.session.events.get_nowait()
            except queue.Empty:
                return events
            events += self._apply(update, request_id, reason)

    def _apply(self, update: Mapping[str, Any], request_id: str | None = None,
               reason: str = REQUESTED) -> list[OrderEvent]:
        """Events for one ``orderUpdate``."""
        cid = update.get("c") or next((c for c, f in self.followed.items() if
                                       f.order.exchange_order_id == str(update.get("i"))), None)
        followed = self.followed.get(cid) if cid else None
        if followed is None:
            if update.get("X") == "REJECTED" and cid in self._refused:
                return []  # told already, by the refusal of order.place
            return self._unknown(update)
        order, status, now = followed.order, update.get("X"), self.clock_ms()
        if order.exchange_order_id is None and update.get("i") is not None:
            order.exchange_order_id = str(update["i"])
        events: list[OrderEvent] = []
        if status in ("PARTIALLY_FILLED", "FILLED"):
            tid = update.get("t")
            if tid is not None and tid in followed.tids:
                return []
            followed.tids.add(tid)
            fill = Fill(Decimal(update["L"]), Decimal(update["Z"]),
                        Liquidity.MAKER if update.get("m") else Liquidity.TAKER,
                        Decimal(update["n"]) if update.get("n") not in (None, "") else None)
            events.append(order_event(order, order.add_fill(fill), now, self.mode, fill=fill))
        elif status == "OPEN" and order.is_open and not followed.booked:
            followed.booked = True
            order.step(K.BOOKED)
            events.append(order_event(order, K.BOOKED, now, self.mode))
        elif status == "CANCELED" and order.is_open:
            kind = K.EXPIRED if reason == EXPIRED else K.CANCELLED
            why = reason if update.get("r") in (None, "", "Requested") else update["r"]
            order.step(kind)
            events.append(order_event(order, kind, now, self.mode, reason=why,
                                      request_id=request_id if kind == K.CANCELLED else None))
        if not order.is_open:
            self.followed.pop(order.client_order_id, None)
        return events

    def _unknown(self, update: Mapping[str, Any]) -> list[OrderEvent]:
        """An event of an order this process does not follow: published as UNKNOWN."""
        self.counts["unknown_events"] += 1
        symbol = str(update.get("s") or "-").upper()
        side = Side.parse(str(update.get("S") or "BUY"))
        cid = str(update.get("c") or f"gemini-{update.get('i')}")
        price = update.get("p")
        order = Order(cid, EXTERNAL, symbol, side, OrderType.LIMIT,
                      Decimal(price) if price else None, Decimal(update.get("q") or 0),
                      amount_text=str(update.get("q") or "0"),
                      exchange_order_id=str(update.get("i")) if update.get("i") else None,
                      fee_currency=quote_currency(symbol) if symbol != "-" else "USD")
        log.warning("an order event of an order not followed here: %s %s %s", cid,
                    update.get("X"), symbol)
        return [order_event(order, K.UNKNOWN, self.clock_ms(), self.mode,
                            reason=f"gemini:{update.get('X')}")]


def _reason(error: Mapping[str, Any]) -> str:
    """Gemini's reason name from an error answer: the text before ``:`` of ``msg`` when it
    is a name (the venue's shape, see the module doc), else the code."""
    msg = str(error.get("msg") or "")
    head = msg.split(":", 1)[0].strip()
    if head.isidentifier():
        return head
    return f"code{error.get('code')}" if error.get("code") is not None else "unknown"

