"""Scaling out by processes: ingest and consume of a 6-partition topic with 1, 2 and 4.

* **ingest**: ``events`` L2Update records (bench.serde's) encoded and produced, keyed by
  symbol, by 1, 2 or 4 producer processes, each a share of the records, into a fresh
  ``md.l2`` topic; records/s from the first process's start to the last one's flush.
* **consume**: the topic the single producer wrote, read and decoded (``serde.Decoder``,
  as the groups decode) by 1, 2 or 4 consumer processes subscribed in one consumer group.
  Each pauses its partitions until every member has some (the group is settled), then all
  start together; records/s from the first record consumed to the last, over all of them.

Every process is started with ``spawn`` and set up (imports, schema, connection) before the
clock starts. With 2 cores, 4 processes cannot beat 2: the figures show what happens.
Keys are the capture's 10 symbols: they hash to 4 of the 6 partitions, unequally (the run
prints how many records each holds), so a group's members do not get equal shares
(without the capture, bench.serde's synthetic records are all BTCUSD: one partition).
"""

from __future__ import annotations

import time
import uuid
from multiprocessing import get_context
from threading import BrokenBarrierError

from confluent_kafka import Consumer

from bench.consume import consume_rate as read_topic
from bench.consume import fresh_l2_topic
from bench.figures import Figure
from bench.serde import book_changes
from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Decoder, Encoder
from pipeline.backtest.run import gc_tuned
from pipeline.core.errors import PipelineError
from pipeline.kafka.catalog import describe_topics
from pipeline.kafka.clients import ReliableProducer, consumer_config

INSTANCES = (1, 2, 4)
PARTITIONS = 6
TIMEOUT_S = 120.0


def _produce(bootstrap: str, registry_url: str, topic: str, index: int, of: int, events: int,
             ready, times) -> None:
    try:
        records = book_changes(events)[index::of]
        encode = Encoder(SchemaRegistry(registry_url), topic)
        encode(records[0])  # registers the schema
        producer = ReliableProducer(bootstrap)
        producer.raw.list_topics(topic, timeout=10)  # connected, metadata known
    except BaseException:
        ready.abort()  # the others (and the parent) stop waiting
        raise
    ready.wait()
    start, cpu = time.monotonic(), time.process_time()
    for i, record in enumerate(records):
        producer.produce(topic, encode(record), key=record["symbol"])
        if i % 1000 == 0:
            producer.poll(0)
    producer.flush()
    times[4 * index:4 * index + 4] = [start, time.monotonic(), len(records),
                                      time.process_time() - cpu]


def _consume(bootstrap: str, registry_url: str, topic: str, group: str, index: int,
             events: int, sample: bytes, assigned, go, total, times) -> None:
    decode = Decoder(SchemaRegistry(registry_url))
    decode(sample)  # the schema is fetched before the clock starts

    def on_assign(consumer, partitions):
        if not go.is_set():  # hold them until the whole group has its share
            consumer.assign(partitions)
            consumer.pause(partitions)
        assigned[index] = len(partitions)

    def on_revoke(consumer, partitions):
        assigned[index] = 0

    consumer = Consumer(consumer_config(bootstrap, group))
    consumer.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke)
    try:
        while not go.is_set():
            consumer.poll(0.05)  # serves the group protocol; the partitions are paused
        consumer.resume(consumer.assignment())
        first = last = cpu = 0.0
        seen = 0
        deadline = time.monotonic() + TIMEOUT_S
        with gc_tuned():
            while total.value < events and time.monotonic() < deadline:
                msgs = consumer.consume(1000, 0.1)
                if not msgs:
                    continue
                if not first:
                    first, cpu = time.monotonic(), time.process_time()
                for msg in msgs:
                    if msg.error() is None:
                        decode(msg.value())
                last = time.monotonic()
                read = sum(1 for m in msgs if m.error() is None)
                seen += read
                with total.get_lock():
                    total.value += read
        times[4 * index:4 * index + 4] = [first, last, seen,
                                          time.process_time() - cpu if first else 0.0]
    finally:
        # Only once everything is read: a member leaving would hand its partitions, with
        # nothing committed, to another one that would read them again.
        consumer.close()


def _span(times, n: int, what: str) -> float:
    """Seconds from the first process's start to the last one's end; prints each one's
    share, time and CPU time (its threads included: librdkafka's too)."""
    starts = [times[4 * i] for i in range(n) if times[4 * i]]
    span = max(times[4 * i + 1] for i in range(n)) - min(starts)
    shares = ", ".join(f"{times[4 * i + 2]:.0f} in {times[4 * i + 1] - times[4 * i]:.2f}s "
                       f"(CPU {times[4 * i + 3]:.2f}s)" for i in range(n))
    print(f"bench scale: {n} {what}: {shares}; {span:.2f}s in all")
    return span


def ingest_rate(bootstrap: str, registry_url: str, topic: str, events: int, n: int) -> float:
    ctx = get_context("spawn")
    ready, times = ctx.Barrier(n + 1), ctx.Array("d", 4 * n)
    procs = [ctx.Process(target=_produce, args=(bootstrap, registry_url, topic, i, n, events,
                                               ready, times)) for i in range(n)]
    for p in procs:
        p.start()
    try:
        try:
            ready.wait(timeout=TIMEOUT_S)
        except BrokenBarrierError:
            raise PipelineError("bench scale: a producer process failed to start (see above)") \
                from None
        for p in procs:
            p.join(TIMEOUT_S)
        if any(p.exitcode != 0 for p in procs):
            raise PipelineError(f"bench scale: a producer process failed "
                                f"({[p.exitcode for p in procs]})")
        return events / _span(times, n, "producers")
    finally:
        _end(procs)


def consume_rate(bootstrap: str, registry_url: str, topic: str, events: int, n: int,
                 sample: bytes) -> float:
    ctx = get_context("spawn")
    assigned, go = ctx.Array("i", n), ctx.Event()
    total, times = ctx.Value("q", 0), ctx.Array("d", 4 * n)
    group = f"bench-scale-{uuid.uuid4()}"
    procs = [ctx.Process(target=_consume, args=(bootstrap, registry_url, topic, group, i,
                                               events, sample, assigned, go, total, times))
             for i in range(n)]
    for p in procs:
        p.start()
    try:
        settled_since, deadline = None, time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            share = list(assigned)
            if sum(share) == PARTITIONS and all(share):
                settled_since = settled_since or time.monotonic()
                if time.monotonic() - settled_since > 1.0:
                    break
            else:
                settled_since = None
            if any(p.exitcode not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
        else:
            raise PipelineError(f"bench scale: the group of {n} never settled ({list(assigned)})")
        go.set()
        for p in procs:
            p.join(TIMEOUT_S + 30)
        if any(p.exitcode != 0 for p in procs) or total.value != events:
            raise PipelineError(f"bench scale: {n} consumers read {total.value} of {events} "
                                f"records (exit codes {[p.exitcode for p in procs]})")
        return events / _span(times, n, "consumers")
    finally:
        _end(procs)


def _end(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)


def run(bootstrap: str, registry_url: str, events: int) -> list[Figure]:
    ingest, consume, first_topic = {}, {}, None
    for n in INSTANCES:
        topic = fresh_l2_topic(bootstrap, f"scale{n}p")
        ingest[n] = ingest_rate(bootstrap, registry_url, topic, events, n)
        first_topic = first_topic or topic
    fill = next(t.end_offsets for t in describe_topics(bootstrap) if t.name == first_topic)
    print(f"bench scale: records per partition (keyed by symbol): {list(fill)}")
    sample = Encoder(SchemaRegistry(registry_url), first_topic)(book_changes(1)[0])
    read_topic(bootstrap, first_topic, events, None)  # warm: the broker has served it once
    for n in INSTANCES:
        consume[n] = consume_rate(bootstrap, registry_url, first_topic, events, n, sample)
    figures = []
    for n in INSTANCES[1:]:
        figures.append(Figure(f"scale: ingest (encode + produce), {n} producer processes, "
                              f"{PARTITIONS} partitions", ingest[n], "records/s", events,
                              "1 producer process", ingest[1], ""))
    for n in INSTANCES[1:]:
        figures.append(Figure(f"scale: consume + decode, {n} consumer instances in one group, "
                              f"{PARTITIONS} partitions", consume[n], "records/s", events,
                              "1 consumer instance", consume[1], ""))
    return figures
