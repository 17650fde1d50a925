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
