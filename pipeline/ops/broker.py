"""A local Apache Kafka (KRaft) run from the official jars: one node, or a cluster of N.

The jars come from Maven Central through ``docker/kafka/pom.xml`` and are cached per
user, so only the first start downloads. Everything one broker writes (config, data,
logs, pid) lives under ``<run_dir>/kafka``; ``broker.json`` there tells the rest of the
pipeline where the broker listens. A cluster (``pipeline broker start --nodes 3``) keeps
node ``i`` under ``<run_dir>/kafka/node-<i>`` and describes itself in
``<run_dir>/kafka/cluster.json``. With ``KAFKA_BOOTSTRAP_SERVERS`` set none of this runs.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

from pipeline.core.errors import PipelineError
from pipeline.kafka.catalog import CLUSTER_MIN_INSYNC, CLUSTER_REPLICATION
from pipeline.ops import broker_secure
from pipeline.ops.services import (
    DetachedService,
    ServiceState,
    alive,
    answers,
    find_java,
    free_port,
    maven_artifacts,
    pom_property,
    require_free_port,
    require_tool,
    spawn,
)
from pipeline.ops.settings import REPO_ROOT, Settings, ensure_writable_dir

POM = REPO_ROOT / "docker" / "kafka" / "pom.xml"
SERVER_TEMPLATE = REPO_ROOT / "docker" / "kafka" / "server.properties"
DEFAULT_PORT = 9092
DEFAULT_CONTROLLER_PORT = 9093
# Sized for a 2-core machine: a small heap, few GC and compiler threads; three cluster
# nodes get less each, so they fit beside the registry and the topology.
DEFAULT_HEAP_OPTS = "-Xms256m -Xmx768m"
CLUSTER_HEAP_OPTS = "-Xms192m -Xmx512m"
# Node i of a cluster listens on port + PORT_STRIDE * (i - 1) (and the same for controllers).
PORT_STRIDE = 10
JVM_OPTS = [
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:ParallelGCThreads=2",
    "-XX:ConcGCThreads=1",
    "-XX:CICompilerCount=2",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
]
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class BrokerState(ServiceState):
    """What ``broker.json`` records about a running local broker."""

    bootstrap_servers: str
    controller_port: int
    kafka_version: str


# --------------------------------------------------------------------------- jars


def kafka_version() -> str:
    return pom_property(POM, "kafka.version")


def kafka_libs(quiet: bool = True) -> Path:
    """The directory of Kafka jars, resolved with Maven on first use and cached."""
    libs = maven_artifacts(POM, f"the Apache Kafka {kafka_version()} jars", quiet)
    if not any(libs.glob("kafka_2.13-*.jar")):
        raise PipelineError(f"{libs} holds no kafka_2.13 jar: delete {libs.parent} and retry")
    return libs


def java_command(libs: Path, main: str, *args: str, heap: str = "-Xmx256m",
                 log_config: Path | None = None) -> list[str]:
    """A ``java`` command line running ``main`` from the Kafka jars."""
    java = find_java(17, "to run Apache Kafka 4")
    cmd = [java, *heap.split(), *JVM_OPTS]
    if log_config is not None:
        cmd.append(f"-Dlog4j2.configurationFile={log_config}")
    return [*cmd, "-cp", f"{libs}/*", main, *args]


# --------------------------------------------------------------------------- broker


class LocalBroker(DetachedService[BrokerState]):
    """One Kafka node (broker + controller) whose files all live in ``<run_dir>/kafka``
    (or in ``home``, for a node of a :class:`LocalCluster`)."""

    what = "Kafka broker"

    def __init__(self, run_dir: Path, host: str = "127.0.0.1", node_id: int = 1,
                 home: Path | None = None, voters: str | None = None,
                 cluster_id: str | None = None, replication: int = 1,
                 heap: str = DEFAULT_HEAP_OPTS) -> None:
        self.host = host
        self.node_id = node_id
        self.home = Path(home) if home is not None else Path(run_dir) / "kafka"
        self._voters, self._cluster_id = voters, cluster_id
        self.replication = replication
        self.heap = heap
        self.data_dir = self.home / "data"
        self.log_dir = self.home / "logs"
        self.config_file = self.home / "server.properties"
        self.log_config = self.home / "log4j2.properties"
        self.tools_log_config = self.home / "log4j2-tools.properties"
        super().__init__(BrokerState, self.home / "broker.json", self.log_dir / "server.log",
                         ("kafka.Kafka", str(self.config_file)))

    @classmethod
    def from_settings(cls, settings: Settings) -> "LocalBroker":
        return cls(settings.run_dir)

    def state(self) -> BrokerState | None:
        state = super().state()
        if state is not None:  # secured: this process's clients connect as its operator
            broker_secure.remember(self.home, state.bootstrap_servers)
        return state

    def is_ready(self, timeout: float = 3.0) -> bool:
        state = self.state()
        return state is not None and broker_answers(state.bootstrap_servers, timeout)

    # -- start

    def start(self, port: int = DEFAULT_PORT, controller_port: int = DEFAULT_CONTROLLER_PORT,
              timeout: float = START_TIMEOUT_S, quiet: bool = True,
              wait: bool = True, secure: bool = False) -> BrokerState:
        """Start the broker, or return the running one; raise PipelineError on any failure.

        ``wait=False`` (a cluster node) returns once the process runs: a node answers only
        when a majority of the controller voters does, so the cluster waits for all.
        ``secure`` (and always once a run directory's broker was): SASL_SSL, SCRAM users and
        ACLs per role (pipeline/ops/broker_secure.py)."""
        secure = secure or broker_secure.is_secure(self.home)
        running = self.state()
        if running is not None and secure and not broker_secure.is_secure(self.home):
            raise PipelineError(f"the broker running from {self.home} (pid {running.pid}) is "
                                "not secured: stop it first (`pipeline broker stop`)")
        if running is not None and not wait:
            return running
        if running is not None:
            if not broker_answers(running.bootstrap_servers, timeout=timeout):
                raise PipelineError(
                    f"a broker process (pid {running.pid}) is running from {self.home} but "
                    f"does not answer on {running.bootstrap_servers}: see "
                    f"{self.log_dir / 'server.log'}, then `pipeline broker stop`"
                )
            return running
        ensure_writable_dir(self.home)
        port = port or free_port(self.host)
        controller_port = controller_port or free_port(self.host)
        for wanted in (port, controller_port):
            require_free_port(wanted, self.host, "Kafka broker",
                              "start the broker on other ports (`pipeline broker start --port N "
                              "--controller-port M`), or set KAFKA_BOOTSTRAP_SERVERS to use "
                              "that cluster")
        require_tool("java", "to run the Apache Kafka broker")
        find_java(17, "to run Apache Kafka 4")
        libs = kafka_libs(quiet=quiet)
        self._write_configs(port, controller_port)
        scram = self._secure(port, controller_port) if secure else []
        if not (self.data_dir / "meta.properties").exists():
            self._format(libs, scram)
        state = self._launch(libs, port, controller_port, timeout, wait)
        if secure:
            broker_secure.grant_defaults(state.bootstrap_servers)
        return state

    def _secure(self, port: int, controller_port: int) -> list[str]:
        """The secured broker's settings (appended to server.properties) and its users."""
        formatted = (self.data_dir / "meta.properties").exists()
        if formatted and not broker_secure.is_secure(self.home):
            raise PipelineError(f"the broker of {self.home} was formatted without --secure, so "
                                "it has no SCRAM users: use another run directory, or stop it "
                                f"and delete {self.data_dir}")
        files = broker_secure.prepare(self.home, self.host)
        with self.config_file.open("a") as out:
            out.write(broker_secure.server_properties(files, self.host, port, controller_port))
        broker_secure.remember(self.home, f"{self.host}:{port}")
        return [] if formatted else broker_secure.format_arguments(files)

    def await_started(self, state: BrokerState, timeout: float = START_TIMEOUT_S) -> BrokerState:
        """Wait until a node started with ``wait=False`` answers (see :meth:`start`)."""
        host, port = self.host, state.port
        return self.await_ready(
            self._proc, state,
            lambda: answers(host, port) and broker_answers(state.bootstrap_servers, 2.0),
            timeout, state.bootstrap_servers)

    def kill(self) -> int | None:
        """``kill -9`` the node (a crash, for fault tests); its files stay. The pid, or None."""
        state = self.state()
        if state is None:
            return None
        os.kill(state.pid, signal.SIGKILL)
        while alive(state.pid):  # reaped if it is our child
            time.sleep(0.05)
        return state.pid

    def _write_configs(self, port: int, controller_port: int) -> None:
        ensure_writable_dir(self.log_dir)
        values = {
            "host": self.host,
            "port": port,
            "controller_port": controller_port,
            "data_dir": self.data_dir,
            "node_id": self.node_id,
            "voters": self._voters or f"{self.node_id}@{self.host}:{controller_port}",
            "replication": self.replication,
            "min_isr": CLUSTER_MIN_INSYNC if self.replication >= CLUSTER_REPLICATION else 1,
        }
        self.config_file.write_text(SERVER_TEMPLATE.read_text().format(**values))
        self.log_config.write_text(_log4j_properties(self.log_dir / "server.log", "INFO"))
        self.tools_log_config.write_text(_log4j_properties(self.log_dir / "tools.log", "WARN"))

    def _format(self, libs: Path, extra: list[str]) -> None:
        cluster_id = self._cluster_id or new_cluster_id()
        cmd = java_command(libs, "kafka.tools.StorageTool", "format", "--cluster-id", cluster_id,
                           "--config", str(self.config_file), *extra,
                           log_config=self.tools_log_config)
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise PipelineError(
                f"formatting Kafka storage in {self.data_dir} failed: "
                f"{(result.stderr or result.stdout).strip()[-300:]}"
            )

    def _launch(self, libs: Path, port: int, controller_port: int, timeout: float,
                wait: bool = True) -> BrokerState:
        heap = os.environ.get("KAFKA_HEAP_OPTS", self.heap)
        cmd = java_command(libs, "kafka.Kafka", str(self.config_file), heap=heap,
                           log_config=self.log_config)
        proc = spawn(cmd, self.log_dir / "stdout.log", self.home)
        bootstrap = f"{self.host}:{port}"
        state = BrokerState(pid=proc.pid, bootstrap_servers=bootstrap, port=port,
                            controller_port=controller_port, kafka_version=kafka_version(),
                            started_at=time.time())
        self._proc = proc
        if not wait:  # a cluster node: it answers only once a quorum of voters runs
            self.state_file.write_text(json.dumps(asdict(state), indent=2))
            return state
        return self.await_ready(
            proc, state, lambda: answers(self.host, port) and broker_answers(bootstrap, 2.0),
            timeout, bootstrap)

    # -- tools

    def run_tool(self, main: str, *args: str, timeout: float = 60.0) -> str:
        """Run one of Kafka's own command-line tools against this installation."""
        cmd = java_command(kafka_libs(), main, *args, log_config=self.tools_log_config
                           if self.tools_log_config.exists() else None)
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            raise PipelineError(f"{main} failed: {(result.stderr or result.stdout).strip()[-300:]}")
        return result.stdout


def new_cluster_id() -> str:
    """A KRaft cluster id, as Kafka's Uuid.randomUuid makes them."""
    cluster_id = "-"
    while cluster_id.startswith("-"):  # as Kafka's Uuid.randomUuid: "-x" reads as an option
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    return cluster_id


# --------------------------------------------------------------------------- cluster


@dataclass(frozen=True)
class ClusterState:
    """What ``cluster.json`` records: the nodes of a local cluster and where they listen."""

    bootstrap_servers: str
    nodes: int
    host: str
    ports: list[int]
    controller_ports: list[int]
    cluster_id: str
    kafka_version: str
    started_at: float


class LocalCluster:
    """``nodes`` Kafka nodes, each a broker and a controller voter, under ``<run_dir>/kafka``.

    Topics created by the catalog get 3 replicas and ``min.insync.replicas=2`` (as do the
    internal offsets and transaction topics, from the nodes' defaults), so one node may die
    and the cluster goes on without losing an acknowledged record.
    """

    what = "Kafka cluster"

    def __init__(self, run_dir: Path, nodes: int = 3, host: str = "127.0.0.1") -> None:
        if nodes < 2:
            raise PipelineError(f"a cluster needs at least 2 nodes, not {nodes}: run one broker "
                                "with `pipeline broker start`")
        self.run_dir, self.host, self.size = Path(run_dir), host, nodes
        self.home = self.run_dir / "kafka"
        self.state_file = self.home / "cluster.json"
        self.log_dir = self.home

    def recorded(self) -> ClusterState | None:
        """The cluster's description, whether or not its nodes run."""
        return read_cluster(self.run_dir)

    def node(self, node_id: int, described: ClusterState | None = None) -> LocalBroker:
        described = described or self.recorded()
        voters = cluster_id = None
        if described is not None:
            voters = ",".join(f"{i + 1}@{described.host}:{p}"
                              for i, p in enumerate(described.controller_ports))
            cluster_id = described.cluster_id
        return LocalBroker(self.run_dir, self.host, node_id=node_id,
                           home=self.home / f"node-{node_id}", voters=voters,
                           cluster_id=cluster_id, replication=min(self.size, CLUSTER_REPLICATION),
                           heap=CLUSTER_HEAP_OPTS)

    def nodes(self, described: ClusterState | None = None) -> list[LocalBroker]:
        described = described or self.recorded()
        return [self.node(i, described) for i in range(1, self.size + 1)]

    def state(self) -> ClusterState | None:
        """The description if at least one node runs (a cluster with a node down is running)."""
        described = self.recorded()
        if described is None or not any(n.state() for n in self.nodes(described)):
            return None
        return described

    def start(self, port: int = DEFAULT_PORT, controller_port: int = DEFAULT_CONTROLLER_PORT,
              timeout: float = START_TIMEOUT_S, quiet: bool = True) -> ClusterState:
        """Start every node that is not running (all at once: a node answers only when a
        majority of voters runs), wait until each answers; the ports of an earlier start
        are kept, so a restarted node is where the clients look for it."""
        described = self.recorded()
        if described is None or described.nodes != self.size:
            if (self.home / "broker.json").exists() and LocalBroker(self.run_dir).state():
                raise PipelineError(f"a single broker runs from {self.home}: stop it "
                                    "(`pipeline broker stop`) before starting a cluster there")
            described = self._describe(port, controller_port)
        require_tool("java", "to run the Apache Kafka broker")
        kafka_libs(quiet=quiet)
        nodes = self.nodes(described)
        started = []
        for i, node in enumerate(nodes):
            if node.state() is None:
                state = node.start(described.ports[i], described.controller_ports[i],
                                   timeout, quiet, wait=False)
                started.append((node, state))
        for node, state in started:
            node.await_started(state, timeout)
        self._await_members(described, timeout)
        return described

    def _await_members(self, described: ClusterState, timeout: float) -> None:
        """Until every node is registered with the controller (a node answers metadata
        before the others have joined; a client arriving then sees a smaller cluster)."""
        from pipeline.kafka.clients import make_admin

        admin = make_admin(described.bootstrap_servers, logger=_SILENT_LOGGER,
                           error_cb=_SILENT_LOGGER.log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if len(admin.list_topics(timeout=5).brokers) >= self.size:
                    return
            except Exception:  # noqa: BLE001 - not answering yet: wait
                pass
            time.sleep(0.25)
        raise PipelineError(f"the {self.size} nodes of {self.home} did not all join the "
                            f"cluster within {timeout:.0f}s: see {self.home}/node-*/logs")

    def _describe(self, port: int, controller_port: int) -> ClusterState:
        ensure_writable_dir(self.home)
        ports, controllers = [], []
        for i in range(self.size):
            ports.append(port + PORT_STRIDE * i if port else free_port(self.host))
            controllers.append(controller_port + PORT_STRIDE * i if controller_port
                               else free_port(self.host))
        for wanted in (*ports, *controllers):
            require_free_port(wanted, self.host, "Kafka cluster node",
                              "start the cluster on other ports (`pipeline broker start --nodes "
                              "3 --port N --controller-port M`)")
        described = ClusterState(
            bootstrap_servers=",".join(f"{self.host}:{p}" for p in ports), nodes=self.size,
            host=self.host, ports=ports, controller_ports=controllers,
            cluster_id=new_cluster_id(), kafka_version=kafka_version(), started_at=time.time())
        self.state_file.write_text(json.dumps(asdict(described), indent=2))
        return described

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        """Stop every node (brokers first would only move leaders around: all at once)."""
        nodes = [n for n in self.nodes() if n.state() is not None]
        for node in nodes:
            state = node.state()
            if state is not None:
                os.kill(state.pid, signal.SIGTERM)
        for node in nodes:
            node.stop(timeout)
        return bool(nodes)


def read_cluster(run_dir: Path) -> ClusterState | None:
    try:
        return ClusterState(**json.loads((Path(run_dir) / "kafka" / "cluster.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


LocalKafka = Union[LocalBroker, LocalCluster]


def local_kafka(run_dir: Path, host: str = "127.0.0.1", nodes: int | None = None) -> LocalKafka:
    """The run directory's local Kafka: the cluster it describes (or ``nodes`` > 1 asks
    for), else the single broker."""
    if nodes is None:
        described = read_cluster(run_dir)
        nodes = described.nodes if described is not None else 1
    return LocalCluster(run_dir, nodes, host) if nodes > 1 else LocalBroker(run_dir, host)


def _log4j_properties(log_file: Path, level: str) -> str:
    return "\n".join([
        "status = warn",
        "appender.file.type = RollingFile",
        "appender.file.name = file",
        f"appender.file.fileName = {log_file}",
        f"appender.file.filePattern = {log_file}.%i",
        "appender.file.layout.type = PatternLayout",
        "appender.file.layout.pattern = [%d] %p %m (%c)%n",
        "appender.file.policies.type = Policies",
        "appender.file.policies.size.type = SizeBasedTriggeringPolicy",
        "appender.file.policies.size.size = 50MB",
        "appender.file.strategy.type = DefaultRolloverStrategy",
        "appender.file.strategy.max = 3",
        f"rootLogger.level = {level}",
        "rootLogger.appenderRef.file.ref = file",
        "logger.kafka.name = kafka",
        f"logger.kafka.level = {level}",
        "",
    ])


# --------------------------------------------------------------------------- lookup


def broker_answers(bootstrap: str, timeout: float = 3.0) -> bool:
    """True if a Kafka cluster at ``bootstrap`` returns metadata within ``timeout``."""
    from pipeline.kafka.clients import make_admin  # local: keeps `pipeline --help` fast

    admin = make_admin(bootstrap, log_level=0, logger=_SILENT_LOGGER,
                       error_cb=_SILENT_LOGGER.log)
    try:
        admin.list_topics(timeout=timeout)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not answering"
        return False


class _SilentLogger:
    """Swallows librdkafka's own log lines while we probe; errors surface as exceptions."""

    def log(self, *args: object, **kwargs: object) -> None:
        pass

    def __getattr__(self, name: str):  # debug/info/warning/error/...
        return self.log


_SILENT_LOGGER = _SilentLogger()


def bootstrap_servers(settings: Settings) -> str:
    """Where Kafka is: KAFKA_BOOTSTRAP_SERVERS, else the local broker of the run dir."""
    if settings.bootstrap_servers:
        return settings.bootstrap_servers
    state = local_kafka(settings.run_dir).state()
    if state is None:
        raise PipelineError(
            f"no Kafka broker is running for run directory {settings.run_dir}: start one with "
            "`make broker` (or `pipeline broker start`), or set KAFKA_BOOTSTRAP_SERVERS"
        )
    return state.bootstrap_servers


def reported_version(settings: Settings) -> dict[str, str]:
    """The features the cluster reports through the Admin API (DescribeFeatures).

    ``metadata.version`` (e.g. ``4.1-IV1``) names the Apache Kafka release line the
    cluster runs; it is asked of the broker with Kafka's own FeatureCommand.
    """
    bootstrap = bootstrap_servers(settings)
    broker = LocalBroker.from_settings(settings)
    out = broker.run_tool("org.apache.kafka.tools.FeatureCommand", "--bootstrap-server", bootstrap,
                          *broker_secure.tool_options(broker.home, bootstrap), "describe")
    features = {}
    for line in out.splitlines():
        match = re.match(r"Feature:\s*(\S+).*FinalizedVersionLevel:\s*(\S+)", line)
        if match:
            features[match.group(1)] = match.group(2)
    if "metadata.version" not in features:
        raise PipelineError(f"the cluster at {bootstrap} did not report metadata.version: "
                            f"{out[:300]}")
    return features
