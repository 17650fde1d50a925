"""`pipeline replay`: re-publish a namespace's history into a replay namespace."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.common import RunDirOption, console, settings_for
from pipeline.core.errors import PipelineError

replay_app = typer.Typer(help="Topology replay: re-publish history into a replay namespace.")


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

    settings = settings_for(run_dir)
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

    settings = settings_for(run_dir)
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
