"""Backtests over Kafka topics, from one call: :func:`run_backtest` (what ``pipeline
backtest`` runs) and :func:`sweep` (a parameter grid in parallel processes).

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
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal, InvalidOperation
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import pandas as pd

from pipeline.backtest import report
from pipeline.backtest.engine import (
    BOOK_FILLS,
    FILL_MODELS,
    NEXT_OPEN,
    Engine,
    EngineResult,
    make_broker,
)
from pipeline.core.errors import PipelineError
from pipeline.gemini.symbols import read_rules_file
from pipeline.kafka.catalog import Namespace
from pipeline.ops.progress import progress_bar, stop_on_ctrl_c
from pipeline.replay.ranges import Offsets, TimeLike, range_text, resolve_topics, to_ms
from pipeline.replay.source import ReadStats, ReplaySource
from pipeline.strategy import Strategy, load_strategy
from pipeline.trading.fees import GEMINI_API_FEES, FeeSchedule


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


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class BacktestConfig:
    """How a backtest simulates the market: everything but what is read and who trades.

    ``commission`` is the next-open model's rate, charged on entry and exit (default
    0.002); book fills pay ``maker_fee``/``taker_fee`` (default Gemini's API schedule, or
    ``commission`` for both when only that is given). ``slippage`` (next-open:
    backtesting.py's spread) and ``lot`` (fraction sizing rounds down to whole lots) are
    decimals. Book fills only: ``queue`` ("risk-averse" or "none"), ``latency_ms`` (orders
    and cancels reach the simulated exchange this long after their trigger), ``book_depth``
    (levels in the snapshots given to ``on_book``), ``sample_ms`` (equity points),
    ``rules_file`` (Gemini's symbol rules the simulated exchange refuses orders by, as paper
    execution does: a rules cache of :mod:`pipeline.gemini.symbols` or recorded
    ``/v1/symbols/details`` responses). Without it there are no symbol rules (ids and
    options are still checked): a backtest is not quietly checked against whatever table
    happens to be cached today, so the same inputs give the same result."""

    fill: str = NEXT_OPEN
    cash: str = "1000000"
    commission: str | None = None
    slippage: str = "0"
    lot: str = "1"
    interval: str | None = None
    finalize_trades: bool = True
    book_depth: int = 10
    sample_ms: int = 1000
    maker_fee: str | None = None
    taker_fee: str | None = None
    queue: str = "risk-averse"
    latency_ms: int = 0
    rules_file: str | None = None

    def __post_init__(self) -> None:
        if self.fill not in FILL_MODELS:
            raise PipelineError(f"unknown fill model {self.fill!r}: one of "
                                f"{', '.join(FILL_MODELS)}")
        for name in ("cash", "commission", "slippage", "lot", "maker_fee", "taker_fee"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, str(_decimal(value, name.replace("_", " "))))

    @classmethod
    def of(cls, config: "BacktestConfig | None" = None, **options: Any) -> "BacktestConfig":
        """``config`` (or the defaults) with ``options`` changed; unknown names refused."""
        base = config or cls()
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise PipelineError(f"unknown backtest setting(s) {', '.join(unknown)}")
        return replace(base, **{k: v for k, v in options.items() if v is not None
                                or k in ("commission", "interval", "maker_fee", "taker_fee")})

    def broker(self, strategy_id: str):
        """A fresh simulated broker with these settings."""
        fees = None
        if self.fill == BOOK_FILLS and (self.maker_fee is not None or self.taker_fee is not None):
            try:
                fees = FeeSchedule(
                    maker=Decimal(self.maker_fee if self.maker_fee is not None else
                                  self.commission if self.commission is not None else
                                  GEMINI_API_FEES.maker),
                    taker=Decimal(self.taker_fee if self.taker_fee is not None else
                                  self.commission if self.commission is not None else
                                  GEMINI_API_FEES.taker))
            except ValueError as exc:
                raise PipelineError(str(exc)) from None
        commission = self.commission if self.commission is not None else \
            ("0.002" if self.fill == NEXT_OPEN else None)
        options: dict[str, Any] = dict(lot=Decimal(self.lot), slippage=Decimal(self.slippage),
                                       interval=self.interval,
                                       finalize_trades=self.finalize_trades,
                                       sample_ms=self.sample_ms)
        if self.fill == BOOK_FILLS:
            options.update(fees=fees, queue=self.queue, latency_ms=self.latency_ms,
                           rules=read_rules_file(self.rules_file) if self.rules_file else None)
        return make_broker(self.fill, Decimal(self.cash),
                           None if commission is None else Decimal(commission), strategy_id,
                           **options)


# --------------------------------------------------------------------------- one backtest


def run_backtest(bootstrap: str, registry_url: str, namespace: Namespace | str,
                 strategy_spec: str | Strategy, params: Mapping[str, Any] | None = None,
                 start: TimeLike = None, end: TimeLike = None, *,
                 config: BacktestConfig | None = None, out_dir: str | Path | None = None,
                 topics: Sequence[str] | None = None, offsets: Offsets | None = None,
                 html: bool = False, progress: bool | None = None, title: str | None = None,
                 source: str = "kafka", archive_root: str | Path | None = None,
                 **settings: Any) -> BacktestResult:
    """Replay ``topics`` of ``namespace`` (default: what the strategy needs, see
    :func:`default_topics`) over ``[start, end)`` (Kafka timestamps: epoch ms, ISO text
    or datetime) or ``offsets``, drive ``strategy_spec`` (``"module:Class"`` with
    ``params``) with the simulated market of ``config`` (a :class:`BacktestConfig`; any of
    its fields may also be given as keywords: ``fill="book"``, ``latency_ms=5``, ...), and
    compute the statistics.

    With ``out_dir`` it writes ``trades.csv``, ``equity.csv``, ``stats.json``,
    ``equity.png``, ``equity_plot.csv`` (and ``report.html`` with ``html``), all or
    nothing: into a temporary directory renamed at the end; an existing non-empty
    ``out_dir`` is refused before
    anything runs.

    ``source="archive"`` reads the same records from the Parquet archive instead
    (:mod:`pipeline.replay.archive`; ``archive_root`` default ``<run dir>/parquet/<ns>/archive``):
    the same trades for the same range, ``bootstrap`` and ``registry_url`` unused.

    Ctrl-C stops after the current batch: the result (and the files) cover what was
    replayed, with ``interrupted=True``; open trades are then not closed. Errors are
    :class:`~pipeline.core.errors.PipelineError`: an unknown topic, a range with no records, a
    strategy that raises (naming the strategy and the record).
    """
    config = BacktestConfig.of(config, **settings)
    fill = config.fill
    ns = Namespace(namespace) if isinstance(namespace, str) else namespace
    strategy, spec_name = _strategy(strategy_spec, params)
    start_ms, end_ms = to_ms(start, "start"), to_ms(end, "end")
    names = resolve_topics(ns, list(topics) if topics else default_topics(strategy, fill))
    broker = config.broker(strategy.strategy_id)
    engine = Engine(strategy, broker, config.book_depth, spec_name)
    output = report.OutputDir(out_dir) if out_dir is not None else None
    began = time.perf_counter()
    try:
        with _replay(bootstrap, registry_url, names, start_ms, end_ms, offsets,
                     _origin(source, ns, archive_root)) as reader:
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
                raise PipelineError(f"no records to replay in {', '.join(names)}"
                                    f"{range_text(start_ms, end_ms, offsets)}: the "
                                    f"{reader.total} record(s) in the offset window are "
                                    "all stamped outside the time range or unreadable")
            read = reader.stats
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


def _origin(source: str, namespace: Namespace, root: str | Path | None) -> Path | None:
    """Where a backtest reads: None for Kafka, else the archive's root."""
    if source == "kafka":
        return None
    if source != "archive":
        raise PipelineError(f"source {source!r}: use kafka or archive")
    from pipeline.replay.archive import archive_root

    return Path(root) if root is not None else archive_root(namespace)


@contextmanager
def _replay(bootstrap: str, registry_url: str, topics: list[str], start_ms: int | None,
            end_ms: int | None, offsets: Offsets | None, archive: Path | None = None
            ) -> Iterator[Any]:
    """The planned replay (from Kafka, or the archive at ``archive``), or one clear error
    when the range holds no record."""
    if archive is not None:
        from pipeline.replay.archive import ArchiveSource

        opened: Any = ArchiveSource(archive, topics, start_ms=start_ms, end_ms=end_ms,
                                    offsets=offsets)
    else:
        opened = ReplaySource(bootstrap, registry_url, topics, start_ms=start_ms,
                              end_ms=end_ms, offsets=offsets)
    with opened as source:
        if not source.total:
            raise PipelineError(f"no records to replay in {', '.join(topics)}"
                                f"{range_text(start_ms, end_ms, offsets)}: "
                                f"{source.describe_empty()}")
        yield source


def _firsts(source: Any) -> int:  # a ReplaySource or an ArchiveSource
    return sum(p.first for p in source.plan if p.first < p.end)


# --------------------------------------------------------------------------- sweeps

_WORKER_EVENTS: list | None = None


def _read_all(bootstrap: str, registry_url: str, topics: list[str], start_ms: int | None,
              end_ms: int | None, offsets: Offsets | None, archive: Path | None = None) -> list:
    with _replay(bootstrap, registry_url, topics, start_ms, end_ms, offsets, archive) as source:
        events: list = []
        for batch in source.batches():
            events += batch
        return events


def _init_worker(bootstrap: str, registry_url: str, topics: list[str], start_ms: int | None,
                 end_ms: int | None, offsets: Offsets | None, archive: Path | None) -> None:
    """Each worker reads and decodes the replay once, then runs its combinations on it.
    Ctrl-C is the parent's to handle: it lets running combinations finish."""
    global _WORKER_EVENTS
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_EVENTS = _read_all(bootstrap, registry_url, topics, start_ms, end_ms, offsets,
                               archive)


def _run_combination(index: int, spec: str, params: dict[str, Any],
                     config: BacktestConfig) -> tuple[int, dict[str, Any]]:
    strategy, name = _strategy(spec, params)
    engine = Engine(strategy, config.broker(strategy.strategy_id), config.book_depth, name)
    engine.run(_WORKER_EVENTS or [])
    result = engine.finish()
    stats = report.compute_stats(result)
    return index, {**params, **stats, "Equity Final (exact)": str(result.final_equity),
                   **report.breakdown_columns(result)}


def sweep(bootstrap: str, registry_url: str, namespace: Namespace | str,
          strategy_spec: str, grid: Mapping[str, Sequence[Any]],
          params: Mapping[str, Any] | None = None, start: TimeLike = None, end: TimeLike = None,
          *, config: BacktestConfig | None = None, topics: Sequence[str] | None = None,
          offsets: Offsets | None = None, workers: int = 2, progress: bool | None = None,
          source: str = "kafka", archive_root: str | Path | None = None,
          **settings: Any) -> pd.DataFrame:
    """Backtest every combination of ``grid`` (``{"fast": [5, 10], "slow": [20, 30]}``,
    on top of ``params``) in ``workers`` processes; one row per combination, in the
    grid's order (the last key varies fastest), with the parameters, the statistics (with
    what they cover: Symbols, Buy & Hold Of, Span, Gaps) and per traded symbol its trades,
    P&L, fees and exposure (:func:`pipeline.backtest.report.breakdown_columns`).
    ``config`` and ``settings`` are :func:`run_backtest`'s.

    Each worker reads and decodes the replay once and keeps it in memory for all the
    combinations it runs. A combination the strategy refuses (e.g. fast >= slow) is a
    :class:`PipelineError` before anything runs. Ctrl-C lets the running combinations
    finish, drops the others and returns the rows done, with
    ``frame.attrs["interrupted"] = True`` (``attrs["combinations"]`` is the grid's size).
    """
    config = BacktestConfig.of(config, **settings)
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
    names = resolve_topics(ns, list(topics) if topics else
                           default_topics(strategies[0], config.fill))
    config.broker("check")  # bad settings fail here
    archive = _origin(source, ns, archive_root)
    with _replay(bootstrap, registry_url, names, start_ms, end_ms, offsets, archive):
        pass  # unknown topics and empty ranges fail here, before any process starts
    rows: list[dict[str, Any] | None] = [None] * len(combos)
    workers = max(1, min(workers, len(combos)))
    show = sys.stderr.isatty() if progress is None else progress
    with stop_on_ctrl_c() as stop, \
            progress_bar(show, len(combos), f"sweep {strategy_spec}", "combinations") as update, \
            ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                initializer=_init_worker,
                                initargs=(bootstrap, registry_url, names, start_ms, end_ms,
                                          offsets, archive)) as pool:
        pending = {pool.submit(_run_combination, i, strategy_spec, combo, config)
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
