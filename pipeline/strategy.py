"""The strategy API and the shipped strategies under the names topology files, the README
and backtests use (``pipeline.strategy:SmaCross``, ``pipeline.strategy:MidQuoter``). The
code lives in :mod:`pipeline.trading.strategy` (the API), :mod:`pipeline.trading.intents`
and :mod:`pipeline.strategies`."""

from pipeline.strategies.mid_quoter import MidQuoter
from pipeline.strategies.sma_cross import SmaCross
from pipeline.trading.intents import (
    FULL_EQUITY,
    OPTIONS,
    ORDER_TYPES,
    SIDES,
    CancelAllIntent,
    CancelIntent,
    Intent,
    OrderIntent,
    ReplaceIntent,
)
from pipeline.trading.strategy import Strategy, load_strategy
from pipeline.trading.tracker import OpenOrder

__all__ = ["FULL_EQUITY", "OPTIONS", "ORDER_TYPES", "SIDES", "CancelAllIntent", "CancelIntent",
           "Intent", "MidQuoter", "OpenOrder", "OrderIntent", "ReplaceIntent", "SmaCross",
           "Strategy", "load_strategy"]
