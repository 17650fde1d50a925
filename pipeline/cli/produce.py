"""`pipeline produce` and `pipeline load`: live market data and history into Kafka."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.common import RunDirOption, console, settings_for, setup_logging
from pipeline.core.errors import PipelineError

produce_app = typer.Typer(no_args_is_help=True, help="Producers that write into Kafka.")


@produce_app.command("gemini")
def produce_gemini(
    run_dir: Optional[Path] = RunDirOption,
    namespace: str = typer.Option(None, "--namespace", "-n", envvar="PIPELINE_NAMESPACE",
                                  help="Topic namespace \\[default: live for Gemini, sim for "
                                       "any other URL]."),
    url: Optional[str] = typer.Option(None, help="Gemini, or the local venue (e.g. "
                                                 "ws://127.0.0.1:8090) \\[default: "
                                                 "wss://ws.gemini.com for ws, "
                                                 "wss://api.gemini.com for v1/v2]."),
    symbols: str = typer.Option("BTCUSD,ETHUSD", help="Comma-separated Gemini symbols."),
    protocol: str = typer.Option("ws", help="ws (Gemini's new WebSocket API, one connection), "
                                            "v2 (archived, one connection, l2) or v1 "
                                            "(archived, one per symbol)."),
    heartbeat_timeout: float = typer.Option(10.0, help="Seconds without a message that count "
                                                       "as a disconnect."),
    sandbox: bool = typer.Option(False, "--sandbox", help="Gemini's sandbox market data "
                                 "(wss://ws.sandbox.gemini.com), into the sim-sandbox namespace: "
                                 "the books sandbox execution checks its orders against."),
) -> None:
    """Stream Gemini market data into Kafka until SIGTERM/Ctrl-C."""
    from pipeline.avro.registry import SchemaRegistry
    from pipeline.avro.serde import Serde
    from pipeline.kafka.catalog import Namespace, ensure_topics
    from pipeline.ops.broker import bootstrap_servers
    from pipeline.ops.registry_server import registry_url
    from producers.gemini_ws import (
        GEMINI_NEW_WS,
        GEMINI_WS,
        PROTOCOLS,
        SANDBOX_NEW_WS,
        SANDBOX_WS,
        FeedConfig,
        base_for,
        run_producer,
    )

    if protocol not in PROTOCOLS:
        raise PipelineError(f"unknown protocol {protocol!r}: {', '.join(PROTOCOLS)}")
    if sandbox and url is None:
        url = SANDBOX_NEW_WS if protocol == "ws" else SANDBOX_WS
    url = base_for(protocol, url or (GEMINI_NEW_WS if protocol == "ws" else GEMINI_WS))
    settings = settings_for(run_dir)
    is_sandbox = "sandbox.gemini.com" in url
    is_gemini = "gemini.com" in url and not is_sandbox
    ns = Namespace(namespace or ("live" if is_gemini else "sim-sandbox" if is_sandbox else "sim"))
    if ns.is_live and not is_gemini:
        raise PipelineError(f"namespace {ns} is for Gemini's own data; {url} is not Gemini's "
                            "live market: use a sandbox or sim namespace")
    bootstrap = bootstrap_servers(settings)
    ensure_topics(bootstrap, ns, ["raw.frames", "md.l2", "md.trades", "dlq"])
    serde = Serde(SchemaRegistry(registry_url(settings)))
    config = FeedConfig(base_url=url.rstrip("/"), protocol=protocol,
                        symbols=[s.strip().upper() for s in symbols.split(",") if s.strip()],
                        heartbeat_timeout_s=heartbeat_timeout)
    setup_logging("INFO")
    stats = run_producer(config, bootstrap, serde, ns,
                         status_file=settings.run_dir / "status" / "producer-gemini.json")
    console.print(f"stopped: {stats.frames} frames, {stats.records} records, "
                  f"{stats.dead_letters} dead letters, {stats.reconnects} reconnects, "
                  f"{stats.update_gaps} update gaps")


load_app = typer.Typer(no_args_is_help=True, help="Load historical data into Kafka.")


@load_app.command("csv")
def load_csv(
    file: Path = typer.Argument(..., help="OHLCV CSV: Date,Symbol,Open,High,Low,Close,Volume "
                                          "or CryptoDataDownload's format."),
    run_dir: Optional[Path] = RunDirOption,
    namespace: str = typer.Option("sim", "--namespace", "-n",
                                  help="Topic namespace (sim or replay-x; never live)."),
    interval: Optional[str] = typer.Option(None, help="Bar interval (default: inferred)."),
    symbol: Optional[str] = typer.Option(None, help="Expected symbol (default: the file's)."),
) -> None:
    """Publish a historical OHLCV file as bars, in time order, onto <namespace>.bars."""
    from pipeline.kafka.catalog import Namespace
    from pipeline.ops.broker import bootstrap_servers
    from pipeline.ops.registry_server import registry_url
    from producers.csv_bars import load_csv_bars

    ns = Namespace(namespace)
    if ns.is_live:
        raise PipelineError("historical bars are not live data: load them into a sim or "
                            "replay namespace (e.g. -n sim)")
    settings = settings_for(run_dir)
    report = load_csv_bars(file, bootstrap_servers(settings), registry_url(settings), ns,
                           interval=interval, progress=True, symbol=symbol)
    for problem in report.problems:
        console.print(f"[yellow]skipped[/] line {problem.line}: {problem.reason}", highlight=False)
    already = f", {report.already} already there" if report.already else ""
    console.print(f"{report.published} {report.interval} {report.symbol} bars published to "
                  f"{report.topic} ({report.rows_read} rows read, {report.skipped} skipped"
                  f"{already}) in {report.parse_seconds + report.publish_seconds:.1f}s")


load_gemini_app = typer.Typer(no_args_is_help=True,
                              help="Backfill from Gemini's public history (REST).")
load_app.add_typer(load_gemini_app, name="gemini")
RestUrlOption = typer.Option(None, "--rest-url", help="Gemini's REST API, or the local venue "
                             "(e.g. http://127.0.0.1:8090) \\[default: GEMINI_REST_URL, else "
                             "https://api.gemini.com].")
BackfillNamespaceOption = typer.Option("sim", "--namespace", "-n",
                                       help="Topic namespace (sim or replay-x; never live).")


def _backfill_endpoints(run_dir: Optional[Path], rest_url: Optional[str]):
    from pipeline.ops.broker import bootstrap_servers
    from pipeline.ops.registry_server import registry_url

    settings = settings_for(run_dir)
    return (rest_url or settings.gemini_rest_url, bootstrap_servers(settings),
            registry_url(settings))


@load_gemini_app.command("trades")
def load_gemini_trades(
    symbol: str = typer.Option(..., "--symbol", "-s", help="Gemini symbol, e.g. BTCUSD."),
    since: Optional[str] = typer.Option(None, help="Start: an ISO time (UTC unless it says), "
                                                   "epoch ms, or tid:N (after trade N) "
                                                   "\\[default: the earliest trade Gemini has]."
                                                   " A run goes on after the newest trade "
                                                   "already in the topic."),
    until: Optional[str] = typer.Option(None, help="End (exclusive): an ISO time or epoch ms."),
    namespace: str = BackfillNamespaceOption,
    rest_url: Optional[str] = RestUrlOption,
    run_dir: Optional[Path] = RunDirOption,
    limit_trades: int = typer.Option(500, help="Trades per request (Gemini's maximum: 500)."),
    max_pages: Optional[int] = typer.Option(None, help="Stop after this many pages (the next "
                                                       "run goes on from there)."),
) -> None:
    """Load Gemini's public trade history onto <namespace>.md.trades, each trade once."""
    from pipeline.gemini.history import parse_since
    from pipeline.kafka.catalog import Namespace
    from pipeline.replay.ranges import to_ms, utc_text
    from producers.gemini_history import backfill_trades, refuse_live

    ns = Namespace(namespace)
    refuse_live(ns)
    start = parse_since(since)
    until_ms = to_ms(until, "--until")
    url, bootstrap, registry = _backfill_endpoints(run_dir, rest_url)
    report = backfill_trades(url, bootstrap, registry, ns, symbol, start, until_ms,
                             limit_trades, max_pages)
    calls = (f"{report.pages} page(s), {report.requests} request(s)"
             + (f", {report.rate_limited} rate-limited and retried" if report.rate_limited
                else ""))
    if report.loaded:
        console.print(f"{report.loaded} {report.symbol} trades loaded into {report.topic} "
                      f"(tid {report.first_tid} to {report.last_tid}; {calls})", highlight=False)
        if not report.complete:
            console.print(f"stopped after {report.pages} page(s) (--max-pages): run it again "
                          "to go on", highlight=False)
    elif report.resumed_from is not None:
        console.print(f"0 trades loaded: {report.topic} already has every {report.symbol} trade "
                      f"Gemini has after {start} (up to tid {report.resumed_from}"
                      f"{', before ' + utc_text(until_ms) if until_ms is not None else ''})",
                      highlight=False)
    else:
        console.print(f"nothing to load: Gemini has no {report.symbol} trades after {start}"
                      f"{' before ' + utc_text(until_ms) if until_ms is not None else ''}; "
                      "nothing was written", highlight=False)


@load_gemini_app.command("candles")
def load_gemini_candles(
    symbol: str = typer.Option(..., "--symbol", "-s", help="Gemini symbol, e.g. BTCUSD."),
    interval: str = typer.Option("1h", help="1m, 5m, 15m, 1h or 1d (Gemini's 1hr, 1day "
                                            "are taken too)."),
    namespace: str = BackfillNamespaceOption,
    rest_url: Optional[str] = RestUrlOption,
    run_dir: Optional[Path] = RunDirOption,
) -> None:
    """Load Gemini's closed candles as bars onto <namespace>.bars, none twice."""
    from pipeline.gemini.history import time_frame
    from pipeline.kafka.catalog import Namespace
    from producers.gemini_history import backfill_candles, refuse_live

    ns = Namespace(namespace)
    refuse_live(ns)
    time_frame(interval)  # an unknown interval fails before anything connects
    url, bootstrap, registry = _backfill_endpoints(run_dir, rest_url)
    report = backfill_candles(url, bootstrap, registry, ns, symbol, interval)
    if not report.candles:
        console.print(f"nothing to load: Gemini has no closed {report.time_frame} "
                      f"{report.symbol} candles; nothing was written", highlight=False)
        return
    already = f", {report.already} already there" if report.already else ""
    console.print(f"{report.published} {report.interval} {report.symbol} bars published to "
                  f"{report.topic} from {report.candles} {report.time_frame} candles{already}",
                  highlight=False)
