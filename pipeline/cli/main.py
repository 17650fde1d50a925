"""The ``pipeline`` command. Every failure the user can act on ends in one error line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import typer
from confluent_kafka import KafkaException
from rich.console import Console
from rich.table import Table

from pipeline.core.errors import PipelineError
from pipeline.ops.services import DetachedService, ServiceState

if TYPE_CHECKING:
    from pipeline.ops.broker import LocalCluster

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Gemini market data and trading on Apache Kafka.")
broker_app = typer.Typer(no_args_is_help=True, help="The local Apache Kafka broker (KRaft).")
app.add_typer(broker_app, name="broker")
registry_app = typer.Typer(no_args_is_help=True,
                           help="The local schema registry (Apicurio Registry, KafkaSQL storage).")
app.add_typer(registry_app, name="registry")
schemas_app = typer.Typer(no_args_is_help=True,
                          help="Avro schemas in schemas/ and the schema registry.")
app.add_typer(schemas_app, name="schemas")

# Piped output (logs, scripts, tests) gets whole lines, not an 80-column squeeze.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
RunDirOption = typer.Option(None, "--run-dir", envvar="PIPELINE_RUN_DIR",
                            help="Where logs, broker data and state live \\[default: ./run].")


def _settings(run_dir: Optional[Path]):
    from pipeline.ops.settings import Settings

    settings = Settings.from_env(run_dir)
    if not settings.bootstrap_servers:
        from pipeline.ops.broker import LocalBroker

        # The run dir's broker, if secured, is the operator's: commands connect as admin
        # unless KAFKA_SECURITY_*/KAFKA_CLIENT_PROPERTIES say otherwise.
        LocalBroker.from_settings(settings).state()
    return settings


@broker_app.command("start")
def broker_start(
    run_dir: Optional[Path] = RunDirOption,
    port: int = typer.Option(9092, help="Client port (0 picks a free one); node i of a "
                             "cluster listens on port + 10*(i-1)."),
    controller_port: int = typer.Option(9093, help="KRaft controller port (0 picks a free "
                                        "one); node i of a cluster: + 10*(i-1)."),
    nodes: int = typer.Option(1, min=1, help="Nodes: 1 broker, or a cluster of N (each a "
                              "broker and controller voter; 3+ replicate every topic 3 ways)."),
    secure: bool = typer.Option(False, "--secure", help="SASL_SSL with SCRAM users and ACLs, "
                                "one principal per role (pipeline/ops/broker_secure.py), one node; "
                                "a run directory's broker stays secured once it was."),
) -> None:
    """Start the broker or cluster (a second start is harmless, and restarts a node that
    died); download the jars on first use."""
    from pipeline.ops.broker import local_kafka

    settings = _settings(run_dir)
    if secure and nodes != 1:
        raise PipelineError("--secure runs one node: a secured cluster is not built yet")
    kafka = local_kafka(settings.run_dir, nodes=nodes)
    secured = {"secure": True} if secure else {}  # an option of the single broker's start
    started = _start_service("KAFKA_BOOTSTRAP_SERVERS", settings.bootstrap_servers, kafka,
                             lambda: kafka.start(port=port, controller_port=controller_port,
                                                 quiet=False, **secured))
    if started:
        state, verb = started
        what = f"pid {state.pid}" if nodes == 1 else f"{nodes} nodes, KRaft quorum of {nodes}"
        console.print(f"Kafka {state.kafka_version} {verb} on {state.bootstrap_servers} "
                      f"({what}, logs in {kafka.log_dir})")
        from pipeline.ops.broker_secure import SecureFiles

        files = SecureFiles(kafka.home)
        if files.exists:
            console.print(f"secured: SASL_SSL/SCRAM-SHA-512, CA {files.ca}, one principal per "
                          f"role, passwords (mode 0600) in {files.secrets}")


def _start_service(env_var: str, external: str | None, service: "DetachedService | LocalCluster",
                   start: Callable[[], ServiceState]) -> tuple[ServiceState, str] | None:
    """What `broker start` and `registry start` share: an external service (``env_var``
    set) means starting nothing; else start ours, a second start being harmless. Returns
    (state, "started" or "already running"), or None when external."""
    if external:
        console.print(f"{env_var} is set: using {external}, starting nothing")
        return None
    already = service.state()
    return start(), "already running" if already else "started"


def _stop_service(env_var: str, external: str | None, service: "DetachedService | LocalCluster",
                  what: str) -> None:
    """What `broker stop` and `registry stop` share."""
    if external:
        console.print(f"{env_var} is set: nothing was started, nothing to stop")
        return
    console.print(f"{what} stopped" if service.stop() else f"no {what} was running")


@broker_app.command("stop")
def broker_stop(run_dir: Optional[Path] = RunDirOption) -> None:
    """Stop the broker (or every node of the cluster) gracefully; nothing is left running."""
    from pipeline.ops.broker import local_kafka

    settings = _settings(run_dir)
    kafka = local_kafka(settings.run_dir)
    _stop_service("KAFKA_BOOTSTRAP_SERVERS", settings.bootstrap_servers, kafka, kafka.what)


@broker_app.command("status")
def broker_status(run_dir: Optional[Path] = RunDirOption) -> None:
    """Where the broker is, whether it answers, and the version it reports."""
    from pipeline.kafka.cluster_health import describe_cluster
    from pipeline.ops.broker import (
        LocalBroker,
        bootstrap_servers,
        broker_answers,
        local_kafka,
        reported_version,
    )

    settings = _settings(run_dir)
    bootstrap = bootstrap_servers(settings)
    if not broker_answers(bootstrap):
        raise PipelineError(f"Kafka at {bootstrap} does not answer")
    features = reported_version(settings)
    kafka = None if settings.external_kafka else local_kafka(settings.run_dir)
    state = None if kafka is None else kafka.state()
    if state is None:
        where = "external cluster"
    elif isinstance(kafka, LocalBroker):
        where = f"local broker, pid {state.pid}"
    else:
        where = f"local cluster of {state.nodes}"
    console.print(f"Kafka at {bootstrap} ({where}) answers; "
                  f"metadata.version {features['metadata.version']}")
    console.print(_cluster_tables(describe_cluster(bootstrap)))


@registry_app.command("start")
def registry_start(run_dir: Optional[Path] = RunDirOption,
                   port: int = typer.Option(8081, help="HTTP port (0 picks a free one).")) -> None:
    """Start the registry on the pipeline's Kafka (a second start is harmless)."""
    from pipeline.ops.broker import bootstrap_servers
    from pipeline.ops.registry_server import LocalRegistry

    settings = _settings(run_dir)
    registry = LocalRegistry.from_settings(settings)
    started = _start_service("SCHEMA_REGISTRY_URL", settings.schema_registry_url, registry,
                             lambda: registry.start(bootstrap_servers(settings), port=port,
                                                    quiet=False))
    if started:
        state, verb = started
        console.print(f"Apicurio Registry {state.version} {verb} at {state.url} (pid "
                      f"{state.pid}, schemas stored in Kafka at {state.bootstrap_servers}, "
                      f"log {registry.log_file})")


@registry_app.command("stop")
def registry_stop(run_dir: Optional[Path] = RunDirOption) -> None:
    """Stop the local registry; its schemas stay in Kafka."""
    from pipeline.ops.registry_server import LocalRegistry

    settings = _settings(run_dir)
    _stop_service("SCHEMA_REGISTRY_URL", settings.schema_registry_url,
                  LocalRegistry.from_settings(settings), "schema registry")


@registry_app.command("status")
def registry_status(run_dir: Optional[Path] = RunDirOption) -> None:
    """Where the registry is and whether it answers."""
    from pipeline.ops.registry_server import ccompat_answers, registry_url

    url = registry_url(_settings(run_dir))
    if not ccompat_answers(url):
        raise PipelineError(f"the schema registry at {url} does not answer")
    console.print(f"schema registry at {url} answers; "
                  f"{len(_registry(run_dir).subjects())} subject(s)")


@app.command("topics")
def topics(
    run_dir: Optional[Path] = RunDirOption,
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n",
                                            help="Only this namespace (live, sim-x, replay-x)."),
    create: bool = typer.Option(False, "--create", help="Create the namespace's missing topics."),
    delete: bool = typer.Option(False, "--delete", help="Delete every topic of the namespace."),
) -> None:
    """List the catalog's topics with partitions and end offsets (optionally create/delete)."""
    from pipeline.kafka.catalog import Namespace, delete_namespace, describe_topics, ensure_topics
    from pipeline.ops.broker import bootstrap_servers

    settings = _settings(run_dir)
    ns = Namespace(namespace) if namespace else None
    if (create or delete) and ns is None:
        raise PipelineError("--create and --delete need --namespace")
    bootstrap = bootstrap_servers(settings)
    if create:
        created = ensure_topics(bootstrap, ns)  # type: ignore[arg-type]
        console.print(f"created {len(created)} topic(s) in namespace {ns}")
    if delete:
        deleted = delete_namespace(bootstrap, ns)  # type: ignore[arg-type]
        console.print(f"deleted {len(deleted)} topic(s) of namespace {ns}")
        return
    table = Table(title=f"topics on {bootstrap}")
    for column in ("topic", "partitions", "end offsets", "records", "cleanup", "key"):
        table.add_column(column, justify="right" if column in ("partitions", "records") else "left",
                         no_wrap=column == "topic")
    infos = describe_topics(bootstrap, ns)
    for info in infos:
        table.add_row(info.name, str(info.partitions), " ".join(map(str, info.end_offsets)),
                      str(info.records), info.cleanup_policy, info.key)
    if not infos:
        hint = f" in namespace {ns}" if ns else ""
        console.print(f"no pipeline topics{hint} yet: `pipeline topics --create -n NAMESPACE`")
        return
    console.print(table)


NamespaceOption = typer.Option("live", "--namespace", "-n", envvar="PIPELINE_NAMESPACE",
                               help="Namespace whose topics' subjects to work on.")


def _registry(run_dir: Optional[Path]):
    from pipeline.avro.registry import SchemaRegistry
    from pipeline.ops.registry_server import registry_url

    return SchemaRegistry(registry_url(_settings(run_dir)))


@schemas_app.command("register")
def schemas_register(run_dir: Optional[Path] = RunDirOption, namespace: str = NamespaceOption,
                     level: str = typer.Option("BACKWARD", help="Compatibility level for new "
                                                                "subjects.")) -> None:
    """Register every topic's schema under <topic>-value (idempotent)."""
    from pipeline.avro.schemas import register_namespace
    from pipeline.kafka.catalog import Namespace

    done = register_namespace(_registry(run_dir), Namespace(namespace), level.upper())
    table = Table(title=f"registered in namespace {namespace}")
    for column in ("subject", "record", "id", "version"):
        table.add_column(column, no_wrap=column == "subject")
    for reg in done:
        table.add_row(reg.subject, reg.record, str(reg.schema_id), str(reg.version))
    console.print(table)


@schemas_app.command("list")
def schemas_list(run_dir: Optional[Path] = RunDirOption) -> None:
    """Subjects in the registry with their versions, latest id and compatibility level."""
    registry = _registry(run_dir)
    table = Table(title=f"subjects in {registry.url}")
    for column in ("subject", "versions", "latest id", "compatibility"):
        table.add_column(column, no_wrap=column == "subject")
    for subject in sorted(registry.subjects()):
        latest = registry.latest(subject)
        table.add_row(subject, " ".join(map(str, registry.versions(subject))),
                      str(latest[1]) if latest else "-", registry.compatibility(subject))
    console.print(table)


@schemas_app.command("check")
def schemas_check(run_dir: Optional[Path] = RunDirOption, namespace: str = NamespaceOption,
                  directory: Path = typer.Option(None, "--dir", help="Schema folder to check "
                                                 "\\[default: schemas/].")) -> None:
    """Are the repo's .avsc files compatible with what the registry holds? Exit 1 if not."""
    from pipeline.avro.schemas import SCHEMA_DIR, check_namespace
    from pipeline.kafka.catalog import Namespace

    results = check_namespace(_registry(run_dir), Namespace(namespace), directory or SCHEMA_DIR)
    bad = 0
    for result in results:
        mark = {"incompatible": "[red]✗[/]", "compatible": "[green]✓[/]"}.get(result.status, "·")
        console.print(f"{mark} {result.subject} ({result.record}): {result.status}")
        for problem in result.problems:
            console.print(f"    [red]{problem}[/]", highlight=False)
        for warning in result.warnings:
            console.print(f"    [yellow]warning:[/] {warning}", highlight=False)
        bad += result.status == "incompatible"
    if bad:
        raise PipelineError(f"{bad} schema(s) incompatible with the registry at "
                            f"{_registry(run_dir).url}")


produce_app = typer.Typer(no_args_is_help=True, help="Producers that write into Kafka.")
app.add_typer(produce_app, name="produce")


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
                                 "(wss://ws.sandbox.gemini.com), into the sandbox namespace: "
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
    settings = _settings(run_dir)
    is_sandbox = "sandbox.gemini.com" in url
    is_gemini = "gemini.com" in url and not is_sandbox
    ns = Namespace(namespace or ("live" if is_gemini else "sandbox" if is_sandbox else "sim"))
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
app.add_typer(load_app, name="load")


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
    settings = _settings(run_dir)
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

    settings = _settings(run_dir)
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


bars_app = typer.Typer(no_args_is_help=True, help="OHLCV bars written by the bars group.")
app.add_typer(bars_app, name="bars")


@bars_app.command("read")
def bars_read(
    symbol: str = typer.Argument(..., help="e.g. BTCUSD"),
    run_dir: Optional[Path] = RunDirOption,
    namespace: str = typer.Option("sim", "--namespace", "-n"),
    interval: str = typer.Option("1m", help="1m, 5m, 1h, 1d, ..."),
    start: Optional[str] = typer.Option(None, help="ISO time, inclusive (UTC)."),
    end: Optional[str] = typer.Option(None, help="ISO time, exclusive (UTC)."),
    root: Optional[Path] = typer.Option(None, help="Parquet root \\[default: "
                                                   "<run_dir>/parquet/<namespace>/bars]."),
) -> None:
    """Print the bars of SYMBOL from Parquet (`read_bars` returns the same DataFrame)."""
    import pandas as pd

    from pipeline.sinks.bars import read_bars

    settings = _settings(run_dir)
    root = root or settings.run_dir / "parquet" / namespace / "bars"
    frame = read_bars(root, symbol.upper(), interval,
                      pd.Timestamp(start, tz="UTC") if start else None,
                      pd.Timestamp(end, tz="UTC") if end else None)
    if frame.empty:
        raise PipelineError(f"no {interval} bars of {symbol.upper()} in {root}"
                            + (f" between {start} and {end}" if start or end else ""))
    console.print(frame.to_string(max_rows=60))
    console.print(f"{len(frame)} bar(s)")


archive_app = typer.Typer(no_args_is_help=True,
                          help="The Parquet market-data archive written by the archive group.")
app.add_typer(archive_app, name="archive")
ArchiveRootOption = typer.Option(None, "--root", help="The archive \\[default: "
                                 "<run_dir>/parquet/<namespace>/archive].")


@archive_app.command("query")
def archive_query(
    sql: str = typer.Argument(..., help="SQL over the views l2, l2_changes, trades, bars, "
                                        "frames (DuckDB)."),
    namespace: str = typer.Option("sim", "--namespace", "-n"),
    run_dir: Optional[Path] = RunDirOption, root: Optional[Path] = ArchiveRootOption,
    csv: Optional[Path] = typer.Option(None, help="Write the result to this CSV file."),
    parquet: Optional[Path] = typer.Option(None, help="Write the result to this Parquet file."),
    limit: int = typer.Option(50, help="Rows printed (files get every row)."),
) -> None:
    """Run SQL on the archive with DuckDB; print a table or write CSV/Parquet."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from pipeline.replay.archive import query

    table = query(sql, namespace, run_dir=run_dir, root=root)
    if csv is not None:
        pacsv.write_csv(table, csv)
    if parquet is not None:
        pq.write_table(table, parquet)
    if csv is not None or parquet is not None:
        console.print(f"{table.num_rows:,} row(s) written to "
                      f"{', '.join(str(p) for p in (csv, parquet) if p)}", highlight=False)
        return
    view = Table(*table.column_names, box=None)
    for row in table.slice(0, limit).to_pylist():
        view.add_row(*("" if v is None else str(v) for v in row.values()))
    console.print(view)
    if table.num_rows > limit:
        console.print(f"({table.num_rows:,} rows; {limit} shown: --limit, --csv or --parquet "
                      "for more)", highlight=False)


@archive_app.command("compact")
def archive_compact(
    namespace: str = typer.Option("sim", "--namespace", "-n"),
    run_dir: Optional[Path] = RunDirOption, root: Optional[Path] = ArchiveRootOption,
    before: Optional[str] = typer.Option(None, help="Compact days before this one "
                                                    "(YYYY-MM-DD) \\[default: today, UTC]."),
) -> None:
    """Merge the small files of each closed day into one file per directory."""
    from pipeline.replay.archive import resolve_root
    from pipeline.sinks.archive import compact

    report = compact(resolve_root(namespace, run_dir, root), before_day=before)
    console.print(f"{report.files_merged} file(s) in {report.directories} director"
                  f"{'y' if report.directories == 1 else 'ies'} merged into "
                  f"{report.files_written} ({report.rows:,} rows)", highlight=False)


@archive_app.command("ls")
def archive_ls(namespace: str = typer.Option("sim", "--namespace", "-n"),
               run_dir: Optional[Path] = RunDirOption,
               root: Optional[Path] = ArchiveRootOption) -> None:
    """What the archive holds: files, records and days per topic."""
    from pipeline.replay.archive import resolve_root
    from pipeline.sinks.archive import ARCHIVED, data_files, file_metadata, period_value

    base = resolve_root(namespace, run_dir, root)
    view = Table("topic", "files", "records", "first day", "last day", box=None)
    for topic in ARCHIVED:
        files = data_files(base, topic)
        if not files:
            continue
        days = sorted(period_value(p.parent) for p in files)
        view.add_row(topic, f"{len(files):,}", f"{sum(file_metadata(f).num_rows for f in files):,}",
                     days[0], days[-1])
    console.print(view if view.row_count else f"nothing archived under {base}")


@app.command("backtest")
def backtest(
    strategy: str = typer.Argument(..., help="The strategy, module:Class "
                                             "(e.g. pipeline.strategy:SmaCross)."),
    run_dir: Optional[Path] = RunDirOption,
    namespace: str = typer.Option("sim", "--namespace", "-n",
                                  help="Namespace whose topics are replayed."),
    params: str = typer.Option("{}", help='Strategy parameters, a JSON object: '
                                           '\'{"fast": 10, "slow": 20}\'.'),
    grid: Optional[str] = typer.Option(None, help='A parameter sweep, a JSON object of lists '
                                                  '(\'{"fast": [5, 10], "slow": [20, 30]}\'): '
                                                  'one row per combination, in parallel.'),
    workers: int = typer.Option(2, help="Processes for --grid."),
    start: Optional[str] = typer.Option(None, help="From this record time, inclusive "
                                                   "(ISO, UTC unless it says, or epoch ms)."),
    end: Optional[str] = typer.Option(None, help="Up to this record time, exclusive."),
    offsets: list[str] = typer.Option([], "--offsets", help="TOPIC:PARTITION:FROM-TO (end "
                                                            "exclusive) instead of times; "
                                                            "repeat per partition."),
    topics: Optional[str] = typer.Option(None, help="Comma-separated catalog topics \\[default: "
                                                    "what the strategy and fill model need]."),
    fill: str = typer.Option("next-open", help="next-open: market orders at the next bar's "
                                               "open (backtesting.py); book: the simulated "
                                               "exchange, orders resting in the replayed L2 "
                                               "book with queue position."),
    cash: str = typer.Option("1000000", help="Starting cash."),
    commission: Optional[str] = typer.Option(None, help="next-open: fraction of each fill's "
                                                        "value, on entry and on exit "
                                                        "\\[default: 0.002]; book: both fees, "
                                                        "unless --maker-fee/--taker-fee."),
    maker_fee: Optional[str] = typer.Option(None, help="book: fee of fills that rested "
                                                       "\\[default: Gemini's API tier, 0.002]."),
    taker_fee: Optional[str] = typer.Option(None, help="book: fee of fills that took "
                                                       "\\[default: Gemini's API tier, 0.004]."),
    queue: str = typer.Option("risk-averse", help="book: queue position of resting orders: "
                                                  "risk-averse (behind what the book shows "
                                                  "at the price) or none (at the front)."),
    latency_ms: int = typer.Option(0, help="book: orders and cancels reach the simulated "
                                           "exchange this long after their trigger."),
    rules_file: Optional[Path] = typer.Option(None, help="book: Gemini's symbol rules the "
                                              "simulated exchange refuses orders by (a rules "
                                              "cache, or recorded /v1/symbols/details "
                                              "responses) \\[default: none]."),
    slippage: str = typer.Option("0", help="next-open: a fraction added to buys' and taken "
                                           "from sells' prices (backtesting.py's spread)."),
    lot: str = typer.Option("1", help="Fraction sizing rounds down to whole lots of this."),
    interval: Optional[str] = typer.Option(None, help="Bar interval to trade on when the "
                                                      "topic holds several."),
    finalize: bool = typer.Option(True, "--finalize/--no-finalize",
                                  help="Close open trades at the end (backtesting.py's "
                                       "finalize_trades)."),
    book_depth: int = typer.Option(10, help="Levels per side in the books given to "
                                            "on_book."),
    out: Optional[Path] = typer.Option(None, help="Directory for trades.csv, equity.csv, "
                                                  "stats.json, equity.png \\[default: "
                                                  "<run_dir>/backtests/<strategy>-<time>]."),
    html: bool = typer.Option(False, help="Also write report.html (with --grid: "
                                          "sweep.html)."),
    metric: Optional[str] = typer.Option(None, help="--grid --html: the statistic sweep.html "
                                                    "draws over the grid \\[default: "
                                                    "Return [%]]."),
    progress: bool = typer.Option(True, "--progress/--no-progress",
                                  help="A progress bar on stderr (events/s, ETA)."),
    source: str = typer.Option("kafka", help="kafka: the topics; archive: the same records "
                                             "from the Parquet archive (beyond retention)."),
    archive_root: Optional[Path] = typer.Option(None, help="The archive \\[default: "
                                                "<run_dir>/parquet/<namespace>/archive]."),
) -> None:
    """Replay topics of a namespace through a strategy with a simulated broker; print the
    statistics and write the trade list, equity curve and report. Ctrl-C stops after the
    current batch, keeps what was done and exits 130."""
    from datetime import datetime, timezone

    from pipeline.backtest.run import run_backtest, sweep
    from pipeline.ops.broker import bootstrap_servers
    from pipeline.ops.registry_server import registry_url
    from pipeline.replay.ranges import parse_offsets

    if metric is not None:
        from pipeline.backtest.report_interactive import check_metric

        if grid is None or not html:
            raise PipelineError("--metric chooses what sweep.html draws: give it with --grid "
                                "and --html")
        check_metric(metric)
    settings = _settings(run_dir)
    if source == "archive":  # no Kafka needed
        from pipeline.replay.archive import resolve_root

        bootstrap = registry = ""
        archive_root = resolve_root(namespace, run_dir, archive_root)
    else:
        bootstrap, registry = bootstrap_servers(settings), registry_url(settings)
    strategy_params = _json_object(params, "--params")
    from pipeline.backtest.run import BacktestConfig

    config = BacktestConfig(fill=fill, cash=cash, commission=commission, slippage=slippage,
                            lot=lot, interval=interval, finalize_trades=finalize,
                            book_depth=book_depth, maker_fee=maker_fee, taker_fee=taker_fee,
                            queue=queue, latency_ms=latency_ms,
                            rules_file=str(rules_file) if rules_file else None)
    common = dict(start=start, end=end, config=config,
                  topics=topics.split(",") if topics else None,
                  offsets=parse_offsets(offsets, namespace) if offsets else None,
                  source=source, archive_root=archive_root)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = out or settings.run_dir / "backtests" / f"{strategy.rpartition(':')[2]}-{stamp}"
    if grid is not None:
        from pipeline.backtest.report_interactive import DEFAULT_METRIC, write_sweep_html

        grid_values = _json_object(grid, "--grid")
        table = sweep(bootstrap, registry, namespace, strategy, grid_values,
                      strategy_params, workers=workers, progress=progress, **common)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "sweep.csv", index=False)
        chart = ""
        if html and len(table):
            chart = ", chart " + str(write_sweep_html(
                out / "sweep.html", table, grid_values, metric or DEFAULT_METRIC,
                f"{strategy} {strategy_params}"))
        _print_sweep(table)
        done = len(table)
        console.print(f"{done} of {table.attrs['combinations']} combination(s); "
                      f"table written to {out / 'sweep.csv'}{chart}", highlight=False)
        if table.attrs["interrupted"]:
            console.print("[yellow]interrupted[/]: the combinations not started were dropped")
            raise typer.Exit(130)
        return
    result = run_backtest(bootstrap, registry, namespace, strategy, strategy_params,
                          out_dir=out, html=html, progress=progress, **common)
    _print_stats(result)
    if result.interrupted:
        console.print(f"[yellow]interrupted[/] after {result.engine.events:,} events: the "
                      "report covers them; open trades were left open")
        raise typer.Exit(130)


def _json_object(text: str, option: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{option} is not JSON ({exc.msg} at column {exc.colno}): "
                            f"{text}") from None
    if not isinstance(value, dict):
        raise PipelineError(f"{option} must be a JSON object, got: {text}")
    return value


def _print_stats(result) -> None:
    from pipeline.backtest.report import breakdown_json, stats_rows

    table = Table("statistic", "value", title=f"{result.strategy} {result.params}")
    for key, value in stats_rows(result.stats):
        table.add_row(key, value)
    console.print(table)
    per = Table("symbol", "trades", "fills", "P&L", "fees", "exposure time %", "buy & hold %",
                title="per symbol")
    for symbol, row in breakdown_json(result.engine).items():
        hold = row["buy_and_hold_pct"]
        per.add_row(symbol, str(row["trades"]), str(row["fills"]), row["pnl"], row["fees"],
                    f"{row['exposure_pct']:.2f}", "n/a" if hold is None else f"{hold:+.4f}")
    console.print(per)
    read = result.read
    console.print(f"{result.engine.events:,} events from {', '.join(result.topics)} in "
                  f"{result.elapsed_s:.2f}s ({result.events_per_s:,.0f}/s; "
                  f"{read.skipped_time} outside the time range, {read.undecodable} "
                  f"undecodable); final equity {result.final_equity}", highlight=False)
    for name, path in sorted(result.files.items()):
        console.print(f"{name}: {path}", highlight=False)


def _print_sweep(frame) -> None:
    columns = [c for c in frame.columns if c in ("Return [%]", "Sharpe Ratio",
                                                 "Max. Drawdown [%]", "# Trades",
                                                 "Win Rate [%]", "Equity Final [$]")]
    params = [c for c in frame.columns if c not in columns and not c.endswith("]")
              and frame[c].map(lambda v: isinstance(v, (int, float, str, bool))).all()
              and c[:1].islower()]
    table = Table(*params, *columns)
    for _, row in frame.iterrows():
        table.add_row(*(str(row[c]) if c in params else f"{row[c]:,.2f}"
                        if isinstance(row[c], float) else str(row[c])
                        for c in params + columns))
    console.print(table)


replay_app = typer.Typer(help="Topology replay: re-publish history into a replay namespace.")
app.add_typer(replay_app, name="replay")


@replay_app.callback(invoke_without_command=True)
def replay(
    ctx: typer.Context,
    source: Optional[str] = typer.Option(None, "--from", help="Namespace to replay (e.g. sim, "
                                                              "live)."),
    into: Optional[str] = typer.Option(None, "--into", help="Replay namespace to write, "
                                                            "replay-NAME; must be empty."),
    start: Optional[str] = typer.Option(None, help="From this record time, inclusive (ISO, "
                                                   "UTC unless it says, or epoch ms)."),
    end: Optional[str] = typer.Option(None, help="Up to this record time, exclusive."),
    offsets: list[str] = typer.Option([], "--offsets", help="TOPIC:PARTITION:FROM-TO (end "
                                                            "exclusive); repeat per partition."),
    speed: str = typer.Option("max", help="max, or a multiple of real time (1 = as recorded)."),
    topics: str = typer.Option("md.l2,md.trades", help="Comma-separated catalog topics to copy "
                                                       "(raw.frames too if you need it)."),
    run_dir: Optional[Path] = RunDirOption,
    progress: bool = typer.Option(True, "--progress/--no-progress",
                                  help="A progress bar on stderr (records/s, ETA)."),
    from_archive: bool = typer.Option(False, "--from-archive",
                                      help="Read the range from the Parquet archive of --from "
                                           "(history beyond the topics' retention)."),
    archive_root: Optional[Path] = typer.Option(None, help="The archive \\[default: "
                                                "<run_dir>/parquet/<namespace>/archive]."),
) -> None:
    """Copy a time range of a namespace's topics into a replay namespace, byte for byte
    (key, partition, headers, timestamps), in time order at the chosen speed; run the
    topology on it with `pipeline up --replay-from`. With --from-archive the records come
    from the archive, re-encoded (same schemas, same bytes; headers are not archived).
    Ctrl-C stops cleanly (exit 130)."""
    if ctx.invoked_subcommand is not None:
        return
    if not source or not into:
        console.print(ctx.get_help())
        raise PipelineError("--from and --into are required, e.g. "
                            "`pipeline replay --from sim --into replay-jun24`")
    import signal

    from pipeline.kafka.catalog import Namespace
    from pipeline.ops.broker import bootstrap_servers
    from pipeline.ops.progress import progress_bar, stop_on_ctrl_c
    from pipeline.ops.registry_server import registry_url
    from pipeline.replay.ranges import parse_offsets, to_ms
    from pipeline.replay.topology_replay import (
        ArchiveRepublisher,
        ReplayRequest,
        Republisher,
        catalog_names,
        parse_speed,
    )

    settings = _settings(run_dir)
    request = ReplayRequest(Namespace(source), Namespace(into), catalog_names(topics.split(",")),
                            to_ms(start, "--start"), to_ms(end, "--end"),
                            parse_offsets(offsets, source) if offsets else {}, parse_speed(speed))
    if from_archive:
        from pipeline.replay.archive import resolve_root

        opened = ArchiveRepublisher(bootstrap_servers(settings), request,
                                    resolve_root(source, run_dir, archive_root))
    else:
        opened = Republisher(bootstrap_servers(settings), request)
    with opened as republisher:
        republisher.prepare(registry_url(settings))
        pace = "as fast as possible" if request.speed is None else f"at {request.speed:g}x"
        console.print(f"replaying {republisher.total} record(s) of {', '.join(republisher.names)} "
                      f"into {into} {pace}", highlight=False)
        with stop_on_ctrl_c() as stop, progress_bar(progress, republisher.total,
                                                    f"replay → {into}", "records") as update:
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            stats = republisher.run(stop.is_set, lambda done, total: update(done, done))
    rate = stats.records / stats.seconds if stats.seconds else 0.0
    parts = ", ".join(f"{name} {n}" for name, n in stats.per_topic.items())
    console.print(f"copied {stats.records} record(s) ({parts or 'none'}) into {into} in "
                  f"{stats.seconds:.1f}s ({rate:,.0f} records/s)", highlight=False)
    if stats.stopped:
        console.print(f"[yellow]stopped[/] before the end: {into} holds a partial copy; "
                      f"`pipeline replay clean {into}` removes it")
        raise typer.Exit(130)


@replay_app.command("clean")
def replay_clean(namespace: str = typer.Argument(..., help="The replay namespace, replay-NAME."),
                 run_dir: Optional[Path] = RunDirOption) -> None:
    """Delete a replay namespace: its topics, consumer groups, schema subjects and its
    Parquet/state in the run directory. Refuses anything but replay-NAME."""
    from pipeline.kafka.catalog import Namespace
    from pipeline.ops.broker import bootstrap_servers
    from pipeline.ops.registry_server import registry_url
    from pipeline.ops.supervisor import supervisor_running
    from pipeline.replay.topology_replay import clean_namespace

    settings = _settings(run_dir)
    ns = Namespace(namespace)
    running = supervisor_running(settings.run_dir)
    if running and running.get("namespace") == ns.name:
        raise PipelineError(f"the topology runs on {ns} (supervisor pid {running['pid']}): "
                            "`pipeline down` first")
    report = clean_namespace(bootstrap_servers(settings), registry_url(settings),
                             settings.run_dir, ns)
    if not report:
        console.print(f"nothing to clean: {ns} has no topic, group, subject or run-dir state")
        return
    console.print(f"cleaned {ns}: {len(report.topics)} topic(s), {len(report.groups)} consumer "
                  f"group(s), {len(report.subjects)} schema subject(s), "
                  f"{len(report.paths)} run-dir path(s)", highlight=False)


@app.command("venue")
def venue(
    port: int = typer.Option(8090, help="Port on 127.0.0.1 (0 picks a free one)."),
    capture: Optional[Path] = typer.Option(None, help="Replay this recorded capture."),
    symbols: str = typer.Option("BTCUSD,ETHUSD", help="Generate books for these symbols "
                                                      "(when no capture is given)."),
    speed: Optional[float] = typer.Option(None, help="Replay speed: 1 = as recorded; "
                                                     "default as fast as possible."),
    rate: float = typer.Option(200.0, help="Generator events per second (0 = maximum)."),
    seed: int = typer.Option(1, help="Generator seed: same seed, same market."),
    heartbeat: float = typer.Option(5.0, help="Seconds between heartbeats."),
    loop: bool = typer.Option(False, help="Replay the capture again when it ends."),
    keys_file: Optional[Path] = typer.Option(None, "--keys", help="JSON {api_key: secret, "
                                             "or {\"secret\", \"time_nonce\": true, "
                                             "\"accounts\": [...]}} accepted by the venue."),
) -> None:
    """Run the local Gemini-compatible venue (WebSocket market data + REST) in the foreground."""
    import json as _json

    from pipeline.venue.server import VenueConfig, serve_forever

    if capture is not None and not capture.exists():
        raise PipelineError(f"capture {capture} does not exist")
    keys = _json.loads(keys_file.read_text()) if keys_file else {}
    config = VenueConfig(port=port, capture=capture, speed=speed, rate=rate or None, seed=seed,
                         heartbeat_s=heartbeat, loop=loop, api_keys=keys,
                         symbols=[s.strip().upper() for s in symbols.split(",") if s.strip()])
    setup_logging("INFO")
    source = f"replaying {capture}" if capture else f"generating {config.symbols}"
    console.print(f"Gemini venue on ws://127.0.0.1:{port} ({source}); Ctrl-C stops it")
    serve_forever(config)


TopologyOption = typer.Option(None, "--topology", envvar="PIPELINE_TOPOLOGY",
                              help="Topology file \\[default: topology.toml].")
OverlayOption = typer.Option(None, "--overlay", help="A topology file whose keys override.")


@app.command("up")
def up(run_dir: Optional[Path] = RunDirOption, topology: Optional[Path] = TopologyOption,
       overlay: Optional[Path] = OverlayOption,
       timeout: float = typer.Option(300.0, help="Seconds to wait for everything to start."),
       replay_from: Optional[str] = typer.Option(None, "--replay-from", help="Run on a replay "
                                                 "of this namespace instead of the topology's "
                                                 "source (see `pipeline replay`)."),
       namespace: Optional[str] = typer.Option(None, "--namespace", "-n", help="The replay "
                                               "namespace (replay-NAME) with --replay-from."),
       start: Optional[str] = typer.Option(None, help="--replay-from: first record time."),
       end: Optional[str] = typer.Option(None, help="--replay-from: end time (exclusive)."),
       speed: str = typer.Option("max", help="--replay-from: max or a multiple of real time."),
       replay_topics: str = typer.Option("md.l2,md.trades", help="--replay-from: topics.")) -> None:
    """Start the whole topology under a supervisor that restarts what dies (`make up`).
    With --replay-from NS -n replay-NAME every group runs on a replay of NS instead."""
    import subprocess
    import sys
    import time

    from pipeline.ops import topology as topology_module
    from pipeline.ops.settings import ensure_writable_dir
    from pipeline.ops.supervisor import read_state, supervisor_running

    settings = _settings(run_dir)
    loaded = topology_module.load(topology, overlay)  # refuse a bad file before starting
    replay_args: list[str] = []
    if replay_from:
        if not namespace:
            raise PipelineError("--replay-from needs --namespace replay-NAME to write into")
        loaded = topology_module.as_replay(loaded, replay_from, namespace, start, end, speed,
                                           replay_topics.split(","))
        replay_args = ["--replay-from", replay_from, "--namespace", namespace, "--speed", speed,
                       "--replay-topics", replay_topics]
        replay_args += (["--start", start] if start else []) + (["--end", end] if end else [])
    elif namespace or start or end:
        raise PipelineError("--namespace, --start and --end go with --replay-from")
    running = supervisor_running(settings.run_dir)
    if running:
        console.print(f"already up (supervisor pid {running['pid']}, {running['topology']}); "
                      "`pipeline status` shows it, `make down` stops it")
        return
    logs = ensure_writable_dir(settings.run_dir / "logs")
    (settings.run_dir / "supervisor.json").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pipeline.ops.supervisor", "--run-dir", str(settings.run_dir),
           "--topology", str(loaded.path)] + (["--overlay", str(overlay)] if overlay else []) \
        + replay_args
    with open(logs / "supervisor.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    console.print(f"starting {loaded.path.name} ({loaded.source.kind}, namespace "
                  f"{loaded.namespace}); logs in {logs}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_state(settings.run_dir) or {}
        if state.get("phase") == "running":
            names = ", ".join(p["name"] for p in state["processes"])
            console.print(f"up: {names}; `pipeline status` shows how it does, `make down` stops it")
            return
        if state.get("phase") in ("failed", "stopped") or proc.poll() is not None:
            proc.wait()
            reason = state.get("error") or _last_line(logs / "supervisor.log")
            raise PipelineError(f"the topology did not start: {reason}")
        time.sleep(0.5)
    proc.terminate()
    proc.wait()
    raise PipelineError(f"the topology did not start within {timeout:.0f}s (see {logs})")


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if "ERROR" in line or "Error" in line]
    return (errors or lines or ["no log"])[-1][-400:]


@app.command("down")
def down(run_dir: Optional[Path] = RunDirOption) -> None:
    """Stop everything `up` started, in reverse order; nothing is left running."""
    import time

    from pipeline.ops.broker import local_kafka
    from pipeline.ops.registry_server import LocalRegistry
    from pipeline.ops.services import runs_command, terminate
    from pipeline.ops.supervisor import read_state, supervisor_running

    settings = _settings(run_dir)
    state = supervisor_running(settings.run_dir)
    if state:
        terminate(state["pid"], 180.0)  # it stops its processes, then the infrastructure
    leftover = read_state(settings.run_dir) or {}
    for proc in leftover.get("processes", []):  # a supervisor killed -9 leaves its children
        if proc.get("pid") and runs_command(proc["pid"], *proc["cmd"][1:3]):
            terminate(proc["pid"], 20.0)
    kafka = local_kafka(settings.run_dir)
    stopped = [name for name, service in (("schema registry", LocalRegistry(settings.run_dir)),
                                          (kafka.what, kafka))
               if not settings.external_kafka and service.stop()]
    (settings.run_dir / "supervisor.json").unlink(missing_ok=True)
    time.sleep(0.1)
    what = (["the topology"] if state else []) + stopped
    console.print(f"stopped {', '.join(what)}" if what else "nothing was running")


@app.command("chaos")
def chaos(
    minutes: float = typer.Option(10.0, help="How long the topology runs under faults."),
    seed: int = typer.Option(1, help="Seeds the fault schedule: same seed, same schedule."),
    nodes: int = typer.Option(3, min=1, help="Kafka nodes (broker faults need 3)."),
    rate: Optional[float] = typer.Option(None, help="The venue's generator at this many "
                                         "events/s instead of looping the real capture."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="\\[default: <run>/chaos]"),
    keep: bool = typer.Option(False, help="Leave the cluster, registry and topics running."),
    schedule_only: bool = typer.Option(False, "--schedule",
                                       help="Print the schedule, run nothing."),
) -> None:
    """Run the demo topology under seeded faults (kill -9 of every group, the producer and
    brokers, a registry restart, venue faults), then check invariants over every record;
    exit 1 if any broke."""
    from pipeline.ops.chaos.run import GROUPS, ChaosConfig, fault_rows, run_chaos
    from pipeline.ops.chaos.schedule import make_schedule

    if schedule_only:
        for fault in make_schedule(seed, minutes, list(GROUPS), nodes):
            console.print(fault.describe())
        return
    where = run_dir or _settings(None).run_dir / "chaos"
    report = run_chaos(ChaosConfig(where, minutes, seed, nodes, rate, keep=keep),
                       say=lambda line: console.print(line, highlight=False))
    faults = Table(title=f"faults injected (seed {seed}, {minutes:g} min, {nodes} node(s))")
    for column in ("fault", "scheduled", "injected", "what"):
        faults.add_column(column)
    for kind, scheduled, injected, what in fault_rows(report):
        faults.add_row(kind, str(scheduled), str(injected), what)
    console.print(faults)
    console.print("restarts: " + ", ".join(f"{n} {r}" for n, r in report.restarts.items()))
    checks = Table(title="invariants")
    for column in ("invariant", "records", "held", "first counterexample / notes"):
        checks.add_column(column)
    for check in report.checks:
        checks.add_row(check.name, str(check.records),
                       "[green]held[/]" if check.held else "[red]BROKEN[/]",
                       check.counterexample or "; ".join(check.notes))
    console.print(checks)
    if not report.held:
        raise typer.Exit(1)


@app.command("status")
def status(run_dir: Optional[Path] = RunDirOption,
           watch: bool = typer.Option(False, "--watch", help="Refresh every 2 seconds.")) -> None:
    """Processes, consumer groups (members, lag, records/s), topics, producer, execution."""
    import time

    from rich.live import Live

    from pipeline.ops.status import collect
    from pipeline.ops.supervisor import read_state, supervisor_running

    settings = _settings(run_dir)
    state = supervisor_running(settings.run_dir) or read_state(settings.run_dir)
    if not state or not state.get("bootstrap"):
        raise PipelineError("nothing is running here: `make up` (or `make demo`) starts it")
    previous = collect(settings.run_dir, state)
    time.sleep(1.0)
    snapshot = collect(settings.run_dir, state, previous)
    if not watch:
        console.print(_status_tables(snapshot, state))
        return
    with Live(_status_tables(snapshot, state), console=console, refresh_per_second=1) as live:
        try:
            while True:
                time.sleep(2.0)
                state = read_state(settings.run_dir) or state
                snapshot = collect(settings.run_dir, state, snapshot)
                live.update(_status_tables(snapshot, state))
        except KeyboardInterrupt:
            pass


def _status_tables(snapshot, state):
    from rich.console import Group

    from pipeline.ops.status import split_label

    procs = Table(title=f"processes ({state.get('phase')}, namespace {state['namespace']})")
    for column in ("process", "up", "pid", "restarts", "last error"):
        procs.add_column(column)
    for p in snapshot.processes:
        procs.add_row(p["name"], "[green]yes[/]" if p["up"] else "[red]no[/]", str(p["pid"]),
                      str(p["restarts"]), (p.get("last_error") or "")[-80:])
    def per_partition(values: dict, shown, named=lambda label: label.rsplit(".", 1)[-1]) -> str:
        """Only the busy partitions, "trades[3]:12": six idle partitions are noise."""
        return " ".join(f"{named(label)}:{shown(n)}" for label, n in values.items() if n) or "-"

    def rate(value: float) -> str:
        return f"{value:.1f}" if value < 10 else f"{value:.0f}"

    groups = Table(title="consumer groups (records/s: commits)")
    for column in ("group", "members", "lag (total)", "lag per partition", "records/s",
                   "records/s per partition"):
        groups.add_column(column)
    for name, g in snapshot.groups.items():
        groups.add_row(name, str(g["members"]), str(sum(g["lag"].values())),
                       per_partition(g["lag"], str), rate(snapshot.rates.get(name, 0)),
                       per_partition(snapshot.partition_rates.get(name, {}), rate))
    topics = Table(title="topics (records/s: appends)")
    for column in ("topic", "end offsets", "records", "records/s", "records/s per partition"):
        topics.add_column(column)
    for name, ends in snapshot.topics.items():
        topics.add_row(name, " ".join(map(str, ends)), str(sum(ends)),
                       rate(snapshot.rates.get(name, 0)),
                       per_partition(snapshot.partition_rates.get(name, {}), rate,
                                     lambda label: split_label(label)[1]))
    producer = snapshot.producer
    footer = (f"producer: last message {producer['age_s']:.1f}s ago, {producer.get('frames', 0)} "
              f"frames, {producer.get('reconnects', 0)} reconnects" if producer
              else "producer: no status yet")
    footer += (f"; execution: {snapshot.execution['mode']}, kill switch "
               f"{'ON' if snapshot.execution['kill_switch'] else 'off'}")
    view = snapshot.portfolio
    lines = []
    if view is not None:
        lines = [_pnl_line(s, r, view.halts.get(s)) for s, r in sorted(view.pnl.items())]
        lines += [f"{s}: [red]HALTED[/] ({h['reason']}: {h['detail']})"
                  for s, h in sorted(view.halts.items()) if s not in view.pnl]
        if view.reconciliation is not None:
            lines.append(f"reconciliation: {view.reconciliation['detail']}")
    cluster = [_cluster_tables(snapshot.cluster)] if snapshot.cluster is not None else []
    return Group(procs, groups, topics, *cluster, footer, *lines)


def _cluster_tables(health):
    """Brokers (address, partitions led) and, per topic, each partition's leader and ISR;
    partitions below min.insync.replicas (acks=all writes wait) in red."""
    from rich.console import Group

    brokers = Table(title="brokers")
    for column in ("node", "address", "partitions led"):
        brokers.add_column(column)
    for node, address in sorted(health.brokers.items()):
        brokers.add_row(str(node), address, str(health.led_by(node)))
    waiting = {p.label for p in health.below_min_insync}
    parts = Table(title=f"partitions: leader/ISR ({len(health.under_replicated)} under-replicated, "
                        f"{len(waiting)} below min.insync.replicas)")
    for column in ("topic", "replicas", "min ISR", "leader/ISR per partition"):
        parts.add_column(column)
    for topic, partitions in health.by_topic().items():
        cells = []
        for p in partitions:
            cell = f"{p.leader if p.leader >= 0 else '-'}/{','.join(map(str, p.isr)) or '-'}"
            cells.append(f"[red]{cell}[/]" if p.label in waiting
                         else f"[yellow]{cell}[/]" if p.under_replicated else cell)
        parts.add_row(topic, str(len(partitions[0].replicas)),
                      str(health.min_insync.get(topic, "")), " ".join(cells))
    return Group(brokers, parts)


@app.command("metrics")
def metrics(run_dir: Optional[Path] = RunDirOption,
            namespace: Optional[str] = typer.Option(
                None, "--namespace", "-n", help="Default: the running topology's, else "
                                                "PIPELINE_NAMESPACE."),
            host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 in a "
                                                       "container)."),
            port: int = typer.Option(9464, help="Port to listen on."),
            execution_mode: Optional[str] = typer.Option(
                None, help="The execution's --mode, for pipeline_info, when no supervisor "
                           "here runs it (compose).")) -> None:
    """Serve /metrics (Prometheus) and /status.json like the supervisor does, for a topology
    whose processes it does not run (docker/compose.yml)."""
    import signal
    import threading

    from pipeline.ops.metrics import metrics_server, standalone_state

    settings, bootstrap, registry, ns = _endpoints(run_dir, namespace)
    state_of = standalone_state(settings.run_dir, bootstrap, registry, str(ns), execution_mode)
    try:
        server = metrics_server(host, port, settings.run_dir, state_of)
    except OSError as exc:
        raise PipelineError(f"cannot listen on {host}:{port} ({exc.strerror}): --port N") \
            from None
    console.print(f"metrics of namespace {ns} on http://{host}:{server.server_address[1]}"
                  "/metrics and /status.json; Ctrl-C stops it", highlight=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.shutdown()


@app.command("run")
def run_group(
    target: str = typer.Argument(..., help="A process of the topology (e.g. orderbook), or "
                                           "module:function returning a GroupConfig."),
    run_dir: Optional[Path] = RunDirOption, topology: Optional[Path] = TopologyOption,
    name: Optional[str] = typer.Option(None, help="Name of the group (module:function)."),
    bootstrap: Optional[str] = typer.Option(None, help="\\[default: the running broker]"),
    registry: Optional[str] = typer.Option(None, help="\\[default: the running registry]"),
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n"),
    instance: int = typer.Option(0, help="Which instance of the process (of its instances)."),
    args: str = typer.Option("{}", help="JSON settings of a module:function group."),
) -> None:
    """Run one consumer group in the foreground (for development), the way the supervisor
    runs it (pipeline/ops/launch.py); Ctrl-C stops it."""
    import dataclasses
    import json as _json

    from pipeline.kafka.catalog import Namespace
    from pipeline.ops import launch
    from pipeline.ops import topology as topology_module
    from pipeline.runtime.runner import local_cluster

    settings = _settings(run_dir)
    cluster = local_cluster(str(settings.run_dir), bootstrap, registry)
    setup_logging("INFO")
    if ":" not in target:
        loaded = topology_module.load(topology)
        if namespace:
            loaded = dataclasses.replace(loaded, namespace=Namespace(namespace))
        code = launch.run_process(loaded, target, cluster, settings.run_dir, instance)
    else:
        code = launch.run_target(target, _json.loads(args), cluster,
                                 Namespace(namespace or settings.namespace), name,
                                 settings.run_dir)
    if code:
        raise typer.Exit(code)


portfolio_app = typer.Typer(invoke_without_command=True,
                            help="Positions and PnL per strategy, from the portfolio group.")
app.add_typer(portfolio_app, name="portfolio")
strategy_app = typer.Typer(no_args_is_help=True, help="Halt or resume a strategy's trading.")
app.add_typer(strategy_app, name="strategy")
PortfolioNamespace = typer.Option(None, "--namespace", "-n", envvar="PIPELINE_NAMESPACE",
                                  help="\\[default: the running topology's]")


def _endpoints(run_dir: Optional[Path], namespace: Optional[str]):
    """(settings, bootstrap, registry URL, namespace) of the running topology, or of the
    run directory's broker and registry."""
    from pipeline.kafka.catalog import Namespace
    from pipeline.ops.broker import bootstrap_servers
    from pipeline.ops.registry_server import registry_url
    from pipeline.ops.supervisor import read_state

    settings = _settings(run_dir)
    state = read_state(settings.run_dir) or {}
    bootstrap = state.get("bootstrap") or bootstrap_servers(settings)
    registry = state.get("registry") or registry_url(settings)
    return settings, bootstrap, registry, Namespace(namespace or state.get("namespace")
                                                    or settings.namespace)


@portfolio_app.callback()
def portfolio(ctx: typer.Context, run_dir: Optional[Path] = RunDirOption,
              namespace: Optional[str] = PortfolioNamespace,
              watch: bool = typer.Option(False, "--watch", help="Refresh every 2 seconds.")
              ) -> None:
    """Positions and PnL per strategy (what the portfolio group last published)."""
    if ctx.invoked_subcommand is not None:
        return
    import time

    from rich.live import Live

    from pipeline.ops.portfolio_view import read_view

    _, bootstrap, registry, ns = _endpoints(run_dir, namespace)
    if not watch:
        console.print(_portfolio_tables(read_view(bootstrap, registry, ns), ns))
        return
    with Live(_portfolio_tables(read_view(bootstrap, registry, ns), ns), console=console,
              refresh_per_second=1) as live:
        try:
            while True:
                time.sleep(2.0)
                live.update(_portfolio_tables(read_view(bootstrap, registry, ns), ns))
        except KeyboardInterrupt:
            pass


def _money(text: Optional[str], places: int = 2) -> str:
    from decimal import Decimal

    return "stale" if text is None else f"{Decimal(text):,.{places}f}"


def _pnl_line(strategy: str, pnl: dict, halt: Optional[dict]) -> str:
    state = f"[red]HALTED[/] ({halt['reason']}: {halt['detail']})" if halt else "trading"
    stale = f" [yellow]stale: {', '.join(pnl['stale_symbols'])}[/]" if pnl["stale"] else ""
    return (f"{strategy}: equity {_money(pnl['equity'], 4)} {pnl['currency']}, realized "
            f"{_money(pnl['realized_pnl'], 4)}, unrealized {_money(pnl['unrealized_pnl'], 4)}, "
            f"fees {_money(pnl['fees'], 4)}, drawdown {_money(pnl['drawdown'], 4)}, "
            f"{pnl['fills']} fills, {state}{stale}")


def _portfolio_tables(view, namespace):
    from rich.console import Group

    positions = Table(title=f"positions (namespace {namespace})")
    for column in ("strategy", "symbol", "quantity", "avg entry", "mark", "unrealized",
                   "realized", "fills"):
        positions.add_column(column, justify="left" if column in ("strategy", "symbol")
                             else "right")
    for p in view.positions:
        positions.add_row(p["strategy_id"], p["symbol"], p["quantity"],
                          _money(p["average_entry"], 8) if p["average_entry"] else "-",
                          p["mark"] or "stale",
                          _money(p["unrealized_pnl"], 4), _money(p["realized_pnl"], 4),
                          str(p["fills"]))
    pnl = Table(title="PnL per strategy")
    for column in ("strategy", "equity", "realized", "unrealized", "fees", "drawdown",
                   "daily", "exposure", "fills", "rejected", "state"):
        pnl.add_column(column, justify="left" if column in ("strategy", "state") else "right")
    for strategy, r in sorted(view.pnl.items()):
        halt = view.halts.get(strategy)
        pnl.add_row(strategy, f"{_money(r['equity'], 4)} {r['currency']}",
                    _money(r["realized_pnl"], 4), _money(r["unrealized_pnl"], 4),
                    _money(r["fees"], 4), _money(r["drawdown"], 4), _money(r["daily_pnl"], 4),
                    _money(r["exposure"], 4), str(r["fills"]),
                    str(sum(r["rejections"].values())),
                    f"[red]HALTED[/] {halt['reason']}" if halt else
                    ("[yellow]stale[/]" if r["stale"] else "trading"))
    parts = [positions, pnl]
    if not view.pnl:
        parts.append("no PnL yet: is the portfolio group running (topology.toml), and has "
                     "any order filled?")
    if view.reconciliation is not None:
        r = view.reconciliation
        parts.append(f"reconciliation: {r['detail']}")
        parts += [f"  {d['kind']}: {d['detail']}" for d in view.differences[:20]]
    return Group(*parts)


@portfolio_app.command("plot")
def portfolio_plot(strategy: str = typer.Option(..., "--strategy", "-s", help="Strategy id."),
                   run_dir: Optional[Path] = RunDirOption,
                   namespace: Optional[str] = PortfolioNamespace,
                   out: Optional[Path] = typer.Option(None, help="Directory for equity.png, "
                                                      "equity.html, equity.csv \\[default: "
                                                      "<run dir>/portfolio/<strategy>]"),
                   gap_s: float = typer.Option(60.0, help="A pause longer than this breaks "
                                               "the line.")) -> None:
    """Draw a strategy's live equity and drawdown from the PnL Parquet files."""
    from pipeline.ops.portfolio_plot import plot_live
    from pipeline.sinks.pnl import read_pnl

    settings, _, _, ns = _endpoints(run_dir, namespace)
    root = settings.run_dir / "parquet" / ns.name / "portfolio.pnl"
    files = plot_live(read_pnl(root, strategy), strategy,
                      out or settings.run_dir / "portfolio" / strategy, gap_s)
    console.print(f"wrote {files['png']}, {files['html']} and {files['csv']}", highlight=False)


def _control(strategy_id: str, halted: bool, run_dir, namespace, yes: bool) -> None:
    from pipeline.ops.portfolio_view import set_halt

    _, bootstrap, registry, ns = _endpoints(run_dir, namespace)
    verb = "halt" if halted else "resume"
    if not yes and not typer.confirm(f"{verb} strategy {strategy_id!r} in namespace {ns}?"):
        raise typer.Exit(1)
    set_halt(bootstrap, registry, ns, strategy_id, halted)
    console.print(f"strategy {strategy_id} {'halted' if halted else 'resumed'}: execution "
                  "acts on it from its next batch", highlight=False)


@strategy_app.command("halt")
def strategy_halt(strategy_id: str = typer.Argument(..., help="The strategy's id."),
                  run_dir: Optional[Path] = RunDirOption,
                  namespace: Optional[str] = PortfolioNamespace,
                  yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask.")) -> None:
    """Stop one strategy: its open orders are cancelled and new ones rejected."""
    _control(strategy_id, True, run_dir, namespace, yes)


@strategy_app.command("resume")
def strategy_resume(strategy_id: str = typer.Argument(..., help="The strategy's id."),
                    run_dir: Optional[Path] = RunDirOption,
                    namespace: Optional[str] = PortfolioNamespace,
                    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask.")) -> None:
    """Let a halted strategy trade again; its drawdown and daily loss start afresh."""
    _control(strategy_id, False, run_dir, namespace, yes)


@app.command("web")
def web(run_dir: Optional[Path] = RunDirOption,
        namespace: Optional[str] = typer.Option(None, "--namespace", "-n",
                                                help="Default: the running topology's."),
        host: str = typer.Option("127.0.0.1", help="Address to listen on."),
        port: int = typer.Option(8050, help="Port to listen on."),
        bootstrap: Optional[str] = typer.Option(None, help="Default: the running topology's."),
        registry: Optional[str] = typer.Option(None, help="Default: the running topology's."),
        symbols: Optional[str] = typer.Option(None, help="Comma-separated; default: the "
                                                         "running topology's."),
        status_url: Optional[str] = typer.Option(
            None, help="The supervisor's /status.json; default: from its state file."),
        bar_interval: Optional[str] = typer.Option(
            None, help="The candles' bar interval; default: the topology's shortest."),
        allow_remote: bool = typer.Option(False, "--allow-remote",
                                          help="Serve other machines too (no login!).")) -> None:
    """The web dashboard: topology, symbols (depth, candles), trading, backtests."""
    from pipeline.ops.supervisor import read_state
    from pipeline.ops.topology import load as load_topology
    from pipeline.web.server import WebConfig, serve

    settings, found_bootstrap, found_registry, ns = _endpoints(run_dir, namespace)
    state = read_state(settings.run_dir) or {}
    running = load_topology(Path(state["topology"])) if state.get("topology") else None
    if symbols is None and running is not None:
        symbols = ",".join(running.symbols)
    if not symbols:
        raise PipelineError("which symbols? --symbols A,B (or run it beside `make up`)")
    if bar_interval is None:
        from pipeline.ops.supervisor import chart_interval

        bar_interval = chart_interval(running) if running is not None else "1m"
    if status_url is None and state.get("metrics_port"):
        status_url = f"http://127.0.0.1:{state['metrics_port']}/status.json"
    config = WebConfig(settings.run_dir, str(ns), [s.strip().upper() for s in
                                                   symbols.split(",") if s.strip()],
                       status_url, allow_remote, bar_interval=bar_interval)
    serve(config, bootstrap or found_bootstrap, registry or found_registry, host, port)


@app.command("kill-switch")
def kill_switch_command(
        state: str = typer.Argument(..., help="on | off | show"),
        run_dir: Optional[Path] = RunDirOption,
        yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask.")) -> None:
    """Stop all trading (on: execution rejects and cancels everything) or resume it."""
    from pipeline.ops import kill_switch

    settings = _settings(run_dir)
    if state not in ("on", "off", "show"):
        raise PipelineError(f"kill-switch {state!r}: say on, off or show")
    if state != "show":
        on = state == "on"
        if not yes and not typer.confirm(kill_switch.CONFIRM[on]):
            raise typer.Exit(1)
        kill_switch.turn(settings.run_dir, on)
    console.print(f"kill switch {'ON' if kill_switch.is_on(settings.run_dir) else 'off'} "
                  f"({kill_switch.kill_switch_path(settings.run_dir)})", highlight=False)


@app.command("version")
def version() -> None:
    """Versions of the pipeline, the Kafka jars it runs and the client library."""
    import confluent_kafka

    from pipeline import __version__
    from pipeline.ops.broker import kafka_version

    console.print(f"pipeline {__version__}; Apache Kafka {kafka_version()} (local broker); "
                  f"confluent-kafka {confluent_kafka.__version__}, "
                  f"librdkafka {confluent_kafka.libversion()[0]}")


def setup_logging(level: str = "INFO") -> None:
    from pipeline.runtime.runner import log_to_stderr

    log_to_stderr(level)


def main() -> None:
    setup_logging("WARNING")
    try:
        app()
    except PipelineError as exc:
        _fail(str(exc))
    except KafkaException as exc:
        _fail(f"Kafka: {exc.args[0].str() if exc.args else exc}")


def _fail(message: str) -> None:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    sys.exit(1)


if __name__ == "__main__":
    main()
