"""The ``orderbook`` consumer group: L2 updates in, books kept, depth-N snapshots out.

The rules (snapshots, changes before a snapshot, crossed and locked books, when a
``BookSnapshot`` is published) are :mod:`pipeline.market.book_policy`'s, the very rules the
backtest engine and paper execution follow; this group publishes the snapshots (compacted,
keyed by symbol) and ``BookHealthEvent``s the policy reports, logging and counting them.

Restore without replaying the topic: every ``checkpoint_interval_s`` each book touched
since the last checkpoint is written whole to ``book.checkpoints`` (compacted) with the
offset it includes, and only then are the input offsets committed, at exactly those
checkpoint positions. A restarted or rebalanced instance reads the checkpoints of its
partitions, restores the books and resumes at the committed offset, so it re-reads at
most one checkpoint interval of records whatever the topic's length.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Decoder, Serde
from pipeline.kafka.catalog import Namespace
from pipeline.market.book_policy import TOP_CHANGED, BookPolicy, Health, Source
from pipeline.runtime.context import AssignContext, Partition
from pipeline.runtime.contract import GroupContext, group_main
from pipeline.runtime.runner import (
    GroupConfig,
    Handler,
    Output,
    Record,
)

log = logging.getLogger(__name__)
MULTI_INSTANCE = False  # instances share the group's partitions; none needs a name


@dataclass(frozen=True)
class Config:
    """The orderbook group's settings: a topology's ``args`` (pipeline/runtime/contract.py)."""

    depth: int = field(default=10, metadata={"help": "levels per side in a snapshot"})
    checkpoint_interval: float = field(default=5.0, metadata={
        "help": "seconds between checkpoints of the books to book.checkpoints"})
    snapshot_interval: float = field(default=1.0, metadata={
        "help": "seconds between snapshots of a book (BookPolicy)"})
    group: str | None = field(default=None, metadata={
        "help": "group id [default: <namespace>.orderbook]"})


@dataclass(frozen=True)
class OrderbookSettings:
    depth: int = 10
    snapshot_interval_s: float = 1.0
    checkpoint_interval_s: float = 5.0


class OrderbookHandler(Handler):
    """Kafka around :class:`~pipeline.market.book_policy.BookPolicy`: it publishes what the
    policy says, checkpoints the books and restores them."""

    def __init__(self, namespace: Namespace, serde: Serde, bootstrap: str,
                 settings: OrderbookSettings = OrderbookSettings(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.clock, self.bootstrap = settings, clock, bootstrap
        self.source_topic = namespace.topic("md.l2")
        self.topics = {n: namespace.topic(n) for n in ("book.snapshots", "book.health",
                                                       "book.checkpoints")}
        self.encode = {n: serde.encoder(t) for n, t in self.topics.items()}
        self.checkpoint_decoder = serde.decoder()
        self.policy = BookPolicy(settings.depth, int(settings.snapshot_interval_s * 1e6))
        self.books = self.policy.books
        self.counts: Counter = Counter()
        self._touched: set[str] = set()  # since the last checkpoint
        self._restored: dict[str, int] = {}  # symbol -> checkpointed offset
        self._read: dict[int, int] = {}  # partition -> next offset read
        self._checkpointed: dict[int, int] = {}  # partition -> offset the checkpoints cover
        self._last_checkpoint = clock()

    # -- records

    def handle(self, record: Record) -> Iterable[Output]:
        update = record.value
        symbol = update["symbol"]
        self._read[record.partition] = record.offset + 1
        if record.offset <= self._restored.get(symbol, -1):
            return ()  # already inside the restored checkpoint
        code, health = self.policy.apply(update, record.partition, record.offset)
        self._touched.add(symbol)
        out = [self._health(record, symbol, h) for h in health]
        if code == TOP_CHANGED:
            out.append(self._snapshot(symbol))
        return out

    # -- outputs

    def _snapshot(self, symbol: str) -> Output:
        value = self.encode["book.snapshots"](self.policy.snapshot(symbol, time.time_ns() // 1000))
        self.metrics.inc("snapshots_total")
        return Output(self.topics["book.snapshots"], value, symbol)

    def _health(self, record: Record, symbol: str, health: Health) -> Output:
        self.counts[health.kind.lower()] += 1
        self.metrics.inc("book_health_total", kind=health.kind)
        log.warning("%s %s at %s[%d]@%d: %s", symbol, health.kind, record.topic,
                    record.partition, record.offset, health.detail)
        value = self.encode["book.health"]({
            "symbol": symbol, "kind": health.kind, "detail": health.detail,
            "best_bid": health.best_bid, "best_ask": health.best_ask,
            "source_partition": record.partition, "source_offset": record.offset,
            "detected_ts_us": time.time_ns() // 1000})
        return Output(self.topics["book.health"], value, symbol)

    def end_batch(self) -> Iterable[Output]:
        now = self.clock()
        out = [self._snapshot(s) for s in self.policy.due(int(now * 1e6))]
        if now - self._last_checkpoint >= self.settings.checkpoint_interval_s:
            out += self.checkpoint()
            self._last_checkpoint = now
        return out

    def _pending_snapshots(self) -> list[Output]:
        """Snapshots of books that changed below the top since they were last published."""
        changed = self.policy.changed
        out = [self._snapshot(s) for s in sorted(changed) if self.books[s].has_snapshot]
        changed.clear()
        return out

    def checkpoint(self) -> list[Output]:
        """Checkpoint every book touched since the last one; the offsets committed next are
        exactly the positions these checkpoints cover."""
        out = []
        for symbol in sorted(self._touched):
            book, source = self.books[symbol], self.policy.source(symbol)
            bids, asks = book.depth()
            out.append(Output(self.topics["book.checkpoints"], self.encode["book.checkpoints"]({
                "symbol": symbol, "source_topic": self.source_topic,
                "source_partition": source.partition, "source_offset": source.offset,
                "has_snapshot": book.has_snapshot,
                "bids": [{"price": p, "quantity": q} for p, q in bids],
                "asks": [{"price": p, "quantity": q} for p, q in asks],
                "connection_id": source.connection_id, "sequence": source.sequence,
                "written_ts_us": time.time_ns() // 1000}), symbol))
        self._touched.clear()
        self._checkpointed.update(self._read)
        self.counts["checkpoints"] += len(out)
        return out

    def commit_offsets(self, offsets: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        return {(t, p): self._checkpointed.get(p, -1) for (t, p) in offsets}

    def on_revoke(self, partitions: list[Partition]) -> Iterable[Output]:
        out = self._pending_snapshots() + self.checkpoint()  # the next owner restores from here
        lost = {tp.partition for tp in partitions}
        gone = [s for s in self.policy.symbols() if self.policy.source(s).partition in lost]
        self.policy.forget(gone)
        for symbol in gone:
            self._restored.pop(symbol, None)
        for p in lost:
            self._read.pop(p, None)
            self._checkpointed.pop(p, None)
        return out

    def close(self) -> Iterable[Output]:
        return self._pending_snapshots() + self.checkpoint()

    # -- restore

    def on_assign(self, ctx: AssignContext, partitions: list[Partition]) -> None:
        wanted = {tp.partition for tp in partitions if tp.topic == self.source_topic}
        started = time.monotonic()
        restored = 0
        for checkpoint in self._read_checkpoints(ctx):
            if checkpoint["source_topic"] != self.source_topic or \
                    checkpoint["source_partition"] not in wanted:
                continue
            symbol = checkpoint["symbol"]
            self.policy.restore(symbol, checkpoint["bids"], checkpoint["asks"],
                                checkpoint["has_snapshot"],
                                Source(checkpoint["source_partition"], checkpoint["source_offset"],
                                       checkpoint["connection_id"], checkpoint["sequence"]))
            self._restored[symbol] = checkpoint["source_offset"]
            restored += 1
        self.counts["restored_books"] += restored
        log.info("restored %d book(s) from checkpoints for partitions %s in %.3fs", restored,
                 sorted(wanted), time.monotonic() - started)
        return None  # resume at the committed offsets: the checkpoint positions

    def _read_checkpoints(self, ctx: AssignContext) -> list[dict]:
        """The newest checkpoint per symbol (the topic is compacted; read it to the end)."""
        topic = self.topics["book.checkpoints"]
        latest: dict[str, dict] = {}
        for msg in ctx.read_to_end(topic):
            try:
                value = self.checkpoint_decoder(msg.value)
            except Exception as exc:  # noqa: BLE001 - a bad checkpoint is skipped, loudly
                log.error("unreadable checkpoint at %s[%d]@%d: %s", topic,
                          msg.partition, msg.offset, exc)
                continue
            latest[value["symbol"]] = value
        return list(latest.values())


def group_config(bootstrap: str, registry_url: str, namespace: Namespace,
                 settings: OrderbookSettings = OrderbookSettings(),
                 group_id: str | None = None) -> GroupConfig:
    """The group's configuration; its id defaults to ``<namespace>.orderbook`` so groups of
    different namespaces (live, sim, a replay) never share offsets or members."""
    registry = SchemaRegistry(registry_url)
    serde = Serde(registry)
    return GroupConfig(group_id=group_id or f"{namespace}.orderbook",
                       topics=[namespace.topic("md.l2")],
                       dead_letter_topic=namespace.topic("dlq"),
                       handler=lambda: OrderbookHandler(namespace, serde, bootstrap, settings),
                       decoder=Decoder(registry), batch_size=1000)


def make_group(ctx: GroupContext, config: Config = Config()) -> GroupConfig:
    """The group of the contract (pipeline/runtime/contract.py); creates its topics."""
    from pipeline.kafka.catalog import ensure_topics

    ensure_topics(ctx.bootstrap, ctx.namespace, ["md.l2", "book.snapshots", "book.health",
                                                 "book.checkpoints", "dlq"])
    settings = OrderbookSettings(config.depth, config.snapshot_interval,
                                 config.checkpoint_interval)
    return group_config(ctx.bootstrap, ctx.registry_url, ctx.namespace, settings, config.group)


def main(argv: list[str] | None = None) -> int:
    return group_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
