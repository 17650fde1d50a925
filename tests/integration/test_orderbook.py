"""The L2 book and the orderbook group, against the real capture and a real broker: the tests that
need Kafka (those that do not: tests/unit/market/test_orderbook.py)."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from consumers.orderbook import OrderbookSettings, group_config
from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import HEADER, Decoder, Encoder
from pipeline.gemini.capture import received_frames
from pipeline.gemini.marketdata import V2Normalizer
from pipeline.kafka.catalog import ensure_topics
from pipeline.kafka.clients import ReliableProducer
from pipeline.kafka.deadletter import STAGE_DECODE, STAGE_HANDLE, parse_dead_letter
from pipeline.market.orderbook import L2Book
from pipeline.ops.settings import REPO_ROOT
from pipeline.runtime.runner import GroupRunner
from pipeline.venue.market import generated_events
from tests.support.books import follow_capture
from tests.support.kafka_io import committed, read_all
from tests.support.waiting import wait_for
from tests.unit.market.test_orderbook import ch  # noqa: F401 - shared with the unit tests

CAPTURE = "gemini_v2_l2_capture_2021-06-24.txt"


def publish_capture(kafka: str, registry_url: str, topic: str, capture: Path) -> list[dict]:
    encode = Encoder(SchemaRegistry(registry_url), topic)
    producer = ReliableProducer(kafka)
    normalizer, records = V2Normalizer("capture"), []
    for frame in received_frames(capture):
        for out in normalizer.normalize_text(frame.text, frame.received_us):
            if out.topic == "md.l2":
                producer.produce(topic, encode(out.value), out.key)
                records.append(out.value)
    producer.flush()
    return records


@pytest.mark.broker
def test_books_from_kafka_equal_books_from_the_raw_capture_after_every_frame(
        kafka, registry, namespace, shared_data):
    ensure_topics(kafka, namespace, ["md.l2", "book.snapshots", "book.health",
                                     "book.checkpoints", "dlq"])
    topic = namespace.topic("md.l2")
    publish_capture(kafka, registry.url, topic, shared_data / CAPTURE)
    decode = Decoder(SchemaRegistry(registry.url))
    from_kafka = [decode(r.value) for r in read_all(kafka, topic, expect=655)]
    per_symbol: dict[str, list[dict]] = {}
    for record in sorted(from_kafka, key=lambda r: r["sequence"]):
        per_symbol.setdefault(record["symbol"], []).append(record)
    raw_per_symbol: dict[str, list[dict]] = {}
    for frame in received_frames(shared_data / CAPTURE):
        data = json.loads(frame.text)
        if data["type"] == "l2_updates":
            raw_per_symbol.setdefault(data["symbol"], []).append(data)
    assert sorted(per_symbol) == sorted(raw_per_symbol)
    compared = 0
    for symbol, records in per_symbol.items():
        follow_capture(symbol, records, raw_per_symbol[symbol])
        compared += len(records)
    assert compared == 655

    # The group publishes the same books: its last snapshot per symbol is their top 10.
    stats = GroupRunner(group_config(kafka, registry.url, namespace), kafka).run(
        max_records=655, idle_timeout_s=15)
    assert stats.records == 655 and stats.dead_letters == 0
    latest = {}
    for r in read_all(kafka, namespace.topic("book.snapshots")):
        value = decode(r.value)
        if value["source_offset"] >= latest.get(value["symbol"], {}).get("source_offset", -1):
            latest[value["symbol"]] = value
    for symbol, records in per_symbol.items():
        book = L2Book(symbol)
        for record in records:
            book.apply_snapshot(record["changes"]) if record["snapshot"] else \
                book.apply(record["changes"])
        bids, asks = book.depth(10)
        assert [(lvl["price"], lvl["quantity"]) for lvl in latest[symbol]["bids"]] == bids
        assert [(lvl["price"], lvl["quantity"]) for lvl in latest[symbol]["asks"]] == asks


def l2(symbol: str, snapshot: bool, changes: list[dict], sequence: int) -> dict:
    return {"symbol": symbol, "snapshot": snapshot, "changes": changes, "exchange_ts_ms": None,
            "received_ts_us": 1_700_000_000_000_000 + sequence, "connection_id": "c",
            "sequence": sequence, "event_id": None}


@pytest.mark.broker
def test_crossed_books_and_changes_before_a_snapshot_are_health_events(kafka, registry,
                                                                       namespace):
    ensure_topics(kafka, namespace, ["md.l2", "book.snapshots", "book.health",
                                     "book.checkpoints", "dlq"])
    topic = namespace.topic("md.l2")
    encode = Encoder(SchemaRegistry(registry.url), topic)
    records = [l2("BTCUSD", False, [ch("BID", "10", "1")], 0),      # before any snapshot
               l2("BTCUSD", False, [ch("BID", "10", "2")], 1),      # reported once only
               l2("BTCUSD", True, [ch("BID", "10", "1"), ch("ASK", "11", "1")], 2),
               l2("BTCUSD", False, [ch("BID", "12", "1")], 3),      # crosses: book dropped
               l2("BTCUSD", False, [ch("ASK", "13", "1")], 4),      # waits for a snapshot
               l2("BTCUSD", True, [ch("BID", "10", "5"), ch("ASK", "11", "5")], 5),
               l2("BTCUSD", True, [ch("BID", "9", "5"), ch("ASK", "11", "5")], 6)]  # resnapshot
    producer = ReliableProducer(kafka)
    for record in records:
        producer.produce(topic, encode(record), "BTCUSD")
    producer.flush()
    GroupRunner(group_config(kafka, registry.url, namespace), kafka).run(max_records=7,
                                                                         idle_timeout_s=15)
    decode = Decoder(SchemaRegistry(registry.url))
    health = [decode(r.value) for r in read_all(kafka, namespace.topic("book.health"), expect=3)]
    # After the crossed book the change at offset 4 is ignored without a second report:
    # the CROSSED event already says the book waits for a snapshot.
    assert [(h["kind"], h["source_offset"]) for h in health] == [
        ("CHANGE_BEFORE_SNAPSHOT", 0), ("CROSSED", 3), ("RESNAPSHOT", 6)]
    assert "waiting for the next snapshot" in health[1]["detail"]
    assert health[1]["best_bid"] == "12" and health[1]["best_ask"] == "11"
    snapshots = [decode(r.value) for r in read_all(kafka, namespace.topic("book.snapshots"))]
    last = max(snapshots, key=lambda s: s["source_offset"])
    assert (last["bids"], last["asks"]) == ([{"price": "9", "quantity": "5"}],
                                            [{"price": "11", "quantity": "5"}])


@pytest.mark.broker
def test_bad_records_are_dead_lettered_and_the_group_goes_on(kafka, registry, namespace):
    ensure_topics(kafka, namespace, ["md.l2", "book.snapshots", "book.health",
                                     "book.checkpoints", "dlq"])
    topic = namespace.topic("md.l2")
    reg = SchemaRegistry(registry.url)
    encode = Encoder(reg, topic)
    from pipeline.avro import schemas
    future = schemas.load("L2Update")  # a newer writer, with a side this group does not know
    future["fields"][2]["type"]["items"]["fields"][0]["type"]["symbols"].append("MID")
    future_encode = Encoder(reg, topic, future)
    good = encode(l2("ETHUSD", True, [ch("BID", "10", "1"), ch("ASK", "11", "1")], 0))
    negative = encode(l2("ETHUSD", False, [ch("BID", "10", "-1")], 1))
    unknown_id = HEADER.pack(0, 999_999) + good[5:]
    unknown_side = future_encode(l2("ETHUSD", False, [ch("MID", "10.5", "1")], 4))
    producer = ReliableProducer(kafka)
    for value in (good, negative, unknown_id, b"not avro", unknown_side,
                  encode(l2("ETHUSD", False, [ch("ASK", "11", "7")], 5))):
        producer.produce(topic, value, "ETHUSD")
    producer.flush()
    stats = GroupRunner(group_config(kafka, registry.url, namespace), kafka).run(
        max_records=6, idle_timeout_s=15)
    assert stats.records == 6 and stats.dead_letters == 4
    letters = sorted((parse_dead_letter(d.key, d.value, list(d.headers))
                      for d in read_all(kafka, namespace.topic("dlq"), expect=4)),
                     key=lambda d: d.source_offset)
    assert [(d.source_offset, d.stage) for d in letters] == [
        (1, STAGE_HANDLE), (2, STAGE_DECODE), (3, STAGE_DECODE), (4, STAGE_DECODE)]
    assert "negative quantity" in letters[0].error_message
    assert "MID" in letters[3].error_message
    decode = Decoder(reg)
    snapshots = [decode(r.value) for r in read_all(kafka, namespace.topic("book.snapshots"))]
    last = max(snapshots, key=lambda s: s["source_offset"])
    assert last["source_offset"] == 5 and last["asks"] == [{"price": "11", "quantity": "7"}]


def generated_records(n: int) -> list[dict]:
    out = []
    for i, event in enumerate(itertools.islice(
            generated_events(["BTCUSD", "ETHUSD", "SOLUSD", "ETHBTC"], seed=21), n)):
        out.append(l2(event.symbol, event.snapshot,
                      [ch("BID" if s == "buy" else "ASK", p, q) for s, p, q in event.changes], i))
    return out


def final_checkpoints(kafka: str, registry_url: str, namespace) -> dict[str, dict]:
    decode = Decoder(SchemaRegistry(registry_url))
    latest: dict[str, dict] = {}
    for r in read_all(kafka, namespace.topic("book.checkpoints")):
        value = decode(r.value)
        latest[value["symbol"]] = value
    return {s: {"bids": v["bids"], "asks": v["asks"], "offset": v["source_offset"]}
            for s, v in latest.items()}


@pytest.mark.broker
def test_killed_and_restarted_the_group_resumes_from_checkpoints(kafka, registry, tmp_path):
    from pipeline.kafka.catalog import Namespace

    records = generated_records(60_000)
    names = ["md.l2", "book.snapshots", "book.health", "book.checkpoints", "dlq"]
    crash, calm = (Namespace(f"sim-ob{time.monotonic_ns() % 10**9}{x}") for x in "ab")
    for ns in (crash, calm):
        ensure_topics(kafka, ns, names)
        encode = Encoder(SchemaRegistry(registry.url), ns.topic("md.l2"))
        producer = ReliableProducer(kafka)
        for record in records:
            producer.produce(ns.topic("md.l2"), encode(record), record["symbol"])
        producer.flush()
    total = len(records)

    def group_process(log_name: str) -> subprocess.Popen:
        log = open(tmp_path / log_name, "w")
        return subprocess.Popen(
            [sys.executable, "-m", "consumers.orderbook", "--bootstrap", kafka, "--registry",
             registry.url, "--namespace", str(crash), "--checkpoint-interval", "0.3"],
            cwd=REPO_ROOT, stderr=log, stdout=log)

    def done() -> int:
        return sum(max(o, 0) for o in committed(kafka, f"{crash}.orderbook",
                                                crash.topic("md.l2")).values())

    first = group_process("first.log")
    try:
        wait_for(lambda: done() >= total // 4, 90, "a quarter committed at checkpoints")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    resumed_at = done()
    assert 0 < resumed_at < total, "killed mid-stream"
    second = group_process("second.log")
    try:
        wait_for(lambda: done() == total, 120, "the restarted group to finish")
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    log = (tmp_path / "second.log").read_text()
    restored = int(log.split("restored ")[1].split(" book(s)")[0])
    assert 1 <= restored <= 4
    # It read only what came after the checkpoints, not the topic from the start.
    reread = json.loads(log.split("orderbook stopped: GroupStats(records=")[1].split(",")[0]) \
        if "orderbook stopped" in log else None
    assert reread == total - resumed_at

    calm_stats = GroupRunner(group_config(kafka, registry.url, calm,
                                        OrderbookSettings(checkpoint_interval_s=0.3)), kafka).run(
        max_records=total, idle_timeout_s=20)
    assert calm_stats.records == total
    crashed, uninterrupted = (final_checkpoints(kafka, registry.url, ns) for ns in (crash, calm))
    assert crashed == uninterrupted and len(crashed) == 4


