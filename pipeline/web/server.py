"""The dashboard's HTTP and WebSocket server (aiohttp).

Pages are one HTML shell each (topology, symbol, trading, backtests); ``static/app.js``
subscribes over ``/ws`` and redraws when the server pushes a newer view. The protocol:
the browser sends ``{"subscribe": "topology" | "trading" | "symbol", "symbol": "X"}``; the
server answers ``{"type": <view>, "data": {...}, "server_ms": ...}`` whenever the view
changes, or ``{"type": "error", "error": "..."}`` for a message it cannot take (the
socket stays open; one larger than :data:`MAX_MESSAGE` closes it with code 1009).

Only this machine is served unless ``allow_remote``; the kill switch's POST needs the
confirmation text, JSON, and an Origin of this server (no cross-site form can flip it).
"""

from __future__ import annotations

import asyncio
import html
import ipaddress
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import requests
from aiohttp import WSCloseCode, WSMsgType, web

from pipeline.ops import kill_switch
from pipeline.web.state import Dashboard

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_MESSAGE = 4096  # bytes a browser may send in one WebSocket message
PUSH_INTERVAL_S = 0.25
STATUS_INTERVAL_S = 2.0
VIEWS = ("topology", "trading", "symbol")
BACKTEST_FILES = ("report.html", "sweep.html", "equity.png", "stats.json", "trades.csv",
                  "equity.csv", "sweep.csv", "summary.json")


def plotly_js() -> Path:
    """plotly.js as the plotly wheel ships it: served, never fetched."""
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


@dataclass
class WebConfig:
    run_dir: Path
    namespace: str
    symbols: list[str]
    status_url: str | None = None  # the supervisor's /status.json
    allow_remote: bool = False
    bar_interval: str = "1m"  # the candles


class ViewSource:
    """What the pushes read: the dashboard (under the feed's lock) and the status."""

    def __init__(self, config: WebConfig, dashboard: Dashboard, lock: threading.Lock,
                 feed_stats: Callable[[], dict[str, Any]] = dict) -> None:
        self.config, self.dashboard, self.lock = config, dashboard, lock
        self.feed_stats = feed_stats
        self.status: dict[str, Any] | None = None
        self.status_error: str | None = None
        self.status_version = 0

    def refresh_status(self) -> None:
        """The supervisor's collection (blocking: run it in a thread)."""
        if self.config.status_url is None:
            self.status_error = "no supervisor status URL (pipeline web --status-url)"
        else:
            try:
                reply = requests.get(self.config.status_url, timeout=5)
                reply.raise_for_status()
                self.status, self.status_error = reply.json(), None
            except (requests.RequestException, ValueError) as exc:
                self.status_error = f"the supervisor's status is unavailable: {exc}"
        self.status_version += 1

    def version(self, view: str, symbol: str | None) -> tuple[Any, ...]:
        if view == "topology":
            return (self.status_version,)
        if view == "trading":
            with self.lock:
                version = self.dashboard.versions["trading"]
            return (version, kill_switch.is_on(self.config.run_dir))
        with self.lock:
            return (self.dashboard.versions[str(symbol)],)

    def view(self, name: str, symbol: str | None) -> dict[str, Any]:
        if name == "topology":
            return {"status": self.status, "error": self.status_error,
                    "feed": self.feed_stats(), "namespace": self.config.namespace,
                    "symbols": self.config.symbols,
                    "kill_switch": kill_switch.is_on(self.config.run_dir)}
        if name == "trading":
            with self.lock:
                data = self.dashboard.trading_view()
            return data | {"kill_switch": kill_switch.is_on(self.config.run_dir)}
        with self.lock:
            return self.dashboard.symbol_view(str(symbol))


def parse_subscription(text: str, dashboard: Dashboard) -> tuple[str, str | None]:
    """A browser's subscribe message -> (view, symbol); ValueError says what is wrong."""
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} at {exc.pos}") from None
    if not isinstance(message, dict) or "subscribe" not in message:
        raise ValueError('expected {"subscribe": "topology" | "trading" | "symbol"}')
    view = message["subscribe"]
    if view not in VIEWS:
        raise ValueError(f"unknown view {str(view)[:40]!r}: one of {', '.join(VIEWS)}")
    if view != "symbol":
        return view, None
    symbol = message.get("symbol")
    if not isinstance(symbol, str) or not dashboard.knows(symbol):
        raise ValueError(f"unknown symbol {str(symbol)[:40]!r}: one of "
                         f"{', '.join(dashboard.symbols)}")
    return view, symbol.upper()


# -------------------------------------------------------------------------- pages

def _nav(config: WebConfig, active: str) -> str:
    links = [("/", "Topology"), ("/trading", "Trading"), ("/backtests", "Backtests")]
    items = "".join(f'<a href="{href}"{" class=active" if label.lower() == active else ""}>'
                    f"{label}</a>" for href, label in links)
    symbols = "".join(f'<a href="/symbol/{html.escape(s)}"'
                      f'{" class=active" if s == active else ""}>{html.escape(s)}</a>'
                      for s in config.symbols)
    return (f'<nav><span class="brand">pipeline · {html.escape(config.namespace)}</span>'
            f'{items}<span class="symbols">{symbols}</span></nav>')


def page(config: WebConfig, title: str, body: str, active: str = "",
         data: dict[str, str] | None = None, scripts: bool = True) -> str:
    attrs = "".join(f' data-{k}="{html.escape(v)}"' for k, v in (data or {}).items())
    js = ('<script src="/static/plotly.min.js"></script><script src="/static/app.js">'
          "</script>") if scripts else ""
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>{html.escape(title)}</title><link rel=icon href='data:,'>"
            "<link rel=stylesheet href='/static/style.css'></head>"
            f"<body{attrs}>{_nav(config, active)}<main>{body}</main>{js}</body></html>")


def error_page(config: WebConfig, status: int, message: str) -> web.Response:
    body = f'<h1>{status}</h1><p class="error" id="error">{html.escape(message)}</p>'
    return web.Response(status=status, content_type="text/html",
                        text=page(config, f"{status}", body, scripts=False))


def _backtest_runs(run_dir: Path) -> list[dict[str, Any]]:
    root = run_dir / "backtests"
    runs = []
    for directory in sorted(root.iterdir() if root.is_dir() else [], reverse=True):
        if not directory.is_dir():
            continue
        stats: dict[str, Any] = {}
        try:
            stats = json.loads((directory / "stats.json").read_text())
        except (OSError, ValueError):
            pass
        runs.append({"name": directory.name, "stats": stats,
                     "files": [f for f in BACKTEST_FILES if (directory / f).is_file()],
                     "modified": directory.stat().st_mtime})
    return runs


def _stat(stats: dict[str, Any], *keys: str) -> str:
    for key in keys:
        if key in stats and stats[key] is not None:
            return html.escape(str(stats[key]))
    return ""


# -------------------------------------------------------------------------- app

def make_app(config: WebConfig, source: ViewSource) -> web.Application:
    """The aiohttp application; ``source`` gives the views."""

    @web.middleware
    async def guard(request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if not config.allow_remote and not _is_local(request.remote):
            log.warning("refused a request from %s", request.remote)
            return error_page(config, 403, "this dashboard serves this machine only "
                                           "(pipeline web --allow-remote to change that)")
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_page(config, exc.status, exc.text or exc.reason)
        except Exception:  # noqa: BLE001 - one bad request never stops the server
            log.exception("error serving %s", request.path)
            return error_page(config, 500, "the dashboard failed on this request; "
                                           "its log says why")

    async def topology_page(request: web.Request) -> web.Response:
        body = ("<h1>Topology</h1><p id=summary></p><h2>Processes</h2><div id=processes></div>"
                "<h2>Consumer groups</h2><div id=groups></div><h2>Topics</h2>"
                "<div id=topics></div>")
        return web.Response(content_type="text/html", text=page(
            config, "Topology", body, "topology", {"page": "topology"}))

    async def symbol_page(request: web.Request) -> web.Response:
        symbol = request.match_info["symbol"].upper()
        if not source.dashboard.knows(symbol):
            raise web.HTTPNotFound(text=f"no symbol {symbol[:40]!r} in this topology: "
                                        f"{', '.join(config.symbols)}")
        body = (f"<h1>{html.escape(symbol)}</h1><p id=top>waiting for the first book "
                "snapshot…</p><div class=row><div id=depth class=chart></div>"
                "<div id=candles class=chart></div></div><h2>Book health</h2>"
                "<div id=health></div>")
        return web.Response(content_type="text/html", text=page(
            config, symbol, body, symbol, {"page": "symbol", "symbol": symbol}))

    async def trading_page(request: web.Request) -> web.Response:
        body = ("<h1>Trading</h1><p>Kill switch: <b id=kill-state>…</b> "
                "<button id=kill-button type=button>…</button></p>"
                "<p id=counts></p><h2>Strategies</h2><div id=strategies></div>"
                "<div id=equity class=chart></div><h2>Positions</h2><div id=positions></div>"
                "<h2>Open orders</h2><div id=orders></div><h2>Fills</h2><div id=fills></div>"
                "<h2>Rejections</h2><div id=rejections></div>")
        return web.Response(content_type="text/html", text=page(
            config, "Trading", body, "trading",
            {"page": "trading", "confirm-on": kill_switch.CONFIRM[True],
             "confirm-off": kill_switch.CONFIRM[False]}))

    async def backtests_page(request: web.Request) -> web.Response:
        runs = await asyncio.to_thread(_backtest_runs, config.run_dir)
        rows = "".join(
            f"<tr><td>{html.escape(r['name'])}</td>"
            f"<td>{_stat(r['stats'], 'Return [%]', 'return_pct')}</td>"
            f"<td>{_stat(r['stats'], '# Trades', 'trades')}</td>"
            f"<td>{_stat(r['stats'], 'Max. Drawdown [%]', 'max_drawdown_pct')}</td><td>"
            + " ".join(f'<a href="/backtests/{html.escape(r["name"])}/{f}">{f}</a>'
                       for f in r["files"]) + "</td></tr>" for r in runs)
        body = ("<h1>Backtests</h1>" + (
            "<table id=backtests><tr><th>run</th><th>return %</th><th>trades</th>"
            f"<th>max drawdown %</th><th>files</th></tr>{rows}</table>" if runs else
            f"<p id=backtests>No runs under {html.escape(str(config.run_dir / 'backtests'))}"
            " yet: <code>pipeline backtest … --html</code> writes one.</p>"))
        return web.Response(content_type="text/html", text=page(
            config, "Backtests", body, "backtests", scripts=False))

    async def backtest_file(request: web.Request) -> web.StreamResponse:
        name, file = request.match_info["name"], request.match_info["file"]
        directory = config.run_dir / "backtests" / name
        known = {r["name"] for r in await asyncio.to_thread(_backtest_runs, config.run_dir)}
        if name not in known:
            raise web.HTTPNotFound(text=f"no backtest run {name[:80]!r}")
        if file not in BACKTEST_FILES or not (directory / file).is_file():
            raise web.HTTPNotFound(text=f"run {name[:80]!r} has no {file[:40]!r}")
        return web.FileResponse(directory / file)

    async def static(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name == "plotly.min.js":
            return web.FileResponse(plotly_js())
        if name not in ("app.js", "style.css"):
            raise web.HTTPNotFound(text=f"no static file {name[:40]!r}")
        return web.FileResponse(STATIC / name)

    async def set_kill_switch(request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            return web.json_response({"error": "cross-origin request refused"}, status=403)
        if request.content_type != "application/json":
            return web.json_response({"error": "send JSON"}, status=415)
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "not JSON"}, status=400)
        if not isinstance(body, dict) or not isinstance(body.get("on"), bool):
            return web.json_response({"error": 'expected {"on": true|false, "confirm": ...}'},
                                     status=400)
        on = body["on"]
        if body.get("confirm") != kill_switch.CONFIRM[on]:
            return web.json_response({"error": "not confirmed: send the confirmation text "
                                               "the page shows"}, status=400)
        state = await asyncio.to_thread(kill_switch.turn, config.run_dir, on)
        log.warning("kill switch turned %s from the dashboard (%s)", "ON" if state else "off",
                    request.remote)
        return web.json_response({"kill_switch": state})

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, heartbeat=30)
        await ws.prepare(request)
        wanted: dict[str, Any] = {"view": None, "symbol": None, "sent": None}

        async def push() -> None:
            while not ws.closed:
                view, symbol = wanted["view"], wanted["symbol"]
                if view is not None:
                    version = (view, symbol, *source.version(view, symbol))
                    if version != wanted["sent"]:
                        data = source.view(view, symbol)
                        await ws.send_json({"type": view, "data": data,
                                            "server_ms": int(time.time() * 1000)})
                        wanted["sent"] = version
                await asyncio.sleep(PUSH_INTERVAL_S)

        pusher = asyncio.create_task(push())
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    try:
                        view, symbol = parse_subscription(msg.data, source.dashboard)
                    except ValueError as exc:
                        await ws.send_json({"type": "error", "error": str(exc)})
                        continue
                    wanted.update(view=view, symbol=symbol, sent=None)
                elif msg.type == WSMsgType.BINARY:
                    await ws.send_json({"type": "error", "error": "binary messages are not "
                                                                  "understood: send JSON text"})
                elif msg.type == WSMsgType.ERROR:
                    log.info("a dashboard socket closed: %s", ws.exception())
                    break
        finally:
            pusher.cancel()
            if not ws.closed:
                await ws.close(code=WSCloseCode.GOING_AWAY)
        return ws

    async def refresh_status(app: web.Application) -> None:
        while True:
            await asyncio.to_thread(source.refresh_status)
            await asyncio.sleep(STATUS_INTERVAL_S)

    async def start_background(app: web.Application):
        task = asyncio.create_task(refresh_status(app))
        yield
        task.cancel()

    app = web.Application(middlewares=[guard], client_max_size=64 * 1024)
    app.cleanup_ctx.append(start_background)
    app.router.add_get("/", topology_page)
    app.router.add_get("/symbol/{symbol}", symbol_page)
    app.router.add_get("/trading", trading_page)
    app.router.add_get("/backtests", backtests_page)
    app.router.add_get("/backtests/{name}/{file}", backtest_file)
    app.router.add_get("/static/{name}", static)
    app.router.add_post("/api/kill-switch", set_kill_switch)
    app.router.add_get("/ws", socket)
    return app


def _is_local(remote: str | None) -> bool:
    if remote is None:
        return False
    try:
        return ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


def serve(config: WebConfig, bootstrap: str, registry_url: str, host: str, port: int) -> None:
    """Run the dashboard until interrupted: the feed thread, then the server."""
    from pipeline.kafka.catalog import Namespace
    from pipeline.web.feed import Feed

    lock = threading.Lock()
    dashboard = Dashboard(config.symbols, config.bar_interval)
    feed = Feed(bootstrap, registry_url, Namespace(config.namespace), dashboard, lock)

    def feed_stats() -> dict[str, Any]:
        stats = feed.stats
        return {"records": stats.records, "bad": dict(stats.bad), "missing": stats.missing,
                "error": stats.error, "alive": feed.is_alive()}

    source = ViewSource(config, dashboard, lock, feed_stats)
    feed.start()
    try:
        log.info("dashboard on http://%s:%d/", host, port)
        web.run_app(make_app(config, source), host=host, port=port, print=None,
                    access_log=None, handle_signals=True)
    finally:
        feed.stop()
        feed.join(timeout=5)
