"""Backtests over Kafka topics, from one call: :func:`run_backtest` (what ``pipeline
backtest`` runs) and :func:`sweep` (a parameter grid in parallel processes), both given a
:class:`~pipeline.backtest.config.BacktestConfig` and, to read Kafka, a
:class:`~pipeline.core.cluster.Cluster`.

Reading is :class:`~pipeline.replay.source.ReplaySource`, the simulation is
:mod:`pipeline.backtest.engine`, the numbers and files are :mod:`pipeline.backtest.report`.
"""

from __future__ import annotations

import gc
import itertools
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import pandas as pd

from pipeline.backtest import report
from pipeline.backtest.config import BacktestConfig
from pipeline.backtest.engine import BOOK_FILLS, NEXT_OPEN, Engine, EngineResult
from pipeline.core.cluster import Cluster
from pipeline.core.errors import PipelineError
from pipeline.ops.progress import progress_bar, stop_on_ctrl_c
from pipeline.replay.ranges import Offsets, range_text, resolve_topics
from pipeline.replay.source import ReadStats, ReplaySource
from pipeline.strategy import Strategy, load_strategy

__all__ = ["BacktestConfig", "BacktestResult", "default_topics", "gc_tuned", "run_backtest",
           "sweep"]


@dataclass
class BacktestResult:
    """One backtest: the exact engine result, the statistics, the files written."""

    strategy: str
    params: dict[str, Any]
    fill: str
    topics: list[str]
    start_ms: int | None
    end_ms: int | None
    engine: EngineResult
    stats: dict[str, Any]
    read: ReadStats
    elapsed_s: float
    interrupted: bool = False
    out_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def trades(self) -> pd.DataFrame:
        """The closed trades, backtesting.py's columns (floats)."""
        return report.trades_frame(self.engine.trades)

    @property
    def trades_csv(self) -> str:
        """The closed trades as CSV with exact decimals (byte-identical across runs)."""
        return report.trades_csv(self.engine.trades)

    @property
    def equity(self) -> pd.DataFrame:
        return report.equity_frame(self.engine)

    @property
    def final_equity(self) -> Decimal:
        return self.engine.final_equity

    @property
    def events_per_s(self) -> float:
        return self.engine.events / self.elapsed_s if self.elapsed_s else float("nan")

    def summary(self) -> dict[str, Any]:
        e = self.engine
        return {
            "strategy": self.strategy, "params": self.params, "fill": self.fill,
            "topics": self.topics, "start_ms": self.start_ms, "end_ms": self.end_ms,
            "interrupted": self.interrupted, "stopped": e.stopped,
            "events": e.events, "events_by_kind": e.by_kind,
            "first_event_us": e.first_event_us, "last_event_us": e.last_event_us,
            "records_read": self.read.records, "skipped_outside_time_range":
                self.read.skipped_time, "tombstones": self.read.tombstones,
            "undecodable": self.read.undecodable, "first_undecodable": self.read.first_undecodable,
            "elapsed_s": round(self.elapsed_s, 3), "events_per_s": round(self.events_per_s),
            "initial_cash": str(e.initial_cash), "final_cash": str(e.final_cash),
            "final_equity": str(e.final_equity), "trades": len(e.trades),
            "open_trades": [{"symbol": lot.symbol, "size": str(lot.size),
                             "entry_price": str(lot.entry_price), "entry_ms": lot.entry_ms}
                            for lot in e.open_lots],
            "orders": vars(e.orders) | {"still_open": e.pending_orders},
            "book_changes_applied": e.changes_applied,
            "book_snapshots_to_strategy": e.snapshots_emitted,
            "crossed_books_dropped": e.books_dropped,
        }


# --------------------------------------------------------------------------- inputs


def default_topics(strategy: Strategy, fill: str) -> list[str]:
    """The catalog topics a strategy needs: ``bars`` for ``on_bar`` (and next-open fills),
    ``md.l2`` for ``on_book`` (books are rebuilt from L2 changes) and book fills,
    ``md.trades`` for ``on_trade`` and book fills (trades move queues and fill resting
    orders)."""
    cls = type(strategy)
    names = []
    if cls.on_bar is not Strategy.on_bar or fill == NEXT_OPEN:
        names.append("bars")
    if cls.on_book is not Strategy.on_book or fill == BOOK_FILLS:
        names.append("md.l2")
    if cls.on_trade is not Strategy.on_trade or fill == BOOK_FILLS:
        names.append("md.trades")
    return names


def _strategy(spec: str | Strategy, params: Mapping[str, Any] | None) -> tuple[Strategy, str]:
    if isinstance(spec, Strategy):
        if params:
            raise PipelineError("params are for a strategy given as module:Class, not an instance")
        return spec, f"{type(spec).__module__}:{type(spec).__qualname__}"
    try:
        return load_strategy(spec, dict(params or {})), spec
    except ValueError as exc:  # the strategy's own parameter checks
        raise PipelineError(f"strategy {spec} refused its parameters {dict(params or {})}: "
                            f"{exc}") from None


# --------------------------------------------------------------------------- replays


@contextmanager
def gc_tuned(young: int = 1_000_000) -> Iterator[None]:
    """Collect the young generation every ``young`` allocations instead of 700 during a
    replay: it allocates millions of short-lived acyclic dicts and tuples (freed by
    reference counting, most before a collection with this threshold would see them);
    with 700, collections take up to a fifth of a replay's time."""
    old = gc.get_threshold()
    gc.set_threshold(max(old[0], young), old[1], old[2])
    try:
        yield
    finally:
        gc.set_threshold(*old)


# --------------------------------------------------------------------------- one backtest


def run_backtest(config: BacktestConfig, cluster: Cluster | None = None, *,
                 out_dir: str | Path | None = None, html: bool = False,
                 progress: bool | None = None, title: str | None = None) -> BacktestResult:
    """Replay what ``config`` (a :class:`~pipeline.backtest.config.BacktestConfig`) reads,
    from Kafka at ``cluster`` or (``source="archive"``, no cluster) from the Parquet archive:
    its topics (default: what the strategy needs, see :func:`default_topics`) over its time
    and/or offset range; drive its strategy with its simulated market, and compute the
    statistics. The archive gives the same trades as Kafka for the same range.

    With ``out_dir`` it writes ``trades.csv``, ``equity.csv``, ``stats.json``,
    ``equity.png``, ``equity_plot.csv`` (and ``report.html`` with ``html``; ``title`` heads
    the reports), all or nothing: into a temporary directory renamed at the end; an
    existing non-empty ``out_dir`` is refused before anything runs. ``progress``: a
    progress bar on stderr (default: when it is a terminal).

    Ctrl-C stops after the current batch: the result (and the files) cover what was
    replayed, with ``interrupted=True``; open trades are then not closed. Errors are
    :class:`~pipeline.core.errors.PipelineError`: an unknown topic, a range with no records, a
    strategy that raises (naming the strategy and the record).
    """
    strategy, spec_name = _strategy(config.strategy, config.params)
    params = dict(config.params)
    reading = _Reading.of(config, cluster, strategy)
    broker = config.broker(strategy.strategy_id)
    engine = Engine(strategy, broker, config.book_depth, spec_name)
    output = report.OutputDir(out_dir) if out_dir is not None else None
    began = time.perf_counter()
    try:
        with _replay(reading) as reader:
            show = sys.stderr.isatty() if progress is None else progress
            with stop_on_ctrl_c() as stop, gc_tuned(), \
                    progress_bar(show, reader.total, f"backtest {spec_name}") as update:
                for batch in reader.batches(stop.is_set,
                                            lambda position: update(position - _firsts(reader),
                                                                    engine.events)):
                    engine.run(batch)
                    if engine.stopped:
                        break
                interrupted = stop.is_set()
            if not engine.events:
                raise PipelineError(f"no records to replay in {', '.join(reading.topics)}"
                                    f"{reading.range_text()}: the "
                                    f"{reader.total} record(s) in the offset window are "
                                    "all stamped outside the time range or unreadable")
            read = reader.stats
        result_engine = engine.finish(interrupted=interrupted)
        stats = report.compute_stats(result_engine)
        result = BacktestResult(spec_name, params, config.fill, list(reading.topics),
                                reading.start_ms, reading.end_ms, result_engine, stats, read,
                                time.perf_counter() - began, interrupted)
        if output is not None:
            result.files = report.write_outputs(
                output.path, result_engine, stats, result.summary(),
                title or f"{spec_name} {params}", html)
            result.out_dir = output.commit()
            result.files = {k: result.out_dir / p.name for k, p in result.files.items()}
            output = None
        return result
    finally:
        if output is not None:
            output.discard()


@dataclass(frozen=True)
class _Reading:
    """Where a backtest reads, resolved from its config: full topic names, the range in
    ms and offsets, and Kafka (``cluster``) or the archive's root (``archive``)."""

    topics: tuple[str, ...]
    start_ms: int | None
    end_ms: int | None
    offsets: Offsets | None
    cluster: Cluster | None
    archive: Path | None

    @classmethod
    def of(cls, config: BacktestConfig, cluster: Cluster | None,
           strategy: Strategy) -> _Reading:
        ns = config.ns
        names = resolve_topics(ns, list(config.topics) if config.topics else
                               default_topics(strategy, config.fill))
        archive = None
        if config.source == "archive":
            from pipeline.replay.archive import archive_root

            archive = config.archive_root if config.archive_root is not None else \
                archive_root(ns)
        elif cluster is None:
            raise PipelineError("a backtest from Kafka needs a cluster (bootstrap and registry); "
                                "source='archive' reads the Parquet archive without one")
        return cls(tuple(names), config.start_ms, config.end_ms, config.offsets, cluster,
                   None if archive is None else Path(archive))

    def range_text(self) -> str:
        return range_text(self.start_ms, self.end_ms, self.offsets)


@contextmanager
def _replay(reading: _Reading) -> Iterator[Any]:
    """The planned replay (from Kafka, or the archive), or one clear error when the range
    holds no record."""
    topics = list(reading.topics)
    if reading.archive is not None:
        from pipeline.replay.archive import ArchiveSource

        opened: Any = ArchiveSource(reading.archive, topics, start_ms=reading.start_ms,
                                    end_ms=reading.end_ms, offsets=reading.offsets)
    else:
        assert reading.cluster is not None
        opened = ReplaySource(reading.cluster.bootstrap, reading.cluster.registry_url, topics,
                              start_ms=reading.start_ms, end_ms=reading.end_ms,
                              offsets=reading.offsets)
    with opened as source:
        if not source.total:
            raise PipelineError(f"no records to replay in {', '.join(topics)}"
                                f"{reading.range_text()}: {source.describe_empty()}")
        yield source


def _firsts(source: Any) -> int:  # a ReplaySource or an ArchiveSource
    return sum(p.first for p in source.plan if p.first < p.end)


# --------------------------------------------------------------------------- sweeps

_WORKER_EVENTS: list | None = None


def _read_all(reading: _Reading) -> list:
    with _replay(reading) as source:
        events: list = []
        for batch in source.batches():
            events += batch
        return events


def _init_worker(reading: _Reading) -> None:
    """Each worker reads and decodes the replay once, then runs its combinations on it.
    Ctrl-C is the parent's to handle: it lets running combinations finish."""
    global _WORKER_EVENTS
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_EVENTS = _read_all(reading)


def _run_combination(index: int, params: dict[str, Any],
                     config: BacktestConfig) -> tuple[int, dict[str, Any]]:
    strategy, name = _strategy(config.strategy, params)
    engine = Engine(strategy, config.broker(strategy.strategy_id), config.book_depth, name)
    engine.run(_WORKER_EVENTS or [])
    result = engine.finish()
    stats = report.compute_stats(result)
    return index, {**params, **stats, "Equity Final (exact)": str(result.final_equity),
                   **report.breakdown_columns(result)}


def sweep(config: BacktestConfig, grid: Mapping[str, Sequence[Any]],
          cluster: Cluster | None = None, *, workers: int = 2,
          progress: bool | None = None) -> pd.DataFrame:
    """Backtest every combination of ``grid`` (``{"fast": [5, 10], "slow": [20, 30]}``,
    on top of ``config.params``) in ``workers`` processes; one row per combination, in the
    grid's order (the last key varies fastest), with the parameters, the statistics (with
    what they cover: Symbols, Buy & Hold Of, Span, Gaps) and per traded symbol its trades,
    P&L, fees and exposure (:func:`pipeline.backtest.report.breakdown_columns`).
    ``config`` and ``cluster`` are :func:`run_backtest`'s (the strategy as ``module:Class``).

    Each worker reads and decodes the replay once and keeps it in memory for all the
    combinations it runs. A combination the strategy refuses (e.g. fast >= slow) is a
    :class:`PipelineError` before anything runs. Ctrl-C lets the running combinations
    finish, drops the others and returns the rows done, with
    ``frame.attrs["interrupted"] = True`` (``attrs["combinations"]`` is the grid's size).
    """
    if not grid:
        raise PipelineError("an empty grid: give at least one parameter with values")
    keys = list(grid)
    for key in keys:
        if isinstance(grid[key], (str, bytes)) or not len(grid[key]):
            raise PipelineError(f"grid values of {key!r} must be a non-empty list")
    combos = [{**dict(config.params), **dict(zip(keys, values))}
              for values in itertools.product(*(grid[k] for k in keys))]
    strategies = [_strategy(config.strategy, combo)[0] for combo in combos]  # refuse bad ones now
    reading = _Reading.of(config, cluster, strategies[0])
    config.broker("check")  # bad settings fail here
    with _replay(reading):
        pass  # unknown topics and empty ranges fail here, before any process starts
    rows: list[dict[str, Any] | None] = [None] * len(combos)
    workers = max(1, min(workers, len(combos)))
    show = sys.stderr.isatty() if progress is None else progress
    with stop_on_ctrl_c() as stop, \
            progress_bar(show, len(combos), f"sweep {config.strategy_name}",
                         "combinations") as update, \
            ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                initializer=_init_worker, initargs=(reading,)) as pool:
        pending = {pool.submit(_run_combination, i, combo, config)
                   for i, combo in enumerate(combos)}
        done_count = 0
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for future in done:
                if future.cancelled():
                    continue
                index, row = future.result()
                rows[index] = row
                done_count += 1
            update(done_count, done_count)
            if stop.is_set():
                for future in pending:
                    future.cancel()  # the running ones finish; the queued ones are dropped
        interrupted = stop.is_set()
    frame = pd.DataFrame([row for row in rows if row is not None])
    frame.attrs.update(interrupted=interrupted, combinations=len(combos))
    return frame
