"""Ingest: generated Gemini frames -> parse -> normalize -> encode -> produce, on one core.

Baselines in the same run: ``json.loads`` of the same frames (the floor of any Python
parser), and a raw ``produce`` of the same number of pre-encoded records (the floor of the
Kafka client). Target: at least 50,000 frames/s.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager

from bench.figures import Figure
from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Serde
from pipeline.gemini.marketdata import V2Normalizer
from pipeline.kafka.catalog import Namespace, ensure_topics
from pipeline.kafka.clients import ReliableProducer
from pipeline.venue.market import generated_events, render_v2
from producers.gemini_ws import FeedStats, IngestSink

SYMBOLS = ["BTCUSD", "ETHUSD", "SOLUSD", "ETHBTC", "LTCUSD", "DOGEUSD"]


@contextmanager
def one_core():
    """Pin this process (and librdkafka's threads) to one core for the measurement."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def frames(events: int, seed: int = 11) -> list[str]:
    out: list[str] = []
    for event in generated_events(SYMBOLS, seed):
        out += render_v2(event)
        if len(out) >= events:
            return out[:events]
    return out


def run(bootstrap: str, registry_url: str, events: int) -> list[Figure]:
    start = time.perf_counter()
    texts = frames(events)
    generate_rate = len(texts) / (time.perf_counter() - start)
    namespace = Namespace(f"sim-bench{int(time.time())}")
    ensure_topics(bootstrap, namespace, ["raw.frames", "md.l2", "md.trades", "dlq"])
    serde = Serde(SchemaRegistry(registry_url))
    with one_core():
        start = time.perf_counter()
        for text in texts:
            json.loads(text)
        loads_rate = len(texts) / (time.perf_counter() - start)

        url = "ws://bench/v2/marketdata"
        warm = IngestSink(ReliableProducer(bootstrap), serde, namespace, FeedStats())
        warm_normalizer = V2Normalizer("warm-up")  # untimed: a just-started broker is cold
        for i, text in enumerate(texts[: max(len(texts) // 5, 1)]):
            warm.frame(text, 1_600_000_000_000_000 + i, warm_normalizer, url, i)
        warm.producer.flush()

        stats = FeedStats()
        producer = ReliableProducer(bootstrap)
        sink = IngestSink(producer, serde, namespace, stats)
        normalizer = V2Normalizer("bench")
        start = time.perf_counter()
        for i, text in enumerate(texts):
            sink.frame(text, 1_700_000_000_000_000 + i, normalizer, url, i)
        producer.flush()
        ours = time.perf_counter() - start

        payload = b"\x00" * 120  # about a raw-frame record's size
        records = len(texts) + stats.records
        raw_producer = ReliableProducer(bootstrap)
        topic = namespace.topic("md.trades")
        start = time.perf_counter()
        for i in range(records):
            raw_producer.produce(topic, payload, SYMBOLS[i % len(SYMBOLS)])
            if i % 1000 == 0:
                raw_producer.poll(0)
        raw_producer.flush()
        raw_rate = records / (time.perf_counter() - start)
    changes = sum(t.count('["') for t in texts if '"l2_updates"' in t)
    frame_rate = len(texts) / ours
    return [
        Figure("venue generator frames (generate + render v2)", generate_rate, "frames/s",
               len(texts), "json.loads of the same frames", loads_rate, ">= 100,000 frames/s"),
        Figure("ingest frames (parse+normalize+encode+produce, 1 core)", frame_rate, "frames/s",
               len(texts), "json.loads of the same frames", loads_rate, ">= 50,000 frames/s"),
        Figure("ingest changes (same run)", changes / ours, "changes/s", changes,
               "json.loads, in changes/s", loads_rate * changes / len(texts), ""),
        Figure("ingest Kafka records (raw + normalized)", records / ours, "records/s", records,
               "raw produce of pre-encoded bytes", raw_rate, ""),
    ]
