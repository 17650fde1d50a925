"""Where the running topology is (pipeline/ops/supervisor.py ``running_endpoints``): what the
CLI's portfolio, strategy, metrics and web commands connect to."""

from __future__ import annotations

import json
from dataclasses import replace

from pipeline.ops.settings import Settings
from pipeline.ops.supervisor import STATE_FILE, running_endpoints


def _settings(run_dir, **given) -> Settings:
    return replace(Settings(run_dir, None, None, "live"), **given)


def test_the_supervisor_state_names_the_endpoints_and_the_namespace(tmp_path):
    (tmp_path / STATE_FILE).write_text(json.dumps(
        {"bootstrap": "127.0.0.1:1", "registry": "http://127.0.0.1:2", "namespace": "sim"}))
    settings = _settings(tmp_path, bootstrap_servers="elsewhere:9092",
                         schema_registry_url="http://elsewhere")
    bootstrap, registry, ns = running_endpoints(settings)
    assert (bootstrap, registry, ns.name) == ("127.0.0.1:1", "http://127.0.0.1:2", "sim")
    assert running_endpoints(settings, "replay-x")[2].name == "replay-x"  # given wins


def test_without_a_topology_the_settings_say(tmp_path):
    settings = _settings(tmp_path, bootstrap_servers="kafka:9092",
                         schema_registry_url="http://registry:8081/", namespace="sim-x")
    bootstrap, registry, ns = running_endpoints(settings)
    assert (bootstrap, registry, ns.name) == ("kafka:9092", "http://registry:8081", "sim-x")
