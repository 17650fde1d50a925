"""`pipeline broker` and `pipeline registry`: the local Kafka broker (or cluster) and
schema registry."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import typer
from rich.table import Table

from pipeline.cli.common import RunDirOption, console, registry_for, settings_for
from pipeline.core.errors import PipelineError
from pipeline.ops.services import DetachedService, ServiceState

if TYPE_CHECKING:
    from pipeline.ops.broker import LocalCluster


broker_app = typer.Typer(no_args_is_help=True, help="The local Apache Kafka broker (KRaft).")
registry_app = typer.Typer(no_args_is_help=True,
                           help="The local schema registry (Apicurio Registry, KafkaSQL storage).")


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

    settings = settings_for(run_dir)
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

    settings = settings_for(run_dir)
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

    settings = settings_for(run_dir)
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
    console.print(cluster_tables(describe_cluster(bootstrap)))


@registry_app.command("start")
def registry_start(run_dir: Optional[Path] = RunDirOption,
                   port: int = typer.Option(8081, help="HTTP port (0 picks a free one).")) -> None:
    """Start the registry on the pipeline's Kafka (a second start is harmless)."""
    from pipeline.ops.broker import bootstrap_servers
    from pipeline.ops.registry_server import LocalRegistry

    settings = settings_for(run_dir)
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

    settings = settings_for(run_dir)
    _stop_service("SCHEMA_REGISTRY_URL", settings.schema_registry_url,
                  LocalRegistry.from_settings(settings), "schema registry")


@registry_app.command("status")
def registry_status(run_dir: Optional[Path] = RunDirOption) -> None:
    """Where the registry is and whether it answers."""
    from pipeline.ops.registry_server import ccompat_answers, registry_url

    url = registry_url(settings_for(run_dir))
    if not ccompat_answers(url):
        raise PipelineError(f"the schema registry at {url} does not answer")
    console.print(f"schema registry at {url} answers; "
                  f"{len(registry_for(run_dir).subjects())} subject(s)")


def cluster_tables(health):
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
