"""The ``bars`` consumer group: trades -> OHLCV bars -> the bars topic and Parquet, exactly once.

Reads ``<ns>.md.trades`` (Avro Trade), builds bars with :mod:`pipeline.market.bars`, publishes
closed bars to ``<out>.bars`` (Avro Bar, key symbol, source "trades", Kafka timestamp =
bar start) and late trades to ``<out>.bars.late``, and writes closed bars to Parquet
(:mod:`pipeline.sinks.bars`). Run::

    python -m consumers.bars --bootstrap HOST:PORT --registry URL --namespace sim

Exactly once, across kill -9
============================

The truth is a **checkpoint per source partition** (``<state>/<topic>/p<N>/ckpt-<seq>.json``,
written atomically) holding the builder's whole state (open bars, event clocks, recent
trade ids, held snapshot trades), the next source offset ``N`` it covers, and the bars
already published but not yet in Parquet. Offsets are **not** held back: a restart never
re-reads trades that are in a committed checkpoint, so nothing is counted twice and no
late-trade decision is ever taken twice.

One batch is one Kafka transaction (``transactional_id``): the runtime produces the
batch's bars and late trades, then :meth:`BarsHandler.commit_offsets` writes the
checkpoint for the offsets about to be committed, then the runtime commits outputs and
offsets together. The committed offset doubles as the checkpoint's id: it is ``N``, or
``N - 1`` when two checkpoints in a row cover the same ``N`` (a batch without records that
closed bars by the wall clock), so consecutive checkpoints never share a committed value.
On restart (``on_assign``) the newest checkpoint whose value equals the group's committed
offset is the state; a newer one belongs to a transaction that aborted and is dropped.
Reading resumes at that checkpoint's ``N`` (one record earlier, which is skipped: reading it
makes the runtime track and commit the partition before any new trade arrives).

Parquet is written only with bars of transactions known to be committed: the runtime's
``after_commit``, called only after a successful commit, moves them from "unconfirmed" to
"confirmed". Those bars are merged into their partition files (atomic replace, rows
keyed by start time, so a repeated write changes nothing) once a second (``flush_interval_s``)
or when 2,000 wait, so Parquet trails the topic by about a second; until a committed
checkpoint no longer lists them, every checkpoint carries them as "unflushed".

What a kill -9 leaves, at each point of a batch:

* while handling records or producing: the transaction is open; the new process's
  ``init_transactions`` aborts it; the committed offset still names the previous
  checkpoint; the batch is read again from there. Nothing was published or written.
* after the checkpoint is written, before the commit: same, and the new checkpoint does
  not match the committed offset, so it is deleted and the batch redone.
* after the commit, before its bars reach Parquet: the committed offset matches the new
  checkpoint; its bars are in the bars topic once; the restart writes them to Parquet.
* while writing Parquet: a partition file is the old one or the new one (rename); the
  restart writes the checkpoint's unflushed bars again, skipping rows already present.

So every bar is in the topic once (read_committed) and in Parquet once, none missing.
Caveats: the state directory is part of the data (keep it with the Parquet root; a group
with committed offsets and no checkpoints refuses to start); every instance needs its own
``ctx.instance`` (its transactional id and static group membership; the supervisor gives
each its index, ``--instance`` on the command line).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Serde
from pipeline.core.errors import PipelineError
from pipeline.kafka.catalog import Namespace
from pipeline.market.bars import (
    DEFAULT_INTERVALS,
    Bar,
    BarBuilder,
    BarSettings,
    Clock,
    Emitted,
    RecordClock,
    wall_clock_ms,
)
from pipeline.ops.settings import Settings
from pipeline.runtime.context import AssignContext, Partition
from pipeline.runtime.contract import GroupContext, group_main
from pipeline.runtime.runner import (
    GroupConfig,
    Handler,
    Output,
    Record,
)
from pipeline.sinks.bars import DIGITS, PLACES, BarWriter, Checkpoints, WriteReport, read_bars

log = logging.getLogger(__name__)
# Several instances may run, each named by ctx.instance (in its transactional.id and
# group.instance.id); the supervisor gives each its index (pipeline/ops/launch.py).
MULTI_INSTANCE = True
CHECKPOINT_VERSION = 1
STATUS_EVERY_S = 10.0

__all__ = ["BarsHandler", "BarsOptions", "Config", "group_config", "make_group", "main",
           "read_bars"]


@dataclass(frozen=True)
class Config:
    """The bars group's settings: a topology's ``args`` (pipeline/runtime/contract.py)."""

    intervals: tuple[str, ...] = field(default=DEFAULT_INTERVALS, metadata={
        "help": "bar intervals, comma-separated (1m ... 1d)"})
    lateness_ms: int = field(default=5_000, metadata={
        "help": "how late a trade may come for its bar (event time)"})
    fill_gaps: bool = field(default=False, metadata={
        "help": "emit filled bars for empty intervals"})
    output_namespace: str | None = field(default=None, metadata={
        "help": "namespace for bars and late trades [default: the group's]"})
    parquet_root: Path | None = field(default=None, metadata={
        "help": "[default: <run dir>/parquet/<namespace>/bars]"})
    state_dir: Path | None = field(default=None, metadata={
        "help": "checkpoints [default: <parquet root>.state/<group>]"})
    group_id: str | None = field(default=None, metadata={"help": "[default: <namespace>.bars]"})
    batch_size: int = 1000


@dataclass(frozen=True)
class BarsOptions:
    bootstrap: str
    registry_url: str
    namespace: str  # where trades come from
    output_namespace: str  # where bars, late trades go
    group_id: str
    parquet_root: Path
    state_dir: Path
    settings: BarSettings = field(default_factory=BarSettings)
    fsync: bool = True
    flush_interval_s: float = 1.0  # Parquet lags the topic by about this much
    flush_bars: int = 2_000  # or flush once this many committed bars wait
    record_time: bool = False  # replays: each partition's clock is its records' timestamps


@dataclass
class _Part:
    """One source partition: its builder and where its checkpoints stand."""

    builder: BarBuilder
    store: Checkpoints
    seq: int = 0  # newest checkpoint written (0: none)
    next_offset: int | None = None  # N of that checkpoint
    commit_value: int | None = None  # the offset committed with it
    dirty: bool = False  # state changed since that checkpoint
    tracked: bool = False  # a record of it was handled since assignment
    batch: Emitted = field(default_factory=Emitted)
    unconfirmed: list[Bar] = field(default_factory=list)  # published in the open transaction
    confirmed: list[Bar] = field(default_factory=list)  # committed, not yet in Parquet
    clock: RecordClock | None = None  # on replays, this partition's clock


class BarsHandler(Handler):
    """The bars group's handler; see the module docstring for how it stays exactly once."""

    def __init__(self, opts: BarsOptions, clock: Clock = wall_clock_ms) -> None:
        self.opts = opts
        self.clock = clock
        self.source_topic = Namespace(opts.namespace).topic("md.trades")
        out = Namespace(opts.output_namespace)
        self.bars_topic, self.late_topic = out.topic("bars"), out.topic("bars.late")
        serde = Serde(SchemaRegistry(opts.registry_url))
        self._encode_bar = serde.encoder(self.bars_topic)
        self._encode_trade = serde.encoder(self.late_topic)
        self._parts: dict[int, _Part] = {}
        self._retired: dict[int, _Part] = {}  # revoked, until their offsets are committed
        self._writer = BarWriter(opts.parquet_root, fsync=opts.fsync)
        self._flushed_at = time.monotonic()
        self.counts: Counter = Counter()
        self._status_at = time.monotonic()

    # -- the runtime's hooks

    def on_assign(self, ctx: AssignContext, partitions: list[Partition]) -> list[Partition] | None:
        mine = [tp for tp in partitions if tp.topic == self.source_topic]
        found = ctx.committed_offsets(self.source_topic, [tp.partition for tp in mine])
        committed = {tp.partition: found.get(tp.partition) for tp in mine}
        starts = []
        for tp in mine:
            part = self._restore(tp.partition, committed.get(tp.partition))
            self._parts[tp.partition] = part
            report = self._flush([part])
            if report is not None:
                log.info("bars: partition %d: wrote %d committed bars to Parquet, %d were "
                         "there already", tp.partition, report.added, report.skipped)
            n = part.next_offset
            starts.append(tp.at(n - 1 if n else None))  # None: the committed offset
        return starts or None

    def handle(self, record: Record) -> Iterable[Output]:
        part = self._parts[record.partition]
        part.tracked = True
        if part.next_offset is not None and record.offset < part.next_offset:
            return ()  # already in the checkpoint (the one record re-read after a restart)
        if part.clock is not None:
            part.clock.see(record.timestamp_ms)
        trade = record.value
        if not isinstance(trade, dict):
            raise ValueError(f"not a Trade record: {type(trade).__name__}")
        key = record.key.decode(errors="replace") if record.key is not None else None
        if key != trade.get("symbol"):
            raise ValueError(f"record key {key!r} is not the trade's symbol "
                             f"{trade.get('symbol')!r}: one symbol must stay in one partition")
        part.builder.add(trade, part.batch)  # raises ValueError before changing anything
        part.dirty = True
        self.counts["trades"] += 1
        return ()

    def end_batch(self) -> Iterable[Output]:
        self._flush(self._parts.values(), due_only=True)
        outputs: list[Output] = []
        for part in self._parts.values():
            if part.tracked:  # else its offsets could not be committed with the outputs
                part.builder.advance(part.batch)
            emitted, part.batch = part.batch, Emitted()
            if not emitted:
                continue
            part.dirty = True
            for bar in emitted.bars:
                outputs.append(Output(self.bars_topic, self._encode_bar(bar.record()),
                                      bar.symbol, timestamp_ms=bar.start_ms))
            for trade in emitted.late:
                outputs.append(Output(self.late_topic, self._encode_trade(trade), trade["symbol"]))
            part.unconfirmed += emitted.bars
            self.counts.update(bars=len(emitted.bars), late=len(emitted.late),
                               duplicates=emitted.duplicates)
        self._status()
        return outputs

    def commit_offsets(self, offsets: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        chosen = dict(offsets)
        for (topic, p), n in offsets.items():
            part = self._parts.get(p) or self._retired.get(p)
            if topic != self.source_topic or part is None:
                continue
            if part.next_offset is not None and n < part.next_offset:
                n = part.next_offset  # still reading records the checkpoint already has
            if part.dirty or n != part.next_offset:
                self._checkpoint(p, part, n)
            chosen[(topic, p)] = part.commit_value  # type: ignore[assignment]
        self._retired.clear()
        return chosen

    def after_commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """The transaction committed: its bars are confirmed and may go to Parquet."""
        for part in [*self._parts.values(), *self._retired.values()]:
            part.confirmed += part.unconfirmed
            part.unconfirmed = []

    def on_revoke(self, partitions: list[Partition]) -> Iterable[Output]:
        for tp in partitions:
            part = self._parts.pop(tp.partition, None) if tp.topic == self.source_topic else None
            if part is not None:
                self._flush([part])
                self._retired[tp.partition] = part
        return ()

    def close(self) -> Iterable[Output]:
        self._flush(self._parts.values())
        log.info("bars: %s", dict(self.counts))
        return ()

    # -- checkpoints

    def _checkpoint(self, p: int, part: _Part, n: int) -> None:
        if part.commit_value is None or n != part.next_offset:
            value = n
        else:  # same N as the previous checkpoint: tell them apart by the committed value
            value = n - 1 if part.commit_value == n else n
        if value < 0:
            raise PipelineError(f"bars: partition {p} changed with no records (offset {n})")
        part.store.write({
            "version": CHECKPOINT_VERSION, "group": self.opts.group_id,
            "topic": self.source_topic, "partition": p, "seq": part.seq + 1,
            "next_offset": n, "commit_offset": value, "written_ms": wall_clock_ms(),
            "clock_ms": part.clock.newest if part.clock is not None else None,
            "builder": part.builder.state(),
            "unflushed": [b.record() for b in part.confirmed + part.unconfirmed]})
        part.seq, part.next_offset, part.commit_value, part.dirty = part.seq + 1, n, value, False

    def _restore(self, p: int, committed: int | None) -> _Part:
        store = Checkpoints(self.opts.state_dir / self.source_topic / f"p{p}",
                            fsync=self.opts.fsync)
        store.clear_staging()  # a write a kill interrupted; the partition is ours now
        found = store.latest(2)  # oldest first; only the newest can be in doubt
        if not found and committed is None:
            clock = self._clock(None)
            return _Part(BarBuilder(self.opts.settings, clock), store, clock=self._mine(clock))
        chosen = None
        if found and committed is not None and found[-1]["commit_offset"] == committed:
            chosen = found[-1]
        elif found and (len(found) == 2 and committed == found[0]["commit_offset"]
                        or len(found) == 1 and committed is None):
            log.info("bars: partition %d: checkpoint %d was not committed; redoing its batch",
                     p, found[-1]["seq"])
            store.remove(found[-1]["seq"])
            if len(found) == 1:
                clock = self._clock(None)
                return _Part(BarBuilder(self.opts.settings, clock), store, clock=self._mine(clock))
            chosen = found[0]
        else:
            raise PipelineError(
                f"bars: partition {p} of {self.source_topic}: the group's committed offset "
                f"{committed} matches no checkpoint in {store.directory} "
                f"({[(c['seq'], c['commit_offset']) for c in found]}). The offsets were moved, "
                "or the state directory is missing or another run's: restore it, or start "
                "over with a new group id and an empty Parquet root")
        clock = self._clock(chosen)
        part = _Part(BarBuilder.restore(chosen["builder"], self.opts.settings, clock), store,
                     seq=chosen["seq"], next_offset=chosen["next_offset"],
                     commit_value=chosen["commit_offset"],
                     confirmed=[Bar.from_record(r) for r in chosen["unflushed"]],
                     clock=self._mine(clock))
        log.info("bars: partition %d: checkpoint %d, next offset %d, %d open bars, %d bars to "
                 "write", p, part.seq, part.next_offset, part.builder.open_bars(),
                 len(part.confirmed))
        return part

    def _clock(self, checkpoint: dict | None) -> Clock:
        """The wall clock, or on replays a clock of the partition's record timestamps that
        goes on from the checkpoint's (or its newest trade's) time."""
        if not self.opts.record_time:
            return self.clock
        start = checkpoint.get("clock_ms") if checkpoint else None
        if start is None and checkpoint:
            start = max((s["event_ms"] for s in checkpoint["builder"]["symbols"].values()
                         if s["event_ms"] is not None), default=None)
        return RecordClock(start, self.clock)

    @staticmethod
    def _mine(clock: Clock) -> RecordClock | None:
        return clock if isinstance(clock, RecordClock) else None

    # -- Parquet

    def _flush(self, parts: Iterable[_Part], due_only: bool = False) -> WriteReport | None:
        """Write committed bars to Parquet (when due: ``flush_interval_s`` has passed or
        ``flush_bars`` are waiting; they stay listed in the checkpoint until then)."""
        parts = [part for part in parts if part.confirmed]
        if not parts:
            return None
        bars = [bar for part in parts for bar in part.confirmed]
        now = time.monotonic()
        if due_only and len(bars) < self.opts.flush_bars and \
                now - self._flushed_at < self.opts.flush_interval_s:
            return None
        self._flushed_at = now
        report = self._writer.write(bars)
        for part in parts:
            part.confirmed = []
        self.counts.update(parquet_rows=report.added, parquet_repeats=report.skipped)
        return report

    def _status(self) -> None:
        now = time.monotonic()
        if now - self._status_at >= STATUS_EVERY_S:
            self._status_at = now
            log.info("bars: %s; %d open bars", dict(self.counts),
                     sum(p.builder.open_bars() for p in self._parts.values()))


def group_config(bootstrap: str, registry_url: str, namespace: str, *,
               group_id: str | None = None, parquet_root: str | Path | None = None,
               state_dir: str | Path | None = None, output_namespace: str | None = None,
               run_dir: str | Path | None = None, intervals: Iterable[str] = DEFAULT_INTERVALS,
               lateness_ms: int = 5_000, fill_gaps: bool = False, instance: str = "0",
               batch_size: int = 1000, fsync: bool = True, clock: Clock = wall_clock_ms,
               handler_class: type[BarsHandler] = BarsHandler,
               record_time: bool | None = None) -> GroupConfig:
    """The bars group's configuration for the runtime.

    Parquet goes to ``parquet_root`` (default ``<run_dir>/parquet/<output ns>/bars``), the
    checkpoints to ``state_dir`` (default ``<parquet_root>.state/<group_id>``, beside it).
    ``output_namespace`` (default: ``namespace``) receives bars and late trades.
    ``record_time`` (default: on for replay namespaces) replaces the wall clock by each
    partition's record timestamps (:class:`pipeline.market.bars.RecordClock`), so a replay at any
    speed closes bars as the original run did.
    """
    source, out = Namespace(namespace), Namespace(output_namespace or namespace)
    group_id = group_id or f"{source}.bars"  # namespaced, as every group's id
    root = Path(parquet_root) if parquet_root else \
        Settings.from_env(run_dir).run_dir / "parquet" / out.name / "bars"
    root = root.resolve()
    state = Path(state_dir).resolve() if state_dir else \
        root.parent / f"{root.name}.state" / group_id
    settings = BarSettings(intervals=tuple(intervals), lateness_ms=lateness_ms,
                           fill_gaps=fill_gaps, max_places=PLACES, max_digits=DIGITS)
    opts = BarsOptions(bootstrap, registry_url, source.name, out.name, group_id, root, state,
                       settings, fsync,
                       record_time=source.kind == "replay" if record_time is None else record_time)
    handler: Callable[[], Handler] = lambda: handler_class(opts, clock)  # noqa: E731
    return GroupConfig(
        group_id=group_id, topics=[source.topic("md.trades")], handler=handler,
        dead_letter_topic=source.topic("dlq"),
        decoder=Serde(SchemaRegistry(registry_url)).decoder(), batch_size=batch_size,
        transactional_id=f"{group_id}.{source.name}.{instance}",
        # Static membership: a restarted instance takes its partitions back at once.
        consumer_overrides={"group.instance.id": f"{group_id}-{instance}"})


def make_group(ctx: GroupContext, config: Config = Config()) -> GroupConfig:
    """The group of the contract (pipeline/runtime/contract.py)."""
    return group_config(
        ctx.bootstrap, ctx.registry_url, ctx.namespace.name, group_id=config.group_id,
        parquet_root=config.parquet_root, state_dir=config.state_dir,
        output_namespace=config.output_namespace, run_dir=ctx.run_dir,
        intervals=config.intervals, lateness_ms=config.lateness_ms, fill_gaps=config.fill_gaps,
        instance=ctx.instance, batch_size=config.batch_size)


def main(argv: list[str] | None = None) -> int:
    return group_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
