"""Prometheus metrics of the running topology, served by the supervisor (loopback only
unless the topology's ``infra.listen`` says otherwise), and the same collection as JSON at
``/status.json`` for the web dashboard (which then needs no admin rights on the cluster)."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pipeline.status import collect, prometheus, status_json

log = logging.getLogger(__name__)


def serve_metrics(supervisor) -> ThreadingHTTPServer | None:
    """Serve ``/metrics`` in a daemon thread; collected on scrape, at most every 2 s."""
    cache: dict = {"at": 0.0, "body": "", "json": "{}", "snapshot": None}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path not in ("/metrics", "/status.json"):
                self.send_error(404)
                return
            with lock:
                if time.time() - cache["at"] > 2.0:
                    state = {"bootstrap": supervisor.bootstrap,
                             "registry": supervisor.registry_url,
                             "namespace": str(supervisor.topology.namespace),
                             "phase": supervisor.phase,
                             "processes": [c.public() for c in supervisor.children]}
                    snapshot = collect(supervisor.run_dir, state, cache["snapshot"])
                    cache.update(at=time.time(), snapshot=snapshot,
                                 body=prometheus(snapshot, state["namespace"]),
                                 json=json.dumps(status_json(snapshot)))
                metrics = self.path == "/metrics"
                body = (cache["body"] if metrics else cache["json"]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4" if metrics
                             else "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    infra = supervisor.topology.infra
    try:
        server = ThreadingHTTPServer((infra.listen, infra.metrics_port), Handler)
    except OSError as exc:
        log.error("metrics port %d unavailable: %s", infra.metrics_port, exc)
        return None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", infra.listen, infra.metrics_port)
    return server
