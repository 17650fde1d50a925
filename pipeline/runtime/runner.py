"""The consumer-group runtime every group in ``consumers/`` runs on.

A group is configuration: a group id, the topics it reads, a decoder and a handler.
The runtime owns the Kafka side of the loop:

1. consume a batch;
2. decode each record and hand it to the handler; a record that cannot be decoded or
   that the handler raises on goes to the dead-letter topic with its original bytes,
   and the batch goes on;
3. produce every output, then make it durable (flush, or commit the transaction);
4. commit the consumed offsets, only now that the whole batch is handled;
5. tell the handler (``after_commit``): only now may it write what must follow a commit
   (Parquet files of committed records), never after a failed commit or an abort.

So a crash anywhere re-delivers at most the uncommitted batch, never loses one. With a
``transactional_id`` the outputs and the input offsets commit atomically (exactly once
for read_committed readers). On SIGTERM/SIGINT the current batch is finished and
committed, the handler flushes, and the consumer leaves the group before exit.

Handlers never see a Kafka client: partitions are :class:`~pipeline.runtime.context.Partition`
values, and ``on_assign`` restores through an :class:`~pipeline.runtime.context.AssignContext`
(:class:`KafkaAssignContext` here) bound to the runner's cluster and group.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_STORED,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from pipeline.core.cluster import Cluster
from pipeline.core.errors import PipelineError
from pipeline.kafka.catalog import watermarks
from pipeline.kafka.clients import (
    ReliableProducer,
    check_reachable,
    consumer_config,
    make_admin,
    reader_config,
)
from pipeline.kafka.deadletter import STAGE_DECODE, STAGE_HANDLE, dead_letter_headers
from pipeline.kafka.partition_reader import read_windows
from pipeline.runtime.context import AssignContext, Follower, Partition
from pipeline.runtime.metrics import (
    NULL_METRICS,
    Metrics,
    MetricsRegistry,
    MetricsWriter,
    process_metrics_path,
    report_totals,
)

log = logging.getLogger(__name__)
DEFAULT_STALL_LIMIT_S = 240.0  # beyond every Kafka call's own timeout (commit: 60 s)
OFFSETS_TIMEOUT_S = 30.0  # send_offsets_to_transaction's timeout
# librdkafka ignores that timeout while the group coordinator is down or decommissioned
# (confluentinc/librdkafka#5456 and #5511, open in 2.16): the call can hang for good, as
# the chaos run saw after a broker kill. The watchdog ends the process this long past it.
OFFSETS_GRACE_S = 30.0
EXIT_STALLED = 75  # the exit code of a process its watchdog ended (EX_TEMPFAIL)


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed record after decoding; ``value`` is whatever the decoder returned."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: Any
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Output:
    """One record a handler wants produced; ``value`` is already encoded."""

    topic: str
    value: bytes | None
    key: bytes | str | None = None
    headers: list[tuple[str, bytes]] | None = None
    timestamp_ms: int = 0


class Handler:
    """A group's logic. Override ``handle``; the other hooks are optional.

    Handlers see decoded records and return outputs; they never touch the consumer or
    the producer (restores read through the ``AssignContext`` given to ``on_assign``), so
    the same logic runs under tests (:class:`~pipeline.runtime.harness.HandlerHarness`)
    and replays.

    The order of calls per batch: ``handle`` for each record, ``end_batch``,
    ``commit_offsets``, then the commit (the transaction's, or flush and offset commit),
    then ``after_commit`` if it succeeded. ``on_revoke`` and ``close`` are followed by a
    commit (and ``after_commit``) of their own.
    """

    metrics: Metrics = NULL_METRICS  # the runner binds its registry (runtime/metrics.py)

    def handle(self, record: Record) -> Iterable[Output]:
        raise NotImplementedError

    def end_batch(self) -> Iterable[Output]:
        """Called after each batch, before it is made durable: emit periodic output here."""
        return ()

    def on_assign(self, ctx: AssignContext, partitions: list[Partition]
                  ) -> list[Partition] | None:
        """Partitions this instance now owns: restore state for them, reading through
        ``ctx`` (committed records, the group's committed offsets). Return them with
        offsets set to start reading somewhere other than the committed offsets (e.g. just
        after a checkpoint; ``offset=None``: the committed offset); return None to start
        every one at the committed offsets."""
        return None

    def commit_offsets(self, offsets: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        """The offsets to commit after a batch, given the next offset to read per
        (topic, partition). Lower one to keep records whose effect is still only in memory
        (e.g. trades of a bar that has not closed yet) so a restart reads them again."""
        return offsets

    def after_commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """The batch (or revoke, or close) is durable: every output produced since the
        last commit is acknowledged (with a ``transactional_id``: the transaction
        committed), and ``offsets`` (what ``commit_offsets`` chose; empty when none were
        due) are committed. Write what may only follow a commit here, e.g. Parquet rows
        of committed records. Never called after a failed commit or an abort: a handler
        whose commit failed is never called again."""
        return None

    def on_revoke(self, partitions: list[Partition]) -> Iterable[Output]:
        """Partitions this instance loses: flush their state; outputs are made durable."""
        return ()

    def close(self) -> Iterable[Output]:
        """Clean shutdown: final outputs, made durable before the consumer closes."""
        return ()


Decoder = Callable[[bytes | None], Any]  # value bytes -> value; raises on bad input


def raw_value(value: bytes | None) -> bytes | None:
    """The identity decoder: the record's value bytes."""
    return value


@dataclass
class GroupConfig:
    group_id: str
    topics: Sequence[str]
    handler: Callable[[], Handler]
    dead_letter_topic: str
    decoder: Decoder = raw_value
    batch_size: int = 500
    poll_timeout_s: float = 0.2  # how long to wait for a first record when none has come
    tick_s: float = 1.0  # with no records for this long, the handler still gets end_batch()
    transactional_id: str | None = None
    consumer_overrides: Mapping[str, Any] = field(default_factory=dict)
    producer_overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class GroupStats:
    records: int = 0
    outputs: int = 0
    dead_letters: int = 0
    batches: int = 0
    commits: int = 0
    last_error: str | None = None

    def report(self, metrics: MetricsRegistry) -> None:
        """The figures as the metrics interface's counters (a collector)."""
        report_totals(metrics, (("records_total", self.records),
                                ("outputs_total", self.outputs),
                                ("dead_letters_total", self.dead_letters),
                                ("batches_total", self.batches), ("commits_total", self.commits)))


def stall_reason(now: float, alive_at: float, limit_s: float,
                 bounded: tuple[float, str] | None) -> str | None:
    """Why the watchdog must end the process, or None: one step of the loop has not
    returned for ``limit_s``, or a call known to overrun its own timeout is past the
    deadline it was given (``bounded``: the deadline and the call's name)."""
    if bounded is not None and now > bounded[0]:
        return f"{bounded[1]} is {now - bounded[0]:.0f} s past its timeout and grace " \
               "(a librdkafka hang)"
    if now - alive_at > limit_s:
        return f"one step has not returned for {now - alive_at:.0f} s (limit {limit_s:.0f} s)"
    return None


class GroupRunner:
    """Runs one instance of a consumer group until stopped."""

    def __init__(self, config: GroupConfig, bootstrap: str) -> None:
        self.config = config
        self.bootstrap = bootstrap
        self.stats = GroupStats()
        self._stop = threading.Event()
        self._handler = config.handler()
        self.metrics = MetricsRegistry(group=config.group_id)
        self.metrics.collect(lambda metrics: self.stats.report(metrics))
        self._handler.metrics = self.metrics
        path = process_metrics_path()  # set when the supervisor runs this process
        self._metrics_out = MetricsWriter(self.metrics, path) if path is not None else None
        self._next_offsets: dict[tuple[str, int], int] = {}
        self._consumer: Consumer | None = None
        self._producer: ReliableProducer | None = None
        self._in_transaction = False
        self._closing = False
        self._callback_error: Exception | None = None
        self.alive_at = time.monotonic()  # when the loop last began a step (the watchdog's)
        self._bounded: tuple[float, str] | None = None  # a call's own deadline, and its name

    # -- lifecycle

    def stop(self) -> None:
        """Ask the loop to finish its batch, commit and exit (safe from signal handlers)."""
        self._stop.set()

    def install_signal_handlers(self, stall_limit_s: float | None = None) -> None:
        """For a runner that is its process: SIGTERM/SIGINT stop it, and a watchdog ends
        the process when one step of the loop (a Kafka call, a batch, a restore) has not
        returned for ``stall_limit_s`` (default ``PIPELINE_STALL_LIMIT_S`` or 240 s), with
        every thread's stack in the log, so that the supervisor restarts it. librdkafka
        calls are bounded by their timeouts, but a process that is alive and consumes
        nothing helps no one (the chaos run saw a strategy do that after a broker kill);
        a restart loses nothing: the transaction in flight is aborted, the offsets hold."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.stop())
        limit = stall_limit_s if stall_limit_s is not None else float(
            os.environ.get("PIPELINE_STALL_LIMIT_S") or DEFAULT_STALL_LIMIT_S)
        threading.Thread(target=self._watchdog, args=(limit,), name="stall-watchdog",
                         daemon=True).start()

    def _watchdog(self, limit_s: float) -> None:
        while not self._stop.wait(min(5.0, limit_s / 4)):
            reason = stall_reason(time.monotonic(), self.alive_at, limit_s, self._bounded)
            if reason is not None:
                log.error("group %s: %s: exiting so that it is restarted; the stacks follow",
                          self.config.group_id, reason)
                faulthandler.dump_traceback(all_threads=True)
                sys.stderr.flush()
                os._exit(EXIT_STALLED)

    def run(self, *, idle_timeout_s: float | None = None, max_records: int | None = None,
            ) -> GroupStats:
        """Consume until stopped (or idle for ``idle_timeout_s``, or ``max_records`` seen)."""
        self._check_topics()
        cfg = self.config
        overrides = dict(cfg.producer_overrides)
        if cfg.transactional_id:
            # A transaction begun just after the last one's commit waits while the broker
            # writes that one's markers (CONCURRENT_TRANSACTIONS); the client retries after
            # retry.backoff.ms, 100 ms by default: each group hop's p99 was that retry.
            overrides = {"retry.backoff.ms": 2, "retry.backoff.max.ms": 10, **overrides,
                         "transactional.id": cfg.transactional_id}
        self._producer = ReliableProducer(self.bootstrap, **overrides)
        if cfg.transactional_id:
            self._producer.raw.init_transactions(30)
        self._consumer = Consumer(consumer_config(self.bootstrap, cfg.group_id,
                                                  **cfg.consumer_overrides))
        self._consumer.subscribe(list(cfg.topics), on_assign=self._on_assign,
                                 on_revoke=self._on_revoke, on_lost=self._on_lost)
        log.info("group %s consuming %s", cfg.group_id, ", ".join(cfg.topics))
        last_data = last_batch = time.monotonic()
        try:
            while not self._stop.is_set():
                self.alive_at = time.monotonic()
                msgs = self._next_batch()
                now = time.monotonic()
                if msgs:
                    last_data = last_batch = now
                    self._handle_batch(msgs)
                elif idle_timeout_s is not None and now - last_data > idle_timeout_s:
                    break
                elif now - last_batch >= cfg.tick_s:
                    last_batch = now
                    self._handle_batch([])  # time passes: let the handler close what is due
                if max_records is not None and self.stats.records >= max_records:
                    break
                if self._metrics_out is not None:
                    self._metrics_out.maybe()
            self._shutdown()
            if self._metrics_out is not None:
                self._metrics_out.write()
        except BaseException as exc:
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            self._abort()
            raise
        return self.stats

    # -- the batch

    def _next_batch(self) -> list[Message]:
        """What has arrived, up to ``batch_size``; when nothing has, wait up to
        ``poll_timeout_s`` for the first record only. (``consume(n, timeout)`` waits out
        the whole timeout unless n records come: at a few hundred records/s every hop
        through a group cost ~poll_timeout_s of latency.)"""
        consume, size = self._consumer.consume, self.config.batch_size
        msgs = consume(size, 0)
        if not msgs:
            msgs = consume(1, self.config.poll_timeout_s)
            if msgs and size > 1:
                msgs += consume(size - 1, 0)
        if self._callback_error is not None:
            error, self._callback_error = self._callback_error, None
            raise PipelineError(f"group {self.config.group_id}: restoring its state on "
                                f"assignment failed: {type(error).__name__}: {error}") from error
        return msgs

    def _handle_batch(self, msgs: list[Message]) -> None:
        self._begin()
        for msg in msgs:
            err = msg.error()
            if err is not None:
                self._on_consume_error(err)
                continue
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            self._next_offsets[(topic, partition)] = offset + 1
            self.stats.records += 1
            try:
                value = self.config.decoder(msg.value())
            except Exception as exc:  # noqa: BLE001 - any decode failure is a dead letter
                self._dead_letter(msg, exc, STAGE_DECODE)
                continue
            record = Record(topic, partition, offset, msg.key(), value,
                            msg.timestamp()[1], tuple(msg.headers() or ()))
            try:
                outputs = list(self._handler.handle(record) or ())
            except Exception as exc:  # noqa: BLE001 - the handler's bug must not stop the group
                self._dead_letter(msg, exc, STAGE_HANDLE)
                continue
            self._produce(outputs)
        self._produce(self._handler.end_batch())
        self._commit()
        self.stats.batches += bool(msgs)

    def _on_consume_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        # A fatal error arrives as a message error of code _FATAL whose fatal() is False
        # (librdkafka flags the handle, not the message): e.g. a static member fenced by
        # its own rejoin after the group coordinator's broker died. The consumer is dead
        # then, so the group must exit and be restarted, not idle on (found by `pipeline
        # chaos`: the portfolio group stopped for good after a broker kill).
        if err.fatal() or err.code() in (KafkaError._FATAL, KafkaError.FENCED_INSTANCE_ID,
                                         KafkaError.UNKNOWN_TOPIC_OR_PART,
                                         KafkaError.TOPIC_AUTHORIZATION_FAILED):
            raise PipelineError(f"group {self.config.group_id}: {err.str()}")
        log.warning("group %s: consume error: %s", self.config.group_id, err.str())

    def _dead_letter(self, msg: Message, exc: BaseException, stage: str) -> None:
        self.stats.dead_letters += 1
        self.stats.last_error = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}: {exc}"
        log.warning("group %s: dead-lettering %s (%s: %s)", self.config.group_id,
                    f"{msg.topic()}[{msg.partition()}]@{msg.offset()}", type(exc).__name__, exc)
        headers = dead_letter_headers(
            source_topic=msg.topic(), source_partition=msg.partition(), source_offset=msg.offset(),
            owner=self.config.group_id, stage=stage, error=exc,
            original_headers=list(msg.headers() or ()))
        self._produce([Output(self.config.dead_letter_topic, msg.value(), msg.key(), headers,
                              msg.timestamp()[1])])

    def _produce(self, outputs: Iterable[Output]) -> None:
        assert self._producer is not None
        for out in outputs:
            self._producer.produce(out.topic, out.value, out.key, out.headers, out.timestamp_ms)
            self.stats.outputs += 1
        self._producer.poll(0)

    # -- durability

    def _begin(self) -> None:
        if self.config.transactional_id and not self._in_transaction:
            self._producer.raw.begin_transaction()  # type: ignore[union-attr]
            self._in_transaction = True

    def _pending_offsets(self) -> dict[tuple[str, int], int]:
        if not self._next_offsets:
            return {}
        chosen = self._handler.commit_offsets(dict(self._next_offsets))
        return {tp: o for tp, o in chosen.items() if o >= 0}

    def _commit(self) -> None:
        """Make outputs durable, then commit the consumed offsets; then ``after_commit``."""
        assert self._producer is not None and self._consumer is not None
        chosen = self._pending_offsets()
        offsets = [TopicPartition(t, p, o) for (t, p), o in chosen.items()]
        committed = True
        if self.config.transactional_id:
            if not self._in_transaction:
                return
            if offsets:
                self._bounded = (time.monotonic() + OFFSETS_TIMEOUT_S + OFFSETS_GRACE_S,
                                 "send_offsets_to_transaction")
                try:
                    self._producer.raw.send_offsets_to_transaction(
                        offsets, self._consumer.consumer_group_metadata(), OFFSETS_TIMEOUT_S)
                finally:
                    self._bounded = None
            self._producer.raw.commit_transaction(60)
            self._in_transaction = False
            self._producer.tracker.raise_if_failed()
        else:
            self._producer.flush()
            if offsets:
                try:
                    self._consumer.commit(offsets=offsets, asynchronous=False)
                except KafkaException as exc:
                    # Lost the partitions in a rebalance: their new owner re-reads from the
                    # last commit, so nothing is lost (outputs may repeat: at-least-once).
                    log.warning("group %s: commit failed: %s", self.config.group_id, exc)
                    self.stats.last_error = str(exc)
                    committed = False
        if offsets:
            self.stats.commits += 1
        if committed:
            self._handler.after_commit(chosen)
        # The offsets stay: a handler holding a partition back may let it advance later
        # without new records. Revoked partitions are dropped in _on_revoke/_on_lost.

    def _abort(self) -> None:
        """Best effort after an error: abort an open transaction and leave, committing
        nothing. ``_closing`` first: close() revokes, and a revoke would hand the handler's
        state to a transaction that no longer exists (or commit the failed batch). Errors
        here are logged, never raised: the caller re-raises the error that got us here."""
        self._closing = True
        if self._in_transaction and self._producer is not None:
            try:
                self._producer.raw.abort_transaction(10)
            except KafkaException as exc:
                log.warning("group %s: abort after an error: %s", self.config.group_id, exc)
        self._in_transaction = False
        if self._consumer is not None:
            try:
                self._consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log.warning("group %s: close after an error: %s", self.config.group_id, exc)

    def _shutdown(self) -> None:
        assert self._consumer is not None
        self._commit()
        assigned = self._consumer.assignment()
        if assigned:
            self._begin()
            self._produce(self._handler.on_revoke(partitions_of(assigned)))
            self._commit()
        self._begin()
        self._produce(self._handler.close())
        self._commit()
        self._closing = True  # close() revokes again: the state is already flushed
        self._consumer.close()
        log.info("group %s stopped: %d records, %d outputs, %d dead letters", self.config.group_id,
                 self.stats.records, self.stats.outputs, self.stats.dead_letters)

    # -- rebalances (called from inside consume())

    def assign_context(self) -> AssignContext:
        """What ``on_assign`` restores through: this runner's cluster and group."""
        return KafkaAssignContext(self.bootstrap, self.config.group_id)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("group %s assigned %s", self.config.group_id, _fmt(partitions))
        ctx = self.assign_context()
        try:
            starts = self._handler.on_assign(ctx, partitions_of(partitions))
        except Exception as exc:  # noqa: BLE001 - re-raised by _next_batch, outside librdkafka
            # An exception escaping a rebalance callback reaches the caller of consume()
            # as a meaningless SystemError; keep it and raise it from the loop instead.
            self._callback_error = exc
            return
        finally:
            ctx.close()
        if starts:
            consumer.assign(topic_partitions(starts))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._closing:
            return
        log.info("group %s revoked %s", self.config.group_id, _fmt(partitions))
        # Every consumed record was handled and committed before consume() was called
        # again, so only the handler's own state needs flushing.
        self._begin()
        self._produce(self._handler.on_revoke(partitions_of(partitions)))
        self._commit()
        for tp in partitions:
            self._next_offsets.pop((tp.topic, tp.partition), None)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning("group %s lost %s (session timed out)", self.config.group_id, _fmt(partitions))
        for tp in partitions:
            self._next_offsets.pop((tp.topic, tp.partition), None)

    # -- start-up checks

    def _check_topics(self) -> None:
        admin = make_admin(self.bootstrap)
        existing = check_reachable(admin, self.bootstrap).topics
        missing = [t for t in [*self.config.topics, self.config.dead_letter_topic]
                   if t not in existing]
        if missing:
            raise PipelineError(
                f"group {self.config.group_id}: topic(s) {', '.join(missing)} do not exist: "
                "create the namespace's topics with `pipeline topics --create --namespace NS`"
            )


def _fmt(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"


# --------------------------------------------------------------------------- the edge


def partitions_of(tps: Iterable[TopicPartition]) -> list[Partition]:
    """confluent-kafka's partitions as the handler's (offsets dropped: a rebalance's
    partitions carry none that matter)."""
    return [Partition(tp.topic, tp.partition) for tp in tps]


def topic_partitions(parts: Iterable[Partition]) -> list[TopicPartition]:
    """The handler's partitions as confluent-kafka's (``offset=None``: the committed one)."""
    return [TopicPartition(p.topic, p.partition, OFFSET_STORED if p.offset is None else p.offset)
            for p in parts]


def record_of(msg: Message) -> Record:
    """A consumed message as a :class:`Record` whose value is the message's bytes."""
    return Record(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(),
                  msg.timestamp()[1], tuple(msg.headers() or ()))


# --------------------------------------------------------------------------- restore helpers

RESTORE_GROUP_PREFIX = "restore-"  # a secured broker grants its readers this group prefix


def restore_consumer(bootstrap: str, isolation: str = "read_committed") -> Consumer:
    """A consumer outside every group (a fresh group id, never committing), to read what
    a group needs back when it is assigned partitions."""
    return Consumer(reader_config(bootstrap, f"{RESTORE_GROUP_PREFIX}{uuid.uuid4()}",
                                  **{"isolation.level": isolation}))


def read_to_end(bootstrap: str, topic: str, timeout_s: float = 60.0,
                partitions: Iterable[int] | None = None) -> Iterator[Message]:
    """Every committed record of ``topic`` (of ``partitions``, default all), to its end.

    First waits until every record written before the call is decided: the committed
    end (the last stable offset) must reach the end including open transactions, so an
    open transaction of a dead member (aborted when its transactional.id restarts, or
    after transaction.timeout.ms) is never mistaken for the end of the topic.
    """
    uncommitted = restore_consumer(bootstrap, "read_uncommitted")
    consumer = restore_consumer(bootstrap)
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        wanted = sorted(meta.partitions) if partitions is None else sorted(set(partitions))
        deadline = time.monotonic() + timeout_s
        ends: dict[int, tuple[int, int]] = {}
        for p in wanted:
            target = uncommitted.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            while True:
                low, stable = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                if stable >= target:
                    break
                if time.monotonic() > deadline:
                    raise PipelineError(
                        f"{topic}[{p}] still has a transaction open after {timeout_s:.0f}s "
                        f"(stable offset {stable} < end {target}): is another instance of "
                        "the group stuck?")
                time.sleep(0.05)
            if stable > low:
                ends[p] = (low, stable)
        if ends:
            yield from _read_until(consumer, topic, ends, max(deadline - time.monotonic(), 0) + 60)
    finally:
        consumer.close()
        uncommitted.close()


def read_range(bootstrap: str, topic: str, ranges: dict[int, tuple[int, int]],
               timeout_s: float = 60.0) -> Iterator[Message]:
    """The committed records of ``topic`` in ``{partition: (first, end)}`` (end exclusive)."""
    ranges = {p: r for p, r in ranges.items() if r[1] > r[0]}
    if not ranges:
        return
    consumer = restore_consumer(bootstrap)
    try:
        yield from _read_until(consumer, topic, ranges, timeout_s)
    finally:
        consumer.close()


def _read_until(consumer: Consumer, topic: str, ranges: dict[int, tuple[int, int]],
                timeout_s: float) -> Iterator[Message]:
    """Each partition's ``[first, end)`` once, by the one partition reader (positions decide
    the end: transaction markers take offsets but are never delivered)."""
    windows = {(topic, p): window for p, window in ranges.items()}
    yield from read_windows(consumer, windows, timeout=timeout_s, what=f"reading {topic}")


def committed_offsets(bootstrap: str, group_id: str, topic: str, partitions: Iterable[int],
                      timeout_s: float = 30.0) -> dict[int, int]:
    """The group's committed next offset per partition of ``topic`` (absent: none)."""
    wanted = [TopicPartition(topic, p) for p in partitions]
    if not wanted:
        return {}
    consumer = Consumer(reader_config(bootstrap, group_id))
    try:
        found = consumer.committed(wanted, timeout=timeout_s)
        return {tp.partition: tp.offset for tp in found if tp.offset >= 0}
    finally:
        consumer.close()


class KafkaFollower(Follower):
    """:meth:`KafkaAssignContext.follow`'s reader: a restore consumer assigned the topic."""

    def __init__(self, bootstrap: str, topic: str, starts: dict[int, int]) -> None:
        self._consumer: Consumer | None = restore_consumer(bootstrap)
        parts = self._consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self._consumer.assign([TopicPartition(topic, p, starts.get(p, OFFSET_BEGINNING))
                               for p in sorted(parts)])

    def poll(self, max_records: int = 100) -> list[Record]:
        if self._consumer is None:
            return []
        return [record_of(m) for m in self._consumer.consume(max_records, 0) if m.error() is None]

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


class KafkaAssignContext(AssignContext):
    """The runner's :class:`AssignContext`: the restore helpers above, bound to its
    bootstrap servers and group id. One read_committed consumer serves the metadata
    calls; the runner closes it when ``on_assign`` returns."""

    def __init__(self, bootstrap: str, group_id: str) -> None:
        self.bootstrap, self.group_id = bootstrap, group_id
        self._meta: Consumer | None = None

    def read_to_end(self, topic: str, timeout_s: float = 60.0,
                    partitions: Iterable[int] | None = None) -> Iterator[Record]:
        return (record_of(m) for m in read_to_end(self.bootstrap, topic, timeout_s, partitions))

    def read_range(self, topic: str, ranges: dict[int, tuple[int, int]],
                   timeout_s: float = 60.0) -> Iterator[Record]:
        return (record_of(m) for m in read_range(self.bootstrap, topic, ranges, timeout_s))

    def committed_offsets(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        return committed_offsets(self.bootstrap, self.group_id, topic, partitions)

    def end_offsets(self, topic: str, partitions: Iterable[int] | None = None
                    ) -> dict[int, tuple[int, int]]:
        if self._meta is None:
            self._meta = restore_consumer(self.bootstrap)
        if partitions is None:
            partitions = self._meta.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: watermarks(self._meta, TopicPartition(topic, p)) for p in sorted(partitions)}

    def follow(self, topic: str, starts: dict[int, int] | None = None) -> Follower:
        return KafkaFollower(self.bootstrap, topic, dict(starts or {}))

    def close(self) -> None:
        if self._meta is not None:
            self._meta.close()
            self._meta = None


# --------------------------------------------------------------------------- entry points


def log_to_stderr(level: int | str = logging.INFO) -> None:
    """The one log format of every process (one file per process under the run dir). A
    later call sets the level: ``pipeline`` starts at WARNING and a long-running command
    (``produce gemini``, ``venue``, ``run``) raises it to INFO, which ``basicConfig``
    alone, a no-op once configured, silently did not (the producer's progress lines were
    missing from its log)."""
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)


def local_cluster(run_dir: str | None = None, bootstrap: str | None = None,
                  registry: str | None = None) -> Cluster:
    """The :class:`Cluster` given, else the one the run dir's broker and registry serve."""
    from pipeline.ops.settings import Settings

    settings = Settings.from_env(run_dir)
    if not bootstrap:
        from pipeline.ops.broker import bootstrap_servers
        bootstrap = bootstrap_servers(settings)
    if not registry:
        from pipeline.ops.registry_server import registry_url
        registry = registry_url(settings)
    return Cluster(bootstrap, registry)


def run_until_stopped(config: GroupConfig, bootstrap: str) -> GroupStats:
    """Run a group in this process until SIGTERM or Ctrl-C, as the supervisor runs it."""
    runner = GroupRunner(config, bootstrap)
    runner.install_signal_handlers()
    stats = runner.run()
    log.info("group %s stopped: %s", config.group_id, stats)
    return stats
