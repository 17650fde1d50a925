"""Exact decimals: prices and amounts travel as decimal strings and compute as ``Decimal``."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

ZERO = Decimal(0)


def plain(number: Decimal) -> str:
    """A Decimal as an exact plain decimal string: no exponent, no trailing zeros."""
    return format(number.normalize(), "f") if number else "0"


def finite(text: object) -> Decimal | None:
    """A finite Decimal from a decimal string, else None (not a string, not a number,
    infinite or NaN)."""
    if not isinstance(text, str):
        return None
    try:
        number = Decimal(text)
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def positive(text: object) -> Decimal | None:
    """A positive finite Decimal from a decimal string, else None."""
    number = finite(text)
    return number if number is not None and number > 0 else None


def non_negative(text: object) -> Decimal | None:
    """A finite Decimal >= 0 from a decimal string (a fee, an amount filled), else None."""
    number = finite(text)
    return number if number is not None and number >= 0 else None
