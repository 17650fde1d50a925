"""A local schema registry: Apicurio Registry 3 with KafkaSQL storage.

The distribution comes from Maven Central through ``docker/registry/pom.xml`` and is
cached per user. Registered schemas live in a Kafka topic (``_apicurio-kafkasql-journal``),
so they and their ids survive restarts, as with Confluent's registry and its
``_schemas`` topic. It needs Java 21+ (Apicurio 3.3 is built for it); ``find_java`` looks in
JAVA_HOME, PATH and /usr/lib/jvm. The pipeline talks to it only through the
Confluent-compatible API at ``/apis/ccompat/v7``. With ``SCHEMA_REGISTRY_URL`` set none of
this runs.
"""

from __future__ import annotations

import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from pipeline.core.errors import PipelineError
from pipeline.ops.services import (
    DetachedService,
    ServiceState,
    find_java,
    free_port,
    maven_artifacts,
    pom_property,
    require_free_port,
    spawn,
)
from pipeline.ops.settings import REPO_ROOT, Settings, ensure_writable_dir

POM = REPO_ROOT / "docker" / "registry" / "pom.xml"
DEFAULT_PORT = 8081
JOURNAL_TOPIC = "_apicurio-kafkasql-journal"
SNAPSHOTS_TOPIC = "_apicurio-kafkasql-snapshots"
EVENTS_TOPIC = "_apicurio-registry-events"
CCOMPAT_PATH = "/apis/ccompat/v7"
MIN_JAVA = 21
START_TIMEOUT_S = 180.0
JVM_OPTS = ["-Xms128m", "-Xmx512m", "-XX:+UseG1GC", "-XX:ParallelGCThreads=2",
            "-XX:ConcGCThreads=1", "-XX:CICompilerCount=2", "-XX:+ExitOnOutOfMemoryError"]


@dataclass(frozen=True)
class RegistryState(ServiceState):
    """What ``registry.json`` records about a running local registry."""

    url: str  # the Confluent-compatible API base
    management_port: int
    bootstrap_servers: str  # the Kafka it stores schemas in
    version: str


def apicurio_version() -> str:
    return pom_property(POM, "apicurio.version")


def apicurio_dist(quiet: bool = True) -> Path:
    """The unpacked Quarkus application (``quarkus-run.jar`` and its libs)."""
    artifacts = maven_artifacts(POM, f"Apicurio Registry {apicurio_version()}", quiet)
    dist = artifacts.parent / "dist"
    if (dist / "quarkus-run.jar").exists():
        return dist
    tarballs = sorted(artifacts.glob("apicurio-registry-app-*-all.tar.gz"))
    if not tarballs:
        raise PipelineError(f"no Apicurio distribution in {artifacts}: delete "
                            f"{artifacts.parent} and retry")
    partial = artifacts.parent / "dist.partial"
    with tarfile.open(tarballs[-1]) as tar:
        tar.extractall(partial, filter="data")
    partial.rename(dist)
    return dist


def storage_ready(host: str, management_port: int, timeout: float = 3.0) -> bool:
    """Apicurio's readiness check: UP only once KafkaSQL storage has replayed its journal.
    Before that, /subjects already answers but does not yet know every schema."""
    try:
        response = requests.get(f"http://{host}:{management_port}/health/ready", timeout=timeout)
        return response.status_code == 200 and response.json().get("status") == "UP"
    except (requests.RequestException, ValueError):
        return False


def ccompat_answers(url: str, timeout: float = 3.0) -> bool:
    try:
        return requests.get(f"{url}/subjects", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


class LocalRegistry(DetachedService[RegistryState]):
    """One Apicurio Registry process whose files live in ``<run_dir>/registry``."""

    what = "schema registry"

    def __init__(self, run_dir: Path, host: str = "127.0.0.1") -> None:
        self.host = host
        self.home = Path(run_dir) / "registry"
        super().__init__(RegistryState, self.home / "registry.json", self.home / "registry.log",
                         ("quarkus-run.jar", self._marker()))

    @classmethod
    def from_settings(cls, settings: Settings) -> "LocalRegistry":
        return cls(settings.run_dir)

    def _marker(self) -> str:
        return f"-Dpipeline.registry.home={self.home}"

    def start(self, bootstrap: str, port: int = DEFAULT_PORT, management_port: int = 0,
              timeout: float = START_TIMEOUT_S, quiet: bool = True) -> RegistryState:
        """Start the registry on ``bootstrap``'s Kafka, or return the running one."""
        running = self.state()
        if running is not None:
            if running.bootstrap_servers != bootstrap:
                raise PipelineError(
                    f"the registry running from {self.home} (pid {running.pid}) stores its "
                    f"schemas in Kafka at {running.bootstrap_servers}, not {bootstrap}: stop it "
                    "first with `pipeline registry stop`")
            if not ccompat_answers(running.url, timeout=10):
                raise PipelineError(f"a registry process (pid {running.pid}) runs from "
                                    f"{self.home} but does not answer at {running.url}: see "
                                    f"{self.log_file}, then `pipeline registry stop`")
            return running
        ensure_writable_dir(self.home)
        port = port or free_port(self.host)
        management_port = management_port or free_port(self.host)
        for wanted in (port, management_port):
            require_free_port(wanted, self.host, "schema registry",
                              "start it on other ports (`pipeline registry start --port N`), or "
                              "set SCHEMA_REGISTRY_URL to use a running registry")
        java = find_java(MIN_JAVA, f"to run Apicurio Registry {apicurio_version()}")
        dist = apicurio_dist(quiet)
        cmd = [java, *JVM_OPTS, self._marker(),
               f"-Dquarkus.http.host={self.host}", f"-Dquarkus.http.port={port}",
               f"-Dquarkus.management.host={self.host}",
               f"-Dquarkus.management.port={management_port}",
               "-Dapicurio.storage.kind=kafkasql",
               f"-Dapicurio.kafkasql.bootstrap.servers={bootstrap}",
               f"-Dapicurio.kafkasql.topic={JOURNAL_TOPIC}",
               f"-Dapicurio.kafkasql.snapshots.topic={SNAPSHOTS_TOPIC}",
               f"-Dapicurio.events.kafka.topic={EVENTS_TOPIC}",
               # Confluent's default; Apicurio enforces nothing until a rule is set.
               "-Dapicurio.rules.global.compatibility=BACKWARD",
               # ids are content ids, as in Confluent's registry (not Apicurio's global ids)
               "-Dapicurio.ccompat.legacy-id-mode.enabled=false",
               "-Dquarkus.http.access-log.enabled=false",
               "-Dquarkus.otel.sdk.disabled=true",
               *self._kafka_security(bootstrap),
               "-jar", str(dist / "quarkus-run.jar")]
        proc = spawn(cmd, self.log_file, self.home)
        url = f"http://{self.host}:{port}{CCOMPAT_PATH}"
        state = RegistryState(pid=proc.pid, url=url, port=port, management_port=management_port,
                              bootstrap_servers=bootstrap, version=apicurio_version(),
                              started_at=time.time())
        return self.await_ready(
            proc, state, lambda: storage_ready(self.host, management_port, timeout=2)
            and ccompat_answers(url, timeout=2), timeout, url)

    def _kafka_security(self, bootstrap: str) -> list[str]:
        """How the registry's Kafka clients authenticate: as ``registry`` on the run
        directory's secured broker, else as this process's settings say (an external
        cluster). The settings, password included, go to a file readable only by its owner
        that Quarkus reads (``quarkus.config.locations``), never to the command line."""
        from pipeline.kafka.security import load_security, write_java_properties
        from pipeline.ops import broker_secure

        kafka_home = self.home.parent / "kafka"
        local = broker_secure.registry_settings(kafka_home)
        broker = _local_broker_bootstrap(kafka_home)
        security = local if local is not None and broker == bootstrap else \
            load_security(bootstrap=bootstrap)
        if security.protocol == "PLAINTEXT":
            return []
        secrets_dir = ensure_writable_dir(self.home / "secrets")
        os.chmod(secrets_dir, 0o700)
        # apicurio.kafka.common.*: the settings of its producer, consumer and admin client
        path = write_java_properties(secrets_dir / "kafka-client.properties", security,
                                     "apicurio.kafka.common.", quarkus=True)
        return [f"-Dquarkus.config.locations={path}"]


def _local_broker_bootstrap(kafka_home: Path) -> str | None:
    from pipeline.ops.broker import LocalBroker

    state = LocalBroker(kafka_home.parent).state()
    return state.bootstrap_servers if state else None


def registry_url(settings: Settings) -> str:
    """Where the registry is: SCHEMA_REGISTRY_URL, else the local one of the run dir."""
    if settings.schema_registry_url:
        return settings.schema_registry_url.rstrip("/")
    state = LocalRegistry.from_settings(settings).state()
    if state is None:
        raise PipelineError(
            f"no schema registry is running for run directory {settings.run_dir}: start one "
            "with `make up` (or `pipeline registry start`), or set SCHEMA_REGISTRY_URL")
    return state.url
