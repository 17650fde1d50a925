"""Strategy plug-ins and the strategy group: signed, deterministic, exactly-once requests: the
tests that need Kafka (those that do not: tests/unit/trading/test_strategy.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from consumers.strategy import group_config
from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Decoder, Encoder
from pipeline.core.errors import PipelineError
from pipeline.kafka.catalog import ensure_topics
from pipeline.kafka.clients import ReliableProducer
from pipeline.kafka.deadletter import STAGE_HANDLE, parse_dead_letter
from pipeline.ops.settings import REPO_ROOT
from pipeline.runtime.runner import GroupRunner
from pipeline.strategy import SmaCross
from pipeline.trading.signing import client_order_id, verify
from tests.support.kafka_io import committed, read_all
from tests.support.strategies import Exploding
from tests.support.waiting import wait_for
from tests.unit.trading.test_strategy import HOUR, bar, random_walk  # noqa: F401 - shared with the unit tests

KEY = b"strategy-test-key"


def publish_bars(kafka: str, registry_url: str, topic: str, closes: list[str]) -> None:
    encode = Encoder(SchemaRegistry(registry_url), topic)
    producer = ReliableProducer(kafka)
    for i, close in enumerate(closes):
        producer.produce(topic, encode(bar(close, i)), "BTCUSD")
    producer.flush()


def expected_ids(closes: list[str], bars_topic: str, partition: int) -> list[str]:
    """The client_order_ids a run over ``closes`` must emit, in order."""
    reference = SmaCross(fast=5, slow=12)
    return [client_order_id("sma-cross", f"bars/{partition}/{i}", j)
            for i, close in enumerate(closes)
            for j, _ in enumerate(reference.on_bar(bar(close, i)))]


@pytest.mark.broker
def test_the_group_publishes_signed_deterministic_requests(kafka, registry, namespace):
    ensure_topics(kafka, namespace, ["bars", "orders.events", "orders.requests", "strategy.state",
                                     "dlq"])
    closes = random_walk(400, seed=8)
    bars_topic = namespace.topic("bars")
    publish_bars(kafka, registry.url, bars_topic, closes)
    GroupRunner(group_config(kafka, registry.url, namespace, SmaCross(fast=5, slow=12), KEY),
                kafka).run(max_records=400, idle_timeout_s=15)
    decode = Decoder(SchemaRegistry(registry.url))
    requests = [decode(r.value) for r in read_all(kafka, namespace.topic("orders.requests"))]
    partition = int(requests[0]["trigger"].split("/")[1])
    want = expected_ids(closes, bars_topic, partition)
    assert len(want) > 10
    assert [r["client_order_id"] for r in requests] == want, "same input, same ids, in order"
    for request in requests:
        assert verify(request, KEY) and not verify(request, b"another key")
        assert not verify({**request, "amount": "100"}, KEY), "any changed field breaks it"
        assert request["expires_ms"] - request["created_ms"] == 30_000
        assert request["strategy_id"] == "sma-cross" and request["order_type"] == "MARKET"


@pytest.mark.broker
def test_a_strategy_that_raises_is_dead_lettered_naming_strategy_and_input(kafka, registry,
                                                                           namespace):
    ensure_topics(kafka, namespace, ["bars", "orders.events", "orders.requests", "strategy.state",
                                     "dlq"])
    publish_bars(kafka, registry.url, namespace.topic("bars"), ["11", "12", "13", "14"])
    stats = GroupRunner(group_config(kafka, registry.url, namespace, Exploding(), KEY), kafka).run(
        max_records=4, idle_timeout_s=15)
    assert stats.records == 4 and stats.dead_letters == 1
    (letter,) = [parse_dead_letter(d.key, d.value, list(d.headers))
                 for d in read_all(kafka, namespace.topic("dlq"), expect=1)]
    assert letter.stage == STAGE_HANDLE and letter.source_offset == 2
    assert "strategy exploding raised ZeroDivisionError on" in letter.error_message
    assert f"{namespace.topic('bars')}/" in letter.error_message
    assert len(read_all(kafka, namespace.topic("orders.requests"))) == 3


@pytest.mark.broker
def test_kill_9_and_restart_emit_every_request_exactly_once(kafka, registry, namespace, tmp_path):
    ensure_topics(kafka, namespace, ["bars", "orders.events", "orders.requests", "strategy.state",
                                     "dlq"])
    closes = random_walk(2000, seed=13)
    publish_bars(kafka, registry.url, namespace.topic("bars"), closes)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"sma-cross": KEY.decode()}))
    keys.chmod(0o600)
    params = json.dumps({"fast": 5, "slow": 12, "delay_ms": 2})
    group = f"{namespace}.strategy.sma-cross"

    def start(name: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "consumers.strategy", "--bootstrap", kafka, "--registry",
             registry.url, "--namespace", str(namespace), "--strategy",
             "tests.support.strategies:SlowSmaCross", "--params", params, "--strategy-keys",
             str(keys)], cwd=REPO_ROOT, stderr=open(tmp_path / name, "w"))

    def done() -> int:
        return sum(max(o, 0) for o in committed(kafka, group, namespace.topic("bars")).values())

    for attempt in range(2):
        proc = start(f"run{attempt}.log")
        try:
            target = 500 * (attempt + 1)
            wait_for(lambda: done() >= target, 90, f"{target} bars committed")  # noqa: B023 - wait_for calls it at once
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
    last = start("final.log")
    try:
        wait_for(lambda: done() == 2000, 120, "all bars committed")
    finally:
        last.send_signal(signal.SIGTERM)
        assert last.wait(30) == 0
    assert "restored its state" in (tmp_path / "final.log").read_text()
    decode = Decoder(SchemaRegistry(registry.url))
    emitted = [decode(r.value) for r in read_all(kafka, namespace.topic("orders.requests"))]
    ids = [r["client_order_id"] for r in emitted]
    partition = int(emitted[0]["trigger"].split("/")[1])
    want = expected_ids(closes, namespace.topic("bars"), partition)
    assert len(ids) == len(set(ids)), "no request twice (read_committed)"
    assert ids == want, "none lost, same ids as an uninterrupted run, in order"
    assert all(verify(r, KEY) for r in emitted)


@pytest.mark.broker
@pytest.mark.parametrize("state,match", [
    ({"format": "json", "version": 3, "state": b'{"strategy": {"direction": 1}, "orders": {}}'},
     r"saved state of strategy sma-cross \(version 3, .*does not load: KeyError"),
    ({"format": "pickle", "version": 0, "state": b"\x80\x05K\x01."},
     r"saved state of strategy sma-cross \(version 0, .*is a pickle .*never loaded"),
])
def test_a_saved_state_that_does_not_load_stops_the_group_naming_strategy_and_version(
        kafka, registry, namespace, state, match):
    ensure_topics(kafka, namespace, ["bars", "orders.events", "orders.requests",
                                     "strategy.state", "dlq"])
    encode = Encoder(SchemaRegistry(registry.url), namespace.topic("strategy.state"))
    producer = ReliableProducer(kafka)
    producer.produce(namespace.topic("strategy.state"), encode({
        "strategy_id": "sma-cross", "strategy_class": "pipeline.strategies.sma_cross:SmaCross",
        "saved_ms": 1, **state}), "sma-cross")
    producer.flush()
    publish_bars(kafka, registry.url, namespace.topic("bars"), ["1", "2"])
    runner = GroupRunner(group_config(kafka, registry.url, namespace, SmaCross(fast=2, slow=3),
                                      KEY), kafka)
    with pytest.raises(PipelineError, match=match):
        runner.run(idle_timeout_s=15)
    assert read_all(kafka, namespace.topic("orders.requests")) == [], "it traded nothing"


