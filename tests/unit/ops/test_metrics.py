"""The metrics server (pipeline/ops/metrics.py) when there is nothing to collect from."""

from __future__ import annotations

import time

import requests

from pipeline.ops.metrics import metrics_server
from pipeline.ops.services import free_port


def test_a_failed_collection_answers_503_with_one_line_and_the_server_goes_on(tmp_path):
    dead = f"127.0.0.1:{free_port()}"  # no broker there
    server = metrics_server("127.0.0.1", 0, tmp_path,
                            lambda: {"bootstrap": dead, "namespace": "sim", "processes": []})
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for path in ("/metrics", "/status.json"):
            reply = requests.get(url + path, timeout=30)
            assert reply.status_code == 503, reply.text
            assert reply.text.startswith(f"metrics unavailable: Kafka at {dead} does not answer")
            assert reply.text.count("\n") == 1 and "Traceback" not in reply.text
        began = time.monotonic()
        assert requests.get(url + "/metrics", timeout=30).status_code == 503
        assert time.monotonic() - began < 1, "within 2 s the failure is not collected again"
        assert requests.get(url + "/other", timeout=5).status_code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_what_processes_report_through_the_metrics_interface_is_exposed(tmp_path):
    from pipeline.ops.status import Snapshot, process_metrics, prometheus
    from pipeline.runtime.metrics import MetricsRegistry, MetricsWriter, metrics_path

    execution = MetricsRegistry(group="sim.execution")
    execution.inc("rejections_total", 2, reason="risk:max_notional")
    execution.inc("dead_letters_total")
    producer = MetricsRegistry()
    producer.set_total("reconnects_total", 3)
    status = tmp_path / "status"
    for name, registry in (("execution", execution), ("producer", producer),
                           ("gone-from-the-topology", producer)):
        MetricsWriter(registry, metrics_path(status, name)).write()
    running = [{"name": "execution", "up": True, "restarts": 0},
               {"name": "producer", "up": True, "restarts": 0}]
    found = process_metrics(tmp_path, running)
    assert sorted(found) == ["execution", "producer"]
    assert sorted(process_metrics(tmp_path, [])) == ["execution", "gone-from-the-topology",
                                                     "producer"]
    text = prometheus(Snapshot(0.0, running, {}, {}, None, {"mode": "paper", "kill_switch": False},
                               process_metrics=found), "sim")
    lines = text.splitlines()
    assert ('pipeline_rejections_total{process="execution",group="sim.execution",'
            'reason="risk:max_notional"} 2') in lines
    assert 'pipeline_dead_letters_total{process="execution",group="sim.execution"} 1' in lines
    assert 'pipeline_reconnects_total{process="producer"} 3' in lines
    assert lines.count("# TYPE pipeline_reconnects_total counter") == 1
