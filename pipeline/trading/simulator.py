"""The simulated exchange: orders matched against replayed L2 books, with resting orders,
queue position, latency and maker/taker fees. Pure Python, Decimal throughout, no I/O.

The order-book backtest (``--fill book``) and execution's ``paper`` mode both run this
one class; only where its inputs come from differs. The local venue keeps its own
matching on purpose: it is the independent oracle the tests compare against.

**Inputs.** The caller owns the books (``pipeline.market.book_policy``: snapshots, crossed
books) and tells the simulator after each ``md.l2`` update (:meth:`on_book`) and each
trade (:meth:`on_trade`). Orders come in with :meth:`submit`, :meth:`cancel`,
:meth:`cancel_all` and :meth:`replace`; each reaches the exchange ``latency_ms`` after it
was sent (``cancel_latency_ms`` for cancels) and :meth:`advance` delivers what is due and
expires orders past their ``expires_ms``. Every call returns the ``OrderEvent`` records it
caused, in order.

**Takers.** An arriving order takes the opposite side level by level, best first, up to
its limit (a MARKET order has none), each fill at the level's price, paying the taker fee.
``maker-or-cancel``: cancelled unfilled (MakerOrCancelWouldTake) if its limit reaches the
best opposite price. ``fill-or-kill``: cancelled unfilled (FillOrKillWouldNotFill) unless
everything fills now. ``immediate-or-cancel`` and MARKET: the rest is cancelled
(ImmediateOrCancelWouldPost). Otherwise the rest is BOOKED at its limit.

**The symbol's rules.** Every arriving order is checked by
:func:`pipeline.trading.rules.check_order`, the very function execution's ``decide``
calls, against ``SimulatorConfig.rules`` (Gemini's price and amount steps, minimum
amount and market status per symbol; None: no symbol rules, the id and options are still
checked): a refused order is REJECTED ``rules:<Gemini's reason>`` (``rules:InvalidPrice``,
``rules:ConflictingOptions``...), as paper execution rejects it before it gets here.
Auction-only and indication-of-interest orders, and a MARKET order with an option, are
REJECTED UnsupportedOption (not simulated).

**Liquidity is taken once.** The replayed book is the market without us, so our fills do
not change it. What our orders took from a level is remembered until the feed changes
that level (a change at that price, or a snapshot): only what is left can be taken again,
by any of our orders.

**Resting orders** fill as makers, at their own limit price:

* when a trade prints at or through their price (a taker sold at or below a resting buy):
  through the price, the trade's quantity fills the order (the taker would have met it
  first); at the price, only once the queue ahead has traded (below). One trade fills our
  orders, best price then time first, for at most its own quantity. Trades from a
  snapshot's recent history (``from_snapshot``) and of unknown side are not used;
* when the opposite side of the book reaches their price (an ask at or below a resting
  buy): the real queue at that price must be gone, so the order fills from those levels,
  for at most what they show (less what we took).

**Queue position** (``queue="risk-averse"``, the default; hftbacktest's
``RiskAdverseQueueModel``): an order joins behind the quantity the book shows at its price
(plus our own earlier orders there). A trade at the price takes its quantity off the
front; a decrease of the level takes it off the front only as far as the level is now
smaller than the queue ahead (``ahead = min(ahead, shown)``: decreases are assumed to come
from behind us unless they must have come from ahead); increases join behind. The order
fills once the queue ahead is gone: a trade's quantity past the front fills it.
``queue="none"`` puts every order at the front (today's optimistic rule: it fills as soon
as the market trades at or reaches its price).
"""

from __future__ import annotations

import hashlib
import heapq
from bisect import insort
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable, Iterable, Mapping

from pipeline.core.decimals import ZERO, plain
from pipeline.core.records import LevelChange, OrderEvent
from pipeline.core.vocabulary import (
    BookSide,
    ExecutionMode,
    Liquidity,
    OrderAction,
    OrderEventKind,
    OrderOption,
    OrderType,
    Side,
    TakerSide,
)
from pipeline.market.orderbook import _PRICES, L2Book, price_key
from pipeline.trading.fees import GEMINI_API_FEES, FeeSchedule
from pipeline.trading.orders import (
    EXPIRED,
    FOK_WOULD_NOT_FILL,
    IOC_WOULD_POST,
    MOC_WOULD_TAKE,
    NO_BOOK,
    NOT_OWNER,
    ORDER_CLOSED,
    REQUESTED,
    UNKNOWN_ORDER,
    Fill,
    Order,
    OrderStatus,
    new_order,
    order_event,
)
from pipeline.trading.rules import RulesTable, check_order, refusal

K = OrderEventKind
QUEUE_MODELS = ("risk-averse", "none")
MOC, IOC, FOK = (OrderOption.MAKER_OR_CANCEL.value, OrderOption.IMMEDIATE_OR_CANCEL.value,
                 OrderOption.FILL_OR_KILL.value)
# Plain-str constants for the hot paths (dict keys and comparisons per record).
BID, ASK = BookSide.BID.value, BookSide.ASK.value
TAKER_BUY, TAKER_SELL = TakerSide.BUY.value, TakerSide.SELL.value


@dataclass(frozen=True)
class SimulatorConfig:
    fees: FeeSchedule = GEMINI_API_FEES
    queue: str = "risk-averse"  # or "none"
    latency_ms: int = 0  # an order reaches the exchange this long after it was sent
    cancel_latency_ms: int | None = None  # cancels; default latency_ms
    mode: str = ExecutionMode.PAPER.value  # OrderEvent.mode
    rules: RulesTable | None = None  # Gemini's symbol rules; None: no symbol rules

    def __post_init__(self) -> None:
        if self.queue not in QUEUE_MODELS:
            raise ValueError(f"unknown queue model {self.queue!r}: "
                             f"one of {', '.join(QUEUE_MODELS)}")
        if self.latency_ms < 0 or (self.cancel_latency_ms or 0) < 0:
            raise ValueError("latencies cannot be negative")

    @property
    def cancel_latency(self) -> int:
        return self.latency_ms if self.cancel_latency_ms is None else self.cancel_latency_ms


class _Resting:
    """An order at the exchange and its place in the queue."""

    __slots__ = ("order", "limit", "level", "ahead", "seq", "sort_key")

    def __init__(self, order: Order, level: str, ahead: Decimal, seq: int) -> None:
        self.order, self.level, self.ahead, self.seq = order, level, ahead, seq
        self.limit: Decimal = order.price  # type: ignore[assignment]
        # Best first: buys by highest price, sells by lowest; then time.
        self.sort_key = (-self.limit if order.side is Side.BUY else self.limit, seq)

    def __lt__(self, other: "_Resting") -> bool:
        return self.sort_key < other.sort_key


@dataclass
class _Pending:
    """A request on its way to the exchange."""

    arrival_us: int
    seq: int
    action: OrderAction
    symbol: str
    strategy_id: str
    order: Order | None = None  # NEW, REPLACE
    target: str | None = None  # CANCEL, REPLACE
    request_id: str | None = None
    reason: str = REQUESTED

    def __lt__(self, other: "_Pending") -> bool:
        return (self.arrival_us, self.seq) < (other.arrival_us, other.seq)


@dataclass
class _Symbol:
    """One symbol's orders at the exchange. ``levels`` and ``taken`` are per book side
    ("BID", "ASK"), by the level's canonical price text."""

    bids: list[_Resting] = field(default_factory=list)  # best first
    asks: list[_Resting] = field(default_factory=list)
    levels: dict[str, dict[str, list[_Resting]]] = field(
        default_factory=lambda: {BID: {}, ASK: {}})
    taken: dict[str, dict[str, Decimal]] = field(default_factory=lambda: {BID: {}, ASK: {}})
    seq: int = 0
    dirty: bool = False

    def side(self, side: Side) -> list[_Resting]:
        return self.bids if side is Side.BUY else self.asks

    @property
    def any_taken(self) -> bool:
        return bool(self.taken[BID] or self.taken[ASK])


class SimulatedExchange:
    """See the module doc. ``books`` is the caller's: symbol -> :class:`L2Book`."""

    def __init__(self, books: Mapping[str, L2Book], config: SimulatorConfig = SimulatorConfig()
                 ) -> None:
        self.books = books
        self.config = config
        self.mode = config.mode
        self._queue = config.queue != "none"
        self._latency_us = config.latency_ms * 1000
        self._cancel_latency_us = config.cancel_latency * 1000
        self._fees = config.fees
        self._rules = config.rules
        self._symbols: dict[str, _Symbol] = {}
        self._orders: dict[str, _Resting] = {}  # open at the exchange, by client_order_id
        self._owners: dict[str, str] = {}  # every order ever sent: client_order_id -> strategy
        self._pending: list[_Pending] = []  # heap by arrival
        self._in_flight: dict[str, _Pending] = {}  # NEW/REPLACE orders on their way, by id
        self._expiring: list[tuple[int, str]] = []  # heap of (expires_ms, client_order_id)
        #: Symbols with orders at the exchange or liquidity taken: the only ones market
        #: data can change anything for (callers may skip the others).
        self.active: set[str] = set()
        #: The engine calls :meth:`advance` once time reaches this (µs).
        self.next_due_us: float = float("inf")

    # ------------------------------------------------------------------ queries

    def open_orders(self, strategy_id: str | None = None, symbol: str | None = None
                    ) -> list[Order]:
        """Orders at the exchange or on their way, in arrival order."""
        found = [r.order for r in self._orders.values()] + \
            [p.order for p in self._in_flight.values() if p.order is not None]
        return [o for o in found if (strategy_id is None or o.strategy_id == strategy_id)
                and (symbol is None or o.symbol == symbol)]

    # ------------------------------------------------------------------ requests

    def submit(self, order: Order, now_us: int, immediate: bool = False) -> list[OrderEvent]:
        """A new order, sent at ``now_us``; ``immediate``: it reaches the exchange at once,
        whatever the latency (e.g. closing positions at the end of a backtest)."""
        self._owners[order.client_order_id] = order.strategy_id
        if not self._latency_us or immediate:
            return self._arrive_new(order, now_us)
        pending = self._push(_Pending(now_us + self._latency_us, 0, OrderAction.NEW,
                                      order.symbol, order.strategy_id, order=order))
        self._in_flight[order.client_order_id] = pending
        return []

    def cancel(self, symbol: str, target: str, strategy_id: str, now_us: int, *,
               request_id: str | None = None, reason: str = REQUESTED) -> list[OrderEvent]:
        if not self._cancel_latency_us:
            return self._arrive_cancel(symbol, target, strategy_id, now_us, request_id, reason)
        self._push(_Pending(now_us + self._cancel_latency_us, 0, OrderAction.CANCEL, symbol,
                            strategy_id, target=target, request_id=request_id, reason=reason))
        return []

    def cancel_all(self, now_us: int, *, strategy_id: str | None = None,
                   symbol: str | None = None, request_id: str | None = None,
                   reason: str = REQUESTED) -> list[OrderEvent]:
        """Cancel every open order at the exchange (of ``strategy_id``, in ``symbol``, where
        given). Without a strategy (the kill switch: the account's session) it is immediate."""
        if not self._cancel_latency_us or strategy_id is None:
            return self._arrive_cancel_all(symbol, strategy_id, now_us, request_id, reason)
        self._push(_Pending(now_us + self._cancel_latency_us, 0, OrderAction.CANCEL_ALL,
                            symbol or "", strategy_id, request_id=request_id, reason=reason))
        return []

    def replace(self, target: str, order: Order, now_us: int) -> list[OrderEvent]:
        """Cancel ``target``, then place ``order`` once the cancel is confirmed (Gemini has
        no amend); ``order``'s id is the replace request's."""
        self._owners[order.client_order_id] = order.strategy_id
        if not self._cancel_latency_us:
            return self._arrive_replace(target, order, now_us)
        pending = self._push(_Pending(now_us + self._cancel_latency_us, 0, OrderAction.REPLACE,
                                      order.symbol, order.strategy_id, order=order,
                                      target=target))
        self._in_flight[order.client_order_id] = pending
        return []

    def execute(self, request: Mapping[str, Any], now_us: int, *, price: Decimal | None = None,
                options: tuple[str, ...] | None = None, immediate: bool = False
                ) -> list[OrderEvent]:
        """Act on an ``OrderRequest`` sent at ``now_us``: the one way requests reach the
        simulator, for the order-book backtest and paper execution alike. ``price`` and
        ``options`` override a NEW request's (execution's MARKET as IOC at the band edge)."""
        action = request.get("action") or OrderAction.NEW.value
        cid, strategy = request["client_order_id"], request["strategy_id"]
        symbol = request["symbol"]
        if action == OrderAction.NEW.value:
            return self.submit(new_order(request, price=price, options=options), now_us,
                               immediate)
        if action == OrderAction.CANCEL.value:
            return self.cancel(symbol, request["target_client_order_id"], strategy, now_us,
                               request_id=cid)
        if action == OrderAction.CANCEL_ALL.value:
            return self.cancel_all(now_us, strategy_id=strategy, symbol=symbol, request_id=cid)
        if action == OrderAction.REPLACE.value:
            return self.replace(request["target_client_order_id"],
                                new_order(request, price=price, options=options), now_us)
        raise ValueError(f"unknown order action {action!r}")

    def advance(self, now_us: int) -> list[OrderEvent]:
        """Deliver the requests that have arrived by ``now_us`` and expire resting orders
        whose ``expires_ms`` has passed, in time order."""
        events: list[OrderEvent] = []
        pending, expiring = self._pending, self._expiring
        while True:
            arrival = pending[0].arrival_us if pending else None
            expiry = expiring[0][0] * 1000 if expiring else None
            if (arrival is None or arrival > now_us) and (expiry is None or expiry > now_us):
                break
            if arrival is not None and arrival <= now_us and (expiry is None or arrival <= expiry):
                events += self._deliver(heapq.heappop(pending))
                continue
            expires_ms, cid = heapq.heappop(expiring)
            resting = self._orders.get(cid)
            if resting is not None and resting.order.expires_ms == expires_ms:
                events += self._close(resting, K.EXPIRED, expires_ms, EXPIRED)
        self._set_due()
        return events

    # ------------------------------------------------------------------ market data

    def on_book(self, symbol: str, changes: Iterable[LevelChange] | None, now_us: int,
                top_changed: bool = True) -> list[OrderEvent] | None:
        """The caller applied an ``md.l2`` update to ``symbol``'s book: its ``changes``, or
        None for a snapshot (or a book that was dropped). Moves queues, forgets what we took
        from changed levels, and fills resting orders the book now reaches (only possible
        when the top of book moved, ``top_changed``, or taken liquidity came back)."""
        s = self._symbols.get(symbol)
        if s is None or not (s.bids or s.asks or s.any_taken):
            return None
        book = self.books.get(symbol)
        if book is None or not book.has_snapshot:
            return None  # a dropped book: nothing moves until the next snapshot
        if changes is None:
            if s.any_taken:
                s.taken = {BID: {}, ASK: {}}
                s.dirty = True
                self._check_active(symbol, s)
            self._requeue(s, book)
            top_changed = True
        else:
            taken, levels, queue, prices = s.taken, s.levels, self._queue, _PRICES
            for change in changes:
                side = change["side"]
                side_taken, side_levels = taken[side], levels[side]
                if not side_taken and not side_levels:
                    continue
                raw = change["price"]
                price = (prices.get(raw) or price_key(raw))[0]
                if side_taken and price in side_taken:
                    del side_taken[price]
                    s.dirty = top_changed = True
                    if not side_taken:
                        self._check_active(symbol, s)
                here = side_levels.get(price)
                if here and queue:
                    shown = Decimal(change["quantity"])
                    for resting in here:
                        if resting.ahead > shown:
                            resting.ahead = shown
                            s.dirty = True
        if not top_changed:
            return None
        return self._cross(symbol, s, book, now_us // 1000)

    def on_trade(self, trade: Mapping[str, Any], now_us: int) -> list[OrderEvent] | None:
        """A printed trade: moves the queue at its price and fills resting orders it reaches."""
        s = self._symbols.get(trade["symbol"])
        if s is None or trade.get("from_snapshot") or not (s.bids or s.asks):
            return None
        taker = trade["taker_side"]
        through: Callable[[Decimal, Decimal], bool]  # (resting limit, trade price)
        if taker == TAKER_BUY:
            resting_side, through = s.asks, (lambda limit, price: limit < price)
        elif taker == TAKER_SELL:
            resting_side, through = s.bids, (lambda limit, price: limit > price)
        else:
            return None
        if not resting_side:
            return None
        price = price_key(trade["price"])[1]
        quantity = Decimal(trade["quantity"])
        budget = quantity
        events: list[OrderEvent] = []
        when = now_us // 1000
        for resting in list(resting_side):
            if budget <= 0:
                break
            limit = resting.limit
            if through(limit, price):
                take = min(budget, resting.order.remaining)
            elif limit == price:
                if self._queue and resting.ahead:
                    resting.ahead -= quantity
                    s.dirty = True
                    if resting.ahead >= 0:
                        continue
                    excess, resting.ahead = -resting.ahead, ZERO
                else:
                    excess = quantity
                take = min(excess, budget, resting.order.remaining)
            else:
                break
            budget -= take
            events += self._fill_resting(s, resting, take, when)
        return events or None

    # ------------------------------------------------------------------ state

    def dirty_symbols(self) -> list[str]:
        """Symbols whose orders, queues or taken liquidity changed since :meth:`clean`."""
        return sorted(sym for sym, s in self._symbols.items() if s.dirty)

    def clean(self, symbol: str) -> None:
        s = self._symbols.get(symbol)
        if s is not None:
            s.dirty = False

    def dump(self, symbol: str) -> dict[str, Any]:
        """``symbol``'s orders (resting, then on their way), queues and taken liquidity,
        JSON-safe: the fields of a ``PaperState`` ORDERS record."""
        s = self._symbols.get(symbol) or _Symbol()
        resting = sorted((r for r in self._orders.values() if r.order.symbol == symbol),
                         key=lambda r: r.seq)
        orders = [_order_state(r.order, r.ahead, r.seq) for r in resting]
        orders += [_pending_state(p) for p in sorted(self._pending) if p.symbol == symbol]
        return {"orders": orders,
                "taken": [{"side": side, "price": price, "quantity": plain(qty)}
                          for side in (ASK, BID)
                          for price, qty in sorted(s.taken[side].items())]}

    def load(self, symbol: str, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`dump` returned, replacing ``symbol``'s orders."""
        for resting in [r for r in self._orders.values() if r.order.symbol == symbol]:
            self._unrest(resting)
        for p in [p for p in self._pending if p.symbol == symbol]:
            self._pending.remove(p)
            if p.order is not None:
                self._in_flight.pop(p.order.client_order_id, None)
        s = self._symbols[symbol] = _Symbol()
        for item in state.get("taken", ()):
            s.taken[item["side"]][item["price"]] = Decimal(item["quantity"])
        self._check_active(symbol, s)
        for item in state.get("orders", ()):
            action = OrderAction(item.get("action") or OrderAction.NEW)
            seq = int(item["seq"])
            s.seq = max(s.seq, seq)
            if item.get("arrival_us") is None:  # at the exchange
                order = _order_from_state(symbol, item)
                self._owners[order.client_order_id] = order.strategy_id
                self._rest(s, _Resting(order, price_key(order.price_text)[0],  # type: ignore[arg-type]
                                       Decimal(item["ahead"]), seq))
                continue
            pending = _Pending(int(item["arrival_us"]), seq, action, symbol, item["strategy_id"],
                               target=item.get("target"), reason=item.get("reason") or REQUESTED)
            if action in (OrderAction.NEW, OrderAction.REPLACE):
                pending.order = _order_from_state(symbol, item)
                self._owners[pending.order.client_order_id] = pending.order.strategy_id
                self._in_flight[pending.order.client_order_id] = pending
            else:
                pending.request_id = item["client_order_id"] or None
            self._pending.append(pending)
        heapq.heapify(self._pending)
        s.dirty = False
        self._set_due()

    def remember_owners(self, owners: Mapping[str, str]) -> None:
        """Orders sent before a restart (client_order_id -> strategy), so a late cancel of
        one is told apart from a cancel of an id never sent."""
        for cid, strategy in owners.items():
            self._owners.setdefault(cid, strategy)

    # ------------------------------------------------------------------ internals

    def _state(self, symbol: str) -> _Symbol:
        s = self._symbols.get(symbol)
        if s is None:
            s = self._symbols[symbol] = _Symbol()
        return s

    def _push(self, pending: _Pending) -> _Pending:
        s = self._state(pending.symbol) if pending.symbol else None
        if s is not None:
            s.seq += 1
            pending.seq = s.seq
            s.dirty = True
        heapq.heappush(self._pending, pending)
        self._set_due()
        return pending

    def _set_due(self) -> None:
        due = float("inf")
        if self._pending:
            due = self._pending[0].arrival_us
        if self._expiring:
            due = min(due, self._expiring[0][0] * 1000)
        self.next_due_us = due

    def _deliver(self, p: _Pending) -> list[OrderEvent]:
        if p.order is not None:
            self._in_flight.pop(p.order.client_order_id, None)
        if p.action is OrderAction.NEW:
            return self._arrive_new(p.order, p.arrival_us)  # type: ignore[arg-type]
        if p.action is OrderAction.CANCEL:
            return self._arrive_cancel(p.symbol, p.target, p.strategy_id,  # type: ignore[arg-type]
                                       p.arrival_us, p.request_id, p.reason)
        if p.action is OrderAction.REPLACE:
            return self._arrive_replace(p.target, p.order, p.arrival_us)  # type: ignore[arg-type]
        return self._arrive_cancel_all(p.symbol or None, p.strategy_id, p.arrival_us,
                                       p.request_id, p.reason)

    def _event(self, order: Order, kind: OrderEventKind, when: int, *,
               reason: str | None = None, fill: Fill | None = None,
               request_id: str | None = None) -> OrderEvent:
        order.step(kind)
        return order_event(order, kind, when, self.mode, reason=reason, fill=fill,
                           request_id=request_id)

    def _arrive_new(self, order: Order, now_us: int) -> list[OrderEvent]:
        when = now_us // 1000
        s = self._state(order.symbol)
        why = check_order(self._rules, symbol=order.symbol, order_type=order.order_type.value,
                          price=order.price, amount=order.amount, options=order.options,
                          client_order_id=order.client_order_id)
        refused = refusal(why) if why else None
        if refused is None and (order.option in (OrderOption.AUCTION_ONLY.value,
                                                 OrderOption.INDICATION_OF_INTEREST.value)
                                or (order.price is None and order.options)):
            refused = "UnsupportedOption"  # not simulated; a MARKET order takes no option
        if refused is None and order.expires_ms is not None and order.expires_ms <= when:
            refused = EXPIRED
        book = self.books.get(order.symbol)
        ready = book is not None and book.has_snapshot
        if refused is None and order.price is None and not ready:
            refused = NO_BOOK
        if refused is not None:
            return [self._event(order, K.REJECTED, when, reason=refused)]
        order.exchange_order_id = exchange_order_id(order.client_order_id)
        events = [self._event(order, K.ACCEPTED, when)]
        option = order.option
        # (the ignores: ready, and so reaches, holds only when book is not None)
        reaches = ready and (order.price is None or self._reaches(order, book))  # type: ignore[arg-type]
        plan = self._plan(s, order, book) if reaches else []  # type: ignore[arg-type]  # a quote below the touch: none
        if option == MOC and reaches:
            events.append(self._event(order, K.CANCELLED, when, reason=MOC_WOULD_TAKE))
            return events
        if option == FOK and sum((take for _, _, take in plan), ZERO) < order.amount:
            events.append(self._event(order, K.CANCELLED, when, reason=FOK_WOULD_NOT_FILL))
            return events
        opposite = order.side.opposite.book_side
        rates = self._fees
        taken = s.taken[opposite]
        for level, value, take in plan:
            taken[level] = taken.get(level, ZERO) + take
            s.dirty = True
            self.active.add(order.symbol)
            fill = Fill(value, take, Liquidity.TAKER, rates.fee(value * take, Liquidity.TAKER))
            kind = order.add_fill(fill)
            events.append(order_event(order, kind, when, self.mode, fill=fill))
        if not order.remaining:
            return events
        if order.price is None or option == IOC:
            events.append(self._event(order, K.CANCELLED, when, reason=IOC_WOULD_POST))
            return events
        level = price_key(order.price_text)[0]  # type: ignore[arg-type]
        ahead = ZERO
        if self._queue and ready:
            levels = book.bids if order.side is Side.BUY else book.asks  # type: ignore[union-attr]
            shown = levels.get(level)
            ahead = Decimal(shown) if shown is not None else ZERO
            for other in s.levels[order.side.book_side].get(level, ()):
                ahead += other.order.remaining
        s.seq += 1
        self._rest(s, _Resting(order, level, ahead, s.seq))
        events.append(self._event(order, K.BOOKED, when))
        return events

    def _arrive_cancel(self, symbol: str, target: str, strategy_id: str, now_us: int,
                       request_id: str | None, reason: str) -> list[OrderEvent]:
        when = now_us // 1000
        resting = self._orders.get(target)
        if resting is None:
            known = self._owners.get(target)
            if known is not None and known != strategy_id:
                why = NOT_OWNER
            elif known is None or target in self._in_flight:
                why = UNKNOWN_ORDER  # never sent, or not at the exchange yet
            else:
                why = ORDER_CLOSED  # filled, cancelled or expired before the cancel came
            return [self._cancel_rejected(symbol, target, strategy_id, when, why, request_id)]
        if resting.order.strategy_id != strategy_id:
            return [self._cancel_rejected(symbol, target, strategy_id, when, NOT_OWNER,
                                          request_id)]
        return self._close(resting, K.CANCELLED, when, reason, request_id)

    def _arrive_cancel_all(self, symbol: str | None, strategy_id: str | None, now_us: int,
                           request_id: str | None, reason: str) -> list[OrderEvent]:
        when = now_us // 1000
        events: list[OrderEvent] = []
        for resting in sorted(self._orders.values(), key=lambda r: (r.order.symbol, r.seq)):
            order = resting.order
            if (symbol is None or order.symbol == symbol) and \
                    (strategy_id is None or order.strategy_id == strategy_id):
                events += self._close(resting, K.CANCELLED, when, reason, request_id)
        return events

    def _arrive_replace(self, target: str, order: Order, now_us: int) -> list[OrderEvent]:
        events = self._arrive_cancel(order.symbol, target, order.strategy_id, now_us,
                                     order.client_order_id, REQUESTED)
        last = events[-1]
        if last["kind"] == K.CANCEL_REJECTED.value:
            events.append(self._event(order, K.REJECTED, now_us // 1000,
                                      reason=f"replace:{last['reason']}"))
            return events
        return events + self._arrive_new(order, now_us)

    def _cancel_rejected(self, symbol: str, target: str, strategy_id: str, when: int,
                         why: str, request_id: str | None) -> OrderEvent:
        resting = self._orders.get(target)
        if resting is not None and resting.order.strategy_id == strategy_id:
            stub = resting.order
        else:  # not this strategy's order: tell it nothing about the order
            stub = Order(target, strategy_id, symbol, Side.BUY, OrderType.LIMIT, None, ZERO,
                         amount_text="0")
        return order_event(stub, K.CANCEL_REJECTED, when, self.mode, reason=why,
                           request_id=request_id)

    def _plan(self, s: _Symbol, order: Order, book: L2Book) -> list[tuple[str, Decimal, Decimal]]:
        """(level, price, amount) the order can take now, best first."""
        buy = order.side is Side.BUY
        limit, left = order.price, order.remaining
        taken = s.taken[ASK if buy else BID]
        plan = []
        for level, quantity, value in _levels(book, buy, limit):
            available = Decimal(quantity) - taken.get(level, ZERO)
            if available <= 0:
                continue
            take = min(available, left)
            plan.append((level, value, take))
            left -= take
            if not left:
                break
        return plan

    @staticmethod
    def _reaches(order: Order, book: L2Book) -> bool:
        top = book.best_ask() if order.side is Side.BUY else book.best_bid()
        if top is None:
            return False
        value = price_key(top[0])[1]
        return value <= order.price if order.side is Side.BUY else value >= order.price  # type: ignore[operator]

    def _rest(self, s: _Symbol, resting: _Resting) -> None:
        order = resting.order
        insort(s.side(order.side), resting)
        s.levels[order.side.book_side].setdefault(resting.level, []).append(resting)
        self.active.add(order.symbol)
        self._orders[order.client_order_id] = resting
        s.dirty = True  # a new resting order is state to checkpoint like any change
        if order.expires_ms is not None:
            heapq.heappush(self._expiring, (order.expires_ms, order.client_order_id))
            self._set_due()

    def _unrest(self, resting: _Resting) -> None:
        order = resting.order
        s = self._symbols[order.symbol]
        s.side(order.side).remove(resting)
        side_levels = s.levels[order.side.book_side]
        here = side_levels[resting.level]
        here.remove(resting)
        if not here:
            del side_levels[resting.level]
        del self._orders[order.client_order_id]
        s.dirty = True
        self._check_active(order.symbol, s)

    def _check_active(self, symbol: str, s: _Symbol) -> None:
        if s.bids or s.asks or s.any_taken:
            self.active.add(symbol)
        else:
            self.active.discard(symbol)

    def _close(self, resting: _Resting, kind: OrderEventKind, when: int, reason: str,
               request_id: str | None = None) -> list[OrderEvent]:
        self._unrest(resting)
        return [self._event(resting.order, kind, when, reason=reason, request_id=request_id)]

    def _requeue(self, s: _Symbol, book: L2Book) -> None:
        """A new snapshot (or a dropped book): the queues are at most what the book shows."""
        if not self._queue:
            return
        for resting in s.bids + s.asks:
            levels = book.bids if resting.order.side is Side.BUY else book.asks
            shown = levels.get(resting.level)
            shown_qty = Decimal(shown) if shown is not None else ZERO
            if resting.ahead > shown_qty:
                resting.ahead = shown_qty
                s.dirty = True

    def _cross(self, symbol: str, s: _Symbol, book: L2Book, when: int) -> list[OrderEvent]:
        """Fill resting orders that the opposite side of the book now reaches."""
        events: list[OrderEvent] = []
        if s.bids:
            top = book.best_ask()
            if top is not None and price_key(top[0])[1] <= s.bids[0].limit:
                events += self._fill_crossed(s, s.bids, book, True, when)
        if s.asks:
            top = book.best_bid()
            if top is not None and price_key(top[0])[1] >= s.asks[0].limit:
                events += self._fill_crossed(s, s.asks, book, False, when)
        return events

    def _fill_crossed(self, s: _Symbol, resting_side: list[_Resting], book: L2Book, buy: bool,
                      when: int) -> list[OrderEvent]:
        taken = s.taken[ASK if buy else BID]
        events: list[OrderEvent] = []
        levels = _levels(book, buy, resting_side[0].limit)
        for resting in list(resting_side):
            limit = resting.limit
            got = False
            for level, quantity, value in levels:
                if value > limit if buy else value < limit:
                    break
                available = Decimal(quantity) - taken.get(level, ZERO)
                if available <= 0:
                    continue
                take = min(available, resting.order.remaining)
                taken[level] = taken.get(level, ZERO) + take
                resting.ahead = ZERO
                got = True
                events += self._fill_resting(s, resting, take, when)
                if resting.order.status is OrderStatus.FILLED:
                    break
            if not got or resting.order.is_open:
                break  # the book cannot fill this one (whole): none behind it either
        return events

    def _fill_resting(self, s: _Symbol, resting: _Resting, take: Decimal, when: int
                      ) -> list[OrderEvent]:
        order = resting.order
        price = resting.limit
        fill = Fill(price, take, Liquidity.MAKER, self._fees.fee(price * take, Liquidity.MAKER))
        kind = order.add_fill(fill)
        s.dirty = True
        if kind is K.FILLED:
            self._unrest(resting)
        return [order_event(order, kind, when, self.mode, fill=fill)]


def exchange_order_id(client_order_id: str) -> str:
    """The simulator's order id: derived from the client's, so it needs no counter and is
    the same after a restart (and in a backtest of the same orders)."""
    return "P" + hashlib.sha256(client_order_id.encode()).hexdigest()[:15]


def _levels(book: L2Book, buy: bool, limit: Decimal | None) -> list[tuple[str, str, Decimal]]:
    """(level, quantity, price) of the side a buy (sell) takes from, best first, up to
    ``limit``: the levels are filtered first and only those within the limit sorted."""
    levels = book.asks if buy else book.bids
    prices = _PRICES
    found = []
    for level, quantity in levels.items():
        value = (prices.get(level) or price_key(level))[1]
        if limit is None or (value <= limit if buy else value >= limit):
            found.append((level, quantity, value))
    found.sort(key=lambda item: item[2], reverse=not buy)
    return found


def _order_state(order: Order, ahead: Decimal, seq: int) -> dict[str, Any]:
    return {"client_order_id": order.client_order_id, "strategy_id": order.strategy_id,
            "side": order.side.value, "order_type": order.order_type.value,
            "price": order.price_text, "amount": order.amount_text,
            "options": list(order.options), "created_ms": order.created_ms,
            "expires_ms": order.expires_ms, "exchange_order_id": order.exchange_order_id,
            "status": order.status.value, "filled": plain(order.filled),
            # (the ignore: fees is never None here, every simulated fill has a fee)
            "notional": plain(order.notional), "fees": plain(order.fees),  # type: ignore[arg-type]
            "ahead": plain(ahead), "seq": seq, "action": OrderAction.NEW.value,
            "arrival_us": None, "target": None, "reason": None}


def _pending_state(p: _Pending) -> dict[str, Any]:
    """A request on its way: the order it carries (NEW, REPLACE), or for a cancel only its
    request id (as client_order_id), target and reason."""
    order = p.order or Order(p.request_id or "", p.strategy_id, p.symbol, Side.BUY,
                             OrderType.LIMIT, None, ZERO, amount_text="0")
    state = _order_state(order, ZERO, p.seq)
    state.update(action=p.action.value, arrival_us=p.arrival_us, target=p.target,
                 reason=p.reason)
    return state


def _order_from_state(symbol: str, item: Mapping[str, Any]) -> Order:
    price = item.get("price")
    order = Order(item["client_order_id"], item["strategy_id"], symbol, Side(item["side"]),
                  OrderType(item["order_type"]), Decimal(price) if price is not None else None,
                  Decimal(item["amount"]), tuple(item.get("options") or ()),
                  int(item["created_ms"]), item.get("expires_ms"), price_text=price,
                  amount_text=item["amount"], status=OrderStatus(item["status"]),
                  exchange_order_id=item.get("exchange_order_id"),
                  filled=Decimal(item["filled"]), notional=Decimal(item["notional"]),
                  fees=Decimal(item["fees"]))
    return order

