"""Gemini's private rate limit, one budget per API key, shared by every process using it.

Gemini allows 600 private requests a minute per key and recommends at most 5 a second
(developer.gemini.com/rate-limit); beyond that it queues five, then answers 429. Several
execution instances on one key must therefore draw from one budget, not one each:
:class:`SharedTokenBucket` keeps the bucket's state in a file beside the key's nonce file,
updated under an ``fcntl`` lock, so every process on the machine that shares the file
shares the budget. :class:`TokenBucket` is the same rule in memory, for one process.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Callable

from pipeline.core.errors import PipelineError


def _check(rate: float, burst: int) -> None:
    if rate <= 0 or burst < 1:
        raise PipelineError("the Gemini rate limit needs rate > 0 and burst >= 1")


def _refill(tokens: float, at: float, now: float, rate: float, burst: int) -> float:
    return min(float(burst), tokens + max(0.0, now - at) * rate)


class TokenBucket:
    """``rate`` calls per second sustained, bursts of ``burst``; ``take`` blocks."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        _check(rate, burst)
        self.rate, self.burst, self.clock, self.sleep = rate, burst, clock, sleep
        self.tokens = float(burst)
        self.at = clock()

    def take(self) -> None:
        self._refill()
        if self.tokens < 1:
            self.sleep((1 - self.tokens) / self.rate)
            self._refill()
        self.tokens -= 1

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = _refill(self.tokens, self.at, now, self.rate, self.burst)
        self.at = now


class SharedTokenBucket:
    """A token bucket whose state (tokens, time) lives in ``path``, shared across processes.

    The clock is the wall clock (``time.time``), the one clock every process agrees on. A
    ``take`` that finds no token reserves one (the count goes negative) and sleeps outside
    the lock until it is due, so waiting processes are served in the order they asked.
    """

    def __init__(self, path: str | Path, rate: float, burst: int,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        _check(rate, burst)
        self.path = Path(path)
        self.rate, self.burst, self.clock, self.sleep = rate, burst, clock, sleep

    def take(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            now = self.clock()
            tokens, at = self._read(fd, now)
            tokens = _refill(tokens, at, now, self.rate, self.burst) - 1
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, f"{tokens!r} {now!r}\n".encode("ascii"))
        finally:
            os.close(fd)  # closing releases the lock
        if tokens < 0:
            self.sleep(-tokens / self.rate)

    def _read(self, fd: int, now: float) -> tuple[float, float]:
        text = os.read(fd, 200).decode("ascii", errors="replace").split()
        try:
            tokens, at = float(text[0]), float(text[1])
        except (IndexError, ValueError):
            return float(self.burst), now  # a new (or unreadable) file starts full
        return max(-float(self.burst) * 10, tokens), min(at, now)
