"""The topic catalog: names, namespaces and what each topic is declared as: the tests that need
Kafka (those that do not: tests/unit/kafka/test_catalog.py)."""

from __future__ import annotations

import pytest

from pipeline.kafka.catalog import (
    describe_topics,
    ensure_topics,
    spec,
)


@pytest.mark.broker
def test_topics_are_created_idempotently_with_their_partitions(kafka, namespace):
    first = ensure_topics(kafka, namespace, ["md.l2", "book.snapshots", "dlq"])
    assert sorted(first) == sorted(namespace.topic(n) for n in ["md.l2", "book.snapshots", "dlq"])
    assert ensure_topics(kafka, namespace, ["md.l2", "book.snapshots", "dlq"]) == []
    infos = {i.name: i for i in describe_topics(kafka, namespace)}
    assert infos[namespace.topic("md.l2")].partitions == spec("md.l2").partitions
    assert infos[namespace.topic("md.l2")].end_offsets == (0,) * spec("md.l2").partitions
    assert infos[namespace.topic("book.snapshots")].cleanup_policy == "compact"
    assert infos[namespace.topic("dlq")].partitions == 1


