"""Topology replay (`pipeline replay`, `pipeline up --replay-from`): the real capture through
the original path, then replayed into a replay namespace through the supervisor; books and
bars equal, orders flow; bad requests refused before anything is written; clean."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections import defaultdict

import pytest

from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Decoder
from pipeline.core.errors import PipelineError
from pipeline.kafka.catalog import Namespace, describe_topics, ensure_topics
from pipeline.kafka.clients import make_admin
from pipeline.market.bars import Bar, BarBuilder, BarSettings, Emitted, RecordClock
from pipeline.market.orderbook import L2Book
from pipeline.ops import topology
from pipeline.ops.services import free_port
from pipeline.ops.settings import REPO_ROOT
from pipeline.venue.server import RunningVenue, VenueConfig
from tests.support.bars_group import BarsProcess, read_records
from tests.support.kafka_io import produce_raw, read_all
from tests.support.processes import CAPTURE, CAPTURE_SYMBOLS, Producer, cli
from tests.support.processes import venue_status as status
from tests.support.waiting import wait_for

pytestmark = pytest.mark.broker
LATENESS_MS = 1_000  # 10s bars: the last bars close within ~15 s of wall time


def replay_namespace() -> Namespace:
    return Namespace(f"replay-t{uuid.uuid4().hex[:10]}")


TOPOLOGY = """
namespace = "{namespace}"
symbols = {symbols}
[source]
kind = "venue"
[infra]
metrics_port = {metrics_port}
web_port = 0

[[process]]
name = "orderbook"
run = "consumers.orderbook"
args = {{ depth = 10, checkpoint_interval = 1.0 }}

[[process]]
name = "bars"
run = "consumers.bars"
args = {{ intervals = "10s", lateness_ms = {lateness} }}

[[process]]
name = "strategy"
run = "consumers.strategy"
args = {{ strategy = "pipeline.strategy:MidQuoter", params = {{ symbol = "FILUSD", tick = "0.0001", requote_bps = 1 }}, inputs = "book.snapshots" }}

[[process]]
name = "execution"
run = "consumers.execution"
args = {{ mode = "paper" }}
"""  # noqa: E501 - TOML 1.0 inline tables (the strategy's args) cannot span lines


def latest_books(kafka: str, decode: Decoder, namespace: Namespace) -> dict[str, tuple]:
    """The newest snapshot per symbol: (bids, asks) as (price, quantity) pairs."""
    latest: dict[str, dict] = {}
    for r in read_all(kafka, namespace.topic("book.snapshots")):
        value = decode(r.value)
        if value["source_offset"] >= latest.get(value["symbol"], {}).get("source_offset", -1):
            latest[value["symbol"]] = value
    return {s: ([(lvl["price"], lvl["quantity"]) for lvl in v["bids"]],
                [(lvl["price"], lvl["quantity"]) for lvl in v["asks"]])
            for s, v in latest.items()}


def bars_by_series(kafka: str, registry_url: str, namespace: Namespace) -> dict[tuple, list[Bar]]:
    """Bars per (symbol, interval) in the order the topic holds them."""
    series: dict[tuple, list[Bar]] = defaultdict(list)
    for record in read_records(kafka, registry_url, namespace.topic("bars")):
        bar = Bar.from_record(record)
        series[(bar.symbol, bar.interval)].append(bar)
    return dict(series)


def test_a_replay_of_the_real_capture_gives_the_same_books_and_bars(kafka, registry, up_env,
                                                                    shared_data, tmp_path):
    env = up_env
    # The original run: venue -> producer -> Kafka, then the orderbook and bars groups.
    original = Namespace(f"sim-t{uuid.uuid4().hex[:10]}")
    ensure_topics(kafka, original)
    venue = RunningVenue(VenueConfig(capture=shared_data / CAPTURE, heartbeat_s=1.0))
    producer = Producer(kafka, registry.url, original, venue.ws_url, CAPTURE_SYMBOLS, tmp_path)
    try:
        wait_for(lambda: status(venue)["source_done"], 60, "the venue to replay the capture")
        l2 = read_all(kafka, original.topic("md.l2"), expect=655, timeout=60)
        trades = read_all(kafka, original.topic("md.trades"), expect=516, timeout=60)
    finally:
        code, _ = producer.stop()
        venue.stop()
    assert code == 0 and len(l2) == 655 and len(trades) == 516
    common = ["--bootstrap", kafka, "--registry", registry.url, "--namespace", str(original)]
    book_log = open(tmp_path / "orderbook.log", "w")
    books = subprocess.Popen([sys.executable, "-m", "consumers.orderbook", *common, "--depth", "10",
                              "--checkpoint-interval", "1"], cwd=REPO_ROOT, stderr=book_log)
    bars = BarsProcess(kafka, registry.url, str(original), tmp_path, "--intervals", "10s",
                       "--lateness-ms", str(LATENESS_MS), "--parquet-root",
                       str(tmp_path / "original-parquet"))

    # The replay: the same groups (plus strategy and paper execution) under the supervisor,
    # fed by `pipeline replay` at full speed instead of venue + producer.
    into = replay_namespace()
    path = tmp_path / "topology.toml"
    path.write_text(TOPOLOGY.format(namespace=original,
                                    symbols=str(CAPTURE_SYMBOLS).replace("'", '"'),
                                    metrics_port=free_port(), lateness=LATENESS_MS))
    try:
        started = cli("up", "--topology", str(path), "--replay-from", str(original), "-n",
                      str(into), env=env)
        assert started.returncode == 0, started.stderr + started.stdout
        assert "replay, namespace " + str(into) in started.stdout

        # Byte for byte: key, value, headers, partition and timestamp of every record.
        for name, n in (("md.l2", 655), ("md.trades", 516)):
            copied = read_all(kafka, into.topic(name), expect=n, timeout=60)
            source = read_all(kafka, original.topic(name))
            assert sorted((r.partition, r.offset, r.key, r.value, r.headers, r.timestamp)
                          for r in copied) == \
                sorted((r.partition, r.offset, r.key, r.value, r.headers, r.timestamp)
                       for r in source)

        # Books: every symbol's last snapshot is the top 10 of the whole stream, in both.
        decode = Decoder(SchemaRegistry(registry.url))
        per_symbol = defaultdict(list)
        for record in sorted(l2, key=lambda r: (r.partition, r.offset)):
            value = decode(record.value)
            per_symbol[value["symbol"]].append(value)
        expected_books = {}
        for symbol, records in per_symbol.items():
            book = L2Book(symbol)
            for value in records:
                book.apply_snapshot(value["changes"]) if value["snapshot"] else \
                    book.apply(value["changes"])
            expected_books[symbol] = tuple(map(list, book.depth(10)))
        assert len(expected_books) == len(CAPTURE_SYMBOLS)
        wait_for(lambda: latest_books(kafka, decode, original) == expected_books, 60,
                 "the original run's final books")
        wait_for(lambda: latest_books(kafka, decode, into) == expected_books, 60,
                 "the replay's final books")

        # Bars: every 10s bar of the capture, closed by event time or (the last ones) by the
        # clock, equal in content, count and order per symbol in both runs.
        builder = BarBuilder(BarSettings(intervals=("10s",), lateness_ms=LATENESS_MS),
                             clock=lambda: 0)
        out = Emitted()
        for record in sorted(trades, key=lambda r: (r.partition, r.offset)):
            builder.add(decode(record.value), out)
        builder.drain(out)
        expected = defaultdict(list)
        for bar in sorted(out.bars, key=lambda b: b.start_ms):
            expected[(bar.symbol, bar.interval)].append(bar)
        assert sum(map(len, expected.values())) > 20 and not out.late

        def complete(ns: Namespace):
            found = bars_by_series(kafka, registry.url, ns)
            return found if sum(map(len, found.values())) >= len(out.bars) else None

        original_bars = wait_for(lambda: complete(original), 120, "the original run's bars")
        replayed_bars = wait_for(lambda: complete(into), 60, "the replay's bars")
        assert replayed_bars == original_bars == dict(expected)

        # The strategy quotes on the replayed books; paper execution answers.
        events = wait_for(lambda: read_records(kafka, registry.url, into.topic("orders.events")),
                          60, "order events on the replay")
        assert {e["mode"] for e in events} == {"PAPER"}
        assert all(e["symbol"] == "FILUSD" for e in events)

        down = cli("down", env=env)
        assert down.returncode == 0, down.stderr
    finally:
        cli("down", env=env)
        books.terminate()
        bars.ensure_dead()
        books.wait(30)
        book_log.close()

    # One command removes the replay namespace: topics, groups, subjects, Parquet.
    parquet = tmp_path / "run" / "parquet" / str(into)
    assert parquet.is_dir()
    cleaned = cli("replay", "clean", str(into), env=env)
    assert cleaned.returncode == 0, cleaned.stderr
    assert "consumer group(s)" in cleaned.stdout
    admin = make_admin(kafka)
    wait_for(lambda: not [t for t in admin.list_topics(timeout=10).topics
                          if t.startswith(f"{into}.")], 30, "the replay's topics to go")
    groups = [g.group_id for g in admin.list_consumer_groups().result().valid]
    assert not [g for g in groups if g.startswith(f"{into}.")]
    assert f"{original}.orderbook" in groups  # the source namespace is untouched
    assert not [s for s in SchemaRegistry(registry.url).subjects() if s.startswith(f"{into}.")]
    assert not parquet.exists()
    assert len(read_all(kafka, original.topic("md.l2"))) == 655
    refused = cli("replay", "clean", str(original), env=env)
    assert refused.returncode == 1 and "is not a replay namespace" in refused.stderr


def test_bad_replays_fail_clearly_and_write_nothing(kafka, registry, up_env, namespace):
    env = up_env
    ensure_topics(kafka, namespace, ["md.l2", "md.trades"])
    produce_raw(kafka, namespace.topic("md.l2"), [("BTCUSD", b"\x00\x00\x00\x00\x01x")] * 3)
    into = replay_namespace()

    def refused(*args: str) -> str:
        result = cli("replay", "--from", str(namespace), "--no-progress", *args, env=env)
        assert result.returncode == 1, result.stdout + result.stderr
        assert not describe_topics(kafka, into), "a refused replay created topics"
        return " ".join(result.stderr.split())

    assert "nothing to replay" in refused("--into", str(into), "--start", "2001-01-01",
                                          "--end", "2001-01-02")
    assert "is empty" in refused("--into", str(into), "--topics", "md.trades")
    assert "do not exist" in refused("--into", str(into), "--topics", "md.l2,bars")
    assert "unknown topic 'md.quotes'" in refused("--into", str(into), "--topics", "md.quotes")
    assert "not a replay namespace" in refused("--into", f"sim-{uuid.uuid4().hex[:8]}")
    assert "not after start" in refused("--into", str(into), "--start", "2021-06-24T00:10",
                                        "--end", "2021-06-24T00:00")

    done = cli("replay", "--from", str(namespace), "--into", str(into), "--topics", "md.l2",
               "--no-progress", env=env)
    assert done.returncode == 0, done.stderr
    assert "copied 3 record(s) (md.l2 3)" in done.stdout
    again = cli("replay", "--from", str(namespace), "--into", str(into), "--topics", "md.l2",
                "--no-progress", env=env)
    assert again.returncode == 1 and "already holds 3 record(s)" in again.stderr
    assert len(read_all(kafka, into.topic("md.l2"))) == 3
    up = cli("up", "--topology", str(REPO_ROOT / "topology.demo.toml"), "--replay-from",
             str(namespace), "-n", f"sim-{uuid.uuid4().hex[:8]}", env=env)
    assert up.returncode == 1 and "not a replay namespace" in up.stderr
    assert cli("replay", "clean", str(into), env=env).returncode == 0


def test_on_replays_bars_close_by_record_time_and_after_the_replay_ends():
    wall = [1_000_000]
    clock = RecordClock(wall=lambda: wall[0])
    builder = BarBuilder(BarSettings(intervals=("1m",), lateness_ms=1_000), clock=clock)
    out = Emitted()

    def trade(tid: int, ts: int, stamp: int) -> None:
        clock.see(stamp)  # the group sees the record's Kafka timestamp first
        builder.add({"symbol": "BTCUSD", "trade_id": tid, "price": "1", "quantity": "1",
                     "taker_side": "BUY", "exchange_ts_ms": ts, "received_ts_us": ts * 1000,
                     "connection_id": "c", "sequence": tid, "from_snapshot": False}, out)

    start = 1_624_492_800_000
    trade(1, start + 10_000, start + 10_050)
    wall[0] += 4_000  # a busy machine stalls the replay: shorter than the idle rule, no effect
    builder.advance(out)
    # The original run's clock passed the bar's end + lateness before this (late) trade came.
    trade(2, start + 59_000, start + 61_500)
    trade(3, start + 59_500, start + 62_000)
    assert [b.trade_count for b in out.bars] == [1] and \
        [t["trade_id"] for t in out.late] == [2, 3]
    trade(4, start + 62_000, start + 62_050)
    builder.advance(out)
    assert len(out.bars) == 1  # at any replay speed: only record time moved
    wall[0] += 5_000 + 59_000  # the replay ended: the wall clock takes over after 5 s
    builder.advance(out)
    assert [b.start_ms for b in out.bars] == [start, start + 60_000]


@pytest.mark.parametrize("source,match", [
    ('kind = "replay"\nspeed = "max"', r"topology.toml:4: key 'source.kind': .*needs `from`"),
    ('kind = "replay"\nfrom = "sim"\nspeed = "fast"',
     r"topology.toml:6: key 'source.speed': speed 'fast': use max"),
    ('kind = "replay"\nfrom = "sim"\nstart = "June"',
     r"topology.toml:6: key 'source.start': start 'June' is not epoch ms or an ISO"),
    ('kind = "replay"\nfrom = "sim"\ntopics = ["md.quotes"]',
     r":6: key 'source.topics': unknown topic 'md.quotes'"),
    ('kind = "replay"\nfrom = "replay-x"',
     r":5: key 'source.from': a replay cannot read and write namespace replay-x"),
])
def test_a_bad_replay_source_names_the_line_and_the_key(tmp_path, source, match):
    path = tmp_path / "topology.toml"
    path.write_text(f'namespace = "replay-x"\nsymbols = ["BTCUSD"]\n[source]\n{source}\n')
    with pytest.raises(PipelineError, match=match):
        topology.load(path)
    path.write_text('namespace = "sim"\n[source]\nkind = "replay"\nfrom = "sim-a"\n')
    with pytest.raises(PipelineError, match=r":1: key 'namespace': sim is not a replay namespace"):
        topology.load(path)
    path.write_text('namespace = "replay-b"\n[source]\nkind = "replay"\nfrom = "sim-a"\n'
                    'speed = 10\nstart = "2021-06-24"\n')
    loaded = topology.load(path)
    assert (loaded.source.replay_from, loaded.source.speed, loaded.source.start) == \
        ("sim-a", 10.0, "2021-06-24")
