"""Moved to :mod:`pipeline.trading.risk`; this path keeps working."""

from pipeline.trading.risk import *  # noqa: F401,F403
from pipeline.trading.risk import (BPS, KILL_SWITCH, MAX_NOTIONAL, MAX_POSITION,  # noqa: F401
                                   MINUTE_MS, PRICE_BAND, RATE_LIMIT, BookTop, Decision,
                                   OpenOrder, RiskLimits, RiskState, band_edge, check,
                                   parse_amount, plain)
