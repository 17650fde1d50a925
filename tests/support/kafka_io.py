"""Plain produce/consume helpers for tests: they read and write topics directly."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.kafka.catalog import end_offset


@dataclass(frozen=True)
class Consumed:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple
    timestamp: int = 0  # the Kafka timestamp (CreateTime unless the topic says otherwise)


def produce_json(bootstrap: str, topic: str, items: list[tuple[str, dict]]) -> None:
    """Produce ``(key, json-able value)`` pairs in order and wait for every ack."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for key, value in items:
        producer.produce(topic, key=key, value=json.dumps(value).encode())
    assert producer.flush(30) == 0


def produce_raw(bootstrap: str, topic: str, items: list[tuple[str, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for key, value in items:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0


def read_all(bootstrap: str, topic: str, *, expect: int | None = None, timeout: float = 30.0,
             isolation: str = "read_committed") -> list[Consumed]:
    """Every record of ``topic`` from the beginning (waits for ``expect`` records if given)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4()}",
                         "enable.auto.commit": False, "isolation.level": isolation})
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    parts = [TopicPartition(topic, p, 0) for p in meta.partitions]
    consumer.assign(parts)
    records: list[Consumed] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ends = {tp.partition: end_offset(consumer, TopicPartition(topic, tp.partition))
                    for tp in parts}
            for msg in consumer.consume(1000, 0.2):
                if msg.error():
                    continue
                records.append(Consumed(msg.topic(), msg.partition(), msg.offset(), msg.key(),
                                        msg.value(), tuple(msg.headers() or ()),
                                        msg.timestamp()[1]))
            positions = {tp.partition: tp.offset for tp in consumer.position(parts)}
            caught_up = all(positions[p] >= ends[p] or ends[p] == 0 for p in ends)
            if expect is None and caught_up:
                break
            if expect is not None and len(records) >= expect:
                break
        return records
    finally:
        consumer.close()


def committed(bootstrap: str, group_id: str, topic: str) -> dict[int, int]:
    """The group's committed offset per partition (-1001 when none)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group_id})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        parts = consumer.committed([TopicPartition(topic, p) for p in meta.partitions], timeout=10)
        return {tp.partition: tp.offset for tp in parts}
    finally:
        consumer.close()
