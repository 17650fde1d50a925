"""Backtests over Kafka topics, from one call: :func:`run_backtest` (what ``pipeline
backtest`` runs) and :func:`sweep` (a parameter grid in parallel processes).

Reading is :class:`~pipeline.replay_source.ReplaySource`, the simulation is
:mod:`pipeline.backtest`, the numbers and files are :mod:`pipeline.report`.
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
from decimal import Decimal, InvalidOperation
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import pandas as pd

from pipeline import report
from pipeline.backtest import (BOOK_FILLS, FILL_MODELS, NEXT_OPEN, EngineResult, Engine,
                               make_broker)
from pipeline.catalog import Namespace
from pipeline.errors import PipelineError
from pipeline.progress import progress_bar, stop_on_ctrl_c
from pipeline.ranges import Offsets, TimeLike, range_text, resolve_topics, to_ms
from pipeline.replay_source import ReadStats, ReplaySource
from pipeline.strategy import Strategy, load_strategy



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


def _decimal(value: Any, what: str) -> Decimal:
    try:
        result = Decimal(str(value))
    except InvalidOperation:
        raise PipelineError(f"{what} {value!r} is not a decimal number") from None
    if not result.is_finite():
        raise PipelineError(f"{what} {value!r} is not a finite number")
    return result


def default_topics(strategy: Strategy, fill: str) -> list[str]:
    """The catalog topics a strategy needs: ``bars`` for ``on_bar`` (and next-open fills),
    ``md.l2`` for ``on_book`` (books are rebuilt from L2 changes) and book fills,
    ``md.trades`` for ``on_trade``."""
    cls = type(strategy)
    names = []
    if cls.on_bar is not Strategy.on_bar or fill == NEXT_OPEN:
        names.append("bars")
    if cls.on_book is not Strategy.on_book or fill == BOOK_FILLS:
        names.append("md.l2")
    if cls.on_trade is not Strategy.on_trade:
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


def run_backtest(bootstrap: str, registry_url: str, namespace: Namespace | str,
                 strategy_spec: str | Strategy, params: Mapping[str, Any] | None = None,
                 start: TimeLike = None, end: TimeLike = None, cash: str | float = "1000000",
                 commission: str | float = "0.002", fill: str = NEXT_OPEN,
                 out_dir: str | Path | None = None, *, topics: Sequence[str] | None = None,
                 offsets: Offsets | None = None, slippage: str | float = "0",
                 lot: str | float = "1", interval: str | None = None,
                 finalize_trades: bool = True, book_depth: int = 10, sample_ms: int = 1000,
                 html: bool = False, progress: bool | None = None,
                 title: str | None = None) -> BacktestResult:
    """Replay ``topics`` of ``namespace`` (default: what the strategy needs, see
    :func:`default_topics`) over ``[start, end)`` (Kafka timestamps: epoch ms, ISO text
    or datetime) or ``offsets``, drive ``strategy_spec`` (``"module:Class"`` with
    ``params``) with the ``fill`` model (``"next-open"`` or ``"book"``), and compute the
    statistics.

    ``cash``, ``commission`` (a fraction of each fill's value, charged on entry and exit),
    ``slippage`` (next-open: backtesting.py's spread) and ``lot`` (fraction sizing rounds
    down to whole lots) are decimals. With ``out_dir`` it writes ``trades.csv``,
    ``equity.csv``, ``stats.json``, ``equity.png`` (and ``report.html`` with ``html``),
    all or nothing: into a temporary directory renamed at the end; an existing non-empty
    ``out_dir`` is refused before anything runs.

    Ctrl-C stops after the current batch: the result (and the files) cover what was
    replayed, with ``interrupted=True``; open trades are then not closed. Errors are
    :class:`~pipeline.errors.PipelineError`: an unknown topic, a range with no records, a
    strategy that raises (naming the strategy and the record).
    """
    if fill not in FILL_MODELS:
        raise PipelineError(f"unknown fill model {fill!r}: one of {', '.join(FILL_MODELS)}")
    ns = Namespace(namespace) if isinstance(namespace, str) else namespace
    strategy, spec_name = _strategy(strategy_spec, params)
    start_ms, end_ms = to_ms(start, "start"), to_ms(end, "end")
    names = resolve_topics(ns, list(topics) if topics else default_topics(strategy, fill))
    broker = make_broker(fill, _decimal(cash, "cash"), _decimal(commission, "commission"),
                         strategy.strategy_id, lot=_decimal(lot, "lot"),
                         slippage=_decimal(slippage, "slippage"), interval=interval,
                         finalize_trades=finalize_trades, sample_ms=sample_ms)
    engine = Engine(strategy, broker, book_depth, spec_name)
    output = report.OutputDir(out_dir) if out_dir is not None else None
    began = time.perf_counter()
    try:
        with _replay(bootstrap, registry_url, names, start_ms, end_ms, offsets) as source:
            show = sys.stderr.isatty() if progress is None else progress
            with stop_on_ctrl_c() as stop, gc_tuned(), \
                    progress_bar(show, source.total, f"backtest {spec_name}") as update:
                for batch in source.batches(stop.is_set,
                                            lambda position: update(position - _firsts(source),
                                                                    engine.events)):
                    engine.run(batch)
                    if engine.stopped:
                        break
                interrupted = stop.is_set()
            if not engine.events:
                raise PipelineError(f"no records to replay in {', '.join(names)}"
                                    f"{range_text(start_ms, end_ms, offsets)}: the "
                                    f"{source.total} record(s) in the offset window are "
                                    "all stamped outside the time range or unreadable")
            read = source.stats
        result_engine = engine.finish(interrupted=interrupted)
        stats = report.compute_stats(result_engine)
        result = BacktestResult(spec_name, dict(params or {}), fill, names, start_ms, end_ms,
                                result_engine, stats, read, time.perf_counter() - began,
                                interrupted)
        if output is not None:
            result.files = report.write_outputs(
                output.path, result_engine, stats, result.summary(),
                title or f"{spec_name} {dict(params or {})}", html)
            result.out_dir = output.commit()
            result.files = {k: result.out_dir / p.name for k, p in result.files.items()}
            output = None
        return result
    finally:
        if output is not None:
            output.discard()


@contextmanager
def _replay(bootstrap: str, registry_url: str, topics: list[str], start_ms: int | None,
            end_ms: int | None, offsets: Offsets | None) -> Iterator[ReplaySource]:
    """The planned replay, or one clear error when the range holds no record."""
    with ReplaySource(bootstrap, registry_url, topics, start_ms=start_ms, end_ms=end_ms,
                      offsets=offsets) as source:
        if not source.total:
            raise PipelineError(f"no records to replay in {', '.join(topics)}"
                                f"{range_text(start_ms, end_ms, offsets)}: "
                                f"{source.describe_empty()}")
        yield source


def _firsts(source: ReplaySource) -> int:
    return sum(p.first for p in source.plan if p.first < p.end)


# --------------------------------------------------------------------------- sweeps

_WORKER_EVENTS: list | None = None


def _read_all(bootstrap: str, registry_url: str, topics: list[str], start_ms: int | None,
              end_ms: int | None, offsets: Offsets | None) -> list:
    with _replay(bootstrap, registry_url, topics, start_ms, end_ms, offsets) as source:
        events: list = []
        for batch in source.batches():
            events += batch
        return events


def _init_worker(bootstrap: str, registry_url: str, topics: list[str], start_ms: int | None,
                 end_ms: int | None, offsets: Offsets | None) -> None:
    """Each worker reads and decodes the replay once, then runs its combinations on it.
    Ctrl-C is the parent's to handle: it lets running combinations finish."""
    global _WORKER_EVENTS
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_EVENTS = _read_all(bootstrap, registry_url, topics, start_ms, end_ms, offsets)


def _run_combination(index: int, spec: str, params: dict[str, Any], fill: str,
                     options: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    strategy, name = _strategy(spec, params)
    options = dict(options)
    book_depth = options.pop("book_depth", 10)
    broker = make_broker(fill, strategy_id=strategy.strategy_id, **options)
    engine = Engine(strategy, broker, book_depth, name)
    engine.run(_WORKER_EVENTS or [])
    result = engine.finish()
    stats = report.compute_stats(result)
    return index, {**params, **stats, "Equity Final (exact)": str(result.final_equity)}


def sweep(bootstrap: str, registry_url: str, namespace: Namespace | str,
          strategy_spec: str, grid: Mapping[str, Sequence[Any]],
          params: Mapping[str, Any] | None = None, start: TimeLike = None, end: TimeLike = None,
          cash: str | float = "1000000", commission: str | float = "0.002",
          fill: str = NEXT_OPEN, *, topics: Sequence[str] | None = None,
          offsets: Offsets | None = None, slippage: str | float = "0", lot: str | float = "1",
          interval: str | None = None, finalize_trades: bool = True, book_depth: int = 10,
          sample_ms: int = 1000, workers: int = 2,
          progress: bool | None = None) -> pd.DataFrame:
    """Backtest every combination of ``grid`` (``{"fast": [5, 10], "slow": [20, 30]}``,
    on top of ``params``) in ``workers`` processes; one row per combination, in the
    grid's order (the last key varies fastest), with the parameters then the statistics.

    Each worker reads and decodes the replay once and keeps it in memory for all the
    combinations it runs. A combination the strategy refuses (e.g. fast >= slow) is a
    :class:`PipelineError` before anything runs. Ctrl-C lets the running combinations
    finish, drops the others and returns the rows done, with
    ``frame.attrs["interrupted"] = True`` (``attrs["combinations"]`` is the grid's size).
    """
    if fill not in FILL_MODELS:
        raise PipelineError(f"unknown fill model {fill!r}: one of {', '.join(FILL_MODELS)}")
    if not grid:
        raise PipelineError("an empty grid: give at least one parameter with values")
    keys = list(grid)
    for key in keys:
        if isinstance(grid[key], (str, bytes)) or not len(grid[key]):
            raise PipelineError(f"grid values of {key!r} must be a non-empty list")
    combos = [{**dict(params or {}), **dict(zip(keys, values))}
              for values in itertools.product(*(grid[k] for k in keys))]
    strategies = [_strategy(strategy_spec, combo)[0] for combo in combos]  # refuse bad ones now
    ns = Namespace(namespace) if isinstance(namespace, str) else namespace
    start_ms, end_ms = to_ms(start, "start"), to_ms(end, "end")
    names = resolve_topics(ns, list(topics) if topics else default_topics(strategies[0], fill))
    options = {"cash": _decimal(cash, "cash"), "commission": _decimal(commission, "commission"),
               "lot": _decimal(lot, "lot"), "slippage": _decimal(slippage, "slippage"),
               "interval": interval, "finalize_trades": finalize_trades,
               "sample_ms": sample_ms, "book_depth": book_depth}
    make_broker(fill, strategy_id="check", **{k: v for k, v in options.items()
                                               if k != "book_depth"})  # bad settings fail here
    with _replay(bootstrap, registry_url, names, start_ms, end_ms, offsets):
        pass  # unknown topics and empty ranges fail here, before any process starts
    rows: list[dict[str, Any] | None] = [None] * len(combos)
    workers = max(1, min(workers, len(combos)))
    show = sys.stderr.isatty() if progress is None else progress
    with stop_on_ctrl_c() as stop, \
            progress_bar(show, len(combos), f"sweep {strategy_spec}", "combinations") as update, \
            ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                initializer=_init_worker,
                                initargs=(bootstrap, registry_url, names, start_ms, end_ms,
                                          offsets)) as pool:
        pending = {pool.submit(_run_combination, i, strategy_spec, combo, fill, options)
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
