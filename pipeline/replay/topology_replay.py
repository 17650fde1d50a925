"""Topology replay: copy a range of source topics into a replay namespace, so the whole
topology (orderbook, bars, strategy, execution) runs on history, isolated from live topics.

What is copied: every record of the range, byte for byte: key, value (Confluent wire
format; the schema id is registry-global, so the bytes decode the same in any namespace
once its subjects are registered), headers, partition, and the original Kafka timestamp
(CreateTime). Records go out in timestamp order across partitions and topics (ties by
topic, partition, offset; each partition keeps its own order), paced at ``speed`` times
real time by those timestamps, or as fast as possible.

Nothing is written before everything is checked: the target must be a ``replay-x``
namespace other than the source, the source topics must exist, the range must hold
records and the target topics must be empty (a replay into a half-filled namespace would
double records). Only then are the target's topics created and its schemas registered.

:func:`clean_namespace` deletes what a replay namespace left: topics, consumer groups,
schema subjects and the run directory's Parquet/state for it.
"""

from __future__ import annotations

import heapq
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from confluent_kafka import TopicPartition

from pipeline.core.errors import PipelineError
from pipeline.kafka.catalog import Namespace, ensure_topics, spec
from pipeline.kafka.clients import ReliableProducer, check_reachable, make_admin, reader_config
from pipeline.kafka.partition_reader import PartitionReader
from pipeline.replay.ranges import Offsets, utc_text
from pipeline.replay.source import RangePlanner

DEFAULT_TOPICS = ("md.l2", "md.trades")  # what the producer writes (raw.frames optional)
MAX_BUFFERED = 50_000  # per partition: pause one that runs far ahead of the merge


@dataclass(frozen=True)
class ReplayRequest:
    """What to copy: catalog topic names of ``source`` over a range, into ``target``."""

    source: Namespace
    target: Namespace
    topics: tuple[str, ...] = DEFAULT_TOPICS
    start_ms: int | None = None
    end_ms: int | None = None  # exclusive
    offsets: Offsets = field(default_factory=dict)  # {(full topic, partition): (first, end)}
    speed: float | None = None  # None: as fast as possible; 1.0: as recorded

    def __post_init__(self) -> None:
        if self.target.kind != "replay":
            raise PipelineError(f"the target namespace {self.target} is not a replay namespace: "
                                "a replay writes only into replay-NAME (e.g. replay-jun24)")
        if self.target == self.source:
            raise PipelineError(f"a replay cannot read and write namespace {self.source}")
        if not self.topics:
            raise PipelineError("nothing to replay: no topics given")
        for name in self.topics:
            spec(name)  # a name the catalog does not know fails here


@dataclass
class ReplayStats:
    records: int = 0
    per_topic: dict[str, int] = field(default_factory=dict)
    skipped_time: int = 0  # inside the offset window, timestamp outside the range
    first_ms: int | None = None  # timestamps of the first and last record copied
    last_ms: int | None = None
    seconds: float = 0.0
    stopped: bool = False  # stopped before the end (Ctrl-C, SIGTERM)

    def count(self, name: str, stamp: int) -> None:
        """One record of catalog topic ``name``, stamped ``stamp``, copied."""
        self.records += 1
        self.per_topic[name] = self.per_topic.get(name, 0) + 1
        self.first_ms = stamp if self.first_ms is None else self.first_ms
        self.last_ms = stamp


def parse_speed(text: str | float | None) -> float | None:
    """``max`` (or nothing) -> None; ``10``, ``10x``, ``0.5`` -> that multiple of real time."""
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        raw = str(text).strip().lower()
        if raw == "max":
            return None
        try:
            value = float(raw[:-1] if raw.endswith("x") else raw)
        except ValueError:
            raise PipelineError(f"speed {text!r}: use max, or a multiple of real time "
                                "like 1, 10 or 0.5") from None
    if not value > 0:
        raise PipelineError(f"speed {text!r} must be positive (or max)")
    return value


def describe_range(start_ms: int | None, end_ms: int | None) -> str:
    if start_ms is None and end_ms is None:
        return "the whole topics"
    return f"[{utc_text(start_ms) if start_ms is not None else 'the beginning'}, " \
           f"{utc_text(end_ms) if end_ms is not None else 'the end'})"


class Republisher:
    """Checks a :class:`ReplayRequest` (writing nothing), then copies it on :meth:`run`."""

    def __init__(self, bootstrap: str, request: ReplayRequest, timeout: float = 30.0) -> None:
        self.bootstrap, self.request, self.timeout = bootstrap, request, timeout
        self.names = {request.source.topic(name): name for name in request.topics}
        self.planner = RangePlanner(bootstrap, list(self.names), start_ms=request.start_ms,
                                    end_ms=request.end_ms, offsets=request.offsets,
                                    timeout=timeout)
        try:
            self._check_plan()
        except BaseException:
            self.planner.close()
            raise
        self.total = self.planner.total

    def _check_plan(self) -> None:
        req = self.request
        if not self.planner.total:
            raise PipelineError(f"nothing to replay: {', '.join(self.names)} hold no record in "
                                f"{describe_range(req.start_ms, req.end_ms)} "
                                f"({self.planner.describe_empty()})")
        partitions: dict[str, int] = {}
        for p in self.planner.plan:
            partitions[p.topic] = max(partitions.get(p.topic, 0), p.partition + 1)
        check_target(self.bootstrap, req, self.planner.consumer, self.timeout,
                     {self.names[full]: (full, n) for full, n in partitions.items()}, exact=True)

    # -- writing

    def prepare(self, registry_url: str) -> list[str]:
        """Create the target namespace's topics (all of the catalog's, so the topology can
        run there) and register its schemas; return the topics created."""
        return prepare_target(self.bootstrap, registry_url, self.request.target, self.timeout)

    def run(self, should_stop: Callable[[], bool] = lambda: False,
            progress: Callable[[int, int], None] | None = None) -> ReplayStats:
        """Copy the range in timestamp order, paced by ``speed``; ``progress(done, total)``
        about every 0.2 s. Stops early (flushing what was sent) when ``should_stop()``."""
        req, stats = self.request, ReplayStats()
        began = time.monotonic()
        producer = ReliableProducer(self.bootstrap, **{"linger.ms": 20})
        order = {full: i for i, full in enumerate(self.names)}
        into = {full: req.target.topic(name) for full, name in self.names.items()}
        reader = PartitionReader(self.planner.consumer,
                                 {(p.topic, p.partition): (p.first, p.end)
                                  for p in self.planner.plan},
                                 timeout=self.timeout, assigned=self.planner.assigned)
        ends = reader.ends  # the partitions not read to their end yet (the reader's, live)
        buffers: dict[tuple[str, int], deque] = {source: deque() for source in ends}
        heap: list[tuple] = []  # the head record of every source with buffered records
        paused: set[tuple[str, int]] = set()
        start_ms, end_ms = req.start_ms, req.end_ms
        timed = start_ms is not None or end_ms is not None
        pacer = Pacer(req.speed)
        last_progress = 0.0
        position = 0

        def push_head(source: tuple[str, int]) -> None:
            msg = buffers[source][0]
            heapq.heappush(heap, (msg.timestamp()[1], order[source[0]], source[1], msg.offset(),
                                  source))

        try:
            while ends or heap:
                if should_stop():
                    stats.stopped = True
                    break
                starving = [s for s in ends if not buffers[s]]
                if ends and (starving or not heap):
                    if paused:  # never hold back a partition the merge waits for
                        wanted = [s for s in paused
                                  if not buffers[s] or len(buffers[s]) < MAX_BUFFERED // 2]
                        if wanted:
                            reader.resume(wanted)
                            paused.difference_update(wanted)
                    runs, _ = reader.poll(5000)
                    for source, run in runs:
                        position += len(run)
                        buffer = buffers[source]
                        for msg in run:
                            stamp = msg.timestamp()[1]
                            if timed and ((start_ms is not None and stamp < start_ms) or
                                          (end_ms is not None and stamp >= end_ms)):
                                stats.skipped_time += 1
                                continue
                            buffer.append(msg)
                            if len(buffer) == 1:
                                push_head(source)
                        if len(buffer) > MAX_BUFFERED and source in ends and source not in paused:
                            reader.pause([source])
                            paused.add(source)
                # Emit while no unfinished partition could still bring an earlier record.
                while heap and not any(not buffers[s] for s in ends):
                    stamp, _, _, _, source = heapq.heappop(heap)
                    msg = buffers[source].popleft()
                    if buffers[source]:
                        push_head(source)
                    pacer.wait(stamp, producer, should_stop)
                    producer.produce(into[source[0]], msg.value(), msg.key(),
                                     headers=msg.headers(), timestamp=stamp, partition=source[1])
                    stats.count(self.names[source[0]], stamp)
                    if stats.records % 5000 == 0:
                        producer.poll(0)
                    if should_stop():
                        break
                now = time.monotonic()
                if progress is not None and now - last_progress > 0.2:
                    last_progress = now
                    progress(position, self.total)
        finally:
            producer.flush()
            stats.seconds = time.monotonic() - began
        if progress is not None:
            progress(position, self.total)
        return stats

    def close(self) -> None:
        self.planner.close()

    def __enter__(self) -> "Republisher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_target(bootstrap: str, request: ReplayRequest, consumer, timeout: float,
                 partitions: dict[str, tuple[str, int]], exact: bool) -> None:
    """Refuse a target that would not keep every record in its partition, or that already
    holds records (a replay into a half-filled namespace would double them).
    ``partitions``: catalog name -> (where it is read from, partitions it needs); ``exact``:
    the source's partition count is known (Kafka) and must match, not just fit (archive)."""
    meta = check_reachable(make_admin(bootstrap), bootstrap, timeout).topics
    for name, (source, needed) in partitions.items():
        into = request.target.topic(name)
        have = len(meta[into].partitions) if into in meta else spec(name).partitions
        if have != needed if exact else have < needed:
            raise PipelineError(f"{source} has {needed} partitions but {into} "
                                f"{'has' if into in meta else 'would have'} {have}: a replay "
                                "keeps every record in its partition")
        if into in meta:
            held = sum(high - low for low, high in (
                consumer.get_watermark_offsets(TopicPartition(into, p), timeout=timeout)
                for p in range(len(meta[into].partitions))))
            if held:
                raise PipelineError(f"{into} already holds {held} record(s): replay into a "
                                    f"new namespace, or `pipeline replay clean {request.target}` "
                                    "first")


def prepare_target(bootstrap: str, registry_url: str, target: Namespace,
                   timeout: float) -> list[str]:
    """Every catalog topic of ``target`` and its schemas registered; the topics created."""
    from pipeline.avro.registry import SchemaRegistry
    from pipeline.avro.schemas import register_namespace

    created = ensure_topics(bootstrap, target, timeout=timeout)
    register_namespace(SchemaRegistry(registry_url), target)
    return created


class Pacer:
    """Holds records back to ``speed`` times real time by their timestamps (None: as fast
    as possible), serving the producer's delivery reports while it waits."""

    def __init__(self, speed: float | None) -> None:
        self.speed = speed
        self._from: tuple[int, float] | None = None  # (first timestamp, its wall time)

    def wait(self, stamp: int, producer: ReliableProducer,
             should_stop: Callable[[], bool]) -> None:
        if self.speed is None:
            return
        if self._from is None:
            self._from = (stamp, time.monotonic())
        due = self._from[1] + (stamp - self._from[0]) / 1000 / self.speed
        while (left := due - time.monotonic()) > 0 and not should_stop():
            producer.poll(min(left, 0.1))


class ArchiveRepublisher:
    """:class:`Republisher` for history older than Kafka's retention: the same range (Kafka
    timestamps, offsets windows; :class:`~pipeline.replay.archive.ArchiveSource`'s semantics) read
    from the Parquet archive, re-encoded with the registry's schemas (the same schema ids,
    so the same bytes) and written to the record's partition with its symbol as key and its
    original timestamp, in timestamp order, paced alike."""

    def __init__(self, bootstrap: str, request: ReplayRequest, root: str | Path,
                 timeout: float = 30.0) -> None:
        from pipeline.replay.archive import ArchiveSource

        self.bootstrap, self.request, self.timeout = bootstrap, request, timeout
        self.root = Path(root)
        self.names = {request.source.topic(name): name for name in request.topics}
        self.source = ArchiveSource(self.root, list(self.names), start_ms=request.start_ms,
                                    end_ms=request.end_ms, offsets=request.offsets)
        self.total = self.source.total
        if not self.total:
            raise PipelineError(f"nothing to replay: the archive under {self.root} holds no "
                                f"record of {', '.join(self.names)} in "
                                f"{describe_range(request.start_ms, request.end_ms)} "
                                f"({self.source.describe_empty()})")
        needed: dict[str, tuple[str, int]] = {}
        for p in self.source.plan:
            name = self.names[p.topic]
            needed[name] = (f"the archive of {p.topic}",
                            max(needed.get(name, ("", 0))[1], p.partition + 1))
        from confluent_kafka import Consumer

        probe = Consumer(reader_config(bootstrap, f"restore-replay-{time.monotonic_ns()}"))
        try:
            check_target(bootstrap, request, probe, timeout, needed, exact=False)
        finally:
            probe.close()
        self.registry_url: str | None = None

    def prepare(self, registry_url: str) -> list[str]:
        self.registry_url = registry_url
        return prepare_target(self.bootstrap, registry_url, self.request.target, self.timeout)

    def run(self, should_stop: Callable[[], bool] = lambda: False,
            progress: Callable[[int, int], None] | None = None) -> ReplayStats:
        """As :meth:`Republisher.run`, from the archive (call :meth:`prepare` first)."""
        from pipeline.avro.registry import SchemaRegistry
        from pipeline.avro.serde import Serde

        if self.registry_url is None:
            raise PipelineError("prepare(registry_url) first: the records are re-encoded")
        req, stats = self.request, ReplayStats()
        serde = Serde(SchemaRegistry(self.registry_url))
        into = {full: req.target.topic(name) for full, name in self.names.items()}
        encode = {full: serde.encoder(target) for full, target in into.items()}
        began, last_progress = time.monotonic(), 0.0
        pacer = Pacer(req.speed)
        producer = ReliableProducer(self.bootstrap, **{"linger.ms": 20})
        try:
            for stamp, topic, partition, _, record in self.source.in_time_order():
                if should_stop():
                    stats.stopped = True
                    break
                pacer.wait(stamp, producer, should_stop)
                producer.produce(into[topic], encode[topic](record), record["symbol"],
                                 timestamp=stamp, partition=partition)
                stats.count(self.names[topic], stamp)
                if stats.records % 5000 == 0:
                    producer.poll(0)
                    now = time.monotonic()
                    if progress is not None and now - last_progress > 0.2:
                        last_progress = now
                        progress(stats.records, self.total)
        finally:
            producer.flush()
            stats.seconds = time.monotonic() - began
        if progress is not None:
            progress(stats.records, self.total)
        return stats

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> "ArchiveRepublisher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- cleanup


@dataclass
class CleanReport:
    topics: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.topics or self.groups or self.subjects or self.paths)


def run_dir_paths(run_dir: Path, namespace: Namespace) -> list[Path]:
    """What the groups write under the run directory for one namespace: the bars group's
    Parquet and its checkpoints (``parquet/<ns>/``)."""
    return [run_dir / "parquet" / namespace.name]


def clean_namespace(bootstrap: str, registry_url: str, run_dir: Path,
                    namespace: Namespace | str, timeout: float = 30.0,
                    members_grace_s: float = 15.0) -> CleanReport:
    """Delete a replay namespace: its consumer groups (first: a group whose members are
    still there after ``members_grace_s``, longer than a stopped static member's session,
    is refused before anything is deleted), topics, schema subjects and run-dir state."""
    from pipeline.avro.registry import SchemaRegistry

    ns = Namespace(namespace) if isinstance(namespace, str) else namespace
    if ns.kind != "replay":
        raise PipelineError(f"{ns} is not a replay namespace: `pipeline replay clean` only "
                            "deletes replay-NAME namespaces")
    prefix = f"{ns}."
    admin = make_admin(bootstrap)
    meta = check_reachable(admin, bootstrap, timeout)
    report = CleanReport()
    listed = admin.list_consumer_groups(request_timeout=timeout).result()
    groups = sorted(g.group_id for g in listed.valid if g.group_id.startswith(prefix))
    if groups:
        # Static members (bars, execution) stay listed until their session times out.
        deadline = time.monotonic() + members_grace_s
        while True:
            described = admin.describe_consumer_groups(groups, request_timeout=timeout)
            busy = sorted(g for g, future in described.items() if future.result().members)
            if not busy:
                break
            if time.monotonic() > deadline:
                raise PipelineError(f"consumer group(s) {', '.join(busy)} still have members: "
                                    f"stop them (`pipeline down`) before cleaning {ns}")
            time.sleep(0.5)
        for group, future in admin.delete_consumer_groups(groups,
                                                          request_timeout=timeout).items():
            future.result()
            report.groups.append(group)
    topics = sorted(t for t in meta.topics if t.startswith(prefix))
    if topics:
        for topic, future in admin.delete_topics(topics, request_timeout=timeout).items():
            future.result()
            report.topics.append(topic)
    registry = SchemaRegistry(registry_url)
    for subject in sorted(s for s in registry.subjects() if s.startswith(prefix)):
        if registry.delete_subject(subject):
            report.subjects.append(subject)
    for path in run_dir_paths(run_dir, ns):
        if path.exists():
            shutil.rmtree(path)
            report.paths.append(str(path))
    return report


def catalog_names(topics: Sequence[str]) -> tuple[str, ...]:
    """``md.l2,md.trades`` style names, each checked against the catalog."""
    names = tuple(dict.fromkeys(t.strip() for t in topics if t.strip()))
    for name in names:
        spec(name)
    return names
