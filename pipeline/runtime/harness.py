"""An in-memory harness for consumer groups: drive a :class:`~pipeline.runtime.runner.Handler`
through assignments, batches, commits, revokes, crashes and close without a broker.

The harness runs the real :class:`~pipeline.runtime.runner.GroupRunner` loop (decoding, dead
letters, ``end_batch``, ``commit_offsets``, transactions, the shutdown order) over an
in-memory consumer and producer, so a unit test sees exactly what a group would do, and
what it would have made durable, in a few milliseconds::

    harness = HandlerHarness(config)
    harness.assign(("sim.md.trades", 0))
    harness.batch(("sim.md.trades", 0, 0, trade), ("sim.md.trades", 0, 1, trade2))
    assert harness.committed == {("sim.md.trades", 0): 2}
    harness.crash()           # kill -9: what was not committed is gone

Outputs count once committed (the producer flushed or the transaction committed), and
then the runner calls the handler's ``after_commit``, as against Kafka; ``pending`` holds
what a crash would lose.

Restores run too: ``assign`` hands ``on_assign`` a :class:`MemoryAssignContext` over a
:class:`MemoryCluster`, which holds every record the harness saw (the batches' records,
the committed outputs, and what :meth:`HandlerHarness.feed` puts in) and the group's
committed offsets. Give a second harness the first one's cluster and it restarts where
the first crashed or stopped::

    cluster = MemoryCluster()
    first = HandlerHarness(config, cluster)
    ...
    first.crash()
    second = HandlerHarness(config, cluster)  # on_assign reads what first committed
    second.assign(("sim.md.trades", 0))

Integration tests still run groups against the real broker: this is for the logic
between the records and the commits.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from confluent_kafka import OFFSET_STORED, TopicPartition

from pipeline.runtime.context import AssignContext, Follower
from pipeline.runtime.metrics import MetricsRegistry
from pipeline.runtime.runner import (
    GroupConfig,
    GroupRunner,
    GroupStats,
    Handler,
    Output,
    Record,
)

TopicKey = tuple[str, int]  # (topic, partition)
# (topic, partition, offset, value[, key[, timestamp_ms[, headers]]]); value is what the
# decoder gets (bytes for the Avro decoder, anything for the identity decoder)
RecordSpec = tuple[Any, ...]


class _Message:
    """The part of confluent-kafka's ``Message`` the runner reads."""

    __slots__ = ("_topic", "_partition", "_offset", "_value", "_key", "_ts", "_headers")

    def __init__(self, spec: RecordSpec) -> None:
        topic, partition, offset, value, *rest = spec
        self._topic, self._partition, self._offset, self._value = topic, partition, offset, value
        self._key = rest[0] if len(rest) > 0 else None
        self._ts = rest[1] if len(rest) > 1 else 0
        self._headers = list(rest[2]) if len(rest) > 2 else None

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> Any:
        return self._value

    def key(self) -> Any:
        return self._key

    def timestamp(self) -> tuple[int, int]:
        return 1, self._ts  # TIMESTAMP_CREATE_TIME

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers


@dataclass
class MemoryCluster:
    """In-memory topics and committed offsets that outlive one harness (see the module doc).

    A topic is ``{partition: {offset: Record}}``; a record's value is its bytes (what the
    group's decoder gets). An output goes to partition 0 of a topic of one partition, else
    to ``crc32(key) % partitions`` (deterministic, not Kafka's murmur2: tests that care
    name the partition with :meth:`append`).
    """

    topics: dict[str, dict[int, dict[int, Record]]] = field(default_factory=dict)
    committed: dict[str, dict[TopicKey, int]] = field(default_factory=dict)  # per group id
    partition_counts: dict[str, int] = field(default_factory=dict)  # default 1

    def partitions(self, topic: str) -> list[int]:
        return sorted(set(range(self.partition_counts.get(topic, 1)))
                      | set(self.topics.get(topic, {})))

    def append(self, topic: str, value: Any, key: Any = None, *, partition: int | None = None,
               timestamp_ms: int = 0, headers: Iterable[tuple[str, bytes]] = ()) -> Record:
        """A committed record at the end of its partition."""
        if isinstance(key, str):
            key = key.encode()
        if partition is None:
            count = self.partition_counts.get(topic, 1)
            partition = 0 if count == 1 or key is None else zlib.crc32(key) % count
        records = self.topics.setdefault(topic, {}).setdefault(partition, {})
        offset = max(records, default=-1) + 1
        record = Record(topic, partition, offset, key, value, timestamp_ms, tuple(headers))
        records[offset] = record
        return record

    def put(self, record: Record) -> None:
        """A record at its own offset (one consumed by a batch); kept once."""
        self.topics.setdefault(record.topic, {}).setdefault(record.partition, {}) \
            .setdefault(record.offset, record)

    def records(self, topic: str, partitions: Iterable[int] | None = None) -> list[Record]:
        """The records of ``topic`` (of ``partitions``), by partition, then offset."""
        parts = self.topics.get(topic, {})
        wanted = sorted(parts) if partitions is None else sorted(set(partitions))
        return [parts[p][o] for p in wanted if p in parts for o in sorted(parts[p])]

    def end_offsets(self, topic: str, partition: int) -> tuple[int, int]:
        offsets = self.topics.get(topic, {}).get(partition, {})
        return (min(offsets), max(offsets) + 1) if offsets else (0, 0)


class MemoryFollower(Follower):
    def __init__(self, cluster: MemoryCluster, topic: str, starts: dict[int, int]) -> None:
        self.cluster, self.topic = cluster, topic
        self.next = {p: starts.get(p, 0) for p in cluster.partitions(topic)}
        self.closed = False

    def poll(self, max_records: int = 100) -> list[Record]:
        if self.closed:
            return []
        out: list[Record] = []
        for p in self.cluster.partitions(self.topic):
            start = self.next.setdefault(p, 0)
            new = [r for r in self.cluster.records(self.topic, [p]) if r.offset >= start]
            new = new[:max_records - len(out)]
            if new:
                self.next[p] = new[-1].offset + 1
                out += new
        return out

    def close(self) -> None:
        self.closed = True


class MemoryAssignContext(AssignContext):
    """The harness's :class:`AssignContext`: reads of a :class:`MemoryCluster` (only what
    was committed is there, so nothing is ever "open")."""

    def __init__(self, cluster: MemoryCluster, group_id: str) -> None:
        self.cluster, self.group_id = cluster, group_id
        self.reads: list[str] = []  # the topics read, in order (tests assert on them)

    def read_to_end(self, topic: str, timeout_s: float = 60.0,
                    partitions: Iterable[int] | None = None) -> Iterator[Record]:
        self.reads.append(topic)
        return iter(self.cluster.records(topic, partitions))

    def read_range(self, topic: str, ranges: dict[int, tuple[int, int]],
                   timeout_s: float = 60.0) -> Iterator[Record]:
        self.reads.append(topic)
        return iter([r for r in self.cluster.records(topic, ranges)
                     if ranges[r.partition][0] <= r.offset < ranges[r.partition][1]])

    def committed_offsets(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        mine = self.cluster.committed.get(self.group_id, {})
        return {p: mine[(topic, p)] for p in partitions if (topic, p) in mine}

    def end_offsets(self, topic: str, partitions: Iterable[int] | None = None
                    ) -> dict[int, tuple[int, int]]:
        wanted = self.cluster.partitions(topic) if partitions is None else partitions
        return {p: self.cluster.end_offsets(topic, p) for p in sorted(wanted)}

    def follow(self, topic: str, starts: dict[int, int] | None = None) -> Follower:
        return MemoryFollower(self.cluster, topic, dict(starts or {}))


@dataclass
class _Memory:
    """The in-memory consumer and producer (and the transaction) the runner talks to."""

    transactional: bool
    cluster: MemoryCluster
    group_id: str
    assigned: list[TopicKey] = field(default_factory=list)
    starts: dict[TopicKey, int | None] = field(default_factory=dict)
    pending: list[Output] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    pending_offsets: dict[TopicKey, int] = field(default_factory=dict)
    in_transaction: bool = False
    closed: bool = False

    @property
    def committed(self) -> dict[TopicKey, int]:
        return self.cluster.committed.setdefault(self.group_id, {})

    # -- the producer (ReliableProducer, its .raw and .tracker)

    @property
    def raw(self) -> "_Memory":
        return self

    @property
    def tracker(self) -> "_Memory":
        return self

    def produce(self, topic: str, value: Any, key: Any = None, headers: Any = None,
                timestamp: int = 0) -> None:
        if self.transactional and not self.in_transaction:
            raise AssertionError("produce outside a transaction of a transactional group")
        self.pending.append(Output(topic, value, key, headers, timestamp))

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float | None = None) -> int:
        for out in self.pending:
            self.cluster.append(out.topic, out.value, out.key, timestamp_ms=out.timestamp_ms,
                                headers=out.headers or ())
        self.outputs += self.pending
        self.pending = []
        return 0

    def begin_transaction(self) -> None:
        assert not self.in_transaction, "a transaction is already open"
        self.in_transaction = True

    def send_offsets_to_transaction(self, offsets: Sequence[TopicPartition], metadata: Any,
                                    timeout: float) -> None:
        assert self.in_transaction
        self.pending_offsets.update({(tp.topic, tp.partition): tp.offset for tp in offsets})

    def commit_transaction(self, timeout: float) -> None:
        assert self.in_transaction
        self.flush()
        self.committed.update(self.pending_offsets)
        self.pending_offsets, self.in_transaction = {}, False

    def abort_transaction(self, timeout: float) -> None:
        self.pending, self.pending_offsets, self.in_transaction = [], {}, False

    def raise_if_failed(self) -> None:
        return None

    # -- the consumer

    def commit(self, offsets: Sequence[TopicPartition], asynchronous: bool = False) -> None:
        self.committed.update({(tp.topic, tp.partition): tp.offset for tp in offsets})

    def consumer_group_metadata(self) -> None:
        return None

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in self.assigned]

    def assign(self, partitions: Sequence[TopicPartition]) -> None:
        self.starts = {(tp.topic, tp.partition): None if tp.offset == OFFSET_STORED else tp.offset
                       for tp in partitions}

    def close(self) -> None:
        self.closed = True


class _MemoryRunner(GroupRunner):
    """The real runner, restoring through the cluster's context instead of Kafka's."""

    def __init__(self, config: GroupConfig, cluster: MemoryCluster) -> None:
        super().__init__(config, "in-memory")
        self.cluster = cluster
        self.contexts: list[MemoryAssignContext] = []

    def assign_context(self) -> AssignContext:
        ctx = MemoryAssignContext(self.cluster, self.config.group_id)
        self.contexts.append(ctx)
        return ctx


class HandlerHarness:
    """One group instance over in-memory Kafka (see the module doc)."""

    def __init__(self, config: GroupConfig, cluster: MemoryCluster | None = None) -> None:
        self.config = config
        self.cluster = cluster if cluster is not None else MemoryCluster()
        self._memory = _Memory(bool(config.transactional_id), self.cluster, config.group_id)
        self._runner = _MemoryRunner(config, self.cluster)
        self._runner._consumer = self._memory  # type: ignore[assignment]
        self._runner._producer = self._memory  # type: ignore[assignment]

    @classmethod
    def of(cls, handler: Handler, topics: Sequence[str] = ("in",), *,
           dead_letter_topic: str = "dlq", transactional: bool = False,
           cluster: MemoryCluster | None = None) -> "HandlerHarness":
        """A harness for a handler alone: identity decoder, made-up group names."""
        return cls(GroupConfig("harness", list(topics), lambda: handler, dead_letter_topic,
                               transactional_id="harness-0" if transactional else None),
                   cluster)

    @property
    def handler(self) -> Handler:
        return self._runner._handler

    @property
    def stats(self) -> GroupStats:
        return self._runner.stats

    @property
    def metrics(self) -> MetricsRegistry:
        """What the runner and the handler reported (runtime/metrics.py)."""
        return self._runner.metrics

    @property
    def outputs(self) -> list[Output]:
        """Every output made durable so far, dead letters included, in order."""
        return [o for o in self._memory.outputs]

    @property
    def dead_letters(self) -> list[Output]:
        return [o for o in self._memory.outputs if o.topic == self.config.dead_letter_topic]

    @property
    def pending(self) -> list[Output]:
        """Outputs produced but not yet durable: what a crash loses."""
        return list(self._memory.pending)

    @property
    def committed(self) -> dict[TopicKey, int]:
        """The committed offset (the next to read) per (topic, partition)."""
        return dict(self._memory.committed)

    @property
    def last_context(self) -> MemoryAssignContext | None:
        """The context the latest ``on_assign`` got (its ``reads`` list what it read)."""
        return self._runner.contexts[-1] if self._runner.contexts else None

    # -- driving it

    def feed(self, topic: str, value: Any, key: Any = None, *, partition: int | None = None,
             timestamp_ms: int = 0, headers: Iterable[tuple[str, bytes]] = ()) -> Record:
        """A record some other producer committed to ``topic`` (e.g. a state a restore
        reads); returns it with its offset."""
        return self.cluster.append(topic, value, key, partition=partition,
                                   timestamp_ms=timestamp_ms, headers=headers)

    def assign(self, *partitions: TopicKey) -> dict[TopicKey, int | None]:
        """The group is given ``partitions``; returns the start offsets the handler chose
        (``on_assign``; None: the committed offset), empty when it starts at the
        committed offsets."""
        tps = [TopicPartition(t, p) for t, p in partitions]
        self._memory.assigned += [p for p in partitions if p not in self._memory.assigned]
        self._memory.starts = {}
        self._runner._on_assign(self._memory, tps)  # type: ignore[arg-type]
        error, self._runner._callback_error = self._runner._callback_error, None
        if error is not None:
            raise error
        return dict(self._memory.starts)

    def batch(self, *records: RecordSpec) -> list[Output]:
        """One consumed batch, handled and committed as the runner does; the outputs it
        made durable (dead letters included). The records join the cluster's topics (a
        later restore may read them)."""
        before = len(self._memory.outputs)
        messages = [_Message(r) for r in records]
        for m in messages:
            self.cluster.put(Record(m.topic(), m.partition(), m.offset(), m.key(), m.value(),
                                    m.timestamp()[1], tuple(m.headers() or ())))
        self._runner._handle_batch(messages)  # type: ignore[arg-type]
        return self._memory.outputs[before:]

    def tick(self) -> list[Output]:
        """No records for ``tick_s``: the runner's empty batch (``end_batch``, commit)."""
        return self.batch()

    def revoke(self, *partitions: TopicKey) -> list[Output]:
        before = len(self._memory.outputs)
        self._runner._on_revoke(self._memory, [TopicPartition(t, p)  # type: ignore[arg-type]
                                               for t, p in partitions])
        self._memory.assigned = [p for p in self._memory.assigned if p not in partitions]
        return self._memory.outputs[before:]

    def close(self) -> list[Output]:
        """A clean stop (SIGTERM): commit, revoke what is assigned, ``close``, commit."""
        before = len(self._memory.outputs)
        self._runner._shutdown()
        return self._memory.outputs[before:]

    def crash(self) -> list[Output]:
        """``kill -9``: the open transaction and unflushed outputs are gone, nothing more
        is committed; returns what was lost. The harness is finished afterwards."""
        lost = list(self._memory.pending)
        self._memory.pending, self._memory.pending_offsets = [], {}
        self._memory.in_transaction = False
        self._memory.closed = True
        return lost

    def records(self, topic: str) -> Iterable[Output]:
        return [o for o in self._memory.outputs if o.topic == topic]
