"""The Parquet sinks write only after the runtime's ``after_commit``: the bars group's
checkpoint protocol and its Parquet files through the in-memory harness (the real runner
loop, the real handler, an in-memory cluster), including a commit that fails and the
restart after it. The same against the broker with kill -9: tests/integration/test_bars_group.py."""

from __future__ import annotations

import json

import pytest
from confluent_kafka import KafkaError, KafkaException

from consumers import bars
from consumers.bars import BarsHandler, BarsOptions
from pipeline.market.bars import BarSettings
from pipeline.runtime.harness import HandlerHarness, MemoryCluster
from pipeline.runtime.runner import GroupConfig
from pipeline.sinks.bars import DIGITS, PLACES, read_all_bars
from tests.unit.sinks.test_archive_store import trade

T0 = 1_624_500_000_000 - 1_624_500_000_000 % 60_000  # a minute's start
TOPIC = "sim.md.trades"


class JsonSerde:
    """Stands in for the registry-backed serde: the handler's outputs as JSON."""

    def __init__(self, registry=None) -> None:
        pass

    def encoder(self, topic):
        return lambda value: json.dumps(value, default=str, sort_keys=True).encode()


@pytest.fixture
def group(tmp_path, monkeypatch):
    monkeypatch.setattr(bars, "Serde", JsonSerde)
    monkeypatch.setattr(bars, "SchemaRegistry", lambda url: None)
    clock = [T0 + 1_000]
    settings = BarSettings(intervals=("1m",), lateness_ms=5_000, max_places=PLACES,
                           max_digits=DIGITS)
    opts = BarsOptions("unused", "unused", "sim", "sim", "sim.bars", tmp_path / "parquet",
                       tmp_path / "state", settings, fsync=False, flush_interval_s=0.0)
    config = GroupConfig("sim.bars", [TOPIC], lambda: BarsHandler(opts, lambda: clock[0]),
                         "sim.dlq", transactional_id="sim.bars.sim.0")
    return config, clock, opts


def trades(*offsets: int) -> list[tuple]:
    return [(TOPIC, 0, i, trade(i, T0 + 1_000 + i), b"ALCXUSD") for i in offsets]


def test_bars_reach_parquet_only_after_their_transaction_committed(group):
    config, clock, opts = group
    harness = HandlerHarness(config)
    assert harness.assign((TOPIC, 0)) == {(TOPIC, 0): None}  # nothing saved: committed offsets
    assert harness.last_context.reads == []  # bars restores from its checkpoints and offsets
    harness.batch(*trades(0, 1, 2))
    clock[0] = T0 + 70_000  # the minute plus its lateness passed on the wall clock
    handler = harness.handler
    calls = []
    original = handler.after_commit

    def after_commit(offsets):
        calls.append((dict(offsets), read_all_bars(opts.parquet_root),
                      [b.start_ms for p in handler._parts.values() for b in p.unconfirmed]))
        original(offsets)

    handler.after_commit = after_commit  # type: ignore[method-assign]
    out = harness.tick()
    assert [o.topic for o in out] == ["sim.bars"]
    assert json.loads(out[0].value)["trade_count"] == 3
    # committed, then after_commit saw the bar unconfirmed and nothing yet in Parquet; the
    # offset committed is 2, not 3: a second checkpoint of the same next offset (3) is told
    # apart from the first by its committed value (see consumers/bars.py)
    assert calls == [({(TOPIC, 0): 2}, [], [T0])]
    assert read_all_bars(opts.parquet_root) == []  # flushed by the next batch's end
    harness.tick()
    written = read_all_bars(opts.parquet_root)
    assert [(b.symbol, b.start_ms, b.trade_count) for b in written] == [("ALCXUSD", T0, 3)]


def test_a_failed_commit_writes_no_parquet_and_the_restart_redoes_the_batch(group):
    config, clock, opts = group
    cluster = MemoryCluster()
    first = HandlerHarness(config, cluster)
    first.assign((TOPIC, 0))
    first.batch(*trades(0, 1, 2))
    assert first.committed == {(TOPIC, 0): 3}
    clock[0] = T0 + 70_000

    def fenced(timeout):
        raise KafkaException(KafkaError(KafkaError._FENCED, "fenced"))

    first._memory.commit_transaction = fenced  # type: ignore[method-assign]
    with pytest.raises(KafkaException):
        first.tick()  # the bar was produced and checkpointed, the commit failed
    assert first.handler._parts[0].confirmed == [] and first.handler._parts[0].unconfirmed
    first.crash()
    assert read_all_bars(opts.parquet_root) == [] and cluster.records("sim.bars") == []

    second = HandlerHarness(config, cluster)
    # the newest checkpoint (the failed transaction's) does not match the committed 3: dropped;
    # reading resumes one record before the kept checkpoint's next offset
    assert second.assign((TOPIC, 0)) == {(TOPIC, 0): 2}
    second.batch(*trades(2))  # the one record re-read, skipped
    # a restored builder's wall clock starts again at the restore: the downtime closes nothing
    second.tick()
    assert cluster.records("sim.bars") == []
    clock[0] = T0 + 140_000
    second.tick()
    second.tick()
    assert [json.loads(r.value)["trade_count"] for r in cluster.records("sim.bars")] == [3]
    assert [(b.start_ms, b.trade_count) for b in read_all_bars(opts.parquet_root)] == [(T0, 3)]
    second.close()
    assert len(read_all_bars(opts.parquet_root)) == 1
