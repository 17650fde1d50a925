"""Intents become ``OrderRequest`` records here, one way for the live ``strategy`` group
and the order-book backtest: the same ids, sizes and fields from the same intents.

A request's ``client_order_id`` is derived from the strategy, the input that caused it
(``trigger``: the catalog topic, partition and offset of the triggering record, e.g.
``md.l2/3/1200`` for a book snapshot of that md.l2 record, or ``timer/<ms>``) and its
position among that input's requests, so reprocessing the input yields the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal
from typing import Any, Callable, Iterable, Mapping

from pipeline.core.decimals import ZERO, plain
from pipeline.core.vocabulary import OrderAction, OrderType, Side
from pipeline.trading.intents import (
    INTENT_TYPES,
    CancelAllIntent,
    CancelIntent,
    Intent,
    OrderIntent,
    ReplaceIntent,
)
from pipeline.trading.signing import client_order_id
from pipeline.trading.tracker import OrderTracker

PriceOf = Callable[[str, str], Decimal | None]  # (symbol, side) -> a price to size at


class IntentError(ValueError):
    """An intent the strategy cannot have meant (not an intent at all)."""


@dataclass(frozen=True)
class Refusal:
    """An intent that makes no request, and why (e.g. too little equity for one lot)."""

    intent: Intent
    reason: str


def short_topic(topic: str) -> str:
    """The catalog name of a full topic name (``sim.md.l2`` -> ``md.l2``): triggers are the
    same in every namespace."""
    return topic.split(".", 1)[1] if "." in topic else topic


def record_trigger(topic: str, partition: int, offset: int) -> str:
    """The trigger of intents from a consumed record (a bar, a trade)."""
    return f"{short_topic(topic)}/{partition}/{offset}"


def snapshot_trigger(snapshot: Mapping[str, Any]) -> str:
    """The trigger of intents from a book snapshot: the ``md.l2`` record it includes up to,
    whether the snapshot was published by the orderbook group or rebuilt by a backtest."""
    return f"md.l2/{snapshot['source_partition']}/{snapshot['source_offset']}"


def event_trigger(event: Mapping[str, Any]) -> str:
    """The trigger of intents from an order event."""
    return f"orders.events/{event['client_order_id']}/{event['kind']}/{event['filled_amount']}"


def size_from_fraction(fraction: Decimal, equity: Decimal, price: Decimal, lot: Decimal,
                       fee_rate: Decimal = ZERO) -> Decimal:
    """Whole ``lot``s of ``fraction`` of ``equity`` at ``price`` plus the fee."""
    per_unit = price + price * abs(fee_rate)
    return (equity * fraction / per_unit / lot).to_integral_value(ROUND_FLOOR) * lot


def build_requests(intents: Iterable[Any], *, strategy_id: str, tracker: OrderTracker,
                   trigger: str, now_ms: int, ttl_ms: int, lot: Decimal,
                   price_of: PriceOf, fee_rate: Decimal = ZERO
                   ) -> tuple[list[dict[str, Any]], list[Refusal]]:
    """Unsigned ``OrderRequest``s for ``intents``, and the intents that made none.

    Fractions and ``close_position`` are sized now, from ``tracker`` (position, equity)
    and ``price_of`` (the intent's limit, else the side's best price); a cancel-all
    becomes one request per symbol with open orders; a cancel or replace of an id the
    tracker does not know still goes out (execution answers it)."""
    requests: list[dict[str, Any]] = []
    refused: list[Refusal] = []

    def request(action: OrderAction, symbol: str, side: str, order_type: str,
                price: str | None, amount: str, options: tuple[str, ...] = (),
                target: str | None = None) -> None:
        requests.append({
            "client_order_id": client_order_id(strategy_id, trigger, len(requests)),
            "strategy_id": strategy_id, "symbol": symbol, "side": side,
            "order_type": order_type, "price": price, "amount": amount,
            "options": list(options), "created_ms": now_ms, "expires_ms": now_ms + ttl_ms,
            "trigger": trigger, "action": action.value, "target_client_order_id": target})

    for intent in intents:
        if not isinstance(intent, INTENT_TYPES):
            raise IntentError(f"{intent!r} is not an intent (OrderIntent, CancelIntent, "
                              "CancelAllIntent or ReplaceIntent)")
        if isinstance(intent, OrderIntent):
            sized = _size(intent, tracker, lot, price_of, fee_rate)
            if isinstance(sized, str):
                refused.append(Refusal(intent, sized))
                continue
            side, amount = sized
            request(OrderAction.NEW, intent.symbol, side, intent.order_type, intent.price,
                    amount, intent.options)
        elif isinstance(intent, CancelIntent):
            target = tracker.orders.get(intent.client_order_id)
            if target is not None:
                request(OrderAction.CANCEL, target.symbol, target.side, target.order_type,
                        None, "0", target.options, intent.client_order_id)
            else:
                request(OrderAction.CANCEL, intent.symbol or "", Side.BUY, OrderType.LIMIT,
                        None, "0", target=intent.client_order_id)
        elif isinstance(intent, CancelAllIntent):
            symbols = sorted({o.symbol for o in tracker.open_orders(intent.symbol)
                              if not o.cancel_requested})
            for symbol in symbols:
                request(OrderAction.CANCEL_ALL, symbol, Side.BUY, OrderType.LIMIT, None, "0")
        else:
            assert isinstance(intent, ReplaceIntent)
            target = tracker.orders.get(intent.client_order_id)
            if target is None:
                refused.append(Refusal(intent, "replace: not an open order of the strategy"))
                continue
            amount = intent.amount or plain(target.remaining)
            request(OrderAction.REPLACE, target.symbol, target.side, target.order_type,
                    intent.price or target.price, amount, target.options,
                    intent.client_order_id)
    return requests, refused


def _size(intent: OrderIntent, tracker: OrderTracker, lot: Decimal, price_of: PriceOf,
          fee_rate: Decimal) -> tuple[str, str] | str:
    """(side, amount) of a new order, or why it has none."""
    if intent.close_position:
        position = tracker.position(intent.symbol)
        if not position:
            return "no position to close"
        return (Side.SELL if position > 0 else Side.BUY), plain(abs(position))
    side = intent.side
    assert side is not None
    if intent.amount is not None:
        return side, intent.amount
    equity = tracker.equity()
    price = Decimal(intent.price) if intent.price is not None else price_of(intent.symbol, side)
    if equity is None or price is None:
        return "no equity or price yet to size a fraction of equity"
    units = size_from_fraction(Decimal(intent.fraction), max(ZERO, equity), price, lot,  # type: ignore[arg-type]
                               fee_rate)
    if not units:
        return "insufficient equity for one lot"
    return side, plain(units)
