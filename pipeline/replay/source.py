"""Reading topics for a replay: the Kafka side of the backtest.

:class:`ReplaySource` reads any catalog topics holding ``Bar``, ``BookSnapshot``,
``Trade`` or ``L2Update`` records over a range, decodes them in batches and hands them to
an :class:`~pipeline.backtest.engine.EventMerger`, which puts partitions and topics into one
event-time order (see ``pipeline/backtest/engine.py``). The range is either

* a time range ``[start_ms, end_ms)`` of Kafka record timestamps: each partition is read
  from ``Consumer.offsets_for_times(start_ms)`` up to ``offsets_for_times(end_ms)``, and
  records in between whose timestamp falls outside are skipped too (timestamps are set
  by producers and need not grow within a partition); for bars loaded from files the
  timestamp is the bar's start, for market data the time it was produced; or
* explicit offsets ``{(topic, partition): (first, end)}`` (end exclusive); partitions not
  named are read whole.

It reads ``read_committed`` (requests and snapshots are written in transactions), with a
private consumer that never commits, through
:class:`~pipeline.kafka.partition_reader.PartitionReader` (each partition's window to its
end exactly once: empty windows, transaction markers and aborted records at the end,
end-of-partition and stalls). Flow control: a partition far ahead of the others
is paused until the merge has caught up, so memory stays bounded by ``max_buffered``
events per partition, not by the range.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Decoder
from pipeline.backtest.engine import KIND_OF_SCHEMA, Event, EventMerger, event_time_us
from pipeline.core.errors import PipelineError, SerdeError
from pipeline.kafka.catalog import split_topic
from pipeline.kafka.clients import consumer_config
from pipeline.kafka.partition_reader import PartitionReader
from pipeline.replay.ranges import Offsets, utc_text


@dataclass
class PartitionPlan:
    topic: str
    partition: int
    first: int  # first offset to read
    end: int  # exclusive
    low: int  # the partition's low watermark when planned
    high: int  # and its high watermark


@dataclass
class ReadStats:
    records: int = 0  # records handed to the merge
    skipped_time: int = 0  # inside the offset window but outside the time range
    tombstones: int = 0
    undecodable: int = 0
    first_undecodable: str | None = None
    per_topic: dict[str, int] = field(default_factory=dict)


_DECODERS: dict[str, Decoder] = {}


def decoder_for(registry_url: str) -> Decoder:
    """One decoder (and registry client) per registry URL and process: schemas by id are
    immutable, so what one replay compiled serves the next."""
    decoder = _DECODERS.get(registry_url)
    if decoder is None:
        decoder = _DECODERS[registry_url] = Decoder(SchemaRegistry(registry_url))
    return decoder


def kind_of_topic(topic: str) -> str:
    parsed = split_topic(topic)
    schema = parsed[1].value_schema if parsed else None
    kind = KIND_OF_SCHEMA.get(schema or "")
    if kind is None:
        replayable = ", ".join(sorted(n for n, s in _replayable().items()))
        raise PipelineError(f"cannot replay {topic}: its records are "
                            f"{schema or 'not a catalog record type'}; replay {replayable}")
    return kind


def _replayable() -> dict[str, str]:
    from pipeline.kafka.catalog import TOPICS

    return {t.name: t.value_schema for t in TOPICS if t.value_schema in KIND_OF_SCHEMA}


def _check_range(topics: Sequence[str], start_ms: int | None, end_ms: int | None) -> None:
    if not topics:
        raise PipelineError("nothing to replay: no topics given")
    if start_ms is not None and end_ms is not None and end_ms <= start_ms:
        raise PipelineError(f"the time range is empty: end {end_ms} is not after "
                            f"start {start_ms}")


class RangePlanner:
    """Resolves a range of topics (time range and/or offsets) into one offset window per
    partition, with a private consumer that never commits. :class:`ReplaySource` reads the
    windows decoded for backtests; ``.topology_replay`` copies them into a replay namespace."""

    def __init__(self, bootstrap: str, topics: Sequence[str], *, start_ms: int | None = None,
                 end_ms: int | None = None, offsets: Offsets | None = None,
                 timeout: float = 30.0) -> None:
        _check_range(topics, start_ms, end_ms)
        self.bootstrap, self.topics = bootstrap, list(dict.fromkeys(topics))
        self.start_ms, self.end_ms, self.offsets = start_ms, end_ms, offsets or {}
        self.timeout = timeout
        self.consumer = Consumer(consumer_config(
            bootstrap, f"replay-{uuid.uuid4()}", **{"enable.partition.eof": True,
                                                   "fetch.wait.max.ms": 10,
                                                   "max.partition.fetch.bytes": 8 << 20}))
        # partitions the consumer reads from the beginning already (assigned while planning)
        self.assigned: set[tuple[str, int]] = set()
        try:
            self.plan = self._plan()
        except BaseException:
            self.consumer.close()
            raise
        self.total = sum(p.end - p.first for p in self.plan)

    # -- planning

    def _plan(self) -> list[PartitionPlan]:
        meta = {}
        try:
            # An offsets request first: it connects to the leader at once, where a first
            # metadata request waits ~50 ms for librdkafka to bring a broker up.
            self.consumer.get_watermark_offsets(TopicPartition(self.topics[0], 0), timeout=2)
        except KafkaException:
            pass  # an unknown topic: the metadata below says so
        try:
            for topic in self.topics:
                meta.update(self.consumer.list_topics(topic, timeout=self.timeout).topics)
        except KafkaException as exc:
            raise PipelineError(f"Kafka at {self.bootstrap} does not answer "
                                f"({exc.args[0].str()})") from None
        missing = [t for t in self.topics if t not in meta or meta[t].error is not None
                   or not meta[t].partitions]
        if missing:
            namespace = missing[0].split(".", 1)[0]
            everything = self.consumer.list_topics(timeout=self.timeout).topics
            have = sorted(t for t in everything if t.startswith(namespace + "."))
            raise PipelineError(f"topic(s) {', '.join(missing)} do not exist"
                                + (f"; {namespace} has {', '.join(have)}" if have else
                                   f"; there is no topic in namespace {namespace}"))
        for (topic, partition) in self.offsets:
            if topic not in self.topics or partition not in meta[topic].partitions:
                raise PipelineError(f"offsets given for {topic}[{partition}], which is not a "
                                    f"partition of the replayed topics")
        if self.start_ms is None:
            # Start fetching now, while the plan is worked out (first = the beginning).
            self.assigned = {(t, p) for t in self.topics for p in meta[t].partitions
                           if (t, p) not in self.offsets}
            if self.assigned:
                self.consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING)
                                      for t, p in sorted(self.assigned)])
        partitions = [(t, p) for t in self.topics for p in sorted(meta[t].partitions)]
        lows, highs = self._watermarks(partitions)
        starts = self._offsets_for_time(partitions, self.start_ms, highs) \
            if self.start_ms is not None else lows
        stops = self._offsets_for_time(partitions, self.end_ms, highs) \
            if self.end_ms is not None else highs
        plan = []
        for source in partitions:
            low, high = lows[source], highs[source]
            first, end = low, high
            if source in self.offsets:
                given = self.offsets[source]
                if not 0 <= given[0] <= given[1]:
                    raise PipelineError(f"bad offset range [{given[0]}, {given[1]}) for "
                                        f"{source[0]}[{source[1]}]")
                first, end = max(given[0], low), min(given[1], high)
            first, end = max(first, starts[source]), min(end, stops[source])
            plan.append(PartitionPlan(source[0], source[1], first, max(first, end), low, high))
        return plan

    def _watermarks(self, partitions: list[tuple[str, int]]
                    ) -> tuple[dict[tuple[str, int], int], dict[tuple[str, int], int]]:
        """Low and high (last stable, as we read committed) offsets of every partition in
        two ListOffsets requests: Kafka's special timestamps -2 (earliest) and -1 (latest);
        one request per partition if that fails."""
        try:
            lows = self._list_offsets(partitions, -2)
            highs = self._list_offsets(partitions, -1)
            return lows, highs
        except (KafkaException, PipelineError):
            pass
        lows, highs = {}, {}
        for source in partitions:
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    lows[source], highs[source] = self.consumer.get_watermark_offsets(
                        TopicPartition(*source), timeout=self.timeout)
                    break
                except KafkaException as exc:
                    if time.monotonic() > deadline:
                        raise PipelineError(f"cannot read the offsets of {source[0]}"
                                            f"[{source[1]}]: {exc.args[0].str()}") from None
                    time.sleep(0.1)
        return lows, highs

    def _list_offsets(self, partitions: list[tuple[str, int]], spec: int
                      ) -> dict[tuple[str, int], int]:
        found = self.consumer.offsets_for_times([TopicPartition(t, p, spec) for t, p in partitions],
                                                timeout=self.timeout)
        out = {}
        for tp in found:
            if tp.error is not None or tp.offset < 0:
                raise PipelineError(f"no offsets for {tp.topic}[{tp.partition}]")
            out[(tp.topic, tp.partition)] = tp.offset
        return out

    def _offsets_for_time(self, partitions: list[tuple[str, int]], when_ms: int,
                          highs: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        """Per partition, the first offset whose timestamp is at or after ``when_ms`` (the
        high watermark where there is none)."""
        try:
            found = self.consumer.offsets_for_times(
                [TopicPartition(t, p, when_ms) for t, p in partitions], timeout=self.timeout)
        except KafkaException as exc:
            raise PipelineError(f"cannot look up offsets at time {when_ms}: "
                                f"{exc.args[0].str()}") from None
        out = {}
        for tp in found:
            source = (tp.topic, tp.partition)
            if tp.error is not None:
                raise PipelineError(f"cannot look up {tp.topic}[{tp.partition}] at time "
                                    f"{when_ms}: {tp.error.str()}")
            out[source] = highs[source] if tp.offset < 0 else tp.offset
        return out

    def describe_empty(self) -> str:
        """Why a plan holds nothing: the time span each topic does hold."""
        spans = []
        for topic in self.topics:
            stamps = []
            for p in self.plan:
                if p.topic == topic and p.high > p.low:
                    stamps += [self._timestamp_at(p, p.low), self._timestamp_at(p, p.high - 1)]
            stamps = [s for s in stamps if s is not None]
            if stamps:
                spans.append(f"{topic} holds records stamped {utc_text(min(stamps))} to "
                             f"{utc_text(max(stamps))}")
            else:
                spans.append(f"{topic} is empty")
        return "; ".join(spans)

    def _timestamp_at(self, plan: PartitionPlan, offset: int) -> int | None:
        probe = Consumer(consumer_config(self.bootstrap, f"replay-probe-{uuid.uuid4()}"))
        try:
            probe.assign([TopicPartition(plan.topic, plan.partition, offset)])
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                for msg in probe.consume(1, 0.5):
                    if not msg.error():
                        return msg.timestamp()[1]
            return None
        finally:
            probe.close()

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ReplaySource(RangePlanner):
    """Plans and reads a replay; iterate :meth:`batches` for ordered events."""

    def __init__(self, bootstrap: str, registry_url: str, topics: Sequence[str], *,
                 start_ms: int | None = None, end_ms: int | None = None,
                 offsets: Offsets | None = None, batch_size: int = 10_000,
                 max_buffered: int = 200_000, timeout: float = 30.0) -> None:
        _check_range(topics, start_ms, end_ms)
        self.batch_size, self.max_buffered = batch_size, max_buffered
        self.kinds = {t: kind_of_topic(t) for t in dict.fromkeys(topics)}
        self.decoder = decoder_for(registry_url)
        self.stats = ReadStats()
        super().__init__(bootstrap, topics, start_ms=start_ms, end_ms=end_ms, offsets=offsets,
                         timeout=timeout)

    # -- reading

    def batches(self, should_stop: Callable[[], bool] = lambda: False,
                progress: Callable[[int], None] | None = None) -> Iterator[list[Event]]:
        """Ordered batches of events until the plan is read (or ``should_stop()``);
        ``progress(offsets)`` is called with the summed read positions."""
        merger = EventMerger((p.topic, p.partition) for p in self.plan)
        for p in self.plan:
            if p.first >= p.end:
                merger.finish(p.topic, p.partition)
        reader = PartitionReader(self.consumer, {(p.topic, p.partition): (p.first, p.end)
                                                 for p in self.plan},
                                 timeout=self.timeout, assigned=self.assigned)
        if reader.done:
            return
        # per source: [running max event time, kind]
        state = {source: [-(1 << 62), self.kinds[source[0]]] for source in reader.ends}
        stats = self.stats
        decode = self.decoder
        prefix, read = b"", None  # the last schema's wire header and compiled reader
        start_ms, end_ms = self.start_ms, self.end_ms
        timed = start_ms is not None or end_ms is not None
        paused: set[tuple[str, int]] = set()
        last_progress = time.monotonic()
        while not reader.done:
            if should_stop():
                return
            runs, finished = reader.poll(self.batch_size)
            gathered: dict[tuple[str, int], list] = {}
            for source, run in runs:
                topic, partition = source
                current = state[source]
                key, kind = current
                events = gathered.get(source)
                if events is None:
                    events = gathered[source] = []
                append = events.append
                for msg in run:
                    if timed:
                        stamp = msg.timestamp()[1]
                        if (start_ms is not None and stamp < start_ms) or \
                                (end_ms is not None and stamp >= end_ms):
                            stats.skipped_time += 1
                            continue
                    value = msg.value()
                    if value is None:
                        stats.tombstones += 1
                        continue
                    record = None
                    if read is not None and value.startswith(prefix):  # the compiled fast path
                        try:
                            record, stop = read(value, 5)
                            if stop != len(value):
                                record = None
                        except Exception:  # noqa: BLE001 - the full decoder says what is wrong
                            record = None
                    if record is None:
                        try:
                            record = decode(value)
                        except SerdeError as exc:
                            stats.undecodable += 1
                            if stats.first_undecodable is None:
                                stats.first_undecodable = f"{topic}[{partition}]@" \
                                                          f"{msg.offset()}: {exc}"
                            continue
                        if len(value) >= 5:
                            prefix, read = value[:5], decode.reader(value[1:5])
                    t = event_time_us(kind, record)
                    if t > key:
                        key = t
                    append((key, topic, partition, msg.offset(), kind, record))
                current[0] = key
            for source, events in gathered.items():
                if events:
                    merger.extend(source[0], source[1], events)
                    stats.records += len(events)
                    stats.per_topic[source[0]] = stats.per_topic.get(source[0], 0) + len(events)
            for source in finished:
                merger.finish(*source)
            self._flow_control(merger, reader, paused)
            ready = merger.ready()
            if progress is not None and (ready or time.monotonic() - last_progress > 0.5):
                last_progress = time.monotonic()
                progress(sum(reader.positions.values()))
            if ready:
                yield ready
        ready = merger.ready()
        if progress is not None:
            progress(sum(reader.positions.values()))
        if ready:
            yield ready

    def _flow_control(self, merger: EventMerger, reader: PartitionReader, paused: set) -> None:
        """Pause a partition far ahead of the merge (more than ``max_buffered`` events
        waiting), resume it at half that; never hold back one the merge waits for."""
        ends = reader.ends
        if len(ends) < 2:
            if paused:
                reader.resume(paused)
                paused.clear()
            return
        for source in list(ends):
            n = merger.buffered(*source)
            if source not in paused and n > self.max_buffered:
                reader.pause([source])
                paused.add(source)
            elif source in paused and n <= self.max_buffered // 2:
                reader.resume([source])
                paused.discard(source)
        blocked = [s for s in paused if s in ends and merger.buffered(*s) == 0]
        if blocked:
            reader.resume(blocked)
            paused.difference_update(blocked)
