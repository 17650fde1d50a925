"""The seed's SMA crossover on bars."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from pipeline.core.decimals import plain
from pipeline.core.records import Bar
from pipeline.core.vocabulary import Side
from pipeline.trading.intents import OrderIntent
from pipeline.trading.strategy import Strategy


class Sma:
    """A simple moving average over the last ``n`` values, exact (Decimal)."""

    def __init__(self, n: int, values: list[Decimal] | None = None) -> None:
        self.n = n
        self.values: deque[Decimal] = deque(values or ())
        self.total = sum(self.values, Decimal(0))

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
    """Long when the fast SMA of closes crosses above the slow one, short (or flat, with
    ``allow_short=False``) when it crosses below. A crossover is backtesting.py's:
    fast[-2] < slow[-2] and fast[-1] > slow[-1]. On a cross the open position is closed
    first, then the new one opened, each as a market order.

    Sizing: ``amount`` (a fixed quantity), or ``fraction`` of the equity with
    ``amount=None``, which makes this backtesting.py's SmaCross example exactly:
    ``position.close(); self.buy()`` on an up-cross, ``position.close(); self.sell()`` on a
    down-cross, with ``fraction=FULL_EQUITY`` being its default ``buy()``/``sell()`` size.
    (The seed's own notes were long-only: ``allow_short=False``.) ``direction`` holds the
    side it is on (1, -1, 0). With an amount, a close undoes that amount; with a fraction
    it closes the position the fills made (see :meth:`Strategy.position`).
    """

    symbol: str = "BTCUSD"
    interval: str = "1h"
    fast: int = 10
    slow: int = 20
    amount: str | None = "0.01"
    allow_short: bool = True
    strategy_id: str = "sma-cross"
    fraction: str | None = None
    direction: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not 0 < self.fast < self.slow:
            raise ValueError(f"need 0 < fast < slow, got fast={self.fast} slow={self.slow}")
        if (self.amount is None) == (self.fraction is None):
            raise ValueError("give SmaCross exactly one of amount and fraction (for a fraction "
                             f"pass amount=None); got amount={self.amount!r}, "
                             f"fraction={self.fraction!r}")
        self.symbols = frozenset({self.symbol})
        self._fast, self._slow = Sma(self.fast), Sma(self.slow)
        self._previous: tuple[Decimal, Decimal] | None = None

    @property
    def warmup_bars(self) -> int:  # type: ignore[override]
        return self.slow - 1

    def on_bar(self, bar: Bar) -> list[OrderIntent]:
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
            return self._go(1)
        if previous[0] > previous[1] and fast < slow:
            return self._go(-1 if self.allow_short else 0)
        return []

    def _go(self, direction: int) -> list[OrderIntent]:
        intents = []
        if self.direction:  # close first, as backtesting.py's position.close()
            if self.fraction is not None:  # the fills decide how much: close the position
                intents.append(OrderIntent.close(self.symbol))
            else:  # a fixed amount: undo it
                undo = Side.SELL if self.direction > 0 else Side.BUY
                intents.append(OrderIntent(self.symbol, undo, self.amount))
        if direction:
            side = Side.BUY if direction > 0 else Side.SELL
            intents.append(OrderIntent(self.symbol, side, fraction=self.fraction)
                           if self.fraction is not None else
                           OrderIntent(self.symbol, side, self.amount))
        self.direction = direction
        return intents

    def save_state(self) -> dict[str, Any]:
        return {"direction": self.direction,
                "fast": [plain(v) for v in self._fast.values],
                "slow": [plain(v) for v in self._slow.values],
                "previous": None if self._previous is None else [plain(v) for v in self._previous]}

    def load_state(self, state: dict[str, Any], version: int) -> None:
        self.direction = int(state["direction"])
        self._fast = Sma(self.fast, [Decimal(v) for v in state["fast"]])
        self._slow = Sma(self.slow, [Decimal(v) for v in state["slow"]])
        previous = state["previous"]
        self._previous = None if previous is None else (Decimal(previous[0]), Decimal(previous[1]))
