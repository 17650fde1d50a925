"""The bars consumer group as a real process against the real broker and registry: bars in
the topic and in Parquet, bad input dead-lettered, and exactly once across kill -9."""

from __future__ import annotations

import random
import re
import time
from collections import Counter

import pandas as pd
import pytest

from pipeline.kafka.deadletter import STAGE_DECODE, STAGE_HANDLE, parse_dead_letter
from pipeline.market.bars import INTERVALS_MS, Bar, BarBuilder, BarSettings, Emitted
from pipeline.sinks.bars import read_all_bars, read_bars
from tests.support.bars_group import (
    BarsProcess,
    generated_trades,
    produce_trades,
    read_records,
    trade,
)
from tests.support.kafka_io import committed, produce_raw, read_all
from tests.support.waiting import wait_for

pytestmark = pytest.mark.broker

START = 1_624_492_800_000  # 2021-06-24 00:00 UTC
SYMBOLS = ["BTCUSD", "ETHUSD", "SOLUSD", "LTCUSD"]


def closed_by_event_time(trades: list[dict], lateness_ms: int) -> tuple[list[Bar], list[dict]]:
    """What the group must have closed: event time alone (the trades end with a jump)."""
    builder = BarBuilder(BarSettings(lateness_ms=lateness_ms), clock=lambda: 0)
    out = Emitted()
    for t in trades:
        builder.add(t, out)
    return out.bars, out.late


def ordered(bars: list[Bar]) -> list[Bar]:
    return sorted(bars, key=lambda b: (b.symbol, INTERVALS_MS[b.interval], b.start_ms))


def caught_up(kafka: str, group: str, topic: str, ends: int) -> bool:
    # Exact: the trades end with a jump of two days, so no bar closes by the wall clock
    # after the last batch (which would commit N - 1, see consumers/bars.py).
    return sum(max(o, 0) for o in committed(kafka, group, topic).values()) >= ends


def run_until_caught_up(proc: BarsProcess, kafka: str, group: str, topic: str, ends: int,
                        timeout: float = 60) -> dict:
    """Wait until the group committed every trade, then SIGTERM it (it writes the Parquet
    that is still due on its way out) and return its stats."""
    wait_for(lambda: caught_up(kafka, group, topic, ends), timeout, f"{group} to catch up")
    return proc.stop()


@pytest.fixture
def bar_topics(topics):
    return topics("md.trades", "bars", "bars.late", "dlq")


def test_bars_reach_the_topic_and_parquet_readable_everywhere(kafka, registry, namespace,
                                                              bar_topics, tmp_path):
    trades = generated_trades(3_000, SYMBOLS[:2], START, hours=3, late_every=400)
    produce_trades(kafka, registry.url, bar_topics["md.trades"], trades)
    expected, late = closed_by_event_time(trades, 5_000)
    root = tmp_path / "parquet"
    proc = BarsProcess(kafka, registry.url, str(namespace), tmp_path, "--parquet-root", str(root),
                       "--group-id", "bars-a")
    try:
        stats = run_until_caught_up(proc, kafka, "bars-a", bar_topics["md.trades"], len(trades))
    finally:
        proc.ensure_dead()
    assert stats["records"] == len(trades) and stats["dead_letters"] == 0
    assert ordered(read_all_bars(root)) == ordered(expected)
    published = [Bar.from_record(r) for r in read_records(kafka, registry.url, bar_topics["bars"])]
    assert ordered(published) == ordered(expected)
    late_ids = [r["trade_id"] for r in read_records(kafka, registry.url, bar_topics["bars.late"])]
    assert late and sorted(late_ids) == sorted(t["trade_id"] for t in late)

    # pandas reads the whole dataset as it is, partitions as columns.
    everything = pd.read_parquet(root)
    assert len(everything) == len(expected)
    assert Counter(zip(everything.symbol.astype(str), everything.interval.astype(str))) == \
        Counter((b.symbol, b.interval) for b in expected)
    # read_bars: one symbol and interval, indexed by start time (UTC), exact decimals.
    frame = read_bars(root, "BTCUSD", "1m", "2021-06-24 01:00", "2021-06-24 02:00")
    want = sorted((b for b in expected if b.symbol == "BTCUSD" and b.interval == "1m"
                   and START + 3_600_000 <= b.start_ms < START + 7_200_000),
                  key=lambda b: b.start_ms)
    assert str(frame.index.tz) == "UTC" and len(frame) == len(want) > 30
    assert list(frame.index.as_unit("ms").asi8) == [b.start_ms for b in want]
    assert list(frame.close) == [b.close for b in want]
    assert list(frame.vwap) == [b.vwap for b in want]

    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(f"select symbol, interval, count(*), sum(volume) from read_parquet("
                      f"'{root}/**/*.parquet', hive_partitioning=true) group by all").fetchall()
    assert {(s, i): (n, v) for s, i, n, v in rows} == {
        key: (len(group), sum(b.volume for b in group))
        for key in {(b.symbol, b.interval) for b in expected}
        for group in [[b for b in expected if (b.symbol, b.interval) == key]]}
    polars = pytest.importorskip("polars")
    assert polars.scan_parquet(root).collect().height == len(expected)


def test_bad_trades_are_dead_lettered_and_the_group_goes_on(kafka, registry, namespace,
                                                            bar_topics, tmp_path):
    topic = bar_topics["md.trades"]
    good = [trade("BTCUSD", i, START + i * 1_000, "100", "1", "BUY") for i in range(1, 60)]
    produce_trades(kafka, registry.url, topic, good[:30])
    produce_trades(kafka, registry.url, topic, [
        trade("BTCUSD", 900, START + 31_000, "0", "1", "BUY"),  # price zero
        trade("BTCUSD", 901, START + 31_500, "100", "-2", "SELL")])  # negative quantity
    produce_raw(kafka, topic, [("BTCUSD", b"not avro at all"),
                               ("BTCUSD", b"\x00\x7f\xff\xff\x01\x02\x02")])  # unknown schema id
    produce_trades(kafka, registry.url, topic,
                   good[30:] + [trade("BTCUSD", 999, START + 3_600_000, "1", "1", "BUY")])
    proc = BarsProcess(kafka, registry.url, str(namespace), tmp_path, "--parquet-root",
                       str(tmp_path / "parquet"), "--group-id", "bars-bad")
    try:
        letters = wait_for(lambda: (found := read_all(kafka, bar_topics["dlq"])) and
                           len(found) >= 4 and found, 60, "4 dead letters")
        stats = run_until_caught_up(proc, kafka, "bars-bad", topic, 64)
    finally:
        proc.ensure_dead()
    parsed = sorted((parse_dead_letter(r.key, r.value, list(r.headers)) for r in letters),
                    key=lambda d: d.source_offset)
    assert [d.source_topic for d in parsed] == [topic] * 4
    assert [d.source_offset for d in parsed] == [30, 31, 32, 33]
    assert [d.stage for d in parsed] == [STAGE_HANDLE, STAGE_HANDLE, STAGE_DECODE, STAGE_DECODE]
    assert "price 0 is not positive" in parsed[0].error_message
    assert "quantity -2 is negative" in parsed[1].error_message
    assert "not the Confluent wire format" in parsed[2].error_message
    assert parsed[2].value == b"not avro at all" and parsed[3].owner == "bars-bad"
    assert stats["dead_letters"] == 4 and stats["records"] == 64
    bars = read_all_bars(tmp_path / "parquet")
    one = [b for b in bars if b.interval == "1m"]
    assert sum(b.trade_count for b in one) == 59  # every good trade, no bad one
    assert {b.low for b in one} == {100}


def test_a_quiet_symbol_gets_its_last_bar_from_the_wall_clock(kafka, registry, namespace,
                                                               bar_topics, tmp_path):
    # One trade half a second before its bar ends, then silence: no later trade ever
    # moves the symbol's event time, yet the bar closes once end + lateness has passed.
    end = START + 10 * 60_000
    produce_trades(kafka, registry.url, bar_topics["md.trades"],
                   [trade("ETHUSD", 1, end - 500, "2000.5", "0.25", "SELL")])
    proc = BarsProcess(kafka, registry.url, str(namespace), tmp_path, "--parquet-root",
                       str(tmp_path / "parquet"), "--group-id", "bars-quiet",
                       "--intervals", "1m,5m", "--lateness-ms", "1000")
    try:
        bars = wait_for(lambda: len(found := read_records(kafka, registry.url,
                                                          bar_topics["bars"])) >= 2 and found,
                        30, "the quiet symbol's bars")
        proc.stop()
    finally:
        proc.ensure_dead()
    # The trade's 1m bar and its 5m bar end at the same moment.
    assert [(b["interval"], b["start_ms"], b["close"], b["sell_volume"]) for b in bars] == [
        ("1m", end - 60_000, "2000.5", "0.25"), ("5m", end - 300_000, "2000.5", "0.25")]
    assert [b.start_ms for b in read_all_bars(tmp_path / "parquet")] == \
        [end - 60_000, end - 300_000]


def test_kill_9_at_random_points_loses_and_duplicates_nothing(kafka, registry, namespace,
                                                              topics, bar_topics, tmp_path):
    lateness = 30_000  # generous: a busy 2-core machine must never stall a replay this long
    trades = generated_trades(50_000, SYMBOLS, START, hours=4, late_every=997)
    produce_trades(kafka, registry.url, bar_topics["md.trades"], trades)
    expected, late = closed_by_event_time(trades, lateness)
    reference_ns = f"{namespace}-ref"
    from pipeline.kafka.catalog import Namespace, ensure_topics
    ensure_topics(kafka, Namespace(reference_ns), ["bars", "bars.late", "dlq"])
    common = ["--lateness-ms", str(lateness)]
    reference = BarsProcess(kafka, registry.url, str(namespace), tmp_path, *common,
                            "--group-id", "bars-ref", "--parquet-root", str(tmp_path / "ref"),
                            "--output-namespace", reference_ns, "--batch-size", "2000")
    crashed_args = [*common, "--group-id", "bars-crash", "--parquet-root",
                    str(tmp_path / "crash"), "--batch-size", "400"]
    # kill -9 five times: twice at a random moment, and once at each point of the protocol
    # where a crash leaves something to repair (tests/support/bars_crash.py).
    rng = random.Random(1234)
    deaths = [None, ("checkpoint", 4), ("committed", 2), ("parquet", 3), None]
    logs = []
    try:
        for crash_at in deaths:
            proc = BarsProcess(kafka, registry.url, str(namespace), tmp_path, *crashed_args,
                               crash_at=crash_at)
            if crash_at is None:
                wait_for(proc.assigned, 60, "the group to get its partitions")
                time.sleep(rng.uniform(0.1, 1.0))
                proc.kill()
            proc.wait_dead(60)
            assert proc.proc.returncode == -9, proc.log_text()[-2000:]
            logs.append(proc.log_text())
        proc = BarsProcess(kafka, registry.url, str(namespace), tmp_path, *crashed_args)
        run_until_caught_up(proc, kafka, "bars-crash", bar_topics["md.trades"], len(trades), 90)
        run_until_caught_up(reference, kafka, "bars-ref", bar_topics["md.trades"], len(trades))
    finally:
        reference.ensure_dead()
        proc.ensure_dead()
    # Each death was where it was meant to be, and the restart after it saw its traces.
    assert "was not committed; redoing" in logs[2]  # after the checkpoint death
    assert re.search(r"[1-9]\d* bars to write", logs[3])  # committed bars not in Parquet
    assert re.search(r"wrote \d+ committed bars to Parquet, [1-9]\d* were there", logs[4])

    crashed_parquet = ordered(read_all_bars(tmp_path / "crash"))
    assert crashed_parquet == ordered(read_all_bars(tmp_path / "ref"))  # row for row
    assert crashed_parquet == ordered(expected)  # and both are right
    keys = Counter((b.symbol, b.interval, b.start_ms) for b in crashed_parquet)
    assert max(keys.values()) == 1 and len(keys) == len(expected) > 1000

    published = [Bar.from_record(r) for r in read_records(kafka, registry.url, bar_topics["bars"])]
    assert Counter((b.symbol, b.interval, b.start_ms) for b in published) == keys  # each once
    assert ordered(published) == crashed_parquet
    late_ids = Counter(r["trade_id"]
                       for r in read_records(kafka, registry.url, bar_topics["bars.late"]))
    assert late_ids == Counter(t["trade_id"] for t in late) and len(late_ids) > 20
