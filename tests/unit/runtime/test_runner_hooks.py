"""The runtime owns Kafka I/O: handlers get :class:`Partition` values and an
:class:`AssignContext`, and ``after_commit`` is called only after a successful commit.
All through the in-memory harness (the same runner loop as against Kafka), no broker;
tests/integration/test_runtime.py runs the Kafka side of the same hooks."""

from __future__ import annotations

import dataclasses
import json

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_STORED,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from pipeline.runtime.context import BEGINNING, Partition
from pipeline.runtime.harness import HandlerHarness, MemoryCluster
from pipeline.runtime.runner import (
    GroupConfig,
    Handler,
    Output,
    Record,
    partitions_of,
    record_of,
    topic_partitions,
)


class Recorder(Handler):
    """Notes every hook call; holds (topic, 1) back one record, as a handler with state
    in memory would."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def handle(self, record: Record):
        self.calls.append(("handle", record.offset))
        yield Output("out", record.value, record.key)

    def end_batch(self):
        self.calls.append(("end_batch",))
        return ()

    def commit_offsets(self, offsets):
        self.calls.append(("commit_offsets", dict(offsets)))
        return {tp: (o - 1 if tp == ("in", 1) else o) for tp, o in offsets.items()}

    def after_commit(self, offsets):
        self.calls.append(("after_commit", dict(offsets)))

    def on_assign(self, ctx, partitions):
        self.calls.append(("on_assign", list(partitions)))
        return None

    def on_revoke(self, partitions):
        self.calls.append(("on_revoke", list(partitions)))
        return [Output("out", b"flushed")]

    def close(self):
        self.calls.append(("close",))
        return ()


def test_partition_is_a_frozen_value_and_the_runner_converts_at_its_edge():
    p = Partition("sim.md.l2", 3)
    assert p.offset is None and p.key == ("sim.md.l2", 3)
    assert p.at(17) == Partition("sim.md.l2", 3, 17) and p.offset is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.offset = 5  # type: ignore[misc]
    assert {p, Partition("sim.md.l2", 3)} == {p}  # hashable, by value
    tps = topic_partitions([p, p.at(BEGINNING), p.at(42)])
    assert [(tp.topic, tp.partition, tp.offset) for tp in tps] == [
        ("sim.md.l2", 3, OFFSET_STORED), ("sim.md.l2", 3, OFFSET_BEGINNING), ("sim.md.l2", 3, 42)]
    assert partitions_of([TopicPartition("t", 1, 99)]) == [Partition("t", 1)]


def test_after_commit_follows_every_commit_with_the_offsets_commit_offsets_chose():
    handler = Recorder()
    harness = HandlerHarness.of(handler, transactional=True)
    assert harness.assign(("in", 0), ("in", 1)) == {}
    assert handler.calls == [("on_assign", [Partition("in", 0), Partition("in", 1)])]
    handler.calls.clear()
    harness.batch(("in", 0, 0, b"a"), ("in", 1, 4, b"b"))
    assert handler.calls == [
        ("handle", 0), ("handle", 4), ("end_batch",),
        ("commit_offsets", {("in", 0): 1, ("in", 1): 5}),
        ("after_commit", {("in", 0): 1, ("in", 1): 4})]  # what was chosen, not what was read
    assert harness.committed == {("in", 0): 1, ("in", 1): 4}

    handler.calls.clear()
    out = harness.revoke(("in", 1))
    assert [o.value for o in out] == [b"flushed"]
    assert handler.calls[0] == ("on_revoke", [Partition("in", 1)])
    assert handler.calls[-1][0] == "after_commit"  # the revoke's outputs are durable

    handler.calls.clear()
    harness.close()
    names = [c[0] for c in handler.calls]
    # the first commit finds no transaction open (nothing to commit): no after_commit
    assert names == ["commit_offsets", "on_revoke", "commit_offsets", "after_commit", "close",
                     "commit_offsets", "after_commit"]


def test_a_tick_without_records_commits_and_calls_after_commit_with_no_offsets():
    handler = Recorder()
    harness = HandlerHarness.of(handler, transactional=True)
    harness.tick()
    assert handler.calls == [("end_batch",), ("after_commit", {})]


def test_no_after_commit_when_the_transaction_fails_or_the_process_dies():
    handler = Recorder()
    harness = HandlerHarness.of(handler, transactional=True)
    harness.assign(("in", 0))

    def refuse(timeout):
        raise KafkaException(KafkaError(KafkaError._FENCED, "fenced"))

    harness._memory.commit_transaction = refuse  # type: ignore[method-assign]
    with pytest.raises(KafkaException):
        harness.batch(("in", 0, 0, b"a"))
    assert "after_commit" not in [c[0] for c in handler.calls]
    assert harness.committed == {} and [o.value for o in harness.pending] == [b"a"]
    assert harness.crash() != []  # the open transaction is what a kill -9 loses
    assert harness.cluster.records("out") == []  # and nobody can read it


def test_no_after_commit_when_a_plain_offset_commit_fails():
    handler = Recorder()
    harness = HandlerHarness.of(handler)
    harness.assign(("in", 0))

    def refuse(offsets, asynchronous=False):
        raise KafkaException(KafkaError(KafkaError.REBALANCE_IN_PROGRESS, "rebalancing"))

    harness._memory.commit = refuse  # type: ignore[method-assign]
    harness.batch(("in", 0, 0, b"a"))  # logged, not raised: the new owner re-reads
    assert [c[0] for c in handler.calls][-2:] == ["end_batch", "commit_offsets"]
    assert "rebalancing" in (harness.stats.last_error or "")


class Counter(Handler):
    """Counts records per key; its state is an output, restored on assignment through
    the context (the way orderbook, strategy and portfolio restore)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.restored_from: list[tuple[int, int]] = []

    def handle(self, record: Record):
        key = record.key.decode()
        self.counts[key] = self.counts.get(key, 0) + 1
        return ()

    def end_batch(self):
        return [Output("state", json.dumps(self.counts).encode(), b"counter")]

    def on_assign(self, ctx, partitions):
        for rec in ctx.read_to_end("state"):
            if rec.key == b"counter":
                self.counts = json.loads(rec.value)
                self.restored_from.append((rec.partition, rec.offset))
        committed = ctx.committed_offsets("in", [p.partition for p in partitions])
        # one record early, as bars and the archive resume
        return [p.at(committed[p.partition] - 1) if p.partition in committed else p.at(BEGINNING)
                for p in partitions]


def test_on_assign_restores_from_what_an_earlier_instance_committed():
    cluster = MemoryCluster()
    config = GroupConfig("counter", ["in"], Counter, "dlq", transactional_id="counter-0")
    first = HandlerHarness(config, cluster)
    assert first.assign(("in", 0)) == {("in", 0): BEGINNING}
    first.batch(("in", 0, 0, b"1", b"x"), ("in", 0, 1, b"2", b"y"), ("in", 0, 2, b"3", b"x"))
    first.batch(("in", 0, 3, b"4", b"x"))  # committed: x=3, y=1
    first.handler.counts["z"] = 99  # in memory only
    first.crash()

    second = HandlerHarness(config, cluster)
    assert second.assign(("in", 0)) == {("in", 0): 3}
    assert second.handler.counts == {"x": 3, "y": 1}
    assert second.handler.restored_from == [(0, 0), (0, 1)]  # both states, the newest last
    assert second.last_context.reads == ["state"]
    assert [r.offset for r in cluster.records("in")] == [0, 1, 2, 3]  # the inputs are there


def test_a_crashed_transaction_is_never_read_back():
    cluster = MemoryCluster()
    config = GroupConfig("counter", ["in"], Counter, "dlq", transactional_id="counter-0")
    first = HandlerHarness(config, cluster)
    first.assign(("in", 0))
    first.batch(("in", 0, 0, b"1", b"x"))

    def die(timeout):
        raise SystemExit("kill -9 before the commit")

    first._memory.commit_transaction = die  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        first.batch(("in", 0, 1, b"2", b"y"))
    first.crash()
    second = HandlerHarness(config, cluster)
    assert second.assign(("in", 0)) == {("in", 0): 0}
    assert second.handler.counts == {"x": 1}


def test_the_memory_context_reads_ranges_ends_committed_offsets_and_follows():
    cluster = MemoryCluster(partition_counts={"t": 2})
    for i in range(5):
        cluster.append("t", f"v{i}".encode(), partition=i % 2, timestamp_ms=1000 + i)
    cluster.committed["g"] = {("t", 0): 2}
    seen = {}

    class Reader(Handler):
        def handle(self, record):
            return ()

        def on_assign(self, ctx, partitions):
            seen["to_end"] = [(r.partition, r.offset, r.value) for r in ctx.read_to_end("t")]
            seen["p1"] = [r.value for r in ctx.read_to_end("t", partitions=[1])]
            seen["range"] = [r.value for r in ctx.read_range("t", {0: (1, 3)})]
            seen["ends"] = ctx.end_offsets("t")
            seen["parts"] = ctx.partitions("t")
            seen["committed"] = ctx.committed_offsets("t", [0, 1])
            self.follower = ctx.follow("t", {0: 3})
            return None

    harness = HandlerHarness(GroupConfig("g", ["in"], Reader, "dlq"), cluster)
    harness.assign(("in", 0))
    assert seen["to_end"] == [(0, 0, b"v0"), (0, 1, b"v2"), (0, 2, b"v4"),
                              (1, 0, b"v1"), (1, 1, b"v3")]
    assert seen["p1"] == [b"v1", b"v3"] and seen["range"] == [b"v2", b"v4"]
    assert seen["ends"] == {0: (0, 3), 1: (0, 2)} and seen["parts"] == [0, 1]
    assert seen["committed"] == {0: 2}
    follower = harness.handler.follower
    assert [r.value for r in follower.poll()] == [b"v1", b"v3"]  # p1 from its beginning
    assert follower.poll() == []
    cluster.append("t", b"v5", partition=0)
    assert [(r.partition, r.offset, r.value) for r in follower.poll()] == [(0, 3, b"v5")]
    follower.close()
    assert follower.poll() == []


def test_feed_puts_records_where_a_restore_reads_them():
    harness = HandlerHarness(GroupConfig("counter", ["in"], Counter, "dlq"))
    rec = harness.feed("state", b'{"q": 7}', "counter")
    assert (rec.topic, rec.partition, rec.offset, rec.key) == ("state", 0, 0, b"counter")
    harness.assign(("in", 0))
    assert harness.handler.counts == {"q": 7}


def test_record_of_keeps_a_consumed_message_as_bytes():
    class Msg:
        def topic(self):
            return "t"

        def partition(self):
            return 2

        def offset(self):
            return 9

        def key(self):
            return b"k"

        def value(self):
            return b"\x00raw"

        def timestamp(self):
            return 1, 1234

        def headers(self):
            return [("h", b"1")]

    assert record_of(Msg()) == Record("t", 2, 9, b"k", b"\x00raw", 1234, (("h", b"1"),))  # type: ignore[arg-type]
