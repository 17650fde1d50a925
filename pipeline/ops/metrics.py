"""Prometheus metrics of the running topology at ``/metrics``, and the same collection as
JSON at ``/status.json`` for the web dashboard (which then needs no admin rights on the
cluster). One server, :func:`metrics_server`, for both who serve them: the supervisor
(loopback only unless the topology's ``infra.listen`` says otherwise) and `pipeline
metrics`, for a topology whose processes no supervisor here runs (docker/compose.yml)."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from pipeline.ops.status import collect, prometheus, status_json

log = logging.getLogger(__name__)

COLLECT_EVERY_S = 2.0


def metrics_server(listen: str, port: int, run_dir: Path, state_of: Callable[[], dict]
                   ) -> ThreadingHTTPServer:
    """Serve ``/metrics`` and ``/status.json`` in a daemon thread, collected on request, at
    most every 2 s. ``state_of()`` gives :func:`pipeline.ops.status.collect` its state
    (bootstrap, registry, namespace, phase, processes). A collection that fails (the broker
    down) answers 503 with one line of text. Raises OSError when the port is taken."""
    cache: dict = {"at": 0.0, "body": "", "json": "{}", "snapshot": None, "error": None}
    lock = threading.Lock()

    def refresh() -> None:
        try:
            state = state_of()
            snapshot = collect(run_dir, state, cache["snapshot"])
            cache.update(snapshot=snapshot, error=None,
                         body=prometheus(snapshot, state["namespace"]),
                         json=json.dumps(status_json(snapshot)))
        except Exception as exc:  # noqa: BLE001 - a scrape gets the reason, not a trace
            if cache["error"] is None:
                log.warning("metrics collection failed: %s", exc)
            cache["error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        cache["at"] = time.time()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path not in ("/metrics", "/status.json"):
                self.send_error(404)
                return
            metrics = self.path == "/metrics"
            with lock:
                if time.time() - cache["at"] > COLLECT_EVERY_S:
                    refresh()
                error = cache["error"]
                body = (f"metrics unavailable: {error}\n" if error else
                        cache["body"] if metrics else cache["json"]).encode()
            self.send_response(503 if error else 200)
            self.send_header("Content-Type", "text/plain; charset=utf-8" if error
                             else "text/plain; version=0.0.4" if metrics
                             else "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer((listen, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", listen, server.server_address[1])
    return server


def serve_metrics(supervisor) -> ThreadingHTTPServer | None:
    """The supervisor's metrics on ``infra.metrics_port`` (None, logged, if it is taken)."""
    def state_of() -> dict:
        return {"bootstrap": supervisor.bootstrap, "registry": supervisor.registry_url,
                "namespace": str(supervisor.topology.namespace), "phase": supervisor.phase,
                "processes": [c.public() for c in supervisor.children]}

    infra = supervisor.topology.infra
    try:
        return metrics_server(infra.listen, infra.metrics_port, supervisor.run_dir, state_of)
    except OSError as exc:
        log.error("metrics port %d unavailable: %s", infra.metrics_port, exc)
        return None


def standalone_state(run_dir: Path, bootstrap: str, registry: str | None, namespace: str,
                     execution_mode: str | None = None) -> Callable[[], dict]:
    """``state_of`` for `pipeline metrics`: the given cluster and namespace, with the
    processes (and phase) of a supervisor running this namespace in ``run_dir``, if one
    does; else no processes, and ``execution_mode`` for the execution that runs elsewhere
    (compose)."""
    from pipeline.ops.supervisor import supervisor_running

    def state_of() -> dict:
        running = supervisor_running(run_dir) or {}
        ours = running.get("namespace") == namespace
        state = {"bootstrap": bootstrap, "registry": registry, "namespace": namespace,
                 "phase": running.get("phase", "unknown") if ours else "unknown",
                 "processes": running.get("processes", []) if ours else []}
        if execution_mode:
            state["execution_mode"] = execution_mode
        return state

    return state_of
