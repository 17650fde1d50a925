"""A book-driven market maker: one bid and one ask around the mid."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

from pipeline.core.decimals import plain
from pipeline.core.records import BookSnapshot
from pipeline.core.vocabulary import OrderOption, OrderType, Side
from pipeline.trading.intents import CancelIntent, Intent, OrderIntent, ReplaceIntent
from pipeline.trading.strategy import Strategy

MAKER_OR_CANCEL = (OrderOption.MAKER_OR_CANCEL.value,)


@dataclass
class MidQuoter(Strategy):
    """Quote both sides ``spread_bps`` around the mid as maker-or-cancel limits of
    ``amount``. When the mid has moved ``requote_bps`` since the last quote, open quotes
    are replaced (cancelled, then the new one placed once the cancel is confirmed) and a
    side without one (it filled, expired or was refused) is quoted again, so at most one
    bid and one ask are ever open. Quoting only on moves of the mid keeps what it does
    independent of when its order events arrive, so a backtest and a live run agree. A
    side whose fill would push the inventory (the position from its own fills) past
    ``max_inventory`` is not quoted, and its open quote is cancelled."""

    symbol: str = "BTCUSD"
    spread_bps: int = 10
    requote_bps: int = 5
    amount: str = "0.001"
    max_inventory: str = "0.01"
    tick: str = "0.01"
    strategy_id: str = "mid-quoter"

    def __post_init__(self) -> None:
        self.symbols = frozenset({self.symbol})
        self._last_mid: Decimal | None = None

    @property
    def inventory(self) -> Decimal:
        return self.position(self.symbol)

    def on_book(self, snapshot: BookSnapshot) -> list[Intent]:
        if snapshot["symbol"] != self.symbol or not snapshot["bids"] or not snapshot["asks"]:
            return []
        mid = (Decimal(snapshot["bids"][0]["price"]) + Decimal(snapshot["asks"][0]["price"])) / 2
        last = self._last_mid
        if last is not None and abs(mid - last) * 10_000 < self.requote_bps * last:
            return []
        self._last_mid = mid
        tick, half = Decimal(self.tick), mid * self.spread_bps / 20_000
        amount, limit, inventory = Decimal(self.amount), Decimal(self.max_inventory), self.inventory
        bid = ((mid - half) / tick).to_integral_value(rounding=ROUND_FLOOR) * tick
        ask = ((mid + half) / tick).to_integral_value(rounding=ROUND_CEILING) * tick
        intents: list[Intent] = []
        intents += self._quote(Side.BUY, bid, inventory + amount <= limit)
        intents += self._quote(Side.SELL, ask, inventory - amount >= -limit)
        return intents

    def _quote(self, side: str, price: Decimal, allowed: bool) -> list[Intent]:
        """The intents that leave exactly one quote at ``price`` on ``side`` (none when not
        ``allowed``)."""
        live = [o for o in self.open_orders(self.symbol)
                if o.side == side and not o.cancel_requested]
        if not allowed:
            return [CancelIntent(o.client_order_id) for o in live]
        text = plain(price)
        if not live:
            return [OrderIntent(self.symbol, side, self.amount, OrderType.LIMIT, text,
                                MAKER_OR_CANCEL)]
        keep, *extra = live
        intents: list[Intent] = [CancelIntent(o.client_order_id) for o in extra]
        if keep.price is None or Decimal(keep.price) != price:
            intents.append(ReplaceIntent(keep.client_order_id, text, self.amount))
        return intents

    def save_state(self) -> dict[str, Any]:
        return {"last_mid": None if self._last_mid is None else plain(self._last_mid)}

    def load_state(self, state: dict[str, Any], version: int) -> None:
        last = state.get("last_mid")
        self._last_mid = None if last is None else Decimal(last)
