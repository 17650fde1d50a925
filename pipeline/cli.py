"""The ``pipeline`` command. Every failure the user can act on ends in one error line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from confluent_kafka import KafkaException
from rich.console import Console
from rich.table import Table

from pipeline.errors import PipelineError

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

console = Console(soft_wrap=True)
RunDirOption = typer.Option(None, "--run-dir", envvar="PIPELINE_RUN_DIR",
                            help="Where logs, broker data and state live [default: ./run].")


def _settings(run_dir: Optional[Path]):
    from pipeline.config import Settings

    return Settings.from_env(run_dir)


@broker_app.command("start")
def broker_start(
    run_dir: Optional[Path] = RunDirOption,
    port: int = typer.Option(9092, help="Client port (0 picks a free one)."),
    controller_port: int = typer.Option(9093, help="KRaft controller port (0 picks a free one)."),
) -> None:
    """Start the broker (a second start is harmless); download the jars on first use."""
    from pipeline.broker import LocalBroker

    settings = _settings(run_dir)
    if settings.external_kafka:
        console.print(f"KAFKA_BOOTSTRAP_SERVERS is set: using {settings.bootstrap_servers}, "
                      "starting nothing")
        return
    broker = LocalBroker.from_settings(settings)
    already = broker.state()
    state = broker.start(port=port, controller_port=controller_port, quiet=False)
    verb = "already running" if already else "started"
    console.print(f"Kafka {state.kafka_version} {verb} on {state.bootstrap_servers} "
                  f"(pid {state.pid}, logs in {broker.log_dir})")


@broker_app.command("stop")
def broker_stop(run_dir: Optional[Path] = RunDirOption) -> None:
    """Stop the broker gracefully; nothing is left running."""
    from pipeline.broker import LocalBroker

    settings = _settings(run_dir)
    if settings.external_kafka:
        console.print("KAFKA_BOOTSTRAP_SERVERS is set: nothing was started, nothing to stop")
        return
    stopped = LocalBroker.from_settings(settings).stop()
    console.print("Kafka broker stopped" if stopped else "no Kafka broker was running")


@broker_app.command("status")
def broker_status(run_dir: Optional[Path] = RunDirOption) -> None:
    """Where the broker is, whether it answers, and the version it reports."""
    from pipeline.broker import LocalBroker, bootstrap_servers, broker_answers, reported_version

    settings = _settings(run_dir)
    bootstrap = bootstrap_servers(settings)
    if not broker_answers(bootstrap):
        raise PipelineError(f"Kafka at {bootstrap} does not answer")
    features = reported_version(settings)
    state = None if settings.external_kafka else LocalBroker.from_settings(settings).state()
    where = "external cluster" if state is None else f"local broker, pid {state.pid}"
    console.print(f"Kafka at {bootstrap} ({where}) answers; "
                  f"metadata.version {features['metadata.version']}")


@registry_app.command("start")
def registry_start(run_dir: Optional[Path] = RunDirOption,
                   port: int = typer.Option(8081, help="HTTP port (0 picks a free one).")) -> None:
    """Start the registry on the pipeline's Kafka (a second start is harmless)."""
    from pipeline.broker import bootstrap_servers
    from pipeline.registry_server import LocalRegistry

    settings = _settings(run_dir)
    if settings.schema_registry_url:
        console.print(f"SCHEMA_REGISTRY_URL is set: using {settings.schema_registry_url}, "
                      "starting nothing")
        return
    registry = LocalRegistry.from_settings(settings)
    already = registry.state()
    state = registry.start(bootstrap_servers(settings), port=port, quiet=False)
    verb = "already running" if already else "started"
    console.print(f"Apicurio Registry {state.version} {verb} at {state.url} (pid {state.pid}, "
                  f"schemas stored in Kafka at {state.bootstrap_servers}, log {registry.log_file})")


@registry_app.command("stop")
def registry_stop(run_dir: Optional[Path] = RunDirOption) -> None:
    """Stop the local registry; its schemas stay in Kafka."""
    from pipeline.registry_server import LocalRegistry

    settings = _settings(run_dir)
    if settings.schema_registry_url:
        console.print("SCHEMA_REGISTRY_URL is set: nothing was started, nothing to stop")
        return
    stopped = LocalRegistry.from_settings(settings).stop()
    console.print("schema registry stopped" if stopped else "no schema registry was running")


@registry_app.command("status")
def registry_status(run_dir: Optional[Path] = RunDirOption) -> None:
    """Where the registry is and whether it answers."""
    from pipeline.registry_server import ccompat_answers, registry_url

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
    from pipeline.broker import bootstrap_servers
    from pipeline.catalog import Namespace, delete_namespace, describe_topics, ensure_topics

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
    from pipeline.registry import SchemaRegistry
    from pipeline.registry_server import registry_url

    return SchemaRegistry(registry_url(_settings(run_dir)))


@schemas_app.command("register")
def schemas_register(run_dir: Optional[Path] = RunDirOption, namespace: str = NamespaceOption,
                     level: str = typer.Option("BACKWARD", help="Compatibility level for new "
                                                                "subjects.")) -> None:
    """Register every topic's schema under <topic>-value (idempotent)."""
    from pipeline.catalog import Namespace
    from pipeline.schemas import register_namespace

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
                                                 "[default: schemas/].")) -> None:
    """Are the repo's .avsc files compatible with what the registry holds? Exit 1 if not."""
    from pipeline.catalog import Namespace
    from pipeline.schemas import SCHEMA_DIR, check_namespace

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
                                  help="Topic namespace [default: live for Gemini, sim for "
                                       "any other URL]."),
    url: str = typer.Option("wss://api.gemini.com", help="Gemini, or the local venue "
                                                         "(e.g. ws://127.0.0.1:8090)."),
    symbols: str = typer.Option("BTCUSD,ETHUSD", help="Comma-separated Gemini symbols."),
    protocol: str = typer.Option("v2", help="v2 (one connection, l2) or v1 (one per symbol)."),
    heartbeat_timeout: float = typer.Option(10.0, help="Seconds without a message that count "
                                                       "as a disconnect."),
) -> None:
    """Stream Gemini market data into Kafka until SIGTERM/Ctrl-C."""
    from pipeline.broker import bootstrap_servers
    from pipeline.catalog import Namespace, ensure_topics
    from pipeline.registry import SchemaRegistry
    from pipeline.registry_server import registry_url
    from pipeline.serde import Serde
    from producers.gemini_ws import FeedConfig, run_producer

    settings = _settings(run_dir)
    is_gemini = "gemini.com" in url
    ns = Namespace(namespace or ("live" if is_gemini else "sim"))
    if ns.is_live and not is_gemini:
        raise PipelineError(f"namespace {ns} is for Gemini's own data; {url} is not Gemini: "
                            "use a sim namespace")
    if protocol not in ("v1", "v2"):
        raise PipelineError(f"unknown protocol {protocol!r}: v1 or v2")
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
                  f"{stats.dead_letters} dead letters, {stats.reconnects} reconnects")


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
    from pipeline.broker import bootstrap_servers
    from pipeline.catalog import Namespace
    from pipeline.registry_server import registry_url
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
    console.print(f"{report.published} {report.interval} {report.symbol} bars published to "
                  f"{report.topic} ({report.rows_read} rows read, {report.skipped} skipped) in "
                  f"{report.parse_seconds + report.publish_seconds:.1f}s")


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
    keys_file: Optional[Path] = typer.Option(None, "--keys", help="JSON {api_key: secret} "
                                             "accepted by the REST side."),
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


@app.command("version")
def version() -> None:
    """Versions of the pipeline, the Kafka jars it runs and the client library."""
    import confluent_kafka

    from pipeline import __version__
    from pipeline.broker import kafka_version

    console.print(f"pipeline {__version__}; Apache Kafka {kafka_version()} (local broker); "
                  f"confluent-kafka {confluent_kafka.__version__}, "
                  f"librdkafka {confluent_kafka.libversion()[0]}")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


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
