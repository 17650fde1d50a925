"""`pipeline topics` and `pipeline schemas`: the catalog's topics and their schemas in
the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pipeline.cli.common import RunDirOption, console, registry_for, settings_for
from pipeline.core.errors import PipelineError


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

    settings = settings_for(run_dir)
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


schemas_app = typer.Typer(no_args_is_help=True,
                          help="Avro schemas in schemas/ and the schema registry.")
NamespaceOption = typer.Option("live", "--namespace", "-n", envvar="PIPELINE_NAMESPACE",
                               help="Namespace whose topics' subjects to work on.")


@schemas_app.command("register")
def schemas_register(run_dir: Optional[Path] = RunDirOption, namespace: str = NamespaceOption,
                     level: str = typer.Option("BACKWARD", help="Compatibility level for new "
                                                                "subjects.")) -> None:
    """Register every topic's schema under <topic>-value (idempotent)."""
    from pipeline.avro.schemas import register_namespace
    from pipeline.kafka.catalog import Namespace

    done = register_namespace(registry_for(run_dir), Namespace(namespace), level.upper())
    table = Table(title=f"registered in namespace {namespace}")
    for column in ("subject", "record", "id", "version"):
        table.add_column(column, no_wrap=column == "subject")
    for reg in done:
        table.add_row(reg.subject, reg.record, str(reg.schema_id), str(reg.version))
    console.print(table)


@schemas_app.command("list")
def schemas_list(run_dir: Optional[Path] = RunDirOption) -> None:
    """Subjects in the registry with their versions, latest id and compatibility level."""
    registry = registry_for(run_dir)
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

    results = check_namespace(registry_for(run_dir), Namespace(namespace), directory or SCHEMA_DIR)
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
                            f"{registry_for(run_dir).url}")
