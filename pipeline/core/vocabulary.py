"""The vocabulary of records and orders, spelled once. Each enum's values are the wire
values the Avro schemas and Gemini use, so ``Side.BUY == "BUY"`` and a member can go straight
into a record (a ``StrEnum`` member *is* its string: records and Avro bytes are unchanged).

Four spellings of a side meet in this project; each has one enum here:

* :class:`Side` ``BUY``/``SELL``: an order's side (``OrderRequest.side``, intents);
  :attr:`Side.wire` is Gemini's ``buy``/``sell`` (REST, ``OrderEvent.side``, the venue);
* :class:`BookSide` ``BID``/``ASK``: the side of the book a level is on (``LevelChange.side``);
* :class:`TakerSide` ``BUY``/``SELL``/``UNKNOWN``: a trade's aggressor (``Trade.taker_side``).

Then order types and options, order actions and event kinds, book health kinds, and the
kinds of market-data event the backtest merges. Hot loops compare against module-level
constants bound to members (or their ``.value``), never build a member per record.
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
    def book_side(self) -> "BookSide":
        """The book side an order of this side rests on (``BID``/``ASK``)."""
        return BookSide.BID if self is Side.BUY else BookSide.ASK

    @property
    def opposite(self) -> "Side":
        return Side.SELL if self is Side.BUY else Side.BUY


#: Gemini's spellings of the sides (``Side.BUY.wire``), for comparing wire text.
BUY_WIRE, SELL_WIRE = "buy", "sell"


class BookSide(StrEnum):
    """The side of the book a price level is on (``LevelChange.side``, the ``BookSide``
    enum of ``L2Update.avsc``)."""

    BID = "BID"
    ASK = "ASK"

    @classmethod
    def parse(cls, text: str) -> "BookSide":
        """Any of BID/bid/BUY/buy (and their ask twins): Gemini's feeds say both."""
        upper = str(text).upper()
        if upper in ("BID", "BUY"):
            return cls.BID
        if upper in ("ASK", "SELL"):
            return cls.ASK
        raise ValueError(f"book side must be bid or ask, not {text!r}")

    @property
    def opposite(self) -> "BookSide":
        return BookSide.ASK if self is BookSide.BID else BookSide.BID


class TakerSide(StrEnum):
    """A trade's aggressor (``Trade.taker_side``): BUY lifted the ask, SELL hit the bid."""

    BUY = "BUY"
    SELL = "SELL"
    UNKNOWN = "UNKNOWN"  # auctions, or Gemini does not say


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


class BookHealthKind(StrEnum):
    """What the orderbook group noticed about a book (``BookHealthEvent.kind``)."""

    CROSSED = "CROSSED"  # best bid above best ask
    LOCKED = "LOCKED"  # best bid equals best ask
    CHANGE_BEFORE_SNAPSHOT = "CHANGE_BEFORE_SNAPSHOT"  # a change for a book with no snapshot
    RESNAPSHOT = "RESNAPSHOT"  # a new snapshot replaced a live book
    SEQUENCE_GAP = "SEQUENCE_GAP"
    INVALID_CHANGE = "INVALID_CHANGE"
    UNKNOWN = "UNKNOWN"


class PaperStateKind(StrEnum):
    """Which half of paper execution's state a ``PaperState`` record holds."""

    BOOK = "BOOK"
    ORDERS = "ORDERS"


class MarketEventKind(StrEnum):
    """The kinds of market-data event the backtest merges and hands to strategies."""

    BAR = "bar"  # a Bar record (on_bar)
    BOOK = "book"  # a BookSnapshot (on_book)
    TRADE = "trade"  # a Trade (on_trade)
    L2 = "l2"  # an L2Update, applied to the simulated exchange's book
