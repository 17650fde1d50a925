"""What a handler is given by the runtime instead of Kafka clients.

* :class:`Partition` names a partition (and, where it matters, an offset) in the
  handler's hooks: ``on_assign`` and ``on_revoke`` receive them, ``on_assign`` may return
  them with the offsets to start reading at. The runner converts to and from
  confluent-kafka's ``TopicPartition`` at its edge.
* :class:`AssignContext` is what ``on_assign`` restores state with: committed records of
  a topic (to its end, or a range), the group's committed offsets, end offsets, and a
  follower of a topic, all bound to the runner's cluster and group. The runner hands a
  Kafka one (:class:`pipeline.runtime.runner.KafkaAssignContext`), the in-memory harness one
  over the records it holds (:class:`pipeline.runtime.harness.MemoryAssignContext`), so a
  handler never builds a consumer itself and its restore runs in unit tests.

Records read through a context are :class:`~pipeline.runtime.runner.Record` values whose
``value`` is the record's bytes (the handler decodes them: a restore decides itself what
an unreadable record means).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

if TYPE_CHECKING:
    from pipeline.runtime.runner import Record

# Kafka's logical offsets, for Partition.offset (librdkafka's values, passed through).
BEGINNING = -2  # the oldest record the partition retains
END = -1  # the partition's end: only records written from now on


@dataclass(frozen=True, slots=True)
class Partition:
    """A topic partition; ``offset`` where reading starts (None: the group's committed
    offset, or where nothing was committed, the configured reset)."""

    topic: str
    partition: int
    offset: int | None = None

    def at(self, offset: int | None) -> "Partition":
        """This partition, to be read from ``offset``."""
        return Partition(self.topic, self.partition, offset)

    @property
    def key(self) -> tuple[str, int]:
        """``(topic, partition)``, the key of ``commit_offsets``' and ``after_commit``'s maps."""
        return self.topic, self.partition


class Follower(ABC):
    """Reads a topic onwards from given offsets (read_committed), outside the group."""

    @abstractmethod
    def poll(self, max_records: int = 100) -> list[Record]:
        """The records that arrived since the last poll (at most ``max_records``), at once."""

    @abstractmethod
    def close(self) -> None:
        """Stop following (idempotent)."""


class AssignContext(ABC):
    """The reads a handler restores its state with, bound to the runner's cluster and
    group (see the module doc). Every read is read_committed."""

    group_id: str

    @abstractmethod
    def read_to_end(self, topic: str, timeout_s: float = 60.0,
                    partitions: Iterable[int] | None = None) -> Iterator[Record]:
        """Every committed record of ``topic`` (of ``partitions``, default all) up to its
        end as of the call, in offset order per partition. Waits first until records
        written before the call are decided (an open transaction of a dead member is never
        taken for the end), raising :class:`~pipeline.core.errors.PipelineError` after
        ``timeout_s``."""

    @abstractmethod
    def read_range(self, topic: str, ranges: dict[int, tuple[int, int]],
                   timeout_s: float = 60.0) -> Iterator[Record]:
        """The committed records of ``topic`` in ``{partition: (first, end)}`` (end
        exclusive)."""

    @abstractmethod
    def committed_offsets(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        """This group's committed next offset per partition of ``topic`` (absent: none)."""

    @abstractmethod
    def end_offsets(self, topic: str, partitions: Iterable[int] | None = None
                    ) -> dict[int, tuple[int, int]]:
        """``{partition: (low, high)}``: the first retained offset and the committed end of
        each partition of ``topic`` (default all)."""

    def partitions(self, topic: str) -> list[int]:
        """The partition numbers of ``topic``."""
        return sorted(self.end_offsets(topic))

    @abstractmethod
    def follow(self, topic: str, starts: dict[int, int] | None = None) -> Follower:
        """A :class:`Follower` of every partition of ``topic``, from ``starts`` (default
        and for partitions not in it: the beginning). The caller closes it."""

    def close(self) -> None:
        """The runner's call once ``on_assign`` returned: what the reads held is released
        (followers stay open until their own ``close``)."""
        return None
