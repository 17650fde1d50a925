"""The backtest engine: records in event-time order in, a strategy driven, a simulated
broker filling its orders. Pure logic: no Kafka, no files (``pipeline/replay/source.py``
reads topics, ``pipeline/backtest/report.py`` computes the numbers and writes them).

**Events.** An event is the tuple ``(key_us, topic, partition, offset, kind, record)``;
``kind`` is one of :data:`BAR`, :data:`BOOK`, :data:`TRADE`, :data:`L2` and ``record``
the decoded dict. Its event time (µs) is when the record became known:

* ``Bar``: ``end_ms`` (a bar is known when it closes);
* ``BookSnapshot``, ``L2Update`` and ``Trade``: ``received_ts_us`` (a trade's exchange
  time is on another clock: a venue replaying an old capture stamps frames now, while
  their trades keep their recorded exchange times).

:class:`EventMerger` merges partitions and topics into one deterministic order: by
``(key_us, topic, partition, offset)``, where ``key_us`` is the running maximum of the
event times seen in the record's partition. A record whose event time goes backwards
(late data) keeps its place in its partition, it is not moved before records already
read; so the order is a merge of the partitions, the same however the records were
batched on the way.

**What the strategy sees** is what the live ``strategy`` group shows it: ``md.l2``
records go through the one book policy (:mod:`pipeline.market.book_policy`), so
``on_book`` gets exactly the ``BookSnapshot`` records the ``orderbook`` group would publish
(on every change of the top of book, and every second of event time for books whose
deeper levels changed); its open orders, position and equity come from an
:class:`~pipeline.trading.tracker.OrderTracker` fed by its requests and order events;
``on_timer`` is called every ``timer_interval_ms`` of event time; request ids are derived
from the triggering record as live (``md.l2/<partition>/<offset>`` for a book snapshot).

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
* a cancel removes an order still waiting for its bar (CANCELLED), else CANCEL_REJECTED.

One deliberate difference: when an order is sized, open trades are valued at the fill
price (the bar's open), where backtesting.py values them at the same bar's close, which
it cannot know yet at the open. The two agree whenever the position is flat when the
order is sized, as in close-then-reverse strategies.

**Books and the book fill model** (:class:`BookBroker`): requests go to the one simulated
exchange (:class:`~pipeline.trading.simulator.SimulatedExchange`, the very one paper
execution runs): resting orders with queue position (risk-averse by default, or none),
``latency_ms`` for orders and cancels, maker and taker fees (Gemini's API schedule by
default), expiry at ``expires_ms`` (``order_ttl_ms`` after the triggering event), Gemini's
options, and liquidity taken once. See that module for the matching rules.

Money is exact: cash, prices, sizes and P&L are ``Decimal`` (28 significant digits), so
the same inputs give the same trades, byte for byte.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Context, Decimal, localcontext
from typing import Any, Iterable, Sequence

from pipeline.core.decimals import plain
from pipeline.core.errors import PipelineError, StrategyFailed
from pipeline.core.vocabulary import (
    BUY_WIRE,
    ExecutionMode,
    Liquidity,
    MarketEventKind,
    OrderAction,
    OrderEventKind,
    OrderType,
    Side,
)
from pipeline.market.book_policy import IGNORED, TOP_CHANGED, BookPolicy, Source
from pipeline.market.orderbook import L2Book, price_key
from pipeline.trading.accounting import ClosedTrade, Ledger, Lot
from pipeline.trading.fees import GEMINI_API_FEES, FeeSchedule
from pipeline.trading.intents import (
    INTENT_TYPES,
    CancelAllIntent,
    CancelIntent,
    OrderIntent,
    ReplaceIntent,
)
from pipeline.trading.orders import REQUESTED, UNKNOWN_ORDER, Fill, Order, order_event
from pipeline.trading.requests import (
    IntentError,
    build_requests,
    event_trigger,
    record_trigger,
    snapshot_trigger,
)
from pipeline.trading.rules import RulesTable
from pipeline.trading.signing import client_order_id
from pipeline.trading.simulator import QUEUE_MODELS, SimulatedExchange, SimulatorConfig
from pipeline.trading.strategy import Strategy
from pipeline.trading.tracker import OrderTracker

# The kinds as plain str (compared once per event in the merge loop).
BAR, BOOK, TRADE, L2 = (MarketEventKind.BAR.value, MarketEventKind.BOOK.value,
                        MarketEventKind.TRADE.value, MarketEventKind.L2.value)
KINDS = (BAR, BOOK, TRADE, L2)
#: What each record type replays as.
KIND_OF_SCHEMA = {"Bar": BAR, "BookSnapshot": BOOK, "Trade": TRADE, "L2Update": L2}
NEXT_OPEN, BOOK_FILLS = "next-open", "book"
FILL_MODELS = (NEXT_OPEN, BOOK_FILLS)
MODE = ExecutionMode.PAPER.value  # OrderEvent.mode of backtest events

Event = tuple  # (key_us, topic, partition, offset, kind, record)
ZERO = Decimal(0)
ONE = Decimal(1)
K = OrderEventKind
_FEEDBACK_DEPTH = 50  # order events causing intents causing events ... at most this deep


class _OutOfMoney(Exception):
    """Equity fell to zero or below: backtesting.py stops the run there; so do we."""


def event_time_us(kind: str, record: dict) -> int:
    """When a record became known, in µs since the epoch (see the module doc)."""
    if kind == BAR:
        return record["end_ms"] * 1000
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
        for buffer in self._buffers.values():
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


# --------------------------------------------------------------------------- brokers


@dataclass
class OrderCounts:
    submitted: int = 0
    filled: int = 0
    partially_filled: int = 0
    cancelled: int = 0
    expired: int = 0
    rejected: int = 0
    cancel_rejected: int = 0

    def count(self, event: dict) -> None:
        name = _COUNTED.get(event["kind"])
        if name is not None:
            setattr(self, name, getattr(self, name) + 1)


_COUNTED = {"FILLED": "filled", "PARTIALLY_FILLED": "partially_filled",
            "CANCELLED": "cancelled", "EXPIRED": "expired", "REJECTED": "rejected",
            "CANCEL_REJECTED": "cancel_rejected"}


class Broker:
    """What the engine needs from a fill model. Both keep a :class:`Ledger` for the
    report and sample the equity curve; every call returns the ``OrderEvent``s it caused."""

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
        # every marked symbol's mark at each equity point (None before its first mark), for
        # the report's buy & hold of the symbols actually traded
        self.mark_series: dict[str, list[Decimal | None]] = {}
        self.stopped: str | None = None  # why the broker stopped the run early

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
        else:
            self.labels.append(label_ms)
            self.values.append(value)
            self.primary_marks.append(mark)
        self._record_marks(self._point_marks())

    def _point_marks(self) -> dict[str, Decimal]:
        """The marks an equity point records for the report."""
        return self.marks

    def _record_marks(self, marks: dict[str, Decimal]) -> None:
        """Every mark at the last equity point (written again when that point is)."""
        n = len(self.labels)
        series_of = self.mark_series
        for symbol, mark in marks.items():
            series = series_of.get(symbol)
            if series is None:
                series = series_of[symbol] = []
            if len(series) == n:
                series[-1] = mark
            else:
                if len(series) < n - 1:
                    series.extend([None] * (n - 1 - len(series)))
                series.append(mark)

    def marks_by_point(self) -> dict[str, list[Decimal | None]]:
        """:attr:`mark_series`, each as long as the equity points."""
        n = len(self.labels)
        return {symbol: series + [None] * (n - len(series))
                for symbol, series in self.mark_series.items()}

    def _counted(self, events: list[dict]) -> list[dict]:
        for event in events:
            self.counts.count(event)
        return events

    # -- the engine's calls (overridden)

    def on_bar(self, bar: dict) -> list[dict] | None:
        return None

    def on_book(self, symbol: str, changes: list | None, when_us: int,
                top_changed: bool = True) -> list[dict] | None:
        return None

    def tick(self, when_us: int) -> None:
        """Time moved on to ``when_us`` (book mode samples equity by time)."""

    def on_trade(self, trade: dict, when_us: int) -> list[dict] | None:
        return None

    def finish(self, last_event_us: int | None) -> list[dict]:
        return []

    @property
    def pending(self) -> int:
        return 0


def _when_ms(event: Event) -> int:
    return event[0] // 1000


class _Queued:
    """A next-open order waiting for its bar: the order, and how it is to be sized."""

    __slots__ = ("order", "fraction", "lot", "buy")

    def __init__(self, order: Order, fraction: Decimal | None, lot: Lot | None) -> None:
        self.order, self.fraction, self.lot = order, fraction, lot
        self.buy = order.side is Side.BUY


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
        self.orders: dict[str, list[_Queued]] = {}
        self.bars: dict[str, dict] = {}  # symbol -> last bar
        self.bar_log: list[dict] = []  # every bar it ran on, in order (the records themselves)
        self.bar_index: dict[str, int] = {}
        self.intervals: dict[str, str] = {}

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self.orders.values())

    def _order(self, cid: str, symbol: str, buy: bool, amount: Decimal | None,
               price: str | None, when_ms: int) -> Order:
        self.counts.submitted += 1
        if self.primary is None:
            self.primary = symbol
        return Order(cid, self.strategy_id, symbol, Side.BUY if buy else Side.SELL,
                     OrderType.LIMIT if price is not None else OrderType.MARKET,
                     Decimal(price) if price is not None else None,
                     amount if amount is not None else ZERO, created_ms=when_ms,
                     price_text=price, amount_text=plain(amount) if amount is not None else "0")

    def _accept(self, queued: _Queued, when_ms: int, front: bool = False) -> dict:
        queue = self.orders.setdefault(queued.order.symbol, [])
        queue.insert(0, queued) if front else queue.append(queued)
        queued.order.step(K.ACCEPTED)
        return order_event(queued.order, K.ACCEPTED, when_ms, MODE)

    def submit(self, intents: Sequence[Any], trigger: str, when_ms: int) -> list[dict]:
        events: list[dict] = []
        for index, intent in enumerate(intents):
            cid = client_order_id(self.strategy_id, trigger, index)
            if isinstance(intent, OrderIntent):
                events += self._new(intent, cid, when_ms)
            elif isinstance(intent, CancelIntent):
                events += self._cancel(intent.client_order_id, when_ms, cid)
            elif isinstance(intent, CancelAllIntent):
                for symbol in sorted(self.orders):
                    if intent.symbol in (None, symbol):
                        for queued in list(self.orders[symbol]):
                            events += self._cancel(queued.order.client_order_id, when_ms, cid)
            else:
                assert isinstance(intent, ReplaceIntent)
                found = self._find(intent.client_order_id)
                cancelled = self._cancel(intent.client_order_id, when_ms, cid)
                events += cancelled
                if found is None or cancelled[-1]["kind"] != K.CANCELLED.value:
                    continue
                old = found.order
                events += self._new(OrderIntent(old.symbol, old.side.value,
                                                intent.amount or old.amount_text,
                                                OrderType.LIMIT if (intent.price or
                                                                    old.price_text)
                                                else OrderType.MARKET,
                                                intent.price or old.price_text),
                                    cid, when_ms)
        return self._counted(events)

    def _new(self, intent: OrderIntent, cid: str, when_ms: int) -> list[dict]:
        if intent.close_position:  # as position.close(): one order per open trade, first
            events = []
            for k, lot in enumerate(self.ledger.lots.get(intent.symbol, ())):
                order = self._order(cid if not k else f"{cid}.{k}", intent.symbol, lot.size < 0,
                                    abs(lot.size), None, when_ms)
                events.append(self._accept(_Queued(order, None, lot), when_ms, front=True))
            return events
        if intent.options:
            raise PipelineError(f"the next-open fill model cannot honour order options "
                                f"{list(intent.options)} (intent {intent}): use the book "
                                "fill model")
        order = self._order(cid, intent.symbol, intent.side == Side.BUY,
                            Decimal(intent.amount) if intent.amount is not None else None,
                            intent.price, when_ms)
        fraction = Decimal(intent.fraction) if intent.fraction is not None else None
        return [self._accept(_Queued(order, fraction, None), when_ms)]

    def _find(self, cid: str) -> _Queued | None:
        for queue in self.orders.values():
            for queued in queue:
                if queued.order.client_order_id == cid:
                    return queued
        return None

    def _cancel(self, target: str, when_ms: int, request_id: str) -> list[dict]:
        queued = self._find(target)
        if queued is None:
            stub = Order(target, self.strategy_id, "", Side.BUY, OrderType.MARKET, None, ZERO,
                         amount_text="0", fee_currency="-")
            return [order_event(stub, K.CANCEL_REJECTED, when_ms, MODE, request_id=request_id,
                                reason=UNKNOWN_ORDER)]
        self.orders[queued.order.symbol].remove(queued)
        queued.order.step(K.CANCELLED)
        return [order_event(queued.order, K.CANCELLED, when_ms, MODE, reason=REQUESTED,
                            request_id=request_id)]

    def on_bar(self, bar: dict) -> list[dict] | None:
        symbol = bar["symbol"]
        interval = bar["interval"]
        if self.intervals.get(symbol) != interval:
            if self.interval is not None and interval != self.interval:
                return None
            self._first_bar(symbol, interval)
        self.bar_index[symbol] += 1
        self.bars[symbol] = bar
        self.bar_log.append(bar)
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
        self._record_marks(self.marks)
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

    def _fill(self, order: Order, price: Decimal, amount: Decimal, fee: Decimal,
              when_ms: int) -> dict:
        fill = Fill(price, amount, Liquidity.TAKER, fee)
        return order_event(order, order.add_fill(fill), when_ms, MODE, fill=fill)

    def _process(self, symbol: str, bar: dict, index: int) -> list[dict]:
        """backtesting.py's ``_Broker._process_orders`` for one symbol's bar; fills are
        labelled with the bar's start and equity point ``index``."""
        queue = self.orders[symbol]
        open_ = Decimal(bar["open"])
        high = low = None
        when_ms, bar_no = bar["start_ms"], self.bar_index[symbol]
        ledger = self.ledger
        events: list[dict] = []
        for queued in list(queue):
            if queued not in queue:
                continue
            order = queued.order
            if queued.lot is not None:  # a close order (position.close / finalize)
                lot = queued.lot
                if lot in ledger.lots.get(symbol, ()):
                    size = lot.size
                    fee = ledger.close(lot, size, open_, when_ms, index, bar_no)
                    events.append(self._fill(order, open_, abs(size), fee, when_ms))
                else:
                    order.step(K.CANCELLED)
                    events.append(order_event(order, K.CANCELLED, when_ms, MODE,
                                              reason="no open trade to close"))
                queue.remove(queued)
                continue
            if order.price is not None:
                if high is None:
                    high, low = Decimal(bar["high"]), Decimal(bar["low"])
                if queued.buy:
                    if not low <= order.price:
                        continue
                    price = min(open_, order.price)
                else:
                    if not high >= order.price:
                        continue
                    price = max(open_, order.price)
            else:
                price = open_
            buy = queued.buy
            adjusted = price * (ONE + self.slippage) if buy else price * (ONE - self.slippage)
            per_unit = adjusted + price * self.ledger.rate
            if queued.fraction is not None:
                margin = ledger.margin(self.marks, symbol, open_)
                units = margin * queued.fraction / per_unit / self.lot
                units = units.to_integral_value(ROUND_FLOOR)
                if not units:
                    queue.remove(queued)
                    order.step(K.CANCELLED)
                    events.append(order_event(order, K.CANCELLED, when_ms, MODE,
                                              reason="insufficient margin for one lot"))
                    continue
                order.amount = units * self.lot
                order.amount_text = plain(order.amount)
                queued.fraction = None
            size = order.amount if buy else -order.amount
            need = size
            for lot in list(ledger.lots.get(symbol, ())):  # FIFO against opposite trades
                if (lot.size > 0) == (need > 0):
                    continue
                part = lot.size if abs(need) >= abs(lot.size) else -need
                fee = ledger.close(lot, part, price, when_ms, index, bar_no)
                events.append(self._fill(order, price, abs(part), fee, when_ms))
                need += part
                if not need:
                    break
            if need and abs(need) * per_unit > ledger.margin(self.marks, symbol, open_):
                queue.remove(queued)
                order.step(K.CANCELLED)
                events.append(order_event(order, K.CANCELLED, when_ms, MODE,
                                          reason="insufficient margin"))
                continue
            if need:
                fee = ledger.open(symbol, need, adjusted, when_ms, index, bar_no)
                events.append(self._fill(order, adjusted, abs(need), fee, when_ms))
            queue.remove(queued)
        return self._counted(events)

    def finish(self, last_event_us: int | None) -> list[dict]:
        """``finalize_trades=True``: close what is open with one more pass over each
        symbol's last bar (so at its open), as backtesting.py does."""
        if not self.finalize_trades or not self.labels:
            return []
        events = []
        for symbol in sorted(self.bars):
            lots = self.ledger.lots.get(symbol, [])
            for k, lot in enumerate(reversed(lots)):
                order = self._order(f"finalize-{symbol}-{k}", symbol, lot.size < 0,
                                    abs(lot.size), None, self.labels[-1])
                events.append(self._accept(_Queued(order, None, lot), self.labels[-1],
                                           front=True))
            if self.orders.get(symbol):
                events += self._process(symbol, self.bars[symbol], len(self.values) - 1)
        self._record(self.labels[-1])  # the last point is written again, as backtesting.py
        return events


class BookBroker(Broker):
    """Requests filled by the one simulated exchange against the replayed books (see
    :mod:`pipeline.trading.simulator`); fills are booked in the ledger with their fees."""

    def __init__(self, cash: Decimal, strategy_id: str, lot: Decimal = ONE,
                 sample_ms: int = 1000, finalize_trades: bool = True,
                 fees: FeeSchedule = GEMINI_API_FEES, queue: str = "risk-averse",
                 latency_ms: int = 0, rules: RulesTable | None = None) -> None:
        super().__init__(cash, ZERO, strategy_id, lot)
        if sample_ms <= 0:
            raise PipelineError(f"sample_ms must be positive, not {sample_ms}")
        if queue not in QUEUE_MODELS:
            raise PipelineError(f"unknown queue model {queue!r}: one of {', '.join(QUEUE_MODELS)}")
        if latency_ms < 0:
            raise PipelineError(f"latency_ms cannot be negative, not {latency_ms}")
        self.sample_ms = sample_ms
        self.finalize_trades = finalize_trades
        self.fees = fees
        self.books: dict[str, L2Book] = {}  # shared with the engine's book policy
        self.exchange = SimulatedExchange(self.books, SimulatorConfig(
            fees=fees, queue=queue, latency_ms=latency_ms, mode=MODE, rules=rules))
        self._cell: int | None = None
        self.next_tick_us = -1  # the engine calls tick() once time reaches this

    @property
    def pending(self) -> int:
        return len(self.exchange.open_orders())

    # -- time and equity

    def tick(self, when_us: int) -> None:
        cell = when_us // 1000 // self.sample_ms
        if self._cell is not None and cell != self._cell:
            self._record(self._cell * self.sample_ms)
        self._cell = cell
        self.next_tick_us = (cell + 1) * self.sample_ms * 1000

    def equity(self) -> Decimal:
        """Marked at the books' mids (computed now, not on every change of a book)."""
        ledger = self.ledger
        for symbol, book in self.books.items():
            if ledger.position.get(symbol) or ledger.gross.get(symbol) or symbol == self.primary:
                bid, ask = book.best_bid(), book.best_ask()
                if bid is not None and ask is not None:
                    self.marks[symbol] = (price_key(bid[0])[1] + price_key(ask[0])[1]) / 2
        return super().equity()

    def _point_marks(self) -> dict[str, Decimal]:
        """Every book's mid (not only the held symbols', which are all :attr:`marks`
        values), for the report's buy & hold of whichever symbols the strategy trades;
        kept apart from :attr:`marks` so the simulation is unchanged."""
        marks = dict(self.marks)
        for symbol, book in self.books.items():
            bid, ask = book.best_bid(), book.best_ask()
            if bid is not None and ask is not None:
                marks[symbol] = (price_key(bid[0])[1] + price_key(ask[0])[1]) / 2
        return marks

    @property
    def _index(self) -> int:
        return len(self.values)

    def price_of(self, symbol: str, side: str) -> Decimal | None:
        """The best price a buy (sell) of ``symbol`` would pay now: the ask (bid)."""
        book = self.books.get(symbol)
        top = None if book is None else (book.best_ask() if side == Side.BUY else book.best_bid())
        return price_key(top[0])[1] if top else self.marks.get(symbol)

    # -- the simulator

    def execute(self, request: dict, when_us: int) -> list[dict]:
        if request.get("action") in (None, OrderAction.NEW, OrderAction.REPLACE):
            self.counts.submitted += 1
            if self.primary is None:
                self.primary = request["symbol"]
        return self._booked(self.exchange.execute(request, when_us))

    def advance(self, when_us: int) -> list[dict]:
        return self._booked(self.exchange.advance(when_us))

    def on_book(self, symbol: str, changes: list | None, when_us: int,
                top_changed: bool = True) -> list[dict] | None:
        if self.primary is None:
            self.primary = symbol
        events = self.exchange.on_book(symbol, changes, when_us, top_changed)
        return self._booked(events) if events else None

    def on_trade(self, trade: dict, when_us: int) -> list[dict] | None:
        if trade["symbol"] not in self.books:
            self.marks[trade["symbol"]] = Decimal(trade["price"])
        events = self.exchange.on_trade(trade, when_us)
        return self._booked(events) if events else None

    def _booked(self, events: list[dict]) -> list[dict]:
        """Book each fill in the ledger (price, amount and fee as the simulator gave them)."""
        ledger, index = self.ledger, self._index
        for event in events:
            self.counts.count(event)
            if event["last_fill_amount"] is None:
                continue
            amount = Decimal(event["last_fill_amount"])
            ledger.fill(event["symbol"], amount if event["side"] == BUY_WIRE else -amount,
                        Decimal(event["last_fill_price"]), event["event_ms"], index, -1,
                        fee=Decimal(event["last_fill_fee"]))
        return events

    def finish(self, last_event_us: int | None) -> list[dict]:
        """Close open positions at market against the last books (or, what the books cannot
        take, at the last mark with the taker fee), then record the last equity point."""
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
                side = Side.SELL if position > 0 else Side.BUY
                request = {"client_order_id": f"finalize-{symbol}", "strategy_id": self.strategy_id,
                           "symbol": symbol, "side": side, "order_type": OrderType.MARKET,
                           "price": None, "amount": plain(abs(position)), "options": [],
                           "created_ms": when, "expires_ms": None, "action": OrderAction.NEW}
                book = self.books.get(symbol)
                if book is not None and book.has_snapshot:
                    events += self._booked(self.exchange.execute(request, last_event_us,
                                                                 immediate=True))
                remaining = abs(self.ledger.position.get(symbol, ZERO))
                if remaining and symbol in self.marks:  # no book left: at the last mark
                    mark = self.marks[symbol]
                    self.ledger.fill(symbol, remaining if side == Side.BUY else -remaining, mark,
                                     when, self._index, -1,
                                     fee=self.fees.fee(mark * remaining, Liquidity.TAKER))
        cell = self._cell if self._cell is not None else when // self.sample_ms
        self._record(cell * self.sample_ms)
        return events


# --------------------------------------------------------------------------- the engine


@dataclass
class EngineResult:
    """What a run produced, exact; :mod:`pipeline.backtest.report` makes numbers and files of it."""

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
    order_events: list[dict] = field(default_factory=list)  # every OrderEvent, in order
    final_marks: dict[str, Decimal] = field(default_factory=dict)  # what final_equity used
    realized: dict[str, Decimal] = field(default_factory=dict)  # per symbol, after fees
    # each symbol's mark (bar close, book mid, or last trade without a book) at each equity
    # point, None before its first: what the report's buy & hold is computed from
    marks: dict[str, list[Decimal | None]] = field(default_factory=dict)
    fill_count: dict[str, int] = field(default_factory=dict)  # per symbol, the ledger's
    # next-open fills: every bar the broker ran on (of its interval), in replay order, the
    # replayed records themselves (not copies): the report's candles. Empty for book fills.
    bars: list[dict] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class Engine:
    """Drives one strategy over events with one broker. Feed batches with :meth:`run`
    (any number of times), then call :meth:`finish`."""

    def __init__(self, strategy: Strategy, broker: Broker, book_depth: int = 10,
                 strategy_name: str | None = None, snapshot_interval_ms: int = 1000) -> None:
        if book_depth < 1:
            raise PipelineError(f"book_depth must be at least 1, not {book_depth}")
        self.strategy, self.broker, self.book_depth = strategy, broker, book_depth
        self.name = strategy_name or f"{type(strategy).__module__}:{type(strategy).__qualname__}"
        self.fill = NEXT_OPEN if isinstance(broker, NextOpenBroker) else BOOK_FILLS
        # Book fills: the simulator matches against the very books the policy keeps.
        self.policy = BookPolicy(book_depth, snapshot_interval_ms * 1000,
                                 broker.books if isinstance(broker, BookBroker) else None)
        self.books = self.policy.books
        self.tracker = OrderTracker(strategy.strategy_id, cash=broker.initial_cash)
        strategy.attach(self.tracker)
        self.timer_us = (strategy.timer_interval_ms or 0) * 1000
        self.next_timer_us: int | None = None
        self.events = 0
        self.by_kind = dict.fromkeys(KINDS, 0)
        self.first_us: int | None = None
        self.last_us: int | None = None
        self.stopped: str | None = None
        self.order_events: list[dict] = []
        self._depth = 0
        self._context = Context()  # decimal defaults, whatever the caller's context is

    @property
    def books_dropped(self) -> int:
        return self.policy.counts["crossed"]

    @property
    def changes(self) -> int:
        return self.policy.changes

    @property
    def snapshots(self) -> int:
        return self.policy.counts["snapshots"]

    def run(self, events: Sequence[Event]) -> int:
        """Process a batch of ``events`` (in order); returns how many were processed (fewer
        when the broker stopped the run: out of money)."""
        if self.stopped or not events:
            return 0
        with localcontext(self._context):
            return self._run(events)

    def _run(self, events: Sequence[Event]) -> int:
        strategy, broker, policy, tracker = self.strategy, self.broker, self.policy, self.tracker
        book_mode = isinstance(broker, BookBroker)
        exchange = broker.exchange if book_mode else None  # type: ignore[attr-defined]
        active = exchange.active if book_mode else ()  # symbols with orders or taken levels
        wanted = strategy.symbols
        on_bar = strategy.on_bar
        changed = policy.changed
        if self.first_us is None:
            self.first_us = events[0][0]
            if self.timer_us:
                self.next_timer_us = (events[0][0] // self.timer_us + 1) * self.timer_us
        n_bar = n_l2 = n_book = n_trade = 0
        event = None
        try:
            for event in events:
                t, kind, record = event[0], event[4], event[5]
                if book_mode:
                    if t >= broker.next_tick_us:  # type: ignore[attr-defined]
                        broker.tick(t)
                        tracker.expire(t // 1000)
                    if t >= exchange.next_due_us:
                        self._feedback(broker.advance(t), t)  # type: ignore[attr-defined]
                if self.timer_us and t >= self.next_timer_us:  # type: ignore[operator]
                    self._timers(t, event)
                if changed and t >= policy.next_round_us:
                    for symbol in policy.due(t):
                        if wanted is None or symbol in wanted:
                            self._on_book(policy.snapshot(symbol, t), t, event)
                if kind == L2:
                    n_l2 += 1
                    code, _ = policy.apply(record, event[2], event[3])
                    if code == IGNORED:
                        continue
                    symbol = record["symbol"]
                    if symbol in active:
                        fills = broker.on_book(symbol, None if record["snapshot"] else
                                               record["changes"], t, code == TOP_CHANGED)
                        if fills:
                            self._feedback(fills, t, event)
                    if code == TOP_CHANGED and (wanted is None or symbol in wanted):
                        self._on_book(policy.snapshot(symbol, record["received_ts_us"]), t,
                                      event)
                elif kind == BAR:
                    n_bar += 1
                    fills = broker.on_bar(record)
                    if fills:
                        self._feedback(fills, t, event)
                    if wanted is not None and record["symbol"] not in wanted:
                        continue
                    tracker.mark_text(record["symbol"], record["close"])
                    try:
                        intents = on_bar(record)
                    except Exception as exc:  # noqa: BLE001 - name the strategy and the input
                        raise self._failure("on_bar", event, exc) from exc
                    if intents:
                        self._submit(intents, record_trigger(event[1], event[2], event[3]),
                                     t, event)
                elif kind == BOOK:
                    n_book += 1
                    policy.restore(record["symbol"], record["bids"], record["asks"], True,
                                   Source(record["source_partition"], record["source_offset"],
                                          record["connection_id"], record["sequence"],
                                          record["received_ts_us"], record["exchange_ts_ms"]))
                    fills = broker.on_book(record["symbol"], None, t)
                    if fills:
                        self._feedback(fills, t, event)
                    if wanted is None or record["symbol"] in wanted:
                        self._on_book(record, t, event)
                else:
                    n_trade += 1
                    fills = broker.on_trade(record, t)
                    if fills:
                        self._feedback(fills, t, event)
                    if wanted is not None and record["symbol"] not in wanted:
                        continue
                    if not record.get("from_snapshot"):
                        tracker.mark(record["symbol"], Decimal(record["price"]))
                    intents = self._call("on_trade", strategy.on_trade, record, event)
                    if intents:
                        self._submit(intents, record_trigger(event[1], event[2], event[3]),
                                     t, event)
        except _OutOfMoney:
            self.stopped = broker.stopped
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

    def _on_book(self, snapshot: dict, t: int, event: Event) -> None:
        self.tracker.mark_book(snapshot)
        intents = self._call("on_book", self.strategy.on_book, snapshot, event)
        if intents:
            self._submit(intents, snapshot_trigger(snapshot), t, event)

    def _timers(self, t: int, event: Event) -> None:
        while self.next_timer_us is not None and t >= self.next_timer_us:
            at_ms = self.next_timer_us // 1000
            self.next_timer_us += self.timer_us
            intents = self._call("on_timer", self.strategy.on_timer, at_ms, event)
            if intents:
                self._submit(intents, f"timer/{at_ms}", t, event)

    def _call(self, callback: str, fn, argument: Any, event: Event | None):
        try:
            return fn(argument)
        except PipelineError:
            raise
        except Exception as exc:  # noqa: BLE001 - name the strategy and the input
            raise self._failure(callback, event, exc) from exc

    def _failure(self, callback: str, event: Event | None, exc: BaseException) -> StrategyFailed:
        where = "" if event is None or event[2] < 0 else \
            (f" on {event[1]}[{event[2]}]@{event[3]} (event time {event[0]} µs, "
             f"{event[4]} {_describe(event[5])})")
        return StrategyFailed(f"strategy {self.name} (id {self.strategy.strategy_id}) raised "
                              f"{type(exc).__name__} in {callback}{where}: {exc}")

    def _submit(self, intents: Any, trigger: str, t: int, event: Event | None) -> None:
        if isinstance(intents, INTENT_TYPES):
            intents = [intents]
        intents = list(intents)
        for intent in intents:
            if not isinstance(intent, INTENT_TYPES):
                where = "" if event is None else f" on {event[1]}[{event[2]}]@{event[3]}"
                raise StrategyFailed(f"strategy {self.name} returned {intent!r}, not an "
                                     f"intent{where}")
        broker, strategy = self.broker, self.strategy
        if isinstance(broker, NextOpenBroker):
            events = broker.submit(intents, trigger, t // 1000)
        else:
            assert isinstance(broker, BookBroker)
            try:
                requests, refused = build_requests(
                    intents, strategy_id=strategy.strategy_id, tracker=self.tracker,
                    trigger=trigger, now_ms=t // 1000, ttl_ms=strategy.order_ttl_ms,
                    lot=broker.lot, price_of=broker.price_of, fee_rate=broker.fees.taker)
            except IntentError as exc:
                raise StrategyFailed(f"strategy {self.name}: {exc}") from None
            events = [self._refused(r.intent, r.reason, trigger, i, t)
                      for i, r in enumerate(refused)]
            for request in requests:
                self.tracker.sent(request)
                events += broker.execute(request, t)
        self._feedback(events, t, event)

    def _refused(self, intent: Any, reason: str, trigger: str, index: int, t: int) -> dict:
        """A REJECTED event for an intent that made no request (the strategy hears why)."""
        symbol = getattr(intent, "symbol", None) or ""
        side = getattr(intent, "side", None) or Side.BUY
        order = Order(client_order_id(self.strategy.strategy_id, f"{trigger}/refused", index),
                      self.strategy.strategy_id, symbol, Side(side), OrderType.MARKET, None,
                      ZERO, amount_text="0", fee_currency="-" if not symbol else "")
        order.step(K.REJECTED)
        self.broker.counts.rejected += 1
        return order_event(order, K.REJECTED, t // 1000, MODE, reason=reason)

    def _feedback(self, order_events: list[dict], t: int, event: Event | None = None) -> None:
        if not order_events:
            return
        self._depth += 1
        try:
            if self._depth > _FEEDBACK_DEPTH:
                raise StrategyFailed(f"strategy {self.name}: its orders' events kept causing "
                                     f"new intents {_FEEDBACK_DEPTH} levels deep")
            tracker, callback = self.tracker, self.strategy.on_order_event
            self.order_events += order_events
            for order_event_ in order_events:
                tracker.on_event(order_event_)
                intents = self._call("on_order_event", callback, order_event_, event)
                if intents:
                    self._submit(intents, event_trigger(order_event_), t, event)
        finally:
            self._depth -= 1

    def finish(self, interrupted: bool = False) -> EngineResult:
        """Settle (``finalize_trades``) and return the result."""
        broker = self.broker
        with localcontext(self._context):
            if not self.stopped and not interrupted:
                fills = broker.finish(self.last_us)
                if fills:
                    event = (self.last_us or 0, "(end of replay)", -1, -1, "end", {})
                    self._feedback(fills, self.last_us or 0, event)
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
            snapshots_emitted=self.snapshots, interrupted=interrupted, stopped=self.stopped,
            order_events=self.order_events, final_marks=dict(broker.marks),
            realized=dict(ledger.realized), marks=broker.marks_by_point(),
            fill_count=dict(ledger.fill_count),
            bars=broker.bar_log if isinstance(broker, NextOpenBroker) else [])


def _describe(record: dict) -> str:
    """A short identification of a record for error messages."""
    parts = [f"{k}={record[k]}" for k in ("symbol", "interval", "start_ms", "trade_id",
                                           "sequence", "close", "price") if k in record]
    return "{" + ", ".join(parts) + "}"


def make_broker(fill: str, cash: Decimal, commission: Decimal | None, strategy_id: str, *,
                lot: Decimal = ONE, slippage: Decimal = ZERO, interval: str | None = None,
                finalize_trades: bool = True, sample_ms: int = 1000,
                fees: FeeSchedule | None = None, queue: str = "risk-averse",
                latency_ms: int = 0, rules: RulesTable | None = None) -> Broker:
    """The broker of a fill model. ``commission`` is the next-open model's rate (default
    0); book fills pay ``fees`` (maker and taker; default Gemini's API schedule, or
    ``commission`` for both when only that is given) and obey Gemini's symbol ``rules``
    (None: no symbol rules; the simulator still checks ids and options)."""
    if fill == NEXT_OPEN:
        if fees is not None:
            raise PipelineError("maker and taker fees apply to book fills; the next-open "
                                "model charges the commission rate on entry and exit")
        return NextOpenBroker(cash, commission or ZERO, strategy_id, lot, slippage, interval,
                              finalize_trades)
    if fill == BOOK_FILLS:
        if slippage:
            raise PipelineError("slippage applies to the next-open fill model; book fills "
                                "pay the prices of the levels they take")
        if fees is None:
            fees = GEMINI_API_FEES if commission is None else \
                FeeSchedule(maker=commission, taker=commission)
        return BookBroker(cash, strategy_id, lot, sample_ms, finalize_trades, fees, queue,
                          latency_ms, rules)
    raise PipelineError(f"unknown fill model {fill!r}: one of {', '.join(FILL_MODELS)}")


def backtest_events(strategy: Strategy, events: Iterable[Event], *, fill: str = NEXT_OPEN,
                    cash: str | Decimal = "1000000", commission: str | Decimal | None = None,
                    **options: Any) -> EngineResult:
    """Run ``strategy`` over events already in memory (tests, sweeps): the engine alone."""
    book_depth = options.pop("book_depth", 10)
    for name in ("lot", "slippage"):
        if name in options:
            options[name] = Decimal(str(options[name]))
    broker = make_broker(fill, Decimal(cash),
                         None if commission is None else Decimal(str(commission)),
                         strategy.strategy_id, **options)
    engine = Engine(strategy, broker, book_depth)
    engine.run(list(events))
    return engine.finish()
