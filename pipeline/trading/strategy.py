"""The strategy plug-in API: callbacks in, intents out. No Kafka, no HTTP, no keys.

A strategy is a class with its own parameters and state. The live ``strategy`` group and
the backtest call the same callbacks with the same typed records (``Bar``,
``BookSnapshot``, ``Trade``, ``OrderEvent``: :mod:`pipeline.core.records`), show it the
same view of its own orders (:meth:`Strategy.open_orders`, :meth:`Strategy.position`,
:meth:`Strategy.equity`, folded by :class:`~pipeline.trading.tracker.OrderTracker`), and
call :meth:`Strategy.on_timer` every ``timer_interval_ms`` (event time in backtests, wall
time live). Load one by name with :func:`load_strategy` (``"module:Class"``).

State is saved explicitly: the live group stores what :meth:`Strategy.save_state` returns
(JSON-safe values) with ``state_version`` after every batch and hands it back to
:meth:`Strategy.load_state` after a restart. Nothing is pickled.
"""

from __future__ import annotations

import importlib
from decimal import Decimal
from typing import Any, Iterable

from pipeline.core.errors import PipelineError
from pipeline.core.records import Bar, BookSnapshot, OrderEvent, Trade
from pipeline.trading.intents import (  # noqa: F401
    FULL_EQUITY,
    CancelAllIntent,
    CancelIntent,
    Intent,
    OrderIntent,
    ReplaceIntent,
)
from pipeline.trading.tracker import OpenOrder, OrderTracker


class Strategy:
    """Override the callbacks you need; each returns the intents it wants sent."""

    strategy_id: str = "strategy"
    #: Bars of history the strategy needs before it can act (e.g. the slow SMA's window
    #: minus one). Only reports use it: buy & hold is measured from that bar's close, as
    #: backtesting.py measures it from the end of its indicators' warm-up.
    warmup_bars: int = 0
    #: Call :meth:`on_timer` this often (ms); None: never.
    timer_interval_ms: int | None = None
    #: Requests expire this long after they are sent: execution refuses them later, and a
    #: resting order is cancelled (EXPIRED) then.
    order_ttl_ms: int = 30_000
    #: Given to :meth:`load_state` with the saved state: bump it when the state's shape
    #: changes and convert old shapes there.
    state_version: int = 1
    #: The symbols whose market data the strategy is given (book snapshots, bars, trades);
    #: None: every symbol. A backtest still keeps every book, it only skips the callbacks.
    symbols: frozenset[str] | None = None

    # -- callbacks

    def on_bar(self, bar: Bar) -> Iterable[Intent]:
        return ()

    def on_book(self, snapshot: BookSnapshot) -> Iterable[Intent]:
        return ()

    def on_trade(self, trade: Trade) -> Iterable[Intent]:
        return ()

    def on_order_event(self, event: OrderEvent) -> Iterable[Intent] | None:
        """Every step of this strategy's orders (the view is already updated by it)."""
        return None

    def on_timer(self, now_ms: int) -> Iterable[Intent]:
        return ()

    # -- what the strategy sees of its own orders

    @property
    def tracker(self) -> OrderTracker:
        """The view the runner keeps (a fresh one when the strategy runs alone)."""
        tracker = self.__dict__.get("_tracker")
        if tracker is None:
            tracker = self.__dict__["_tracker"] = OrderTracker(self.strategy_id)
        return tracker

    def attach(self, tracker: OrderTracker) -> None:
        self.__dict__["_tracker"] = tracker

    def open_orders(self, symbol: str | None = None) -> list[OpenOrder]:
        """Orders sent and not closed yet (also those still on their way)."""
        return self.tracker.open_orders(symbol)

    def position(self, symbol: str) -> Decimal:
        """The position in ``symbol`` from this strategy's own fills (base currency)."""
        return self.tracker.position(symbol)

    def equity(self) -> Decimal | None:
        """Cash plus positions at the latest marks; None without capital or marks."""
        return self.tracker.equity()

    # -- intents

    @staticmethod
    def cancel(client_order_id: str) -> CancelIntent:
        return CancelIntent(client_order_id)

    @staticmethod
    def cancel_all(symbol: str | None = None) -> CancelAllIntent:
        return CancelAllIntent(symbol)

    @staticmethod
    def replace(client_order_id: str, price: str | None = None,
                amount: str | None = None) -> ReplaceIntent:
        return ReplaceIntent(client_order_id, price, amount)

    # -- state

    def save_state(self) -> dict[str, Any]:
        """Everything a restart needs, as JSON-safe values (str, int, float, bool, None,
        lists, dicts); decimals as strings. The default: nothing."""
        return {}

    def load_state(self, state: dict[str, Any], version: int) -> None:
        """Restore what :meth:`save_state` returned (``version`` is the ``state_version``
        it was saved with). Raise when it cannot be restored: the group then refuses to
        start rather than trade from an empty state."""
        if state:
            raise ValueError(f"{type(self).__name__} saved state but does not override "
                             "load_state()")


def load_strategy(spec: str, params: dict[str, Any] | None = None) -> Strategy:
    """Instantiate ``"module:Class"`` with ``params``; one clear error when it fails."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise PipelineError(f"strategy {spec!r} must be written module:Class")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise PipelineError(f"cannot load strategy {spec!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise PipelineError(f"{spec} is not a Strategy subclass")
    try:
        return cls(**(params or {}))
    except TypeError as exc:
        raise PipelineError(f"strategy {spec} does not take these parameters: {exc}") from None
