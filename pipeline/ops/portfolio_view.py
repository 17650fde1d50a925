"""The portfolio as the CLI, ``pipeline status`` and the metrics read it: the newest
position per ``strategy|symbol``, the newest PnL per strategy, halts, the last
reconciliation; and the one way an operator halts or resumes a strategy.

Compacted topics are read to their end; ``portfolio.pnl`` and
``portfolio.reconciliation`` (not compacted) only their last ``tail`` records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import TopicPartition

from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Serde
from pipeline.core.errors import PipelineError
from pipeline.kafka.catalog import Namespace
from pipeline.kafka.clients import ReliableProducer
from pipeline.runtime.runner import read_range, read_to_end, restore_consumer


@dataclass
class PortfolioView:
    positions: list[dict] = field(default_factory=list)  # held, or with realized PnL
    pnl: dict[str, dict] = field(default_factory=dict)  # strategy -> newest StrategyPnl
    halts: dict[str, dict] = field(default_factory=dict)  # strategy -> its halt record
    reconciliation: dict | None = None  # the newest CHECKED record
    differences: list[dict] = field(default_factory=list)  # what that check found


def _tail(bootstrap: str, topic: str, tail: int) -> list:
    consumer = restore_consumer(bootstrap)
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ranges = {}
        for p in parts:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            ranges[p] = (max(low, high - tail), high)
    finally:
        consumer.close()
    return list(read_range(bootstrap, topic, ranges, timeout_s=30))


def read_view(bootstrap: str, registry_url: str, namespace: Namespace, tail: int = 2000
              ) -> PortfolioView:
    decode = Serde(SchemaRegistry(registry_url)).decoder()
    view = PortfolioView()
    positions: dict[bytes, dict] = {}
    for msg in read_to_end(bootstrap, namespace.topic("portfolio.positions"), 30):
        positions[msg.key()] = decode(msg.value())
    view.positions = sorted((p for p in positions.values()
                             if p["quantity"] != "0" or p["realized_pnl"] != "0"),
                            key=lambda p: (p["strategy_id"], p["symbol"]))
    for msg in _tail(bootstrap, namespace.topic("portfolio.pnl"), tail):
        record = decode(msg.value())
        view.pnl[record["strategy_id"]] = record
    for msg in read_to_end(bootstrap, namespace.topic("strategy.control"), 30):
        record = decode(msg.value())
        if record["halted"]:
            view.halts[record["strategy_id"]] = record
        else:
            view.halts.pop(record["strategy_id"], None)
    found: list[dict] = []
    for msg in _tail(bootstrap, namespace.topic("portfolio.reconciliation"), tail):
        record = decode(msg.value())
        if record["kind"] == "CHECKED":
            view.reconciliation, view.differences, found = record, found, []
        else:
            found.append(record)
    return view


def set_halt(bootstrap: str, registry_url: str, namespace: Namespace, strategy_id: str,
             halted: bool, detail: str = "", by: str = "operator") -> dict[str, Any]:
    """Write an operator's halt or resume to ``strategy.control`` (execution obeys it
    from its next batch; the portfolio measures afresh after a resume)."""
    if not strategy_id:
        raise PipelineError("which strategy? give its id")
    record = {"strategy_id": strategy_id, "halted": halted, "reason": "operator",
              "detail": detail or ("halted" if halted else "resumed") + " by an operator",
              "at_ms": time.time_ns() // 1_000_000, "by": by}
    topic = namespace.topic("strategy.control")
    encode = Serde(SchemaRegistry(registry_url)).encoder(topic)
    producer = ReliableProducer(bootstrap)
    producer.produce(topic, encode(record), strategy_id)
    producer.flush(30)
    return record
