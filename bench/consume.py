"""Consume + decode of the book-change topic, next to consuming it without decoding.

``events`` L2Update records (bench.serde's: the real capture repeated, else synthetic) are
encoded with :class:`pipeline.avro.serde.Encoder` and produced keyed by symbol to a fresh
``md.l2`` topic (6 partitions), as the producer writes them. Then one consumer reads the
whole topic, timed from its first record to its last:

* with :class:`pipeline.avro.serde.Decoder` as replays and groups run it (the C decoder of
  :mod:`pipeline.avro.codec`), and with its fastavro path (``compiled=False``);
* with no decoding at all (confluent-kafka, the same loop): what Kafka alone costs here;
* with Apache Kafka's own ``kafka-consumer-perf-test`` (``ConsumerPerformance``, Java),
  its ``fetch.nMsg.sec`` (records over the time after the group join).

Ours are the best of three runs; the Java tool's the best of two (each a new JVM).
"""

from __future__ import annotations

import subprocess
import time
import uuid
from typing import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from bench.figures import Figure, runs
from bench.serde import book_changes
from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Decoder, publish
from pipeline.backtest.run import gc_tuned
from pipeline.core.errors import PipelineError
from pipeline.kafka.catalog import Namespace, ensure_topics
from pipeline.kafka.clients import consumer_config
from pipeline.ops.broker import java_command, kafka_libs

PERF_TOOL = "org.apache.kafka.tools.ConsumerPerformance"


def fresh_l2_topic(bootstrap: str, label: str) -> str:
    """A new, empty ``md.l2`` topic (6 partitions) in a namespace of its own."""
    namespace = Namespace(f"sim-bench{label}{int(time.time() * 1000) % 10**9}")
    ensure_topics(bootstrap, namespace, ["md.l2"])
    return namespace.topic("md.l2")


def produce_l2(bootstrap: str, registry_url: str, records: list[dict], label: str) -> str:
    """A fresh ``md.l2`` topic holding ``records``, encoded and keyed as the producer does."""
    topic = fresh_l2_topic(bootstrap, label)
    publish(bootstrap, registry_url, topic, records)
    return topic


def consume_rate(bootstrap: str, topic: str, n: int,
                 decode: Callable[[bytes], object] | None) -> float:
    """Records/s of one consumer reading ``n`` records of ``topic`` from the start, from its
    first record to its last, decoding each value with ``decode`` (None: not at all)."""
    consumer = Consumer(consumer_config(bootstrap, f"bench-{uuid.uuid4()}"))
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        seen, start, idle = 0, 0.0, time.monotonic()
        with gc_tuned():
            while seen < n:
                msgs = consumer.consume(min(10_000, n - seen), 0.5)
                if not msgs:
                    if time.monotonic() - idle > 30:
                        raise PipelineError(f"bench: {topic} stalled at {seen} of {n} records")
                    continue
                if not seen:
                    start = time.perf_counter()
                for msg in msgs:
                    if msg.error() is None:
                        if decode is not None:
                            decode(msg.value())
                        seen += 1
                idle = time.monotonic()
        return n / (time.perf_counter() - start)
    finally:
        consumer.close()


def perf_test_rate(bootstrap: str, topic: str, n: int) -> float:
    """``fetch.nMsg.sec`` of Kafka's ConsumerPerformance reading ``n`` records of ``topic``."""
    cmd = java_command(kafka_libs(), PERF_TOOL, "--bootstrap-server", bootstrap,
                       "--topic", topic, "--messages", str(n), "--timeout", "30000",
                       "--group", f"bench-perf-{uuid.uuid4()}", heap="-Xmx512m")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    lines = [line for line in done.stdout.splitlines() if "," in line]
    if done.returncode != 0 or len(lines) < 2:
        raise PipelineError(f"{PERF_TOOL} failed: {(done.stderr or done.stdout).strip()[-300:]}")
    row = dict(zip((c.strip() for c in lines[0].split(",")),
                   (v.strip() for v in lines[-1].split(","))))
    if int(row["data.consumed.in.nMsg"]) != n:
        raise PipelineError(f"{PERF_TOOL} read {row['data.consumed.in.nMsg']} of {n} records")
    return float(row["fetch.nMsg.sec"])


def run(bootstrap: str, registry_url: str, events: int) -> list[Figure]:
    topic = produce_l2(bootstrap, registry_url, book_changes(events), "consume")
    fast = Decoder(SchemaRegistry(registry_url))
    plain = Decoder(SchemaRegistry(registry_url), compiled=False)

    def best(decode, repeats: int = 3) -> float:
        consume_rate(bootstrap, topic, min(events, 1000), decode)  # warm-up: schema, reader
        return max(consume_rate(bootstrap, topic, events, decode) for _ in range(runs(repeats)))

    raw = best(None)
    ours, fastavro = best(fast), best(plain)
    java = max(perf_test_rate(bootstrap, topic, events) for _ in range(2))
    name = "consume + decode L2Update"
    return [
        Figure(f"{name} (C decoder, as replays and groups)", ours, "records/s", events,
               "raw consume, no decode (confluent-kafka)", raw, ""),
        Figure(f"{name} (C decoder), vs Kafka's tool", ours, "records/s",
               events, "kafka-consumer-perf-test (Java, fetch.nMsg.sec)", java, ""),
        Figure(f"{name} (fastavro path)", fastavro, "records/s", events,
               "raw consume, no decode (confluent-kafka)", raw, ""),
    ]
