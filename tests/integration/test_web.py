"""The web dashboard against `make demo`, in Debian's headless Chromium.

One topology for the module: topology.demo.toml itself (the venue looping the real capture
at recorded speed, every group of the demo) with its own namespace and free ports, and 1 s
and 5 s bars instead of the demo's 1 m ones, so candles close within a test. Each page
loads without console errors; the depth chart and the candles redraw within seconds of new
data; a fill the venue made shows on the trading page; the kill-switch button flips the
switch execution reads. Bad input (malformed, oversized, unknown) gets an error, never a
crash; no page shows a secret. Screenshots go to run/test-screenshots/web (not committed).
"""

from __future__ import annotations

import html
import json
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests
import websocket

from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Decoder
from pipeline.kafka.catalog import Namespace
from pipeline.ops.kill_switch import CONFIRM, kill_switch_path
from pipeline.ops.services import free_port
from pipeline.ops.settings import REPO_ROOT
from pipeline.web.server import MAX_MESSAGE
from tests.support.browser import WatchedPage, chromium
from tests.support.grafana import DASHBOARD, dashboard_metric_names, missing_metrics
from tests.support.kafka_io import read_all
from tests.support.processes import CAPTURE, PIPELINE, cli, cluster_env
from tests.support.waiting import wait_for

SHOTS = REPO_ROOT / "run" / "test-screenshots" / "web"


def the_demo_file(shared_data: Path, namespace: Namespace, web_port: int,
                  metrics_port: int) -> str:
    """topology.demo.toml on this test's namespace and ports, with short bars."""
    text = (REPO_ROOT / "topology.demo.toml").read_text()
    for old, new in [('namespace = "sim"', f'namespace = "{namespace}"'),
                     ('"../shared/data/gemini_v2_l2_capture_2021-06-24.txt"',
                      json.dumps(str(shared_data / CAPTURE))),
                     ("port = 8090", f"port = {free_port()}"),
                     ("metrics_port = 9464", f"metrics_port = {metrics_port}\n"
                                             f"web_port = {web_port}"),
                     ('intervals = "1m,5m,1h,1d"', 'intervals = "1s,5s"')]:
        assert old in text, f"topology.demo.toml no longer has {old!r}"
        text = text.replace(old, new)
    return text


class Demo:
    def __init__(self, url: str, metrics_url: str, run_dir: Path, namespace: Namespace,
                 kafka: str, decode: Decoder, env: dict) -> None:
        self.url, self.metrics_url, self.run_dir = url, metrics_url, run_dir
        self.namespace, self.kafka, self.decode, self.env = namespace, kafka, decode, env

    def records(self, topic: str) -> list[dict]:
        return [self.decode(r.value) for r in read_all(self.kafka, self.namespace.topic(topic),
                                                       timeout=5)]

    def events(self) -> list[dict]:
        return self.records("orders.events")


@pytest.fixture(scope="module")
def demo(kafka, registry, shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    namespace = Namespace(f"sim-web{uuid.uuid4().hex[:8]}")
    web_port, metrics_port = free_port(), free_port()
    path = tmp / "topology.toml"
    path.write_text(the_demo_file(shared_data, namespace, web_port, metrics_port))
    env = cluster_env(kafka, registry.url, PIPELINE_RUN_DIR=str(tmp / "run"))
    started = cli("up", "--topology", str(path), env=env)
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        url = f"http://127.0.0.1:{web_port}"
        wait_for(lambda: _answers(url), 60, "the dashboard to answer")
        yield Demo(url, f"http://127.0.0.1:{metrics_port}", tmp / "run", namespace, kafka,
                   Decoder(SchemaRegistry(registry.url)), env)
    finally:
        cli("down", env=env, timeout=200)


def _reply(url: str) -> requests.Response | None:
    try:
        return requests.get(url, timeout=10)
    except requests.ConnectionError:
        return None


def _answers(url: str) -> bool:
    try:
        return requests.get(url + "/", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def _open(browser, url: str) -> WatchedPage:
    watched = WatchedPage(browser)
    watched.page.goto(url)
    return watched


def _updates(page) -> int:
    return page.evaluate("window.dashboard.updates")


def _shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_every_page_loads_without_console_errors(demo, browser):
    pages = {"topology": "/", "symbol": "/symbol/FILUSD", "trading": "/trading",
             "backtests": "/backtests"}
    for name, path in pages.items():
        watched = _open(browser, demo.url + path)
        page = watched.page
        if name != "backtests":
            page.wait_for_function("window.dashboard.updates > 0", timeout=20_000)
        if name == "topology":  # the supervisor's processes, as pipeline status has them
            page.wait_for_function(
                "document.querySelectorAll('#processes tr').length >= 8", timeout=20_000)
            text = page.inner_text("#processes")
            for process in ("venue", "producer", "orderbook", "bars", "strategy",
                            "execution", "portfolio", "web"):
                assert process in text
            page.wait_for_function("document.querySelector('#groups').innerText"
                                   f".includes('{demo.namespace}.orderbook')", timeout=20_000)
        if name == "backtests":
            assert "pipeline backtest" in page.inner_text("#backtests")
        time.sleep(1.0)  # late errors (a redraw) count too
        _shot(page, name)
        assert watched.errors == [], f"{name}: {watched.errors}"
        watched.close()


def test_the_depth_chart_and_the_candles_follow_new_data(demo, browser):
    watched = _open(browser, demo.url + "/symbol/FILUSD")
    page = watched.page
    page.wait_for_function("window.dashboard.last && window.dashboard.last.depth "
                           "&& window.dashboard.last.candles.start_ms.length > 0",
                           timeout=30_000)
    first = page.evaluate("[window.dashboard.last.top.published_ms, "
                          "Math.max(...window.dashboard.last.candles.start_ms)]")
    drawn = page.evaluate("[document.getElementById('depth').data.length, "
                          "document.getElementById('depth').data[0].x.length, "
                          "document.getElementById('candles').data[0].x.length]")
    assert drawn[0] == 2 and drawn[1] > 0 and drawn[2] > 0
    started = time.monotonic()
    page.wait_for_function(f"window.dashboard.last.top.published_ms > {first[0]}",
                           timeout=10_000)
    book_s = time.monotonic() - started
    # A new bar: from when Kafka has it to when the page has drawn it.
    in_kafka = on_page = None
    deadline = time.monotonic() + 90
    while on_page is None and time.monotonic() < deadline:
        if in_kafka is None and any(
                bar["symbol"] == "FILUSD" and bar["interval"] == "1s" and
                bar["start_ms"] > first[1] for bar in demo.records("bars")):
            in_kafka = time.monotonic()
        if page.evaluate(f"Math.max(...window.dashboard.last.candles.start_ms) > {first[1]}"):
            on_page = time.monotonic()
        time.sleep(0.2)
    assert on_page is not None, "no new FILUSD bar reached the page in 90 s"
    candle_s = on_page - (in_kafka or on_page)
    assert candle_s < 5.0, f"the page drew a new bar {candle_s:.1f} s after Kafka had it"
    # The chart itself was redrawn with the new bar, not only the data received.
    newest = page.evaluate("Math.max(...document.getElementById('candles').data[0].x"
                           ".map(d => new Date(d).getTime()))")
    assert newest > first[1]
    latency = page.evaluate("window.dashboard.latencyMs")
    print(f"new book after {book_s:.1f} s, a new bar on the page {candle_s:.1f} s after "
          "Kafka had it; "
          f"update latency {latency} ms")
    assert watched.errors == []
    watched.close()


def test_a_fill_of_the_venue_shows_on_the_trading_page(demo, browser):
    watched = _open(browser, demo.url + "/trading")
    page = watched.page
    fills = wait_for(lambda: [e for e in demo.events() if e["last_fill_amount"]], 120,
                     "a paper fill in orders.events")
    order = fills[0]["client_order_id"]
    page.wait_for_function(f"document.querySelector('#fills').innerText.includes('{order}')",
                           timeout=15_000)
    row = page.locator("#fills tr", has_text=order).first.inner_text()
    assert fills[0]["last_fill_price"] in row and fills[0]["last_fill_amount"] in row
    page.wait_for_function("document.querySelector('#strategies').innerText"
                           ".includes('mid-quoter')", timeout=30_000)
    _shot(page, "trading-with-fills")
    assert watched.errors == []
    watched.close()


def test_the_kill_switch_button_flips_the_switch_execution_reads(demo, browser):
    watched = _open(browser, demo.url + "/trading")
    page = watched.page
    page.wait_for_function("window.dashboard.updates > 0", timeout=20_000)
    asked: list[str] = []

    def answer(dialog, accept: bool) -> None:
        asked.append(dialog.message)
        dialog.accept() if accept else dialog.dismiss()

    # Dismissed: nothing changes.
    page.once("dialog", lambda d: answer(d, False))
    page.click("#kill-button")
    time.sleep(1.0)
    assert asked == [CONFIRM[True]] and not kill_switch_path(demo.run_dir).exists()
    # Confirmed: the file execution reads appears, and execution acts on it.
    page.once("dialog", lambda d: answer(d, True))
    page.click("#kill-button")
    wait_for(lambda: kill_switch_path(demo.run_dir).exists(), 10, "the kill-switch file")
    page.wait_for_function("document.getElementById('kill-state').innerText === 'ON'",
                           timeout=10_000)
    wait_for(lambda: any(e["kind"] == "REJECTED" and e["reason"] == "risk:kill_switch"
                         for e in demo.events()), 60,
             "execution to reject an order with risk:kill_switch")
    _shot(page, "trading-kill-switch-on")
    page.once("dialog", lambda d: answer(d, True))
    page.click("#kill-button")
    wait_for(lambda: not kill_switch_path(demo.run_dir).exists(), 10, "the switch off")
    page.wait_for_function("document.getElementById('kill-state').innerText === 'off'",
                           timeout=10_000)
    assert asked == [CONFIRM[True], CONFIRM[True], CONFIRM[False]]
    assert watched.errors == []
    watched.close()


def test_bad_requests_get_errors_and_the_server_stays_up(demo):
    ws_url = demo.url.replace("http", "ws") + "/ws"
    ws = websocket.create_connection(ws_url, timeout=10)
    try:
        for message, expected in [("not json", "not JSON"), ("[1, 2]", "expected"),
                                  ('{"subscribe": "wallet"}', "unknown view"),
                                  ('{"subscribe": "symbol", "symbol": "NOPE"}',
                                   "unknown symbol"),
                                  ('{"subscribe": "symbol"}', "unknown symbol")]:
            ws.send(message)
            reply = json.loads(ws.recv())
            assert reply["type"] == "error" and expected in reply["error"], (message, reply)
        ws.send_binary(b"\x00\x01")
        assert "binary" in json.loads(ws.recv())["error"]
        ws.send('{"subscribe": "symbol", "symbol": "filusd"}')  # still served after all that
        reply = json.loads(ws.recv())
        assert reply["type"] == "symbol" and reply["data"]["symbol"] == "FILUSD"
    finally:
        ws.close()
    big = websocket.create_connection(ws_url, timeout=10)
    # One byte over MAX_MESSAGE (small enough to leave in one write, so the server's close
    # does not reset a send still under way): closed with 1009, message too big.
    big.send("x" * (MAX_MESSAGE + 1))
    opcode, data = big.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(data[:2], "big") == 1009
    big.shutdown()
    # HTTP: unknown symbol, backtest, file; a path that climbs out; kill-switch misuse.
    for path, status, text in [("/symbol/NOPE", 404, "no symbol 'NOPE'"),
                               ("/backtests/nope/report.html", 404, "no backtest run"),
                               ("/backtests/..%2F..%2Fsecrets/strategy-keys.json", 404, ""),
                               ("/static/../../pipeline/ops/settings.py", 404, ""),
                               ("/nowhere", 404, "")]:
        reply = requests.get(demo.url + path, timeout=10)
        assert reply.status_code == status and text in html.unescape(reply.text), (
            path, reply.status_code)
    post = demo.url + "/api/kill-switch"
    for kwargs, status in [({"data": "on=1"}, 415), ({"json": {"on": "yes"}}, 400),
                           ({"json": {"on": True, "confirm": "sure"}}, 400),
                           ({"json": {"on": True, "confirm": CONFIRM[True]},
                             "headers": {"Origin": "http://evil.example"}}, 403),
                           ({"data": "{", "headers": {"Content-Type": "application/json"}},
                            400)]:
        assert requests.post(post, timeout=10, **kwargs).status_code == status, kwargs
    assert not kill_switch_path(demo.run_dir).exists()
    assert requests.post(demo.url + "/", timeout=10).status_code == 405
    assert requests.get(demo.url + "/", timeout=10).status_code == 200


def test_no_page_shows_a_secret_and_other_machines_are_refused(demo, kafka, registry):
    keys = json.loads((demo.run_dir / "secrets" / "strategy-keys.json").read_text())
    secrets = list(keys.values())
    assert secrets
    seen = "".join(requests.get(demo.url + p, timeout=10).text
                   for p in ("/", "/symbol/FILUSD", "/trading", "/backtests"))
    ws = websocket.create_connection(demo.url.replace("http", "ws") + "/ws", timeout=10)
    ws.send(json.dumps({"subscribe": "topology"}))
    topology = json.loads(ws.recv())
    deadline = time.monotonic() + 30  # the first status the supervisor serves
    while topology["data"]["status"] is None and time.monotonic() < deadline:
        topology = json.loads(ws.recv())
    assert topology["data"]["status"]["processes"]
    seen += json.dumps(topology)
    for view in ("trading", "symbol"):
        ws.send(json.dumps({"subscribe": view, "symbol": "FILUSD"}))
        seen += ws.recv()
    ws.close()
    for secret in secrets:
        assert secret not in seen
    assert "strategy-keys" not in seen  # no command lines either
    # A dashboard listening on every address still serves only this machine.
    address = _outside_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address to connect from")
    port = free_port()
    env = cluster_env(kafka, registry.url, PIPELINE_RUN_DIR=str(demo.run_dir))
    web = subprocess.Popen([PIPELINE, "web", "--host", "0.0.0.0", "--port", str(port),
                            "--namespace", str(demo.namespace), "--symbols", "FILUSD"],
                           env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}"), 60, "the second dashboard")
        refused = requests.get(f"http://{address}:{port}/", timeout=10)
        assert refused.status_code == 403 and "this machine only" in refused.text
    finally:
        web.terminate()
        web.wait(timeout=20)


def _outside_address() -> str | None:
    """A non-loopback address of this machine, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


# --------------------------------------------------------------------------- Grafana


def samples(text: str) -> set[str]:
    return {line.split("{")[0].split()[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def test_every_metric_the_grafana_dashboard_queries_is_in_the_demos_exposition(demo):
    """docker/grafana's dashboard over the demo's /metrics, and `pipeline metrics` beside
    it (what compose runs): the dashboard queries nothing they lack."""
    supervised = demo.metrics_url
    port = free_port()
    beside = subprocess.Popen([PIPELINE, "metrics", "--port", str(port)], env=demo.env,
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

        reply = wait_for(lambda: beside.poll() is None and _reply(
            f"http://127.0.0.1:{port}/metrics"), 30, "`pipeline metrics`", 0.5)
        assert reply.status_code == 200, reply.text
        assert not missing_metrics(DASHBOARD, reply.text)
        ns = str(demo.namespace)
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
