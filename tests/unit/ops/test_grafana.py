"""docker/grafana: the pipeline dashboard is a sound Grafana dashboard on the provisioned
datasource, and its PromQL parser. That every metric it queries is in a running topology's
exposition is checked on the web test's demo (integration/test_web.py), which runs them all."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.ops.settings import REPO_ROOT
from tests.support.grafana import (
    DASHBOARD,
    exposition_metric_names,
    panels,
    promql_metric_names,
    variable_metric_names,
)

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
