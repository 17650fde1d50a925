"""Strategies for tests: one slowed down so a process can be killed mid-run, one that raises."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipeline.strategy import OrderIntent, SmaCross, Strategy


@dataclass
class SlowSmaCross(SmaCross):
    delay_ms: float = 2.0

    def on_bar(self, bar: dict) -> list[OrderIntent]:
        time.sleep(self.delay_ms / 1000)
        return super().on_bar(bar)


class Exploding(Strategy):
    """Buys on every bar, and raises on a close of 13."""

    strategy_id = "exploding"

    def on_bar(self, bar: dict) -> list[OrderIntent]:
        if bar["close"] == "13":
            raise ZeroDivisionError("unlucky close")
        return [OrderIntent(bar["symbol"], "BUY", "1")]
