"""Gemini market data and trading on Apache Kafka: the shared library.

What users import is listed in ``__all__`` and imported from here (``from pipeline import
Strategy, run_backtest``); everything else is internal and may move. Names load on first
use, so ``import pipeline`` stays cheap for every process of the topology.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it (a module name alone: the submodule itself)
_EXPORTS: dict[str, str] = {
    # writing strategies
    "Strategy": "pipeline.trading.strategy",
    "load_strategy": "pipeline.trading.strategy",
    "OrderIntent": "pipeline.trading.intents",
    "CancelIntent": "pipeline.trading.intents",
    "CancelAllIntent": "pipeline.trading.intents",
    "ReplaceIntent": "pipeline.trading.intents",
    "FULL_EQUITY": "pipeline.trading.intents",
    "SmaCross": "pipeline.strategies.sma_cross",
    "MidQuoter": "pipeline.strategies.mid_quoter",
    # writing consumer groups
    "GroupContext": "pipeline.runtime.contract",
    "GroupConfig": "pipeline.runtime.runner",
    "GroupRunner": "pipeline.runtime.runner",
    "Handler": "pipeline.runtime.runner",
    "Output": "pipeline.runtime.runner",
    "Partition": "pipeline.runtime.context",
    "Record": "pipeline.runtime.runner",
    "run_until_stopped": "pipeline.runtime.runner",
    "HandlerHarness": "pipeline.runtime.harness",
    # topics and the wire format
    "Namespace": "pipeline.kafka.catalog",
    "Serde": "pipeline.avro.serde",
    "SchemaRegistry": "pipeline.avro.registry",
    # research
    "BacktestConfig": "pipeline.backtest.config",
    "Cluster": "pipeline.core.cluster",
    "run_backtest": "pipeline.backtest.run",
    "sweep": "pipeline.backtest.run",
    "read_bars": "pipeline.sinks.bars",
    "archive": "pipeline.replay.archive",
    # errors (every one a PipelineError; the tree is pipeline.core.errors' docstring)
    "PipelineError": "pipeline.core.errors",
    "DeliveryFailed": "pipeline.core.errors",
    "SerdeError": "pipeline.core.errors",
    "RegistryError": "pipeline.core.errors",
    "StrategyFailed": "pipeline.core.errors",
}

__all__ = [  # the names of _EXPORTS, sorted (tests/unit/test_public_api.py keeps them equal)
    "BacktestConfig", "CancelAllIntent", "CancelIntent", "Cluster", "DeliveryFailed",
    "FULL_EQUITY", "GroupConfig", "GroupContext", "GroupRunner", "Handler", "HandlerHarness",
    "MidQuoter", "Namespace", "OrderIntent", "Output", "Partition", "PipelineError", "Record",
    "RegistryError", "ReplaceIntent", "SchemaRegistry", "Serde", "SerdeError", "SmaCross",
    "Strategy", "StrategyFailed", "archive", "load_strategy", "read_bars", "run_backtest",
    "run_until_stopped", "sweep",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    loaded = importlib.import_module(module)
    value = loaded if module.rpartition(".")[2] == name else getattr(loaded, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from pipeline import archive
    from pipeline.avro.registry import SchemaRegistry
    from pipeline.avro.serde import Serde
    from pipeline.backtest.config import BacktestConfig
    from pipeline.backtest.run import run_backtest, sweep
    from pipeline.core.cluster import Cluster
    from pipeline.core.errors import (
        DeliveryFailed,
        PipelineError,
        RegistryError,
        SerdeError,
        StrategyFailed,
    )
    from pipeline.kafka.catalog import Namespace
    from pipeline.runtime.context import Partition
    from pipeline.runtime.contract import GroupContext
    from pipeline.runtime.harness import HandlerHarness
    from pipeline.runtime.runner import (
        GroupConfig,
        GroupRunner,
        Handler,
        Output,
        Record,
        run_until_stopped,
    )
    from pipeline.sinks.bars import read_bars
    from pipeline.strategies.mid_quoter import MidQuoter
    from pipeline.strategies.sma_cross import SmaCross
    from pipeline.trading.intents import (
        FULL_EQUITY,
        CancelAllIntent,
        CancelIntent,
        OrderIntent,
        ReplaceIntent,
    )
    from pipeline.trading.strategy import Strategy, load_strategy
