"""Gemini's rules for one order, checked before it leaves: pure, Decimal, no I/O.

:func:`check_order` is the one implementation. Execution's :func:`~pipeline.trading.
execution.decide` calls it for every NEW and REPLACE (and the cancels of a closed market)
before any client sees the request, so paper, sandbox and live refuse the same orders the
same way, with no HTTP or WebSocket call; the simulated exchange calls it again for every
order that reaches it, so an order-book backtest (which has no ``decide``) refuses them
too. Reasons are Gemini's own names, published with the prefix ``rules:``
(``rules:InvalidPrice``), as risk's are ``risk:...`` and Gemini's answers ``gemini:...``:
the prefix says who refused, the name what Gemini would have said.

Checks, in this order (the first that fails names the refusal):

=============================  =====================================================
``ClientOrderIdMustBeString``  the client_order_id is not a string
``ClientOrderIdTooLong``       it is longer than 36 characters
``InvalidClientOrderId``       it has a character outside ``[:\\-_.#a-zA-Z0-9]`` (or is
                               empty): Gemini documents the pattern but no reason name
                               for it, so this name is ours
``InvalidSymbol``              rules are known but not for this symbol
``UnsupportedOption``          an option that is not one of Gemini's
``ConflictingOptions``         more than one option
``MarketNotOpen``              the status refuses the order: ``closed`` refuses
                               everything (cancels too), ``cancel_only`` every new order,
                               ``post_only`` all but maker-or-cancel limit orders,
                               ``limit_only`` market orders
``InvalidPrice``               a limit price that is not a multiple of the price step
``InvalidQuantity``            an amount below the minimum, or not a multiple of the
                               amount step
=============================  =====================================================

The names are those of Gemini's REST error table (docs.gemini.com/error-codes: "InvalidPrice:
for new orders, the price was invalid", "InvalidQuantity", "InvalidSymbol", "MarketNotOpen:
the market is not accepting new orders", "ConflictingOptions"...), the API orders go
through today. The new WebSocket API's order events use the same names for most
(``MarketNotOpen`` "closed or paused", ``InvalidQuantity`` "below minimum or off
increment") but call an off-tick price ``LimitPriceOffTick`` and an unknown pair
``UnknownInstrument``; REST's names are kept, so that a refusal reads the same whichever
transport would have carried the order. Which reason Gemini gives for a GTC order on a
``post_only`` market, or a market order on a ``limit_only`` one, is not documented: we
assume ``MarketNotOpen``. Its docs say both "under 100 characters" (the error table) and
``{1,36}`` (the client order id page) for the id; the stricter 36 is enforced.

A MARKET order is checked as a market order (``limit_only`` refuses it; it has no price to
check): execution sends it as an immediate-or-cancel limit at the price band's edge, and
that edge is worked out on the symbol's price step (:func:`pipeline.trading.risk.check`).
``rules=None`` means no symbol rules are known: only the id and the options are checked.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Mapping, Sequence

from pipeline.core.rules import CANCEL_ONLY, CLOSED, LIMIT_ONLY, POST_ONLY, SymbolRules
from pipeline.core.vocabulary import OrderAction, OrderOption, OrderType
from pipeline.trading.orders import check_options

PREFIX = "rules:"
CLIENT_ORDER_ID_MUST_BE_STRING = "ClientOrderIdMustBeString"
CLIENT_ORDER_ID_TOO_LONG = "ClientOrderIdTooLong"
INVALID_CLIENT_ORDER_ID = "InvalidClientOrderId"  # not a documented Gemini reason
INVALID_SYMBOL = "InvalidSymbol"
MARKET_NOT_OPEN = "MarketNotOpen"
INVALID_PRICE = "InvalidPrice"
INVALID_QUANTITY = "InvalidQuantity"

MAX_CLIENT_ORDER_ID = 36
CLIENT_ORDER_ID_PATTERN = re.compile(r"[:\-_.#a-zA-Z0-9]{1,36}")
RulesTable = Mapping[str, SymbolRules]
_MOC = OrderOption.MAKER_OR_CANCEL.value
_CANCELS = (OrderAction.CANCEL.value, OrderAction.CANCEL_ALL.value)


def check_order(rules: RulesTable | None, *, symbol: str, order_type: str,
                price: Decimal | None, amount: Decimal, options: Sequence[str] = (),
                client_order_id: object = None, action: str = OrderAction.NEW.value
                ) -> str | None:
    """Gemini's reason for refusing this order (see the module doc), or None. ``price``
    is None for a MARKET order; ``client_order_id`` None: not checked (the simulator's
    orders were checked by execution, or come from a backtest that builds them)."""
    if action in _CANCELS:
        rule = rules.get(symbol) if rules is not None else None
        return MARKET_NOT_OPEN if rule is not None and rule.status == CLOSED else None
    if client_order_id is not None:
        why = client_order_id_problem(client_order_id)
        if why:
            return why
    rule = None
    if rules is not None:
        rule = rules.get(symbol)
        if rule is None:
            return INVALID_SYMBOL
    why = check_options(tuple(options))
    if why or rule is None:
        return why
    market = order_type == OrderType.MARKET.value
    status = rule.status
    if status in (CLOSED, CANCEL_ONLY) or (status == LIMIT_ONLY and market) or \
            (status == POST_ONLY and (market or tuple(options) != (_MOC,))):
        return MARKET_NOT_OPEN
    if price is not None and not on_step(price, rule.price_step):
        return INVALID_PRICE
    if amount < rule.min_amount or not on_step(amount, rule.amount_step):
        return INVALID_QUANTITY
    return None


def client_order_id_problem(client_order_id: object) -> str | None:
    """Gemini's reason for refusing this client_order_id, or None."""
    if not isinstance(client_order_id, str):
        return CLIENT_ORDER_ID_MUST_BE_STRING
    if len(client_order_id) > MAX_CLIENT_ORDER_ID:
        return CLIENT_ORDER_ID_TOO_LONG
    if CLIENT_ORDER_ID_PATTERN.fullmatch(client_order_id) is None:
        return INVALID_CLIENT_ORDER_ID
    return None


def refusal(reason: str) -> str:
    """The reason as published: ``rules:<Gemini's name>``."""
    return PREFIX + reason


def on_step(value: Decimal, step: Decimal) -> bool:
    """Whether ``value`` is an exact multiple of ``step`` (a value too large for the
    context's precision to tell is not)."""
    try:
        return value % step == 0
    except InvalidOperation:
        return False
