"""Reading partitions over fixed offset windows, each to its end exactly once.

A replay (the backtest's :class:`~pipeline.replay.source.ReplaySource`, the topology
replay's :class:`~pipeline.replay.topology_replay.Republisher`) reads a planned window
``[first, end)`` of every partition of some topics (windows are resolved from times and
offsets by :class:`~pipeline.replay.source.RangePlanner`). :class:`PartitionReader` is the
one place that knows when a partition is done:

* a window that is empty (``first >= end``) is done before anything is read;
* a partition is done once a record at ``end - 1`` or later arrived (records at ``end``
  or after are never handed out), once end-of-partition (``enable.partition.eof``)
  reports an offset at or past ``end``, or, when nothing arrives, once the consumer's
  position reached ``end``: a ``read_committed`` consumer never sees the offsets of
  transaction markers or of aborted records, and compaction leaves holes, so the last
  offsets of a window may never be delivered;
* a done partition is paused, and later messages from it (already fetched) are dropped;
* any error other than end-of-partition is a :class:`~pipeline.core.errors.PipelineError`
  naming the partition, and nothing arriving for ``timeout`` seconds while partitions
  are not done is one too ("replay stalled").

It hands records out as *runs*: consecutive records of one partition from one consume
call, in offset order, already cut at the window's end. The hot loops of the callers
then touch each record only for what they need of it (offset, timestamp, value): run
boundaries and window ends cost one ``error()``/``topic()``/``partition()`` per record
and one ``offset()`` per run (a binary search in the one run a window ends in).

The consumer is the caller's (assigned here unless it already reads every window from
its first offset), and so is flow control: :meth:`PartitionReader.pause` and
:meth:`PartitionReader.resume` (which never resumes a partition that is done).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

from confluent_kafka import KafkaError, TopicPartition

from pipeline.core.errors import PipelineError

Source = tuple[str, int]  # (topic, partition)
Window = tuple[int, int]  # [first, end) offsets
_EOF = KafkaError._PARTITION_EOF


class MessageLike(Protocol):
    """What the reader asks of a consumed message (``confluent_kafka.Message``)."""

    def error(self) -> Any: ...

    def topic(self) -> str | None: ...

    def partition(self) -> int | None: ...

    def offset(self) -> int | None: ...


def active_windows(windows: Mapping[Source, Window]) -> dict[Source, Window]:
    """The windows that hold offsets to read (``first < end``), in the given order."""
    return {source: (first, end) for source, (first, end) in windows.items() if first < end}


def cut_at(run: Sequence[MessageLike], end: int) -> int:
    """How many records of ``run`` (one partition's, offsets increasing) are before
    ``end``: its length, or the index of the first record at ``end`` or after."""
    if not run or run[-1].offset() < end:
        return len(run)
    lo, hi = 0, len(run) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if run[mid].offset() >= end:
            hi = mid
        else:
            lo = mid + 1
    return lo


def split_runs(messages: Sequence[MessageLike], ends: Mapping[Source, int]
               ) -> Iterator[tuple[Source | None, int, int, MessageLike | None]]:
    """The pieces of one consume call: ``(source, begin, stop, None)`` for the records
    ``messages[begin:stop]`` of one partition in a row (source None: not one of
    ``ends``), ``(None, i, i, message)`` for an error or end-of-partition event. Pure: no
    window is cut, no partition finished (that is :meth:`PartitionReader.poll`'s)."""
    topic: Any = None
    partition: Any = -1
    source: Source | None = None  # of the run being gathered; None: not in ends
    begin = 0
    for i, msg in enumerate(messages):
        if msg.error() is not None:
            if begin < i:
                yield source, begin, i, None
            yield None, i, i, msg
            topic, partition, begin = None, -1, i + 1
            continue
        if msg.partition() != partition or msg.topic() != topic:
            if begin < i:
                yield source, begin, i, None
            topic, partition, begin = msg.topic(), msg.partition(), i
            source = (topic, partition) if (topic, partition) in ends else None
    if begin < len(messages):
        yield source, begin, len(messages), None


class PartitionReader:
    """Reads ``windows`` (``{(topic, partition): (first, end)}``) with ``consumer`` (its
    ``enable.partition.eof`` on, never committing), each partition to its end once.

    ``assigned``: partitions the consumer already reads from their window's first offset
    (a planner may assign them while it works the windows out); unless that covers every
    window, the windows are assigned here. Call :meth:`poll` until :attr:`done`."""

    def __init__(self, consumer: Any, windows: Mapping[Source, Window], *,
                 timeout: float = 30.0, poll_s: float = 0.1,
                 assigned: Iterable[Source] = (), what: str = "replay") -> None:
        self.consumer, self.timeout, self.poll_s = consumer, timeout, poll_s
        self.what = what  # names the reading in the stall error
        active = active_windows(windows)
        self.ends: dict[Source, int] = {source: end for source, (_, end) in active.items()}
        self.positions: dict[Source, int] = {source: first
                                             for source, (first, _) in active.items()}
        self._idle_since: float | None = None
        already = set(assigned)
        if active and not set(active) <= already:
            consumer.assign([TopicPartition(t, p, first) for (t, p), (first, _) in active.items()])
        elif already - set(active):  # assigned while planning, nothing to read there
            consumer.pause([TopicPartition(t, p) for t, p in sorted(already - set(active))])

    @property
    def done(self) -> bool:
        return not self.ends

    def left(self) -> int:
        """Offsets still to read (an upper bound: markers and holes take offsets too)."""
        positions = self.positions
        return sum(end - positions[source] for source, end in self.ends.items())

    def poll(self, max_messages: int) -> tuple[list[tuple[Source, list[Any]]], list[Source]]:
        """One consume call (of at most ``max_messages``, and no more than is left, so
        the last call does not wait out its timeout): the runs of records inside the
        windows, and the partitions that reached their end in this call (the last run of
        a partition comes before it is reported done)."""
        ends, positions = self.ends, self.positions
        finished: list[Source] = []
        if not ends:
            return [], finished
        messages = self.consumer.consume(max(1, min(max_messages, self.left())), self.poll_s)
        if not messages:
            self._idle(finished)
            return [], finished
        self._idle_since = None
        runs: list[tuple[Source, list[Any]]] = []
        for source, begin, stop, event in split_runs(messages, ends):
            if event is not None:
                self._event(event, finished)
                continue
            end = ends.get(source) if source is not None else None
            if source is None or end is None:
                continue  # not read here, or already done
            run = messages[begin:stop]
            kept = cut_at(run, end)
            if kept < len(run):
                run = run[:kept]
            if run:
                positions[source] = run[-1].offset() + 1
                runs.append((source, run))
            if kept < stop - begin or positions[source] >= end:
                self._finish(source, finished)
        return runs, finished

    def pause(self, sources: Iterable[Source]) -> None:
        wanted = [TopicPartition(t, p) for t, p in sources if (t, p) in self.ends]
        if wanted:
            self.consumer.pause(wanted)

    def resume(self, sources: Iterable[Source]) -> None:
        """Resume ``sources`` that are not done (a done partition stays paused)."""
        wanted = [TopicPartition(t, p) for t, p in sources if (t, p) in self.ends]
        if wanted:
            self.consumer.resume(wanted)

    # -- ends

    def _finish(self, source: Source, finished: list[Source]) -> None:
        if self.ends.pop(source, None) is not None:
            self.consumer.pause([TopicPartition(*source)])
            finished.append(source)

    def _event(self, msg: Any, finished: list[Source]) -> None:
        err = msg.error()
        source = (msg.topic(), msg.partition())
        if err.code() != _EOF:
            raise PipelineError(f"reading {source[0]}[{source[1]}]: {err.str()}")
        end = self.ends.get(source)
        if end is not None:
            self.positions[source] = max(self.positions[source], msg.offset())
            if msg.offset() >= end:
                self._finish(source, finished)

    def _idle(self, finished: list[Source]) -> None:
        """Nothing arrived: partitions whose position reached their end are done (their
        last offsets are transaction markers or aborted or compacted away); nothing for
        ``timeout`` while others are not is a stall."""
        now = time.monotonic()
        if self._idle_since is None:
            self._idle_since = now
        ends = self.ends
        for tp in self.consumer.position([TopicPartition(t, p) for t, p in ends]):
            source = (tp.topic, tp.partition)
            if tp.offset >= 0 and tp.offset >= ends.get(source, 1 << 62):
                self.positions[source] = tp.offset
                self._finish(source, finished)
        if ends and now - self._idle_since > self.timeout:
            waiting = ", ".join(f"{t}[{p}] at {self.positions[(t, p)]} of {e}"
                                for (t, p), e in sorted(ends.items()))
            raise PipelineError(f"{self.what} stalled: nothing arrived for {self.timeout:.0f}s "
                                f"from {waiting}")


def read_windows(consumer: Any, windows: Mapping[Source, Window], *, timeout: float = 30.0,
                 batch: int = 1000, should_stop: Callable[[], bool] = lambda: False,
                 what: str = "replay") -> Iterator[Any]:
    """Every record of ``windows`` once, run by run (in offset order per partition), with
    ``consumer``; for callers that want plain messages rather than runs."""
    reader = PartitionReader(consumer, windows, timeout=timeout, what=what)
    while not reader.done and not should_stop():
        runs, _ = reader.poll(batch)
        for _, run in runs:
            yield from run
