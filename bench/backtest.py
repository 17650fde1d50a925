"""Backtest throughput, end to end from Kafka.

* **bars**: the hourly BTCUSD file (32,842 bars) loaded into a bars topic, backtested
  with SmaCross 10/20 sized by equity (backtesting.py's example), market orders at the
  next open: Kafka read + decode + merge + strategy + broker + statistics, next to
  backtesting.py's ``Backtest.run`` on the same bars already in memory (its statistics
  included). Target: faster.
  A second figure puts ``pandas.read_csv`` of the file in backtesting.py's time too
  (both then start from stored data). The same backtest from the Parquet archive
  (``--source archive``: columns read + merge + strategy + broker + statistics) is a third.
* **L2**: ``events`` L2Update records (the venue's generator, and the real capture
  repeated) replayed through the book policy into MidQuoter (its defaults), its quotes
  resting in the simulated exchange (queue model on, replaced as the mid moves), in level
  changes per second, next to a plain consume + decode of the same records. MidQuoter
  reads only the top of the book, so it is given depth-1 snapshots (``book_depth=1``).
  Target: >= 500,000 changes/s. The same backtest from the archive is beside it.

Each figure is the best of three runs after an untimed warm-up.
"""

from __future__ import annotations

import itertools
import json
import time
import warnings
from pathlib import Path

from bench.consume import produce_l2
from bench.figures import Figure, runs
from pipeline.backtest.config import BacktestConfig
from pipeline.backtest.run import gc_tuned, run_backtest
from pipeline.core.cluster import Cluster
from pipeline.kafka.catalog import Namespace, split_topic
from pipeline.replay.source import ReplaySource
from pipeline.strategy import FULL_EQUITY
from pipeline.venue.market import generated_events

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CSV = DATA / "BTCUSD_GEMINI_1h.csv"
CAPTURE = DATA / "gemini_v2_l2_capture_2021-06-24.txt"
SMA = {"fast": 10, "slow": 20, "amount": None, "fraction": FULL_EQUITY}


def _best(fn, repeats: int = 3) -> tuple[float, object]:
    if runs(repeats) > 1:
        fn()  # warm-up: imports, compiled readers, a cold broker
    best, result = float("inf"), None
    for _ in range(runs(repeats)):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _archive(bootstrap: str, registry_url: str, namespace: Namespace) -> Path:
    """The namespace's topics archived to Parquet by the archive group (a temporary root)."""
    import tempfile

    from consumers.archive import group_config
    from pipeline.kafka.catalog import ensure_topics
    from pipeline.runtime.runner import GroupRunner

    ensure_topics(bootstrap, namespace, ["md.l2", "md.trades", "bars", "dlq"])
    root = Path(tempfile.mkdtemp(prefix="bench-archive-"))
    GroupRunner(group_config(bootstrap, registry_url, str(namespace), root=root,
                           roll_records=1_000_000, roll_seconds=3600, fsync=False),
                bootstrap).run(idle_timeout_s=3)
    return root


def bars(bootstrap: str, registry_url: str) -> list[Figure]:
    if not CSV.exists():
        print(f"bench: {CSV} is absent: no backtest bars figures")
        return []
    from producers.csv_bars import load_csv_bars

    namespace = Namespace(f"sim-benchbt{int(time.time())}")
    loaded = load_csv_bars(CSV, bootstrap, registry_url, namespace).published
    cluster = Cluster(bootstrap, registry_url)
    config = BacktestConfig("pipeline.strategy:SmaCross", namespace, SMA, cash="1000000",
                            commission="0.002")
    ours, result = _best(lambda: run_backtest(config, cluster, progress=False))
    assert result.engine.events == loaded
    try:
        reference = _reference()
    except ImportError:
        print("bench: backtesting.py is not installed (pip install -e '.[test]'): "
              "no backtest bars figure")
        return []
    theirs, stats = _best(reference)
    assert stats["# Trades"] == len(result.engine.trades)
    with_csv, _ = _best(lambda: reference(from_file=True))
    with ReplaySource(bootstrap, registry_url, [namespace.topic("bars")]) as source:
        events = [event for batch in source.batches() for event in batch]
    engine_only, _ = _best(lambda: _engine_only(events))
    root = _archive(bootstrap, registry_url, namespace)
    archived, from_archive = _best(lambda: run_backtest(
        config.replace(source="archive", archive_root=root), progress=False))
    assert from_archive.trades_csv == result.trades_csv
    return [Figure("backtest bars/s from Kafka (read+decode+SmaCross+broker+stats)",
                   loaded / ours, "bars/s", loaded,
                   "backtesting.py Backtest.run, same bars in memory", loaded / theirs,
                   "ratio > 1"),
            Figure("backtest bars/s from Kafka, vs backtesting.py from the CSV file",
                   loaded / ours, "bars/s", loaded,
                   "pandas.read_csv + backtesting.py Backtest.run", loaded / with_csv, ""),
            Figure("backtest bars/s from the archive (Parquet read+SmaCross+broker+stats)",
                   loaded / archived, "bars/s", loaded,
                   "backtesting.py Backtest.run, same bars in memory", loaded / theirs,
                   "ratio >= 3 (issue 18)"),
            Figure("backtest bars/s from the archive, vs the same backtest from Kafka",
                   loaded / archived, "bars/s", loaded, "from Kafka", loaded / ours, ""),
            Figure("backtest bars/s, engine alone (bars decoded in memory)",
                   loaded / engine_only, "bars/s", loaded,
                   "backtesting.py Backtest.run, same bars in memory", loaded / theirs, "")]


def _engine_only(events: list) -> None:
    from decimal import Decimal

    from pipeline.backtest import report
    from pipeline.backtest.engine import Engine, make_broker
    from pipeline.strategy import SmaCross

    with gc_tuned():
        engine = Engine(SmaCross(**SMA), make_broker("next-open", Decimal(1_000_000),
                                                     Decimal("0.002"), "sma-cross"))
        engine.run(events)
        report.compute_stats(engine.finish())


def _reference():
    import pandas as pd
    from backtesting import Backtest, Strategy
    from backtesting.lib import crossover

    def sma(values, n):
        return pd.Series(values).rolling(n).mean()

    class SmaCross(Strategy):
        def init(self):
            self.fast = self.I(sma, self.data.Close, 10)
            self.slow = self.I(sma, self.data.Close, 20)

        def next(self):
            if crossover(self.fast, self.slow):
                self.position.close()
                self.buy()
            elif crossover(self.slow, self.fast):
                self.position.close()
                self.sell()

    def load():
        data = pd.read_csv(CSV, parse_dates=["Date"], index_col="Date").sort_index()
        return data[["Open", "High", "Low", "Close", "Volume"]]

    loaded = load()

    def run(from_file: bool = False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Backtest(load() if from_file else loaded, SmaCross, cash=1_000_000,
                            commission=0.002, finalize_trades=True).run()

    return run


def _generated(events: int) -> tuple[list[dict], str]:
    out = []
    for i, e in enumerate(itertools.islice(generated_events(["BTCUSD", "ETHUSD", "SOLUSD"], 3),
                                           events)):
        out.append({"symbol": e.symbol, "snapshot": e.snapshot,
                    "changes": [{"side": "BID" if s == "buy" else "ASK", "price": p,
                                 "quantity": q} for s, p, q in e.changes],
                    "exchange_ts_ms": None, "received_ts_us": e.ts_ms * 1000 + i % 1000,
                    "connection_id": "generator", "sequence": i, "event_id": None})
    return out, "BTCUSD"


def _captured(events: int) -> tuple[list[dict], str]:
    """The capture's l2_updates, repeated; each pass starts with its snapshots again and
    its receive times moved on, so the books and times stay those of a real session."""
    from pipeline.gemini.capture import received_frames

    frames = [(f.received_us, json.loads(f.text)) for f in received_frames(CAPTURE)]
    frames = [(t, d) for t, d in frames if d.get("type") == "l2_updates"]
    span = frames[-1][0] - frames[0][0] + 1
    out: list[dict] = []
    for n in itertools.count():
        seen: set[str] = set()
        for t, d in frames:
            if len(out) == events:
                return out, "BTCGBP"
            out.append({"symbol": d["symbol"], "snapshot": d["symbol"] not in seen,
                        "changes": [{"side": "BID" if s == "buy" else "ASK", "price": p,
                                     "quantity": q} for s, p, q in d["changes"]],
                        "exchange_ts_ms": None, "received_ts_us": t + n * span,
                        "connection_id": f"pass-{n}", "sequence": len(out), "event_id": None})
            seen.add(d["symbol"])
    raise AssertionError("unreachable")


def l2(bootstrap: str, registry_url: str, events: int) -> list[Figure]:
    figures = []
    streams = [("generator", _generated)]
    if CAPTURE.exists():
        streams.append(("real capture", _captured))
    for label, make in streams:
        records, symbol = make(events)
        topic = produce_l2(bootstrap, registry_url, records, "l2")
        namespace = split_topic(topic)[0]  # type: ignore[index]
        changes = sum(len(r["changes"]) for r in records)

        def raw() -> int:
            with gc_tuned(), ReplaySource(bootstrap, registry_url, [topic]) as source:  # noqa: B023 - _best calls it at once
                return sum(len(batch) for batch in source.batches())

        raw_s, count = _best(raw)
        assert count == len(records)
        config = BacktestConfig("pipeline.strategy:MidQuoter", namespace, {"symbol": symbol},
                                fill="book", book_depth=1, topics=["md.l2"])
        ours_s, result = _best(lambda: run_backtest(
            config, Cluster(bootstrap, registry_url), progress=False))  # noqa: B023 - _best calls it at once
        assert result.engine.changes_applied == changes
        assert result.engine.orders.submitted > 0
        figures.append(Figure(f"L2 backtest: books + MidQuoter + simulator, queue on ({label})",
                              changes / ours_s, "changes/s", changes,
                              "consume + decode of the same records", changes / raw_s,
                              ">= 500,000 changes/s"))
        root = _archive(bootstrap, registry_url, namespace)
        archive_s, archived = _best(lambda: run_backtest(
            config.replace(source="archive", archive_root=root), progress=False))  # noqa: B023 - _best calls it at once
        assert archived.trades_csv == result.trades_csv
        figures.append(Figure(f"L2 backtest from the archive ({label})", changes / archive_s,
                              "changes/s", changes, "the same backtest from Kafka",
                              changes / ours_s, ""))
    return figures


def run(bootstrap: str, registry_url: str, events: int) -> list[Figure]:
    return bars(bootstrap, registry_url) + l2(bootstrap, registry_url, events)
