"""Progress and Ctrl-C for long runs (backtests, sweeps, replays, loads): one bar, one rule.

The bar goes to stderr (rich), so stdout stays the command's result; the first Ctrl-C asks
the run to stop at the next safe point and a second one aborts.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def progress_bar(show: bool, total: int, description: str,
                 unit: str = "events") -> Iterator[Callable[..., None]]:
    """Yields ``update(position, count=None)``: ``position`` of ``total`` done, ``count``
    items handled so far for the ``unit``/s rate (default: ``position``); with ETA. A
    no-op when ``show`` is false."""
    if not show:
        yield lambda position, count=None: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    began = time.monotonic()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total, rate="")

        def update(position: int, count: int | None = None) -> None:
            elapsed = time.monotonic() - began
            done = position if count is None else count
            rate = f"{done / elapsed:,.1f} {unit}/s" if elapsed > 0 else ""
            bar.update(task, completed=position, rate=rate)

        yield update


@contextmanager
def stop_on_ctrl_c() -> Iterator[threading.Event]:
    """An event the first Ctrl-C (SIGINT) sets, for the run to stop at a safe point; a
    second Ctrl-C raises KeyboardInterrupt. Outside the main thread: just the event."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
