"""A Gemini symbol's trading rules as a value: the steps of price and amount, the minimum
amount and the market's status. In ``core`` because three layers hold them and must not
depend on each other: the Gemini adapter loads them, the trading core checks orders with
them, and the local venue (independent of ``trading/``) serves and enforces them.

Gemini's ``/v1/symbols/details/:symbol`` names them confusingly: ``tick_size`` is the
step of the *amount* (1e-8 for BTCUSD) and ``quote_increment`` the step of the *price*
(0.01). Here they are ``amount_step`` and ``price_step``.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Mapping

from pipeline.core.decimals import plain

OPEN, CLOSED, CANCEL_ONLY, POST_ONLY, LIMIT_ONLY = (
    "open", "closed", "cancel_only", "post_only", "limit_only")
STATUSES = (OPEN, CLOSED, CANCEL_ONLY, POST_ONLY, LIMIT_ONLY)


@dataclass(frozen=True)
class SymbolRules:
    """One symbol's rules; ``symbol`` upper case (``BTCUSD``), the rest exact decimals."""

    symbol: str
    price_step: Decimal  # Gemini's quote_increment
    amount_step: Decimal  # Gemini's tick_size
    min_amount: Decimal  # Gemini's min_order_size
    status: str = OPEN
    base: str | None = None  # base_currency, where known
    quote: str | None = None  # quote_currency, where known

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"{self.symbol}: unknown status {self.status!r}: one of "
                             f"{', '.join(STATUSES)}")
        for name in ("price_step", "amount_step", "min_amount"):
            value = getattr(self, name)
            if not isinstance(value, Decimal) or not value.is_finite() or value <= 0:
                raise ValueError(f"{self.symbol}: {name} must be a positive Decimal, "
                                 f"not {value!r}")

    @classmethod
    def from_details(cls, details: Mapping[str, Any]) -> "SymbolRules":
        """From Gemini's symbol details JSON (numbers may be JSON numbers, e.g. ``1E-8``,
        or strings: parse them with ``parse_float=Decimal`` to keep them exact)."""
        try:
            return cls(str(details["symbol"]).upper(),
                       price_step=_decimal(details["quote_increment"]),
                       amount_step=_decimal(details["tick_size"]),
                       min_amount=_decimal(details["min_order_size"]),
                       status=str(details.get("status") or OPEN),
                       base=details.get("base_currency"), quote=details.get("quote_currency"))
        except KeyError as exc:
            raise ValueError(f"symbol details without {exc.args[0]!r}: {dict(details)}") from None

    def to_details(self) -> dict[str, Any]:
        """Gemini's symbol details shape, numbers as exact decimal strings."""
        return {"symbol": self.symbol, "base_currency": self.base,
                "quote_currency": self.quote, "tick_size": plain(self.amount_step),
                "quote_increment": plain(self.price_step),
                "min_order_size": plain(self.min_amount), "status": self.status}


def _decimal(value: Any) -> Decimal:
    if isinstance(value, bool):
        raise ValueError(f"not a decimal: {value!r}")
    try:
        return Decimal(str(value)) if isinstance(value, float) else Decimal(value)
    except (InvalidOperation, TypeError):
        raise ValueError(f"not a decimal: {value!r}") from None

