"""The ``archive`` consumer group: market data to Parquet, exactly once, kept beyond retention.

Reads ``<ns>.md.l2``, ``<ns>.md.trades`` and ``<ns>.bars`` (with ``--raw``, ``raw.frames``
too), read_committed, and writes every record to the archive under
``<run dir>/parquet/<ns>/archive`` (layout, columns and the journal protocol that makes it
exactly once: :mod:`pipeline.sinks.archive`). Run::

    python -m consumers.archive --bootstrap HOST:PORT --registry URL --namespace sim

Records wait in memory per Kafka partition until a file is due: ``--roll-records``
records, or ``--roll-seconds`` since the first of them (and at a revoke or a stop). Until
then the group's committed offset stays at the first record not yet in a file, so its lag
says what is not archived yet. The journal, not the committed offset, is where a restart
resumes, so a kill at any point of a flush loses and doubles nothing. Without a journal (a
new archive, or one deleted) a partition is archived from the beginning of what the topic
retains. Records whose decimals do not fit the archive's columns exactly go to the
dead-letter topic (after a restart those after the last flush may be dead-lettered again).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Serde
from pipeline.kafka.catalog import Namespace
from pipeline.replay.archive import archive_root
from pipeline.runtime.context import BEGINNING, AssignContext, Partition
from pipeline.runtime.contract import GroupContext, group_main
from pipeline.runtime.runner import (
    GroupConfig,
    Handler,
    Output,
    Record,
)
from pipeline.sinks.archive import ArchiveWriter, to_row

log = logging.getLogger(__name__)
# Several instances may run, each named by ctx.instance (in its group.instance.id); the
# supervisor gives each its index (pipeline/ops/launch.py).
MULTI_INSTANCE = True
MARKET_TOPICS = ("md.l2", "md.trades", "bars")

__all__ = ["ArchiveHandler", "ArchiveOptions", "Config", "group_config", "make_group", "main"]


@dataclass(frozen=True)
class Config:
    """The archive group's settings: a topology's ``args`` (pipeline/runtime/contract.py)."""

    root: Path | None = field(default=None, metadata={
        "help": "[default: <run dir>/parquet/<namespace>/archive]"})
    raw: bool = field(default=False, metadata={"help": "archive raw.frames too"})
    group_id: str | None = field(default=None, metadata={
        "help": "[default: <namespace>.archive]"})
    roll_records: int = field(default=20_000, metadata={
        "help": "records of a partition that make a file"})
    roll_seconds: float = field(default=60.0, metadata={
        "help": "seconds after its first record a partition's file is written"})
    batch_size: int = 1000


@dataclass(frozen=True)
class ArchiveOptions:
    namespace: str
    root: Path
    topics: tuple[str, ...] = MARKET_TOPICS  # catalog names
    roll_records: int = 20_000  # a file per partition once this many records wait
    roll_seconds: float = 60.0  # or once the oldest has waited this long
    fsync: bool = True


@dataclass
class _Buffer:
    rows: list[dict] = field(default_factory=list)
    first: int = -1
    last: int = -1
    since: float = 0.0


class ArchiveHandler(Handler):
    """Buffers each partition's records and flushes them with the journal protocol."""

    def __init__(self, opts: ArchiveOptions, clock: Callable[[], float] = time.monotonic) -> None:
        self.opts = opts
        self.clock = clock
        ns = Namespace(opts.namespace)
        self.names = {ns.topic(name): name for name in opts.topics}
        self.writers = {full: ArchiveWriter(opts.root, name, fsync=opts.fsync)
                        for full, name in self.names.items()}
        self._buffers: dict[tuple[str, int], _Buffer] = {}
        self._resume: dict[tuple[str, int], int] = {}  # the journal's next offset
        self.flushed_rows = 0

    def on_assign(self, ctx: AssignContext, partitions: list[Partition]) -> list[Partition] | None:
        # The journal, not Kafka, says where each partition resumes: nothing is read.
        starts = []
        for tp in partitions:
            if tp.topic not in self.writers:
                starts.append(tp)
                continue
            resume = self.writers[tp.topic].recover(tp.partition)
            log.info("archive: %s[%d] resumes at %s", tp.topic, tp.partition,
                     "the beginning" if resume is None else f"offset {resume}")
            self._buffers[(tp.topic, tp.partition)] = _Buffer()
            self._resume[(tp.topic, tp.partition)] = resume or 0
            # One record early, skipped: reading it makes the runtime track and commit the
            # partition even when nothing new comes (a kill after a flush, before its commit).
            starts.append(tp.at(BEGINNING if not resume else resume - 1))
        return starts

    def handle(self, record: Record) -> Iterable[Output]:
        if record.offset < self._resume.get((record.topic, record.partition), 0):
            return ()  # archived before the restart
        row = to_row(self.names[record.topic], record.value, record.partition, record.offset,
                     record.timestamp_ms)
        buffer = self._buffers.setdefault((record.topic, record.partition), _Buffer())
        if not buffer.rows:
            buffer.first, buffer.since = record.offset, self.clock()
        buffer.rows.append(row)
        buffer.last = record.offset
        return ()

    def end_batch(self) -> Iterable[Output]:
        now = self.clock()
        for source, buffer in self._buffers.items():
            if buffer.rows and (len(buffer.rows) >= self.opts.roll_records
                                or now - buffer.since >= self.opts.roll_seconds):
                self._flush(source, buffer)
        return ()

    def commit_offsets(self, offsets: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        """Hold each partition at its first record not yet in a file (lag = not archived)."""
        held = dict(offsets)
        for source, buffer in self._buffers.items():
            if buffer.rows and source in held:
                held[source] = min(held[source], buffer.first)
        return held

    def on_revoke(self, partitions: list[Partition]) -> Iterable[Output]:
        for tp in partitions:
            buffer = self._buffers.pop((tp.topic, tp.partition), None)
            if buffer is not None and buffer.rows:
                self._flush((tp.topic, tp.partition), buffer)
        return ()

    def close(self) -> Iterable[Output]:
        for source, buffer in self._buffers.items():
            if buffer.rows:
                self._flush(source, buffer)
        return ()

    def _flush(self, source: tuple[str, int], buffer: _Buffer) -> None:
        topic, partition = source
        report = self.writers[topic].write(partition, buffer.first, buffer.last, buffer.rows)
        self.flushed_rows += report.rows
        log.info("archive: %s[%d] offsets %d-%d: %d records in %d file(s)", topic, partition,
                 report.first, report.last, report.rows, report.files)
        buffer.rows, buffer.first, buffer.last = [], -1, -1


def group_config(bootstrap: str, registry_url: str, namespace: str, *,
               root: str | Path | None = None, run_dir: str | Path | None = None,
               raw: bool = False, group_id: str | None = None, instance: str = "0",
               roll_records: int = 20_000, roll_seconds: float = 60.0,
               batch_size: int = 1000, fsync: bool = True) -> GroupConfig:
    """The archive group's configuration for the runtime (``raw``: archive raw.frames too)."""
    ns = Namespace(namespace)
    topics = MARKET_TOPICS + (("raw.frames",) if raw else ())
    base = Path(root) if root else archive_root(ns, run_dir)
    opts = ArchiveOptions(ns.name, base.resolve(), topics, roll_records, roll_seconds, fsync)
    group_id = group_id or f"{ns}.archive"
    return GroupConfig(
        group_id=group_id, topics=[ns.topic(t) for t in topics],
        handler=lambda: ArchiveHandler(opts), dead_letter_topic=ns.topic("dlq"),
        decoder=Serde(SchemaRegistry(registry_url)).decoder(), batch_size=batch_size,
        # Static membership: a restarted instance takes its partitions back at once.
        consumer_overrides={"group.instance.id": f"{group_id}-{instance}"})


def make_group(ctx: GroupContext, config: Config = Config()) -> GroupConfig:
    """The group of the contract (pipeline/runtime/contract.py)."""
    return group_config(ctx.bootstrap, ctx.registry_url, ctx.namespace.name, root=config.root,
                        run_dir=ctx.run_dir, raw=config.raw, group_id=config.group_id,
                        instance=ctx.instance, roll_records=config.roll_records,
                        roll_seconds=config.roll_seconds, batch_size=config.batch_size)


def main(argv: list[str] | None = None) -> int:
    return group_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
