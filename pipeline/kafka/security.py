"""Kafka client security: the settings every client of the pipeline merges in, from one place.

They come from the environment or from a ``client.properties`` file
(``KAFKA_CLIENT_PROPERTIES=path``; the environment wins over the file):

==============================  =============================================================
environment                     client.properties (Java or librdkafka spelling)
==============================  =============================================================
KAFKA_SECURITY_PROTOCOL         security.protocol
KAFKA_SASL_MECHANISM            sasl.mechanism (or sasl.mechanisms)
KAFKA_SASL_USERNAME             sasl.username, or username="..." of sasl.jaas.config
KAFKA_SASL_PASSWORD(_FILE)      sasl.password, or password="..." of sasl.jaas.config
KAFKA_SSL_CA_LOCATION           ssl.ca.location, or ssl.truststore.location (a PEM file)
==============================  =============================================================

A key the file does not know, or a value that cannot work (an unknown protocol, SASL
without a principal), is one :class:`PipelineError` line naming the key and the file,
before any connection is tried. Passwords are read when a client is made and never
appear in a message: messages name the principal.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from pipeline.core.errors import PipelineError

PROPERTIES_ENV = "KAFKA_CLIENT_PROPERTIES"
PASSWORD_FILE_ENV = "KAFKA_SASL_PASSWORD_FILE"
ENV_KEYS = {  # environment variable -> the librdkafka key it sets
    "KAFKA_SECURITY_PROTOCOL": "security.protocol",
    "KAFKA_SASL_MECHANISM": "sasl.mechanism",
    "KAFKA_SASL_USERNAME": "sasl.username",
    "KAFKA_SASL_PASSWORD": "sasl.password",
    "KAFKA_SSL_CA_LOCATION": "ssl.ca.location",
}
# Every variable that selects the client's security, e.g. to clear them for a child.
SECURITY_ENV = (PROPERTIES_ENV, PASSWORD_FILE_ENV, *ENV_KEYS)
_SECURITY_PREFIXES = ("KAFKA_SECURITY_", "KAFKA_SASL_", "KAFKA_SSL_")  # a typo is an error
PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
# client.properties keys: Java's spelling -> librdkafka's (None: read here, not passed on).
FILE_KEYS: dict[str, str | None] = {
    "security.protocol": "security.protocol",
    "sasl.mechanism": "sasl.mechanism",
    "sasl.mechanisms": "sasl.mechanism",
    "sasl.username": "sasl.username",
    "sasl.password": "sasl.password",
    "sasl.jaas.config": None,
    "ssl.ca.location": "ssl.ca.location",
    "ssl.truststore.location": "ssl.ca.location",
    "ssl.truststore.type": None,
    "ssl.endpoint.identification.algorithm": "ssl.endpoint.identification.algorithm",
    "ssl.certificate.location": "ssl.certificate.location",
    "ssl.key.location": "ssl.key.location",
    "ssl.key.password": "ssl.key.password",
}
_JAAS_FIELD = re.compile(r'\b(username|password)\s*=\s*"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class KafkaSecurity:
    """The resolved security settings; ``str()`` never shows the password."""

    protocol: str = "PLAINTEXT"
    mechanism: str | None = None
    username: str | None = None
    password: str | None = None
    ca_location: str | None = None
    extra: tuple[tuple[str, str], ...] = ()  # further librdkafka ssl.* settings
    source: str = "the environment"  # where they came from, for messages

    @property
    def uses_sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def uses_tls(self) -> bool:
        return self.protocol.endswith("SSL")

    @property
    def principal(self) -> str:
        """How messages name who connects (never the password)."""
        return f"User:{self.username}" if self.uses_sasl else "User:ANONYMOUS"

    def client_settings(self) -> dict[str, str]:
        """The librdkafka settings these stand for (empty for plain PLAINTEXT)."""
        if self.protocol == "PLAINTEXT" and not self.extra:
            return {}
        config = {"security.protocol": self.protocol, **dict(self.extra)}
        if self.uses_sasl:
            config |= {"sasl.mechanism": self.mechanism or "", "sasl.username": self.username or "",
                       "sasl.password": self.password or ""}
        if self.ca_location:
            config["ssl.ca.location"] = self.ca_location
        return config

    def java_settings(self) -> dict[str, str]:
        """The same for a Java Kafka client (the registry): JAAS and a PEM truststore.
        Holds the password: write it only to a file readable by its owner."""
        config = {"security.protocol": self.protocol}
        if self.uses_sasl:
            module = ("org.apache.kafka.common.security.plain.PlainLoginModule"
                      if self.mechanism == "PLAIN" else
                      "org.apache.kafka.common.security.scram.ScramLoginModule")
            config |= {"sasl.mechanism": self.mechanism or "",
                       "sasl.jaas.config": f'{module} required username="{_jaas(self.username)}" '
                                           f'password="{_jaas(self.password)}";'}
        if self.ca_location:
            config |= {"ssl.truststore.type": "PEM", "ssl.truststore.location": self.ca_location}
        if self.uses_tls:
            config["ssl.endpoint.identification.algorithm"] = dict(self.extra).get(
                "ssl.endpoint.identification.algorithm", "https")
        return config


def _jaas(value: str | None) -> str:
    return (value or "").replace("\\", "\\\\").replace('"', '\\"')


_remembered: dict[str, KafkaSecurity] = {}


def remember_security(bootstrap: str, security: KafkaSecurity) -> None:
    """What clients of ``bootstrap`` use when neither the environment nor a properties
    file says anything: the local secured broker's operator (pipeline/ops/broker_secure.py)."""
    _remembered[bootstrap] = security


def load_security(environ: Mapping[str, str] | None = None,
                  bootstrap: str | None = None) -> KafkaSecurity:
    """The security settings of this process: the properties file, then the environment;
    with neither, what was remembered for ``bootstrap``, else none (PLAINTEXT)."""
    env = os.environ if environ is None else environ
    unknown = sorted(var for var in env if var.startswith(_SECURITY_PREFIXES)
                     and var not in SECURITY_ENV)
    if unknown:
        raise PipelineError(f"unknown Kafka client security variable {unknown[0]} (known: "
                            f"{', '.join(SECURITY_ENV)})")
    values: dict[str, str] = {}
    origin: dict[str, str] = {}
    path = env.get(PROPERTIES_ENV)
    if path:
        for key, value in read_properties(Path(path)).items():
            values[key], origin[key] = value, f"{key} in {path}"
    for var, key in ENV_KEYS.items():
        if env.get(var):
            values[key], origin[key] = env[var], var
    if env.get(PASSWORD_FILE_ENV):
        values["sasl.password"] = _read_password(Path(env[PASSWORD_FILE_ENV]))
        origin["sasl.password"] = PASSWORD_FILE_ENV
    if not values:
        return _remembered.get(bootstrap or "", KafkaSecurity())
    source = path if path and not any(v in env for v in (*ENV_KEYS, PASSWORD_FILE_ENV)) \
        else "the environment" if not path else f"{path} and the environment"
    return _validated(values, origin, source)


def read_properties(path: Path) -> dict[str, str]:
    """The security keys of a Java-style ``client.properties`` file, in librdkafka's
    spelling; any other key is an error naming it."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise PipelineError(f"{PROPERTIES_ENV}={path}: cannot read it ({exc.strerror})") from None
    out: dict[str, str] = {}
    jaas = truststore_type = None
    for line in _logical_lines(text):
        if not line or line[0] in "#!":
            continue
        key, value = _split_property(line)
        if key not in FILE_KEYS:
            raise PipelineError(
                f"{path}: unknown Kafka client security setting {key!r} (known: "
                f"{', '.join(sorted(FILE_KEYS))})")
        if key == "sasl.jaas.config":
            jaas = value
        elif key == "ssl.truststore.type":
            truststore_type = value.upper()
        else:
            out[FILE_KEYS[key]] = value  # type: ignore[index]
    if truststore_type not in (None, "PEM"):
        raise PipelineError(f"{path}: ssl.truststore.type {truststore_type} cannot be read by "
                            "the pipeline's Kafka client: give the CA as a PEM file "
                            "(ssl.truststore.type=PEM or ssl.ca.location)")
    if jaas is not None:
        found = dict(_JAAS_FIELD.findall(jaas))
        if "username" not in found or "password" not in found:
            raise PipelineError(f"{path}: sasl.jaas.config needs username=\"...\" and "
                                "password=\"...\" (a PlainLoginModule or ScramLoginModule)")
        out.setdefault("sasl.username", re.sub(r"\\(.)", r"\1", found["username"]))
        out.setdefault("sasl.password", re.sub(r"\\(.)", r"\1", found["password"]))
    return out


def _logical_lines(text: str) -> list[str]:
    """Java properties lines: a trailing backslash continues the line."""
    lines, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending += line[:-1]
            continue
        lines.append(pending + line)
        pending = ""
    if pending:
        lines.append(pending)
    return lines


def _split_property(line: str) -> tuple[str, str]:
    match = re.match(r"([^=:\s]+)\s*[=:\s]\s*(.*)$", line)
    if not match:
        return line, ""
    return match.group(1), match.group(2).strip()


def _read_password(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise PipelineError(f"{PASSWORD_FILE_ENV}={path}: cannot read it "
                            f"({exc.strerror})") from None


def _validated(values: dict[str, str], origin: dict[str, str], source: str) -> KafkaSecurity:
    protocol = values.get("security.protocol", "PLAINTEXT").upper()
    if protocol not in PROTOCOLS:
        raise PipelineError(f"{origin['security.protocol']}: unknown security.protocol "
                            f"{values['security.protocol']!r} (use {', '.join(PROTOCOLS)})")
    mechanism = values.get("sasl.mechanism")
    if protocol.startswith("SASL_"):
        mechanism = (mechanism or "").upper()
        if mechanism not in MECHANISMS:
            where = origin.get("sasl.mechanism", "KAFKA_SASL_MECHANISM")
            raise PipelineError(f"{where}: {protocol} needs a SASL mechanism, one of "
                                f"{', '.join(MECHANISMS)} (got {values.get('sasl.mechanism')!r})")
        for key, var in (("sasl.username", "KAFKA_SASL_USERNAME"),
                         ("sasl.password", "KAFKA_SASL_PASSWORD or KAFKA_SASL_PASSWORD_FILE")):
            if not values.get(key):
                raise PipelineError(f"{protocol} with {mechanism} needs {key} (set {var}, or "
                                    f"{key} in {PROPERTIES_ENV})")
    ca = values.get("ssl.ca.location")
    if ca and not Path(ca).is_file():
        raise PipelineError(f"{origin['ssl.ca.location']}: the CA file {ca} does not exist")
    extra = tuple(sorted((k, v) for k, v in values.items() if k.startswith("ssl.")
                         and k != "ssl.ca.location"))
    return KafkaSecurity(protocol, mechanism, values.get("sasl.username"),
                         values.get("sasl.password"), ca, extra, source)


def write_secret(path: Path, text: str) -> None:
    """Write a file only its owner can read (mode 0600, also when it existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(path, 0o600)


def write_java_properties(path: Path, security: KafkaSecurity, prefix: str = "",
                          quarkus: bool = False) -> Path:
    """A Java client's settings (:meth:`KafkaSecurity.java_settings`) as a properties file
    of mode 0600, each key behind ``prefix``; ``quarkus``: ``$`` escaped from Quarkus's
    own ``${...}`` expressions."""
    lines = []
    for key, value in security.java_settings().items():
        value = value.replace("\\", "\\\\")
        if quarkus:
            value = value.replace("$", "\\\\$")
        lines.append(f"{prefix}{key}={value}\n")
    write_secret(path, "".join(lines))
    return path


def security_environment(security: KafkaSecurity, password_file: Path | None) -> dict[str, str]:
    """The environment that makes a child process use ``security``: the password only by
    the name of its file, never its value."""
    env = {"KAFKA_SECURITY_PROTOCOL": security.protocol}
    if security.uses_sasl:
        env |= {"KAFKA_SASL_MECHANISM": security.mechanism or "",
                "KAFKA_SASL_USERNAME": security.username or ""}
        if password_file is not None:
            env[PASSWORD_FILE_ENV] = str(password_file)
    if security.ca_location:
        env["KAFKA_SSL_CA_LOCATION"] = security.ca_location
    return env


AUTH_FAILURE_CODES = ("_AUTHENTICATION", "SASL_AUTHENTICATION_FAILED")


def refused_message(bootstrap: str, security: KafkaSecurity, detail: str) -> str:
    """The one line for credentials the broker refused: who, where, what to check."""
    return (f"Kafka at {bootstrap} refused the credentials of principal {security.principal} "
            f"({security.mechanism or security.protocol}, from {security.source}): check its "
            f"password ({detail})")
