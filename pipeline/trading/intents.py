"""What a strategy returns from its callbacks: new orders, cancels, cancel-alls and
replaces. Execution (or the backtest's simulated exchange) decides what becomes of them."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from pipeline.core.decimals import positive
from pipeline.core.vocabulary import OrderOption, OrderType, Side

# The accepted spellings, derived from the vocabulary (public: pipeline.strategy re-exports).
SIDES = tuple(s.value for s in Side)
ORDER_TYPES = tuple(t.value for t in OrderType)
OPTIONS = tuple(o.value for o in OrderOption)
_LIMIT, _MARKET = OrderType.LIMIT, OrderType.MARKET

# backtesting.py's default ``buy()``/``sell()`` size: the float ``1 - 2**-52``, which it
# prints as ``.9999`` but which sizes with (all but a rounding error of) the whole equity.
FULL_EQUITY = "0.9999999999999998"


def _positive(text: str | None, what: str) -> None:
    if text is not None and positive(text) is None:
        raise ValueError(f"{what} must be a positive decimal string, not {text!r}")


@dataclass(frozen=True)
class OrderIntent:
    """A new order. The size is exactly one of:

    * ``amount``: a base-currency quantity (exact decimal string);
    * ``fraction``: a fraction of the equity in (0, 1], e.g. ``FULL_EQUITY``, sized in whole
      lots: at the next bar's open by the backtest's next-open broker (as backtesting.py's
      ``buy(size=0.5)``), at once everywhere else, from the equity the strategy sees;
    * ``close_position=True`` (see :meth:`close`): close the whole position in ``symbol``
      at market, as backtesting.py's ``position.close()``; the side is then implied.

    At most one of Gemini's options; a MARKET order takes none (Gemini has no market
    orders: execution sends one as an immediate-or-cancel limit at the price band's edge).
    """

    symbol: str
    side: str | None
    amount: str | None = None  # base-currency quantity, exact decimal string
    order_type: str = OrderType.MARKET.value
    price: str | None = None  # limit price, exact decimal string; None for MARKET
    options: tuple[str, ...] = ()
    fraction: str | None = None  # of the equity, exact decimal string in (0, 1]
    close_position: bool = False

    def __post_init__(self) -> None:
        if self.close_position:
            if self.side is not None or self.amount is not None or self.fraction is not None:
                raise ValueError("a close_position intent has no side, amount or fraction")
            if self.order_type != _MARKET or self.price is not None or self.options:
                raise ValueError("a close_position intent is a plain MARKET order")
            return
        if self.side not in SIDES:
            raise ValueError(f"side must be BUY or SELL, not {self.side!r}")
        if self.order_type not in ORDER_TYPES:
            raise ValueError(f"order_type must be LIMIT or MARKET, not {self.order_type!r}")
        if (self.amount is None) == (self.fraction is None):
            raise ValueError("give exactly one of amount and fraction "
                             f"(amount={self.amount!r}, fraction={self.fraction!r})")
        _positive(self.amount, "amount")
        if self.fraction is not None and not 0 < Decimal(self.fraction) <= 1:
            raise ValueError(f"fraction must be in (0, 1], not {self.fraction}")
        if (self.order_type == _LIMIT) != (self.price is not None):
            raise ValueError("a LIMIT intent needs a price; a MARKET intent has none")
        _positive(self.price, "price")
        unknown = [o for o in self.options if o not in OPTIONS]
        if unknown:
            raise ValueError(f"unknown order option(s) {unknown}: one of {OPTIONS}")
        if len(self.options) > 1:
            raise ValueError(f"at most one order option, not {list(self.options)} (Gemini "
                             "refuses combinations)")
        if self.options and self.order_type == _MARKET:
            raise ValueError("a MARKET intent takes no option")

    @classmethod
    def close(cls, symbol: str) -> "OrderIntent":
        """Close the whole position in ``symbol`` at market (backtesting.py's
        ``position.close()``); nothing happens when there is none."""
        return cls(symbol, None, close_position=True)


@dataclass(frozen=True)
class CancelIntent:
    """Cancel one order. ``symbol`` is only needed for an id the strategy does not know
    (it is otherwise the order's own)."""

    client_order_id: str
    symbol: str | None = None


@dataclass(frozen=True)
class CancelAllIntent:
    """Cancel every open order of the strategy, in ``symbol`` or everywhere."""

    symbol: str | None = None


@dataclass(frozen=True)
class ReplaceIntent:
    """Move an order: cancel it, then, once the cancel is confirmed, place the same order
    with ``price`` and/or ``amount`` changed (Gemini has no amend). The new order's amount
    defaults to what was left of the old one."""

    client_order_id: str
    price: str | None = None
    amount: str | None = None

    def __post_init__(self) -> None:
        if self.price is None and self.amount is None:
            raise ValueError("a replace changes the price, the amount or both")
        _positive(self.price, "price")
        _positive(self.amount, "amount")


Intent = OrderIntent | CancelIntent | CancelAllIntent | ReplaceIntent
INTENT_TYPES = (OrderIntent, CancelIntent, CancelAllIntent, ReplaceIntent)
