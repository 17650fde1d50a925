"""The topology file and the supervisor: `pipeline up`, restarts, status, `pipeline down`: the
tests that need Kafka (those that do not: tests/unit/ops/test_topology.py)."""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest
import requests

from pipeline.ops import topology
from pipeline.ops.services import alive
from tests.support.kafka_io import produce_raw, read_all
from tests.support.processes import cli, demo_topology
from tests.support.waiting import wait_for

PROCESSES = """
[[process]]
name = "orderbook"
run = "consumers.orderbook"
args = { depth = 5, checkpoint_interval = 1.0 }

[[process]]
name = "strategy"
run = "consumers.strategy"
args = { strategy = "pipeline.strategy:MidQuoter", params = { symbol = "FILUSD", tick = "0.0001", requote_bps = 1 }, inputs = "book.snapshots" }

[[process]]
name = "bars"
run = "consumers.bars"

[[process]]
name = "execution"
run = "consumers.execution"
args = { mode = "paper" }

[[topic]]
name = "monitor.spread"

[[process]]
name = "spread-monitor"
run = "consumers.examples.spread_monitor:make_group"
"""  # noqa: E501 - TOML 1.0 inline tables (the strategy's args) cannot span lines


@pytest.mark.broker
def test_up_restarts_a_killed_group_and_down_leaves_nothing(kafka, registry, tmp_path,
                                                            shared_data, up_env):
    path = demo_topology(tmp_path, shared_data, PROCESSES)
    ns = topology.load(path).namespace
    started = cli("up", "--topology", str(path), env=up_env)
    assert started.returncode == 0, started.stderr + started.stdout
    state = json.loads((tmp_path / "run" / "supervisor.json").read_text())
    pids = {p["name"]: p["pid"] for p in state["processes"]}
    assert set(pids) == {"venue", "producer", "orderbook", "bars", "strategy", "execution",
                         "spread-monitor"}
    snapshots = ns.topic("book.snapshots")
    wait_for(lambda: len(read_all(kafka, snapshots)) > 20, 60, "book snapshots")
    wait_for(lambda: read_all(kafka, ns.topic("orders.events")), 90, "an order event")
    wait_for(lambda: read_all(kafka, ns.topic("bars")), 120, "bars")
    wait_for(lambda: read_all(kafka, f"{ns}.monitor.spread"), 60, "the plug-in's output")

    os.kill(pids["orderbook"], signal.SIGKILL)

    def restarted():
        current = json.loads((tmp_path / "run" / "supervisor.json").read_text())
        book = next(p for p in current["processes"] if p["name"] == "orderbook")
        return book if book["restarts"] == 1 and book["up"] and book["pid"] != pids["orderbook"] \
            else None

    book = wait_for(restarted, 30, "the supervisor to restart the orderbook")
    assert book["last_error"] == "killed by signal 9"
    before = len(read_all(kafka, snapshots))
    wait_for(lambda: len(read_all(kafka, snapshots)) > before + 10, 60, "data after the restart")
    status = cli("status", env=up_env)
    assert status.returncode == 0 and "orderbook" in status.stdout and f"{ns}.orderbook" in \
        status.stdout
    metrics = requests.get(f"http://127.0.0.1:{topology.load(path).infra.metrics_port}/metrics",
                           timeout=10).text
    assert 'pipeline_process_restarts_total{process="orderbook"} 1' in metrics
    assert f'pipeline_group_members{{group="{ns}.orderbook"}} 1' in metrics

    stopped = cli("down", env=up_env)
    assert stopped.returncode == 0 and "stopped the topology" in stopped.stdout
    every_pid = [state["pid"], book["pid"], *pids.values()]
    wait_for(lambda: not any(alive(pid) for pid in every_pid), 10, "no process left")
    assert not (tmp_path / "run" / "supervisor.json").exists()


@pytest.mark.broker
def test_status_counts_records_per_second_per_partition(kafka, topics, namespace, tmp_path):
    """Topics by end offsets, groups by committed offsets: only the partition that moved
    between two collections has a rate."""
    from confluent_kafka import Consumer, TopicPartition

    from pipeline.ops.status import collect, partition_label, prometheus

    trades = topics("md.trades")["md.trades"]
    group = f"{namespace}.watcher"

    def commit(offsets: dict[int, int]) -> None:
        consumer = Consumer({"bootstrap.servers": kafka, "group.id": group})
        consumer.commit(offsets=[TopicPartition(trades, p, o) for p, o in offsets.items()],
                        asynchronous=False)
        consumer.close()

    produce_raw(kafka, trades, [("BTCUSD", b"1")] * 2)
    busy = read_all(kafka, trades)[0].partition
    idle = (busy + 1) % 6
    commit({busy: 2, idle: 0})
    state = {"bootstrap": kafka, "namespace": str(namespace)}
    before = collect(tmp_path, state)
    produce_raw(kafka, trades, [("BTCUSD", b"2")] * 3)
    commit({busy: 5})
    after = collect(tmp_path, state, before)

    appended = after.partition_rates[trades]
    assert sorted(appended) == sorted(partition_label(trades, p) for p in range(6))
    assert appended[partition_label(trades, busy)] > 0
    assert [r for label, r in appended.items() if label != partition_label(trades, busy)] == [0] * 5
    committed = after.partition_rates[group]
    assert set(committed) == {partition_label(trades, busy), partition_label(trades, idle)}
    assert committed[partition_label(trades, busy)] > 0 == committed[partition_label(trades, idle)]
    assert after.rates[trades] == appended[partition_label(trades, busy)]
    assert after.groups[group]["lag"] == {partition_label(trades, busy): 0,
                                          partition_label(trades, idle): 0}
    metrics = prometheus(after, str(namespace))
    assert (f'pipeline_topic_records_per_second{{topic="{trades}",partition="{idle}"}} 0.000'
            in metrics)
    assert (f'pipeline_group_records_per_second{{group="{group}",topic="{trades}",'
            f'partition="{busy}"}} ') in metrics
    # every sample belongs to a family declared just before it with HELP and TYPE
    declared = None
    for line in metrics.splitlines():
        if line.startswith("# HELP "):
            declared = line.split()[2]
        elif line.startswith("# TYPE "):
            assert line.split()[2] == declared, line
        else:
            assert line.split("{")[0].split()[0] == declared, line


@pytest.mark.broker
def test_an_unknown_strategy_class_fails_up_clearly_and_leaves_nothing(tmp_path, shared_data,
                                                                       up_env):
    path = demo_topology(tmp_path, shared_data, """
[[process]]
name = "strategy"
run = "consumers.strategy"
args = { strategy = "pipeline.strategy:NoSuchStrategy", inputs = "book.snapshots" }
""")
    result = cli("up", "--topology", str(path), env=up_env)
    assert result.returncode == 1
    assert "cannot load strategy 'pipeline.strategy:NoSuchStrategy'" in result.stderr
    assert result.stderr.count("\n") == 1, "one error line"
    state = json.loads((tmp_path / "run" / "supervisor.json").read_text())
    assert state["phase"] == "stopped"
    assert not any(alive(p["pid"]) for p in state["processes"])


@pytest.mark.broker
def test_a_port_in_use_fails_up_clearly(tmp_path, shared_data, up_env):
    path = demo_topology(tmp_path, shared_data, "")
    port = topology.load(path).source.port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = cli("up", "--topology", str(path), env=up_env)
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr


