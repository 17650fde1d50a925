"""Gemini symbols: which currency is the base and which the quote."""

from __future__ import annotations

from functools import lru_cache

# Quote currencies longer than three letters; any other symbol's last three are its quote.
LONG_QUOTES = ("GUSD", "USDT", "USDC", "RLUSD")


@lru_cache(maxsize=4096)
def split_symbol(symbol: str) -> tuple[str, str]:
    """(base, quote) of a symbol: ``BTCGUSD`` -> (BTC, GUSD), ``ETHBTC`` -> (ETH, BTC)."""
    symbol = symbol.upper()
    for quote in LONG_QUOTES:
        if symbol.endswith(quote) and len(symbol) > len(quote):
            return symbol[: -len(quote)], quote
    return symbol[:-3], symbol[-3:]


def quote_currency(symbol: str) -> str:
    return split_symbol(symbol)[1]
