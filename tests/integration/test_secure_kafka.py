"""A secured Kafka: client security from one place, `pipeline broker start --secure` (SASL_SSL,
SCRAM users and ACLs per role), least privilege for the topology, and no secret in clear.

The secured broker is this module's own, in ``<test run dir>-secure``, stopped at the end.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import stat
import time
import uuid
from pathlib import Path

import pytest
import requests
import websocket
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from pipeline.core.errors import PipelineError
from pipeline.kafka.catalog import Namespace, describe_topics, ensure_topics
from pipeline.kafka.clients import client_config
from pipeline.kafka.security import SECURITY_ENV, load_security
from pipeline.ops import topology
from pipeline.ops.broker import LocalBroker
from pipeline.ops.broker_secure import GRANTS, MODULE_ROLES, ROLES, SecureFiles, grant, role_for
from pipeline.ops.registry_server import LocalRegistry
from pipeline.ops.services import free_port
from pipeline.ops.settings import REPO_ROOT
from pipeline.ops.topology import SHIPPED_GROUPS
from tests.conftest import TEST_RUN_DIR
from tests.support.processes import cli
from tests.support.waiting import wait_for

SECURE_RUN_DIR = TEST_RUN_DIR.with_name(TEST_RUN_DIR.name + "-secure")


class Secured:
    def __init__(self, bootstrap: str, run_dir: Path) -> None:
        self.bootstrap, self.run_dir = bootstrap, run_dir
        self.files = SecureFiles(run_dir / "kafka")

    def config(self, role: str, **extra) -> dict:
        """A client of ``role``'s principal (the password from its file)."""
        return client_config(self.bootstrap, **self.files.security(role).client_settings(),
                             **extra)

    def env(self, **extra: str) -> dict:
        """`pipeline ...` on this run dir's broker: nothing external, no inherited security."""
        drop = ("KAFKA_BOOTSTRAP_SERVERS", "SCHEMA_REGISTRY_URL", *SECURITY_ENV)
        return {**{k: v for k, v in os.environ.items() if k not in drop},
                "PIPELINE_RUN_DIR": str(self.run_dir), **extra}


@pytest.fixture(scope="module")
def secured():
    broker = LocalBroker(SECURE_RUN_DIR)
    LocalRegistry(SECURE_RUN_DIR).stop()
    broker.stop()  # left behind by a killed earlier run
    shutil.rmtree(SECURE_RUN_DIR, ignore_errors=True)
    state = broker.start(port=0, controller_port=0, quiet=False, secure=True)
    try:
        yield Secured(state.bootstrap_servers, SECURE_RUN_DIR)
    finally:
        LocalRegistry(SECURE_RUN_DIR).stop()
        broker.stop()


@pytest.fixture
def secured_ns(secured) -> Namespace:
    """A namespace of the test's own on the secured broker, its topics and ACLs made."""
    ns = Namespace(f"sim-sec{uuid.uuid4().hex[:8]}")
    ensure_topics(secured.bootstrap, ns)  # as admin, the operator of this run directory
    grant(secured.bootstrap, str(ns))
    return ns


def records(secured: Secured, topic: str, consumer: Consumer | None = None) -> int:
    """Records a topic ever took, transaction markers included (end offsets, as admin)."""
    own = consumer is None
    consumer = consumer or Consumer(client_config(secured.bootstrap,
                                                  **{"group.id": "restore-count"}))
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                   for p in meta.partitions)
    finally:
        if own:
            consumer.close()


def deliver(config: dict, topic: str) -> KafkaError | None:
    """Produce one record; the delivery report's error (None: written)."""
    producer, reports = Producer(config), []
    producer.produce(topic, b"value", b"FILUSD", on_delivery=lambda err, msg: reports.append(err))
    producer.flush(30)
    assert len(reports) == 1
    return reports[0]


# --------------------------------------------------------------------------- settings


def test_security_comes_from_the_environment_or_a_properties_file(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    password = tmp_path / "pw"
    password.write_text("s3cret\n")
    env = {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
           "KAFKA_SASL_USERNAME": "strategy", "KAFKA_SASL_PASSWORD_FILE": str(password),
           "KAFKA_SSL_CA_LOCATION": str(ca)}
    assert load_security(env).client_settings() == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "strategy", "sasl.password": "s3cret", "ssl.ca.location": str(ca)}
    props = tmp_path / "client.properties"
    props.write_text(
        "# Java-style, as for kafka-console-producer\n"
        "security.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-512\n"
        "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required \\\n"
        '    username="bars" password="p\\"w";\n'
        f"ssl.truststore.type=PEM\nssl.truststore.location={ca}\n")
    from_file = load_security({"KAFKA_CLIENT_PROPERTIES": str(props)})
    assert (from_file.username, from_file.password, from_file.ca_location) == ("bars", 'p"w',
                                                                                str(ca))
    assert "p\"w" not in repr(from_file.principal) and from_file.principal == "User:bars"
    # the environment wins over the file
    assert load_security({"KAFKA_CLIENT_PROPERTIES": str(props),
                          "KAFKA_SASL_USERNAME": "orderbook"}).username == "orderbook"
    assert load_security({}).client_settings() == {}


@pytest.mark.parametrize("text,env,match", [
    ("security.protocol=SASL_SSL\nssl.keystore.pasword=x\n", {},
     r"client.properties: unknown Kafka client security setting 'ssl.keystore.pasword'"),
    ("bootstrap.servers=elsewhere:9092\n", {},
     r"client.properties: unknown Kafka client security setting 'bootstrap.servers'"),
    ("security.protocol=SASL_TLS\n", {}, r"security.protocol in .*client.properties: unknown "
                                         r"security.protocol 'SASL_TLS'"),
    ("security.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-512\n", {},
     r"SASL_SSL with SCRAM-SHA-512 needs sasl.username"),
    ("ssl.truststore.type=JKS\nssl.truststore.location=/x.jks\n", {}, r"give the CA as a PEM"),
    ("", {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "GSSAPI"},
     r"KAFKA_SASL_MECHANISM: SASL_SSL needs a SASL mechanism, one of PLAIN, SCRAM-SHA-256"),
    ("", {"KAFKA_SASL_PASWORD": "x"}, r"unknown Kafka client security variable "
                                      r"KAFKA_SASL_PASWORD \(known: KAFKA_CLIENT_PROPERTIES"),
])
def test_a_bad_client_configuration_is_one_error_naming_the_setting(tmp_path, text, env, match):
    props = tmp_path / "client.properties"
    props.write_text(text)
    with pytest.raises(PipelineError, match=match):
        load_security({"KAFKA_CLIENT_PROPERTIES": str(props), **env})


def test_each_supervised_program_has_its_role():
    py = "/venv/bin/python"
    launch = [py, "-m", "pipeline.ops.launch"]
    common = ["--topology", "topology.toml", "--namespace", "sim"]
    # every group as the supervisor starts it: the launcher, the group's module first
    assert set(MODULE_ROLES) == set(SHIPPED_GROUPS)  # every other module: a user group
    for module, role in [("consumers.orderbook", "orderbook"), ("consumers.bars", "bars"),
                         ("consumers.strategy", "strategy"), ("consumers.execution", "execution"),
                         ("consumers.portfolio", "portfolio"), ("consumers.archive", "archive")]:
        assert role_for([*launch, module, "--process", "p", *common]) == role, module
    assert role_for([*launch, "consumers.execution", "--process", "execution-b", *common,
                     "--instance", "1"]) == "execution"
    assert role_for([*launch, "consumers.examples.spread_monitor:make_group", "--process",
                     "spread-monitor", *common]) == "groups"
    assert role_for([*launch, "consumers.examples.spread_monitor", "--process", "m"]) == "groups"
    assert role_for([*launch, "consumers.orderbook:make_group", "--process", "b"]) == "orderbook"
    # a group's own entry point (development, docker/compose.yml)
    assert role_for([py, "-m", "consumers.strategy", "--bootstrap", "x"]) == "strategy"
    assert role_for([py, "-m", "consumers.execution"]) == "execution"
    assert role_for([py, "-m", "consumers.archive", "--roll-seconds", "60"]) == "archive"
    assert role_for([py, "-m", "pipeline.cli", "produce", "gemini", "--url", "ws://"]) == "producer"
    assert role_for([py, "-m", "pipeline.cli", "run", "m:f", "--name", "x"]) == "groups"
    assert role_for([py, "-m", "pipeline.cli", "venue", "--port", "1"]) is None
    assert role_for([py, "-m", "pipeline.cli", "replay", "--from", "sim"]) == "admin"


# --------------------------------------------------------------------------- the broker


@pytest.mark.broker
def test_a_strategy_principal_cannot_write_order_events(secured, secured_ns):
    events, requests_topic = secured_ns.topic("orders.events"), secured_ns.topic("orders.requests")
    txn = f"{secured_ns}.strategy.sma.0"  # its own transactional id prefix
    producer = Producer(secured.config("strategy", **{"transactional.id": txn}))
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(events, b"forged fill", b"cid-1")
    with pytest.raises(KafkaException) as refused:
        producer.commit_transaction(30)
    error = refused.value.args[0]
    assert error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, error.str()
    assert error.txn_requires_abort() and "Topic authorization failed" in error.str()
    # ... while its own topic takes a transaction of its own (librdkafka fails the refused
    # producer for good: aborting now is INVALID_TXN_STATE, so a new one)
    producer = Producer(secured.config("strategy", **{"transactional.id": f"{txn}.1"}))
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(requests_topic, b"signed request", b"FILUSD")
    producer.commit_transaction(30)
    # idempotent, without a transaction: the same refusal in the delivery report
    idempotent = secured.config("strategy", **{"enable.idempotence": True})
    assert deliver(idempotent, events).code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    # a transactional id outside its prefix (execution's) is refused too
    borrowed = Producer(secured.config("strategy",
                                       **{"transactional.id": f"{secured_ns}.execution-0"}))
    with pytest.raises(KafkaException) as fenced:
        borrowed.init_transactions(30)
    assert fenced.value.args[0].code() == KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED
    assert records(secured, events) == 0
    assert records(secured, requests_topic) == 2  # the record and its commit marker


@pytest.mark.broker
def test_the_producer_principal_writes_market_data_only(secured, secured_ns):
    producer = secured.config("producer", **{"enable.idempotence": True, "acks": "all"})
    for name in ("raw.frames", "md.l2", "md.trades", "dlq"):
        assert deliver(producer, secured_ns.topic(name)) is None, name
    for name in ("orders.requests", "orders.events", "book.snapshots"):
        assert deliver(producer, secured_ns.topic(name)).code() == \
            KafkaError.TOPIC_AUTHORIZATION_FAILED, name
    assert records(secured, secured_ns.topic("md.l2")) == 1
    assert records(secured, secured_ns.topic("orders.requests")) == 0


@pytest.mark.broker
def test_a_principal_sees_only_the_topics_it_may_use(secured, secured_ns, tmp_path):
    props = tmp_path / "client.properties"
    props.write_text(
        "security.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-512\n"
        "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="strategy" password="{secured.files.password("strategy")}";\n'
        f"ssl.truststore.type=PEM\nssl.truststore.location={secured.files.ca}\n")
    config = client_config(secured.bootstrap,
                           **load_security({"KAFKA_CLIENT_PROPERTIES": str(props)})
                           .client_settings(), **{"group.id": "restore-x"})
    consumer = Consumer(config)
    try:
        seen = {t.partition(".")[2] for t in consumer.list_topics(timeout=10).topics
                if t.startswith(f"{secured_ns}.")}
    finally:
        consumer.close()
    grant_ = GRANTS["strategy"]
    assert seen == {*grant_.reads, *grant_.writes}


@pytest.mark.broker
def test_refused_credentials_end_in_one_line_naming_the_principal(secured, tmp_path):
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")
    env = secured.env(KAFKA_SECURITY_PROTOCOL="SASL_SSL", KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
                      KAFKA_SASL_USERNAME="strategy", KAFKA_SASL_PASSWORD_FILE=str(wrong),
                      KAFKA_SSL_CA_LOCATION=str(secured.files.ca))
    started = time.monotonic()
    result = cli("topics", env=env, timeout=60)
    assert result.returncode == 1
    assert time.monotonic() - started < 8  # refused at once, not retried until a timeout
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert re.match(rf"error: Kafka at {secured.bootstrap} refused the credentials of principal "
                    r"User:strategy \(SCRAM-SHA-512, from the environment\)", lines[0]), lines[0]
    assert "not-the-password" not in lines[0]


@pytest.mark.broker
def test_an_unknown_client_properties_key_ends_in_one_line_naming_it(secured, tmp_path):
    props = tmp_path / "client.properties"
    props.write_text("security.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-512\n"
                     "sasl.usernme=strategy\n")
    result = cli("topics", env=secured.env(KAFKA_CLIENT_PROPERTIES=str(props)), timeout=60)
    assert result.returncode == 1
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {props}: unknown Kafka client security setting "
                               "'sasl.usernme'"), lines[0]


@pytest.mark.broker
def test_the_operators_commands_connect_as_admin(secured):
    shown = cli("broker", "status", env=secured.env(), timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert f"Kafka at {secured.bootstrap} (local broker" in shown.stdout
    assert "metadata.version 4." in shown.stdout


# --------------------------------------------------------------------------- the topology


def secure_topology(tmp_path: Path, shared_data: Path, secured: Secured, ns: str) -> Path:
    """topology.demo.toml, faster (4x, 5 s bars), on free ports, on the secured broker."""
    text = (REPO_ROOT / "topology.demo.toml").read_text()
    state = LocalBroker(secured.run_dir).state()
    for pattern, value in [
            (r'namespace = "sim"', f'namespace = "{ns}"'),
            (r'capture = ".*"',
             f'capture = "{shared_data / "gemini_v2_l2_capture_2021-06-24.txt"}"'),
            (r"speed = 1.0", "speed = 4.0"), (r"heartbeat_s = 1.0", "heartbeat_s = 0.5"),
            (r"\nport = \d+", f"\nport = {free_port()}"),
            (r"kafka_port = \d+", f"kafka_port = {state.port}"),
            (r"controller_port = \d+", f"controller_port = {state.controller_port}"),
            (r"registry_port = \d+", f"registry_port = {free_port()}"),
            (r"metrics_port = \d+", f"metrics_port = {free_port()}\nweb_port = {free_port()}"),
            (r'intervals = "[^"]*"', 'intervals = "1s,5s", lateness_ms = 500')]:
        text, count = re.subn(pattern, value, text)
        assert count == 1, pattern
    path = tmp_path / "topology.secure.toml"
    path.write_text(text)
    return path


def read_everything(secured: Secured, topics: list[str]) -> list[bytes]:
    """Every record's key, value and headers, committed or not (as admin)."""
    consumer = Consumer(client_config(secured.bootstrap, **{
        "group.id": f"restore-{uuid.uuid4()}", "enable.auto.commit": False,
        "isolation.level": "read_uncommitted"}))
    out: list[bytes] = []
    try:
        ends = {}
        for topic in topics:
            meta = consumer.list_topics(topic, timeout=10).topics[topic]
            for p in meta.partitions:
                end = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                if end > 0:
                    ends[(topic, p)] = end
        consumer.assign([TopicPartition(t, p, 0) for t, p in ends])
        deadline = time.monotonic() + 60
        while ends and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.2):
                if msg.error() is None:
                    out += [msg.key() or b"", msg.value() or b""]
                    out += [name.encode() + (value or b"") for name, value in msg.headers() or ()]
            for tp in consumer.position([TopicPartition(t, p) for t, p in ends]):
                if tp.offset >= ends[(tp.topic, tp.partition)]:
                    del ends[(tp.topic, tp.partition)]
        assert not ends, f"could not read {sorted(ends)} to the end"
    finally:
        consumer.close()
    return out


def forms(secret: str) -> set[bytes]:
    """A secret as it could leak: clear, base64 (both alphabets), hex, and for a hex key
    its bytes' base64."""
    raw = secret.encode()
    out = {raw, base64.b64encode(raw), base64.urlsafe_b64encode(raw), raw.hex().encode()}
    if re.fullmatch(r"[0-9a-f]{32,}", secret):
        key = bytes.fromhex(secret)
        out |= {base64.b64encode(key), base64.urlsafe_b64encode(key)}
    return {f.rstrip(b"=") for f in out}


@pytest.mark.broker
def test_the_demo_topology_runs_with_least_privilege_and_no_secret_in_clear(
        secured, shared_data, tmp_path):
    ns = Namespace(f"sim-secup{uuid.uuid4().hex[:6]}")
    path = secure_topology(tmp_path, shared_data, secured, str(ns))
    metrics_port = topology.load(path).infra.metrics_port
    web_port = topology.load(path).infra.web_port
    gemini_key, gemini_secret = f"account-{uuid.uuid4().hex[:12]}", base64.b64encode(
        os.urandom(24)).decode()
    env = secured.env(GEMINI_API_KEY=gemini_key, GEMINI_API_SECRET=gemini_secret)
    started = cli("up", "--topology", str(path), env=env, timeout=300)
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        state = json.loads((secured.run_dir / "supervisor.json").read_text())
        # each child runs as its role's principal, its password only named by file
        expected = {"producer": "producer", "orderbook": "orderbook", "bars": "bars",
                    "strategy": "strategy", "execution": "execution", "portfolio": "portfolio",
                    "archive": "archive", "spread-monitor": "groups", "web": "web"}
        for proc in state["processes"]:
            environ = dict(item.split("=", 1) for item in Path(
                f"/proc/{proc['pid']}/environ").read_text().split("\0") if "=" in item)
            assert not environ.get("KAFKA_SASL_PASSWORD"), proc["name"]
            role = expected.get(proc["name"])
            if role is None:  # the venue: no Kafka at all
                assert not environ.get("KAFKA_SASL_USERNAME"), proc["name"]
                continue
            assert environ["KAFKA_SASL_USERNAME"] == role, proc["name"]
            assert environ["KAFKA_SASL_PASSWORD_FILE"] == str(secured.files.password_file(role))
        counter = Consumer(client_config(secured.bootstrap, **{"group.id": "restore-count"}))
        try:
            for topic, least, what in [(ns.topic("book.snapshots"), 20, "book snapshots"),
                                       (ns.topic("orders.events"), 1, "an order event"),
                                       (ns.topic("bars"), 1, "bars"),
                                       (f"{ns}.monitor.spread", 1, "the plug-in's output")]:
                wait_for(lambda: records(secured, topic, counter) >= least, 90, what, 0.5)  # noqa: B023 - wait_for calls it at once
            assert records(secured, ns.topic("orders.requests"), counter) > 0
            # a killed strategy and execution come back and restore from their own topics
            events = records(secured, ns.topic("orders.events"), counter)
            pids = {p["name"]: p["pid"] for p in state["processes"]}
            for name in ("strategy", "execution"):
                os.kill(pids[name], signal.SIGKILL)

            def restarted():
                now = json.loads((secured.run_dir / "supervisor.json").read_text())
                return all(p["restarts"] == 1 and p["up"] for p in now["processes"]
                           if p["name"] in ("strategy", "execution"))

            wait_for(restarted, 60, "strategy and execution restarted", 0.5)
            wait_for(lambda: records(secured, ns.topic("orders.events"), counter) > events + 2,
                     90, "order events after the restart", 0.5)
            assert records(secured, ns.topic("dlq"), counter) == 0
        finally:
            counter.close()
        status = cli("status", env=env, timeout=60)
        assert status.returncode == 0, status.stderr
        assert f"{ns}.orderbook" in status.stdout
        metrics = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert f'pipeline_group_members{{group="{ns}.orderbook"}} 1' in metrics
        restarts = {p["name"]: p["restarts"] for p in json.loads(
            (secured.run_dir / "supervisor.json").read_text())["processes"]}
        assert restarts == {name: int(name in ("strategy", "execution"))
                            for name in restarts}, restarts  # nothing else died
        # The dashboard reads as its own principal: the books reached its page.
        ws = websocket.create_connection(f"ws://127.0.0.1:{web_port}/ws", timeout=10)
        try:
            ws.send(json.dumps({"subscribe": "symbol", "symbol": "FILUSD"}))
            view = json.loads(ws.recv())
            deadline = time.monotonic() + 30
            while view["data"].get("top") is None and time.monotonic() < deadline:
                view = json.loads(ws.recv())
            assert view["data"]["top"] is not None, view
        finally:
            ws.close()
        for log in (secured.run_dir / "logs").glob("*.log"):  # the grants were enough
            text = log.read_text(errors="replace").lower()
            assert "authorization failed" not in text and "not authorized" not in text, log
        topics = [t.name for t in describe_topics(secured.bootstrap, ns)] + [
            f"{ns}.monitor.spread", "_apicurio-kafkasql-journal"]
        topic_bytes = read_everything(secured, topics)
    finally:
        down = cli("down", env=env, timeout=200)
    assert down.returncode == 0, down.stderr
    assert len(topic_bytes) > 100

    # every secret, in every form, nowhere but in its own files (mode 0600)
    keys = json.loads((secured.run_dir / "secrets" / "strategy-keys.json").read_text())
    secrets = {f"{role} password": secured.files.password(role) for role in ROLES}
    secrets |= {f"strategy key {sid}": key for sid, key in keys.items()}
    secrets |= {"Gemini key": gemini_key, "Gemini secret": gemini_secret}
    places: list[tuple[str, bytes]] = [("pipeline status", status.stdout.encode()),
                                       ("metrics", metrics.encode()),
                                       ("topics", b"\n".join(topic_bytes))]
    secret_files = []
    for file in sorted(secured.run_dir.rglob("*")):
        if not file.is_file():
            continue
        if "secrets" in file.relative_to(secured.run_dir).parts:
            secret_files.append(file)
            assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
            continue
        places.append((str(file), file.read_bytes()))
    assert {f.name for f in secret_files} >= {"strategy-keys.json", "strategy.password",
                                              "kafka-client.properties", "broker.properties"}
    assert len(places) > 50
    own = secured.files.password_file("strategy").read_bytes()  # the grep finds what is there
    assert any(form in own for form in forms(secured.files.password("strategy")))
    leaks = [(what, where) for what, secret in secrets.items() for form in forms(secret)
             for where, data in places if form in data]
    assert not leaks, leaks
