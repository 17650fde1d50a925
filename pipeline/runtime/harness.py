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

Outputs count once committed (the producer flushed or the transaction committed);
``pending`` holds what a crash would lose. Integration tests still run groups against
the real broker: this is for the logic between the records and the commits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from confluent_kafka import TopicPartition

from pipeline.runtime.metrics import MetricsRegistry
from pipeline.runtime.runner import GroupConfig, GroupRunner, GroupStats, Handler, Output

Partition = tuple[str, int]
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
class _Memory:
    """The in-memory consumer and producer (and the transaction) the runner talks to."""

    transactional: bool
    committed: dict[Partition, int] = field(default_factory=dict)
    assigned: list[Partition] = field(default_factory=list)
    starts: dict[Partition, int] = field(default_factory=dict)
    pending: list[Output] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    pending_offsets: dict[Partition, int] = field(default_factory=dict)
    in_transaction: bool = False
    closed: bool = False

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
        self.starts = {(tp.topic, tp.partition): tp.offset for tp in partitions}

    def close(self) -> None:
        self.closed = True


class HandlerHarness:
    """One group instance over in-memory Kafka (see the module doc)."""

    def __init__(self, config: GroupConfig) -> None:
        self.config = config
        self._memory = _Memory(bool(config.transactional_id))
        self._runner = GroupRunner(config, "in-memory")
        self._runner._consumer = self._memory  # type: ignore[assignment]
        self._runner._producer = self._memory  # type: ignore[assignment]

    @classmethod
    def of(cls, handler: Handler, topics: Sequence[str] = ("in",), *,
           dead_letter_topic: str = "dlq", transactional: bool = False) -> "HandlerHarness":
        """A harness for a handler alone: identity decoder, made-up group names."""
        return cls(GroupConfig("harness", list(topics), lambda: handler, dead_letter_topic,
                               transactional_id="harness-0" if transactional else None))

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
    def committed(self) -> dict[Partition, int]:
        """The committed offset (the next to read) per (topic, partition)."""
        return dict(self._memory.committed)

    # -- driving it

    def assign(self, *partitions: Partition) -> dict[Partition, int]:
        """The group is given ``partitions``; returns the start offsets the handler chose
        (``on_assign``), empty when it starts at the committed offsets."""
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
        made durable (dead letters included)."""
        before = len(self._memory.outputs)
        self._runner._handle_batch([_Message(r) for r in records])  # type: ignore[arg-type]
        return self._memory.outputs[before:]

    def tick(self) -> list[Output]:
        """No records for ``tick_s``: the runner's empty batch (``end_batch``, commit)."""
        return self.batch()

    def revoke(self, *partitions: Partition) -> list[Output]:
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
