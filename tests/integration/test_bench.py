"""The benchmark harness keeps working (tiny sizes; no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.ops.settings import REPO_ROOT


@pytest.mark.bench
@pytest.mark.broker
def test_the_bench_harness_runs_and_writes_its_figures(kafka, registry):
    results = REPO_ROOT / "run" / "bench" / "results"
    before = set(results.glob("*.json")) if results.exists() else set()
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka, "SCHEMA_REGISTRY_URL": registry.url}
    done = subprocess.run([sys.executable, "-m", "bench", "--events", "300"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (new,) = set(results.glob("*.json")) - before
    data = json.loads(new.read_text())
    table = new.with_suffix(".md").read_text()  # the same figures, for BENCHMARKS.md
    assert all(f"| {f['name']} |" in table for f in data["figures"])
    assert data["machine"]["cores"] >= 1 and data["machine"]["kafka"].startswith("4.")
    names = {f["name"] for f in data["figures"]}
    assert {"serde encode L2Update", "serde decode L2Update"} <= names
    assert {"ingest frames (parse+normalize+encode+produce, 1 core)",
            "venue generator frames (generate + render v2)"} <= names
    assert {"consume + decode L2Update (C decoder, as replays and groups)",
            "consume + decode L2Update (C decoder), vs Kafka's tool",
            "consume + decode L2Update (fastavro path)",
            "scale: consume + decode, 4 consumer instances in one group, 6 partitions",
            "scale: ingest (encode + produce), 4 producer processes, 6 partitions",
            "L2 backtest: books + MidQuoter + simulator, queue on (generator)",
            "simulator: policy + 2 resting orders a side, queue on (generator)",
            "execution paper: request in Kafka -> order event committed, p99",
            "portfolio fills folded (lots, PnL, limits, 2 records each)"} <= names
    # latency counts matched samples; memory counts the L2 changes fed (2 x --events)
    latency = [f for f in data["figures"] if f["name"].startswith("end-to-end latency")]
    assert [f["name"].rsplit(", ", 1)[1] for f in latency] == ["p50", "p99", "p999"]
    assert all(f["unit"] == "ms" and f["events"] > 0 for f in latency)
    memory = [f for f in data["figures"] if f["name"].startswith("peak RSS")]
    assert [f["name"].split(", ")[1] for f in memory] == [
        "producer ingest path (IngestSink)", "orderbook group", "bars group", "strategy group"]
    assert all(f["unit"] == "MB" and f["events"] >= 600 for f in memory)
    acked = [f for f in data["figures"] if f["name"].startswith("Gemini order -> acknowledged")]
    assert [f["name"].rsplit(", ", 1)[1] for f in acked] == ["p50", "p99"]
    assert all(f["unit"] == "ms" and f["events"] >= 40 and "REST" in f["baseline"]
               for f in acked)
    # frame -> order acknowledged end to end: as many samples as frames moved the mid
    e2e = [f for f in data["figures"] if f["name"].startswith("end to end @")]
    assert [f["name"].rsplit(", ", 1)[1] for f in e2e] == ["p50", "p99"]
    assert all(f["unit"] == "ms" and f["events"] > 0 and "REST" in f["baseline"] for f in e2e)
    acked += e2e
    for figure in data["figures"]:
        assert figure["value"] > 0 and figure["baseline_value"] > 0 and figure["unit"]
        # figures count frames or records (300 asked for), or the changes inside them, or
        # the bars of the hourly file (a fixed data set)
        assert figure["events"] == 300 or figure["unit"] in ("changes/s", "records/s") or \
            (figure["unit"] == "bars/s" and figure["name"].startswith("backtest")) or \
            figure in latency + memory + acked
