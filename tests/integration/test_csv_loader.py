"""The historical OHLCV loader: parsing and validation alone, then publishing to a real broker: the
tests that need Kafka (those that do not: tests/unit/producers/test_csv_loader.py)."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer, TopicPartition

from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Decoder
from pipeline.core.errors import PipelineError
from producers.csv_bars import (
    load_csv_bars,
)
from tests.unit.producers.test_csv_loader import (  # noqa: F401 - shared with the unit tests
    BAD,
    BAD_GOOD,
    BAD_PROBLEMS,
    EXPONENT_ROWS,
    HOUR,
    REAL,
    REAL_ROWS,
    check_real_bars,
    file_rows,
    ms,
    ohlcv,
    write,
)


def consume(bootstrap: str, topic: str, expect: int, timeout: float = 60.0) -> list:
    """Every record of ``topic`` as (partition, offset, key, Kafka timestamp, value)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4()}",
                         "enable.auto.commit": False})
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
    records = []
    deadline = time.monotonic() + timeout
    try:
        while len(records) < expect and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                assert msg.error() is None, msg.error()
                records.append((msg.partition(), msg.offset(), msg.key(),
                                msg.timestamp()[1], msg.value()))
        time.sleep(1)  # anything beyond the expected records would be a bug: catch it
        records.extend((m.partition(), m.offset(), m.key(), m.timestamp()[1], m.value())
                       for m in consumer.consume(1000, 1) if m.error() is None)
        return records
    finally:
        consumer.close()


@pytest.mark.broker
def test_the_real_file_loads_into_the_bars_topic_in_time_order(shared_data, kafka, registry,
                                                               namespace):
    report = load_csv_bars(shared_data / REAL, kafka, registry.url, namespace)
    topic = namespace.topic("bars")
    assert (report.topic, report.rows_read, report.published) == (topic, REAL_ROWS, REAL_ROWS)
    assert list(report.problems) == [] and report.skipped == 0
    assert (report.first_start_ms, report.last_start_ms) == (ms("2015-10-08 15:00"),
                                                             ms("2019-07-08 00:00"))

    records = consume(kafka, topic, expect=report.published)
    assert len(records) == report.published
    assert {partition for partition, *_ in records} == {records[0][0]}  # one key, one partition
    assert [offset for _, offset, *_ in records] == list(range(len(records)))
    assert {key for _, _, key, _, _ in records} == {b"BTCUSD"}
    decode = Decoder(SchemaRegistry(registry.url))
    bars = [decode(value) for *_, value in records]
    assert [stamp for _, _, _, stamp, _ in records] == [bar["start_ms"] for bar in bars]
    check_real_bars(bars, shared_data / REAL)


@pytest.mark.broker
def test_bad_rows_are_never_published(tmp_path, kafka, registry, namespace):
    report = load_csv_bars(write(tmp_path / "bad.csv", BAD), kafka, registry.url, namespace,
                           progress=True)
    assert (report.rows_read, report.published, report.skipped) == (19, 8, 11)
    assert list(report.problems) == BAD_PROBLEMS
    records = consume(kafka, namespace.topic("bars"), expect=7, timeout=30)
    decode = Decoder(SchemaRegistry(registry.url))
    bars = [decode(value) for *_, value in records]
    assert [ohlcv(bar) for bar in bars] == [(ms(when), *rest) for when, *rest in BAD_GOOD]
    assert [(key, stamp) for _, _, key, stamp, _ in records] == [
        (b"BTCUSD", ms(when)) for when, *_ in BAD_GOOD]
    assert {bar["source"] for bar in bars} == {"bad.csv"}


@pytest.mark.broker
def test_loading_again_publishes_only_what_is_new_and_refuses_a_different_history(
        tmp_path, kafka, registry, namespace):
    header = "Date,Symbol,Open,High,Low,Close,Volume\n"
    rows = [f"2019-07-08 {h:02d}:00:00,BTCUSD,100,101,99,100,{h + 1}\n" for h in range(6)]
    first = write(tmp_path / "first.csv", header + "".join(reversed(rows[:4])))
    assert load_csv_bars(first, kafka, registry.url, namespace).published == 4
    again = load_csv_bars(first, kafka, registry.url, namespace)
    assert (again.published, again.already) == (0, 4)
    more = write(tmp_path / "more.csv", header + "".join(reversed(rows)))
    extended = load_csv_bars(more, kafka, registry.url, namespace)
    assert (extended.published, extended.already) == (2, 4)
    other = write(tmp_path / "other.csv", header + rows[0] + rows[1].replace(",100,2", ",100,9"))
    with pytest.raises(PipelineError, match=r"already holds a different 1h BTCUSD bar at "
                                            r"2019-07-08 01:00:00 UTC \(volume 2 there, 9"):
        load_csv_bars(other, kafka, registry.url, namespace)
    older = write(tmp_path / "older.csv", header + "2019-07-07 23:00:00,BTCUSD,1,1,1,1,1\n"
                  + rows[0])
    with pytest.raises(PipelineError, match="out of time order"):
        load_csv_bars(older, kafka, registry.url, namespace, interval="1h")
    records = consume(kafka, namespace.topic("bars"), expect=6, timeout=30)
    decode = Decoder(SchemaRegistry(registry.url))
    assert [(decode(v)["start_ms"], decode(v)["volume"]) for *_, v in records] == [
        (ms(f"2019-07-08 {h:02d}:00"), str(h + 1)) for h in range(6)]


