"""The one partition reader against a real broker: windows that end in transaction markers
and aborted records (offsets a read_committed consumer never sees) are read to their end
once, by the backtest's source and by the topology replay alike, without waiting out the
stall timeout."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Producer

from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Encoder
from pipeline.kafka.catalog import Namespace, ensure_topics
from pipeline.kafka.clients import producer_config
from pipeline.replay.source import ReplaySource
from pipeline.replay.topology_replay import ReplayRequest, Republisher

pytestmark = pytest.mark.broker


def l2(i: int) -> dict:
    return {"symbol": "BTCUSD", "snapshot": i == 0,
            "changes": [{"side": "BID", "price": f"{100 + i}", "quantity": "1"}],
            "exchange_ts_ms": None, "received_ts_us": 1_700_000_000_000_000 + i * 1000,
            "connection_id": "c", "sequence": i, "event_id": None}


def transactional_topic(kafka: str, registry_url: str, namespace: Namespace) -> str:
    """md.l2 whose partition 0 holds 3 committed records (offsets 0-2, marker 3), then
    2 aborted ones (4-5, marker 6); partition 1 one committed record then its marker."""
    ensure_topics(kafka, namespace, ["md.l2"])
    topic = namespace.topic("md.l2")
    encode = Encoder(SchemaRegistry(registry_url), topic)
    producer = Producer(producer_config(kafka, **{"transactional.id": f"t-{uuid.uuid4()}"}))
    producer.init_transactions(30)
    for partition, committed, aborted in ((0, range(3), range(3, 5)), (1, range(5, 6), ())):
        producer.begin_transaction()
        for i in committed:
            producer.produce(topic, encode(l2(i)), b"BTCUSD", partition=partition)
        producer.commit_transaction(30)
        if aborted:
            producer.begin_transaction()
            for i in aborted:
                producer.produce(topic, encode(l2(i)), b"BTCUSD", partition=partition)
            producer.flush(30)
            producer.abort_transaction(30)
    return topic


def test_windows_ending_in_markers_and_aborted_records_are_read_once_to_their_end(
        kafka, registry, namespace):
    topic = transactional_topic(kafka, registry.url, namespace)
    began = time.monotonic()
    with ReplaySource(kafka, registry.url, [topic], timeout=20) as source:
        windows = {p.partition: (p.first, p.end) for p in source.plan if p.first < p.end}
        assert windows == {0: (0, 7), 1: (0, 2)}
        events = [event for batch in source.batches() for event in batch]
    assert time.monotonic() - began < 15, "waited for offsets that never come"
    assert sorted((e[2], e[3]) for e in events) == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert source.stats.records == 4
    # an offset window that ends inside the aborted records is done as well
    with ReplaySource(kafka, registry.url, [topic], offsets={(topic, 0): (1, 5)},
                      timeout=20) as source:
        assert [(e[2], e[3]) for batch in source.batches() for e in batch
                if e[2] == 0] == [(0, 1), (0, 2)]


def test_the_topology_replay_copies_the_same_records_through_the_same_reader(
        kafka, registry, namespace):
    transactional_topic(kafka, registry.url, namespace)
    target = Namespace(f"replay-t{uuid.uuid4().hex[:8]}")
    with Republisher(kafka, ReplayRequest(namespace, target, ("md.l2",)), timeout=20) as copy:
        copy.prepare(registry.url)
        began = time.monotonic()
        stats = copy.run()
    assert time.monotonic() - began < 15, "waited for offsets that never come"
    assert stats.records == 4 and stats.per_topic == {"md.l2": 4}
    with ReplaySource(kafka, registry.url, [target.topic("md.l2")]) as copied:
        assert sorted((e[2], e[5]["sequence"]) for batch in copied.batches()
                      for e in batch) == [(0, 0), (0, 1), (0, 2), (1, 5)]
