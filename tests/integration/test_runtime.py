"""The consumer-group runtime against the real broker, with groups run as real processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from pipeline.core.errors import PipelineError
from pipeline.kafka.deadletter import STAGE_DECODE, STAGE_HANDLE, parse_dead_letter
from pipeline.ops.settings import REPO_ROOT
from pipeline.runtime.runner import GroupConfig, GroupRunner, Handler, Output, Record
from tests.support.kafka_io import committed, produce_json, produce_raw, read_all
from tests.support.waiting import wait_for

pytestmark = pytest.mark.broker

KEYS = [f"SYM{i:02d}" for i in range(12)]


def keyed_items(n: int) -> list[tuple[str, dict]]:
    """n records over 12 keys, each carrying its per-key sequence number."""
    seq: Counter = Counter()
    items = []
    for i in range(n):
        key = KEYS[i % len(KEYS)]
        items.append((key, {"key": key, "seq": seq[key], "i": i}))
        seq[key] += 1
    return items


class Relay:
    """One relay-group process (tests/support/relay.py) with its log file."""

    def __init__(self, kafka: str, group: str, in_topic: str, out_topic: str, dlq: str,
                 log_dir: Path, instance: str = "a", delay_ms: float = 0, batch_size: int = 100,
                 transactional_id: str | None = None) -> None:
        self.log = log_dir / f"relay-{instance}-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "tests.support.relay", "--bootstrap", kafka, "--group", group,
               "--in", in_topic, "--out", out_topic, "--dlq", dlq, "--instance", instance,
               "--delay-ms", str(delay_ms), "--batch-size", str(batch_size)]
        if transactional_id:
            cmd += ["--transactional-id", transactional_id]
        self._log_file = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                     stderr=self._log_file, text=True)

    def log_text(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log_file.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)

    def ensure_dead(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def done(kafka: str, group: str, topic: str) -> int:
    """Records the group has committed over all partitions (no commit counts as 0)."""
    return sum(max(offset, 0) for offset in committed(kafka, group, topic).values())


def outputs(kafka: str, topic: str, expect: int | None = None, timeout: float = 60) -> list[dict]:
    return [json.loads(r.value) for r in read_all(kafka, topic, expect=expect, timeout=timeout)]


@pytest.fixture
def relay_topics(topics):
    return topics("md.l2", "md.trades", "dlq")  # in, out, dead letters


# --------------------------------------------------------------------------- in-process


class Collect(Handler):
    def __init__(self, sink: list[Record]) -> None:
        self.sink = sink

    def handle(self, record: Record):
        self.sink.append(record)
        return ()


def test_keyed_records_come_back_complete_and_in_order_per_key(kafka, relay_topics):
    items = keyed_items(3000)
    produce_json(kafka, relay_topics["md.l2"], items)
    seen: list[Record] = []
    config = GroupConfig(group_id="collect", topics=[relay_topics["md.l2"]],
                         dead_letter_topic=relay_topics["dlq"], handler=lambda: Collect(seen),
                         decoder=json.loads)
    stats = GroupRunner(config, kafka).run(max_records=3000, idle_timeout_s=20)
    assert stats.records == 3000 and stats.dead_letters == 0
    per_key = defaultdict(list)
    for record in seen:
        assert record.key.decode() == record.value["key"]
        per_key[record.value["key"]].append(record.value["seq"])
    assert sorted(per_key) == sorted(KEYS)
    for key, seqs in per_key.items():
        assert seqs == list(range(250)), f"{key} out of order or incomplete"
    # A key lives in one partition: that is what keeps its order.
    partitions_of_key = defaultdict(set)
    for record in seen:
        partitions_of_key[record.value["key"]].add(record.partition)
    assert all(len(parts) == 1 for parts in partitions_of_key.values())
    assert done(kafka, "collect", relay_topics["md.l2"]) == 3000


def test_unknown_topic_is_a_clear_error(kafka, relay_topics, namespace):
    config = GroupConfig(group_id="g", topics=[f"{namespace}.does-not-exist"],
                         dead_letter_topic=relay_topics["dlq"], handler=lambda: Collect([]))
    with pytest.raises(PipelineError, match="does-not-exist do not exist"):
        GroupRunner(config, kafka).run(idle_timeout_s=1)


class BrokenRestore(Handler):
    """A handler whose restore fails (a corrupt checkpoint, say)."""

    def handle(self, record: Record):
        raise AssertionError("never called: the restore failed")

    def on_assign(self, ctx, partitions):
        raise ValueError("checkpoint 7 is corrupt")


def test_a_failing_restore_on_assignment_is_a_clear_error_and_commits_nothing(
        kafka, relay_topics, namespace):
    """librdkafka turns an exception escaping a rebalance callback into a SystemError
    that says nothing; the runtime raises the handler's own error instead."""
    t = relay_topics
    produce_json(kafka, t["md.l2"], [("k", {"i": 1})])
    group = f"{namespace}.broken"
    config = GroupConfig(group_id=group, topics=[t["md.l2"]], dead_letter_topic=t["dlq"],
                         handler=BrokenRestore)
    with pytest.raises(PipelineError, match="ValueError: checkpoint 7 is corrupt"):
        GroupRunner(config, kafka).run(idle_timeout_s=10)
    assert all(offset < 0 for offset in committed(kafka, group, t["md.l2"]).values())


class Halt(BaseException):
    """Like execution's ExecutionHalted: not the handler's bug, so no dead letter."""


class HaltAt(Handler):
    """Relays records until the one numbered ``at``, then halts; notes every revoke."""

    def __init__(self, out_topic: str, at: int) -> None:
        self.out_topic, self.at, self.revoked = out_topic, at, []

    def handle(self, record: Record):
        if record.value["i"] == self.at:
            raise Halt(f"halt at {self.at}")
        yield Output(self.out_topic, json.dumps(record.value).encode(), record.key)

    def on_revoke(self, partitions):
        self.revoked.append(partitions)
        return [Output(self.out_topic, b'{"i": -1}')]


def test_a_halt_aborts_the_batch_and_closing_commits_nothing(kafka, relay_topics, namespace):
    """The halted batch's outputs and offsets go nowhere: close() after the abort neither
    revokes into the handler nor commits, and the halt itself reaches the caller."""
    t = relay_topics
    produce_json(kafka, t["md.l2"], keyed_items(120))
    handler = HaltAt(t["md.trades"], at=100)
    config = GroupConfig(group_id=f"{namespace}.halt", topics=[t["md.l2"]],
                         dead_letter_topic=t["dlq"], handler=lambda: handler,
                         decoder=json.loads, batch_size=20,
                         transactional_id=f"{namespace}.halt.0")
    with pytest.raises(Halt, match="halt at 100"):
        GroupRunner(config, kafka).run(idle_timeout_s=20)
    assert handler.revoked == []
    offsets = committed(kafka, f"{namespace}.halt", t["md.l2"])
    below_commits = {json.loads(r.value)["i"] for r in read_all(kafka, t["md.l2"])
                     if r.offset < offsets[r.partition]}
    assert 100 not in below_commits
    assert sorted(o["i"] for o in outputs(kafka, t["md.trades"])) == sorted(below_commits)
    assert read_all(kafka, t["dlq"]) == []


# --------------------------------------------------------------------------- processes


def test_two_instances_split_the_partitions_and_see_every_record_once(kafka, relay_topics,
                                                                      tmp_path):
    t = relay_topics
    relays = [Relay(kafka, "split", t["md.l2"], t["md.trades"], t["dlq"], tmp_path, name)
              for name in ("a", "b")]
    try:
        def settled():
            # Each instance's newest assignment, once both hold a non-empty share.
            shares = []
            for relay in relays:
                lines = [line for line in relay.log_text().splitlines() if " assigned " in line]
                if not lines or lines[-1].endswith("nothing"):
                    return None
                shares.append(set(lines[-1].split(" assigned ")[1].split(", ")))
            disjoint = not (shares[0] & shares[1])
            return shares if disjoint and len(shares[0] | shares[1]) == 6 else None

        shares = wait_for(settled, 60, "both instances to share the 6 partitions")
        items = keyed_items(2400)
        produce_json(kafka, t["md.l2"], items)
        out = outputs(kafka, t["md.trades"], expect=2400)
        time.sleep(1.0)  # anything extra (a duplicate) would arrive now
        out = outputs(kafka, t["md.trades"])
    finally:
        for relay in relays:
            relay.kill(signal.SIGTERM)
        codes = [relay.wait(30) for relay in relays]
    assert codes == [0, 0]
    assert sorted(o["i"] for o in out) == list(range(2400)), "every record exactly once"
    by_instance = defaultdict(set)
    for o in out:
        by_instance[o["instance"]].add(o["src_partition"])
    assert set(by_instance) == {"a", "b"}
    assert not by_instance["a"] & by_instance["b"], "no partition handled by both"
    assert {int(p.split("[")[1][:-1]) for s in shares for p in s} == set(range(6))


def test_sigkill_mid_batch_then_restart_loses_nothing(kafka, relay_topics, tmp_path):
    t = relay_topics
    produce_json(kafka, t["md.l2"], keyed_items(600))
    batch = 50
    first = Relay(kafka, "crash", t["md.l2"], t["md.trades"], t["dlq"], tmp_path, "a",
                  delay_ms=4, batch_size=batch)
    try:
        wait_for(lambda: len(read_all(kafka, t["md.trades"])) >= 120, 60, "some output")
        first.kill(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
    finally:
        first.ensure_dead()
    done_before = done(kafka, "crash", t["md.l2"])
    assert 0 < done_before < 600, "killed mid-run, after some commits"
    second = Relay(kafka, "crash", t["md.l2"], t["md.trades"], t["dlq"], tmp_path, "b",
                   batch_size=batch)
    try:
        wait_for(lambda: done(kafka, "crash", t["md.l2"]) == 600, 60,
                 "the restarted instance to commit everything")
    finally:
        second.kill(signal.SIGTERM)
        assert second.wait(30) == 0
    out = outputs(kafka, t["md.trades"])
    counts = Counter(o["i"] for o in out)
    assert set(counts) == set(range(600)), "nothing lost"
    # At-least-once: only records of the batches that were in flight may repeat.
    repeated = sum(c - 1 for c in counts.values())
    assert repeated <= batch * 6
    # The restarted instance started exactly at the last commit of the killed one.
    restarted = [o for o in out if o["instance"] == "b"]
    assert len(restarted) == 600 - done_before


def test_poison_and_undecodable_records_are_dead_lettered_and_the_group_goes_on(kafka,
                                                                                 relay_topics,
                                                                                 tmp_path):
    t = relay_topics
    good = [("SYM00", json.dumps({"i": i}).encode()) for i in range(10)]
    items = good[:3] + [("SYM00", b"\xff\xfe not json")] + good[3:6] + \
        [("SYM00", json.dumps({"i": 99, "poison": True}).encode())] + good[6:]
    produce_raw(kafka, t["md.l2"], items)  # one key: one partition, offsets 0..11
    relay = Relay(kafka, "poison", t["md.l2"], t["md.trades"], t["dlq"], tmp_path, batch_size=5)
    try:
        out = outputs(kafka, t["md.trades"], expect=10)
        dead = read_all(kafka, t["dlq"], expect=2)
    finally:
        relay.kill(signal.SIGTERM)
        assert relay.wait(30) == 0
    assert sorted(o["i"] for o in out) == list(range(10)), "records after the poison handled"
    letters = sorted((parse_dead_letter(d.key, d.value, list(d.headers)) for d in dead),
                     key=lambda d: d.source_offset)
    assert [(d.source_topic, d.source_offset, d.stage) for d in letters] == [
        (t["md.l2"], 3, STAGE_DECODE), (t["md.l2"], 7, STAGE_HANDLE)]
    assert letters[0].value == b"\xff\xfe not json" and letters[0].key == b"SYM00"
    assert ("JSONDecodeError" in letters[0].error_class
            or "UnicodeDecodeError" in letters[0].error_class)
    assert letters[1].error_class.endswith("ValueError") and "poison" in letters[1].error_message
    assert all(d.owner == "poison" and d.failed_at_ms > 0 for d in letters)
    assert done(kafka, "poison", t["md.l2"]) == 12


def test_sigterm_during_a_batch_finishes_it_commits_and_exits_0(kafka, relay_topics, tmp_path):
    t = relay_topics
    produce_json(kafka, t["md.l2"], [("SYM00", {"i": i}) for i in range(300)])  # one partition
    relay = Relay(kafka, "term", t["md.l2"], t["md.trades"], t["dlq"], tmp_path, delay_ms=20,
                  batch_size=100)
    try:
        wait_for(lambda: "assigned" in relay.log_text(), 60, "assignment")
        time.sleep(0.6)  # well inside the first 100-record batch (2 s of work)
        assert done(kafka, "term", t["md.l2"]) == 0
        relay.kill(signal.SIGTERM)
        assert relay.wait(30) == 0
    finally:
        relay.ensure_dead()
    stats = json.loads(relay.proc.stdout.read().strip().splitlines()[-1])
    assert done(kafka, "term", t["md.l2"]) == 100 == stats["records"], \
        "the batch in flight was finished and committed, and nothing after it"
    out = outputs(kafka, t["md.trades"])
    assert [o["i"] for o in out] == list(range(100))
    # A restart continues exactly where the graceful stop left off: no duplicates.
    rest = Relay(kafka, "term", t["md.l2"], t["md.trades"], t["dlq"], tmp_path, "b")
    try:
        out = outputs(kafka, t["md.trades"], expect=300)
    finally:
        rest.kill(signal.SIGTERM)
        assert rest.wait(30) == 0
    assert [o["i"] for o in out] == list(range(300))


def test_transactional_group_is_exactly_once_across_sigkill(kafka, relay_topics, tmp_path):
    t = relay_topics
    produce_json(kafka, t["md.l2"], keyed_items(600))
    args = dict(batch_size=40, transactional_id="relay-txn-1")
    first = Relay(kafka, "txn", t["md.l2"], t["md.trades"], t["dlq"], tmp_path, "a",
                  delay_ms=4, **args)
    try:
        wait_for(lambda: done(kafka, "txn", t["md.l2"]) >= 150,
                 60, "some committed transactions")
        first.kill(signal.SIGKILL)
        first.wait(10)
    finally:
        first.ensure_dead()
    second = Relay(kafka, "txn", t["md.l2"], t["md.trades"], t["dlq"], tmp_path, "b", **args)
    try:
        wait_for(lambda: done(kafka, "txn", t["md.l2"]) == 600, 90,
                 "the restarted instance to finish")
    finally:
        second.kill(signal.SIGTERM)
        assert second.wait(30) == 0
    committed_out = outputs(kafka, t["md.trades"])  # read_committed
    assert sorted(o["i"] for o in committed_out) == list(range(600)), "exactly once"
    # The aborted transaction's records are in the log, invisible to read_committed readers.
    everything = read_all(kafka, t["md.trades"], isolation="read_uncommitted")
    assert len(everything) >= 600


def test_a_fatal_consumer_error_ends_the_group_instead_of_idling():
    """librdkafka hands a fatal error (a static member fenced after the coordinator's
    broker died) to the application as a message error whose ``fatal()`` is False; the
    group must stop on it (and be restarted), not log it and consume nothing forever."""
    from types import SimpleNamespace

    from confluent_kafka import KafkaError

    runner = GroupRunner.__new__(GroupRunner)
    runner.config = SimpleNamespace(group_id="sim.portfolio")
    fenced = KafkaError(KafkaError._FATAL, "Fatal error: Broker: Static consumer fenced by "
                                           "other consumer with same group.instance.id")
    with pytest.raises(PipelineError, match="sim.portfolio: Fatal error: Broker: Static"):
        runner._on_consume_error(fenced)
    runner._on_consume_error(KafkaError(KafkaError._TRANSPORT, "broker down"))  # goes on


def test_a_group_process_stuck_in_one_step_is_ended_by_its_watchdog(kafka, relay_topics,
                                                                    tmp_path):
    """A handler that never returns stands in for a Kafka call that does not: the process
    exits with EXIT_STALLED and every thread's stack in its log, so the supervisor can
    restart it, instead of staying alive and consuming nothing."""
    from pipeline.runtime.runner import EXIT_STALLED

    produce_json(kafka, relay_topics["md.l2"], [("k", {"key": "k", "seq": 0, "hang": True})])
    log_file = tmp_path / "stuck.log"
    with open(log_file, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.relay", "--bootstrap", kafka, "--in",
             relay_topics["md.l2"], "--out", relay_topics["md.trades"], "--dlq",
             relay_topics["dlq"], "--group", "stuck-relay"],
            cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
            env={**__import__("os").environ, "PIPELINE_STALL_LIMIT_S": "3"})
    try:
        assert proc.wait(90) == EXIT_STALLED
    finally:
        proc.kill()
    text = log_file.read_text()
    assert "one step has not returned for" in text and "stuck-relay" in text
    assert "Thread" in text and "in handle" in text  # faulthandler's stacks


def test_the_watchdog_ends_a_call_past_its_own_deadline_before_the_stall_limit():
    """send_offsets_to_transaction can hang past its timeout while the group coordinator is
    down (librdkafka#5456): the watchdog does not wait the whole stall limit for it."""
    from pipeline.runtime.runner import stall_reason

    assert stall_reason(100.0, 90.0, 240.0, None) is None
    assert stall_reason(100.0, 90.0, 240.0, (120.0, "send_offsets_to_transaction")) is None
    late = stall_reason(130.0, 90.0, 240.0, (120.0, "send_offsets_to_transaction"))
    assert late == ("send_offsets_to_transaction is 10 s past its timeout and grace "
                    "(a librdkafka hang)")
    assert stall_reason(400.0, 100.0, 240.0, None) == \
        "one step has not returned for 300 s (limit 240 s)"
