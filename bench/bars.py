"""Bars: the bars group end to end (trades topic -> bars topic + Parquet), and the bar logic.

* End to end: N generated trades are produced to a fresh namespace first; then the group
  runs in this process and is timed from its first trade to its exit (every trade handled,
  every closed bar committed to the bars topic and written to Parquet). Baseline: a bare
  consumer reading and Avro-decoding the same records.
* Bar logic alone (:func:`pipeline.market.bars.build_bars`, exact decimals, 1m/5m/1h/1d, VWAP,
  buy/sell volume) on the same trades in memory, next to pandas ``resample`` of the same
  trades held as float64 columns (inexact, but what one would write first).
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
from confluent_kafka import Consumer, TopicPartition

from bench.figures import Figure, best_rate
from consumers.bars import BarsHandler, group_config
from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Decoder, publish
from pipeline.kafka.catalog import Namespace, ensure_topics
from pipeline.kafka.clients import reader_config
from pipeline.market.bars import build_bars
from pipeline.runtime.runner import GroupRunner

SYMBOLS = ["BTCUSD", "ETHUSD", "SOLUSD", "LTCUSD"]
START_MS = 1_624_492_800_000  # 2021-06-24 00:00 UTC
STEP_MS = 250  # one trade every 250 ms of exchange time over all symbols
RULES = {"1m": "1min", "5m": "5min", "1h": "1h", "1d": "1D"}


def trades(n: int, seed: int = 5) -> list[dict]:
    """``n`` trades: in time order, the last one per symbol two days on (closes every bar)."""
    rng = random.Random(seed)
    price = {s: 20_000 + 1000 * i for i, s in enumerate(SYMBOLS)}
    out = []
    n = max(n - len(SYMBOLS), 1)
    for i in range(n):
        symbol = SYMBOLS[rng.randrange(len(SYMBOLS))]
        price[symbol] += rng.randrange(-30, 31)
        ts = START_MS + i * STEP_MS
        out.append({"symbol": symbol, "trade_id": i, "price": f"{price[symbol] / 100:.2f}",
                    "quantity": f"{rng.randrange(1, 10**8) / 10**8:.8f}",
                    "taker_side": "BUY" if rng.random() < 0.5 else "SELL",
                    "exchange_ts_ms": ts, "received_ts_us": ts * 1000, "connection_id": "bench",
                    "sequence": i, "from_snapshot": False})
    end = START_MS + n * STEP_MS + 2 * 86_400_000
    return out + [dict(out[0], symbol=s, trade_id=n + i, exchange_ts_ms=end)
                  for i, s in enumerate(SYMBOLS)]


def pandas_bars(frame: pd.DataFrame) -> int:
    """The same bars with pandas: OHLC, volume, count, VWAP, buy/sell volume per interval."""
    frame = frame.assign(notional=frame.price * frame.qty,
                         buy=frame.qty.where(frame.side == "BUY", 0.0),
                         sell=frame.qty.where(frame.side == "SELL", 0.0))
    rows = 0
    for rule in RULES.values():
        bars = frame.groupby("symbol").resample(rule).agg(
            {"price": ["first", "max", "min", "last", "count"], "qty": "sum",
             "notional": "sum", "buy": "sum", "sell": "sum"})
        bars = bars[bars[("price", "count")] > 0]
        bars[("vwap", "")] = bars[("notional", "sum")] / bars[("qty", "sum")]
        rows += len(bars)
    return rows


class _Timed(BarsHandler):
    first_trade_at: float | None = None

    def handle(self, record):
        if _Timed.first_trade_at is None:
            _Timed.first_trade_at = time.perf_counter()
        return super().handle(record)


def _consume_decode(bootstrap: str, registry_url: str, topic: str, n: int) -> float:
    decode = Decoder(SchemaRegistry(registry_url))
    consumer = Consumer(reader_config(bootstrap, f"bench-{uuid.uuid4()}"))
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
    seen, start = 0, None
    try:
        while seen < n:
            for msg in consumer.consume(1000, 1.0):
                if msg.error():
                    continue
                if start is None:
                    start = time.perf_counter()
                decode(msg.value())
                seen += 1
        return n / (time.perf_counter() - start)  # type: ignore[operator]
    finally:
        consumer.close()


def run(bootstrap: str, registry_url: str, events: int) -> list[Figure]:
    data = trades(events)
    total = len(data)

    # The bar logic alone, and pandas on the same trades held in memory.
    logic_rate = best_rate(lambda: build_bars(data), total)
    n_bars = len(build_bars(data)[0])
    frame = pd.DataFrame({"symbol": [t["symbol"] for t in data],
                          "price": [float(t["price"]) for t in data],
                          "qty": [float(t["quantity"]) for t in data],
                          "side": [t["taker_side"] for t in data]},
                         index=pd.to_datetime([t["exchange_ts_ms"] for t in data], unit="ms",
                                              utc=True))
    pandas_rate = best_rate(lambda: pandas_bars(frame), total)

    # End to end through Kafka and Parquet.
    namespace = Namespace(f"sim-benchbars{int(time.time())}")
    ensure_topics(bootstrap, namespace, ["md.trades", "bars", "bars.late", "dlq"])
    topic = namespace.topic("md.trades")
    publish(bootstrap, registry_url, topic, data)
    decode_rate = _consume_decode(bootstrap, registry_url, topic, total)

    root = Path(tempfile.mkdtemp(prefix="bench-bars-"))
    try:
        config = group_config(bootstrap, registry_url, namespace.name, group_id="bench-bars",
                            parquet_root=root / "bars", handler_class=_Timed)
        _Timed.first_trade_at = None
        stats = GroupRunner(config, bootstrap).run(max_records=total)
        elapsed = time.perf_counter() - (_Timed.first_trade_at or time.perf_counter())
        written = sum(1 for _ in root.glob("bars/**/*.parquet"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if stats.records != total or not written:
        raise RuntimeError(f"bars bench: group handled {stats.records} of {total} trades")
    return [
        Figure("bar logic (exact, 1m/5m/1h/1d)", logic_rate, "trades/s", total,
               "pandas resample, float64, same bars", pandas_rate, ""),
        Figure("bars group end to end (topic -> bars topic + Parquet)", total / elapsed,
               "trades/s", total, "consume + Avro decode of the same topic", decode_rate, ""),
        Figure("bars group end to end, bars out", n_bars / elapsed, "bars/s", total,
               "bar logic alone, bars out", logic_rate * n_bars / total, ""),
    ]

