"""Moved to :mod:`pipeline.trading.signing`; this path keeps working."""

from pipeline.trading.signing import *  # noqa: F401,F403
from pipeline.trading.signing import (ENV_PREFIX, StrategyKeys, canonical,  # noqa: F401
                                      client_order_id, env_name, read_key_file,
                                      read_private_json, sign, verify)
