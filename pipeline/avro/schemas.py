"""The ``.avsc`` files in ``schemas/`` and which topic uses which; register and check them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import to_parsing_canonical_form

from pipeline.avro import compat as avro_compat
from pipeline.avro.registry import SchemaRegistry, parse_plain, subject_for
from pipeline.core.errors import PipelineError
from pipeline.kafka import catalog
from pipeline.ops.settings import REPO_ROOT

SCHEMA_DIR = REPO_ROOT / "schemas"
DEFAULT_COMPATIBILITY = "BACKWARD"


def names() -> list[str]:
    return sorted(p.stem for p in SCHEMA_DIR.glob("*.avsc"))


@lru_cache(maxsize=None)
def _load_text(name: str, directory: Path = SCHEMA_DIR) -> str:
    path = directory / f"{name}.avsc"
    if not path.exists():
        raise PipelineError(f"no schema {name!r}: {path} does not exist "
                            f"(have {', '.join(names())})")
    return path.read_text()


def load(name: str, directory: Path = SCHEMA_DIR) -> dict:
    """The schema JSON of record type ``name`` (a fresh copy: callers may modify it)."""
    return json.loads(_load_text(name, directory))


@lru_cache(maxsize=None)
def parsed(name: str) -> Any:
    """The schema as the serde uses it (see ``registry.parse_plain``)."""
    return parse_plain(load(name))


def full_name_of(schema: dict) -> str:
    name = schema.get("name", "")
    return name if "." in name or not schema.get("namespace") else f"{schema['namespace']}.{name}"


def full_name(name: str) -> str:
    return full_name_of(load(name))


def same_schema(a: dict, b: dict) -> bool:
    """Equal in Avro's Parsing Canonical Form (docs and defaults do not matter to the wire)."""
    return (to_parsing_canonical_form(fastavro.parse_schema(a, _write_hint=False)) ==
            to_parsing_canonical_form(fastavro.parse_schema(b, _write_hint=False)))


def schema_for_topic(topic: str) -> str:
    """The record type a catalog topic holds, from its full name."""
    parsed_topic = catalog.split_topic(topic)
    if parsed_topic is None:
        raise PipelineError(f"{topic!r} is not a catalog topic (<namespace>.<name>)")
    record = parsed_topic[1].value_schema
    if record is None:
        raise PipelineError(f"{topic} holds raw bytes, not Avro records")
    return record


def avro_topics(namespace: catalog.Namespace) -> list[tuple[str, str]]:
    """(full topic name, record type) for every Avro topic of the namespace."""
    return [(namespace.topic(t.name), t.value_schema) for t in catalog.TOPICS if t.value_schema]


# --------------------------------------------------------------------------- registry work


@dataclass(frozen=True)
class Registered:
    subject: str
    record: str
    schema_id: int
    version: int


def register_namespace(registry: SchemaRegistry, namespace: catalog.Namespace,
                       level: str = DEFAULT_COMPATIBILITY,
                       directory: Path = SCHEMA_DIR) -> list[Registered]:
    """Register every topic's schema under ``<topic>-value`` with ``level`` enforced.

    The level is set on the subject before its first version, so the registry itself
    refuses an incompatible version later, whoever registers it.
    """
    done = []
    for topic, record in avro_topics(namespace):
        subject = subject_for(topic)
        if registry.latest(subject) is None:
            registry.set_compatibility(level, subject)
        schema_id = registry.register(subject, load(record, directory))
        version, _, _ = registry.latest(subject)  # type: ignore[misc]
        done.append(Registered(subject, record, schema_id, version))
    return done


@dataclass(frozen=True)
class CheckResult:
    subject: str
    record: str
    status: str  # "new", "same", "compatible", "incompatible"
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def check_namespace(registry: SchemaRegistry, namespace: catalog.Namespace,
                    directory: Path = SCHEMA_DIR) -> list[CheckResult]:
    """Would registering the repo's schemas succeed? Asks the registry for its verdict and
    explains it field by field with the Avro resolution rules; also warns when readers
    still on the old version could not read the new data."""
    results = []
    for topic, record in avro_topics(namespace):
        subject = subject_for(topic)
        new = load(record, directory)
        latest = registry.latest(subject)
        if latest is None:
            results.append(CheckResult(subject, record, "new"))
            continue
        _, _, old = latest
        if same_schema(new, old):
            results.append(CheckResult(subject, record, "same"))
            continue
        level = registry.compatibility(subject)
        verdict = registry.compatibility_messages(subject, new)
        ours = avro_compat.problems(new, old, level)
        warnings = tuple(p for p in avro_compat.forward_problems(new, old) if p not in ours)
        if verdict is None and not ours:
            results.append(CheckResult(subject, record, "compatible", warnings=warnings))
        else:
            explained = tuple(ours) or tuple(verdict or ()) or ("the registry refuses it",)
            results.append(CheckResult(subject, record, "incompatible", explained, warnings))
    return results
