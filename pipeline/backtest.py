"""The backtest engine: records in event-time order in, a strategy driven, a simulated
broker filling its orders. Pure logic: no Kafka, no files (``pipeline/replay_source.py``
reads topics, ``pipeline/report.py`` computes the numbers and writes them).

**Events.** An event is the tuple ``(key_us, topic, partition, offset, kind, record)``;
``kind`` is one of :data:`BAR`, :data:`BOOK`, :data:`TRADE`, :data:`L2` and ``record``
the decoded dict. Its event time (µs) is when the record became known:

* ``Bar``: ``end_ms`` (a bar is known when it closes);
* ``BookSnapshot`` and ``L2Update``: ``received_ts_us``;
* ``Trade``: ``exchange_ts_ms``.

:class:`EventMerger` merges partitions and topics into one deterministic order: by
``(key_us, topic, partition, offset)``, where ``key_us`` is the running maximum of the
event times seen in the record's partition. A record whose event time goes backwards
(late data) keeps its place in its partition, it is not moved before records already
read; so the order is a merge of the partitions, the same however the records were
batched on the way.

**Bars and the next-open fill model** (:class:`NextOpenBroker`) follow backtesting.py
(0.6.x, its defaults plus ``finalize_trades=True``) exactly:

* a market order placed on a bar fills at the open of that symbol's next bar; a limit
  order fills on a later bar whose range reaches it, at the open or the limit;
* ``commission`` is charged on entry and again on exit (relative to the fill value);
  ``slippage`` is backtesting.py's ``spread``: the entry price is worsened by it, exits
  are at the unadjusted price;
* an intent with ``fraction`` is sized when it fills: whole ``lot``s (default 1 unit, as
  backtesting.py) of ``fraction`` of the available margin (equity minus the value of open
  trades) over the price plus commission;
* orders of one bar are processed in sequence; ``OrderIntent.close`` orders go to the
  front of the queue (one per open trade, as ``position.close()``), so a close followed by
  a new order is sized from the equity after the close;
* an order opposite to open trades closes (or reduces) them first, oldest first (FIFO),
  and only the remainder opens a trade;
* at the end the open trades are closed (``finalize_trades=True``) by a last pass over the
  last bar, so they exit at the **last bar's open**: that is what backtesting.py 0.6.6
  does (it re-runs its broker on the last bar), not the last close.

One deliberate difference: when an order is sized, open trades are valued at the fill
price (the bar's open), where backtesting.py values them at the same bar's close, which
it cannot know yet at the open. The two agree whenever the position is flat when the
order is sized, as in close-then-reverse strategies.

**Books and the book fill model** (:class:`BookBroker`): ``L2Update`` records are applied
to an :class:`~pipeline.orderbook.L2Book` per symbol with the orderbook group's rules (a
snapshot resets the book, changes before the first snapshot are ignored, a crossed book is
dropped until the next snapshot), and every change of the top of book calls ``on_book``
with a ``BookSnapshot``-shaped dict of ``book_depth`` levels (the live group also
publishes one every second while deeper levels change; a replay has no wall clock and
does not). A buy limit fills when the best ask is at or below its limit, at the ask levels
up to the limit, each at its own price, for at most the quantity shown; a sell mirrors
it. Queue position is ignored (a resting order fills as soon as the book reaches its
price), our fills do not remove liquidity from the replayed book (only within one
matching pass are levels shared between orders), orders reach the book with zero latency
(an intent is matched against the very book that triggered it), and market orders walk
the book. ``maker-or-cancel`` orders that would take liquidity are cancelled,
``immediate-or-cancel`` ones keep no remainder, ``fill-or-kill`` ones fill whole or not
at all; other limit orders rest until filled (good till cancelled: strategies cannot
cancel yet). Fills are fed back through ``on_order_event``.

Money is exact: cash, prices, sizes and P&L are ``Decimal`` (28 significant digits), so
the same inputs give the same trades, byte for byte.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Context, Decimal, localcontext
from typing import Any, Callable, Iterable, Sequence

from pipeline.errors import PipelineError
from pipeline.orderbook import L2Book, price_key
from pipeline.strategy import OrderIntent, Strategy

BAR, BOOK, TRADE, L2 = "bar", "book", "trade", "l2"
KINDS = (BAR, BOOK, TRADE, L2)
#: What each record type replays as.
KIND_OF_SCHEMA = {"Bar": BAR, "BookSnapshot": BOOK, "Trade": TRADE, "L2Update": L2}
NEXT_OPEN, BOOK_FILLS = "next-open", "book"
FILL_MODELS = (NEXT_OPEN, BOOK_FILLS)

Event = tuple  # (key_us, topic, partition, offset, kind, record)
ZERO = Decimal(0)
ONE = Decimal(1)


class StrategyFailed(PipelineError):
    """A strategy callback raised: names the strategy, the callback and the input record."""


class _OutOfMoney(Exception):
    """Equity fell to zero or below: backtesting.py stops the run there; so do we."""


def event_time_us(kind: str, record: dict) -> int:
    """When a record became known, in µs since the epoch (see the module doc)."""
    if kind == BAR:
        return record["end_ms"] * 1000
    if kind == TRADE:
        return record["exchange_ts_ms"] * 1000
    return record["received_ts_us"]


# --------------------------------------------------------------------------- merging


class EventMerger:
    """Merges the records of several (topic, partition) sources into event-time order.

    Add each source's records in offset order (:meth:`add`), say when a source has no
    more (:meth:`finish`), and take what is ready (:meth:`ready`): the events that no
    record still to come can precede. Every source must have delivered a record, or be
    finished, before anything is ready: an empty partition is finished up front.
    """

    def __init__(self, sources: Iterable[tuple[str, int]]) -> None:
        self._buffers: dict[tuple[str, int], list[Event]] = {}
        self._last: dict[tuple[str, int], tuple | None] = {}
        self._max_key: dict[tuple[str, int], int] = {}
        self._open: set[tuple[str, int]] = set()
        for source in sources:
            self._buffers[source] = []
            self._last[source] = None
            self._open.add(source)

    def add(self, topic: str, partition: int, offset: int, kind: str, record: dict) -> None:
        source = (topic, partition)
        key = event_time_us(kind, record)
        previous = self._max_key.get(source)
        if previous is not None and key < previous:
            key = previous  # late in its partition: keeps its partition position
        self._max_key[source] = key
        event = (key, topic, partition, offset, kind, record)
        self._buffers[source].append(event)
        self._last[source] = (key, topic, partition, offset + 1)

    def extend(self, topic: str, partition: int, events: list[Event]) -> None:
        """Add events built by the caller, already keyed with :meth:`key_events`."""
        if events:
            self._buffers[(topic, partition)].extend(events)
            last = events[-1]
            self._max_key[(topic, partition)] = last[0]
            self._last[(topic, partition)] = (last[0], topic, partition, last[3] + 1)

    def running_max(self, topic: str, partition: int) -> int | None:
        return self._max_key.get((topic, partition))

    def finish(self, topic: str, partition: int) -> None:
        self._open.discard((topic, partition))

    @property
    def done(self) -> bool:
        return not self._open and not any(self._buffers.values())

    def buffered(self, topic: str, partition: int) -> int:
        return len(self._buffers[(topic, partition)])

    def waiting_for(self) -> list[tuple[str, int]]:
        """Open sources that have delivered nothing yet (they hold everything back)."""
        return [s for s in self._open if self._last[s] is None]

    def ready(self) -> list[Event]:
        """The events that can be processed now, in order."""
        if self._open:
            bounds = [self._last[s] for s in self._open]
            if any(b is None for b in bounds):
                return []
            bound = min(bounds)  # type: ignore[type-var]
        else:
            bound = None
        runs = []
        for source, buffer in self._buffers.items():
            if not buffer:
                continue
            if bound is None:
                cut = len(buffer)
            elif buffer[-1] < bound:
                cut = len(buffer)
            else:
                cut = bisect_left(buffer, bound)
            if cut:
                runs.append(buffer[:cut])
                del buffer[:cut]
        if not runs:
            return []
        if len(runs) == 1:
            return runs[0]
        return list(heapq.merge(*runs))


# --------------------------------------------------------------------------- trades


@dataclass(slots=True, eq=False)  # identity: two lots alike are still two trades
class Lot:
    """An open trade (backtesting.py's ``Trade``): a signed size at one entry price."""

    symbol: str
    size: Decimal
    entry_price: Decimal
    entry_ms: int
    entry_index: int  # index of the equity point it entered in
    entry_bar: int  # index of the symbol's bar it entered on (-1 in book mode)


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


class Ledger:
    """Cash, open lots per symbol (FIFO) and closed trades; commission on every fill."""

    def __init__(self, cash: Decimal, commission: Decimal) -> None:
        self.cash = cash
        self.rate = commission
        self.lots: dict[str, list[Lot]] = {}
        self.position: dict[str, Decimal] = {}  # symbol -> sum of lot sizes
        self.cost: dict[str, Decimal] = {}  # symbol -> sum of size * entry price
        self.gross: dict[str, Decimal] = {}  # symbol -> sum of |size|
        self.closed: list[ClosedTrade] = []

    def open(self, symbol: str, size: Decimal, price: Decimal, when_ms: int, index: int,
             bar: int) -> Decimal:
        fee = abs(size) * price * self.rate
        self.cash -= fee
        self.lots.setdefault(symbol, []).append(Lot(symbol, size, price, when_ms, index, bar))
        self.position[symbol] = self.position.get(symbol, ZERO) + size
        self.cost[symbol] = self.cost.get(symbol, ZERO) + size * price
        self.gross[symbol] = self.gross.get(symbol, ZERO) + abs(size)
        return fee

    def close(self, lot: Lot, size: Decimal, price: Decimal, when_ms: int, index: int,
              bar: int) -> Decimal:
        """Close ``size`` (same sign as the lot, at most all of it) of ``lot`` at ``price``."""
        entry = lot.entry_price
        exit_fee = abs(size) * price * self.rate
        gross = size * (price - entry)
        self.cash += gross - exit_fee
        entry_fee = abs(size) * entry * self.rate
        commission = entry_fee + exit_fee
        sign = ONE if size > 0 else -ONE
        return_pct = sign * (price / entry - ONE) - commission / (abs(size) * entry)
        self.closed.append(ClosedTrade(lot.symbol, size, entry, price, lot.entry_ms, when_ms,
                                       lot.entry_index, index, lot.entry_bar, bar,
                                       gross - commission, return_pct, commission))
        lot.size -= size
        if not lot.size:
            self.lots[lot.symbol].remove(lot)
        self.position[lot.symbol] -= size
        self.cost[lot.symbol] -= size * entry
        self.gross[lot.symbol] -= abs(size)
        return exit_fee

    def fill(self, symbol: str, size: Decimal, price: Decimal, when_ms: int, index: int,
             bar: int, entry_price: Decimal | None = None) -> Decimal:
        """A signed fill: close opposite lots oldest first at ``price``, open the rest at
        ``entry_price`` (default ``price``). Returns the commission charged now."""
        fee = ZERO
        need = size
        for lot in list(self.lots.get(symbol, ())):
            if (lot.size > 0) == (need > 0):
                continue
            if abs(need) >= abs(lot.size):
                part = lot.size
            else:
                part = -need
            fee += self.close(lot, part, price, when_ms, index, bar)
            need += part
            if not need:
                break
        if need:
            fee += self.open(symbol, need, entry_price if entry_price is not None else price,
                             when_ms, index, bar)
        return fee

    def unrealized(self, marks: dict[str, Decimal]) -> Decimal:
        total = ZERO
        for symbol, position in self.position.items():
            if position or self.cost[symbol]:
                total += position * marks[symbol] - self.cost[symbol]
        return total

    def margin(self, marks: dict[str, Decimal], symbol: str, mark: Decimal) -> Decimal:
        """Equity minus the value of open trades (backtesting.py's ``margin_available``),
        ``symbol`` marked at ``mark`` and the others at ``marks``; never below zero."""
        total = self.cash
        for s, position in self.position.items():
            gross = self.gross[s]
            if position or gross:
                m = mark if s == symbol else marks[s]
                total += position * m - self.cost[s] - gross * m
        return total if total > 0 else ZERO


# --------------------------------------------------------------------------- orders


class _Order:
    __slots__ = ("id", "symbol", "buy", "size", "fraction", "limit", "options", "lot",
                 "filled", "notional", "fee", "amount_text", "created_ms", "seq")

    def __init__(self, id: str, symbol: str, buy: bool, size: Decimal | None,
                 fraction: Decimal | None, limit: Decimal | None, options: tuple[str, ...],
                 lot: Lot | None, created_ms: int, seq: int) -> None:
        self.id, self.symbol, self.buy, self.size = id, symbol, buy, size
        self.fraction, self.limit, self.options, self.lot = fraction, limit, options, lot
        self.filled, self.notional, self.fee = ZERO, ZERO, ZERO
        self.amount_text = str(abs(size)) if size is not None else None
        self.created_ms, self.seq = created_ms, seq


@dataclass
class OrderCounts:
    submitted: int = 0
    filled: int = 0
    partially_filled: int = 0
    cancelled: int = 0
    rejected: int = 0
    open: int = 0


class Broker:
    """What the engine needs from a fill model. Both share a :class:`Ledger`."""

    def __init__(self, cash: Decimal, commission: Decimal, strategy_id: str,
                 lot: Decimal = ONE) -> None:
        if cash <= 0:
            raise PipelineError(f"cash must be positive, not {cash}")
        if not -Decimal("0.1") <= commission < Decimal("0.1"):
            raise PipelineError(f"commission is a fraction of the fill value in [-0.1, 0.1), "
                                f"not {commission} (0.002 is 0.2%)")
        if lot <= 0:
            raise PipelineError(f"lot must be positive, not {lot}")
        self.ledger = Ledger(cash, commission)
        self.initial_cash = cash
        self.strategy_id = strategy_id
        self.lot = lot
        self.counts = OrderCounts()
        self.marks: dict[str, Decimal] = {}
        self.labels: list[int] = []  # equity points: time label (ms)
        self.values: list[Decimal] = []  # equity points: value
        self.primary: str | None = None  # symbol buy & hold is measured on
        self.primary_marks: list[Decimal | None] = []  # its mark at each equity point
        self._seq = 0
        self.stopped: str | None = None  # why the broker stopped the run early
        self.feedback = True  # build OrderEvents (the engine turns it off when unused)

    # -- equity

    def equity(self) -> Decimal:
        return self.ledger.cash + self.ledger.unrealized(self.marks)

    def _record(self, label_ms: int) -> None:
        """Equity point ``label_ms`` (written again when it is the last one's label)."""
        value = self.equity()
        mark = self.marks.get(self.primary) if self.primary is not None else None
        if self.labels and self.labels[-1] == label_ms:
            self.values[-1] = value
            self.primary_marks[-1] = mark
            return
        self.labels.append(label_ms)
        self.values.append(value)
        self.primary_marks.append(mark)

    # -- orders

    def _new_order(self, intent: OrderIntent, created_ms: int, lot: Lot | None = None) -> _Order:
        self._seq += 1
        self.counts.submitted += 1
        if self.primary is None:
            self.primary = intent.symbol
        if lot is not None:
            return _Order(f"{self.strategy_id}-{self._seq}", intent.symbol, lot.size < 0,
                          -lot.size, None, None, (), lot, created_ms, self._seq)
        size = None
        if intent.amount is not None:
            size = Decimal(intent.amount) if intent.side == "BUY" else -Decimal(intent.amount)
        return _Order(f"{self.strategy_id}-{self._seq}", intent.symbol, intent.side == "BUY",
                      size, Decimal(intent.fraction) if intent.fraction is not None else None,
                      Decimal(intent.price) if intent.price is not None else None,
                      intent.options, None, created_ms, self._seq)

    def _event(self, order: _Order, kind: str, when_ms: int,
               reason: str | None = None) -> dict | None:
        """Count an order's step; the ``OrderEvent`` dict for the strategy (None when the
        strategy does not listen)."""
        if kind == "FILLED":
            self.counts.filled += 1
        elif kind == "PARTIALLY_FILLED":
            self.counts.partially_filled += 1
        elif kind == "CANCELLED":
            self.counts.cancelled += 1
        elif kind == "REJECTED":
            self.counts.rejected += 1
        if not self.feedback:
            return None
        amount = order.amount_text if order.amount_text is not None else str(order.filled)
        return {"client_order_id": order.id, "strategy_id": self.strategy_id,
                "symbol": order.symbol, "kind": kind, "reason": reason, "mode": "PAPER",
                "exchange_order_id": None, "side": "buy" if order.buy else "sell",
                "price": str(order.limit) if order.limit is not None else None,
                "amount": amount, "filled_amount": str(order.filled),
                "avg_fill_price": str(order.notional / order.filled) if order.filled else None,
                "fee": str(order.fee), "fee_currency": None, "event_ms": when_ms}

    def _size_from_fraction(self, order: _Order, price: Decimal, margin: Decimal) -> Decimal:
        """Whole lots of ``fraction`` of ``margin`` at ``price`` plus commission."""
        per_unit = price + price * abs(self.ledger.rate)
        units = (margin * order.fraction / per_unit / self.lot).to_integral_value(ROUND_FLOOR)
        return units * self.lot

    # -- the engine's calls (overridden)

    def submit(self, intents: Sequence[OrderIntent], event: Event) -> list[dict]:
        raise NotImplementedError

    def on_bar(self, bar: dict) -> list[dict] | None:
        return None

    def on_book(self, symbol: str, book: L2Book, when_us: int) -> list[dict] | None:
        return None

    def tick(self, when_us: int) -> None:
        """Time moved on to ``when_us`` (book mode samples equity by time)."""

    def on_trade(self, trade: dict) -> None:
        """A replayed trade (book mode marks a symbol without a book at its last trade)."""

    def finish(self, last_event_us: int | None) -> list[dict]:
        return []

    @property
    def pending(self) -> int:
        return 0


def _add(events: list[dict], event: dict | None) -> None:
    if event is not None:
        events.append(event)


def _one(event: dict | None) -> list[dict]:
    return [event] if event is not None else []


def _when_ms(event: Event) -> int:
    return event[0] // 1000


class NextOpenBroker(Broker):
    """backtesting.py's broker over bars (see the module doc for the exact semantics)."""

    def __init__(self, cash: Decimal, commission: Decimal, strategy_id: str,
                 lot: Decimal = ONE, slippage: Decimal = ZERO, interval: str | None = None,
                 finalize_trades: bool = True) -> None:
        super().__init__(cash, commission, strategy_id, lot)
        if not ZERO <= slippage < ONE:
            raise PipelineError(f"slippage is a fraction of the price in [0, 1), not {slippage}")
        self.slippage = slippage
        self.interval = interval
        self.finalize_trades = finalize_trades
        self.orders: dict[str, list[_Order]] = {}
        self.bars: dict[str, dict] = {}  # symbol -> last bar
        self.bar_index: dict[str, int] = {}
        self.intervals: dict[str, str] = {}

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self.orders.values())

    def submit(self, intents: Sequence[OrderIntent], event: Event) -> list[dict]:
        when = _when_ms(event)
        for intent in intents:
            queue = self.orders.setdefault(intent.symbol, [])
            if intent.close_position:
                for lot in self.ledger.lots.get(intent.symbol, ()):  # as position.close()
                    queue.insert(0, self._new_order(intent, when, lot))
                continue
            if intent.options:
                raise PipelineError(f"the next-open fill model cannot honour order options "
                                    f"{list(intent.options)} (intent {intent}): use the book "
                                    "fill model")
            queue.append(self._new_order(intent, when))
        return []

    def on_bar(self, bar: dict) -> list[dict] | None:
        symbol = bar["symbol"]
        interval = bar["interval"]
        if self.intervals.get(symbol) != interval:
            if self.interval is not None and interval != self.interval:
                return None
            self._first_bar(symbol, interval)
        self.bar_index[symbol] += 1
        self.bars[symbol] = bar
        events = None
        if self.orders.get(symbol):
            events = self._process(symbol, bar, len(self.values))
        mark = self.marks[symbol] = Decimal(bar["close"])
        # Equity point (the bar's start labels it, as backtesting.py's data index).
        ledger = self.ledger
        if len(ledger.position) == 1 and symbol in ledger.position:
            value = ledger.cash + ledger.position[symbol] * mark - ledger.cost[symbol]
        else:
            value = ledger.cash + ledger.unrealized(self.marks)
        label, labels = bar["start_ms"], self.labels
        primary_mark = mark if symbol == self.primary else self.marks.get(self.primary)
        if labels and labels[-1] == label:
            self.values[-1] = value
            self.primary_marks[-1] = primary_mark
        else:
            labels.append(label)
            self.values.append(value)
            self.primary_marks.append(primary_mark)
        if value <= 0:
            self._out_of_money(symbol, bar)
        return events

    def _first_bar(self, symbol: str, interval: str) -> None:
        known = self.intervals.get(symbol)
        if known is not None:
            raise PipelineError(f"bars of {symbol} come in two intervals ({known} and "
                                f"{interval}): the next-open fill model needs one; choose it "
                                "with interval=...")
        self.intervals[symbol] = interval
        self.bar_index[symbol] = -1
        if self.primary is None:
            self.primary = symbol

    def _out_of_money(self, symbol: str, bar: dict) -> None:
        index = len(self.values) - 1
        for s, lots in self.ledger.lots.items():
            for lot in list(lots):
                self.ledger.close(lot, lot.size, self.marks[s], bar["start_ms"], index,
                                  self.bar_index.get(s, -1))
        self.ledger.cash = ZERO
        self.values[-1] = ZERO
        self.stopped = f"out of money at {bar['symbol']} bar {bar['start_ms']}"
        raise _OutOfMoney()

    def _process(self, symbol: str, bar: dict, index: int) -> list[dict]:
        """backtesting.py's ``_Broker._process_orders`` for one symbol's bar; fills are
        labelled with the bar's start and equity point ``index``."""
        queue = self.orders[symbol]
        open_ = Decimal(bar["open"])
        high = low = None
        when_ms, bar_no = bar["start_ms"], self.bar_index[symbol]
        ledger = self.ledger
        events = []
        for order in list(queue):
            if order not in queue:
                continue
            if order.lot is not None:  # a close order (position.close / finalize)
                lot = order.lot
                if lot in ledger.lots.get(symbol, ()):
                    fee = ledger.close(lot, lot.size, open_, when_ms, index, bar_no)
                    order.filled, order.notional, order.fee = abs(order.size), \
                        abs(order.size) * open_, fee
                    _add(events, self._event(order, "FILLED", when_ms))
                queue.remove(order)
                continue
            if order.limit is not None:
                if high is None:
                    high, low = Decimal(bar["high"]), Decimal(bar["low"])
                if order.buy:
                    if not low <= order.limit:
                        continue
                    price = min(open_, order.limit)
                else:
                    if not high >= order.limit:
                        continue
                    price = max(open_, order.limit)
            else:
                price = open_
            adjusted = price * (ONE + self.slippage) if order.buy else price * (ONE - self.slippage)
            per_unit = adjusted + price * self.ledger.rate
            size = order.size
            if size is None:
                margin = ledger.margin(self.marks, symbol, open_)
                units = (margin * order.fraction / per_unit / self.lot).to_integral_value(ROUND_FLOOR)
                size = units * self.lot if order.buy else -units * self.lot
                if not size:
                    queue.remove(order)
                    _add(events, self._event(order, "REJECTED", when_ms,
                                              "insufficient margin for one lot"))
                    continue
            need = size
            fee = ZERO
            notional = ZERO
            for lot in list(ledger.lots.get(symbol, ())):  # FIFO against opposite trades
                if (lot.size > 0) == (need > 0):
                    continue
                part = lot.size if abs(need) >= abs(lot.size) else -need
                fee += ledger.close(lot, part, price, when_ms, index, bar_no)
                notional += abs(part) * price
                need += part
                if not need:
                    break
            if abs(need) * per_unit > ledger.margin(self.marks, symbol, open_):
                queue.remove(order)
                order.filled, order.notional, order.fee = abs(size - need), notional, fee
                _add(events, self._event(order, "REJECTED" if not order.filled else
                                          "CANCELLED", when_ms, "insufficient margin"))
                continue
            if need:
                fee += ledger.open(symbol, need, adjusted, when_ms, index, bar_no)
                notional += abs(need) * adjusted
            order.filled, order.notional, order.fee = abs(size), notional, fee
            if order.amount_text is None:
                order.amount_text = str(abs(size))
            _add(events, self._event(order, "FILLED", when_ms))
            queue.remove(order)
        return events

    def finish(self, last_event_us: int | None) -> list[dict]:
        """``finalize_trades=True``: close what is open with one more pass over each
        symbol's last bar (so at its open), as backtesting.py does."""
        if not self.finalize_trades or not self.labels:
            return []
        events = []
        for symbol in sorted(self.bars):
            lots = self.ledger.lots.get(symbol, [])
            queue = self.orders.setdefault(symbol, [])
            for lot in reversed(lots):
                queue.insert(0, self._new_order(OrderIntent.close(symbol), self.labels[-1], lot))
            if queue:
                events += self._process(symbol, self.bars[symbol], len(self.values) - 1)
        self._record(self.labels[-1])  # the last point is written again, as backtesting.py
        return events


class BookBroker(Broker):
    """Fills against replayed books (see the module doc for the rules)."""

    def __init__(self, cash: Decimal, commission: Decimal, strategy_id: str,
                 lot: Decimal = ONE, sample_ms: int = 1000, finalize_trades: bool = True) -> None:
        super().__init__(cash, commission, strategy_id, lot)
        if sample_ms <= 0:
            raise PipelineError(f"sample_ms must be positive, not {sample_ms}")
        self.sample_ms = sample_ms
        self.finalize_trades = finalize_trades
        self.books: dict[str, L2Book] = {}
        self.bids: dict[str, list] = {}  # symbol -> heap of (-limit, seq, order)
        self.asks: dict[str, list] = {}  # symbol -> heap of (limit, seq, order)
        self.waiting: dict[str, list[_Order]] = {}  # market orders before any book
        self._cell: int | None = None
        self.next_tick_us = -1  # the engine calls tick() once time reaches this

    @property
    def pending(self) -> int:
        return sum(len(h) for h in self.bids.values()) + sum(len(h) for h in self.asks.values()) \
            + sum(len(q) for q in self.waiting.values())

    # -- time and equity

    def tick(self, when_us: int) -> None:
        cell = when_us // 1000 // self.sample_ms
        if self._cell is not None and cell != self._cell:
            self._record(self._cell * self.sample_ms)
        self._cell = cell
        self.next_tick_us = (cell + 1) * self.sample_ms * 1000

    def on_trade(self, trade: dict) -> None:
        if trade["symbol"] not in self.books:
            self.marks[trade["symbol"]] = Decimal(trade["price"])

    def equity(self) -> Decimal:
        """Marked at the books' mids (computed now, not on every change of a book)."""
        ledger = self.ledger
        for symbol, book in self.books.items():
            if ledger.position.get(symbol) or ledger.gross.get(symbol) or symbol == self.primary:
                bid, ask = book.best_bid(), book.best_ask()
                if bid is not None and ask is not None:
                    self.marks[symbol] = (price_key(bid[0])[1] + price_key(ask[0])[1]) / 2
        return super().equity()

    @property
    def _index(self) -> int:
        return len(self.values)

    # -- orders

    def submit(self, intents: Sequence[OrderIntent], event: Event) -> list[dict]:
        when = _when_ms(event)
        events: list[dict] = []
        for intent in intents:
            if intent.close_position:
                position = self.ledger.position.get(intent.symbol, ZERO)
                if not position:
                    continue
                order = self._new_order(OrderIntent(intent.symbol,
                                                    "SELL" if position > 0 else "BUY",
                                                    str(abs(position))), when)
            else:
                order = self._new_order(intent, when)
            if "auction-only" in order.options or "indication-of-interest" in order.options:
                _add(events, self._event(order, "REJECTED", when,
                                          "auction-only and indication-of-interest orders are "
                                          "not simulated"))
                continue
            book = self.books.get(order.symbol)
            if order.size is None:
                reference = order.limit
                if reference is None and book is not None:
                    top = book.best_ask() if order.buy else book.best_bid()
                    reference = price_key(top[0])[1] if top else None
                if reference is None:
                    _add(events, self._event(order, "REJECTED", when,
                                              "no price yet to size a fraction of equity"))
                    continue
                units = self._size_from_fraction(order, reference, max(ZERO, self.equity()))
                if not units:
                    _add(events, self._event(order, "REJECTED", when,
                                              "insufficient equity for one lot"))
                    continue
                order.size = units if order.buy else -units
                order.amount_text = str(units)
            if book is None or not book.has_snapshot:
                if order.limit is None:
                    self.waiting.setdefault(order.symbol, []).append(order)
                else:
                    self._rest(order)
                continue
            events += self._place(order, book, when, {})
        return events

    def _place(self, order: _Order, book: L2Book, when: int, consumed: dict) -> list[dict]:
        options = order.options
        if order.limit is not None and "maker-or-cancel" in options:
            if self._crosses(order, book):
                return _one(self._event(order, "CANCELLED", when,
                                        "maker-or-cancel: would have taken liquidity"))
            self._rest(order)
            return _one(self._event(order, "ACCEPTED", when))
        if "fill-or-kill" in options and self._available(order, book) < abs(order.size):
            return _one(self._event(order, "CANCELLED", when,
                                    "fill-or-kill: not enough at the limit"))
        events = self._match(order, book, when, consumed)
        remaining = abs(order.size) - order.filled
        if remaining:
            if order.limit is None or "immediate-or-cancel" in options:
                _add(events, self._event(order, "CANCELLED", when,
                                          "market order: book exhausted" if order.limit is None
                                          else "immediate-or-cancel: remainder cancelled"))
            else:
                self._rest(order)
                if not order.filled:
                    _add(events, self._event(order, "ACCEPTED", when))
        return events

    def _rest(self, order: _Order) -> None:
        if order.buy:
            heapq.heappush(self.bids.setdefault(order.symbol, []), (-order.limit, order.seq, order))
        else:
            heapq.heappush(self.asks.setdefault(order.symbol, []), (order.limit, order.seq, order))

    @staticmethod
    def _crosses(order: _Order, book: L2Book) -> bool:
        top = book.best_ask() if order.buy else book.best_bid()
        if top is None:
            return False
        price = price_key(top[0])[1]
        return price <= order.limit if order.buy else price >= order.limit

    @staticmethod
    def _levels(book: L2Book, buy: bool):
        """The opposite side's levels, best first: the top at once, the rest sorted only
        when an order walks past it."""
        top = book.best_ask() if buy else book.best_bid()
        if top is None:
            return
        yield top
        bids, asks = book.depth()
        for level in (asks if buy else bids)[1:]:
            yield level

    def _available(self, order: _Order, book: L2Book) -> Decimal:
        total = ZERO
        for price, quantity in self._levels(book, order.buy):
            value = price_key(price)[1]
            if order.limit is not None and (value > order.limit if order.buy else value < order.limit):
                break
            total += Decimal(quantity)
            if total >= abs(order.size):
                break
        return total

    def _match(self, order: _Order, book: L2Book, when: int, consumed: dict) -> list[dict]:
        """Fill what the book offers up to the limit; the order's ``filled`` tells how much."""
        remaining = abs(order.size) - order.filled
        fills = []
        for price, quantity in self._levels(book, order.buy):
            value = price_key(price)[1]
            if order.limit is not None and (value > order.limit if order.buy else value < order.limit):
                break
            available = Decimal(quantity) - consumed.get(price, ZERO)
            if available <= 0:
                continue
            take = min(available, remaining)
            consumed[price] = consumed.get(price, ZERO) + take
            fills.append((value, take))
            remaining -= take
            if not remaining:
                break
        if not fills:
            return []
        ledger, index = self.ledger, self._index
        for value, take in fills:
            order.fee += ledger.fill(order.symbol, take if order.buy else -take, value, when,
                                     index, -1)
            order.filled += take
            order.notional += take * value
        kind = "FILLED" if order.filled == abs(order.size) else "PARTIALLY_FILLED"
        return _one(self._event(order, kind, when)) if fills else []

    def on_book(self, symbol: str, book: L2Book, when_us: int) -> list[dict] | None:
        """The top of ``symbol``'s book changed: fill what now crosses."""
        if not self.bids and not self.asks and not self.waiting and self.primary is not None:
            self.books[symbol] = book  # nothing resting anywhere: the common case
            return None
        self.books[symbol] = book
        if self.primary is None:
            self.primary = symbol
        events = None
        when = when_us // 1000
        waiting = self.waiting.pop(symbol, None)
        if waiting:
            events = []
            for order in waiting:
                events += self._place(order, book, when, {})
        bids, asks = self.bids.get(symbol), self.asks.get(symbol)
        if not bids and not asks:
            return events
        consumed: dict = {}
        best_ask, best_bid = book.best_ask(), book.best_bid()
        if bids and best_ask is not None:
            ask = price_key(best_ask[0])[1]
            events = self._fill_resting(bids, lambda key: -key >= ask, book, when, consumed,
                                        events)
        if asks and best_bid is not None:
            bid = price_key(best_bid[0])[1]
            events = self._fill_resting(asks, lambda key: key <= bid, book, when, consumed,
                                        events)
        return events

    def _fill_resting(self, resting: list, crossed: Callable[[Decimal], bool], book: L2Book,
                      when: int, consumed: dict, events: list[dict] | None
                      ) -> list[dict] | None:
        """Fill one side's resting orders, best first, while the book crosses them; stop at
        the first that the book cannot fill (whole)."""
        while resting and crossed(resting[0][0]):
            order = resting[0][2]
            before = order.filled
            found = self._match(order, book, when, consumed)
            if order.filled == before:
                break
            events = (events or []) + found
            if order.filled != abs(order.size):
                break
            heapq.heappop(resting)
        return events

    def finish(self, last_event_us: int | None) -> list[dict]:
        """Close open positions at market against the last books (or at the last mark),
        then record the last equity point."""
        if last_event_us is None:
            return []
        when = last_event_us // 1000
        events: list[dict] = []
        self.equity()  # marks the books' mids, for positions left without a book
        if self.finalize_trades:
            for symbol in sorted(self.ledger.position):
                position = self.ledger.position[symbol]
                if not position:
                    continue
                order = self._new_order(OrderIntent(symbol, "SELL" if position > 0 else "BUY",
                                                    str(abs(position))), when)
                book = self.books.get(symbol)
                if book is not None and book.has_snapshot:
                    events += self._match(order, book, when, {})
                remaining = abs(order.size) - order.filled
                if remaining and symbol in self.marks:  # no book left: at the last mark
                    self.ledger.fill(symbol, remaining if order.buy else -remaining,
                                     self.marks[symbol], when, self._index, -1)
        cell = self._cell if self._cell is not None else when // self.sample_ms
        self._record(cell * self.sample_ms)
        return events


# --------------------------------------------------------------------------- the engine


@dataclass
class EngineResult:
    """What a run produced, exact; :mod:`pipeline.report` turns it into numbers and files."""

    strategy: Strategy
    fill: str
    trades: list[ClosedTrade]
    open_lots: list[Lot]
    equity_labels_ms: list[int]
    equity: list[Decimal]
    primary: str | None
    primary_marks: list[Decimal]
    initial_cash: Decimal
    final_cash: Decimal
    final_equity: Decimal
    events: int
    by_kind: dict[str, int]
    first_event_us: int | None
    last_event_us: int | None
    orders: OrderCounts
    pending_orders: int
    books_dropped: int = 0
    changes_applied: int = 0
    snapshots_emitted: int = 0
    interrupted: bool = False
    stopped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_CALLBACKS = {BAR: "on_bar", BOOK: "on_book", TRADE: "on_trade", L2: "on_book"}


class _Depth:
    """The prices of one book's levels kept sorted, best first, beside its
    :class:`L2Book` (which keeps only the best of each side), so a depth-N snapshot costs N
    lookups instead of a sort of every level."""

    __slots__ = ("bids", "asks", "bid_set", "ask_set")

    def __init__(self) -> None:
        self.bids: list[tuple[Decimal, str]] = []  # (-value, price), ascending = best first
        self.asks: list[tuple[Decimal, str]] = []  # (value, price)
        self.bid_set: set[str] = set()
        self.ask_set: set[str] = set()

    def rebuild(self, book: L2Book) -> None:
        self.bids = sorted((-price_key(p)[1], p) for p in book.bids)
        self.asks = sorted((price_key(p)[1], p) for p in book.asks)
        self.bid_set, self.ask_set = set(book.bids), set(book.asks)

    def update(self, book: L2Book, changes: list[dict]) -> None:
        """Follow ``changes`` that were just applied to ``book``."""
        for change in changes:
            canonical, value = price_key(change["price"])
            if change["side"] == "BID":
                levels, keys, known, key = book.bids, self.bids, self.bid_set, (-value, canonical)
            else:
                levels, keys, known, key = book.asks, self.asks, self.ask_set, (value, canonical)
            if canonical in levels:
                if canonical not in known:
                    known.add(canonical)
                    insort(keys, key)
            elif canonical in known:
                known.discard(canonical)
                del keys[bisect_left(keys, key)]

    def top(self, book: L2Book, n: int) -> tuple[list[dict], list[dict]]:
        bids, asks = book.bids, book.asks
        return ([{"price": p, "quantity": bids[p]} for _, p in self.bids[:n]],
                [{"price": p, "quantity": asks[p]} for _, p in self.asks[:n]])


class Engine:
    """Drives one strategy over events with one broker. Feed batches with :meth:`run`
    (any number of times), then call :meth:`finish`."""

    def __init__(self, strategy: Strategy, broker: Broker, book_depth: int = 10,
                 strategy_name: str | None = None) -> None:
        if book_depth < 1:
            raise PipelineError(f"book_depth must be at least 1, not {book_depth}")
        self.strategy, self.broker, self.book_depth = strategy, broker, book_depth
        self.name = strategy_name or f"{type(strategy).__module__}:{type(strategy).__qualname__}"
        self.fill = NEXT_OPEN if isinstance(broker, NextOpenBroker) else BOOK_FILLS
        broker.feedback = type(strategy).on_order_event is not Strategy.on_order_event
        self.books: dict[str, L2Book] = {}
        self._depths: dict[str, _Depth] = {}  # when book_depth > 1
        self._top: dict[str, tuple] = {}
        self._waiting: set[str] = set()
        self.events = 0
        self.by_kind = dict.fromkeys(KINDS, 0)
        self.first_us: int | None = None
        self.last_us: int | None = None
        self.books_dropped = 0
        self.changes = 0
        self.snapshots = 0
        self.stopped: str | None = None
        self._context = Context()  # decimal defaults, whatever the caller's context is

    def run(self, events: Sequence[Event]) -> int:
        """Process a batch of ``events`` (in order); returns how many were processed (fewer
        when the broker stopped the run: out of money)."""
        if self.stopped or not events:
            return 0
        with localcontext(self._context):
            return self._run(events)

    def _run(self, events: Sequence[Event]) -> int:
        strategy, broker = self.strategy, self.broker
        on_bar, on_trade = strategy.on_bar, strategy.on_trade
        broker_bar, submit = broker.on_bar, broker.submit
        book_mode = isinstance(broker, BookBroker)
        if self.first_us is None:
            self.first_us = events[0][0]
        n_bar = n_l2 = n_book = n_trade = 0
        calling = None
        event = None
        try:
            for event in events:
                kind = event[4]
                if book_mode and event[0] >= broker.next_tick_us:  # type: ignore[attr-defined]
                    broker.tick(event[0])
                if kind == BAR:
                    n_bar += 1
                    record = event[5]
                    fills = broker_bar(record)
                    if fills:
                        self._feedback(fills, event)
                    calling = "on_bar"
                    intents = on_bar(record)
                    calling = None
                elif kind == L2:
                    n_l2 += 1
                    intents = self._l2(event[5], event)
                elif kind == BOOK:
                    n_book += 1
                    intents = self._snapshot(event[5], event)
                else:
                    n_trade += 1
                    broker.on_trade(event[5])
                    calling = "on_trade"
                    intents = on_trade(event[5])
                    calling = None
                if intents:
                    self._submit(intents, event, submit)
        except _OutOfMoney:
            self.stopped = broker.stopped
        except PipelineError:
            raise
        except Exception as exc:
            if calling is None:
                raise
            raise self._failure(calling, event, exc) from exc
        finally:
            n = n_bar + n_l2 + n_book + n_trade
            by_kind = self.by_kind
            by_kind[BAR] += n_bar
            by_kind[L2] += n_l2
            by_kind[BOOK] += n_book
            by_kind[TRADE] += n_trade
            self.events += n
            if n:
                self.last_us = events[n - 1][0]
        return n

    def _failure(self, callback: str, event: Event | None, exc: BaseException) -> StrategyFailed:
        where = "" if event is None else \
            (f" on {event[1]}[{event[2]}]@{event[3]} (event time {event[0]} µs, "
             f"{event[4]} {_describe(event[5])})")
        return StrategyFailed(f"strategy {self.name} (id {self.strategy.strategy_id}) raised "
                              f"{type(exc).__name__} in {callback}{where}: {exc}")

    def _submit(self, intents: Iterable[OrderIntent], event: Event, submit) -> None:
        if isinstance(intents, OrderIntent):
            intents = [intents]
        intents = list(intents)
        for intent in intents:
            if not isinstance(intent, OrderIntent):
                raise StrategyFailed(f"strategy {self.name} returned {intent!r}, not an "
                                     f"OrderIntent, on {event[1]}[{event[2]}]@{event[3]}")
        fills = submit(intents, event)
        if fills:
            self._feedback(fills, event)

    def _feedback(self, order_events: list[dict], event: Event) -> None:
        callback = self.strategy.on_order_event
        for order_event in order_events:
            try:
                callback(order_event)
            except Exception as exc:  # noqa: BLE001 - name the strategy and the input
                raise self._failure("on_order_event", event, exc) from exc

    def _call_on_book(self, snapshot: dict, event: Event):
        try:
            return self.strategy.on_book(snapshot)
        except Exception as exc:  # noqa: BLE001 - name the strategy and the input
            raise self._failure("on_book", event, exc) from exc

    def _book(self, symbol: str) -> L2Book:
        book = self.books.get(symbol)
        if book is None:
            book = self.books[symbol] = L2Book(symbol)
        return book

    def _l2(self, update: dict, event: Event):
        symbol = update["symbol"]
        book = self._book(symbol)
        changes = update["changes"]
        depth = self.book_depth
        if update["snapshot"]:
            book.apply_snapshot(changes)
            self._waiting.discard(symbol)
            if depth > 1:
                levels = self._depths.get(symbol) or self._depths.setdefault(symbol, _Depth())
                levels.rebuild(book)
        elif not book.has_snapshot:
            return None  # changes before a snapshot are ignored, as the orderbook group does
        else:
            book.apply(changes)
            if depth > 1:
                self._depths[symbol].update(book, changes)
        self.changes += len(changes)
        bid, ask = book.best_bid(), book.best_ask()
        top = (bid, ask)
        if top == self._top.get(symbol):
            return None  # the same top as the last (uncrossed) one: nothing to tell
        if bid is not None and ask is not None and price_key(bid[0])[1] > price_key(ask[0])[1]:
            book.clear()  # crossed: dropped until the next snapshot, as the orderbook group
            if depth > 1:
                self._depths[symbol].rebuild(book)
            self.books_dropped += 1
            self._top.pop(symbol, None)
            return None
        self._top[symbol] = top
        fills = self.broker.on_book(symbol, book, event[0])
        if fills:
            self._feedback(fills, event)
        if depth == 1:
            bids = [{"price": bid[0], "quantity": bid[1]}] if bid else []
            asks = [{"price": ask[0], "quantity": ask[1]}] if ask else []
        else:
            bids, asks = self._depths[symbol].top(book, depth)
        self.snapshots += 1
        received = update["received_ts_us"]
        snapshot = {"symbol": symbol, "depth": depth, "bids": bids, "asks": asks,
                    "exchange_ts_ms": update["exchange_ts_ms"], "received_ts_us": received,
                    "published_ts_us": received, "source_partition": event[2],
                    "source_offset": event[3], "connection_id": update["connection_id"],
                    "sequence": update["sequence"]}
        return self._call_on_book(snapshot, event)

    def _snapshot(self, snapshot: dict, event: Event):
        symbol = snapshot["symbol"]
        book = self._book(symbol)
        book.apply_snapshot([{"side": "BID", "price": level["price"], "quantity": level["quantity"]}
                             for level in snapshot["bids"]] +
                            [{"side": "ASK", "price": level["price"], "quantity": level["quantity"]}
                             for level in snapshot["asks"]])
        fills = self.broker.on_book(symbol, book, event[0])
        if fills:
            self._feedback(fills, event)
        return self._call_on_book(snapshot, event)

    def finish(self, interrupted: bool = False) -> EngineResult:
        """Settle (``finalize_trades``) and return the result."""
        broker = self.broker
        with localcontext(self._context):
            if not self.stopped and not interrupted:
                fills = broker.finish(self.last_us)
                if fills:
                    event = (self.last_us or 0, "(end of replay)", -1, -1, "end", {})
                    self._feedback(fills, event)
            elif isinstance(broker, BookBroker) and self.last_us is not None:
                broker._record((broker._cell or 0) * broker.sample_ms)
            final = broker.equity()
        ledger = broker.ledger
        return EngineResult(
            strategy=self.strategy, fill=self.fill, trades=list(ledger.closed),
            open_lots=[lot for lots in ledger.lots.values() for lot in lots],
            equity_labels_ms=list(broker.labels), equity=list(broker.values),
            primary=broker.primary, primary_marks=list(broker.primary_marks),
            initial_cash=broker.initial_cash, final_cash=ledger.cash, final_equity=final,
            events=self.events, by_kind=dict(self.by_kind), first_event_us=self.first_us,
            last_event_us=self.last_us, orders=broker.counts, pending_orders=broker.pending,
            books_dropped=self.books_dropped, changes_applied=self.changes,
            snapshots_emitted=self.snapshots, interrupted=interrupted, stopped=self.stopped)


def _describe(record: dict) -> str:
    """A short identification of a record for error messages."""
    parts = [f"{k}={record[k]}" for k in ("symbol", "interval", "start_ms", "trade_id",
                                           "sequence", "close", "price") if k in record]
    return "{" + ", ".join(parts) + "}"


def make_broker(fill: str, cash: Decimal, commission: Decimal, strategy_id: str, *,
                lot: Decimal = ONE, slippage: Decimal = ZERO, interval: str | None = None,
                finalize_trades: bool = True, sample_ms: int = 1000) -> Broker:
    if fill == NEXT_OPEN:
        return NextOpenBroker(cash, commission, strategy_id, lot, slippage, interval,
                              finalize_trades)
    if fill == BOOK_FILLS:
        if slippage:
            raise PipelineError("slippage applies to the next-open fill model; book fills "
                                "pay the prices of the levels they take")
        return BookBroker(cash, commission, strategy_id, lot, sample_ms, finalize_trades)
    raise PipelineError(f"unknown fill model {fill!r}: one of {', '.join(FILL_MODELS)}")


def backtest_events(strategy: Strategy, events: Iterable[Event], *, fill: str = NEXT_OPEN,
                    cash: str | Decimal = "1000000", commission: str | Decimal = "0",
                    **options: Any) -> EngineResult:
    """Run ``strategy`` over events already in memory (tests, sweeps): the engine alone."""
    book_depth = options.pop("book_depth", 10)
    for name in ("lot", "slippage"):
        if name in options:
            options[name] = Decimal(str(options[name]))
    broker = make_broker(fill, Decimal(cash), Decimal(commission), strategy.strategy_id,
                         **options)
    engine = Engine(strategy, broker, book_depth)
    engine.run(list(events))
    return engine.finish()
