"""The local broker secured: TLS, SASL/SCRAM users and ACLs, one principal per role.

``pipeline broker start --secure`` runs the local broker of :mod:`pipeline.ops.broker` with:

* a client listener ``SASL_SSL`` (SCRAM-SHA-512) whose certificate a CA of the run
  directory signs (``<run_dir>/kafka/secure/ca.pem`` is what clients trust);
* the controller listener on TLS with client certificates (the broker's own, principal
  ``User:CN=kafka-broker``), so no port of the node accepts an unauthenticated client;
* ``StandardAuthorizer`` with nothing allowed unless an ACL says so; ``admin`` (the broker
  itself between its listeners, topic creation, ACLs, operators' commands) is the only
  super user;
* one SCRAM user per role, created when the storage is formatted
  (``kafka-storage format --add-scram`` with the salted password, so no password is
  ever on a command line), and the role's ACLs (:data:`GRANTS`) made with the Admin API.

Passwords are generated at the first start, 32 random bytes each, in files of mode 0600
under ``<run_dir>/kafka/secure/secrets``; the broker reads its own through Kafka's
``FileConfigProvider``, so ``server.properties`` names them and never holds them. A child
of the supervisor gets its role's principal as environment variables that point to its
password file (:func:`role_environment`), never the password itself.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pipeline.core.errors import PipelineError
from pipeline.kafka.security import (
    SECURITY_ENV,
    KafkaSecurity,
    remember_security,
    security_environment,
    write_java_properties,
    write_secret,
)

MECHANISM = "SCRAM-SHA-512"
SCRAM_ITERATIONS = 8192
ADMIN = "admin"
BROKER_DN = "CN=kafka-broker"
CERT_DAYS = 825
REGISTRY_TOPIC_PREFIX = "_apicurio"  # pipeline/ops/registry_server.py's journal, snapshots, events
REGISTRY_GROUP_PREFIX = "apicurio-"  # Apicurio's KafkaSQL consumer: apicurio-<uuid> per start
RESTORE_GROUP_PREFIX = "restore-"  # pipeline/runtime/runner.py's restore readers


@dataclass(frozen=True)
class Grant:
    """What one role may do in a namespace: topics (catalog names) it reads and writes,
    and the prefix (after ``<namespace>.``) of its consumer groups and transactional ids."""

    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    prefix: str | None = None


# One principal per role, least privilege; topic names are the catalog's (kafka/catalog.py).
GRANTS: dict[str, Grant] = {
    "producer": Grant(writes=("raw.frames", "md.l2", "md.trades", "dlq")),
    "orderbook": Grant(reads=("md.l2", "book.checkpoints"),
                       writes=("book.snapshots", "book.health", "book.checkpoints", "dlq"),
                       prefix="orderbook"),
    "bars": Grant(reads=("md.trades",), writes=("bars", "bars.late", "dlq"), prefix="bars"),
    "strategy": Grant(reads=("md.trades", "bars", "book.snapshots", "orders.events",
                             "strategy.state"),
                      writes=("orders.requests", "strategy.state", "dlq"), prefix="strategy."),
    "execution": Grant(reads=("orders.requests", "book.snapshots", "md.l2", "md.trades",
                              "orders.seen", "orders.events", "paper.state", "strategy.control"),
                       writes=("orders.events", "orders.seen", "paper.state", "dlq"),
                       prefix="execution"),
    "portfolio": Grant(reads=("orders.events", "book.snapshots", "strategy.control",
                              "portfolio.state"),
                       writes=("portfolio.positions", "portfolio.pnl", "portfolio.reconciliation",
                               "portfolio.state", "strategy.control", "dlq"),
                       prefix="portfolio"),
    "archive": Grant(reads=("md.l2", "md.trades", "bars", "raw.frames"), writes=("dlq",),
                     prefix="archive"),
    # The dashboard (`pipeline web`): what its pages show, read_committed, no commits.
    "web": Grant(reads=("md.trades", "book.snapshots", "book.health", "bars", "orders.events",
                        "portfolio.positions", "portfolio.pnl"), prefix="web"),
    # User groups of the topology ([[process]] run = "module:make_group"): the market data
    # and books they read, the [[topic]]s they write (added per topology), their group ids.
    "groups": Grant(reads=("md.l2", "md.trades", "book.snapshots", "book.health", "bars"),
                    writes=("dlq",)),
}
REGISTRY = "registry"
ROLES = (ADMIN, *GRANTS, REGISTRY)
# The shipped groups -> their role (pipeline/ops/supervisor.py runs each through the
# launcher, pipeline/ops/launch.py, whose command line names the group's module).
MODULE_ROLES = {"consumers.orderbook": "orderbook", "consumers.bars": "bars",
                "consumers.strategy": "strategy", "consumers.execution": "execution",
                "consumers.portfolio": "portfolio", "consumers.archive": "archive"}


class SecureFiles:
    """The secured broker's files under ``<run_dir>/kafka/secure``."""

    def __init__(self, kafka_home: Path) -> None:
        self.dir = Path(kafka_home) / "secure"
        self.secrets = self.dir / "secrets"
        self.ca = self.dir / "ca.pem"
        self.broker_pem = self.secrets / "broker.pem"  # encrypted key + certificate chain
        self.broker_secrets = self.secrets / "broker.properties"  # read by FileConfigProvider

    @property
    def exists(self) -> bool:
        return self.broker_secrets.exists()

    def password_file(self, role: str) -> Path:
        return self.secrets / f"{role}.password"

    def password(self, role: str) -> str:
        return self.password_file(role).read_text().strip()

    def security(self, role: str) -> KafkaSecurity:
        """How ``role`` connects (the password read from its file)."""
        return KafkaSecurity("SASL_SSL", MECHANISM, role, self.password(role), str(self.ca),
                             source=str(self.password_file(role)))


def prepare(kafka_home: Path, host: str) -> SecureFiles:
    """Passwords, the CA and the broker's certificate, made once per run directory."""
    files = SecureFiles(kafka_home)
    files.secrets.mkdir(parents=True, exist_ok=True)
    os.chmod(files.secrets, 0o700)
    for role in ROLES:
        if not files.password_file(role).exists():
            write_secret(files.password_file(role), secrets.token_urlsafe(32))
    if not files.exists:
        key_password = secrets.token_urlsafe(32)
        _make_certificates(files, host, key_password)
        write_secret(files.broker_secrets, f"key.password={key_password}\n"
                                            f"admin.password={files.password(ADMIN)}\n")
    return files


def _openssl(*args: str, stdin: str | None = None) -> None:
    result = subprocess.run(["openssl", *args], input=stdin, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise PipelineError(f"openssl {args[0]} failed: {result.stderr.strip()[-300:]}")


def _make_certificates(files: SecureFiles, host: str, key_password: str) -> None:
    """A CA, and the broker's key (encrypted with ``key_password``) and certificate for
    ``host`` and localhost, both verified by name."""
    from shutil import which

    if which("openssl") is None:
        raise PipelineError("'openssl' is not installed; it is needed to make the secured "
                            "broker's certificates (e.g. `apt-get install openssl`)")
    ca_key, key = files.secrets / "ca.key", files.secrets / "broker.key"
    csr, ext = files.dir / "broker.csr", files.dir / "broker.ext"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
             "-out", str(files.ca), "-days", str(CERT_DAYS), "-subj", "/CN=pipeline-local-ca")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", f"/{BROKER_DN}")
    san = f"IP:{host},DNS:localhost" if host[0].isdigit() else f"DNS:{host},DNS:localhost"
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n")
    cert = files.dir / "broker.crt"
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(files.ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(cert), "-days", str(CERT_DAYS), "-extfile", str(ext))
    encrypted = files.secrets / "broker.key.enc"
    # Java 17 reads PBES1 keys only; the password reaches openssl on its stdin.
    _openssl("pkcs8", "-topk8", "-v1", "PBE-SHA1-3DES", "-in", str(key), "-out", str(encrypted),
             "-passout", "stdin", stdin=key_password + "\n")
    for path in (ca_key, key, encrypted):
        os.chmod(path, 0o600)
    write_secret(files.broker_pem, encrypted.read_text() + cert.read_text() + files.ca.read_text())
    key.unlink()
    encrypted.unlink()
    csr.unlink()


def server_properties(files: SecureFiles, host: str, port: int, controller_port: int) -> str:
    """The lines appended to the template's ``server.properties`` (later keys win)."""
    secret = f"{files.broker_secrets}"
    return "\n".join([
        "",
        "# --- secured (pipeline broker start --secure, pipeline/ops/broker_secure.py) ---",
        f"listeners=SASL_SSL://{host}:{port},CONTROLLER://{host}:{controller_port}",
        f"advertised.listeners=SASL_SSL://{host}:{port}",
        "inter.broker.listener.name=SASL_SSL",
        "listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:SSL",
        f"sasl.enabled.mechanisms={MECHANISM}",
        f"sasl.mechanism.inter.broker.protocol={MECHANISM}",
        "config.providers=file",
        "config.providers.file.class=org.apache.kafka.common.config.provider.FileConfigProvider",
        f"listener.name.sasl_ssl.{MECHANISM.lower()}.sasl.jaas.config="
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{ADMIN}" password="${{file:{secret}:admin.password}}";',
        "ssl.keystore.type=PEM",
        f"ssl.keystore.location={files.broker_pem}",
        f"ssl.key.password=${{file:{secret}:key.password}}",
        "ssl.truststore.type=PEM",
        f"ssl.truststore.location={files.ca}",
        "listener.name.controller.ssl.client.auth=required",
        "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found=false",
        f"super.users=User:{ADMIN};User:{BROKER_DN}",
        "",
    ])


def format_arguments(files: SecureFiles) -> list[str]:
    """``kafka-storage format`` options creating every role's SCRAM credential, given as
    salt and salted password (RFC 5802), so the password is on no command line."""
    args = []
    for role in ROLES:
        salt = secrets.token_bytes(16)
        salted = hashlib.pbkdf2_hmac("sha512", files.password(role).encode(), salt,
                                     SCRAM_ITERATIONS)
        args += ["--add-scram",
                 f'{MECHANISM}=[name={role},iterations={SCRAM_ITERATIONS},'
                 f'salt="{base64.b64encode(salt).decode()}",'
                 f'saltedpassword="{base64.b64encode(salted).decode()}"]']
    return args


def is_secure(kafka_home: Path) -> bool:
    return SecureFiles(kafka_home).exists


# --------------------------------------------------------------------------- clients


def remember(kafka_home: Path, bootstrap: str) -> None:
    """Clients of this process that reach ``bootstrap`` without security settings of their
    own (environment, client.properties) connect as ``admin``: the operator who started
    the broker from this run directory. A no-op for an unsecured broker."""
    files = SecureFiles(kafka_home)
    if files.exists:
        remember_security(bootstrap, files.security(ADMIN))


def role_for(cmd: Iterable[str]) -> str | None:
    """The role of a supervised program from its command line; None: it needs no Kafka
    (the local venue)."""
    args = list(cmd)
    if len(args) > 3 and args[1] == "-m" and args[2] == "pipeline.ops.launch":
        return MODULE_ROLES.get(args[3].partition(":")[0], "groups")  # a user group: groups
    if len(args) > 2 and args[1] == "-m" and args[2] in MODULE_ROLES:
        return MODULE_ROLES[args[2]]
    tail = args[3:] if len(args) > 2 and args[1] == "-m" and args[2] == "pipeline.cli" else []
    if tail[:2] == ["produce", "gemini"]:
        return "producer"
    if tail[:1] == ["run"]:
        return "groups"
    if tail[:1] == ["web"]:
        return "web"
    if tail[:1] == ["venue"]:
        return None
    return ADMIN  # an operator's job (the replay publisher)


def role_environment(kafka_home: Path, cmd: Iterable[str]) -> dict[str, str]:
    """The environment a supervised child connects with: its role's principal and the
    name of its password file. Empty for an unsecured broker; for a program with no
    role every security variable is blanked."""
    files = SecureFiles(kafka_home)
    if not files.exists:
        return {}
    role = role_for(cmd)
    env = {var: "" for var in SECURITY_ENV}
    if role is not None:
        security = files.security(role)
        env |= security_environment(security, files.password_file(role))
    return env


# --------------------------------------------------------------------------- ACLs


def acl_bindings(namespace: str, user_groups: Iterable[str] = (),
                 user_topics: Iterable[str] = ()) -> list:
    """Every ACL of the roles in ``namespace`` (and the registry's, namespace-free).

    ``user_groups``: the topology's user-group names (their group and transactional ids
    are ``<namespace>.<name>``); ``user_topics``: the ``[[topic]]`` names they write."""
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    def allow(kind, name, pattern, principal, operation):
        return AclBinding(kind, name, pattern, f"User:{principal}", "*", operation,
                          AclPermissionType.ALLOW)

    topic, group, txn = ResourceType.TOPIC, ResourceType.GROUP, ResourceType.TRANSACTIONAL_ID
    literal, prefixed = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
    out = []
    for role, grant in GRANTS.items():
        writes = (*grant.writes, *user_topics) if role == "groups" else grant.writes
        for name in grant.reads:
            out.append(allow(topic, f"{namespace}.{name}", literal, role, AclOperation.READ))
        for name in writes:
            out.append(allow(topic, f"{namespace}.{name}", literal, role, AclOperation.WRITE))
        prefixes = [f"{namespace}.{g}" for g in user_groups] if role == "groups" else \
            [f"{namespace}.{grant.prefix}"] if grant.prefix else []
        for prefix in prefixes:
            out.append(allow(group, prefix, prefixed, role, AclOperation.READ))
            for operation in (AclOperation.WRITE, AclOperation.DESCRIBE):
                out.append(allow(txn, prefix, prefixed, role, operation))
        if grant.reads:
            out.append(allow(group, RESTORE_GROUP_PREFIX, prefixed, role, AclOperation.READ))
    for operation in (AclOperation.CREATE, AclOperation.READ, AclOperation.WRITE,
                      AclOperation.DESCRIBE, AclOperation.DESCRIBE_CONFIGS):
        out.append(allow(topic, REGISTRY_TOPIC_PREFIX, prefixed, REGISTRY, operation))
    out.append(allow(group, REGISTRY_GROUP_PREFIX, prefixed, REGISTRY, AclOperation.READ))
    return out


def grant(bootstrap: str, namespace: str, user_groups: Iterable[str] = (),
          user_topics: Iterable[str] = (), timeout: float = 30.0) -> int:
    """Create the ACLs of ``namespace`` (idempotent: Kafka keeps one of each); as admin."""
    from pipeline.kafka.clients import make_admin

    bindings = acl_bindings(namespace, user_groups, user_topics)
    admin = make_admin(bootstrap)
    for binding, future in admin.create_acls(bindings, request_timeout=timeout).items():
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001 - one line naming the ACL
            raise PipelineError(f"could not create the ACL {binding}: {exc}") from None
    return len(bindings)


def tool_options(kafka_home: Path, bootstrap: str) -> list[str]:
    """``--command-config FILE`` for Kafka's own Java tools on a secured cluster (this
    process's settings, as admin on the local one); the file is its owner's only."""
    from pipeline.kafka.security import load_security

    security = load_security(bootstrap=bootstrap)
    if security.protocol == "PLAINTEXT":
        return []
    secrets_dir = SecureFiles(kafka_home).secrets
    secrets_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(secrets_dir, 0o700)
    path = write_java_properties(secrets_dir / "tools-client.properties", security)
    return ["--command-config", str(path)]


def grant_topology(kafka_home: Path, bootstrap: str, topology) -> int:
    """The ACLs a topology needs on the run directory's secured broker (0 if unsecured)."""
    if not is_secure(kafka_home):
        return 0
    user_groups = [p.name for p in topology.processes if p.is_user_group]
    user_topics = [raw["name"] for raw in topology.topics]
    return grant(bootstrap, str(topology.namespace), user_groups, user_topics)


def registry_settings(kafka_home: Path) -> KafkaSecurity | None:
    """How the local registry connects to this run directory's secured broker."""
    files = SecureFiles(kafka_home)
    return files.security(REGISTRY) if files.exists else None



DEFAULT_NAMESPACES = ("sim", "live")  # granted at start; a topology's own at `pipeline up`


def grant_defaults(bootstrap: str) -> None:
    for namespace in DEFAULT_NAMESPACES:
        grant(bootstrap, namespace)
