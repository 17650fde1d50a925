"""Execution's decision, pure: what to do with one ``OrderRequest``, and the interface every
execution client (paper, Gemini) offers. No Kafka, no HTTP: the ``execution`` group does
the I/O around :func:`decide` and a client.

Checks, in order; the first that fails names the outcome:

1. ``unknown_strategy``: no signing key for the request's ``strategy_id``;
2. ``bad_signature``: the HMAC-SHA256 of the request does not match;
3. ``duplicate``: its ``client_order_id`` was acted on before (``seen``), unless the only
   trace is an intent to send (``sending``): then the order's fate must be settled first
   (:data:`RECONCILE`), and the request is decided again once it is known not to be live;
4. a CANCEL or CANCEL_ALL goes through from here (cancels only reduce risk: the kill
   switch and expiry do not stop them), after the target checks: an id never acted on is
   CANCEL_REJECTED ``unknown_order``, another strategy's ``not_owner``; in a ``closed``
   market, ``rules:MarketNotOpen``;
5. ``risk:kill_switch``: the kill switch is on; ``risk:strategy_halted``: the strategy is
   halted (a risk stop on its PnL, or an operator: ``strategy.control``);
6. ``expired``: ``expires_ms`` is in the past;
7. ``invalid_request``: amount or price is not a positive decimal (or a LIMIT without one,
   or one so large that the risk checks' Decimal arithmetic overflows, e.g. ``9e999999``);
   a REPLACE of an unknown or another strategy's order: ``replace:unknown_order`` /
   ``replace:not_owner``;
8. Gemini's rules for the symbol (:func:`pipeline.trading.rules.check_order`: the
   client_order_id, the options, the market's status, the price and amount steps, the
   minimum amount), as ``rules:<Gemini's reason>``, before any client sees the order;
9. the risk limits of :mod:`pipeline.trading.risk` (a replace is checked without the order
   it replaces; a MARKET order's band edge is on the rules' price step).

A request that fails 1 or 2 is not remembered (a forger must not be able to burn a real
strategy's id); every other decision is remembered, whatever it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Container, Mapping, Protocol

from pipeline.core.decimals import ZERO, finite, positive
from pipeline.core.records import OrderEvent, OrderRequest
from pipeline.core.vocabulary import OrderAction, OrderEventKind, OrderType, Side
from pipeline.trading import risk
from pipeline.trading.orders import NOT_OWNER, UNKNOWN_ORDER, Order, order_event
from pipeline.trading.risk import BookTop, RiskLimits, RiskState
from pipeline.trading.rules import RulesTable, check_order, refusal
from pipeline.trading.signing import StrategyKeys, verify

SENDING = "sending"  # the outcome recorded before an order leaves the process
REJECT, CANCEL_REJECT, RECONCILE = "reject", "cancel_reject", "reconcile"
NEW, CANCEL, CANCEL_ALL, REPLACE = (a.value for a in (OrderAction.NEW, OrderAction.CANCEL,
                                                     OrderAction.CANCEL_ALL,
                                                     OrderAction.REPLACE))


class ExecutionHalted(BaseException):
    """An order's fate is unknown and cannot be learned now: stop without committing.

    A ``BaseException`` on purpose: the runtime dead-letters a handler's ``Exception`` and
    commits the batch, which would forget an order that may be live. Raised through
    ``GroupRunner.run``, it aborts the batch's transaction and leaves the group without
    committing (as a kill -9 at that point would, which the intent makes safe); the command
    line then exits with status 3 and the restarted group reconciles.
    """


@dataclass(frozen=True)
class Seen:
    """What execution remembers of a client_order_id (``orders.seen``)."""

    outcome: str
    seen_ms: int
    strategy_id: str


@dataclass(frozen=True)
class Verdict:
    """What to do: ``action`` is REJECT, CANCEL_REJECT, RECONCILE or the request's own
    action (NEW, CANCEL, CANCEL_ALL, REPLACE) when it goes through. ``price`` is the limit
    to send (a MARKET order's price band edge)."""

    action: str
    reason: str | None = None
    remember: bool = True
    detail: str = ""  # for the log: the numbers behind a rejection (never a secret)
    price: Decimal | None = None


def decide(request: Mapping[str, Any], *, keys: StrategyKeys, seen: Mapping[str, Seen],
           killed: bool, now_ms: int, limits: RiskLimits, state: RiskState,
           book: BookTop | None, settled: bool = False,
           halted: Container[str] = frozenset(), rules: RulesTable | None = None) -> Verdict:
    """The verdict on one request (see the module doc). ``settled``: an intent found for
    it was settled (the order is not at the exchange), so decide as for a new request.
    ``rules``: Gemini's symbol rules by symbol; None: none known (ids and options only)."""
    cid, strategy_id = request["client_order_id"], request["strategy_id"]
    key = keys.key(strategy_id)
    if key is None:
        return Verdict(REJECT, "unknown_strategy", remember=False)
    if not verify(request, key):
        return Verdict(REJECT, "bad_signature", remember=False)
    prior = seen.get(cid)
    if prior is not None and prior.outcome != SENDING:
        return Verdict(REJECT, "duplicate", remember=False, detail=f"already {prior.outcome}")
    if prior is not None and not settled:
        return Verdict(RECONCILE)
    action = request.get("action") or NEW
    target = request.get("target_client_order_id")
    if action in (CANCEL, CANCEL_ALL):
        why = _target_problem(target, strategy_id, seen) if action == CANCEL else None
        closed = check_order(rules, symbol=request["symbol"], order_type=request["order_type"],
                             price=None, amount=ZERO, action=action)
        why = why or (refusal(closed) if closed else None)
        return Verdict(CANCEL_REJECT, why) if why else Verdict(action)
    if killed:
        return Verdict(REJECT, risk.KILL_SWITCH)
    if strategy_id in halted:
        return Verdict(REJECT, risk.STRATEGY_HALTED)
    if request["expires_ms"] < now_ms:
        return Verdict(REJECT, "expired", detail=f"expired {now_ms - request['expires_ms']} ms ago")
    amount = positive(request["amount"])
    price = positive(request["price"]) if request["order_type"] == OrderType.LIMIT else None
    if amount is None or (request["order_type"] == OrderType.LIMIT and price is None):
        return Verdict(REJECT, "invalid_request",
                       detail="amount and a LIMIT's price must be positive decimals")
    if action == REPLACE:
        why = _target_problem(target, strategy_id, seen)
        if why:
            return Verdict(REJECT, f"replace:{why}")
    elif action != NEW:
        return Verdict(REJECT, "invalid_request", detail=f"unknown action {action!r}")
    symbol = request["symbol"]
    why = check_order(rules, symbol=symbol, order_type=request["order_type"], price=price,
                      amount=amount, options=request.get("options") or (),
                      client_order_id=cid, action=action)
    if why:
        return Verdict(REJECT, refusal(why), detail=_rules_detail(rules, symbol))
    rule = rules.get(symbol) if rules is not None else None
    try:
        decision = risk.check(limits, state, book, strategy_id=strategy_id,
                              symbol=symbol, side=Side.parse(request["side"]).wire,
                              order_type=request["order_type"], price=price, amount=amount,
                              now_ms=now_ms, replacing=target if action == REPLACE else None,
                              price_step=rule.price_step if rule is not None else None)
    except ArithmeticError as exc:  # e.g. a price of 9e999999: decimal.Overflow
        return Verdict(REJECT, "invalid_request",
                       detail=f"amount or price out of range ({type(exc).__name__})")
    if not decision.accepted:
        return Verdict(REJECT, decision.reason, price=decision.price, detail=decision.detail)
    return Verdict(action, price=decision.price)


def _rules_detail(rules: RulesTable | None, symbol: str) -> str:
    rule = rules.get(symbol) if rules is not None else None
    if rule is None:
        return ""
    return (f"{symbol} {rule.status}: price step {rule.price_step}, amount step "
            f"{rule.amount_step}, min amount {rule.min_amount}")


def _target_problem(target: str | None, strategy_id: str, seen: Mapping[str, Seen]) -> str | None:
    owner = seen.get(target) if target else None
    if owner is None:
        return UNKNOWN_ORDER
    if owner.strategy_id != strategy_id:
        return NOT_OWNER
    return None


def request_event(request: Mapping[str, Any], kind: OrderEventKind, when_ms: int, mode: str,
                  *, reason: str | None = None, price: str | None = None) -> OrderEvent:
    """An event about a request that never became an order (REJECTED), in the order
    event's shape, for the request's own id."""
    text = price if price is not None else request.get("price")
    order = Order(request["client_order_id"], request["strategy_id"], request["symbol"] or "-",
                  Side.parse(request["side"]), OrderType(request["order_type"]),
                  finite(text),  # a forged request's price may be any text
                  positive(request["amount"]) or ZERO, price_text=text,
                  amount_text=request["amount"])
    order.step(kind)
    return order_event(order, kind, when_ms, mode, reason=reason)


def cancel_rejected(request: Mapping[str, Any], reason: str, when_ms: int, mode: str
                    ) -> OrderEvent:
    """CANCEL_REJECTED for a cancel whose target was refused before any client saw it:
    about the target's id, for the requester, telling nothing of the target itself."""
    stub = Order(request.get("target_client_order_id") or "", request["strategy_id"],
                 request["symbol"] or "-", Side.BUY, OrderType.LIMIT, None, ZERO,
                 amount_text="0")
    return order_event(stub, OrderEventKind.CANCEL_REJECTED, when_ms, mode, reason=reason,
                       request_id=request["client_order_id"])


class ExecutionClient(Protocol):
    """Where orders go. Every method returns the ``OrderEvent``s it caused, in order, and
    the outcome to remember for the request (``orders.seen``) where it has one."""

    mode: str

    def place(self, request: OrderRequest, price: Decimal | None, now_ms: int,
              seen_ms: int | None = None) -> tuple[list[OrderEvent], str]:
        """A NEW request; ``price`` is the limit to send (a MARKET's band edge); ``seen_ms``
        when execution first saw it (a request settled after a restart keeps its own)."""

    def replace(self, request: OrderRequest, price: Decimal | None, now_ms: int
                ) -> tuple[list[OrderEvent], str]:
        """Cancel the request's target, then place it once the cancel is confirmed."""

    def cancel(self, request: OrderRequest, now_ms: int) -> tuple[list[OrderEvent], str]:
        ...

    def cancel_all(self, request: OrderRequest | None, now_ms: int, reason: str
                   ) -> tuple[list[OrderEvent], str]:
        """The request's strategy's open orders in its symbol; with no request (the kill
        switch) every open order this client has."""

    def cancel_strategy(self, strategy_id: str, now_ms: int, reason: str) -> list[OrderEvent]:
        """Every open order of ``strategy_id``, in every symbol (a halted strategy)."""

    def poll(self, now_ms: int) -> list[OrderEvent]:
        """What happened since the last call (fills of resting orders, expiries)."""

    def book(self, symbol: str) -> BookTop | None:
        """The latest book of ``symbol`` risk is checked against."""
