"""The in-memory group harness (pipeline/runtime/harness.py) runs the real runner loop without a
broker: dead letters, commits, transactions, revokes, close and crashes behave as they do
against Kafka. The archive group's offsets protocol is checked through it here; the same
protocol against the real broker, with kill -9, is in tests/integration/test_archive.py."""

from __future__ import annotations

from consumers.archive import ArchiveHandler, ArchiveOptions
from pipeline.replay import archive
from pipeline.runtime.harness import HandlerHarness
from pipeline.runtime.runner import GroupConfig, Handler, Output, Record
from tests.unit.sinks.test_archive_store import trade


class Doubler(Handler):
    """Doubles integers; refuses 13 (a handler bug: the record is dead-lettered)."""

    def __init__(self) -> None:
        self.closed = False

    def handle(self, record: Record):
        if record.value == 13:
            raise ValueError("unlucky")
        yield Output("out", str(record.value * 2).encode(), record.key)

    def close(self):
        self.closed = True
        yield Output("out", b"bye")


def decode(value):
    if value == b"garbage":
        raise ValueError("not a number")
    return int(value)


def test_records_outputs_dead_letters_and_commits_in_order():
    config = GroupConfig("g", ["in"], Doubler, "dlq", decoder=decode)
    harness = HandlerHarness(config)
    harness.assign(("in", 0), ("in", 1))
    out = harness.batch(("in", 0, 0, b"1", b"k"), ("in", 0, 1, b"garbage"),
                        ("in", 1, 5, b"13"), ("in", 1, 6, b"4"))
    assert [(o.topic, o.value) for o in out] == [("out", b"2"), ("dlq", b"garbage"),
                                                 ("dlq", b"13"), ("out", b"8")]
    headers = dict(harness.dead_letters[1].headers)
    assert headers["__connect.errors.exception.message"] == b"unlucky"
    assert headers["__connect.errors.partition"] == b"1"
    assert harness.committed == {("in", 0): 2, ("in", 1): 7}
    assert harness.stats.dead_letters == 2 and harness.stats.records == 4
    assert [o.value for o in harness.close()] == [b"bye"] and harness.handler.closed


def test_a_transactional_group_makes_outputs_and_offsets_durable_together():
    harness = HandlerHarness(GroupConfig("g", ["in"], Doubler, "dlq", decoder=decode,
                                         transactional_id="g-0"))
    harness.assign(("in", 0))
    harness.batch(("in", 0, 0, b"2"))
    assert [o.value for o in harness.outputs] == [b"4"] and harness.committed == {("in", 0): 1}
    assert harness.pending == [] and harness.crash() == []  # nothing was in flight


def test_the_archive_group_commits_only_what_is_in_files_and_resumes_after_a_crash(tmp_path):
    clock = [0.0]
    opts = ArchiveOptions("sim", tmp_path, ("md.trades",), roll_records=100, roll_seconds=5,
                          fsync=False)
    topic = "sim.md.trades"

    def harness() -> HandlerHarness:
        return HandlerHarness(GroupConfig("sim.archive", [topic],
                                          lambda: ArchiveHandler(opts, lambda: clock[0]),
                                          "sim.dlq"))

    first = harness()
    assert first.assign((topic, 0)) == {(topic, 0): -2}  # OFFSET_BEGINNING: nothing archived
    first.batch(*[(topic, 0, i, trade(i, 1_624_500_000_000 + i)) for i in range(3)])
    assert first.committed == {(topic, 0): 0}  # held: the records are only in memory
    clock[0] = 6.0
    first.tick()  # the oldest waited roll_seconds: a file, then the commit moves
    assert first.committed == {(topic, 0): 3}
    first.batch(*[(topic, 0, i, trade(i, 1_624_500_000_000 + i)) for i in (3, 4)])
    assert first.committed == {(topic, 0): 3}
    first.crash()  # kill -9 with offsets 3 and 4 buffered, not archived

    second = harness()
    # the journal says 0-2 are archived: read again from one record early (2), skip it
    assert second.assign((topic, 0)) == {(topic, 0): 2}
    second.batch(*[(topic, 0, i, trade(i, 1_624_500_000_000 + i)) for i in (2, 3, 4)])
    assert second.committed == {(topic, 0): 3}  # held at 3, the first not yet in a file
    second.close()  # a clean stop flushes what waits
    assert second.committed == {(topic, 0): 5}
    got = [(p, o, r["trade_id"]) for p, o, _, r in archive.read_records(tmp_path, "md.trades")]
    assert got == [(0, i, i) for i in range(5)]  # each once, none lost


def test_a_handler_that_fails_on_assign_raises_from_the_harness():
    class Broken(Handler):
        def handle(self, record):
            return ()

        def on_assign(self, ctx, partitions):
            raise RuntimeError("no state for " + partitions[0].topic)

    harness = HandlerHarness.of(Broken())
    try:
        harness.assign(("in", 0))
    except RuntimeError as exc:
        assert str(exc) == "no state for in"
    else:
        raise AssertionError("on_assign's error was swallowed")
