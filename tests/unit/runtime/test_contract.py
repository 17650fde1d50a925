"""The consumer-group contract (pipeline/runtime/contract.py), without a broker: a group
module's ``Config`` from a topology's args and from its command line, loading a group from
a ``run`` string, and the launcher's view of a topology process."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import pytest

import consumers.examples.spread_monitor as spread_monitor
from pipeline.core.cluster import Cluster
from pipeline.core.errors import PipelineError
from pipeline.kafka.catalog import Namespace
from pipeline.ops import topology
from pipeline.ops.launch import command, resolve
from pipeline.runtime.contract import (
    GroupContext,
    build_group,
    config_from_args,
    config_from_namespace,
    config_parser,
    load_group,
)
from pipeline.runtime.runner import GroupConfig

CLUSTER = Cluster("127.0.0.1:1", "http://127.0.0.1:2")


def _off(value: object) -> Decimal | None:
    return None if value == "off" else Decimal(str(value))


@dataclass(frozen=True)
class Sample:
    depth: int = 10
    ratio: float = 0.5
    price: Decimal = Decimal("1.5")
    label: str = "x"
    path: Path | None = None
    symbols: tuple[str, ...] = ("BTCUSD",)
    params: dict = field(default_factory=dict)
    fast: bool = False
    book: bool = True
    mode: str = field(default="paper", metadata={"choices": ("paper", "live")})
    limit: Decimal | None = field(default=Decimal(5), metadata={"parse": _off,
                                                                "help": "a limit, or off"})
    capital: Decimal | None = None


# --------------------------------------------------------------------------- args -> Config


def test_args_become_a_typed_config_with_the_defaults_for_the_rest():
    config = config_from_args(Sample, {
        "depth": 3, "ratio": 2, "price": "0.10", "path": "a/b", "symbols": ["ETHUSD", "FILUSD"],
        "params": {"fast": 5}, "fast": True, "book": False, "mode": "live", "limit": "off",
        "capital": 100})
    assert config == Sample(depth=3, ratio=2.0, price=Decimal("0.10"), path=Path("a/b"),
                            symbols=("ETHUSD", "FILUSD"), params={"fast": 5}, fast=True,
                            book=False, mode="live", limit=None, capital=Decimal(100))
    assert isinstance(config.ratio, float) and str(config.price) == "0.10"
    assert config_from_args(Sample, {}) == Sample()


def test_a_comma_list_and_an_array_are_the_same_tuple():
    listed = config_from_args(Sample, {"symbols": "ETHUSD, FILUSD,"})
    assert listed.symbols == ("ETHUSD", "FILUSD") == config_from_args(
        Sample, {"symbols": ["ETHUSD", "FILUSD"]}).symbols


@pytest.mark.parametrize("args,message", [
    ({"dpeth": 3}, "key 'dpeth': unknown key; allowed here: book, capital, depth, fast, label, "
                   "limit, mode, params, path, price, ratio, symbols"),
    ({"depth": "3"}, "key 'depth': must be an integer, not '3'"),
    ({"depth": True}, "key 'depth': must be an integer, not True"),
    ({"ratio": "fast"}, "key 'ratio': must be a number, not 'fast'"),
    ({"price": 0.1}, "key 'price': must be a decimal (a string like \"0.5\", or an integer), "
                     "not 0.1: a float is not exact"),
    ({"price": "abc"}, "key 'price': must be a decimal (a string like \"0.5\", or an integer), "
                       "not 'abc'"),
    ({"price": "NaN"}, "key 'price': must be a finite decimal, not 'NaN'"),
    ({"fast": "yes"}, "key 'fast': must be true or false, not 'yes'"),
    ({"symbols": 3}, "key 'symbols': must be an array or a comma-separated string, not 3"),
    ({"symbols": ["BTCUSD", 3]}, "key 'symbols': must be a string, not 3"),
    ({"params": "x"}, "key 'params': must be a table, not 'x'"),
    ({"mode": "sandbox"}, "key 'mode': must be one of paper, live, not 'sandbox'"),
    ({"path": 3}, "key 'path': must be a path (a string), not 3"),
])
def test_a_wrong_key_or_type_is_one_error_naming_the_key(args, message):
    with pytest.raises(PipelineError) as error:
        config_from_args(Sample, args)
    assert str(error.value) == message


def test_the_error_is_made_where_the_caller_says():
    with pytest.raises(PipelineError, match=r"^at depth: must be an integer, not 'x'$"):
        config_from_args(Sample, {"depth": "x"},
                         lambda key, message: PipelineError(f"at {key}: {message}"))


def test_a_topology_names_the_file_line_and_key_of_a_bad_argument(tmp_path):
    path = tmp_path / "topology.toml"
    path.write_text('namespace = "sim"\n[source]\nkind = "venue"\n\n'
                    '[[process]]\nname = "bars"\nrun = "consumers.bars"\n'
                    'args = { intervals = "1m", lateness_ms = 5 }\n\n'
                    '[[process]]\nname = "portfolio"\nrun = "consumers.portfolio"\n'
                    'args = { capital = "10000", lateness_ms = 5 }\n')
    with pytest.raises(PipelineError) as error:
        topology.load(path)
    assert str(error.value).startswith(
        f"{path}:13: key 'process.args.lateness_ms': process portfolio: unknown key; "
        "allowed here: api_key_file, capital, currency, group, limits, max_mark_age_s, mode,")
    path.write_text(path.read_text().replace('capital = "10000", lateness_ms = 5',
                                             "capital = 0.5"))
    with pytest.raises(PipelineError) as error:
        topology.load(path)
    assert str(error.value) == (
        f"{path}:13: key 'process.args.capital': process portfolio: must be a decimal (a "
        "string like \"0.5\", or an integer), not 0.5: a float is not exact")


def test_the_shipped_groups_read_their_args_as_today():
    loaded = topology.load(Path(__file__).parents[3] / "topology.toml")
    by_name = {p.name: p.config for p in loaded.processes}
    assert by_name["orderbook"].depth == 10 and by_name["orderbook"].checkpoint_interval == 5.0
    assert by_name["bars"].intervals == ("1m", "5m", "1h", "1d")
    assert by_name["strategy"].params == {"symbol": "BTCUSD", "spread_bps": 10}
    assert by_name["strategy"].inputs == ("book.snapshots",)
    portfolio = by_name["portfolio"]
    assert portfolio.capital == {"*": Decimal("10000")}
    assert portfolio.limits["*"].max_drawdown_pct == Decimal("0.1")
    assert portfolio.limits["*"].max_daily_loss == Decimal("1000")
    assert by_name["archive"].roll_seconds == 60.0 and by_name["archive"].raw is False
    assert by_name["spread-monitor"] == spread_monitor.Config(alert_bps=50)
    from pipeline.ops.supervisor import chart_interval

    assert chart_interval(loaded) == "1m"  # the dashboard's candles: the shortest bars


# --------------------------------------------------------------------------- the command line


def test_the_command_line_has_one_flag_per_field_typed_as_the_field():
    ap = config_parser(Sample, "python -m sample")
    parsed = ap.parse_args(["--depth", "3", "--price", "0.10", "--symbols", "ETHUSD,FILUSD",
                            "--params", '{"fast": 5}', "--fast", "--no-book", "--limit", "off",
                            "--path", "a/b", "--bootstrap", "k:9092", "-n", "sim"])
    assert config_from_namespace(Sample, parsed) == Sample(
        depth=3, price=Decimal("0.10"), symbols=("ETHUSD", "FILUSD"), params={"fast": 5},
        fast=True, book=False, limit=None, path=Path("a/b"))
    assert (parsed.bootstrap, parsed.namespace, parsed.registry) == ("k:9092", "sim", None)
    assert config_from_namespace(Sample, ap.parse_args([])) == Sample()
    text = ap.format_help()
    assert "--limit LIMIT" in text and "a limit, or off [default: 5]" in text


@pytest.mark.parametrize("argv,error", [
    (["--depth", "x"], "argument --depth: must be an integer, not 'x'"),
    (["--mode", "sandbox"], "argument --mode: must be one of paper, live, not 'sandbox'"),
    (["--params", "[1]"], "argument --params: must be a table, not [1]"),
    (["--price", "1.5.5"], "argument --price: must be a decimal"),
])
def test_a_bad_flag_is_refused_naming_it(capsys, argv, error):
    with pytest.raises(SystemExit):
        config_parser(Sample, "python -m sample").parse_args(argv)
    assert error in capsys.readouterr().err


def test_only_a_multi_instance_group_takes_an_instance_flag():
    import consumers.bars
    import consumers.orderbook

    bars = config_parser(consumers.bars.Config, "bars").parse_args(["--instance", "2"])
    assert bars.instance == "2"
    with pytest.raises(SystemExit):
        config_parser(consumers.orderbook.Config, "orderbook").parse_args(["--instance", "2"])


def test_a_field_the_runtime_supplies_is_refused():
    @dataclass(frozen=True)
    class Clash:
        run_dir: str = "x"

    with pytest.raises(PipelineError, match=r"Clash.run_dir: the runtime supplies that"):
        config_parser(Clash, "clash")


# --------------------------------------------------------------------------- loading


def _ctx(name: str = "spread-monitor") -> GroupContext:
    return GroupContext(CLUSTER, Namespace("sim"), name)


def test_a_module_and_a_module_function_load_the_same_group():
    by_module = load_group("consumers.examples.spread_monitor")
    by_function = load_group("consumers.examples.spread_monitor:make_group")
    for group in (by_module, by_function):
        assert group.config is spread_monitor.Config and not group.legacy
        assert group.make_group is spread_monitor.make_group and not group.multi_instance
        made = build_group(group, _ctx(), spread_monitor.Config(alert_bps=7))
        assert made.group_id == "sim.spread-monitor"
        assert list(made.topics) == ["sim.book.snapshots"] and made.dead_letter_topic == "sim.dlq"
        assert made.handler().alert_bps == Decimal(7)
    assert load_group("consumers.execution").multi_instance


@pytest.mark.parametrize("run,message", [
    ("consumers.nosuch", "cannot load group consumers.nosuch: No module named 'consumers.nosuch'"),
    ("consumers.examples.spread_monitor:nosuch", "cannot load group consumers.examples."
     "spread_monitor:nosuch: module consumers.examples.spread_monitor has no function nosuch"),
    ("pipeline.core.errors", "cannot load group pipeline.core.errors: module "
     "pipeline.core.errors has no function make_group"),
    ("configless", "group configless: the module has no Config dataclass"),
])
def test_a_run_that_names_no_group_is_one_error(monkeypatch, run, message):
    module = types.ModuleType("configless")
    module.make_group = lambda ctx, config: None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "configless", module)
    with pytest.raises(PipelineError) as error:
        load_group(run)
    assert str(error.value).startswith(message)


def test_a_legacy_user_group_gets_its_args_as_keywords(monkeypatch):
    module = types.ModuleType("legacy_group")
    seen = {}

    def make_group(bootstrap, registry_url, namespace, name, alert_bps=1):
        seen.update(bootstrap=bootstrap, registry_url=registry_url, namespace=namespace,
                    name=name, alert_bps=alert_bps)
        return GroupConfig(f"{namespace}.{name}", [], lambda: None, "dlq")  # type: ignore

    module.make_group = make_group  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "legacy_group", module)
    group = load_group("legacy_group:make_group")
    assert group.legacy
    made = build_group(group, _ctx("mine"), {"alert_bps": 9})
    assert made.group_id == "sim.mine"
    assert seen == {"bootstrap": "127.0.0.1:1", "registry_url": "http://127.0.0.1:2",
                    "namespace": Namespace("sim"), "name": "mine", "alert_bps": 9}


def test_a_factory_that_returns_no_group_config_is_refused(monkeypatch):
    module = types.ModuleType("bad_group")

    @dataclass(frozen=True)
    class Config:
        pass

    module.Config = Config  # type: ignore[attr-defined]
    module.make_group = lambda ctx, config: "nope"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bad_group", module)
    with pytest.raises(PipelineError, match=r"^bad_group returned str, not a GroupConfig$"):
        build_group(load_group("bad_group"), _ctx(), Config())


# --------------------------------------------------------------------------- the launcher


def test_the_launcher_builds_what_the_topology_says(tmp_path):
    path = tmp_path / "topology.toml"
    path.write_text('namespace = "sim"\nsymbols = ["FILUSD"]\n[source]\nkind = "venue"\n'
                    '[[process]]\nname = "books"\nrun = "consumers.orderbook"\ninstances = 2\n'
                    'args = { depth = 4 }\n'
                    '[[process]]\nname = "mon"\nrun = "consumers.examples.spread_monitor"\n')
    loaded = topology.load(path)
    cmd = command(loaded, loaded.process("books"), 1, CLUSTER, tmp_path / "run", "py")
    assert cmd == ["py", "-m", "pipeline.ops.launch", "consumers.orderbook", "--process", "books",
                   "--topology", str(path), "--namespace", "sim", "--bootstrap", "127.0.0.1:1",
                   "--registry", "http://127.0.0.1:2", "--run-dir", str(tmp_path / "run")]
    group, ctx, config = resolve(loaded, "books", CLUSTER, tmp_path / "run", 1)
    assert config.depth == 4 and group.run == "consumers.orderbook"
    assert ctx == GroupContext(CLUSTER, Namespace("sim"), "books", "0", tmp_path / "run",
                               ("FILUSD",), None)
    with pytest.raises(PipelineError, match=r"process books runs consumers.orderbook in .*, not "
                                            r"consumers.bars: the topology changed"):
        resolve(loaded, "books", CLUSTER, tmp_path / "run", 0, expected_run="consumers.bars")
    assert loaded.process("mon").is_user_group and not loaded.process("books").is_user_group
