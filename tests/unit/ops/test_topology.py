"""The topology file and the supervisor: `pipeline up`, restarts, status, `pipeline down`.

The tests that need Kafka: tests/integration/test_topology.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.core.errors import PipelineError
from pipeline.ops import topology
from pipeline.ops.settings import REPO_ROOT
from tests.support.processes import cli, demo_topology


def write(tmp_path: Path, text: str, name: str = "topology.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


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


