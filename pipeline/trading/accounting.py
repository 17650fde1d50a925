"""The one accounting module: what a strategy holds and what it has made, from its fills.

The backtest's brokers and reports, the strategy's own view of its position and equity
(:class:`~pipeline.trading.tracker.OrderTracker`) and the live ``portfolio`` group all
fold fills into a :class:`Ledger`, so a backtest's numbers and a live run's are computed
by the same code. Pure and exact: ``Decimal`` in, ``Decimal`` out, no I/O.

**Positions** are per symbol, as FIFO lots (backtesting.py's trades): a fill first closes
opposite lots, oldest first, at the fill price, and opens the rest as a new lot. A
position's size is the sum of its lots, its cost the sum of size x entry price, its
average entry cost / size.

**Cash** is per currency and *settled*: the capital, plus the gross PnL of closed lots,
less fees, each in its currency. The value of what is held is the open lots at a mark
(``position x mark - cost``: the unrealized PnL), so equity = cash + unrealized, which is
also what a spot account's balances are worth at those marks (``holdings`` gives those
balances: cash less the cost of open lots in the quote, the positions in the base).

**Fees** are per fill, in their currency (``fee_currency``; default the symbol's quote),
or, for the next-open model, a commission rate of the fill's value. A fee in the symbol's
quote is part of the lot's PnL (``ClosedTrade.commission``, :attr:`Ledger.realized`); a
fee in the base currency is debited from that currency's cash, and valued into the
realized PnL at the fill's price when it was paid (equity values that cash at today's
mark, so the two differ by how that price moved); a fee in any other currency is only a
debit of that currency.

**Realized PnL** per symbol, in its quote currency: closed lots' gross PnL less every fee
of the symbol's fills (opening fees count when paid, not when the lot closes).

**Equity, exposure in one currency.** ``equity(marks, currency)`` converts every cash
balance and every symbol's unrealized PnL through the marks: a currency ``C`` is worth
``marks[C + currency]``, or ``1 / marks[currency + C]``; with neither it cannot be valued
and the answer is None (never a guess). ``marks`` are the caller's: the live group gives
only marks young enough to use, so a missing or stale mark makes equity None (stale).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, Iterable, Mapping, cast

from pipeline.core.decimals import ZERO, plain
from pipeline.core.symbols import split_symbol
from pipeline.core.vocabulary import BUY_WIRE, FILL_KINDS

ONE = Decimal(1)


@dataclass(slots=True, eq=False)  # identity: two lots alike are still two trades
class Lot:
    """An open trade (backtesting.py's ``Trade``): a signed size at one entry price.
    ``entry_fee`` is what entering this lot's current size cost (quote currency) when fees
    are given per fill; None when they follow the commission rate (next-open).
    ``entry_index``/``entry_bar`` are the backtest's equity point and bar (-1 elsewhere)."""

    symbol: str
    size: Decimal
    entry_price: Decimal
    entry_ms: int
    entry_index: int = -1
    entry_bar: int = -1
    entry_fee: Decimal | None = None


@dataclass(frozen=True, slots=True)
class ClosedTrade:
    """A settled trade. ``commission`` is entry plus exit commission of this size;
    ``pnl`` is after both; ``return_pct`` is backtesting.py's ``ReturnPct`` (a fraction,
    after commissions, relative to the entry value)."""

    symbol: str
    size: Decimal
    entry_price: Decimal
    exit_price: Decimal
    entry_ms: int
    exit_ms: int
    entry_index: int
    exit_index: int
    entry_bar: int
    exit_bar: int
    pnl: Decimal
    return_pct: Decimal
    commission: Decimal


TRADE_COLUMNS = ("symbol", "size", "entry_bar", "exit_bar", "entry_time", "exit_time",
                 "entry_price", "exit_price", "pnl", "return_pct", "commission")


def conversion(currency: str, into: str, marks: Mapping[str, Decimal]) -> Decimal | None:
    """What one unit of ``currency`` is worth in ``into`` at ``marks`` (symbol -> price),
    through the direct book or the inverse one; None when neither is marked."""
    if currency == into:
        return ONE
    direct = marks.get(currency + into)
    if direct is not None:
        return direct
    inverse = marks.get(into + currency)
    if inverse:
        return ONE / inverse
    return None


def converted(amounts: Iterable[tuple[str, Decimal]], into: str | None,
              marks: Mapping[str, Decimal]) -> Decimal | None:
    """The sum of (currency, amount) pairs in ``into``; None when one cannot be converted."""
    total = ZERO
    for currency, amount in amounts:
        if not amount:
            continue
        rate = None if into is None else conversion(currency, into, marks)
        if rate is None:
            return None
        total += amount if rate is ONE else amount * rate
    return total


class Ledger:
    """One strategy's positions, cash and PnL (see the module doc).

    ``cash`` is the capital, in ``currency`` (default: the quote of the first symbol
    filled). ``commission`` is the rate charged on fills given without a fee.
    ``keep_trades`` False forgets closed trades once counted (a live portfolio's fills
    never end; the backtest's report needs every one)."""

    def __init__(self, cash: Decimal = ZERO, commission: Decimal = ZERO,
                 currency: str | None = None, keep_trades: bool = True) -> None:
        self.currency = currency
        self.balances: dict[str, Decimal] = {}  # settled cash per currency
        self._capital = cash
        if currency is not None:
            self.balances[currency] = cash
        self.rate = commission
        self.keep_trades = keep_trades
        self.lots: dict[str, list[Lot]] = {}
        self.position: dict[str, Decimal] = {}  # symbol -> sum of lot sizes
        self.cost: dict[str, Decimal] = {}  # symbol -> sum of size * entry price
        self.gross: dict[str, Decimal] = {}  # symbol -> sum of |size|
        self.realized: dict[str, Decimal] = {}  # symbol -> realized PnL in its quote
        self.fees: dict[str, Decimal] = {}  # currency -> fees paid in it
        self.closed: list[ClosedTrade] = []
        self.fill_count: dict[str, int] = {}  # symbol -> fills booked

    # -- currency

    def quote_of(self, symbol: str) -> str:
        """The currency ``symbol``'s PnL is in; the first symbol filled names the
        ledger's currency when none was given."""
        quote = split_symbol(symbol)[1]
        if self.currency is None:
            self.currency = quote
            self.balances[quote] = self.balances.get(quote, ZERO) + self._capital
        return quote

    @property
    def cash(self) -> Decimal:
        """Settled cash in the ledger's currency."""
        if self.currency is None:
            return self._capital
        return self.balances.get(self.currency, ZERO)

    @cash.setter
    def cash(self, value: Decimal) -> None:
        if self.currency is None:
            self._capital = value
        else:
            self.balances[self.currency] = value

    def _credit(self, currency: str, amount: Decimal) -> None:
        self.balances[currency] = self.balances.get(currency, ZERO) + amount

    def _fee(self, currency: str, fee: Decimal) -> None:
        if fee:
            self.fees[currency] = self.fees.get(currency, ZERO) + fee

    # -- fills

    def open(self, symbol: str, size: Decimal, price: Decimal, when_ms: int, index: int = -1,
             bar: int = -1, fee: Decimal | None = None) -> Decimal:
        """Open a lot of signed ``size`` at ``price``; ``fee`` in the quote (None: the
        commission rate). Returns the fee charged."""
        quote = self.quote_of(symbol)
        charged = abs(size) * price * self.rate if fee is None else fee
        self._credit(quote, -charged)
        self._fee(quote, charged)
        self.realized[symbol] = self.realized.get(symbol, ZERO) - charged
        self.lots.setdefault(symbol, []).append(Lot(symbol, size, price, when_ms, index, bar,
                                                    fee))
        self.position[symbol] = self.position.get(symbol, ZERO) + size
        self.cost[symbol] = self.cost.get(symbol, ZERO) + size * price
        self.gross[symbol] = self.gross.get(symbol, ZERO) + abs(size)
        return charged

    def close(self, lot: Lot, size: Decimal, price: Decimal, when_ms: int, index: int = -1,
              bar: int = -1, fee: Decimal | None = None) -> Decimal:
        """Close ``size`` (same sign as the lot, at most all of it) of ``lot`` at ``price``;
        ``fee`` is the exit fee in the quote when fees are given per fill."""
        symbol = lot.symbol
        quote = self.quote_of(symbol)
        entry = lot.entry_price
        exit_fee = abs(size) * price * self.rate if fee is None else fee
        gross = size * (price - entry)
        self._credit(quote, gross - exit_fee)
        self._fee(quote, exit_fee)
        self.realized[symbol] = self.realized.get(symbol, ZERO) + gross - exit_fee
        if lot.entry_fee is None:
            entry_fee = abs(size) * entry * self.rate
        else:  # this part's share of what entering the lot cost
            entry_fee = lot.entry_fee if size == lot.size else lot.entry_fee * size / lot.size
            lot.entry_fee -= entry_fee
        commission = entry_fee + exit_fee
        sign = ONE if size > 0 else -ONE
        return_pct = sign * (price / entry - ONE) - commission / (abs(size) * entry)
        if self.keep_trades:
            self.closed.append(ClosedTrade(symbol, size, entry, price, lot.entry_ms, when_ms,
                                           lot.entry_index, index, lot.entry_bar, bar,
                                           gross - commission, return_pct, commission))
        lot.size -= size
        if not lot.size:
            self.lots[symbol].remove(lot)
        self.position[symbol] -= size
        self.cost[symbol] -= size * entry
        self.gross[symbol] -= abs(size)
        return exit_fee

    def fill(self, symbol: str, size: Decimal, price: Decimal, when_ms: int = 0,
             index: int = -1, bar: int = -1, entry_price: Decimal | None = None,
             fee: Decimal | None = None, fee_currency: str | None = None) -> Decimal:
        """A signed fill: close opposite lots oldest first at ``price``, open the rest at
        ``entry_price`` (default ``price``). ``fee``: the fill's whole fee in
        ``fee_currency`` (default the quote), shared out by size (:func:`_share`; the last
        part takes the exact rest); None: the commission rate. Returns the fee charged in
        the quote."""
        self.fill_count[symbol] = self.fill_count.get(symbol, 0) + 1
        base, quote = split_symbol(symbol)
        self.quote_of(symbol)
        if fee is not None and fee_currency is not None and fee_currency.upper() != quote:
            currency = fee_currency.upper()
            self._credit(currency, -fee)
            self._fee(currency, fee)
            if currency == base:  # valued when paid, at the fill's price
                self.realized[symbol] = self.realized.get(symbol, ZERO) - fee * price
            fee = ZERO
        charged = ZERO
        need = size
        total = abs(size)
        for lot in list(self.lots.get(symbol, ())):
            if (lot.size > 0) == (need > 0):
                continue
            part = lot.size if abs(need) >= abs(lot.size) else -need
            share = None
            if fee is not None:
                share = fee - charged if need + part == 0 else _share(fee, abs(part), total)
            charged += self.close(lot, part, price, when_ms, index, bar, share)
            need += part
            if not need:
                break
        if need:
            charged += self.open(symbol, need, entry_price if entry_price is not None else price,
                                 when_ms, index, bar, None if fee is None else fee - charged)
        return charged

    @property
    def fills(self) -> int:
        """Fills booked, every symbol's."""
        return sum(self.fill_count.values())

    # -- valuation

    def unrealized(self, marks: Mapping[str, Decimal]) -> Decimal:
        """Open lots at ``marks`` less their cost, summed as if in one currency (the
        backtest's single-quote case; :meth:`equity` converts)."""
        total = ZERO
        for symbol, position in self.position.items():
            if position or self.cost[symbol]:
                total += position * marks[symbol] - self.cost[symbol]
        return total

    def unrealized_of(self, symbol: str, mark: Decimal) -> Decimal:
        """``symbol``'s open lots at ``mark`` less their cost, in its quote."""
        return self.position.get(symbol, ZERO) * mark - self.cost.get(symbol, ZERO)

    def average_entry(self, symbol: str) -> Decimal | None:
        position = self.position.get(symbol, ZERO)
        return self.cost[symbol] / position if position else None

    def margin(self, marks: Mapping[str, Decimal], symbol: str, mark: Decimal) -> Decimal:
        """Equity minus the value of open trades (backtesting.py's ``margin_available``),
        ``symbol`` marked at ``mark`` and the others at ``marks``; never below zero."""
        total = self.cash
        for s, position in self.position.items():
            gross = self.gross[s]
            if position or gross:
                m = mark if s == symbol else marks[s]
                total += position * m - self.cost[s] - gross * m
        return total if total > 0 else ZERO

    def needs_marks(self) -> set[str]:
        """Symbols whose marks valuing this ledger depends on (before conversion)."""
        return {s for s, p in self.position.items() if p or self.cost.get(s)}

    def _open_values(self, marks: Mapping[str, Decimal],
                     value: Callable[[str, Decimal], Decimal]
                     ) -> list[tuple[str, Decimal]] | None:
        """(quote, ``value(symbol, mark)``) of every symbol valuing depends on; None when
        one has no mark."""
        out = []
        for symbol in self.needs_marks():
            mark = marks.get(symbol)
            if mark is None:
                return None
            out.append((split_symbol(symbol)[1], value(symbol, mark)))
        return out

    def unrealized_total(self, marks: Mapping[str, Decimal], currency: str | None = None
                         ) -> Decimal | None:
        """Open lots at ``marks`` less their cost, every symbol's converted into
        ``currency`` (default the ledger's); None when something cannot be valued."""
        values = self._open_values(marks, self.unrealized_of)
        return None if values is None else converted(values, currency or self.currency, marks)

    def equity(self, marks: Mapping[str, Decimal], currency: str | None = None
               ) -> Decimal | None:
        """Cash plus open positions at ``marks``, in ``currency`` (default the ledger's),
        converting through the marks; None when something held cannot be valued."""
        into = currency or self.currency
        if into is None:
            return self.cash  # nothing was ever filled
        cash = converted(self.balances.items(), into, marks)
        unrealized = self.unrealized_total(marks, into)
        return None if cash is None or unrealized is None else cash + unrealized

    def exposure(self, marks: Mapping[str, Decimal], currency: str | None = None
                 ) -> Decimal | None:
        """The gross value of open positions, ``sum |position x mark|``, in ``currency``."""
        values = self._open_values(marks, lambda s, m: abs(self.position[s] * m))
        return None if values is None else converted(values, currency or self.currency, marks)

    def realized_total(self, marks: Mapping[str, Decimal], currency: str | None = None
                       ) -> Decimal | None:
        """Realized PnL of every symbol in ``currency`` (converted at ``marks``)."""
        return converted(((split_symbol(s)[1], pnl) for s, pnl in self.realized.items()),
                         currency or self.currency, marks)

    def fees_total(self, marks: Mapping[str, Decimal], currency: str | None = None
                   ) -> Decimal | None:
        """Every fee paid, in ``currency`` at ``marks``."""
        return converted(self.fees.items(), currency or self.currency, marks)

    def holdings(self) -> dict[str, Decimal]:
        """What the account holds per currency because of these fills (a spot account's
        balance changes): settled cash, less the cost of open lots in their quote, plus
        the positions in their base."""
        out = dict(self.balances)
        for symbol, position in self.position.items():
            base, quote = split_symbol(symbol)
            out[base] = out.get(base, ZERO) + position
            out[quote] = out.get(quote, ZERO) - self.cost[symbol]
        return {c: v for c, v in out.items() if v or c == self.currency}

    # -- state

    def dump(self) -> dict[str, Any]:
        """JSON-safe state (open lots, cash, PnL, fees; not the closed trades)."""
        return {"currency": self.currency, "capital": plain(self._capital),
                "rate": plain(self.rate),
                "balances": _texts(self.balances), "realized": _texts(self.realized),
                "fees": _texts(self.fees), "fill_count": self.fill_count,
                "lots": [[lot.symbol, plain(lot.size), plain(lot.entry_price), lot.entry_ms,
                          None if lot.entry_fee is None else plain(lot.entry_fee)]
                         for lots in self.lots.values() for lot in lots]}

    @classmethod
    def load(cls, state: Mapping[str, Any], keep_trades: bool = False) -> "Ledger":
        ledger = cls(Decimal(state["capital"]), Decimal(state["rate"]), None, keep_trades)
        ledger.currency = state["currency"]
        ledger.balances = _decimals(state["balances"])
        ledger.realized = _decimals(state["realized"])
        ledger.fees = _decimals(state["fees"])
        ledger.fill_count = dict(state.get("fill_count", {}))  # absent: counted afresh
        for symbol, size, price, when_ms, fee in state["lots"]:
            lot = Lot(symbol, Decimal(size), Decimal(price), when_ms,
                      entry_fee=None if fee is None else Decimal(fee))
            ledger.lots.setdefault(symbol, []).append(lot)
            ledger.position[symbol] = ledger.position.get(symbol, ZERO) + lot.size
            ledger.cost[symbol] = ledger.cost.get(symbol, ZERO) + lot.size * lot.entry_price
            ledger.gross[symbol] = ledger.gross.get(symbol, ZERO) + abs(lot.size)
        for symbol in ledger.realized:
            ledger.position.setdefault(symbol, ZERO)
            ledger.cost.setdefault(symbol, ZERO)
            ledger.gross.setdefault(symbol, ZERO)
        return ledger


def _share(fee: Decimal, part: Decimal, total: Decimal) -> Decimal:
    """``part / total`` of ``fee``, to 12 places below the fee's own: a share with a
    bounded number of places keeps every sum of cash exact (the last part of a fill takes
    the exact rest, so the fill's fees add up to its fee)."""
    exponent = cast(int, fee.as_tuple().exponent)  # a fee is finite: an int exponent
    return (fee * part / total).quantize(Decimal(1).scaleb(exponent - 12))


def new_fill(event: Mapping[str, Any], filled: dict[str, Decimal]
             ) -> tuple[Decimal, Decimal, Decimal, str | None] | None:
    """(signed amount, price, fee, fee currency) of an ``OrderEvent`` that is a fill not
    counted yet, else None. ``filled`` (client_order_id -> filled amount counted) is the
    caller's memory: a fill whose order's ``filled_amount`` does not grow was seen
    already (the caller drops an order's entry once it is closed). Events from before
    the per-fill fields are the change of the running totals at the average price."""
    if event["kind"] not in FILL_KINDS:
        return None
    cid = event["client_order_id"]
    total = Decimal(event["filled_amount"])
    before = filled.get(cid, ZERO)
    if total <= before:
        return None
    filled[cid] = total
    if event.get("last_fill_amount") is not None:
        size = Decimal(event["last_fill_amount"])
        price, fee = Decimal(event["last_fill_price"]), Decimal(event.get("last_fill_fee") or "0")
    else:
        size, price, fee = total - before, Decimal(event["avg_fill_price"] or "0"), ZERO
    if event["side"].lower() != BUY_WIRE:
        size = -size
    return size, price, fee, event.get("fee_currency")


def _texts(values: Mapping[str, Decimal]) -> dict[str, str]:
    return {k: plain(v) for k, v in values.items()}


def _decimals(values: Mapping[str, str]) -> dict[str, Decimal]:
    return {k: Decimal(v) for k, v in values.items()}


def fold(events: Iterable[Mapping[str, Any]], capital: Decimal = ZERO,
         currency: str | None = None) -> Ledger:
    """A ledger of the fills among ``events`` (OrderEvents, one strategy's, in order)."""
    ledger = Ledger(capital, currency=currency, keep_trades=False)
    filled: dict[str, Decimal] = {}
    for event in events:
        fill = new_fill(event, filled)
        if fill is not None:
            size, price, fee, fee_currency = fill
            ledger.fill(event["symbol"], size, price, event["event_ms"], fee=fee,
                        fee_currency=fee_currency)
    return ledger
