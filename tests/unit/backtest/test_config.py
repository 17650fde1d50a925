"""BacktestConfig: one value for a backtest's settings, checked when it is made."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

import pipeline
from pipeline.backtest.config import BacktestConfig
from pipeline.backtest.run import _Reading, run_backtest
from pipeline.core.cluster import Cluster
from pipeline.core.errors import PipelineError
from pipeline.kafka.catalog import Namespace
from pipeline.strategies.sma_cross import SmaCross

SMA = "pipeline.strategy:SmaCross"


def test_values_are_normalized_and_the_defaults_are_the_old_ones():
    config = BacktestConfig(SMA, "sim", {"fast": 5}, "2019-01-01", 1_600_000_000_000,
                            topics=["bars"], cash=1000, commission=0.001,
                            archive_root="some/where", rules_file=Path("rules.json"))
    assert config.namespace == Namespace("sim") and config.ns is config.namespace
    assert config.params == {"fast": 5} and config.topics == ("bars",)
    assert (config.cash, config.commission) == ("1000", "0.001")
    assert config.archive_root == Path("some/where") and config.rules_file == "rules.json"
    assert (config.start_ms, config.end_ms) == (1546300800000, 1_600_000_000_000)
    assert config.strategy_name == SMA
    defaults = BacktestConfig(SMA, "sim")
    assert (defaults.fill, defaults.cash, defaults.commission, defaults.slippage, defaults.lot,
            defaults.source, defaults.book_depth, defaults.queue, defaults.latency_ms) == \
        ("next-open", "1000000", None, "0", "1", "kafka", 10, "risk-averse", 0)
    assert pipeline.BacktestConfig is BacktestConfig and pipeline.Cluster is Cluster


@pytest.mark.parametrize("kwargs,match", [
    (dict(fill="close"), "unknown fill model 'close': one of"),
    (dict(source="s3"), "source 's3': use kafka or archive"),
    (dict(cash="lots"), "cash 'lots' is not a decimal number"),
    (dict(taker_fee="inf"), "taker fee 'inf' is not a finite number"),
    (dict(start="yesterday"), "start 'yesterday' is not epoch ms or an ISO date-time"),
    (dict(end=True), "end True is not a time"),
])
def test_bad_settings_are_pipeline_errors_when_the_config_is_made(kwargs, match):
    with pytest.raises(PipelineError, match=match):
        BacktestConfig(SMA, "sim", **kwargs)


def test_a_bad_namespace_is_refused_too():
    with pytest.raises(PipelineError, match="invalid namespace"):
        BacktestConfig(SMA, "Nope")


def test_replace_changes_settings_and_refuses_unknown_names():
    config = BacktestConfig(SMA, "sim", {"fast": 5})
    changed = config.replace(fill="book", cash="5", namespace="sim-x")
    assert (changed.fill, changed.cash, changed.namespace) == ("book", "5", Namespace("sim-x"))
    assert config.fill == "next-open"  # frozen: the original is unchanged
    with pytest.raises(PipelineError, match="unknown backtest setting"):
        config.replace(speed=3)
    with pytest.raises(PipelineError, match="unknown fill model"):
        config.replace(fill="close")
    with pytest.raises(AttributeError):
        config.fill = "book"  # type: ignore[misc]


def test_a_config_pickles_for_the_sweeps_workers_and_hashes():
    config = BacktestConfig(SMA, "sim", {"fast": 5},
                            offsets={("sim.bars", 0): (0, 10)}, fill="book")
    assert pickle.loads(pickle.dumps(config)) == config
    assert hash(config) == hash(BacktestConfig(SMA, "sim", {"fast": 6},
                                               offsets={("sim.bars", 0): (0, 10)}, fill="book"))


def test_where_a_backtest_reads_is_resolved_from_config_and_cluster():
    strategy = SmaCross(fast=5, slow=10)
    cluster = Cluster("localhost:1", "http://localhost:2")
    reading = _Reading.of(BacktestConfig(SMA, "sim", start=5, end=9), cluster, strategy)
    assert (reading.topics, reading.start_ms, reading.end_ms, reading.archive) == \
        (("sim.bars",), 5, 9, None)
    archived = _Reading.of(BacktestConfig(SMA, "sim", source="archive", archive_root="/a",
                                          topics=["bars", "sim-x.md.l2"]), None, strategy)
    assert archived.topics == ("sim.bars", "sim-x.md.l2") and archived.archive == Path("/a")
    assert archived.cluster is None
    with pytest.raises(PipelineError, match="a backtest from Kafka needs a cluster"):
        run_backtest(BacktestConfig(SMA, "sim", {"fast": 5, "slow": 10}))
