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

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Serde
from pipeline.core.errors import PipelineError
from pipeline.kafka.catalog import Namespace
from pipeline.ops.settings import Settings
from pipeline.replay.archive import archive_root
from pipeline.runtime.context import BEGINNING, AssignContext, Partition
from pipeline.runtime.runner import (
    GroupConfig,
    GroupRunner,
    Handler,
    Output,
    Record,
    group_endpoints,
)
from pipeline.sinks.archive import ArchiveWriter, to_row

log = logging.getLogger(__name__)
# Several instances may run, each named by --instance (its transactional.id and
# group.instance.id); the supervisor passes it (pipeline/ops/supervisor.py).
MULTI_INSTANCE = True
MARKET_TOPICS = ("md.l2", "md.trades", "bars")

__all__ = ["ArchiveHandler", "ArchiveOptions", "make_group", "main"]


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


def make_group(bootstrap: str, registry_url: str, namespace: str, *,
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m consumers.archive",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the run dir's broker)")
    ap.add_argument("--registry", help="schema registry URL (default: the run dir's registry)")
    ap.add_argument("--namespace", "-n", help="namespace (default: PIPELINE_NAMESPACE)")
    ap.add_argument("--root", help="default <run dir>/parquet/<namespace>/archive")
    ap.add_argument("--raw", action="store_true", help="archive raw.frames too")
    ap.add_argument("--group-id", default=None, help="default <namespace>.archive")
    ap.add_argument("--instance", default="0", help="unique per running instance")
    ap.add_argument("--roll-records", type=int, default=20_000)
    ap.add_argument("--roll-seconds", type=float, default=60.0)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--run-dir")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        bootstrap, registry = group_endpoints(args.run_dir, args.bootstrap, args.registry)
        config = make_group(bootstrap, registry,
                            args.namespace or Settings.from_env(args.run_dir).namespace,
                            root=args.root, run_dir=args.run_dir, raw=args.raw,
                            group_id=args.group_id, instance=args.instance,
                            roll_records=args.roll_records, roll_seconds=args.roll_seconds,
                            batch_size=args.batch_size)
        runner = GroupRunner(config, bootstrap)
        runner.install_signal_handlers()
        stats = runner.run()
    except (PipelineError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(stats.__dict__), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
