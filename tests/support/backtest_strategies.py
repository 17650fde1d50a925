"""Strategies for backtest tests: one that raises on a chosen bar, one that presses Ctrl-C
mid-run, one that places scripted orders on book changes and records what it hears."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

from pipeline.strategy import OrderIntent, SmaCross, Strategy


class RaisesAt(Strategy):
    """Does nothing until the bar starting at ``start_ms``, then raises."""

    strategy_id = "raises-at"

    def __init__(self, start_ms: int) -> None:
        self.start_ms = start_ms

    def on_bar(self, bar: dict) -> list[OrderIntent]:
        if bar["start_ms"] == self.start_ms:
            raise ZeroDivisionError("unlucky bar")
        return []


@dataclass
class CtrlCAt(SmaCross):
    """SmaCross that sends this process SIGINT (a Ctrl-C) on its ``at``-th bar."""

    at: int = 100
    seen: int = field(default=0, init=False)

    def on_bar(self, bar: dict) -> list[OrderIntent]:
        self.seen += 1
        if self.seen == self.at:
            signal.raise_signal(signal.SIGINT)
        return super().on_bar(bar)


class Scripted(Strategy):
    """On its n-th ``on_book`` call places the intents ``script[n]`` (dicts of OrderIntent
    fields); records every order event and snapshot it is given."""

    strategy_id = "scripted"

    def __init__(self, script: dict[int, list[dict]]) -> None:
        self.script = {int(k): v for k, v in script.items()}
        self.calls = 0
        self.events: list[dict] = []
        self.snapshots: list[dict] = []

    def on_book(self, snapshot: dict) -> list[OrderIntent]:
        self.snapshots.append(snapshot)
        intents = [OrderIntent(**{"symbol": snapshot["symbol"], **spec})
                   for spec in self.script.get(self.calls, [])]
        self.calls += 1
        return intents

    def on_order_event(self, event: dict) -> None:
        self.events.append(event)
