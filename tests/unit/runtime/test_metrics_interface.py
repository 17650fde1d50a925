"""The one metrics interface (pipeline/runtime/metrics.py): a registry of counters and
gauges by name and labels that the runner, handlers and the producer report to, the file
each process writes, and the exposition the supervisor's metrics server makes of them."""

from __future__ import annotations

import json

import pytest

from pipeline.runtime.harness import HandlerHarness
from pipeline.runtime.metrics import (
    NULL_METRICS,
    MetricsRegistry,
    MetricsWriter,
    exposition,
    metrics_path,
    process_metrics_path,
    read_metrics,
)
from pipeline.runtime.runner import GroupConfig, Handler, Output, Record


def test_counters_and_gauges_by_name_and_labels():
    m = MetricsRegistry(group="ns.execution")
    m.inc("rejections_total", reason="risk:max_notional")
    m.inc("rejections_total", 2, reason="risk:max_notional")
    m.inc("rejections_total", reason="bad_signature")
    m.set("open_orders", 3)
    m.set("open_orders", 1)
    assert m.value("rejections_total", reason="risk:max_notional") == 3
    assert m.value("rejections_total", reason="bad_signature") == 1
    assert m.value("open_orders") == 1 and m.value("nothing") is None
    assert m.snapshot() == {"labels": {"group": "ns.execution"}, "metrics": [
        ["gauge", "open_orders", {}, 1],
        ["counter", "rejections_total", {"reason": "bad_signature"}, 1],
        ["counter", "rejections_total", {"reason": "risk:max_notional"}, 3]]}
    with pytest.raises(ValueError, match="counter"):
        m.inc("rejections_total", -1)
    with pytest.raises(ValueError, match="is a counter"):
        m.set("rejections_total", 0)
    NULL_METRICS.inc("anything", reason="x")  # a handler outside a runner reports to nothing


def test_a_collector_reports_figures_kept_elsewhere_at_snapshot_time():
    kept = {"n": 0}
    m = MetricsRegistry()
    m.collect(lambda r: r.set_total("records_total", kept["n"]))
    kept["n"] = 41
    assert m.value("records_total") == 41
    kept["n"] = 42
    assert m.samples() == [("counter", "records_total", {}, 42)]


def test_the_writer_writes_at_most_every_interval_and_reads_back(tmp_path):
    now = [100.0]
    m = MetricsRegistry(group="g")
    path = metrics_path(tmp_path / "status", "orderbook-0")
    writer = MetricsWriter(m, path, every_s=2.0, clock=lambda: now[0])
    m.inc("snapshots_total")
    writer.maybe()
    m.inc("snapshots_total")
    now[0] += 1
    writer.maybe()  # too soon: the file still says 1
    assert json.loads(path.read_text())["metrics"] == [["counter", "snapshots_total", {}, 1]]
    now[0] += 1
    writer.maybe()
    (tmp_path / "status" / "metrics-broken.json").write_text("{half")
    assert read_metrics(tmp_path / "status") == {"orderbook-0": m.snapshot()}
    assert read_metrics(tmp_path / "nowhere") == {}
    assert not list((tmp_path / "status").glob("*.tmp"))


def test_the_supervisor_names_the_file_through_the_environment(tmp_path):
    env = {"PIPELINE_RUN_DIR": str(tmp_path), "PIPELINE_PROCESS": "execution"}
    assert process_metrics_path(env) == tmp_path / "status" / "metrics-execution.json"
    assert process_metrics_path({"PIPELINE_RUN_DIR": str(tmp_path)}) is None


def test_the_exposition_has_one_family_per_name_with_the_process_label():
    a, b = MetricsRegistry(group="ns.orderbook"), MetricsRegistry()
    a.inc("dead_letters_total", 2)
    a.inc("rejections_total", reason='say "no"\n')
    b.inc("dead_letters_total")
    b.inc("bad name")  # not a Prometheus name: left out, the rest stays
    lines = exposition({"orderbook-0": a.snapshot(), "producer": b.snapshot()})
    assert lines[:4] == [
        "# HELP pipeline_dead_letters_total Records sent to the dead-letter topic.",
        "# TYPE pipeline_dead_letters_total counter",
        'pipeline_dead_letters_total{process="orderbook-0",group="ns.orderbook"} 2',
        'pipeline_dead_letters_total{process="producer"} 1']
    assert ('pipeline_rejections_total{process="orderbook-0",group="ns.orderbook",'
            'reason="say \\"no\\"\\n"} 1') in lines
    assert not [line for line in lines if "bad name" in line]


class Reporter(Handler):
    """Reports a snapshot per record; refuses 13 (a dead letter)."""

    def handle(self, record: Record):
        if record.value == b"13":
            raise ValueError("unlucky")
        self.metrics.inc("snapshots_total")
        self.metrics.inc("rejections_total", reason="risk:max_position")
        return [Output("out", record.value)]


def test_the_runner_and_its_handler_report_to_one_registry():
    harness = HandlerHarness(GroupConfig("ns.g", ["in"], Reporter, "dlq"))
    harness.assign(("in", 0))
    harness.batch(("in", 0, 0, b"1"), ("in", 0, 1, b"13"), ("in", 0, 2, b"2"))
    m = harness.metrics
    assert m.labels == {"group": "ns.g"}
    assert (m.value("records_total"), m.value("dead_letters_total"),
            m.value("outputs_total"), m.value("snapshots_total")) == (3, 1, 3, 2)  # dlq too
    assert m.value("rejections_total", reason="risk:max_position") == 2
    assert m.value("commits_total") == harness.stats.commits >= 1


def test_the_producer_reports_its_feed_figures():
    from producers.gemini_ws import FeedStats

    stats = FeedStats(frames=10, reconnects=2, dead_letters=1)
    stats.skipped["heartbeat"] += 3
    m = MetricsRegistry()
    m.collect(stats.report)
    assert (m.value("frames_total"), m.value("reconnects_total"),
            m.value("dead_letters_total"), m.value("skipped_total", kind="heartbeat")) == \
        (10, 2, 1, 3)
