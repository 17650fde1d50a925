"""Kafka into the dashboard: one thread, one consumer (group ``<namespace>.web``,
read_committed, never committing), decoding each record and folding it into
:class:`~pipeline.web.state.Dashboard` under a lock.

Each topic starts where its page needs it: orders.events from the beginning (the open
orders are what was never finished), the others a tail back from the end.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

from confluent_kafka import Consumer, TopicPartition

from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Serde
from pipeline.core.errors import SerdeError
from pipeline.kafka.catalog import Namespace
from pipeline.kafka.clients import reader_config
from pipeline.web.state import Dashboard

log = logging.getLogger(__name__)

# catalog topic -> (records back from each partition's end; None: from the beginning)
TAILS: dict[str, int | None] = {"book.snapshots": 200, "bars": 2000, "md.trades": 500,
                                "book.health": 100, "orders.events": None,
                                "portfolio.pnl": 5000, "portfolio.positions": 2000}


@dataclass
class FeedStats:
    records: int = 0
    bad: dict[str, int] = field(default_factory=dict)  # topic -> undecodable records
    missing: list[str] = field(default_factory=list)  # catalog topics not in the cluster
    error: str | None = None  # the newest client error


class Feed(threading.Thread):
    """Reads the namespace's topics into ``dashboard`` until :meth:`stop`."""

    def __init__(self, bootstrap: str, registry_url: str, namespace: Namespace,
                 dashboard: Dashboard, lock: threading.Lock,
                 consumer: Callable[[dict], Consumer] = Consumer) -> None:
        super().__init__(name="web-feed", daemon=True)
        self.namespace, self.dashboard, self.lock = namespace, dashboard, lock
        self.decode = Serde(SchemaRegistry(registry_url)).decoder()
        self.consumer = consumer(reader_config(
            bootstrap, f"{namespace}.web", **{"isolation.level": "read_committed",
                                              "error_cb": self._on_error}))
        self.stats = FeedStats()
        self._stopping = threading.Event()
        self._apply = {namespace.topic("book.snapshots"): dashboard.on_book,
                       namespace.topic("bars"): dashboard.on_bar,
                       namespace.topic("md.trades"): dashboard.on_trade,
                       namespace.topic("book.health"): dashboard.on_health,
                       namespace.topic("orders.events"): dashboard.on_order_event,
                       namespace.topic("portfolio.pnl"): dashboard.on_pnl,
                       namespace.topic("portfolio.positions"): dashboard.on_position}

    def _on_error(self, err) -> None:
        self.stats.error = str(err)

    def assign(self) -> None:
        """Each topic's partitions from where its page needs them."""
        metadata = self.consumer.list_topics(timeout=10).topics
        partitions = []
        for name, tail in TAILS.items():
            topic = self.namespace.topic(name)
            if topic not in metadata or metadata[topic].error is not None:
                self.stats.missing.append(name)
                continue
            for p in sorted(metadata[topic].partitions):
                low, high = self.consumer.get_watermark_offsets(TopicPartition(topic, p),
                                                                timeout=10)
                start = low if tail is None else max(low, high - tail)
                partitions.append(TopicPartition(topic, p, start))
        self.consumer.assign(partitions)

    def run(self) -> None:
        try:
            self.assign()
            while not self._stopping.is_set():
                self.poll_once()
        except Exception as exc:  # noqa: BLE001 - the server stays up and shows it
            log.exception("the dashboard's Kafka feed stopped")
            self.stats.error = f"feed stopped: {type(exc).__name__}: {exc}"
        finally:
            self.consumer.close()

    def poll_once(self, timeout: float = 0.2) -> int:
        decoded = []
        for msg in self.consumer.consume(500, timeout):
            if msg.error() is not None:
                self.stats.error = str(msg.error())
                continue
            try:
                decoded.append((msg.topic(), self.decode(msg.value())))
            except SerdeError as exc:
                bad = self.stats.bad
                bad[msg.topic()] = bad.get(msg.topic(), 0) + 1
                if bad[msg.topic()] == 1:
                    log.warning("undecodable record in %s[%d]@%d: %s", msg.topic(),
                                msg.partition(), msg.offset(), exc)
        with self.lock:
            for topic, record in decoded:
                try:
                    self._apply[topic](record)
                except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
                    self.stats.bad[topic] = self.stats.bad.get(topic, 0) + 1
                    log.warning("record of %s the dashboard cannot show: %s", topic, exc)
            self.stats.records += len(decoded)
        return len(decoded)

    def stop(self) -> None:
        self._stopping.set()
