"""The archive group against the real broker and registry: the archive equals the topics,
also after kill -9 at each point of its protocol; backtests from the archive equal
backtests from Kafka, trade for trade; the archive commands."""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import pytest

from consumers.archive import group_config
from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Decoder, Encoder
from pipeline.backtest.config import BacktestConfig
from pipeline.backtest.run import run_backtest
from pipeline.core.cluster import Cluster
from pipeline.kafka.catalog import Namespace, ensure_topics
from pipeline.kafka.clients import ReliableProducer
from pipeline.replay import archive
from pipeline.runtime.runner import GroupRunner, read_to_end
from pipeline.strategy import FULL_EQUITY
from tests.support.bars_group import BarsProcess
from tests.support.kafka_io import committed
from tests.support.processes import cli, cluster_env
from tests.support.waiting import wait_for

CAPTURE = "gemini_v2_l2_capture_2021-06-24.txt"
ARCHIVED = ("md.l2", "md.trades")
MIDQUOTER = {"symbol": "FILUSD", "tick": "0.0001", "spread_bps": 10, "requote_bps": 5}


def publish_capture(kafka: str, registry_url: str, namespace: Namespace, path) -> dict[str, int]:
    """The real capture's records into ``md.l2``/``md.trades``, as the producer writes them."""
    from pipeline.gemini.capture import received_frames
    from pipeline.gemini.marketdata import V2Normalizer

    client = SchemaRegistry(registry_url)
    encoders = {name: Encoder(client, namespace.topic(name)) for name in ARCHIVED}
    producer = ReliableProducer(kafka)
    normalizer = V2Normalizer("c")
    counts = Counter()
    for frame in received_frames(path):
        for record in normalizer.normalize_text(frame.text, frame.received_us):
            producer.produce(namespace.topic(record.topic), encoders[record.topic](record.value),
                             key=record.key)
            counts[record.topic] += 1
    producer.flush()
    return dict(counts)


def topic_records(kafka: str, registry_url: str, topic: str) -> list[tuple[int, int, dict]]:
    decode = Decoder(SchemaRegistry(registry_url))
    found = [(m.partition(), m.offset(), decode(m.value())) for m in read_to_end(kafka, topic)]
    return sorted(found, key=lambda x: (x[0], x[1]))


def pipeline_cli(kafka: str, registry, *args: str, env: dict):
    return cli(*args, env=cluster_env(kafka, registry.url, COLUMNS="200", **env))


def texts(stats: dict) -> dict:
    return {k: str(v) for k, v in stats.items()}


def archived(root, topic: str) -> list[tuple[int, int, dict]]:
    return [(p, o, r) for p, o, _, r in archive.read_records(root, topic)]


@pytest.fixture
def capture_ns(kafka, registry, namespace, shared_data):
    ensure_topics(kafka, namespace, ["md.l2", "md.trades", "bars", "dlq"])
    counts = publish_capture(kafka, registry.url, namespace, shared_data / CAPTURE)
    assert counts == {"md.l2": 655, "md.trades": 516}
    return namespace


def archive_caught_up(kafka: str, group: str, namespace: Namespace) -> bool:
    """The group committed every record: the archive group commits only what is in files."""
    ends = {"md.l2": 655, "md.trades": 516}
    return all(sum(max(o, 0) for o in committed(kafka, group, namespace.topic(t)).values())
               >= n for t, n in ends.items())


def test_kill_9_at_each_protocol_point_leaves_the_archive_equal_to_the_topics(
        kafka, registry, capture_ns, tmp_path):
    root = tmp_path / "archive"
    group = f"{capture_ns}.archive-crash"
    args = ["--root", str(root), "--group-id", group, "--roll-records", "40",
            "--roll-seconds", "0.2", "--batch-size", "60"]
    deaths = [("staged", 2), ("journaled", 3), ("renamed", 2), ("done", 4), None]
    logs = []
    rng = random.Random(7)
    proc = None
    try:
        for crash_at in deaths:
            proc = BarsProcess(kafka, registry.url, str(capture_ns), tmp_path, *args,
                               crash_at=crash_at, program="consumers.archive",
                               crashing="tests.support.archive_crash")
            if crash_at is None:
                wait_for(lambda: " assigned " in proc.log_text(), 60, "its partitions")  # noqa: B023 - wait_for calls it at once
                time.sleep(rng.uniform(0.2, 0.8))
                proc.kill()
            proc.wait_dead(90)
            assert proc.proc.returncode == -9, proc.log_text()[-2000:]
            logs.append(proc.log_text())
        proc = BarsProcess(kafka, registry.url, str(capture_ns), tmp_path, *args,
                           program="consumers.archive")
        wait_for(lambda: archive_caught_up(kafka, group, capture_ns), 90, "the archive")
        stats = proc.stop()
    finally:
        if proc is not None:
            proc.ensure_dead()
    for (point, n), log in zip(deaths[:4], logs):
        assert f"dying at {point} #{n}" in log
    assert "resumes at offset" in logs[1]  # restarts found their journals
    assert stats["dead_letters"] == 0
    for name in ARCHIVED:
        topic = capture_ns.topic(name)
        kept = archived(root, name)
        assert kept == topic_records(kafka, registry.url, topic)  # each once, text and all
        assert len(Counter((p, o) for p, o, _ in kept)) == len(kept) > 500
    assert not list((root / ".staging").rglob("*.parquet"))


def test_a_backtest_from_the_archive_gives_the_same_trades_as_from_kafka(
        kafka, registry, capture_ns, tmp_path):
    root = tmp_path / "archive"
    config = group_config(kafka, registry.url, str(capture_ns), root=root, roll_seconds=3600)
    GroupRunner(config, kafka).run(idle_timeout_s=3)  # a stop flushes what waits
    assert sum(1 for _ in archive.read_records(root, "md.l2")) == 655
    cluster = Cluster(kafka, registry.url)
    kafka_config = BacktestConfig("pipeline.strategy:MidQuoter", capture_ns, MIDQUOTER,
                                  fill="book", cash="100000")
    archive_config = kafka_config.replace(source="archive", archive_root=root)
    from_kafka = run_backtest(kafka_config, cluster, out_dir=tmp_path / "kafka", progress=False)
    from_archive = run_backtest(archive_config, out_dir=tmp_path / "parquet", progress=False)
    assert from_kafka.engine.by_kind == from_archive.engine.by_kind == \
        {"l2": 655, "trade": 516} | {k: v for k, v in from_kafka.engine.by_kind.items()
                                     if k not in ("l2", "trade")}
    assert len(from_kafka.engine.trades) >= 2
    assert from_archive.trades_csv == from_kafka.trades_csv
    for name in ("trades.csv", "equity.csv"):
        assert ((tmp_path / "parquet" / name).read_bytes()
                == (tmp_path / "kafka" / name).read_bytes())
    assert texts(from_archive.stats) == texts(from_kafka.stats)  # NaN is not NaN
    # A time range means the same from both: Kafka record timestamps, per partition.
    stamps = sorted(s for _, _, s, _ in archive.read_records(root, "md.l2"))
    start, end = stamps[100], stamps[500]
    ranged = [run_backtest(kafka_config.replace(start=start, end=end), cluster, progress=False),
              run_backtest(archive_config.replace(start=start, end=end), progress=False)]
    assert ranged[0].engine.by_kind == ranged[1].engine.by_kind
    assert ranged[0].engine.events < from_kafka.engine.events
    assert ranged[0].trades_csv == ranged[1].trades_csv


def test_smacross_over_the_hourly_file_from_the_archive_equals_kafka(kafka, registry, namespace,
                                                                      shared_data, tmp_path):
    from producers.csv_bars import load_csv_bars

    ensure_topics(kafka, namespace, ["md.l2", "md.trades", "bars", "dlq"])
    loaded = load_csv_bars(shared_data / "BTCUSD_GEMINI_1h.csv", kafka, registry.url,
                           namespace).published
    root = tmp_path / "archive"
    GroupRunner(group_config(kafka, registry.url, str(namespace), root=root, roll_seconds=3600),
                kafka).run(idle_timeout_s=3)
    params = {"fast": 10, "slow": 20, "amount": None, "fraction": FULL_EQUITY}
    config = BacktestConfig("pipeline.strategy:SmaCross", namespace, params, cash="1000000",
                            commission="0.002")
    kafka_run = run_backtest(config, Cluster(kafka, registry.url), progress=False)
    archive_run = run_backtest(config.replace(source="archive", archive_root=root),
                               progress=False)
    assert archive_run.engine.events == kafka_run.engine.events == loaded == 32_842
    assert archive_run.trades_csv == kafka_run.trades_csv and len(kafka_run.engine.trades) > 500
    assert texts(archive_run.stats) == texts(kafka_run.stats)


def test_the_archive_commands_query_compact_and_backtest(kafka, registry, capture_ns, tmp_path):
    run_dir = tmp_path / "run"
    root = run_dir / "parquet" / str(capture_ns) / "archive"
    # Small batches, so each partition rolls several files per symbol and day whatever the
    # fetch sizes: compaction below has something to merge.
    GroupRunner(group_config(kafka, registry.url, str(capture_ns), run_dir=run_dir,
                           roll_records=50, batch_size=20), kafka).run(idle_timeout_s=3)
    env = {"PIPELINE_RUN_DIR": str(run_dir)}
    ns = ["-n", str(capture_ns)]
    done = pipeline_cli(kafka, registry, "archive", "query",
                        "SELECT symbol, count(*) AS n FROM trades GROUP BY symbol "
                        "ORDER BY n DESC, symbol LIMIT 3", *ns, env=env)
    assert done.returncode == 0, done.stderr
    lines = [line.split() for line in done.stdout.splitlines() if line.strip()]
    assert lines[0] == ["symbol", "n"] and len(lines) == 4
    counts = Counter(r["symbol"] for _, _, r in archived(root, "md.trades"))
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    assert [(s, int(n)) for s, n in lines[1:]] == top
    out = tmp_path / "spread.csv"
    done = pipeline_cli(kafka, registry, "archive", "query",
                        "SELECT symbol, side, count(*) AS levels FROM l2_changes "
                        "GROUP BY ALL ORDER BY ALL", *ns, "--csv", str(out), env=env)
    assert done.returncode == 0 and out.read_text().splitlines()[0] == '"symbol","side","levels"'
    bad = pipeline_cli(kafka, registry, "archive", "query", "SELECT nope FROM trades", *ns,
                       env=env)
    assert bad.returncode == 1 and "query failed" in bad.stderr and \
        'Referenced column "nope" not found' in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    listed = pipeline_cli(kafka, registry, "archive", "ls", *ns, env=env)
    assert "md.l2" in listed.stdout and "655" in listed.stdout and "516" in listed.stdout
    files_before = len(archive.data_files(root, "md.l2"))
    per_dir = Counter(f.parent for f in archive.data_files(root, "md.l2"))
    assert max(per_dir.values()) >= 2, per_dir
    before = archived(root, "md.l2")
    done = pipeline_cli(kafka, registry, "archive", "compact", *ns, env=env)
    assert done.returncode == 0 and "merged into" in done.stdout
    assert len(archive.data_files(root, "md.l2")) < files_before
    assert archived(root, "md.l2") == before
    done = pipeline_cli(kafka, registry, "backtest", "pipeline.strategy:MidQuoter", *ns,
                        "--fill", "book", "--cash", "100000", "--params", json.dumps(MIDQUOTER),
                        "--source", "archive", "--out", str(tmp_path / "bt"), "--no-progress",
                        env=env)
    assert done.returncode == 0, done.stderr
    direct = run_backtest(BacktestConfig("pipeline.strategy:MidQuoter", capture_ns, MIDQUOTER,
                                         fill="book", cash="100000"),
                          Cluster(kafka, registry.url), progress=False)
    assert (tmp_path / "bt" / "trades.csv").read_text() == direct.trades_csv


def test_a_replay_from_the_archive_republishes_the_topics_byte_for_byte(
        kafka, registry, capture_ns, tmp_path):
    """`pipeline replay --from-archive`: every archived record back in its partition, in
    its order, with its key, timestamp and value bytes (same schema id, same encoding)."""
    run_dir = tmp_path / "run"
    GroupRunner(group_config(kafka, registry.url, str(capture_ns), run_dir=run_dir,
                           roll_records=200), kafka).run(idle_timeout_s=3)
    env = {"PIPELINE_RUN_DIR": str(run_dir)}
    target = Namespace(f"replay-arc{int(time.time() * 1000) % 10**9}")
    done = pipeline_cli(kafka, registry, "replay", "--from", str(capture_ns), "--into",
                        str(target), "--from-archive", "--no-progress", env=env)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "copied 1171 record(s) (md.l2 655, md.trades 516)" in " ".join(done.stdout.split())

    def raw(topic: str) -> list[tuple]:
        found = [(m.partition(), m.key(), m.value(), m.timestamp()[1])
                 for m in read_to_end(kafka, topic)]
        return sorted(found, key=lambda r: r[0])  # stable: each partition keeps its order

    for name in ARCHIVED:
        source, copied = raw(capture_ns.topic(name)), raw(target.topic(name))
        assert len(copied) == len(source) > 100
        assert copied == source, name
    again = pipeline_cli(kafka, registry, "replay", "--from", str(capture_ns), "--into",
                         str(target), "--from-archive", "--no-progress", env=env)
    assert again.returncode == 1 and "already holds" in again.stderr
    empty = pipeline_cli(kafka, registry, "replay", "--from", str(capture_ns), "--into",
                         f"{target}x", "--from-archive", "--start", "2001-01-01",
                         "--end", "2001-01-02", "--no-progress", env=env)
    assert empty.returncode == 1 and "nothing to replay: the archive under" in empty.stderr
    assert len(empty.stderr.strip().splitlines()) == 1
