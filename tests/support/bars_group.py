"""Helpers for the bars group's tests: generated trades, the group as a real process, and
reading Avro records back from topics."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Decoder, publish
from pipeline.ops.settings import REPO_ROOT
from tests.support.kafka_io import read_all

HOUR = 3_600_000


def generated_trades(n: int, symbols: list[str], start_ms: int, hours: float, seed: int = 7,
                     late_every: int = 0, late_by_ms: int = 120_000) -> list[dict]:
    """``n`` trades in exchange-time order over ``hours``, symbols interleaved, a random walk
    per symbol; with ``late_every``, every so many trades one comes ``late_by_ms`` late and
    one a second late. Ends with one trade per symbol two days later, which closes every
    earlier bar by event time alone."""
    rng = random.Random(seed)
    price = {s: 100 + 50 * i for i, s in enumerate(symbols)}
    step = hours * HOUR / n
    trades = []
    for i in range(n):
        symbol = symbols[rng.randrange(len(symbols))]
        price[symbol] = max(1, price[symbol] + rng.choice((-1, 0, 1)) * rng.randrange(1, 30))
        ts = start_ms + int(i * step)
        if late_every and i % late_every == late_every - 1:
            ts -= late_by_ms
        elif late_every and i % late_every == late_every // 2:
            ts -= 1_000
        trades.append(trade(symbol, 1_000_000 + i, ts, f"{price[symbol] / 100:.2f}",
                            f"{rng.randrange(1, 10**6) / 10**4:.4f}", rng.choice(("BUY", "SELL"))))
    end = start_ms + int(hours * HOUR) + 48 * HOUR
    trades += [trade(s, 9_000_000 + i, end, "1", "1", "BUY") for i, s in enumerate(symbols)]
    return trades


def trade(symbol: str, tid: int, ts: int, price: str, qty: str, side: str,
          snapshot: bool = False) -> dict:
    return {"symbol": symbol, "trade_id": tid, "price": price, "quantity": qty,
            "taker_side": side, "exchange_ts_ms": ts, "received_ts_us": ts * 1000,
            "connection_id": "gen", "sequence": tid, "from_snapshot": snapshot}


def produce_trades(kafka: str, registry_url: str, topic: str, trades: list[dict]) -> None:
    publish(kafka, registry_url, topic, trades)


def read_records(kafka: str, registry_url: str, topic: str, **kw) -> list[dict]:
    """Every record of ``topic`` (read_committed), decoded."""
    decode = Decoder(SchemaRegistry(registry_url))
    return [decode(r.value) for r in read_all(kafka, topic, **kw)]


class BarsProcess:
    """One ``python -m consumers.bars`` (or ``program``) process with its log file; with
    ``crash_at`` one that dies at that point of its protocol (``crashing``, e.g.
    tests/support/bars_crash.py)."""

    def __init__(self, kafka: str, registry_url: str, namespace: str, log_dir: Path,
                 *args: str, crash_at: tuple[str, int] | None = None,
                 program: str = "consumers.bars",
                 crashing: str = "tests.support.bars_crash") -> None:
        self.log = log_dir / f"{program.rpartition('.')[2]}-{time.monotonic_ns()}.log"
        module = [program] if crash_at is None else [crashing, crash_at[0], str(crash_at[1])]
        cmd = [sys.executable, "-m", *module, "--bootstrap", kafka, "--registry",
               registry_url, "--namespace", namespace, *args]
        self._log_file = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                     stderr=self._log_file, text=True)

    def log_text(self) -> str:
        return self.log.read_text()

    def assigned(self) -> bool:
        return " assigned " in self.log_text()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60) -> dict:
        """SIGTERM, wait, and return the runtime's stats the process printed."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=timeout)
        self._log_file.close()
        assert self.proc.returncode == 0, f"exit {self.proc.returncode}: {self.log_text()[-3000:]}"
        return json.loads(out.strip().splitlines()[-1])

    def wait_dead(self, timeout: float = 10) -> None:
        self.proc.wait(timeout)
        self._log_file.close()

    def ensure_dead(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if not self._log_file.closed:
            self._log_file.close()
