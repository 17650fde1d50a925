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
