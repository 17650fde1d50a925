"""Exact decimals, the one module: prices and amounts travel as decimal strings and compute
as ``Decimal``; never a binary float in between.

Text out:

* :func:`plain` the canonical text: no exponent, no trailing fractional zeros
  (``302.75``, ``100``, ``0.00001``, ``0``): records we compute, bars, the venue's JSON;
* :func:`fixed` the exact text of a Decimal as it is, without exponent but with its
  trailing zeros (``1.50`` stays ``1.50``; ``8E-5`` is ``0.00008``): numbers passed through
  from a file or a JSON document;
* :func:`decimal_string` an amount for Gemini's REST (a Decimal, int or str; a float is
  refused).

Text in: :data:`PLAIN` / :data:`UNSIGNED` (the plain decimal syntax, ASCII digits only),
:func:`finite`, :func:`positive`, :func:`non_negative` (a Decimal or None).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

ZERO = Decimal(0)
#: A plain decimal string, optionally negative, ASCII digits only (use ``fullmatch``).
PLAIN = re.compile(r"-?[0-9]+(\.[0-9]+)?")
#: A plain non-negative decimal string, ASCII digits only (use ``fullmatch``).
UNSIGNED = re.compile(r"[0-9]+(\.[0-9]+)?")


def plain(number: Decimal) -> str:
    """A Decimal as its canonical plain string: no exponent, no trailing zeros, ``0`` for
    any zero. Exact at any precision (no context rounding, unlike ``normalize()``)."""
    if not number:
        return "0"
    text = format(number, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def fixed(number: Decimal) -> str:
    """A Decimal's exact plain text without exponent, trailing zeros kept as they are
    (``Decimal("1.50")`` -> ``1.50``, ``Decimal("8E-5")`` -> ``0.00008``)."""
    return format(number, "f")


def decimal_string(value: Decimal | str | int, what: str) -> str:
    """An amount as the decimal string Gemini wants: a str unchanged, a Decimal or int as
    :func:`fixed` text. A float (or bool) is refused (``TypeError``): it would not be exact."""
    if isinstance(value, bool) or not isinstance(value, (Decimal, str, int)):
        raise TypeError(f"{what} must be a Decimal, str or int, not {type(value).__name__}")
    return value if isinstance(value, str) else fixed(Decimal(value))


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
