"""The local Apache Kafka broker: what it is, that it keeps data, and how it fails."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from pipeline.core.errors import DeliveryFailed, PipelineError
from pipeline.kafka.catalog import Namespace, ensure_topics
from pipeline.kafka.clients import ReliableProducer
from pipeline.ops.broker import LocalBroker, kafka_libs, reported_version
from pipeline.ops.services import alive as _alive
from pipeline.ops.settings import REPO_ROOT, Settings
from tests.support.kafka_io import produce_json, read_all
from tests.support.processes import PIPELINE


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    return subprocess.run([PIPELINE, *args], capture_output=True, text=True, timeout=120,
                          env={**base, **(env or {})}, cwd=REPO_ROOT)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.broker
def test_the_broker_is_apache_kafka_4_and_says_so_through_the_admin_api(kafka, monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka)
    features = reported_version(Settings.from_env())
    major = int(features["metadata.version"].split(".")[0])
    assert major >= 4, features
    assert "kraft.version" in features  # KRaft mode: no ZooKeeper


@pytest.mark.broker
def test_restart_keeps_the_data_and_stop_leaves_no_process(tmp_path):
    broker = LocalBroker(tmp_path / "run")
    state = broker.start(port=0, controller_port=0)
    try:
        assert broker.start(port=0, controller_port=0) == state, "a second start is harmless"
        ns = Namespace("sim-restart")
        ensure_topics(state.bootstrap_servers, ns, ["md.trades"])
        topic = ns.topic("md.trades")
        items = [(f"K{i % 5}", {"i": i}) for i in range(200)]
        produce_json(state.bootstrap_servers, topic, items)
        assert broker.stop() is True
        assert not _alive(state.pid), "stop leaves no process behind"
        assert broker.stop() is False, "a second stop is harmless"
        again = broker.start(port=0, controller_port=0)
        assert again.pid != state.pid
        back = read_all(again.bootstrap_servers, topic, expect=200)
        assert sorted(int(r.value.decode().split(":")[1].strip(" }")) for r in back) == \
            list(range(200))
    finally:
        broker.stop()
    assert not (tmp_path / "run" / "kafka" / "broker.json").exists()


@pytest.mark.broker
def test_the_cli_starts_and_stops_once_and_starts_nothing_external(tmp_path):
    run = ["--run-dir", str(tmp_path / "run")]
    ports = ["--port", "0", "--controller-port", "0"]
    try:
        first = run_cli("broker", "start", *run, *ports)
        assert first.returncode == 0 and " started on 127.0.0.1:" in first.stdout, first.stderr
        address = first.stdout.split(" on ")[1].split()[0]
        again = run_cli("broker", "start", *run, *ports)
        assert f"already running on {address} " in again.stdout
    finally:
        stopped = run_cli("broker", "stop", *run)
    assert stopped.stdout.strip() == "Kafka broker stopped"
    assert run_cli("broker", "stop", *run).stdout.strip() == "no Kafka broker was running"
    assert run_cli("registry", "stop", *run).stdout.strip() == "no schema registry was running"
    for service, variable, value in (("broker", "KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9"),
                                     ("registry", "SCHEMA_REGISTRY_URL", "http://127.0.0.1:9")):
        env = {variable: value}
        assert run_cli(service, "start", *run, env=env).stdout.strip() == \
            f"{variable} is set: using {value}, starting nothing"
        assert run_cli(service, "stop", *run, env=env).stdout.strip() == \
            f"{variable} is set: nothing was started, nothing to stop"


def test_a_port_in_use_is_one_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PipelineError, match=f"port {port} .* already in use"):
            LocalBroker(tmp_path).start(port=port, controller_port=0)
        line = one_error_line(run_cli("broker", "start", "--run-dir", str(tmp_path),
                                      "--port", str(port)))
        assert f"port {port}" in line


@pytest.mark.broker
def test_a_broker_that_does_not_come_up_is_one_clear_error_and_nothing_runs(tmp_path):
    broker = LocalBroker(tmp_path)
    broker.start(port=0, controller_port=0)
    broker.stop()
    # Corrupt the storage: the stored node id no longer matches the configuration.
    meta = broker.data_dir / "meta.properties"
    meta.write_text(meta.read_text().replace("node.id=1", "node.id=7"))
    with pytest.raises(PipelineError, match="exited with code"):
        broker.start(port=0, controller_port=0, timeout=60)
    assert broker.state() is None
    assert not any(str(broker.config_file) in p.read_text(errors="replace")
                   for p in Path("/proc").glob("[0-9]*/cmdline") if _readable(p))


def _readable(path: Path) -> bool:
    try:
        path.read_bytes()
        return True
    except OSError:
        return False


def test_missing_java_is_one_clear_error(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    line = one_error_line(run_cli("broker", "start", "--run-dir", str(tmp_path / "run"),
                                  "--port", "0", "--controller-port", "0",
                                  env={"PATH": str(bin_dir)}))
    assert "'java' is not installed" in line


def test_missing_maven_on_first_start_is_one_clear_error(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "java").symlink_to(shutil.which("java"))
    line = one_error_line(run_cli("broker", "start", "--run-dir", str(tmp_path / "run"),
                                  "--port", "0", "--controller-port", "0",
                                  env={"PATH": str(bin_dir),
                                       "PIPELINE_CACHE_DIR": str(tmp_path / "cache")}))
    assert "'mvn' is not installed" in line


def test_an_unwritable_run_dir_is_one_clear_error(tmp_path):
    locked = tmp_path / "locked"
    locked.write_text("a file, not a directory")
    line = one_error_line(run_cli("broker", "start", "--run-dir", str(locked / "run")))
    assert "not writable" in line and "PIPELINE_RUN_DIR" in line


def test_a_broker_address_that_does_not_answer_is_one_clear_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    result = run_cli("topics", env={"KAFKA_BOOTSTRAP_SERVERS": dead})
    assert "does not answer" in one_error_line(result)


def test_unknown_names_are_one_clear_error(tmp_path):
    assert "invalid namespace" in one_error_line(
        run_cli("topics", "--namespace", "prod.x", "--run-dir", str(tmp_path)))
    with pytest.raises(PipelineError, match="unknown topic 'md.l3'"):
        Namespace("sim").topic("md.l3")


def test_no_local_broker_is_one_clear_error(tmp_path):
    line = one_error_line(run_cli("topics", "--run-dir", str(tmp_path)))
    assert "no Kafka broker is running" in line and "make broker" in line


def test_a_delivery_that_fails_is_never_silent():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    producer = ReliableProducer(dead, **{"message.timeout.ms": 500, "log_level": 0})
    producer.produce("sim.md.l2", b"x", b"BTCUSD")
    with pytest.raises(DeliveryFailed, match="not delivered|undelivered"):
        producer.flush(timeout=10)


def test_jars_are_cached_so_a_second_resolution_runs_no_maven(monkeypatch):
    libs = kafka_libs()
    monkeypatch.setenv("PATH", "/nonexistent")  # no mvn reachable now
    assert kafka_libs() == libs
    assert any(libs.glob("kafka_2.13-4.*.jar"))
