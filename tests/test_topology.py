"""The topology file and the supervisor: `pipeline up`, restarts, status, `pipeline down`."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest
import requests

from pipeline.core.errors import PipelineError
from pipeline.ops import topology
from pipeline.ops.services import alive
from pipeline.ops.settings import REPO_ROOT
from tests.support.kafka_io import produce_raw, read_all
from tests.support.processes import cli, demo_topology
from tests.support.waiting import wait_for


def write(tmp_path: Path, text: str, name: str = "topology.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- the file


def test_the_shipped_topologies_are_valid():
    live, demo = topology.load(REPO_ROOT / "topology.toml"), topology.load(
        REPO_ROOT / "topology.demo.toml")
    assert live.namespace.is_live and live.source.kind == "gemini"
    assert demo.namespace.kind == "sim" and demo.source.kind == "venue"
    assert [p.name for p in live.processes] == [p.name for p in demo.processes]


@pytest.mark.parametrize("text,match", [
    ('namespace = "sim"\n[source]\nkind = "venue"\nspeed = "fast"\n',
     r"topology.toml:4: key 'source.speed': must be int or float"),
    ('namespace = "sim"\nsymbolz = ["BTCUSD"]\n', r"topology.toml:2: key 'symbolz': unknown key"),
    ('namespace = "sim"\n[source]\nkind = "venue"\n\n[[process]]\nname = "x"\nrun = "m"\n'
     'instancez = 2\n', r"topology.toml:8: key 'process.instancez': unknown key"),
    ('namespace = "prod"\n', r"topology.toml:1: key 'namespace': invalid namespace"),
    ('namespace = "sim"\n', r"key 'namespace': sim is not a live namespace, but the source is "
                            r"Gemini"),
    ('namespace = "sim"\n[source]\nkind = "venue"\n[[process]]\nname = "Book Keeper"\nrun = "m"\n',
     r"topology.toml:5: key 'process.name'"),
    ('namespace = "sim"\n[source\nkind = "venue"\n', r"not valid TOML: .*line 2"),
    ('namespace = "sim"\n[source]\nkind = "venue"\n[infra]\nkafka_port = true\n',
     r"topology.toml:5: key 'infra.kafka_port': must be int"),
    ('namespace = "sim"\n[source]\nkind = "venue"\n[[process]]\nname = "books"\n'
     'run = "consumers.orderbook"\nargs = { dept = 5 }\n',
     r"topology.toml:7: key 'process.args.dept': process books: unknown key; allowed here: "
     r"checkpoint_interval, depth, group, snapshot_interval$"),
    ('namespace = "sim"\n[source]\nkind = "venue"\n[[process]]\nname = "x"\n'
     'run = "consumers.orderbook"\n[[process]]\nname = "books"\nrun = "consumers.orderbook"\n'
     '[process.args]\ngroup = "g"\ndepth = "ten"\n',
     r"topology.toml:12: key 'process.args.depth': process books: must be an integer, "
     r"not 'ten'$"),
    ('namespace = "sim"\n[source]\nkind = "venue"\n[[process]]\nname = "x"\n'
     'run = "consumers.nosuchgroup"\n',
     r"topology.toml:6: key 'process.run': process x: cannot load group consumers.nosuchgroup"),
])
def test_a_malformed_topology_names_the_line_and_the_key(tmp_path, text, match):
    with pytest.raises(PipelineError, match=match):
        topology.load(write(tmp_path, text))


def test_an_overlay_overrides_keys(tmp_path):
    base = write(tmp_path, 'namespace = "sim"\n[source]\nkind = "venue"\nport = 8090\n')
    overlay = write(tmp_path, '[source]\nport = 9999\n', "overlay.toml")
    loaded = topology.load(base, overlay)
    assert loaded.source.port == 9999 and loaded.source.kind == "venue"


# --------------------------------------------------------------------------- up and down


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


def test_a_malformed_topology_fails_up_before_starting_anything(tmp_path):
    path = write(tmp_path, 'namespace = "sim"\n[source]\nkind = "venue"\nspeed = "fast"\n')
    env = {**os.environ, "PIPELINE_RUN_DIR": str(tmp_path / "run")}
    result = cli("up", "--topology", str(path), env=env)
    assert result.returncode == 1 and "key 'source.speed'" in result.stderr
    assert not (tmp_path / "run" / "supervisor.json").exists()


def test_a_broker_that_never_comes_up_fails_up_clearly(tmp_path, shared_data):
    path = demo_topology(tmp_path, shared_data, "")
    env = {k: v for k, v in os.environ.items()
           if k not in ("KAFKA_BOOTSTRAP_SERVERS", "SCHEMA_REGISTRY_URL")}
    env.update(PIPELINE_RUN_DIR=str(tmp_path / "run"), KAFKA_HEAP_OPTS="-Xmx1m")  # cannot start
    result = cli("up", "--topology", str(path), env=env, timeout=200)
    assert result.returncode == 1
    assert "Kafka broker exited" in result.stderr or "did not answer" in result.stderr
    state = json.loads((tmp_path / "run" / "supervisor.json").read_text())
    assert state["phase"] == "stopped" and state["processes"] == []


def test_every_instance_of_a_group_with_an_instance_option_gets_its_own_name(tmp_path):
    """Two execution instances without distinct names would share one transactional.id
    and group.instance.id and fence each other."""
    from pipeline.core.cluster import Cluster
    from pipeline.ops.launch import resolve
    from pipeline.ops.settings import Settings
    from pipeline.ops.supervisor import Supervisor

    path = write(tmp_path, 'namespace = "sim"\n[source]\nkind = "venue"\n'
                 '[[process]]\nname = "execution"\nrun = "consumers.execution"\ninstances = 2\n'
                 'args = { mode = "paper" }\n'
                 '[[process]]\nname = "bars"\nrun = "consumers.bars"\ninstances = 2\n'
                 '[[process]]\nname = "orderbook"\nrun = "consumers.orderbook"\ninstances = 2\n'
                 '[[process]]\nname = "solo"\nrun = "consumers.execution"\n')
    supervisor = Supervisor(topology.load(path), Settings.from_env(tmp_path / "run"))
    supervisor.bootstrap, supervisor.registry_url = "127.0.0.1:1", "http://127.0.0.1:2"
    cluster = Cluster(supervisor.bootstrap, supervisor.registry_url)

    def instance_flags(name: str, index: int) -> tuple[str, list[str]]:
        child = supervisor._child_for(supervisor.topology.process(name), index)
        return child.name, [child.cmd[i + 1] for i, arg in enumerate(child.cmd)
                            if arg == "--instance"]

    def launched(name: str, index: int):
        """What the child the supervisor starts builds: its context and config."""
        cmd = supervisor._child_for(supervisor.topology.process(name), index).cmd
        assert cmd[1:6] == ["-m", "pipeline.ops.launch", supervisor.topology.process(name).run,
                            "--process", name]
        assert cmd[cmd.index("--topology") + 1] == str(path)
        instance = int(cmd[cmd.index("--instance") + 1]) if "--instance" in cmd else 0
        _, ctx, config = resolve(topology.load(cmd[cmd.index("--topology") + 1]), name,
                                 cluster, supervisor.run_dir, instance, expected_run=cmd[3])
        return ctx, config

    assert [instance_flags("execution", i) for i in (0, 1)] == [("execution-0", ["0"]),
                                                                ("execution-1", ["1"])]
    ctx, config = launched("execution", 1)
    assert config.mode == "paper" and ctx.instance == "1"
    assert ctx.strategy_keys == supervisor.run_dir / "secrets" / "strategy-keys.json"
    assert ctx.strategy_keys.stat().st_mode & 0o777 == 0o600
    assert ctx.symbols == ("BTCUSD", "ETHUSD") and str(ctx.namespace) == "sim"
    assert [instance_flags("bars", i) for i in (0, 1)] == [("bars-0", ["0"]), ("bars-1", ["1"])]
    assert [launched("bars", i)[0].instance for i in (0, 1)] == ["0", "1"]
    # orderbook takes no instance; a single instance keeps the default
    assert instance_flags("orderbook", 1) == ("orderbook-1", [])
    assert launched("orderbook", 1)[0].instance == "0"
    assert instance_flags("solo", 0) == ("solo", [])
    assert launched("solo", 0)[0].instance == "0"


def test_the_groups_that_take_an_instance_option_say_so():
    """A shipped group that names its ids by ``ctx.instance`` declares ``MULTI_INSTANCE``
    (what the supervisor reads), and one without does not: the two never drift apart."""
    import importlib
    import re

    from pipeline.ops.settings import REPO_ROOT
    from pipeline.ops.supervisor import takes_instance

    seen = {}
    for path in sorted((REPO_ROOT / "consumers").glob("*.py")):
        if path.stem == "__init__":
            continue
        module = f"consumers.{path.stem}"
        uses = re.search(r"\bctx\.instance\b", path.read_text()) is not None
        seen[path.stem] = takes_instance(module)
        assert seen[path.stem] == uses, module
        assert importlib.import_module(module).MULTI_INSTANCE == uses
    assert {name for name, several in seen.items() if several} == {
        "archive", "bars", "execution", "strategy"}
