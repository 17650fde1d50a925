"""Paper execution: the simulated exchange fed the full book (``md.l2``) and the trades
(``md.trades``), behind the execution client interface. Pure: no Kafka, no HTTP.

The books follow the one book policy (crossed books are dropped until the next snapshot),
so paper orders see the very books the ``orderbook`` group keeps. Orders rest, fill later
as makers, expire at their ``expires_ms`` and are cancelled by CANCEL and CANCEL_ALL
requests, exactly as in an order-book backtest: both run
:class:`~pipeline.trading.simulator.SimulatedExchange` and reach it through
:meth:`~pipeline.trading.simulator.SimulatedExchange.execute`. A MARKET request goes out
as an immediate-or-cancel limit at the price band's edge, as it would to Gemini.

**State for restarts** (``PaperState`` records, one book and one orders record per
symbol): :meth:`PaperExecution.order_states` gives the orders of the symbols that changed
(write them with the batch's events), :meth:`PaperExecution.book_states` the books touched
since the last call (every few seconds, and at once for a book never written). A restart
loads both and re-applies the ``md.l2`` records between the book's offset and the
committed one (:meth:`PaperExecution.replay_book`): orders change only in batches that
wrote them, so what comes back is the state at the last commit.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Mapping

from pipeline.core.records import L2Update, OrderEvent, OrderRequest
from pipeline.core.vocabulary import ExecutionMode, OrderOption, OrderType, PaperStateKind
from pipeline.market.book_policy import IGNORED, TOP_CHANGED, BookPolicy, Source
from pipeline.trading.risk import BookTop
from pipeline.trading.simulator import SimulatedExchange, SimulatorConfig

PAPER = "paper"  # the outcome remembered for a request acted on in paper mode
IOC = (OrderOption.IMMEDIATE_OR_CANCEL.value,)


class PaperExecution:
    """See the module doc. ``now_ms`` of every call is the execution group's clock."""

    mode = ExecutionMode.PAPER.value

    def __init__(self, config: SimulatorConfig = SimulatorConfig(), depth: int = 10) -> None:
        self.policy = BookPolicy(depth)
        self.exchange = SimulatedExchange(self.policy.books, config)
        self._touched: set[str] = set()  # books changed since book_states()
        self._written: set[str] = set()  # books ever written
        self._tops: dict[str, BookTop] = {}  # risk's view, until the book changes

    # -- market data

    def on_l2(self, update: L2Update, partition: int, offset: int, now_ms: int
              ) -> list[OrderEvent]:
        code, _ = self.policy.apply(update, partition, offset)
        symbol = update["symbol"]
        self._touched.add(symbol)
        self._tops.pop(symbol, None)
        if code == IGNORED:
            return []
        return self.exchange.on_book(symbol, None if update["snapshot"] else update["changes"],
                                     now_ms * 1000, code == TOP_CHANGED) or []

    def on_trade(self, trade: Mapping[str, Any], now_ms: int) -> list[OrderEvent]:
        return self.exchange.on_trade(trade, now_ms * 1000) or []

    def book(self, symbol: str) -> BookTop | None:
        """The top of ``symbol``'s book, stamped with the receive time of its last record."""
        top = self._tops.get(symbol)
        if top is not None:
            return top
        book = self.policy.books.get(symbol)
        if book is None or not book.has_snapshot:
            return None
        bids, asks = self.policy.top_levels(symbol)
        top = self._tops[symbol] = BookTop.from_snapshot({
            "symbol": symbol, "bids": bids, "asks": asks,
            "published_ts_us": self.policy.source(symbol).received_ts_us})
        return top

    # -- orders

    def place(self, request: OrderRequest, price: Decimal | None, now_ms: int,
              seen_ms: int | None = None) -> tuple[list[OrderEvent], str]:
        return self._execute(request, price, now_ms), PAPER

    def replace(self, request: OrderRequest, price: Decimal | None, now_ms: int
                ) -> tuple[list[OrderEvent], str]:
        return self._execute(request, price, now_ms), PAPER

    def cancel(self, request: OrderRequest, now_ms: int) -> tuple[list[OrderEvent], str]:
        return self.exchange.execute(request, now_ms * 1000), PAPER

    def cancel_all(self, request: OrderRequest | None, now_ms: int, reason: str
                   ) -> tuple[list[OrderEvent], str]:
        if request is None:
            return self.exchange.cancel_all(now_ms * 1000, reason=reason), PAPER
        return self.exchange.execute(request, now_ms * 1000), PAPER

    def cancel_strategy(self, strategy_id: str, now_ms: int, reason: str) -> list[OrderEvent]:
        return self.exchange.cancel_all(now_ms * 1000, strategy_id=strategy_id, reason=reason)

    def _execute(self, request: OrderRequest, price: Decimal | None, now_ms: int
                 ) -> list[OrderEvent]:
        as_limit = request["order_type"] == OrderType.MARKET and price is not None
        return self.exchange.execute(request, now_ms * 1000, price=price if as_limit else None,
                                     options=IOC if as_limit else None)

    def poll(self, now_ms: int) -> list[OrderEvent]:
        if now_ms * 1000 < self.exchange.next_due_us:
            return []
        return self.exchange.advance(now_ms * 1000)

    # -- state

    def order_states(self, now_us: int) -> list[dict[str, Any]]:
        """ORDERS records of the symbols whose orders, queues or taken liquidity changed."""
        out = []
        for symbol in self.exchange.dirty_symbols():
            source = self.policy.source(symbol)
            out.append({"symbol": symbol, "kind": PaperStateKind.ORDERS,
                        "source_partition": source.partition, "source_offset": source.offset,
                        "has_snapshot": False, "bids": [], "asks": [],
                        **self.exchange.dump(symbol), "written_ts_us": now_us})
            self.exchange.clean(symbol)
        return out

    def book_states(self, now_us: int, all_touched: bool) -> list[dict[str, Any]]:
        """BOOK records: of every book touched since the last call with ``all_touched``,
        else only of touched books never written."""
        due = sorted(s for s in self._touched if all_touched or s not in self._written)
        out = []
        for symbol in due:
            book, source = self.policy.books[symbol], self.policy.source(symbol)
            bids, asks = book.depth()
            out.append({"symbol": symbol, "kind": PaperStateKind.BOOK,
                        "source_partition": source.partition, "source_offset": source.offset,
                        "has_snapshot": book.has_snapshot,
                        "bids": [{"price": p, "quantity": q} for p, q in bids],
                        "asks": [{"price": p, "quantity": q} for p, q in asks], "orders": [],
                        "taken": [], "written_ts_us": now_us})
            self._touched.discard(symbol)
            self._written.add(symbol)
        return out

    def restore(self, state: Mapping[str, Any]) -> None:
        """Load one ``PaperState`` record."""
        symbol = state["symbol"]
        self._tops.pop(symbol, None)
        if state["kind"] == PaperStateKind.BOOK:
            self.policy.restore(symbol, state["bids"], state["asks"], state["has_snapshot"],
                                Source(state["source_partition"], state["source_offset"]))
            self._written.add(symbol)
        else:
            self.exchange.load(symbol, state)

    def replay_book(self, update: L2Update, partition: int, offset: int) -> None:
        """Re-apply a record already handled before a restart: the book only."""
        self.policy.apply(update, partition, offset)
        self._tops.pop(update["symbol"], None)

    def remember_owners(self, owners: Mapping[str, str]) -> None:
        self.exchange.remember_owners(owners)

    def open_orders(self) -> int:
        return len(self.exchange.open_orders())
