"""The project's commands as real processes, for tests: `pipeline ...` runs and the
producer, plus the real capture's name and symbols and a small topology on it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from pipeline.ops.services import free_port
from pipeline.ops.settings import REPO_ROOT
from pipeline.venue.server import RunningVenue

PIPELINE = str(Path(sys.executable).parent / "pipeline")
CAPTURE = "gemini_v2_l2_capture_2021-06-24.txt"
CAPTURE_SYMBOLS = ["BTCGBP", "LINKETH", "FILUSD", "ZECLTC", "BATBTC", "ETHEUR", "LTCETH",
                   "GRTUSD", "ANKRUSD", "ALCXUSD"]


def cli(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """`pipeline ARGS` to completion, output captured."""
    return subprocess.run([PIPELINE, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO_ROOT)


def demo_topology(tmp_path: Path, shared_data: Path, processes: str) -> Path:
    """A topology file in ``tmp_path``: the venue replaying the capture at 4x, looping, three
    symbols, free ports, a namespace of its own, then ``processes`` (TOML)."""
    path = tmp_path / "topology.toml"
    path.write_text(f"""
namespace = "sim-up{time.monotonic_ns() % 10**8}"
symbols = ["FILUSD", "ANKRUSD", "ALCXUSD"]
[source]
kind = "venue"
capture = "{shared_data / CAPTURE}"
speed = 4.0
loop = true
port = {free_port()}
heartbeat_s = 0.5
[infra]
metrics_port = {free_port()}
web_port = 0
{processes}
""")
    return path


def cluster_env(kafka: str, registry_url: str, **extra: str) -> dict:
    """The environment that points the commands at the test session's broker and registry."""
    return {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka, "SCHEMA_REGISTRY_URL": registry_url,
            **extra}


class Producer:
    """`pipeline produce gemini` as its own process."""

    def __init__(self, kafka: str, registry_url: str, namespace, url: str, symbols: list[str],
                 tmp_path: Path, protocol: str = "v2", heartbeat_timeout: float = 10.0) -> None:
        self.log = tmp_path / f"producer-{time.monotonic_ns()}.log"
        self._log_file = open(self.log, "w")
        self.proc = subprocess.Popen(
            [PIPELINE, "produce", "gemini", "--run-dir", str(tmp_path), "-n", str(namespace),
             "--url", url, "--symbols", ",".join(symbols), "--protocol", protocol,
             "--heartbeat-timeout", str(heartbeat_timeout)],
            cwd=REPO_ROOT, env=cluster_env(kafka, registry_url), stdout=subprocess.PIPE,
            stderr=self._log_file, text=True)

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=60)
        finally:
            self._log_file.close()
        return self.proc.returncode, out

    def log_text(self) -> str:
        return self.log.read_text()


def venue_status(venue: RunningVenue) -> dict:
    return requests.get(f"{venue.http_url}/_venue/status", timeout=5).json()
