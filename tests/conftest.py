"""Test fixtures: one real Kafka broker for the whole session, a fresh namespace per test.

The broker runs from ``run/test`` on free ports and is stopped when the session ends,
also when tests fail. With KAFKA_BOOTSTRAP_SERVERS set, that cluster is used instead.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from pipeline.kafka.catalog import Namespace, ensure_topics
from pipeline.ops.broker import LocalBroker
from pipeline.ops.registry_server import LocalRegistry
from pipeline.ops.settings import REPO_ROOT

# PIPELINE_TEST_RUN_DIR lets two test sessions run side by side, each with its own broker.
TEST_RUN_DIR = Path(os.environ.get("PIPELINE_TEST_RUN_DIR") or REPO_ROOT / "run" / "test")
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def kafka() -> str:
    """Bootstrap servers of the session's broker."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    broker = LocalBroker(TEST_RUN_DIR)
    broker.stop()  # a broker left behind by a killed earlier run
    shutil.rmtree(TEST_RUN_DIR, ignore_errors=True)
    state = broker.start(port=0, controller_port=0, quiet=False)
    try:
        yield state.bootstrap_servers
    finally:
        broker.stop()


class RegistryHandle:
    """The session's registry; ``restart`` brings it back on the same port."""

    def __init__(self, kafka: str) -> None:
        self.kafka = kafka
        self.external = os.environ.get("SCHEMA_REGISTRY_URL")
        self._local = LocalRegistry(TEST_RUN_DIR)
        self.url = self.external or self._start(port=0)

    def _start(self, port: int) -> str:
        self.state = self._local.start(self.kafka, port=port, quiet=False)
        return self.state.url

    def restart(self) -> None:
        if self.external:
            pytest.skip("cannot restart an external registry (SCHEMA_REGISTRY_URL)")
        port = self.state.port
        self._local.stop()
        self.url = self._start(port=port)

    def stop(self) -> None:
        if not self.external:
            self._local.stop()


@pytest.fixture(scope="session")
def registry(kafka: str):
    """A real schema registry (Apicurio, KafkaSQL storage on the session's broker)."""
    handle = RegistryHandle(kafka)
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def namespace() -> Namespace:
    """A namespace of this test's own, so tests never see each other's records."""
    return Namespace(f"sim-t{uuid.uuid4().hex[:10]}")


@pytest.fixture
def topics(kafka: str, namespace: Namespace):
    """Create catalog topics in the test's namespace: ``topics("md.l2", "dlq")``."""

    def create(*names: str) -> dict[str, str]:
        ensure_topics(kafka, namespace, names)
        return {name: namespace.topic(name) for name in names}

    return create


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real Gemini data not found at {SHARED_DATA} (../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture
def up_env(kafka, registry, tmp_path):
    """The environment for `pipeline up` on the session's cluster, in a run dir of this test;
    the topology is brought down afterwards, whatever happened."""
    from tests.support.processes import cli, cluster_env

    env = cluster_env(kafka, registry.url, PIPELINE_RUN_DIR=str(tmp_path / "run"))
    yield env
    cli("down", env=env, timeout=200)


# `make test-unit` runs what needs no broker: every test but those marked integration here.
# A test is integration when it asks for the session's broker or registry (directly or
# through another fixture), a cluster or the secured broker, or sits in a module whose tests
# start Kafka themselves.
INFRA_FIXTURES = {"kafka", "registry", "secured", "cluster"}
STARTS_KAFKA_ITSELF = {"test_broker", "test_cluster", "test_secure_kafka", "test_bench"}


def pytest_collection_modifyitems(config, items) -> None:
    misplaced = []
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        if INFRA_FIXTURES & set(getattr(item, "fixturenames", ())) or \
                item.get_closest_marker("broker") or module in STARTS_KAFKA_ITSELF:
            item.add_marker(pytest.mark.integration)
            if item.module and item.module.__name__.startswith("tests.unit."):
                misplaced.append(item.nodeid)
    if misplaced:  # tests/unit/ is what runs without a broker: a test needing one goes elsewhere
        raise pytest.UsageError("tests under tests/unit/ need Kafka; move them to "
                                "tests/integration/: " + ", ".join(misplaced[:5]))
