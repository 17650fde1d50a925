"""The trading vocabulary, spelled once. Each enum's values are the wire values the Avro
schemas and Gemini use, so ``Side.BUY == "BUY"`` and a member can go straight into a record.
"""

from __future__ import annotations

from enum import StrEnum


class Side(StrEnum):
    """An order's or a taker's side. ``OrderRequest.side`` and intents spell it ``BUY``;
    Gemini's REST, ``OrderEvent.side`` and the venue spell it ``buy`` (:attr:`wire`)."""

    BUY = "BUY"
    SELL = "SELL"

    @classmethod
    def parse(cls, text: str) -> "Side":
        """Any of BUY/buy/bid/BID (and their sell twins)."""
        upper = str(text).upper()
        if upper in ("BUY", "BID"):
            return cls.BUY
        if upper in ("SELL", "ASK"):
            return cls.SELL
        raise ValueError(f"side must be buy or sell, not {text!r}")

    @property
    def wire(self) -> str:
        """Gemini's lower-case spelling (``buy``/``sell``)."""
        return "buy" if self is Side.BUY else "sell"

    @property
    def book_side(self) -> str:
        """The book side an order of this side rests on (``BID``/``ASK``)."""
        return "BID" if self is Side.BUY else "ASK"

    @property
    def opposite(self) -> "Side":
        return Side.SELL if self is Side.BUY else Side.BUY


class OrderType(StrEnum):
    LIMIT = "LIMIT"
    MARKET = "MARKET"


class OrderOption(StrEnum):
    """Gemini's order execution options; an order takes at most one."""

    MAKER_OR_CANCEL = "maker-or-cancel"
    IMMEDIATE_OR_CANCEL = "immediate-or-cancel"
    FILL_OR_KILL = "fill-or-kill"
    AUCTION_ONLY = "auction-only"
    INDICATION_OF_INTEREST = "indication-of-interest"


class OrderAction(StrEnum):
    """What an ``OrderRequest`` asks for."""

    NEW = "NEW"
    CANCEL = "CANCEL"  # cancel target_client_order_id
    CANCEL_ALL = "CANCEL_ALL"  # cancel the strategy's open orders (in symbol, if given)
    REPLACE = "REPLACE"  # cancel target, then place this request once the cancel is confirmed


class OrderEventKind(StrEnum):
    """A step in an order's life (``OrderEvent.kind``)."""

    ACCEPTED = "ACCEPTED"  # the exchange has the order
    BOOKED = "BOOKED"  # it rests on the book
    PARTIALLY_FILLED = "PARTIALLY_FILLED"  # one fill, more to come
    FILLED = "FILLED"  # the last fill
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"  # cancelled at its expires_ms
    REJECTED = "REJECTED"  # refused before it reached the book
    CANCEL_REJECTED = "CANCEL_REJECTED"  # a cancel that found the order gone (or not ours)
    UNKNOWN = "UNKNOWN"  # a reader's default for kinds added after it was written


#: Kinds after which an order is closed for good.
TERMINAL_KINDS = frozenset({OrderEventKind.FILLED, OrderEventKind.CANCELLED,
                            OrderEventKind.EXPIRED, OrderEventKind.REJECTED})
#: Kinds that carry a fill (``last_fill_*``).
FILL_KINDS = frozenset({OrderEventKind.PARTIALLY_FILLED, OrderEventKind.FILLED})


class Liquidity(StrEnum):
    """Whether a fill added liquidity (it rested, the market came to it) or took it."""

    MAKER = "MAKER"
    TAKER = "TAKER"


class ExecutionMode(StrEnum):
    PAPER = "PAPER"
    SANDBOX = "SANDBOX"
    LIVE = "LIVE"
