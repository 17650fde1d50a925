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
    "GroupConfig": "pipeline.runtime",
    "GroupRunner": "pipeline.runtime",
    "Handler": "pipeline.runtime",
    "Output": "pipeline.runtime",
    "Record": "pipeline.runtime",
    "run_until_stopped": "pipeline.runtime",
    "HandlerHarness": "pipeline.testing",
    # topics and the wire format
    "Namespace": "pipeline.catalog",
    "Serde": "pipeline.serde",
    "SchemaRegistry": "pipeline.registry",
    # research
    "run_backtest": "pipeline.backtest_run",
    "sweep": "pipeline.backtest_run",
    "read_bars": "pipeline.bars_store",
    "archive": "pipeline.archive",
    # errors (every one a PipelineError)
    "PipelineError": "pipeline.errors",
    "DeliveryFailed": "pipeline.errors",
    "SerdeError": "pipeline.serde",
    "RegistryError": "pipeline.registry",
    "StrategyFailed": "pipeline.backtest",
}

__all__ = [  # the names of _EXPORTS, sorted (tests/test_public_api.py keeps them equal)
    "CancelAllIntent", "CancelIntent", "DeliveryFailed", "FULL_EQUITY", "GroupConfig",
    "GroupRunner", "Handler", "HandlerHarness", "MidQuoter", "Namespace", "OrderIntent", "Output",
    "PipelineError", "Record", "RegistryError", "ReplaceIntent", "SchemaRegistry", "Serde",
    "SerdeError", "SmaCross", "Strategy", "StrategyFailed", "archive", "load_strategy",
    "read_bars", "run_backtest", "run_until_stopped", "sweep",
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
    from pipeline.backtest import StrategyFailed
    from pipeline.backtest_run import run_backtest, sweep
    from pipeline.bars_store import read_bars
    from pipeline.catalog import Namespace
    from pipeline.errors import DeliveryFailed, PipelineError
    from pipeline.registry import RegistryError, SchemaRegistry
    from pipeline.runtime import (GroupConfig, GroupRunner, Handler, Output, Record,
                                  run_until_stopped)
    from pipeline.serde import Serde, SerdeError
    from pipeline.strategies.mid_quoter import MidQuoter
    from pipeline.testing import HandlerHarness
    from pipeline.strategies.sma_cross import SmaCross
    from pipeline.trading.intents import (FULL_EQUITY, CancelAllIntent, CancelIntent,
                                          OrderIntent, ReplaceIntent)
    from pipeline.trading.strategy import Strategy, load_strategy
