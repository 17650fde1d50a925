"""The dashboard's views, folded from records: pure, no Kafka, no HTTP.

Each ``on_*`` method takes one decoded record of a catalog topic; each ``*_view`` returns
JSON-safe values for a page. A version per view lets the server push a page only when
what it shows changed. Memory is bounded: the newest N bars, trades, health events, fills
and rejections are kept, and an order is dropped once it is done.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from pipeline.core.vocabulary import FILL_KINDS, TERMINAL_KINDS, OrderEventKind

K = OrderEventKind
OPEN_KINDS = frozenset({K.ACCEPTED, K.BOOKED, K.PARTIALLY_FILLED, K.UNKNOWN})
DONE_KINDS = TERMINAL_KINDS
REJECT_KINDS = frozenset({K.REJECTED, K.CANCEL_REJECTED})


@dataclass
class Limits:
    bars: int = 500  # per symbol, of the chart's interval
    trades: int = 500  # per symbol
    health: int = 50  # per symbol
    fills: int = 200
    rejections: int = 200
    equity_points: int = 2000  # per strategy


@dataclass
class SymbolState:
    book: dict[str, Any] | None = None
    bars: dict[int, dict[str, Any]] = field(default_factory=dict)  # start_ms -> bar
    trades: deque[dict[str, Any]] = field(default_factory=deque)
    health: deque[dict[str, Any]] = field(default_factory=deque)


def _float(text: str | None) -> float | None:
    return None if text is None else float(text)


def depth_curve(levels: list[dict[str, str]]) -> dict[str, list[float]]:
    """Cumulative quantity by price from the best level outwards: the depth chart's line."""
    prices, cumulative, total = [], [], Decimal(0)
    for level in levels:
        total += Decimal(level["quantity"])
        prices.append(float(level["price"]))
        cumulative.append(float(total))
    return {"price": prices, "cumulative": cumulative}


class Dashboard:
    """Everything the pages show, for the symbols of one namespace."""

    def __init__(self, symbols: list[str], bar_interval: str = "1m",
                 limits: Limits | None = None) -> None:
        self.symbols = [s.upper() for s in symbols]
        self.bar_interval = bar_interval
        self.limits = limits or Limits()
        self._symbols = {s: SymbolState() for s in self.symbols}
        self.orders: dict[str, dict[str, Any]] = {}  # open ones, by client_order_id
        self.fills: deque[dict[str, Any]] = deque(maxlen=self.limits.fills)
        self.rejections: deque[dict[str, Any]] = deque(maxlen=self.limits.rejections)
        self.pnl: dict[str, dict[str, Any]] = {}
        self.equity: dict[str, deque[tuple[int, float]]] = {}
        self.positions: dict[tuple[str, str], dict[str, Any]] = {}
        self.counts: dict[str, int] = {}  # event kind -> orders.events seen
        self.versions: dict[str, int] = {"trading": 0, **{s: 0 for s in self.symbols}}
        self.newest_ms: dict[str, int] = {}  # view -> newest record time it holds (latency)

    def knows(self, symbol: str) -> bool:
        return symbol.upper() in self._symbols

    def _touch(self, view: str, ms: int | None) -> None:
        self.versions[view] = self.versions.get(view, 0) + 1
        if ms is not None:
            self.newest_ms[view] = max(self.newest_ms.get(view, 0), ms)

    def _symbol(self, record: dict[str, Any]) -> SymbolState | None:
        return self._symbols.get(str(record.get("symbol", "")).upper())

    # -- market data

    def on_book(self, record: dict[str, Any]) -> None:
        state = self._symbol(record)
        if state is None:
            return
        state.book = record
        self._touch(record["symbol"], record["published_ts_us"] // 1000)

    def on_bar(self, record: dict[str, Any]) -> None:
        state = self._symbol(record)
        if state is None or record["interval"] != self.bar_interval:
            return
        state.bars[record["start_ms"]] = record
        while len(state.bars) > self.limits.bars:
            del state.bars[min(state.bars)]
        self._touch(record["symbol"], record["end_ms"])

    def on_trade(self, record: dict[str, Any]) -> None:
        state = self._symbol(record)
        if state is None:
            return
        state.trades.append({"ms": record["exchange_ts_ms"], "price": record["price"],
                             "quantity": record["quantity"], "side": record["taker_side"]})
        while len(state.trades) > self.limits.trades:
            state.trades.popleft()
        self._touch(record["symbol"], record["exchange_ts_ms"])

    def on_health(self, record: dict[str, Any]) -> None:
        state = self._symbol(record)
        if state is None:
            return
        state.health.append({"ms": record["detected_ts_us"] // 1000, "kind": record["kind"],
                             "detail": record["detail"]})
        while len(state.health) > self.limits.health:
            state.health.popleft()
        self._touch(record["symbol"], record["detected_ts_us"] // 1000)

    # -- trading

    def on_order_event(self, event: dict[str, Any]) -> None:
        kind, order_id = event["kind"], event["client_order_id"]
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if kind in FILL_KINDS and event.get("last_fill_amount"):
            self.fills.append({k: event.get(k) for k in (
                "event_ms", "strategy_id", "symbol", "side", "client_order_id",
                "last_fill_price", "last_fill_amount", "last_fill_fee", "fee_currency",
                "liquidity", "mode")})
        if kind in REJECT_KINDS:
            self.rejections.append({k: event.get(k) for k in (
                "event_ms", "strategy_id", "symbol", "side", "client_order_id", "kind",
                "reason", "price", "amount")})
        if kind in DONE_KINDS:
            self.orders.pop(order_id, None)
        elif kind in OPEN_KINDS:
            self.orders[order_id] = {k: event.get(k) for k in (
                "client_order_id", "strategy_id", "symbol", "side", "price", "amount",
                "filled_amount", "kind", "event_ms", "exchange_order_id", "mode")}
        self._touch("trading", event["event_ms"])

    def on_pnl(self, record: dict[str, Any]) -> None:
        strategy = record["strategy_id"]
        self.pnl[strategy] = record
        if record.get("equity") is not None:
            curve = self.equity.setdefault(strategy, deque(maxlen=self.limits.equity_points))
            curve.append((record["event_ms"], float(record["equity"])))
        self._touch("trading", record["event_ms"])

    def on_position(self, record: dict[str, Any]) -> None:
        self.positions[(record["strategy_id"], record["symbol"])] = record
        self._touch("trading", record["updated_ms"])

    # -- views

    def symbol_view(self, symbol: str) -> dict[str, Any]:
        symbol = symbol.upper()
        state = self._symbols[symbol]
        book = state.book
        bars = [state.bars[k] for k in sorted(state.bars)]
        top = None
        if book is not None:
            bid = book["bids"][0] if book["bids"] else None
            ask = book["asks"][0] if book["asks"] else None
            top = {"bid": bid, "ask": ask, "published_ms": book["published_ts_us"] // 1000,
                   "spread": (str(Decimal(ask["price"]) - Decimal(bid["price"]))
                              if bid and ask else None)}
        return {
            "symbol": symbol, "version": self.versions[symbol],
            "newest_ms": self.newest_ms.get(symbol),
            "top": top,
            "depth": None if book is None else {"bids": depth_curve(book["bids"]),
                                                "asks": depth_curve(book["asks"])},
            "candles": {"interval": self.bar_interval,
                        "start_ms": [b["start_ms"] for b in bars],
                        "open": [float(b["open"]) for b in bars],
                        "high": [float(b["high"]) for b in bars],
                        "low": [float(b["low"]) for b in bars],
                        "close": [float(b["close"]) for b in bars],
                        "volume": [float(b["volume"]) for b in bars]},
            "trades": {"ms": [t["ms"] for t in state.trades],
                       "price": [float(t["price"]) for t in state.trades],
                       "quantity": [t["quantity"] for t in state.trades],
                       "side": [t["side"] for t in state.trades]},
            "health": list(state.health)[::-1],
        }

    def trading_view(self) -> dict[str, Any]:
        orders = sorted(self.orders.values(), key=lambda o: o["event_ms"], reverse=True)
        strategies = {}
        for strategy, record in sorted(self.pnl.items()):
            curve = self.equity.get(strategy, deque())
            strategies[strategy] = {
                "pnl": {k: record.get(k) for k in (
                    "currency", "capital", "equity", "realized_pnl", "unrealized_pnl", "fees",
                    "drawdown", "drawdown_pct", "daily_pnl", "exposure", "fills", "halted",
                    "stale", "event_ms")},
                "equity": {"ms": [p[0] for p in curve], "value": [p[1] for p in curve]}}
        positions = [{k: p.get(k) for k in ("strategy_id", "symbol", "quantity", "average_entry",
                                             "realized_pnl", "unrealized_pnl", "mark",
                                             "currency", "fills")}
                     for _, p in sorted(self.positions.items())]
        return {"version": self.versions["trading"], "newest_ms": self.newest_ms.get("trading"),
                "open_orders": orders, "fills": list(self.fills)[::-1],
                "rejections": list(self.rejections)[::-1], "counts": dict(sorted(
                    self.counts.items())), "strategies": strategies, "positions": positions}
