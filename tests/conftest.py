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

from pipeline.broker import LocalBroker
from pipeline.catalog import Namespace, ensure_topics
from pipeline.config import REPO_ROOT

TEST_RUN_DIR = REPO_ROOT / "run" / "test"
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


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real Gemini data not found at {SHARED_DATA} (../shared/data beside the repo)")
    return SHARED_DATA
