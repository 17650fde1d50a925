"""PartitionReader's bookkeeping without a broker: runs, window ends, empty windows,
end-of-partition, offsets never delivered (transaction markers), stalls. A scripted stand-in
for the consumer hands out what a read_committed consumer would; the real thing is
exercised by tests/integration/test_replay.py and the backtests."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from pipeline.core.errors import PipelineError
from pipeline.kafka.partition_reader import (
    PartitionReader,
    active_windows,
    cut_at,
    read_windows,
    split_runs,
)


class Msg:
    def __init__(self, topic: str, partition: int, offset: int, error: KafkaError | None = None):
        self._t, self._p, self._o, self._e = topic, partition, offset, error

    def error(self):
        return self._e

    def topic(self):
        return self._t

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def __repr__(self) -> str:
        return f"{self._t}[{self._p}]@{self._o}" + ("!" if self._e else "")


def eof(topic: str, partition: int, offset: int) -> Msg:
    return Msg(topic, partition, offset, KafkaError(KafkaError._PARTITION_EOF))


class Consumer:
    """Hands out scripted consume() results, then nothing; positions as given."""

    def __init__(self, polls: list[list[Msg]], positions: dict | None = None) -> None:
        self.polls, self.positions = list(polls), positions or {}
        self.assigned: list = []
        self.paused: list = []
        self.resumed: list = []
        self.asked: list[int] = []

    def assign(self, tps):
        self.assigned = [(tp.topic, tp.partition, tp.offset) for tp in tps]

    def consume(self, n, timeout):
        self.asked.append(n)
        return self.polls.pop(0) if self.polls else []

    def position(self, tps):
        for tp in tps:
            tp.offset = self.positions.get((tp.topic, tp.partition), -1001)
        return tps

    def pause(self, tps):
        self.paused += [(tp.topic, tp.partition) for tp in tps]

    def resume(self, tps):
        self.resumed += [(tp.topic, tp.partition) for tp in tps]


def offsets(runs):
    return [(source, [m.offset() for m in run]) for source, run in runs]


def test_split_runs_groups_consecutive_records_and_isolates_events():
    a0, a1, b5, e, a2 = Msg("a", 0, 0), Msg("a", 0, 1), Msg("b", 0, 5), eof("b", 0, 6), \
        Msg("a", 0, 2)
    pieces = list(split_runs([a0, a1, b5, e, a2, Msg("c", 1, 0)], {("a", 0): 9, ("b", 0): 9}))
    assert pieces == [(("a", 0), 0, 2, None), (("b", 0), 2, 3, None), (None, 3, 3, e),
                      (("a", 0), 4, 5, None), (None, 5, 6, None)]  # c[1]: not read here
    assert list(split_runs([], {})) == []


def test_cut_at_finds_the_first_record_at_or_past_the_end():
    run = [Msg("a", 0, o) for o in (3, 4, 6, 7, 9)]  # holes: markers, compaction
    assert [cut_at(run, end) for end in (3, 4, 5, 6, 8, 9, 10, 100)] == [0, 1, 2, 2, 4, 4, 5, 5]
    assert cut_at([], 5) == 0


def test_empty_windows_are_done_before_reading_and_the_rest_assigned_at_first():
    consumer = Consumer([])
    reader = PartitionReader(consumer, {("a", 0): (5, 5), ("a", 1): (2, 4), ("b", 0): (7, 3)})
    assert active_windows({("a", 0): (5, 5), ("a", 1): (2, 4)}) == {("a", 1): (2, 4)}
    assert reader.ends == {("a", 1): 4} and reader.left() == 2
    assert consumer.assigned == [("a", 1, 2)]
    nothing = PartitionReader(Consumer([]), {("a", 0): (0, 0)})
    assert nothing.done and nothing.poll(10) == ([], [])


def test_already_assigned_windows_are_not_reassigned_and_empty_ones_are_paused():
    consumer = Consumer([])
    PartitionReader(consumer, {("a", 0): (0, 3), ("a", 1): (0, 0)},
                    assigned={("a", 0), ("a", 1)})
    assert consumer.assigned == [] and consumer.paused == [("a", 1)]
    consumer = Consumer([])
    PartitionReader(consumer, {("a", 0): (0, 3), ("a", 1): (4, 9)}, assigned={("a", 0)})
    assert consumer.assigned == [("a", 0, 0), ("a", 1, 4)]


def test_each_record_once_cut_at_the_end_and_partitions_done_in_order():
    polls = [[Msg("a", 0, 0), Msg("a", 0, 1), Msg("b", 0, 10)],
             [Msg("a", 0, 2), Msg("a", 0, 3), Msg("a", 0, 4), Msg("b", 0, 11)],
             [Msg("a", 0, 5), Msg("b", 0, 12)]]  # a[0]@5: fetched, but past the end
    consumer = Consumer(polls)
    reader = PartitionReader(consumer, {("a", 0): (0, 4), ("b", 0): (10, 13)})
    assert consumer.asked == []
    runs, done = reader.poll(1000)
    assert offsets(runs) == [(("a", 0), [0, 1]), (("b", 0), [10])] and done == []
    assert consumer.asked == [7]  # no more than is left: 4 + 3
    runs, done = reader.poll(1000)
    assert offsets(runs) == [(("a", 0), [2, 3]), (("b", 0), [11])] and done == [("a", 0)]
    assert consumer.paused == [("a", 0)] and reader.positions[("a", 0)] == 4
    runs, done = reader.poll(1000)
    assert offsets(runs) == [(("b", 0), [12])] and done == [("b", 0)] and reader.done


def test_end_of_partition_and_positions_finish_windows_whose_last_offsets_never_come():
    # a[0]'s window ends at 6 but 4 and 5 are a commit marker and an aborted record:
    # end-of-partition says 6. b[0]'s last offset is a marker and no EOF comes: once
    # nothing arrives, its position (8) says it is done.
    polls = [[Msg("a", 0, 2), Msg("a", 0, 3), eof("a", 0, 6), Msg("b", 0, 6)], []]
    consumer = Consumer(polls, positions={("b", 0): 8})
    reader = PartitionReader(consumer, {("a", 0): (2, 6), ("b", 0): (6, 8)})
    runs, done = reader.poll(100)
    assert offsets(runs) == [(("a", 0), [2, 3]), (("b", 0), [6])] and done == [("a", 0)]
    runs, done = reader.poll(100)
    assert runs == [] and done == [("b", 0)] and reader.done
    assert reader.positions == {("a", 0): 6, ("b", 0): 8}


def test_an_error_names_the_partition_and_nothing_arriving_is_a_stall():
    bad = Msg("a", 0, 0, KafkaError(KafkaError._TRANSPORT, "broker gone"))
    reader = PartitionReader(Consumer([[bad]]), {("a", 0): (0, 3)})
    with pytest.raises(PipelineError, match=r"reading a\[0\]: broker gone"):
        reader.poll(10)
    reader = PartitionReader(Consumer([]), {("a", 0): (0, 3)}, timeout=0.0)
    assert reader.poll(10) == ([], [])  # the first idle poll starts the clock
    with pytest.raises(PipelineError, match=r"replay stalled: nothing arrived for 0s from "
                                            r"a\[0\] at 0 of 3"):
        reader.poll(10)


def test_pause_and_resume_leave_done_partitions_paused():
    consumer = Consumer([[Msg("a", 0, 0)]])
    reader = PartitionReader(consumer, {("a", 0): (0, 1), ("b", 0): (0, 5)})
    reader.poll(10)
    reader.pause([("a", 0), ("b", 0)])
    reader.resume([("a", 0), ("b", 0)])
    assert consumer.paused == [("a", 0), ("b", 0)] and consumer.resumed == [("b", 0)]


def test_read_windows_hands_out_plain_messages():
    polls = [[Msg("a", 0, 0), eof("a", 0, 1), Msg("b", 0, 3), Msg("b", 0, 4)]]
    got = list(read_windows(Consumer(polls), {("a", 0): (0, 1), ("b", 0): (3, 4)}))
    assert [repr(m) for m in got] == ["a[0]@0", "b[0]@3"]
