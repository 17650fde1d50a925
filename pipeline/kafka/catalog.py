"""The topic catalog: every topic the pipeline uses, declared once.

A topic's full name is ``<namespace>.<name>``. The namespace says where the data comes
from, so live Gemini data, simulated data and replays never share a topic:

* ``live`` (optionally ``live-<suffix>``): data from Gemini itself;
* ``sim`` / ``sim-<suffix>``: the local venue (recorded captures, the generator), tests;
* ``replay-<suffix>``: history re-published for a backtest or a topology replay.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Iterable

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.core.errors import PipelineError
from pipeline.kafka.clients import check_reachable, make_admin, reader_config

DAY_MS = 24 * 3600 * 1000
NAMESPACE_KINDS = ("live", "sim", "replay")
_NAMESPACE_RE = re.compile(r"^(live|sim|replay)(-[a-z0-9][a-z0-9_-]{0,60})?$")


@dataclass(frozen=True)
class Namespace:
    name: str

    def __post_init__(self) -> None:
        if not _NAMESPACE_RE.match(self.name):
            raise PipelineError(
                f"invalid namespace {self.name!r}: use live, sim or replay, optionally followed "
                "by -suffix in lowercase letters, digits, '-' or '_' (e.g. sim-test, replay-jun24)"
            )
        if self.name == "replay":
            raise PipelineError("a replay namespace needs a suffix, e.g. replay-jun24")

    @property
    def kind(self) -> str:
        """``live``, ``sim`` or ``replay``."""
        return self.name.split("-", 1)[0]

    @property
    def is_live(self) -> bool:
        return self.kind == "live"

    def topic(self, name: str) -> str:
        """The full name of catalog topic ``name`` in this namespace."""
        spec(name)  # unknown names fail here, not at the broker
        return f"{self.name}.{name}"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class TopicSpec:
    """One topic as the pipeline needs it; ``replication=None`` takes the cluster default."""

    name: str
    partitions: int
    key: str
    description: str
    value_schema: str | None  # record type in schemas/<name>.avsc; None: raw bytes
    cleanup_policy: str = "delete"
    retention_ms: int | None = 7 * DAY_MS
    replication: int | None = None

    def configs(self) -> dict[str, str]:
        configs = {"cleanup.policy": self.cleanup_policy}
        if self.retention_ms is not None:
            configs["retention.ms"] = str(self.retention_ms)
        if self.cleanup_policy == "compact":
            # Compact promptly: the newest value per key is what readers restore from.
            configs["min.cleanable.dirty.ratio"] = "0.1"
            configs["segment.ms"] = str(3600 * 1000)
        return configs


MARKET_PARTITIONS = 6

TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec("raw.frames", MARKET_PARTITIONS, "symbol",
              "every WebSocket frame exactly as received, so anything can be re-derived "
              "(frames of no symbol, e.g. heartbeats, are keyed by connection id)",
              value_schema="RawFrame", retention_ms=3 * DAY_MS),
    TopicSpec("md.l2", MARKET_PARTITIONS, "symbol",
              "L2 book changes, one record per exchange frame; snapshots flagged",
              value_schema="L2Update"),
    TopicSpec("md.trades", MARKET_PARTITIONS, "symbol",
              "trades as printed by the exchange",
              value_schema="Trade"),
    TopicSpec("book.snapshots", MARKET_PARTITIONS, "symbol",
              "latest depth-N book per symbol",
              value_schema="BookSnapshot", cleanup_policy="compact", retention_ms=None),
    TopicSpec("book.health", MARKET_PARTITIONS, "symbol",
              "crossed books, changes before a snapshot, resnapshots",
              value_schema="BookHealthEvent"),
    TopicSpec("book.checkpoints", MARKET_PARTITIONS, "symbol",
              "orderbook group's book checkpoints with their source offsets",
              value_schema="BookCheckpoint", cleanup_policy="compact", retention_ms=None),
    TopicSpec("bars", MARKET_PARTITIONS, "symbol",
              "closed OHLCV bars (all intervals)",
              value_schema="Bar", retention_ms=-1),
    TopicSpec("bars.late", MARKET_PARTITIONS, "symbol",
              "trades that arrived after their bar closed, kept instead of changing it",
              value_schema="Trade"),
    TopicSpec("strategy.state", 1, "strategy_id",
              "each strategy's state, saved in the transaction of its order requests",
              value_schema="StrategyState", cleanup_policy="compact", retention_ms=None),
    TopicSpec("orders.requests", MARKET_PARTITIONS, "symbol",
              "signed order requests from strategies",
              value_schema="OrderRequest", retention_ms=30 * DAY_MS),
    TopicSpec("orders.events", MARKET_PARTITIONS, "client_order_id",
              "order lifecycle events from execution",
              value_schema="OrderEvent", retention_ms=-1),
    TopicSpec("orders.seen", MARKET_PARTITIONS, "client_order_id",
              "client_order_ids execution has acted on (at-most-once across restarts)",
              value_schema="SeenOrder", cleanup_policy="compact", retention_ms=None),
    TopicSpec("paper.state", 1, "symbol|kind",
              "paper execution's simulated exchange per symbol: books and resting orders, "
              "written with its events (compacted)",
              value_schema="PaperState", cleanup_policy="compact", retention_ms=None),
    TopicSpec("strategy.control", 1, "strategy_id",
              "halts (risk stops, operators) and resumes per strategy; execution obeys the "
              "newest (compacted)",
              value_schema="StrategyControl", cleanup_policy="compact", retention_ms=None),
    TopicSpec("portfolio.positions", 1, "strategy_id|symbol",
              "each strategy's position per symbol: size, average entry, PnL (compacted)",
              value_schema="Position", cleanup_policy="compact", retention_ms=None),
    TopicSpec("portfolio.pnl", 1, "strategy_id",
              "each strategy's PnL, equity and drawdown on every fill and every few seconds",
              value_schema="StrategyPnl", retention_ms=30 * DAY_MS),
    TopicSpec("portfolio.reconciliation", 1, "mode",
              "differences between the pipeline's positions and orders and Gemini's",
              value_schema="ReconciliationEvent", retention_ms=30 * DAY_MS),
    TopicSpec("portfolio.state", 1, "group id",
              "the portfolio group's state, written with its outputs (compacted)",
              value_schema="PortfolioState", cleanup_policy="compact", retention_ms=None),
    TopicSpec("dlq", 1, "the failed record's original key",
              "dead letters: original bytes; source topic/partition/offset and error in headers",
              value_schema=None, retention_ms=30 * DAY_MS),
)

_BY_NAME = {topic.name: topic for topic in TOPICS}


def declare(topic: TopicSpec) -> None:
    """Add a topic of a user group (from the topology file) to the catalog; idempotent for
    the same declaration, an error for a clash with a different one."""
    existing = _BY_NAME.get(topic.name)
    if existing is not None and existing != topic:
        raise PipelineError(f"topic {topic.name!r} is already declared differently")
    _BY_NAME[topic.name] = topic


def spec(name: str) -> TopicSpec:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise PipelineError(
            f"unknown topic {name!r}: the catalog has {', '.join(sorted(_BY_NAME))}"
        ) from None


def split_topic(full_name: str) -> tuple[Namespace, TopicSpec] | None:
    """(namespace, spec) for a full topic name of the catalog, else None."""
    namespace, _, name = full_name.partition(".")
    if name not in _BY_NAME or not _NAMESPACE_RE.match(namespace) or namespace == "replay":
        return None
    return Namespace(namespace), _BY_NAME[name]


# On 3+ brokers every topic has 3 replicas and an acks=all write needs 2 of them in sync:
# one broker may die (or restart) without losing an acknowledged record or stopping writes.
CLUSTER_REPLICATION = 3
CLUSTER_MIN_INSYNC = 2


def replication_for(brokers: int) -> dict:
    """How topics are replicated on a cluster of ``brokers``: nothing is asked of one or
    two brokers (the cluster's defaults hold), 3 replicas and min ISR 2 from three up."""
    if brokers < CLUSTER_REPLICATION:
        return {}
    return {"replication": CLUSTER_REPLICATION,
            "config": {"min.insync.replicas": str(CLUSTER_MIN_INSYNC)}}


def ensure_topics(bootstrap: str, namespace: Namespace,
                  names: Iterable[str] | None = None, timeout: float = 30.0) -> list[str]:
    """Create the namespace's topics that do not exist yet; return the names created.

    Idempotent: existing topics are left alone, but one with fewer partitions than the
    catalog asks for is reported, because keyed ordering depends on the partition count.
    """
    wanted = [spec(name) for name in (names or _BY_NAME)]
    admin = make_admin(bootstrap)
    meta = check_reachable(admin, bootstrap, timeout)
    existing = meta.topics
    durability = replication_for(len(meta.brokers))
    missing = []
    for topic in wanted:
        full = namespace.topic(topic.name)
        if full in existing:
            have = len(existing[full].partitions)
            if have < topic.partitions:
                raise PipelineError(f"topic {full} has {have} partitions, the catalog wants "
                                    f"{topic.partitions}: recreate it or raise its partitions")
            continue
        replication = topic.replication or durability.get("replication", -1)
        config = {**topic.configs(), **durability.get("config", {})}
        missing.append(NewTopic(full, num_partitions=topic.partitions,
                                replication_factor=replication, config=config))
    if not missing:
        return []
    created = []
    for full, future in admin.create_topics(missing, request_timeout=timeout).items():
        try:
            future.result()
            created.append(full)
        except Exception as exc:  # noqa: BLE001 - examined below
            if "TOPIC_ALREADY_EXISTS" in str(exc):
                continue  # created concurrently by another process: fine
            raise PipelineError(f"could not create topic {full}: {exc}") from None
    _wait_until_served(bootstrap, admin, created, timeout)
    return created


def _wait_until_served(bootstrap: str, admin: AdminClient, topics: list[str],
                       timeout: float) -> None:
    """Block until every partition of ``topics`` has a leader that serves offset requests."""
    if not topics:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = admin.list_topics(timeout=timeout).topics
        if all(t in meta and meta[t].error is None and meta[t].partitions
               and all(p.leader >= 0 for p in meta[t].partitions.values()) for t in topics):
            break
        time.sleep(0.1)
    consumer = Consumer(reader_config(bootstrap, "pipeline-topics-cli"))
    try:
        for t in topics:
            for p in meta[t].partitions:
                end_offset(consumer, TopicPartition(t, p), deadline - time.monotonic())
    finally:
        consumer.close()


# _UNKNOWN_PARTITION: on a cluster, a client may ask a broker that has not yet learned of
# a new topic (metadata reaches the brokers one by one); it knows a moment later.
_TRANSIENT = (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
              KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_PARTITION,
              KafkaError._TRANSPORT)


def end_offset(consumer: Consumer, tp: TopicPartition, timeout: float = 10.0) -> int:
    """The partition's end offset, retrying while a new topic's leader settles."""
    return watermarks(consumer, tp, timeout)[1]


def watermarks(consumer: Consumer, tp: TopicPartition, timeout: float = 10.0) -> tuple[int, int]:
    """The partition's (low, high) offsets (high: the committed end for a read_committed
    consumer), retrying while a new topic's leader settles."""
    deadline = time.monotonic() + max(timeout, 1.0)
    while True:
        try:
            left = max(deadline - time.monotonic(), 0.5)
            low, high = consumer.get_watermark_offsets(tp, timeout=left)
            return low, high
        except KafkaException as exc:
            if exc.args[0].code() not in _TRANSIENT or time.monotonic() > deadline:
                raise PipelineError(f"cannot read the end offset of {tp.topic}[{tp.partition}]: "
                                    f"{exc.args[0].str()}") from None
            time.sleep(0.1)


def delete_namespace(bootstrap: str, namespace: Namespace, timeout: float = 30.0) -> list[str]:
    """Delete every catalog topic of ``namespace`` (e.g. a finished replay)."""
    admin = make_admin(bootstrap)
    topics = [t for t in admin.list_topics(timeout=timeout).topics
              if (parsed := split_topic(t)) and parsed[0] == namespace]
    if not topics:
        return []
    for future in admin.delete_topics(topics, request_timeout=timeout).values():
        future.result()
    return sorted(topics)


@dataclass(frozen=True)
class TopicInfo:
    name: str
    partitions: int
    end_offsets: tuple[int, ...]
    cleanup_policy: str
    key: str

    @property
    def records(self) -> int:
        """Sum of end offsets: the records ever written (a compacted topic holds fewer)."""
        return sum(self.end_offsets)


def describe_topics(bootstrap: str, namespace: Namespace | None = None,
                    timeout: float = 10.0) -> list[TopicInfo]:
    """Catalog topics present on the cluster, with partition counts and end offsets."""
    meta = check_reachable(make_admin(bootstrap), bootstrap, timeout).topics
    ours = sorted(t for t in meta
                  if (parsed := split_topic(t)) and (namespace is None or parsed[0] == namespace))
    consumer = Consumer(reader_config(bootstrap, "pipeline-topics-cli"))
    try:
        infos = []
        for full in ours:
            _, topic = split_topic(full)  # type: ignore[misc]
            ends = tuple(end_offset(consumer, TopicPartition(full, p), timeout)
                         for p in sorted(meta[full].partitions))
            infos.append(TopicInfo(full, len(ends), ends, topic.cleanup_policy, topic.key))
        return infos
    finally:
        consumer.close()
