"""The supervisor behind ``make up``: starts the topology, keeps it running, stops it.

In order, each only once the previous part answers: the broker and the schema registry
(unless external), the topics and schemas, the local venue (when the source is the venue),
the producer, then every ``[[process]]`` of the topology, each instance as its own
process with its own log file under ``<run_dir>/logs``. A process that dies is restarted
with exponential backoff until its ``restart_limit``; every restart is logged and shown by
``pipeline status``. SIGTERM stops everything in reverse order, gracefully, leaving no
process and no lock behind. The supervisor records its state in
``<run_dir>/supervisor.json`` and serves Prometheus metrics on ``infra.metrics_port``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.kafka.catalog import Namespace, TopicSpec, declare, ensure_topics
from pipeline.ops.broker import bootstrap_servers, local_kafka
from pipeline.ops.registry_server import LocalRegistry, registry_url
from pipeline.ops.services import alive, require_free_port, runs_command, terminate
from pipeline.ops.settings import REPO_ROOT, Settings, ensure_writable_dir
from pipeline.ops.topology import Process, Topology
from pipeline.runtime.runner import log_to_stderr

log = logging.getLogger(__name__)
STATE_FILE = "supervisor.json"
GEMINI_HOST = ("api.gemini.com", 443)
# Need the run's strategy key file (created here, handed over as ctx.strategy_keys). The
# topology's symbols reach every group as ctx.symbols: the portfolio dead-letters a fill
# of another, execution loads their symbol rules only.
SIGNING_GROUPS = ("consumers.strategy", "consumers.execution")
BACKOFF_MAX_S = 30.0


@dataclass
class Child:
    """One supervised process (an instance of a topology entry)."""

    name: str
    cmd: list[str]
    log_file: str
    restart_limit: int = 5
    pid: int = 0
    restarts: int = 0
    started_at: float = 0.0
    last_exit: int | None = None
    last_error: str | None = None
    gave_up: bool = False
    oneshot: bool = False  # a job (the replay publisher): exit 0 means done, not restarted
    finished: bool = False
    next_start: float = 0.0
    _proc: object = field(default=None, repr=False)

    @property
    def up(self) -> bool:
        return bool(self.pid) and alive(self.pid)

    def public(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        return data | {"up": self.up}


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _cli(*args: str) -> list[str]:
    return python_module("pipeline.cli", *args)


@functools.cache
def takes_instance(run: str) -> bool:
    """Whether a group runs as several instances, each named by its instance index (its
    module's ``MULTI_INSTANCE``): they then need distinct names (transactional.id,
    group.instance.id), or they fence each other."""
    from pipeline.runtime.contract import load_group

    try:
        return load_group(run).multi_instance
    except PipelineError:
        return False


class Supervisor:
    def __init__(self, topology: Topology, settings: Settings) -> None:
        self.topology, self.settings = topology, settings
        self.run_dir = settings.run_dir
        self.log_dir = ensure_writable_dir(self.run_dir / "logs")
        self.state_path = self.run_dir / STATE_FILE
        self.children: list[Child] = []
        self.phase = "starting"
        self.error: str | None = None
        self.bootstrap = self.registry_url = ""
        self._stop = threading.Event()
        self._started_broker = self._started_registry = False

    # -- start

    def start(self) -> None:
        """Bring the whole topology up, in order; raise PipelineError (after cleaning up)
        if any part cannot start."""
        try:
            self._infra()
            self._source()
            for proc in self.topology.processes:
                for index in range(proc.instances):
                    self._launch(self._child_for(proc, index))
            self._web()
            time.sleep(1.0)  # a process that dies at once (bad arguments) shows now
            dead = [c for c in self.children if not c.up and not self._finished(c)]
            if dead:
                raise PipelineError(f"{dead[0].name} exited at start: {self._tail(dead[0])} "
                                    f"(log {dead[0].log_file})")
            self.phase = "running"
            self.save()
        except BaseException as exc:
            self.error = str(exc)
            self.phase = "failed"
            self.save()
            self.stop()
            raise

    def _infra(self) -> None:
        infra = self.topology.infra
        if self.settings.bootstrap_servers:
            self.bootstrap = self.settings.bootstrap_servers
        else:
            kafka = local_kafka(self.run_dir, infra.listen)  # a cluster started here, or one node
            self._started_broker = kafka.state() is None
            self.bootstrap = kafka.start(infra.kafka_port, infra.controller_port).bootstrap_servers
        log.info("kafka at %s", self.bootstrap)
        if self.settings.schema_registry_url:
            self.registry_url = self.settings.schema_registry_url
        else:
            registry = LocalRegistry(self.run_dir, infra.listen)
            self._started_registry = registry.state() is None
            self.registry_url = registry.start(self.bootstrap, infra.registry_port).url
        log.info("schema registry at %s", self.registry_url)
        from pipeline.avro.registry import SchemaRegistry
        from pipeline.avro.schemas import register_namespace

        declare_topics(self.topology)
        if self.topology.source.kind == "replay":
            self._check_replay()  # before the namespace's topics are created
        ensure_topics(self.bootstrap, self.topology.namespace)
        if not self.settings.bootstrap_servers:  # a secured local broker: the topology's ACLs
            from pipeline.ops.broker_secure import grant_topology

            grant_topology(self.run_dir / "kafka", self.bootstrap, self.topology)
        register_namespace(SchemaRegistry(self.registry_url), self.topology.namespace)
        self.save()

    def _replay_args(self) -> list[str]:
        source = self.topology.source
        args = ["--from", str(source.replay_from), "--into", str(self.topology.namespace),
                "--speed", "max" if source.speed is None else str(source.speed),
                "--topics", ",".join(source.topics)]
        args += ["--start", source.start] if source.start is not None else []
        args += ["--end", source.end] if source.end is not None else []
        return args

    def _check_replay(self) -> None:
        """Refuse a replay that cannot run (no such topic, an empty range, a target that
        holds records) before anything is created."""
        from pipeline.kafka.catalog import Namespace
        from pipeline.replay.ranges import to_ms
        from pipeline.replay.topology_replay import ReplayRequest, Republisher

        source = self.topology.source
        request = ReplayRequest(Namespace(str(source.replay_from)), self.topology.namespace,
                                source.topics, to_ms(source.start, "start"),
                                to_ms(source.end, "end"), speed=source.speed)
        Republisher(self.bootstrap, request).close()

    def _source(self) -> None:
        source = self.topology.source
        if source.kind == "replay":
            # Replaces venue + producer; a failed replay is not repeated (it would double
            # what it already copied): `pipeline replay clean` and up again.
            self._launch(Child("replay", _cli("replay", *self._replay_args(), "--no-progress",
                                              "--run-dir", str(self.run_dir)),
                               str(self.log_dir / "replay.log"), restart_limit=0, oneshot=True))
            return
        if source.kind == "gemini":
            try:
                socket.create_connection(GEMINI_HOST, timeout=5).close()
            except OSError:
                raise PipelineError("Gemini (api.gemini.com) cannot be reached from this "
                                    "machine; `make demo` runs the same topology offline on "
                                    "the local venue, replaying the real capture") from None
            url = source.url
        else:
            require_free_port(source.port, "127.0.0.1", "local venue",
                              "set source.port in the topology")
            venue_args = ["venue", "--port", str(source.port), "--heartbeat",
                          str(source.heartbeat_s), "--rate", str(source.rate), "--seed",
                          str(source.seed), "--symbols", ",".join(self.topology.symbols)]
            if source.capture is not None:
                venue_args += ["--capture", str(source.capture)]
                venue_args += ["--speed", str(source.speed)] if source.speed else []
                venue_args += ["--loop"] if source.loop else []
            if source.api_keys_file is not None:
                venue_args += ["--keys", str(source.api_keys_file)]
            venue = Child("venue", _cli(*venue_args), str(self.log_dir / "venue.log"))
            self._launch(venue)
            self._wait_port(venue, source.port)
            url = f"ws://127.0.0.1:{source.port}"
        self._launch_producer(url)

    def _launch_producer(self, url: str) -> None:
        """The market-data producer on ``url`` (Gemini's, or a venue's)."""
        source, ns = self.topology.source, self.topology.namespace
        producer = Child("producer", _cli(
            "produce", "gemini", "--url", url, "-n", str(ns), "--protocol", source.protocol,
            "--symbols", ",".join(self.topology.symbols), "--run-dir", str(self.run_dir)),
            str(self.log_dir / "producer.log"))
        self._launch(producer)

    def _child_for(self, proc: Process, index: int) -> Child:
        """Every group starts the same way: the launcher, which reads the topology itself
        (pipeline/ops/launch.py)."""
        from pipeline.core.cluster import Cluster
        from pipeline.ops.launch import command

        name = proc.name if proc.instances == 1 else f"{proc.name}-{index}"
        if proc.module in SIGNING_GROUPS and getattr(proc.config, "strategy_keys", None) is None:
            self._strategy_keys()  # the run's key file, which the launcher hands over
        cmd = command(self.topology, proc, index, Cluster(self.bootstrap, self.registry_url),
                      self.run_dir)
        return Child(name, cmd, str(self.log_dir / f"{name}.log"), proc.restart_limit)

    def _web(self) -> None:
        """The dashboard (`pipeline web`) on ``infra.web_port``, if the port is free: a
        second topology on this machine (or a test's) runs without one rather than
        failing to start."""
        infra = self.topology.infra
        if not infra.web_port:
            return
        try:
            require_free_port(infra.web_port, infra.listen, "web dashboard",
                              "set infra.web_port (0: none)")
        except PipelineError as exc:
            log.warning("no dashboard: %s", exc)
            return
        self._launch(Child("web", _cli(
            "web", "--host", infra.listen, "--port", str(infra.web_port),
            "--bootstrap", self.bootstrap, "--registry", self.registry_url,
            "--namespace", str(self.topology.namespace),
            "--symbols", ",".join(self.topology.symbols),
            "--bar-interval", chart_interval(self.topology),
            "--status-url", f"http://{infra.listen}:{infra.metrics_port}/status.json",
            "--run-dir", str(self.run_dir)), str(self.log_dir / "web.log")))

    def _strategy_keys(self) -> Path:
        """A per-run signing key for every strategy, created once, readable only by us
        (keys are never in the repo; use your own file via `strategy_keys` in args)."""
        from pipeline.ops.launch import strategy_keys_file

        path = strategy_keys_file(self.run_dir)
        ensure_writable_dir(path.parent)
        if not path.exists():
            from pipeline.strategy import load_strategy

            ids = {load_strategy(p.config.strategy, p.config.params).strategy_id
                   for p in self.topology.processes if p.module == "consumers.strategy"}
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump({i: secrets.token_hex(32) for i in sorted(ids)}, out)
        return path

    def _launch(self, child: Child) -> None:
        env = {**os.environ, "PIPELINE_RUN_DIR": str(self.run_dir),
               "PIPELINE_PROCESS": child.name,  # where its metrics go (runtime/metrics.py)
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        if not self.settings.bootstrap_servers:  # a secured local broker: the child's role
            from pipeline.ops.broker_secure import role_environment

            env.update(role_environment(self.run_dir / "kafka", child.cmd))
        with open(child.log_file, "ab") as out:
            out.write(f"\n--- {time.strftime('%F %T')} starting: {' '.join(child.cmd)}\n".encode())
        import subprocess

        with open(child.log_file, "ab") as out:
            proc = subprocess.Popen(child.cmd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
        child._proc, child.pid, child.started_at = proc, proc.pid, time.time()
        if child not in self.children:
            self.children.append(child)
        log.info("started %s (pid %d)", child.name, child.pid)
        self.save()

    def _wait_port(self, child: Child, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if child._proc.poll() is not None:  # type: ignore[union-attr]
                raise PipelineError(f"{child.name} exited at start: {self._tail(child)}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.2)
        raise PipelineError(f"{child.name} did not listen on port {port} within {timeout:.0f}s")

    # -- keep running

    def watch(self) -> None:
        """Restart what dies (with backoff, up to each one's limit) until stopped."""
        while not self._stop.wait(0.5):
            now = time.monotonic()
            for child in self.children:
                proc = child._proc
                if proc is None or child.gave_up or child.finished or \
                        proc.poll() is None:  # type: ignore[union-attr]
                    continue
                if self._finished(child):
                    log.info("%s finished", child.name)
                    self.save()
                    continue
                if child.next_start == 0.0:
                    code = proc.returncode  # type: ignore[union-attr]
                    child.last_exit = code
                    child.last_error = (f"killed by signal {-code}" if code < 0 else
                                        f"exit code {code}: {self._tail(child)}")
                    if child.restarts >= child.restart_limit:
                        child.gave_up = True
                        log.error("%s exited (%s) and reached its restart limit %d: %s",
                                  child.name, child.last_exit, child.restart_limit,
                                  child.last_error)
                        self.save()
                        continue
                    delay = min(BACKOFF_MAX_S, 0.5 * 2 ** child.restarts)
                    child.next_start = now + delay
                    log.warning("%s exited with %s; restarting in %.1fs: %s", child.name,
                                child.last_exit, delay, child.last_error)
                    self.save()
                elif now >= child.next_start:
                    child.restarts += 1
                    child.next_start = 0.0
                    self._launch(child)
            self.save()

    # -- stop

    def stop(self) -> None:
        """Stop every process in reverse order of start, then what we started of the infra."""
        self._stop.set()
        self.phase = "stopping"
        self.save()
        for child in reversed(self.children):
            if child.pid and child.up:
                log.info("stopping %s (pid %d)", child.name, child.pid)
                terminate(child.pid, 20.0)
            if child._proc is not None:
                child._proc.wait()  # type: ignore[union-attr]
        if self._started_registry:
            LocalRegistry(self.run_dir).stop()
        if self._started_broker:
            local_kafka(self.run_dir).stop()
        self.phase = "stopped"
        self.save()

    # -- state

    def save(self) -> None:
        state = {"pid": os.getpid(), "phase": self.phase, "error": self.error,
                 "topology": str(self.topology.path), "namespace": str(self.topology.namespace),
                 "bootstrap": self.bootstrap, "registry": self.registry_url,
                 "metrics_port": self.topology.infra.metrics_port, "updated": time.time(),
                 "processes": [c.public() for c in self.children]}
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_path)

    @staticmethod
    def _finished(child: Child) -> bool:
        """A job that exited 0 is done (and stays so)."""
        proc = child._proc
        if child.oneshot and proc is not None and proc.poll() == 0:  # type: ignore[union-attr]
            child.finished, child.last_exit = True, 0
        return child.finished

    @staticmethod
    def _tail(child: Child) -> str:
        try:
            lines = Path(child.log_file).read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        errors = [line for line in lines if " ERROR " in line or line.startswith(("error:",
                  "Traceback")) or "Error: " in line]
        return (errors or lines or ["no output"])[-1][-300:]


def chart_interval(topology: Topology) -> str:
    """The shortest bar interval the topology's bars group writes: the dashboard's candles."""
    from pipeline.market.bars import DEFAULT_INTERVALS, INTERVALS_MS

    found: list[str] = []
    for proc in topology.processes:
        if proc.module == "consumers.bars" and proc.config is not None:
            found += [i for i in proc.config.intervals if i in INTERVALS_MS]
    return min(found, key=INTERVALS_MS.__getitem__) if found else DEFAULT_INTERVALS[0]


def declare_topics(topology: Topology) -> None:
    """The topology's own ``[[topic]]`` entries (user groups' outputs) join the catalog."""
    for raw in topology.topics:
        declare(TopicSpec(raw["name"], raw.get("partitions", 6), raw.get("key", "symbol"),
                          raw.get("description", "a user group's topic"), value_schema=None,
                          cleanup_policy=raw.get("cleanup_policy", "delete"),
                          retention_ms=raw.get("retention_ms", 7 * 24 * 3600 * 1000)))


def read_state(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def supervisor_running(run_dir: Path) -> dict | None:
    state = read_state(run_dir)
    if state and runs_command(state["pid"], "pipeline.ops.supervisor"):
        return state
    return None


def running_endpoints(settings: Settings, namespace: str | None = None
                      ) -> tuple[str, str, Namespace]:
    """(bootstrap, registry URL, namespace) of the topology running in ``settings.run_dir``
    (what its supervisor's state file says), else of the run directory's broker and
    registry and ``settings.namespace``; a ``namespace`` given wins."""
    state = read_state(settings.run_dir) or {}
    bootstrap = state.get("bootstrap") or bootstrap_servers(settings)
    registry = state.get("registry") or registry_url(settings)
    return bootstrap, registry, Namespace(namespace or state.get("namespace")
                                          or settings.namespace)


def main(argv: list[str] | None = None) -> int:
    """The detached supervisor process that ``pipeline up`` starts."""
    import argparse

    from pipeline.ops import topology as topology_module
    from pipeline.ops.metrics import serve_metrics

    ap = argparse.ArgumentParser(prog="python -m pipeline.ops.supervisor")
    ap.add_argument("--topology")
    ap.add_argument("--overlay")
    ap.add_argument("--replay-from", help="run on a replay of this namespace")
    ap.add_argument("--namespace", help="the replay namespace (with --replay-from)")
    ap.add_argument("--start")
    ap.add_argument("--end")
    ap.add_argument("--speed")
    ap.add_argument("--replay-topics")
    ap.add_argument("--run-dir", required=True)
    args = ap.parse_args(argv)
    log_to_stderr()
    settings = Settings.from_env(args.run_dir)
    loaded = topology_module.load(args.topology, args.overlay)
    if args.replay_from:
        loaded = topology_module.as_replay(
            loaded, args.replay_from, args.namespace, args.start, args.end, args.speed,
            args.replay_topics.split(",") if args.replay_topics else topology_module.REPLAY_TOPICS)
    supervisor = Supervisor(loaded, settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: supervisor._stop.set())
    try:
        supervisor.start()
    except PipelineError as exc:
        log.error("start failed: %s", exc)
        return 1
    serve_metrics(supervisor)
    supervisor.watch()
    supervisor.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
