"""An example consumer group to copy: spread and depth imbalance per symbol.

It reads the orderbook group's ``book.snapshots`` and writes one JSON record per snapshot
to the user topic ``monitor.spread`` (declared in the topology file). To plug in a group
of your own, copy this file, change ``Config`` and ``handle``, and add one entry to
``topology.toml``:

    [[topic]]
    name = "monitor.spread"

    [[process]]
    name = "spread-monitor"
    run = "consumers.examples.spread_monitor"
    args = { alert_bps = 50 }

The module follows the consumer-group contract (pipeline/runtime/contract.py): a frozen
``Config`` dataclass (what ``args`` may hold, checked when the topology is loaded),
``MULTI_INSTANCE`` and ``make_group(ctx, config)``. ``pipeline run spread-monitor`` runs it
alone in the foreground while you develop it, as does ``python -m
consumers.examples.spread_monitor --alert-bps 20``.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from decimal import Decimal

from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Decoder
from pipeline.runtime.contract import GroupContext, group_main
from pipeline.runtime.runner import GroupConfig, Handler, Output, Record

log = logging.getLogger(__name__)
OUTPUT = "monitor.spread"
MULTI_INSTANCE = False  # no transactional or static member id: instances just share


@dataclass(frozen=True)
class Config:
    """What the topology's ``args`` may hold."""

    alert_bps: int = field(default=50, metadata={"help": "log a warning above this spread"})


class SpreadMonitor(Handler):
    def __init__(self, out_topic: str, alert_bps: int) -> None:
        self.out_topic, self.alert_bps = out_topic, Decimal(alert_bps)

    def handle(self, record: Record):
        book = record.value
        if not book["bids"] or not book["asks"]:
            return ()
        bid, ask = Decimal(book["bids"][0]["price"]), Decimal(book["asks"][0]["price"])
        mid = (bid + ask) / 2
        spread_bps = (ask - bid) / mid * 10_000
        bid_size = sum(Decimal(level["quantity"]) for level in book["bids"])
        ask_size = sum(Decimal(level["quantity"]) for level in book["asks"])
        imbalance = (bid_size - ask_size) / (bid_size + ask_size)
        if spread_bps > self.alert_bps:
            log.warning("%s spread %.1f bps", book["symbol"], spread_bps)
        value = {"symbol": book["symbol"], "mid": str(mid), "spread_bps": f"{spread_bps:.4f}",
                 "imbalance": f"{imbalance:.4f}", "source_offset": book["source_offset"]}
        return [Output(self.out_topic, json.dumps(value).encode(), book["symbol"])]


def make_group(ctx: GroupContext, config: Config = Config()) -> GroupConfig:
    """The group: its id is ``<namespace>.<process name>``, as the topology's ACLs expect."""
    namespace = ctx.namespace
    return GroupConfig(group_id=f"{namespace}.{ctx.name}",
                       topics=[namespace.topic("book.snapshots")],
                       dead_letter_topic=namespace.topic("dlq"),
                       handler=lambda: SpreadMonitor(f"{namespace}.{OUTPUT}", config.alert_bps),
                       decoder=Decoder(SchemaRegistry(ctx.registry_url)))


def main(argv: list[str] | None = None) -> int:
    return group_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
