"""Live portfolio: every strategy's ledger, marked to the books, with risk stops on PnL.

Pure logic behind the ``portfolio`` group (``consumers/portfolio.py``), no Kafka: fills
(``OrderEvent``) go into one :class:`~pipeline.trading.accounting.Ledger` per strategy,
book snapshots give the marks, every event keeps the open orders (what reconciliation
compares with Gemini's), and every call returns the records to publish
(``Position``, ``StrategyPnl``, ``StrategyControl``).

* **Marks** are the mid of a symbol's latest snapshot, used while younger than
  ``max_mark_age_ms`` (by the caller's clock); a figure that needs an older or missing
  mark is null and the record says ``stale`` (never computed from an old price).
* **Drawdown** is the peak equity seen (the capital, before the first fill) minus equity
  now; **daily PnL** is equity now minus the first equity of the UTC day (of the clock;
  the capital on the first day). Both only move on fresh figures.
* **Risk stops** (:class:`RiskStop` per strategy): crossing ``max_drawdown`` (currency, or
  a percentage of the peak) or ``max_daily_loss`` publishes one halt
  (``StrategyControl``) that execution obeys. A resume (``pipeline strategy resume``)
  starts both measures afresh from the equity at that moment.
* **Bad fills** (unknown symbol, amount or price not positive, a fee that is not a
  decimal) raise :class:`BadFill` before anything changes: the group dead-letters them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Mapping, TypedDict

from pipeline.core.decimals import ZERO, non_negative, plain, positive
from pipeline.core.errors import BadFill, PipelineError
from pipeline.core.records import Position, StrategyControl, StrategyPnl
from pipeline.core.symbols import split_symbol
from pipeline.core.vocabulary import FILL_KINDS, TERMINAL_KINDS, OrderEventKind
from pipeline.trading.accounting import Ledger, conversion, converted, new_fill

STATE_VERSION = 1
DAY_MS = 86_400_000
CLOSED_MEMORY = 1_000  # closed orders whose repeated events are recognised
FILL_MEMORY_MS = 2 * DAY_MS  # how long an order's fills are kept for reconciliation
FILL_MEMORY_ORDERS = 5_000  # and for at most this many orders (mytrades gives 500/symbol)
K = OrderEventKind


#: A record to publish: ``(kind, record)``, kind ``position``, ``pnl`` or ``control``.
Output = tuple[str, "Position | StrategyPnl | StrategyControl"]


class HeldOrder(TypedDict):
    """An open order as its latest ``OrderEvent`` tells it (:attr:`Portfolio.open_orders`)."""

    strategy_id: str
    symbol: str
    side: str
    price: str | None
    amount: str
    filled_amount: str
    exchange_order_id: str | None
    mode: str
    event_ms: int


class OrderFills(TypedDict):
    """An order's fills counted so far (:attr:`Portfolio.order_fills`)."""

    client_order_id: str
    strategy_id: str
    symbol: str
    mode: str
    amount: str  # total, a decimal string
    fee: str  # total, a decimal string
    last_ms: int


@dataclass(frozen=True)
class RiskStop:
    """Per-strategy PnL limits; None: no limit. ``max_drawdown_pct`` is a fraction."""

    max_drawdown: Decimal | None = None
    max_drawdown_pct: Decimal | None = None
    max_daily_loss: Decimal | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> "RiskStop":
        """From the topology: ``{max_drawdown = "100" | "5%", max_daily_loss = "50"}``."""
        unknown = set(raw) - {"max_drawdown", "max_daily_loss"}
        if unknown:
            raise PipelineError(f"unknown risk limit(s) {', '.join(sorted(unknown))}: "
                                "max_drawdown, max_daily_loss")
        values: dict[str, Decimal | None] = {}
        for name in ("max_drawdown", "max_daily_loss"):
            text = raw.get(name)
            if text is None:
                continue
            text = str(text).strip()
            pct = text.endswith("%")
            try:
                value = Decimal(text[:-1] if pct else text)
            except InvalidOperation:
                raise PipelineError(f"{name} must be an amount or a percentage, not {text!r}"
                                    ) from None
            if not value.is_finite() or value <= 0:
                raise PipelineError(f"{name} must be positive, not {text!r}")
            if pct and name == "max_daily_loss":
                raise PipelineError("max_daily_loss is an amount in the strategy's currency")
            values[name + ("_pct" if pct else "")] = value / 100 if pct else value
        return cls(**values)


@dataclass
class PortfolioConfig:
    capital: Mapping[str, Decimal] = field(default_factory=dict)  # strategy -> capital
    default_capital: Decimal = ZERO
    currency: str = "USD"  # what equity is reported in
    limits: Mapping[str, RiskStop] = field(default_factory=dict)  # strategy or "*"
    symbols: frozenset[str] = frozenset()  # known symbols; empty: any
    max_mark_age_ms: int | None = 60_000
    pnl_interval_ms: int = 10_000

    def capital_of(self, strategy_id: str) -> Decimal:
        return self.capital.get(strategy_id, self.default_capital)

    def limit_of(self, strategy_id: str) -> RiskStop | None:
        return self.limits.get(strategy_id) or self.limits.get("*")


@dataclass
class StrategyAccount:
    """One strategy's ledger and the peaks its risk stops measure from."""

    ledger: Ledger
    peak: Decimal | None = None
    day: int | None = None  # UTC day number of day_start
    day_start: Decimal | None = None
    halted: bool = False
    halt_reason: str | None = None
    seq: int = 0
    rejections: dict[str, int] = field(default_factory=dict)  # reason -> orders

    def dump(self) -> dict[str, Any]:
        return {"ledger": self.ledger.dump(), "peak": _text(self.peak), "day": self.day,
                "day_start": _text(self.day_start), "halted": self.halted,
                "halt_reason": self.halt_reason, "seq": self.seq,
                "rejections": self.rejections}

    @classmethod
    def load(cls, state: Mapping[str, Any]) -> "StrategyAccount":
        return cls(Ledger.load(state["ledger"]), _number(state["peak"]), state["day"],
                   _number(state["day_start"]), state["halted"], state["halt_reason"],
                   state["seq"], dict(state["rejections"]))


@dataclass(frozen=True)
class Valuation:
    """A strategy's figures at the current marks (None where a mark is missing/stale)."""

    realized: Decimal | None
    unrealized: Decimal | None
    fees: Decimal | None
    equity: Decimal | None
    exposure: Decimal | None
    stale: tuple[str, ...]


class Portfolio:
    """See the module doc. Call :meth:`on_event`, :meth:`on_book`, :meth:`on_control`,
    :meth:`tick`; each returns ``(kind, record)`` pairs, kind one of ``position``,
    ``pnl``, ``control``."""

    def __init__(self, config: PortfolioConfig) -> None:
        self.config = config
        self.accounts: dict[str, StrategyAccount] = {}
        self.books: dict[str, tuple[str, str, int]] = {}  # symbol -> (bid, ask, ms)
        self._filled: dict[str, Decimal] = {}  # open orders' counted fill amounts
        self._closed: OrderedDict[str, None] = OrderedDict()  # recently closed orders
        self.open_orders: dict[str, HeldOrder] = {}  # client_order_id -> the order, while open
        # exchange order id (else client order id) -> its fills' total amount and fees,
        # for orders filled in the last FILL_MEMORY_MS (what reconciliation compares)
        self.order_fills: dict[str, OrderFills] = {}
        self.last_tick_ms: int | None = None
        self._mids: dict[str, Decimal] = {}  # symbol -> mid of its book, once worked out
        self._marks: dict[str, Decimal] | None = None  # marks(_marks_at), until a book moves
        self._marks_at: int | None = None

    # -- in

    def account(self, strategy_id: str) -> StrategyAccount:
        account = self.accounts.get(strategy_id)
        if account is None:
            capital = self.config.capital_of(strategy_id)
            ledger = Ledger(capital, currency=self.config.currency, keep_trades=False)
            # before its first fill a strategy is worth its capital: the first peak
            account = self.accounts[strategy_id] = StrategyAccount(ledger, peak=capital,
                                                                   day_start=capital)
        return account

    def on_event(self, event: Mapping[str, Any], now_ms: int) -> list[Output]:
        """An ``OrderEvent``: a fill books into its strategy's ledger; every event keeps
        the open orders (for reconciliation) up to date. Raises :class:`BadFill` (nothing
        changed)."""
        cid, kind = event["client_order_id"], event["kind"]
        if kind in FILL_KINDS:
            self._check(event)
        if cid in self._closed:  # a repeat of an event of a closed order
            return []
        fill = new_fill(event, self._filled)
        if kind == K.REJECTED.value:
            rejections = self.account(event["strategy_id"]).rejections
            reason = event.get("reason") or "unknown"
            rejections[reason] = rejections.get(reason, 0) + 1
        if kind in TERMINAL_KINDS:
            self._filled.pop(cid, None)
            self.open_orders.pop(cid, None)
            self._closed[cid] = None
            while len(self._closed) > CLOSED_MEMORY:
                self._closed.popitem(last=False)
        elif kind not in (K.REJECTED.value, K.CANCEL_REJECTED.value):
            self.open_orders[cid] = {
                "strategy_id": event["strategy_id"], "symbol": event["symbol"],
                "side": event["side"], "price": event.get("price"), "amount": event["amount"],
                "filled_amount": event["filled_amount"],
                "exchange_order_id": event.get("exchange_order_id"), "mode": event["mode"],
                "event_ms": event["event_ms"]}
        if fill is None:
            return []
        size, price, fee, fee_currency = fill
        strategy, symbol = event["strategy_id"], event["symbol"]
        account = self.account(strategy)
        account.ledger.fill(symbol, size, price, event["event_ms"], fee=fee,
                            fee_currency=fee_currency)
        key = event.get("exchange_order_id") or cid
        seen = self.order_fills.setdefault(key, {
            "client_order_id": cid, "strategy_id": strategy, "symbol": symbol, "mode":
            event["mode"], "amount": "0", "fee": "0", "last_ms": event["event_ms"]})
        while len(self.order_fills) > FILL_MEMORY_ORDERS:
            del self.order_fills[next(iter(self.order_fills))]
        seen["amount"] = plain(Decimal(seen["amount"]) + abs(size))
        seen["fee"] = plain(Decimal(seen["fee"]) + fee)
        seen["last_ms"] = event["event_ms"]
        out = [("position", self.position(strategy, symbol, now_ms))]
        return out + self._report(strategy, "fill", event["event_ms"], now_ms)

    def _check(self, event: Mapping[str, Any]) -> None:
        symbol = event.get("symbol")
        where = f"order {event.get('client_order_id')!r} of {event.get('strategy_id')!r}"
        known = self.config.symbols
        if not isinstance(symbol, str) or (known and symbol not in known):
            raise BadFill(f"{where}: unknown symbol {symbol!r}")
        for name in ("filled_amount", "last_fill_amount", "last_fill_price", "last_fill_fee"):
            text = event.get(name)
            if text is None:
                continue
            try:
                Decimal(text)
            except (InvalidOperation, TypeError):
                raise BadFill(f"{where}: {name} is not a decimal: {text!r}") from None
            strict = name in ("last_fill_amount", "last_fill_price")
            if (positive(text) if strict else non_negative(text)) is None:
                raise BadFill(f"{where}: {name} must be {'positive' if strict else 'zero or more'}"
                              f", not {text!r}")

    def on_book(self, snapshot: Mapping[str, Any]) -> None:
        """A ``BookSnapshot``: the symbol's mark (its mid, worked out when used)."""
        if snapshot["bids"] and snapshot["asks"]:
            symbol = snapshot["symbol"]
            self.books[symbol] = (snapshot["bids"][0]["price"], snapshot["asks"][0]["price"],
                                  snapshot["received_ts_us"] // 1000)
            self._mids.pop(symbol, None)
            self._marks = None

    def on_control(self, record: Mapping[str, Any], now_ms: int) -> list[Output]:
        """A ``StrategyControl``: a resume clears the halt and measures afresh; a halt
        (ours coming back, or an operator's) is remembered."""
        account = self.account(record["strategy_id"])
        if record["halted"]:
            if account.halted:
                return []
            account.halted, account.halt_reason = True, record["reason"]
        else:
            if not account.halted:
                return []
            account.halted, account.halt_reason = False, None
            value = self.valuation(record["strategy_id"], now_ms)
            account.peak = value.equity
            account.day, account.day_start = now_ms // DAY_MS, value.equity
        return self._report(record["strategy_id"], "control", now_ms, now_ms)

    def tick(self, now_ms: int) -> list[Output]:
        """Every ``pnl_interval_ms``: each strategy's PnL and held positions, re-marked."""
        last = self.last_tick_ms
        if last is not None and now_ms - last < self.config.pnl_interval_ms:
            return []
        self.last_tick_ms = now_ms
        for key in [k for k, f in self.order_fills.items()
                    if f["last_ms"] < now_ms - FILL_MEMORY_MS]:
            del self.order_fills[key]
        out: list[Output] = []
        for strategy in sorted(self.accounts):
            ledger = self.accounts[strategy].ledger
            out += [("position", self.position(strategy, s, now_ms))
                    for s in sorted(ledger.needs_marks())]
            out += self._report(strategy, "timer", now_ms, now_ms)
        return out

    # -- figures

    def marks(self, now_ms: int) -> dict[str, Decimal]:
        """Fresh marks: symbol -> the mid of its last book, if no older than the limit
        (mids are worked out once per book, when first used)."""
        limit = self.config.max_mark_age_ms
        if self._marks_at == now_ms and self._marks is not None:
            return self._marks
        fresh: dict[str, Decimal] = {}
        mids = self._mids
        for symbol, (bid, ask, ms) in self.books.items():
            if limit is None or now_ms - ms <= limit:
                mid = mids.get(symbol)
                if mid is None:
                    mid = mids[symbol] = (Decimal(bid) + Decimal(ask)) / 2
                fresh[symbol] = mid
        self._marks_at, self._marks = now_ms, fresh
        return fresh

    def valuation(self, strategy_id: str, now_ms: int) -> Valuation:
        """The strategy's figures in the portfolio's currency at the fresh marks."""
        ledger = self.account(strategy_id).ledger
        marks = self.marks(now_ms)
        into = self.config.currency
        stale = [s for s in sorted(ledger.needs_marks()) if s not in marks]
        currencies = {split_symbol(s)[1] for s in ledger.realized} | \
            {c for c, v in ledger.balances.items() if v}
        stale += [f"{c}{into}" for c in sorted(currencies) if conversion(c, into, marks) is None]
        unrealized = ledger.unrealized_total(marks, into)
        cash = converted(ledger.balances.items(), into, marks)
        equity = None if cash is None or unrealized is None else cash + unrealized
        return Valuation(ledger.realized_total(marks, into), unrealized,
                         ledger.fees_total(marks, into), equity,
                         ledger.exposure(marks, into), tuple(stale))

    def position(self, strategy_id: str, symbol: str, now_ms: int) -> Position:
        account = self.account(strategy_id)
        ledger = account.ledger
        book = self.books.get(symbol)
        mark = self.marks(now_ms).get(symbol)
        quantity = ledger.position.get(symbol, ZERO)
        return {"strategy_id": strategy_id, "symbol": symbol, "quantity": plain(quantity),
                "average_entry": _text(ledger.average_entry(symbol)),
                "cost": plain(ledger.cost.get(symbol, ZERO)),
                "realized_pnl": plain(ledger.realized.get(symbol, ZERO)),
                "unrealized_pnl": (None if mark is None
                                   else plain(ledger.unrealized_of(symbol, mark))),
                "mark": None if mark is None else plain(mark),
                "mark_ms": None if mark is None or book is None else book[2],
                "currency": split_symbol(symbol)[1],
                "fills": ledger.fill_count.get(symbol, 0), "updated_ms": now_ms}

    def _report(self, strategy_id: str, trigger: str, event_ms: int, now_ms: int
                ) -> list[Output]:
        """The strategy's PnL record, and a halt if a risk stop is crossed."""
        account = self.account(strategy_id)
        value = self.valuation(strategy_id, now_ms)
        equity = value.equity
        drawdown = pct = daily = None
        if equity is not None:
            if account.peak is None or equity > account.peak:
                account.peak = equity
            day = now_ms // DAY_MS
            if account.day is None and account.day_start is not None:
                account.day = day  # the first day starts from the capital
            elif account.day != day or account.day_start is None:
                account.day, account.day_start = day, equity
            drawdown = account.peak - equity
            pct = drawdown / account.peak if account.peak > 0 else None
            daily = equity - account.day_start
        out: list[Output] = []
        halt = None if account.halted or equity is None else \
            _crossed(self.config.limit_of(strategy_id), drawdown, pct, daily,
                     self.config.currency)
        if halt is not None:
            account.halted, account.halt_reason = True, halt[0]
            out.append(("control", {"strategy_id": strategy_id, "halted": True,
                                    "reason": halt[0], "detail": halt[1], "at_ms": now_ms,
                                    "by": "portfolio"}))
        account.seq += 1
        ledger = account.ledger
        out.insert(0, ("pnl", {
            "strategy_id": strategy_id, "seq": account.seq, "event_ms": event_ms,
            "trigger": trigger, "currency": self.config.currency,
            "capital": plain(self.config.capital_of(strategy_id)),
            "realized_pnl": _text(value.realized), "unrealized_pnl": _text(value.unrealized),
            "fees": _text(value.fees), "equity": _text(equity),
            "peak_equity": _text(account.peak), "drawdown": _text(drawdown),
            "drawdown_pct": _text(pct), "daily_pnl": _text(daily),
            "exposure": _text(value.exposure), "fills": ledger.fills,
            "rejections": dict(account.rejections),
            "stale": bool(value.stale), "stale_symbols": list(value.stale),
            "halted": account.halted}))
        return out

    # -- state

    def dump(self) -> dict[str, Any]:
        return {"version": STATE_VERSION,
                "accounts": {s: a.dump() for s, a in self.accounts.items()},
                "books": {s: list(b) for s, b in self.books.items()},
                "filled": {c: plain(f) for c, f in self._filled.items()},
                "closed": list(self._closed), "open_orders": self.open_orders,
                "order_fills": self.order_fills, "last_tick_ms": self.last_tick_ms}

    def load(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise PipelineError(f"portfolio state version {state.get('version')!r} is not "
                                f"{STATE_VERSION}: this code cannot read it")
        self.accounts = {s: StrategyAccount.load(a) for s, a in state["accounts"].items()}
        self.books = {s: (b[0], b[1], b[2]) for s, b in state["books"].items()}
        self._mids, self._marks = {}, None
        self._filled = {c: Decimal(f) for c, f in state["filled"].items()}
        self._closed = OrderedDict.fromkeys(state["closed"])
        self.open_orders = dict(state["open_orders"])
        self.order_fills = dict(state["order_fills"])
        self.last_tick_ms = state["last_tick_ms"]

    def holdings(self) -> dict[str, Decimal]:
        """What every strategy's fills changed in the account, per currency (capital not
        counted): what reconciliation expects Gemini's balances to have moved by."""
        out: dict[str, Decimal] = {}
        for strategy, account in self.accounts.items():
            for currency, amount in account.ledger.holdings().items():
                if currency == account.ledger.currency:
                    amount -= self.config.capital_of(strategy)
                out[currency] = out.get(currency, ZERO) + amount
        return out


def _crossed(stop: RiskStop | None, drawdown: Decimal | None, pct: Decimal | None,
             daily: Decimal | None, currency: str) -> tuple[str, str] | None:
    if stop is None:
        return None
    if stop.max_drawdown is not None and drawdown is not None and drawdown > stop.max_drawdown:
        return "max_drawdown", (f"drawdown {plain(drawdown)} {currency} > limit "
                                f"{plain(stop.max_drawdown)}")
    if stop.max_drawdown_pct is not None and pct is not None and pct > stop.max_drawdown_pct:
        return "max_drawdown", (f"drawdown {plain(pct * 100)}% > limit "
                                f"{plain(stop.max_drawdown_pct * 100)}%")
    if stop.max_daily_loss is not None and daily is not None and -daily > stop.max_daily_loss:
        return "max_daily_loss", (f"daily loss {plain(-daily)} {currency} > limit "
                                  f"{plain(stop.max_daily_loss)}")
    return None


def _text(value: Decimal | None) -> str | None:
    return None if value is None else plain(value)


def _number(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)
