"""What the cluster says about itself: brokers, and each partition's leader, replicas and ISR.

`pipeline status` and `pipeline broker status` show it, and the chaos run uses it to pick
the leader of a partition to kill. Under-replicated partitions (ISR smaller than the
replicas) still take writes; partitions below ``min.insync.replicas`` make ``acks=all``
producers wait (and eventually fail loudly), so they are shown apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.kafka.clients import check_reachable, make_admin
from pipeline.ops.registry_server import JOURNAL_TOPIC, SNAPSHOTS_TOPIC

# Kafka's own topics (group offsets, transactions) and the registry's journal: a cluster
# that replicates the pipeline's topics must replicate these too.
INTERNAL_TOPICS = ("__consumer_offsets", "__transaction_state", JOURNAL_TOPIC, SNAPSHOTS_TOPIC)


@dataclass(frozen=True)
class PartitionHealth:
    topic: str
    partition: int
    leader: int  # -1: no leader (offline)
    replicas: tuple[int, ...]
    isr: tuple[int, ...]

    @property
    def under_replicated(self) -> bool:
        return len(self.isr) < len(self.replicas)

    @property
    def offline(self) -> bool:
        return self.leader < 0

    @property
    def label(self) -> str:
        return f"{self.topic}[{self.partition}]"


@dataclass(frozen=True)
class ClusterHealth:
    brokers: dict[int, str]  # node id -> host:port, as the cluster advertises them
    partitions: tuple[PartitionHealth, ...]
    min_insync: dict[str, int]  # topic -> min.insync.replicas (topics that were asked)

    def led_by(self, broker: int) -> int:
        return sum(1 for p in self.partitions if p.leader == broker)

    def leader_of(self, topic: str, partition: int = 0) -> int:
        for p in self.partitions:
            if p.topic == topic and p.partition == partition:
                return p.leader
        raise KeyError(f"{topic}[{partition}]")

    @property
    def under_replicated(self) -> list[PartitionHealth]:
        return [p for p in self.partitions if p.under_replicated]

    @property
    def below_min_insync(self) -> list[PartitionHealth]:
        """Partitions whose ``acks=all`` writes wait: fewer in sync than the topic needs."""
        return [p for p in self.partitions
                if len(p.isr) < self.min_insync.get(p.topic, 1) or p.offline]

    def by_topic(self) -> dict[str, list[PartitionHealth]]:
        topics: dict[str, list[PartitionHealth]] = {}
        for p in self.partitions:
            topics.setdefault(p.topic, []).append(p)
        return topics


def describe_cluster(bootstrap: str, topics: list[str] | None = None,
                     timeout: float = 10.0) -> ClusterHealth:
    """Brokers and partitions of ``topics`` (default: every topic, Kafka's own included)."""
    from confluent_kafka.admin import ConfigResource, ResourceType

    admin = make_admin(bootstrap)
    meta = check_reachable(admin, bootstrap, timeout)
    brokers = {b.id: f"{b.host}:{b.port}" for b in meta.brokers.values()}
    names = sorted(t for t in meta.topics if topics is None or t in topics)
    partitions = tuple(
        PartitionHealth(name, p.id, p.leader, tuple(p.replicas), tuple(p.isrs))
        for name in names for p in sorted(meta.topics[name].partitions.values(),
                                          key=lambda p: p.id))
    min_insync: dict[str, int] = {}
    if names:
        resources = [ConfigResource(ResourceType.TOPIC, name) for name in names]
        for resource, future in admin.describe_configs(resources,
                                                       request_timeout=timeout).items():
            try:
                entry = future.result().get("min.insync.replicas")
            except Exception:  # noqa: BLE001 - a topic deleted meanwhile: nothing to say
                continue
            if entry is not None and entry.value is not None:
                min_insync[resource.name] = int(entry.value)
    return ClusterHealth(brokers, partitions, min_insync)
