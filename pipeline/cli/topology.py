"""The topology: `pipeline up`, `down`, `status`, `metrics`, `run` and `chaos`, and the
status tables."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pipeline.cli.common import (
    RunDirOption,
    console,
    endpoints_for,
    settings_for,
    setup_logging,
)
from pipeline.cli.portfolio import pnl_line
from pipeline.cli.services import cluster_tables
from pipeline.core.errors import PipelineError

TopologyOption = typer.Option(None, "--topology", envvar="PIPELINE_TOPOLOGY",
                              help="Topology file \\[default: topology.toml].")
OverlayOption = typer.Option(None, "--overlay", help="A topology file whose keys override.")


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

    settings = settings_for(run_dir)
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


def down(run_dir: Optional[Path] = RunDirOption) -> None:
    """Stop everything `up` started, in reverse order; nothing is left running."""
    import time

    from pipeline.ops.broker import local_kafka
    from pipeline.ops.registry_server import LocalRegistry
    from pipeline.ops.services import runs_command, terminate
    from pipeline.ops.supervisor import read_state, supervisor_running

    settings = settings_for(run_dir)
    state = supervisor_running(settings.run_dir)
    if state:
        terminate(state["pid"], 180.0)  # it stops its processes, then the infrastructure
    leftover = read_state(settings.run_dir) or {}
    for proc in leftover.get("processes", []):  # a supervisor killed -9 leaves children
        if proc.get("pid") and runs_command(proc["pid"], *proc["cmd"][1:4]):  # -m X, target
            terminate(proc["pid"], 20.0)
    kafka = local_kafka(settings.run_dir)
    stopped = [name for name, service in (("schema registry", LocalRegistry(settings.run_dir)),
                                          (kafka.what, kafka))
               if not settings.external_kafka and service.stop()]
    (settings.run_dir / "supervisor.json").unlink(missing_ok=True)
    time.sleep(0.1)
    what = (["the topology"] if state else []) + stopped
    console.print(f"stopped {', '.join(what)}" if what else "nothing was running")


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
    where = run_dir or settings_for(None).run_dir / "chaos"
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


def status(run_dir: Optional[Path] = RunDirOption,
           watch: bool = typer.Option(False, "--watch", help="Refresh every 2 seconds.")) -> None:
    """Processes, consumer groups (members, lag, records/s), topics, producer, execution."""
    import time

    from rich.live import Live

    from pipeline.ops.status import collect
    from pipeline.ops.supervisor import read_state, supervisor_running

    settings = settings_for(run_dir)
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
        lines = [pnl_line(s, r, view.halts.get(s)) for s, r in sorted(view.pnl.items())]
        lines += [f"{s}: [red]HALTED[/] ({h['reason']}: {h['detail']})"
                  for s, h in sorted(view.halts.items()) if s not in view.pnl]
        if view.reconciliation is not None:
            lines.append(f"reconciliation: {view.reconciliation['detail']}")
    cluster = [cluster_tables(snapshot.cluster)] if snapshot.cluster is not None else []
    return Group(procs, groups, topics, *cluster, footer, *lines)


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

    settings, bootstrap, registry, ns = endpoints_for(run_dir, namespace)
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

    settings = settings_for(run_dir)
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
