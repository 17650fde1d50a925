"""The local venue's matching and accounts: pure logic, no I/O, Decimal everywhere.

Orders are ``exchange limit`` orders matched against the *market* book of their symbol,
read from a ``BookSource`` (the venue's market-data book). The venue is a price taker:
our fills never change that book. So an order does not take the same liquidity twice,
each order remembers how much it took at each price level (``Order.consumed``), and
forgets a level once it has left the book (new liquidity at that price is new).
Different orders do not see each other's consumption: good enough for a test venue.

Fills:
- at placement the order is the taker: it takes the levels that cross its limit, best
  first, at the level's price, and pays ``taker_fee``;
- an order left resting fills on ``on_book_update`` when the book crosses its limit, at
  its own limit price (the market came to it), and pays ``maker_fee``.
Fees are a fraction of the fill's notional, charged in the quote currency.

Options: none (fill what crosses, rest the remainder), ``maker-or-cancel`` (cancelled,
unfilled, if any of it would fill at placement), ``immediate-or-cancel`` (fill what
crosses, cancel the remainder), ``fill-or-kill`` (fill all at once or cancel unfilled).

Funds: a live buy holds price x remaining x (1 + max fee) of the quote currency, a live
sell holds its remaining base amount; ``available`` is the balance minus these holds.

Symbol rules (Gemini's ``/v1/symbols/details``), enforced here with the venue's own code
(it is the oracle the pipeline's ``trading.rules`` is compared against; only the value
type ``SymbolRules`` is shared, from ``core``): a market whose status is ``closed`` or
``cancel_only`` refuses new orders, ``post_only`` all but maker-or-cancel ones
(MarketNotOpen; ``limit_only`` refuses market orders, and the venue has none); a price
off the price step is InvalidPrice; an amount below the minimum or off the amount step is
InvalidQuantity. A client_order_id must match ``[:\\-_.#a-zA-Z0-9]{1,36}`` (Gemini's
client order id page): longer is ClientOrderIdTooLong, another character
InvalidClientOrderId (a name of ours: Gemini documents none). The rules are the table
given (``rules=``, e.g. read from recorded responses by the caller), else
Gemini's own values for the symbols the venue usually serves (``KNOWN_RULES``), else for
a symbol first seen in the market: price step the finer of 0.01 and the book's decimals
then, amount step 1e-8, minimum 0.00001.
"""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Callable, Iterable, Mapping, Protocol

# The one symbol rule of the project (core imports nothing, so the venue stays independent
# of market/ and trading/). Both names stay importable from here: other modules use them.
from pipeline.core.rules import CANCEL_ONLY, CLOSED, POST_ONLY, SymbolRules
from pipeline.core.symbols import LONG_QUOTES, split_symbol

ORDER_TYPE = "exchange limit"
MAKER_OR_CANCEL = "maker-or-cancel"
IMMEDIATE_OR_CANCEL = "immediate-or-cancel"
FILL_OR_KILL = "fill-or-kill"
OPTIONS = (MAKER_OR_CANCEL, IMMEDIATE_OR_CANCEL, FILL_OR_KILL)
# Why an order was cancelled, as Gemini names it in order events.
CANCEL_REASONS = {
    MAKER_OR_CANCEL: "MakerOrCancelWouldTake",
    IMMEDIATE_OR_CANCEL: "ImmediateOrCancelWouldPost",
    FILL_OR_KILL: "FillOrKillWouldNotFill",
}
DEFAULT_FIAT = Decimal("1000000")  # starting balance of USD and the long (stable) quotes
DEFAULT_COIN = Decimal("10")  # starting balance of every other currency
DEFAULT_TAKER_FEE = Decimal("0.0035")
DEFAULT_MAKER_FEE = Decimal("0.0025")
MAX_CLIENT_ORDER_ID = 36
CLIENT_ORDER_ID = re.compile(r"[:\-_.#a-zA-Z0-9]{1,36}")
ZERO = Decimal(0)
D = Decimal
# Gemini's /v1/symbols/details of 2021-06-24 for the symbols the venue serves by default
# (its generator's BTCUSD and ETHUSD, and the recorded capture's): price step
# (quote_increment), amount step (tick_size), minimum amount, status.
KNOWN_RULES: dict[str, SymbolRules] = {
    symbol: SymbolRules(symbol, D(price), D(amount), D(minimum), status, *split_symbol(symbol))
    for symbol, price, amount, minimum, status in (
        ("BTCUSD", "0.01", "1E-8", "0.00001", "open"),
        ("ETHUSD", "0.01", "0.000001", "0.001", "open"),
        ("ETHBTC", "0.00001", "0.000001", "0.001", "open"),
        ("BTCGBP", "0.01", "1E-8", "0.00001", "open"),
        ("LINKETH", "1E-7", "0.000001", "0.1", "limit_only"),
        ("FILUSD", "0.0001", "0.000001", "0.1", "open"),
        ("ZECLTC", "0.001", "0.000001", "0.001", "open"),
        ("BATBTC", "1E-8", "0.000001", "1", "limit_only"),
        ("ETHEUR", "0.01", "0.000001", "0.001", "open"),
        ("LTCETH", "0.0001", "0.00001", "0.01", "open"),
        ("GRTUSD", "0.0001", "0.000001", "0.1", "open"),
        ("ANKRUSD", "0.00001", "0.000001", "0.1", "open"),
        ("ALCXUSD", "0.01", "0.000001", "0.00001", "open"),
    )}
DEFAULT_PRICE_STEP, DEFAULT_AMOUNT_STEP, DEFAULT_MIN_AMOUNT = D("0.01"), D("1E-8"), D("0.00001")


class BookSource(Protocol):
    """The market the venue trades against (e.g. the venue's market-data book)."""

    def symbols(self) -> set[str]:
        """The tradable symbols, upper case (``BTCUSD``)."""

    def levels(self, symbol: str, side: str) -> list[tuple[Decimal, Decimal]]:
        """(price, quantity) of ``side`` ("bid" or "ask") of ``symbol``, best first."""


class ExchangeError(Exception):
    """A request the venue refuses; ``reason`` is Gemini's reason string."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(slots=True)
class Fill:
    tid: int
    order_id: int
    client_order_id: str | None
    api_key: str
    symbol: str
    side: str  # "buy" or "sell"
    price: Decimal
    amount: Decimal
    fee: Decimal
    fee_currency: str
    aggressor: bool
    timestamp_ms: int


@dataclass(slots=True)
class Order:
    order_id: int
    api_key: str
    symbol: str
    side: str  # "buy" or "sell"
    price: Decimal
    original_amount: Decimal
    options: tuple[str, ...]
    client_order_id: str | None
    timestamp_ms: int
    executed_amount: Decimal = ZERO
    executed_notional: Decimal = ZERO
    is_live: bool = True
    is_cancelled: bool = False
    cancel_reason: str | None = None
    consumed: dict[Decimal, Decimal] = field(default_factory=dict)

    @property
    def remaining_amount(self) -> Decimal:
        return self.original_amount - self.executed_amount

    @property
    def avg_execution_price(self) -> Decimal:
        if not self.executed_amount:
            return ZERO
        return self.executed_notional / self.executed_amount


@dataclass(frozen=True, slots=True)
class Balance:
    currency: str
    amount: Decimal
    available: Decimal


def parse_decimal(value: object, reason: str, what: str) -> Decimal:
    """A positive finite Decimal from Gemini's decimal string (or an int)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        raise ExchangeError(reason, f"{what} must be a decimal string, got {value!r}")
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise ExchangeError(reason, f"{what} {value!r} is not a decimal number") from None
    if not number.is_finite() or number <= 0:
        raise ExchangeError(reason, f"{what} must be positive, got {value!r}")
    return number


def _on_step(value: Decimal, step: Decimal) -> bool:
    try:
        return value % step == 0
    except InvalidOperation:
        return False


class Exchange:
    """Accounts (one per API key), orders, fills and trade history of the local venue."""

    def __init__(
        self,
        book: BookSource,
        *,
        initial_balances: dict[str, Decimal] | None = None,
        taker_fee: Decimal = DEFAULT_TAKER_FEE,
        maker_fee: Decimal = DEFAULT_MAKER_FEE,
        allow_duplicate_client_order_id: bool = True,
        clock: Callable[[], float] = time.time,
        rules: Mapping[str, SymbolRules] | None = None,
    ) -> None:
        self.book = book
        self.given_rules = None if rules is None else {k.upper(): v for k, v in rules.items()}
        self._defaults: dict[str, SymbolRules] = {}
        self.initial_balances = initial_balances
        self.taker_fee = Decimal(taker_fee)
        self.maker_fee = Decimal(maker_fee)
        self.allow_duplicate_client_order_id = allow_duplicate_client_order_id
        self.clock = clock
        self._balances: dict[str, dict[str, Decimal]] = {}
        self._orders: dict[int, Order] = {}
        self._live: dict[int, Order] = {}  # the live subset, so book updates stay cheap
        self._fills: list[Fill] = []
        self._order_ids = itertools.count(1)
        self._tids = itertools.count(1)
        # Called with (status, order, fill or None) at each step of an order, in order:
        # NEW, OPEN (rests), PARTIALLY_FILLED / FILLED (each fill), CANCELED. The venue's
        # WebSocket order events (pipeline.venue.wstrading) listen here.
        self.listeners: list[Callable[[str, Order, Fill | None], None]] = []

    # -- accounts --------------------------------------------------------------------

    def _account(self, api_key: str) -> dict[str, Decimal]:
        """The key's balances, opened on first use with the starting balances.

        With the default balances, a currency of a symbol that appears later (the book
        fills up after the account was opened) is added then: it was never touched.
        """
        account = self._balances.get(api_key)
        if account is None:
            account = self._balances[api_key] = {}
            if self.initial_balances is not None:
                account.update((c.upper(), Decimal(v)) for c, v in self.initial_balances.items())
        if self.initial_balances is None:
            account.setdefault("USD", DEFAULT_FIAT)
            for symbol in self.book.symbols():
                for currency in split_symbol(symbol):
                    if currency not in account:
                        fiat = currency in LONG_QUOTES
                        account[currency] = DEFAULT_FIAT if fiat else DEFAULT_COIN
        return account

    def _held(self, api_key: str, currency: str) -> Decimal:
        held = ZERO
        hold_rate = 1 + max(self.taker_fee, self.maker_fee)
        for order in self._live.values():
            if order.api_key != api_key:
                continue
            base, quote = split_symbol(order.symbol)
            if order.side == "buy" and quote == currency:
                held += order.price * order.remaining_amount * hold_rate
            elif order.side == "sell" and base == currency:
                held += order.remaining_amount
        return held

    def balances(self, api_key: str) -> list[Balance]:
        account = self._account(api_key)
        return [
            Balance(currency, amount, amount - self._held(api_key, currency))
            for currency, amount in sorted(account.items())
        ]

    def available(self, api_key: str, currency: str) -> Decimal:
        return self._account(api_key).get(currency, ZERO) - self._held(api_key, currency)

    # -- symbol rules ----------------------------------------------------------------

    def rules(self, symbol: str) -> SymbolRules | None:
        """The rules of a symbol the venue trades; None: not one (InvalidSymbol)."""
        symbol = symbol.upper()
        if self.given_rules is not None:
            return self.given_rules.get(symbol) if symbol in self.book.symbols() else None
        if symbol not in self.book.symbols():
            return None
        rule = KNOWN_RULES.get(symbol) or self._defaults.get(symbol)
        if rule is None:
            prices = [p for side in ("bid", "ask") for p, _ in self.book.levels(symbol, side)]
            step = min([DEFAULT_PRICE_STEP] + [D(1).scaleb(p.as_tuple().exponent)
                                               for p in prices if p.as_tuple().exponent < 0])
            base, quote = split_symbol(symbol)
            rule = self._defaults[symbol] = SymbolRules(
                symbol, step, DEFAULT_AMOUNT_STEP, DEFAULT_MIN_AMOUNT, base=base, quote=quote)
        return rule

    def symbol_rules(self) -> list[SymbolRules]:
        """The rules of every symbol the venue trades, by symbol."""
        found = (self.rules(symbol) for symbol in sorted(self.book.symbols()))
        return [rule for rule in found if rule is not None]

    def _check_rules(self, symbol: str, amount: Decimal, price: Decimal,
                     options: tuple[str, ...]) -> None:
        rule = self.rules(symbol)
        if rule is None:
            raise ExchangeError("InvalidSymbol", f"no trading rules for {symbol}")
        if rule.status in (CLOSED, CANCEL_ONLY) or \
                (rule.status == POST_ONLY and options != (MAKER_OR_CANCEL,)):
            raise ExchangeError("MarketNotOpen", f"{symbol} is {rule.status}")
        if not _on_step(price, rule.price_step):
            raise ExchangeError("InvalidPrice", f"price {price} is not a multiple of "
                                f"{symbol}'s price step {rule.price_step}")
        if amount < rule.min_amount:
            raise ExchangeError("InvalidQuantity", f"amount {amount} is below {symbol}'s "
                                f"minimum {rule.min_amount}")
        if not _on_step(amount, rule.amount_step):
            raise ExchangeError("InvalidQuantity", f"amount {amount} is not a multiple of "
                                f"{symbol}'s amount step {rule.amount_step}")

    # -- orders ----------------------------------------------------------------------

    def new_order(
        self,
        api_key: str,
        symbol: str,
        amount: object,
        price: object,
        side: str,
        type: str = ORDER_TYPE,
        options: Iterable[str] = (),
        client_order_id: str | None = None,
    ) -> Order:
        """Validate, match against the book as taker, then rest, cancel or finish."""
        symbol = self._symbol(symbol)
        if side not in ("buy", "sell"):
            raise ExchangeError("InvalidSide", f"side must be 'buy' or 'sell', got {side!r}")
        if type != ORDER_TYPE:
            raise ExchangeError("InvalidOrderType", f"only {ORDER_TYPE!r} orders, got {type!r}")
        options = tuple(options)
        for option in options:
            if option not in OPTIONS:
                raise ExchangeError("UnsupportedOption", f"option {option!r} is not supported")
        if len(options) > 1:
            raise ExchangeError("ConflictingOptions", "at most one order execution option")
        amount = parse_decimal(amount, "InvalidQuantity", "amount")
        price = parse_decimal(price, "InvalidPrice", "price")
        self._check_rules(symbol, amount, price, options)
        self._check_client_order_id(api_key, client_order_id)
        self._check_funds(api_key, symbol, side, amount, price)

        order = Order(
            order_id=next(self._order_ids),
            api_key=api_key,
            symbol=symbol,
            side=side,
            price=price,
            original_amount=amount,
            options=options,
            client_order_id=client_order_id,
            timestamp_ms=self._now_ms(),
        )
        self._orders[order.order_id] = self._live[order.order_id] = order
        self._emit("NEW", order)
        plan = self._crossing(order)
        planned = sum((qty for _, qty in plan), ZERO)
        option = options[0] if options else None
        if (option == MAKER_OR_CANCEL and plan) or (option == FILL_OR_KILL and planned < amount):
            self._cancel(order, CANCEL_REASONS[option])
            return order
        for level_price, qty in plan:
            self._fill(order, level_price, level_price, qty, aggressor=True)
        if order.remaining_amount == 0:
            self._close(order)
        elif option == IMMEDIATE_OR_CANCEL:
            self._cancel(order, CANCEL_REASONS[option])
        else:
            self._emit("OPEN", order)
        return order

    def order(
        self, api_key: str, order_id: int | None = None, client_order_id: str | None = None
    ) -> Order:
        """This key's order by id, or its newest order with ``client_order_id``."""
        if order_id is not None:
            order = self._orders.get(order_id)
            if order is not None and order.api_key == api_key:
                return order
            raise ExchangeError("OrderNotFound", f"no order {order_id}")
        for order in reversed(self._orders.values()):
            if order.api_key == api_key and order.client_order_id == client_order_id:
                return order
        raise ExchangeError("OrderNotFound", f"no order with client_order_id {client_order_id!r}")

    def cancel(self, api_key: str, order_id: int, reason: str = "Requested") -> Order:
        """Cancel a live order; a finished one is returned as it is."""
        order = self.order(api_key, order_id=order_id)
        if order.is_live:
            self._cancel(order, reason)
        return order

    def active_orders(self, api_key: str) -> list[Order]:
        """This key's live orders (resting, not filled, not cancelled), by order id."""
        return sorted(
            (o for o in self._live.values() if o.api_key == api_key), key=lambda o: o.order_id
        )

    def cancel_all(self, api_key: str) -> list[Order]:
        """Cancel every live order of this key ("Requested"); the cancelled ones, by order id.

        Serves both Gemini's "cancel all active orders" (every order of the account, from
        every session and the UI) and "cancel all session orders" (only those placed with
        this API key's session). The venue does not model several API keys (sessions) per
        account: each key is its own account, so both mean "this key's live orders".
        Nothing here can refuse a cancel of a live order, so there are never cancel rejects.
        """
        cancelled = self.active_orders(api_key)
        for order in cancelled:
            self._cancel(order, "Requested")
        return cancelled

    def trades(self, api_key: str, symbol: str, limit: int = 50) -> list[Fill]:
        """This key's fills in ``symbol``, newest first."""
        symbol = self._symbol(symbol)
        mine = [f for f in self._fills if f.api_key == api_key and f.symbol == symbol]
        return mine[::-1][:limit]

    def on_book_update(self, symbol: str) -> list[Fill]:
        """Fill the resting orders of ``symbol`` that the current book now crosses."""
        symbol = symbol.upper()
        fills: list[Fill] = []
        for order in list(self._live.values()):
            if order.symbol != symbol:
                continue
            for level_price, qty in self._crossing(order):
                fills.append(self._fill(order, level_price, order.price, qty, aggressor=False))
            if order.remaining_amount == 0:
                self._close(order)
        return fills

    # -- internals -------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _symbol(self, symbol: object) -> str:
        if not isinstance(symbol, str) or symbol.upper() not in self.book.symbols():
            raise ExchangeError("InvalidSymbol", f"unknown symbol {symbol!r}")
        return symbol.upper()

    def _check_client_order_id(self, api_key: str, client_order_id: str | None) -> None:
        if client_order_id is None:
            return
        if not isinstance(client_order_id, str):
            raise ExchangeError("ClientOrderIdMustBeString", "client_order_id must be a string")
        if len(client_order_id) > MAX_CLIENT_ORDER_ID:
            raise ExchangeError(
                "ClientOrderIdTooLong",
                f"client_order_id must be at most {MAX_CLIENT_ORDER_ID} characters",
            )
        if CLIENT_ORDER_ID.fullmatch(client_order_id) is None:
            raise ExchangeError(
                "InvalidClientOrderId", "client_order_id must match [:\\-_.#a-zA-Z0-9]{1,36}"
            )
        if not self.allow_duplicate_client_order_id and any(
            o.api_key == api_key and o.client_order_id == client_order_id
            for o in self._orders.values()
        ):
            raise ExchangeError(
                "DuplicateClientOrderId", f"client_order_id {client_order_id!r} was used before"
            )

    def _check_funds(
        self, api_key: str, symbol: str, side: str, amount: Decimal, price: Decimal
    ) -> None:
        base, quote = split_symbol(symbol)
        if side == "buy":
            currency = quote
            needed = price * amount * (1 + max(self.taker_fee, self.maker_fee))
        else:
            currency, needed = base, amount
        have = self.available(api_key, currency)
        if needed > have:
            raise ExchangeError(
                "InsufficientFunds", f"needs {needed} {currency}, {have} {currency} available"
            )

    def _crossing(self, order: Order) -> list[tuple[Decimal, Decimal]]:
        """(level price, quantity) the order can take from the book now, best first."""
        levels = self.book.levels(order.symbol, "ask" if order.side == "buy" else "bid")
        present = {price for price, _ in levels}
        for gone in [p for p in order.consumed if p not in present]:
            del order.consumed[gone]
        plan: list[tuple[Decimal, Decimal]] = []
        left = order.remaining_amount
        for price, quantity in levels:
            crosses = price <= order.price if order.side == "buy" else price >= order.price
            if left <= 0 or not crosses:
                break
            take = min(left, quantity - order.consumed.get(price, ZERO))
            if take > 0:
                plan.append((price, take))
                left -= take
        return plan

    def _fill(
        self, order: Order, level_price: Decimal, price: Decimal, qty: Decimal, aggressor: bool
    ) -> Fill:
        base, quote = split_symbol(order.symbol)
        account = self._account(order.api_key)
        notional = price * qty
        fee = notional * (self.taker_fee if aggressor else self.maker_fee)
        if order.side == "buy":
            account[quote] = account.get(quote, ZERO) - notional - fee
            account[base] = account.get(base, ZERO) + qty
        else:
            account[base] = account.get(base, ZERO) - qty
            account[quote] = account.get(quote, ZERO) + notional - fee
        order.executed_amount += qty
        order.executed_notional += notional
        order.consumed[level_price] = order.consumed.get(level_price, ZERO) + qty
        fill = Fill(
            tid=next(self._tids),
            order_id=order.order_id,
            client_order_id=order.client_order_id,
            api_key=order.api_key,
            symbol=order.symbol,
            side=order.side,
            price=price,
            amount=qty,
            fee=fee,
            fee_currency=quote,
            aggressor=aggressor,
            timestamp_ms=self._now_ms(),
        )
        self._fills.append(fill)
        self._emit("FILLED" if order.remaining_amount == 0 else "PARTIALLY_FILLED", order, fill)
        return fill

    def _emit(self, status: str, order: Order, fill: Fill | None = None) -> None:
        for listener in self.listeners:
            listener(status, order, fill)

    def _close(self, order: Order) -> None:
        order.is_live = False
        del self._live[order.order_id]

    def _cancel(self, order: Order, reason: str) -> None:
        self._close(order)
        order.is_cancelled = True
        order.cancel_reason = reason
        self._emit("CANCELED", order)
