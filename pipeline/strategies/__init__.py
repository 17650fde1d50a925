"""The shipped strategies, apart from the API they use (:mod:`pipeline.trading.strategy`)."""

from pipeline.strategies.mid_quoter import MidQuoter
from pipeline.strategies.sma_cross import SmaCross

__all__ = ["MidQuoter", "SmaCross"]
