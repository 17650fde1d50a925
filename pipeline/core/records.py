"""The records strategies and groups see, typed: one ``TypedDict`` per Avro schema in
``schemas/`` with the same field names (a test keeps them in step). Prices and amounts are
exact decimal strings; ``*_ms``/``*_us`` are epoch integers.
"""

from __future__ import annotations

from typing import TypedDict


class Level(TypedDict):
    price: str
    quantity: str


class LevelChange(TypedDict):
    side: str  # BID | ASK
    price: str
    quantity: str  # "0" removes the level


class L2Update(TypedDict):
    symbol: str
    snapshot: bool
    changes: list[LevelChange]
    exchange_ts_ms: int | None
    received_ts_us: int
    connection_id: str
    sequence: int
    event_id: int | None
    first_update_id: int | None  # new API: U of a depthUpdate
    last_update_id: int | None  # new API: u, or a snapshot's lastUpdateId
    exchange_ts_ns: int | None  # new API: E, nanoseconds


class BookSnapshot(TypedDict):
    symbol: str
    depth: int
    bids: list[Level]
    asks: list[Level]
    exchange_ts_ms: int | None
    received_ts_us: int
    published_ts_us: int
    source_partition: int
    source_offset: int
    connection_id: str
    sequence: int


class Trade(TypedDict):
    symbol: str
    trade_id: int
    price: str
    quantity: str
    taker_side: str  # BUY | SELL | UNKNOWN
    exchange_ts_ms: int
    received_ts_us: int
    connection_id: str
    sequence: int
    from_snapshot: bool
    exchange_ts_ns: int | None  # new API: E, nanoseconds


class Bar(TypedDict):
    symbol: str
    interval: str
    start_ms: int
    end_ms: int
    open: str
    high: str
    low: str
    close: str
    volume: str
    trade_count: int | None
    vwap: str | None
    buy_volume: str | None
    sell_volume: str | None
    filled: bool
    source: str


class OrderRequest(TypedDict):
    client_order_id: str
    strategy_id: str
    symbol: str
    side: str  # BUY | SELL
    order_type: str  # LIMIT | MARKET
    price: str | None
    amount: str
    options: list[str]
    created_ms: int
    expires_ms: int
    trigger: str
    signature: str
    action: str  # NEW | CANCEL | CANCEL_ALL | REPLACE
    target_client_order_id: str | None


class OrderEvent(TypedDict):
    client_order_id: str
    strategy_id: str
    symbol: str
    kind: str  # see pipeline.core.vocabulary.OrderEventKind
    reason: str | None
    mode: str  # PAPER | SANDBOX | LIVE
    exchange_order_id: str | None
    side: str  # buy | sell
    price: str | None
    amount: str
    filled_amount: str
    avg_fill_price: str | None
    fee: str | None
    fee_currency: str | None
    event_ms: int
    last_fill_price: str | None
    last_fill_amount: str | None
    liquidity: str | None  # MAKER | TAKER
    last_fill_fee: str | None
    request_id: str | None


class Position(TypedDict):
    strategy_id: str
    symbol: str
    quantity: str
    average_entry: str | None
    cost: str
    realized_pnl: str
    unrealized_pnl: str | None
    mark: str | None
    mark_ms: int | None
    currency: str
    fills: int
    updated_ms: int


class StrategyPnl(TypedDict):
    strategy_id: str
    seq: int
    event_ms: int
    trigger: str  # fill | timer | control
    currency: str
    capital: str
    realized_pnl: str | None
    unrealized_pnl: str | None
    fees: str | None
    equity: str | None
    peak_equity: str | None
    drawdown: str | None
    drawdown_pct: str | None
    daily_pnl: str | None
    exposure: str | None
    fills: int
    rejections: dict[str, int]
    stale: bool
    stale_symbols: list[str]
    halted: bool


class StrategyControl(TypedDict):
    strategy_id: str
    halted: bool
    reason: str
    detail: str
    at_ms: int
    by: str


class ReconciliationEvent(TypedDict):
    at_ms: int
    mode: str
    kind: str
    subject: str | None
    symbol: str | None
    strategy_id: str | None
    expected: str | None
    actual: str | None
    detail: str
    differences: int


#: Record type name (the schema's) -> its TypedDict.
BY_SCHEMA: dict[str, type] = {
    "L2Update": L2Update, "BookSnapshot": BookSnapshot, "Trade": Trade, "Bar": Bar,
    "OrderRequest": OrderRequest, "OrderEvent": OrderEvent, "Position": Position,
    "StrategyPnl": StrategyPnl, "StrategyControl": StrategyControl,
    "ReconciliationEvent": ReconciliationEvent,
}
