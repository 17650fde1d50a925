"""The portfolio's accounting (no Kafka): fills folded per second by the live portfolio
(:class:`pipeline.trading.portfolio.Portfolio`: FIFO lots, realized and unrealized PnL,
equity at the marks, drawdown and limit checks, a Position and a StrategyPnl record per
fill), next to the floor measured in the same run: a bare Decimal fold of position and
cash per strategy and symbol. Target: >= 20,000 fills/s (a busy market maker makes tens
per second), within 10x of the floor.
"""

from __future__ import annotations

import random
from decimal import Decimal

from bench.figures import Figure, best_rate
from pipeline.trading.portfolio import Portfolio, PortfolioConfig, RiskStop

SYMBOLS = {"BTCUSD": 34000, "ETHUSD": 1900, "SOLUSD": 35, "FILUSD": 58}


def fills(n: int, seed: int = 5) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        symbol = rng.choice(list(SYMBOLS))
        price = str(Decimal(SYMBOLS[symbol]) + Decimal(rng.randint(-500, 500)) / 100)
        amount = str(Decimal(rng.randint(1, 100)) / 1000)
        out.append({"client_order_id": f"o{i}", "strategy_id": f"s{i % 2}", "symbol": symbol,
                    "kind": "FILLED", "reason": None, "mode": "PAPER",
                    "exchange_order_id": None, "side": rng.choice(("buy", "sell")),
                    "price": price, "amount": amount, "filled_amount": amount,
                    "avg_fill_price": price, "fee": "0.01", "fee_currency": "USD",
                    "event_ms": 1_700_000_000_000 + i, "last_fill_price": price,
                    "last_fill_amount": amount, "liquidity": "MAKER", "last_fill_fee": "0.01",
                    "request_id": None})
    return out


def _portfolio(events: list[dict]) -> None:
    portfolio = Portfolio(PortfolioConfig(default_capital=Decimal(10**6), max_mark_age_ms=None,
                                          limits={"*": RiskStop.parse({"max_drawdown": "50%"})}))
    for symbol, mid in SYMBOLS.items():
        portfolio.on_book({"symbol": symbol, "bids": [{"price": str(mid - 1), "quantity": "1"}],
                           "asks": [{"price": str(mid + 1), "quantity": "1"}],
                           "received_ts_us": 1_700_000_000_000_000})
    for event in events:
        portfolio.on_event(event, event["event_ms"])


def _floor(events: list[dict]) -> None:
    position: dict[tuple[str, str], Decimal] = {}
    cash: dict[str, Decimal] = {}
    for e in events:
        size = Decimal(e["last_fill_amount"])
        if e["side"] != "buy":
            size = -size
        key = (e["strategy_id"], e["symbol"])
        position[key] = position.get(key, Decimal(0)) + size
        cash[e["strategy_id"]] = cash.get(e["strategy_id"], Decimal(0)) - \
            size * Decimal(e["last_fill_price"]) - Decimal(e["last_fill_fee"])


def run(events: int) -> list[Figure]:
    n = min(events, 50_000)
    stream = fills(n)
    floor = best_rate(lambda: _floor(stream), n)
    ours = best_rate(lambda: _portfolio(stream), n, repeats=2)
    return [Figure("portfolio fills folded (lots, PnL, limits, 2 records each)", ours,
                   "fills/s", n, "bare Decimal fold of position and cash", floor,
                   ">= 20,000 fills/s, within 10x of the floor")]


if __name__ == "__main__":
    for figure in run(50_000):
        print(f"{figure.name}: {figure.value:,.0f} {figure.unit} vs {figure.baseline_value:,.0f} "
              f"({figure.ratio:.3f}x)")
