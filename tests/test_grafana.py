"""docker/grafana: the pipeline dashboard is a sound Grafana dashboard on the provisioned
datasource, and every metric it queries is in the exposition of a running topology."""

from __future__ import annotations

import json
import subprocess

import pytest
import requests
import yaml

from pipeline import topology
from pipeline.config import REPO_ROOT
from pipeline.services import free_port
from tests.support.grafana import (DASHBOARD, dashboard_metric_names, exposition_metric_names,
                                   missing_metrics, panels, promql_metric_names,
                                   variable_metric_names)
from tests.support.processes import PIPELINE, cli, demo_topology
from tests.support.waiting import wait_for

PROVISIONING = REPO_ROOT / "docker" / "grafana" / "provisioning"


# --------------------------------------------------------------------------- the parser


@pytest.mark.parametrize("expr,names", [
    ("pipeline_group_lag", {"pipeline_group_lag"}),
    ('sum by (group) (pipeline_group_lag{group=~"$namespace[.].+"})', {"pipeline_group_lag"}),
    ('sum(rate(http_requests_total{job="api", code!~"5.."}[5m])) by (code)',
     {"http_requests_total"}),
    ("histogram_quantile(0.99, sum by (le) (rate(req_seconds_bucket[$__rate_interval])))",
     {"req_seconds_bucket"}),
    ('pipeline_process_up and on(instance) pipeline_info{namespace="$namespace"}',
     {"pipeline_process_up", "pipeline_info"}),
    ("a / on(job) group_left(version) b offset 1h @ end()", {"a", "b"}),
    ('count(up == 0) or vector(0)', {"up"}),
    ('max_over_time(rate(x_total[1m])[1h:5m]) > bool 2e3', {"x_total"}),
    ('{__name__="by_name", job="j"} + {"utf8.name", a="b"}', {"by_name", "utf8.name"}),
    ('label_replace(foo:recorded, "dst", "$1", "src", "(.*)")', {"foo:recorded"}),
    ('topk(10, sum without (instance) (m1)) unless m2 * Inf', {"m1", "m2"}),
    ("rate(x[$__rate_interval]) * $scale", {"x"}),
])
def test_promql_metric_names(expr, names):
    assert promql_metric_names(expr) == names


@pytest.mark.parametrize("expr", ["no_such_function(x)", '{__name__=~"pipeline_.*"}', "a{b",
                                  "${prefix}_total", "pipeline_$name"])
def test_what_cannot_be_checked_is_an_error(expr):
    with pytest.raises(ValueError):
        promql_metric_names(expr)


def test_variable_queries():
    assert variable_metric_names("label_values(pipeline_info, namespace)") == {"pipeline_info"}
    assert variable_metric_names('label_values(m{a="x,y"},b)') == {"m"}
    assert variable_metric_names("label_values(namespace)") == set()
    assert variable_metric_names("query_result(sum by (a) (m))") == {"m"}


def test_exposition_names_include_families_without_samples_and_histogram_series():
    text = ("# HELP a_total A.\n# TYPE a_total counter\n"
            "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 0\n"
            "# HELP g G.\n# TYPE g gauge\ng{x=\"1\"} 2\nuntyped 3\n")
    assert exposition_metric_names(text) == {"a_total", "h", "h_bucket", "h_sum", "h_count",
                                             "g", "untyped"}


# --------------------------------------------------------------------------- the dashboard


def test_the_dashboard_is_a_grafana_dashboard_on_the_provisioned_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    [source] = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())[
        "datasources"]
    assert dashboard["uid"] and len(dashboard["uid"]) <= 40 and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int) and "id" not in dashboard
    every = list(panels(dashboard))
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    cells: set[tuple[int, int]] = set()
    for panel in every:
        pos = panel["gridPos"]
        assert {"x", "y", "w", "h"} <= set(pos) and pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["type"] in ("timeseries", "stat"), panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for ref in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert ref == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
    [variable] = dashboard["templating"]["list"]
    assert variable["name"] == "namespace" and variable["datasource"]["uid"] == source["uid"]
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "pipeline.yml").read_text())
    assert provider["providers"][0]["type"] == "file"


# --------------------------------------------------------------------------- on a topology

PROCESSES = """
[[process]]
name = "orderbook"
run = "consumers.orderbook"
args = { depth = 5 }

[[process]]
name = "strategy"
run = "consumers.strategy"
args = { strategy = "pipeline.strategy:MidQuoter", params = { symbol = "FILUSD", tick = "0.0001", requote_bps = 1 }, inputs = "book.snapshots" }

[[process]]
name = "execution"
run = "consumers.execution"
args = { mode = "paper" }

[[process]]
name = "portfolio"
run = "consumers.portfolio"
args = { capital = "100000", max_mark_age_s = "off", pnl_interval = 1 }
"""  # noqa: E501 - TOML 1.0 inline tables (the strategy's args) cannot span lines


def samples(text: str) -> set[str]:
    return {line.split("{")[0].split()[0] for line in text.splitlines()
            if line and not line.startswith("#")}


@pytest.mark.broker
def test_every_metric_the_dashboard_queries_is_in_a_running_topologys_exposition(
        kafka, registry, tmp_path, shared_data, up_env):
    """The supervisor's /metrics and `pipeline metrics` beside it, with the producer,
    execution and portfolio running: the dashboard queries nothing they lack."""
    path = demo_topology(tmp_path, shared_data, PROCESSES)
    supervised = f"http://127.0.0.1:{topology.load(path).infra.metrics_port}"
    started = cli("up", "--topology", str(path), env=up_env)
    assert started.returncode == 0, started.stderr + started.stdout
    port = free_port()
    beside = subprocess.Popen([PIPELINE, "metrics", "--port", str(port)], env=up_env,
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        def exposition() -> str | None:  # once the portfolio has equity and groups commit
            text = requests.get(f"{supervised}/metrics", timeout=10).text
            have = samples(text)
            return text if {"pipeline_strategy_equity", "pipeline_producer_frames_total",
                            "pipeline_group_records_per_second"} <= have else None

        text = wait_for(exposition, 60, "equity, producer and group samples", 1.0)
        assert not missing_metrics(DASHBOARD, text)
        queried = dashboard_metric_names(DASHBOARD)
        print("queried:", sorted(queried))
        print("no samples yet:", sorted(queried - samples(text)))
        assert queried - samples(text) <= {"pipeline_strategy_rejections_total",
                                           "pipeline_strategy_position"}

        reply = wait_for(lambda: beside.poll() is None and requests.get(
            f"http://127.0.0.1:{port}/metrics", timeout=10), 30, "`pipeline metrics`", 0.5)
        assert reply.status_code == 200, reply.text
        assert not missing_metrics(DASHBOARD, reply.text)
        ns = str(topology.load(path).namespace)
        assert f'pipeline_info{{namespace="{ns}",mode="paper"}} 1' in reply.text
        assert 'pipeline_process_up{process="portfolio"} 1' in reply.text, "the supervisor's"
        status = requests.get(f"http://127.0.0.1:{port}/status.json", timeout=10).json()
        assert status.keys() == requests.get(f"{supervised}/status.json", timeout=10).json(
            ).keys()
        assert f"{ns}.portfolio" in status["groups"]
    finally:
        beside.terminate()
        out, err = beside.communicate(timeout=30)
    assert beside.returncode == 0, err
    assert f"metrics of namespace {ns} on http://127.0.0.1:{port}/metrics" in out
