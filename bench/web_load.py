"""The dashboard under load: `python -m bench.web_load [--seconds 60]`.

The demo's groups on the venue's generator at its full rate (no pacing), the dashboard's
symbol page open in headless Chromium. Every few seconds it samples the page's update
latency (server push -> drawn, ``window.dashboard.latencyMs``) and the web process's RSS;
the first samples are the baseline the last ones are compared with (a flat RSS has a
ratio near 1). Its own broker and registry, on free ports under run/bench-web.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import typer

from bench.groups import rss_kb
from pipeline.ops.services import free_port
from pipeline.ops.settings import REPO_ROOT

RUN_DIR = REPO_ROOT / "run" / "bench-web"
TOPOLOGY = """
namespace = "sim-webload"
symbols = ["BTCUSD", "ETHUSD", "SOLUSD"]
[source]
kind = "venue"
port = {venue}
[infra]
kafka_port = {kafka}
controller_port = {controller}
registry_port = {registry}
metrics_port = {metrics}
web_port = {web}

[[process]]
name = "orderbook"
run = "consumers.orderbook"
args = {{ depth = 10 }}

[[process]]
name = "bars"
run = "consumers.bars"
args = {{ intervals = "1s,1m" }}

[[process]]
name = "strategy"
run = "consumers.strategy"
args = {{ strategy = "pipeline.strategy:MidQuoter", params = {{ symbol = "BTCUSD", tick = "0.01", spread_bps = 2 }}, inputs = "book.snapshots" }}

[[process]]
name = "execution"
run = "consumers.execution"
args = {{ mode = "paper" }}

[[process]]
name = "portfolio"
run = "consumers.portfolio"
args = {{ capital = "100000" }}
"""  # noqa: E501 - TOML 1.0 inline tables cannot span lines


def main(seconds: int = typer.Option(60, help="how long to load it"),
         every: float = typer.Option(5.0, help="seconds between samples")) -> None:
    from playwright.sync_api import sync_playwright

    from tests.support.browser import ARGS, CHROMIUM

    RUN_DIR.mkdir(parents=True, exist_ok=True)
    web = free_port()
    path = RUN_DIR / "topology.toml"
    path.write_text(TOPOLOGY.format(venue=free_port(), kafka=free_port(),
                                    controller=free_port(), registry=free_port(),
                                    metrics=free_port(), web=web))
    env = {**os.environ, "PIPELINE_RUN_DIR": str(RUN_DIR)}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    env.pop("SCHEMA_REGISTRY_URL", None)
    pipeline = [sys.executable, "-m", "pipeline.cli"]
    subprocess.run([*pipeline, "up", "--topology", str(path)], env=env, check=True)
    samples: list[tuple[float, float, float]] = []  # (s, latency ms, rss MB)
    try:
        state = json.loads((RUN_DIR / "supervisor.json").read_text())
        pid = next(p["pid"] for p in state["processes"] if p["name"] == "web")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page()
            deadline = time.monotonic() + 60  # `up` returns before the web listens
            while True:
                try:
                    page.goto(f"http://127.0.0.1:{web}/symbol/BTCUSD")
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1.0)
            page.wait_for_function("window.dashboard.updates > 0", timeout=60_000)
            started = time.monotonic()
            while time.monotonic() - started < seconds:
                time.sleep(every)
                latency = page.evaluate("window.dashboard.latencyMs")
                samples.append((time.monotonic() - started, float(latency), rss_kb(pid) / 1024))
                print(f"{samples[-1][0]:5.1f} s  update latency {latency:6.0f} ms  "
                      f"web RSS {samples[-1][2]:6.1f} MB  "
                      f"updates {page.evaluate('window.dashboard.updates')}", flush=True)
            browser.close()
        status = subprocess.run([*pipeline, "status"], env=env, capture_output=True, text=True)
        print(status.stdout[-2500:])
    finally:
        subprocess.run([*pipeline, "down"], env=env)
    (base_lat, base_rss), (end_lat, end_rss) = (
        [statistics.median(sample[i] for sample in part) for i in (1, 2)]
        for part in (samples[:2], samples[-2:]))
    print(f"update latency: first {base_lat:.0f} ms, last {end_lat:.0f} ms "
          f"(ratio {end_lat / base_lat:.2f}); web RSS: first {base_rss:.1f} MB, last "
          f"{end_rss:.1f} MB (ratio {end_rss / base_rss:.3f})")


if __name__ == "__main__":
    typer.run(main)
