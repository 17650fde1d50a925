"""Maker and taker fees, a fraction of each fill's notional, charged in the quote currency."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from pipeline.core.vocabulary import Liquidity


@dataclass(frozen=True)
class FeeSchedule:
    """Fee rates by liquidity. The default is Gemini's API fee schedule at its first tier
    (under $10,000 of 30-day volume: taker 0.40 %, maker 0.20 %; gemini.com/fees/
    api-fee-schedule, last updated June 30, 2022)."""

    maker: Decimal = Decimal("0.0020")
    taker: Decimal = Decimal("0.0040")

    def __post_init__(self) -> None:
        for name in ("maker", "taker"):
            rate = getattr(self, name)
            if not isinstance(rate, Decimal):
                object.__setattr__(self, name, rate := Decimal(str(rate)))
            if not Decimal("-0.01") <= rate < Decimal("0.1"):
                raise ValueError(f"{name} fee is a fraction of the notional in [-0.01, 0.1), "
                                 f"not {rate} (0.002 is 0.2 %)")

    def rate(self, liquidity: Liquidity) -> Decimal:
        return self.maker if liquidity is Liquidity.MAKER else self.taker

    def fee(self, notional: Decimal, liquidity: Liquidity) -> Decimal:
        return notional * self.rate(liquidity)


GEMINI_API_FEES = FeeSchedule()
