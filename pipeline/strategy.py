"""Strategy plug-ins: callbacks in, order intents out. No Kafka, no HTTP, no keys.

A strategy is a class with its own parameters and state. The live ``strategy`` group and
the backtest call the same callbacks with the same records (dicts shaped like the Avro
schemas: ``Bar``, ``BookSnapshot``, ``Trade``, ``OrderEvent``), so what was backtested is
what runs. Load one by name with :func:`load_strategy` (``"module:Class"``).
"""

from __future__ import annotations

import importlib
from collections import deque
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Iterable

from pipeline.errors import PipelineError

SIDES = ("BUY", "SELL")
ORDER_TYPES = ("LIMIT", "MARKET")
OPTIONS = ("maker-or-cancel", "immediate-or-cancel", "fill-or-kill", "auction-only",
           "indication-of-interest")


# backtesting.py's default ``buy()``/``sell()`` size: the float ``1 - 2**-52``, which it
# prints as ``.9999`` but which sizes with (all but a rounding error of) the whole equity.
FULL_EQUITY = "0.9999999999999998"


@dataclass(frozen=True)
class OrderIntent:
    """What a strategy wants; execution decides whether and how it reaches the market.

    The size is exactly one of:

    * ``amount``: a base-currency quantity (exact decimal string), what the live group sends;
    * ``fraction``: a fraction of the available equity in (0, 1], e.g. ``FULL_EQUITY``,
      turned into a quantity by the backtest's simulated broker when the order fills, in
      whole lots, as backtesting.py's ``buy(size=0.5)`` does;
    * ``close_position=True`` (see :meth:`close`): close the whole position in ``symbol``,
      as backtesting.py's ``position.close()``; the side is then the broker's to choose.

    The live ``strategy`` group sends concrete amounts only: it refuses ``fraction`` and
    ``close_position`` intents (a position and an equity are the backtest broker's
    knowledge, not the strategy group's).
    """

    symbol: str
    side: str | None
    amount: str | None = None  # base-currency quantity, exact decimal string
    order_type: str = "MARKET"
    price: str | None = None  # limit price, exact decimal string; None for MARKET
    options: tuple[str, ...] = ()
    fraction: str | None = None  # of the available equity, exact decimal string in (0, 1]
    close_position: bool = False

    def __post_init__(self) -> None:
        if self.close_position:
            if self.side is not None or self.amount is not None or self.fraction is not None:
                raise ValueError("a close_position intent has no side, amount or fraction")
            if self.order_type != "MARKET" or self.price is not None or self.options:
                raise ValueError("a close_position intent is a plain MARKET order")
            return
        if self.side not in SIDES:
            raise ValueError(f"side must be BUY or SELL, not {self.side!r}")
        if self.order_type not in ORDER_TYPES:
            raise ValueError(f"order_type must be LIMIT or MARKET, not {self.order_type!r}")
        if (self.amount is None) == (self.fraction is None):
            raise ValueError("give exactly one of amount and fraction "
                             f"(amount={self.amount!r}, fraction={self.fraction!r})")
        if self.amount is not None and Decimal(self.amount) <= 0:
            raise ValueError(f"amount must be positive, not {self.amount}")
        if self.fraction is not None and not 0 < Decimal(self.fraction) <= 1:
            raise ValueError(f"fraction must be in (0, 1], not {self.fraction}")
        if (self.order_type == "LIMIT") != (self.price is not None):
            raise ValueError("a LIMIT intent needs a price; a MARKET intent has none")
        if self.price is not None and Decimal(self.price) <= 0:
            raise ValueError(f"price must be positive, not {self.price}")
        unknown = [o for o in self.options if o not in OPTIONS]
        if unknown:
            raise ValueError(f"unknown order option(s) {unknown}: one of {OPTIONS}")

    @classmethod
    def close(cls, symbol: str) -> "OrderIntent":
        """Close the whole position in ``symbol`` at market (backtesting.py's
        ``position.close()``); nothing happens when there is none."""
        return cls(symbol, None, close_position=True)


class Strategy:
    """Override the callbacks you need; each returns the intents it wants placed.

    Keep all state in attributes: the live group saves them (pickled) with every batch
    and restores them after a restart, so they must be picklable.
    """

    strategy_id: str = "strategy"
    #: Bars of history the strategy needs before it can act (e.g. the slow SMA's window
    #: minus one). Only reports use it: buy & hold is measured from that bar's close, as
    #: backtesting.py measures it from the end of its indicators' warm-up.
    warmup_bars: int = 0

    def on_bar(self, bar: dict) -> Iterable[OrderIntent]:
        return ()

    def on_book(self, snapshot: dict) -> Iterable[OrderIntent]:
        return ()

    def on_trade(self, trade: dict) -> Iterable[OrderIntent]:
        return ()

    def on_order_event(self, event: dict) -> None:
        """Fills and rejections of this strategy's orders (feedback, e.g. inventory)."""


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


# --------------------------------------------------------------------------- shipped strategies


class _Sma:
    """A simple moving average over the last ``n`` values, exact (Decimal)."""

    def __init__(self, n: int) -> None:
        self.n, self.values, self.total = n, deque(), Decimal(0)

    def add(self, value: Decimal) -> Decimal | None:
        values = self.values
        values.append(value)
        total = self.total + value
        if len(values) > self.n:
            total -= values.popleft()
        self.total = total
        return total / self.n if len(values) == self.n else None


@dataclass
class SmaCross(Strategy):
    """The seed's SMA crossover: long when the fast SMA of closes crosses above the slow
    one, short (or flat, with ``allow_short=False``) when it crosses below. A crossover is
    backtesting.py's: fast[-2] < slow[-2] and fast[-1] > slow[-1]. On a cross the open
    position is closed first, then the new one opened, each as a market order.

    Sizing: ``amount`` (a fixed quantity, what the live group trades), or
    ``fraction`` of the equity with ``amount=None`` (backtests only), which makes this
    backtesting.py's SmaCross example exactly: ``position.close(); self.buy()`` on an
    up-cross, ``position.close(); self.sell()`` on a down-cross, with
    ``fraction=FULL_EQUITY`` being its default ``buy()``/``sell()`` size. (The seed's own
    notes were long-only, in at the up-cross and out at the down-cross:
    ``allow_short=False``.) With a fraction, ``position`` holds the direction (1, -1, 0):
    the size is the broker's to decide.
    """

    symbol: str = "BTCUSD"
    interval: str = "1h"
    fast: int = 10
    slow: int = 20
    amount: str | None = "0.01"
    allow_short: bool = True
    strategy_id: str = "sma-cross"
    fraction: str | None = None
    position: Decimal = field(default=Decimal(0), init=False)

    def __post_init__(self) -> None:
        if not 0 < self.fast < self.slow:
            raise ValueError(f"need 0 < fast < slow, got fast={self.fast} slow={self.slow}")
        if (self.amount is None) == (self.fraction is None):
            raise ValueError("give SmaCross exactly one of amount and fraction (for a fraction "
                             f"pass amount=None); got amount={self.amount!r}, "
                             f"fraction={self.fraction!r}")
        self._fast, self._slow = _Sma(self.fast), _Sma(self.slow)
        self._previous: tuple[Decimal, Decimal] | None = None

    @property
    def warmup_bars(self) -> int:  # type: ignore[override]
        return self.slow - 1

    def on_bar(self, bar: dict) -> list[OrderIntent]:
        if bar["symbol"] != self.symbol or bar["interval"] != self.interval:
            return []
        close = Decimal(bar["close"])
        fast, slow = self._fast.add(close), self._slow.add(close)
        if fast is None or slow is None:
            return []
        previous, self._previous = self._previous, (fast, slow)
        if previous is None:
            return []
        if previous[0] < previous[1] and fast > slow:
            return self._go(Decimal(1))
        if previous[0] > previous[1] and fast < slow:
            return self._go(Decimal(-1) if self.allow_short else Decimal(0))
        return []

    def _go(self, direction: Decimal) -> list[OrderIntent]:
        intents = []
        if self.fraction is not None:
            if self.position:
                intents.append(OrderIntent.close(self.symbol))
            if direction:
                intents.append(OrderIntent(self.symbol, "BUY" if direction > 0 else "SELL",
                                           fraction=self.fraction))
            self.position = direction
            return intents
        if self.position:  # close first, as backtesting.py's position.close()
            side = "SELL" if self.position > 0 else "BUY"
            intents.append(OrderIntent(self.symbol, side, str(abs(self.position))))
        if direction:
            intents.append(OrderIntent(self.symbol, "BUY" if direction > 0 else "SELL",
                                       self.amount))
        self.position = direction * Decimal(self.amount)
        return intents


@dataclass
class MidQuoter(Strategy):
    """A book-driven example: quote both sides ``spread_bps`` around the mid as
    maker-or-cancel limits, requote when the mid moves ``requote_bps``, and stop quoting
    the side that would push inventory past ``max_inventory``."""

    symbol: str = "BTCUSD"
    spread_bps: int = 10
    requote_bps: int = 5
    amount: str = "0.001"
    max_inventory: str = "0.01"
    tick: str = "0.01"
    strategy_id: str = "mid-quoter"
    inventory: Decimal = field(default=Decimal(0), init=False)

    def __post_init__(self) -> None:
        self._last_mid: Decimal | None = None
        self._filled: dict[str, Decimal] = {}  # client_order_id -> filled so far

    def on_book(self, snapshot: dict) -> list[OrderIntent]:
        if snapshot["symbol"] != self.symbol or not snapshot["bids"] or not snapshot["asks"]:
            return []
        mid = (Decimal(snapshot["bids"][0]["price"]) + Decimal(snapshot["asks"][0]["price"])) / 2
        if self._last_mid is not None and \
                abs(mid - self._last_mid) * 10_000 < self.requote_bps * self._last_mid:
            return []
        self._last_mid = mid
        tick, half = Decimal(self.tick), mid * self.spread_bps / 20_000
        amount, limit = Decimal(self.amount), Decimal(self.max_inventory)
        intents = []
        if self.inventory + amount <= limit:
            bid = ((mid - half) / tick).to_integral_value(rounding="ROUND_FLOOR") * tick
            intents.append(OrderIntent(self.symbol, "BUY", self.amount, "LIMIT", str(bid),
                                       ("maker-or-cancel",)))
        if self.inventory - amount >= -limit:
            ask = ((mid + half) / tick).to_integral_value(rounding="ROUND_CEILING") * tick
            intents.append(OrderIntent(self.symbol, "SELL", self.amount, "LIMIT", str(ask),
                                       ("maker-or-cancel",)))
        return intents

    def on_order_event(self, event: dict) -> None:
        if event["symbol"] != self.symbol or event["kind"] not in ("FILLED", "PARTIALLY_FILLED"):
            return
        total = Decimal(event["filled_amount"])  # cumulative per order
        new = total - self._filled.get(event["client_order_id"], Decimal(0))
        self._filled[event["client_order_id"]] = total
        self.inventory += new if event["side"].lower() == "buy" else -new
