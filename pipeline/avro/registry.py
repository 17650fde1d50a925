"""The schema registry as the pipeline uses it, over the Confluent Schema Registry REST API.

A thin layer on confluent-kafka's ``SchemaRegistryClient`` that caches parsed schemas
by id and turns HTTP failures into errors that say what to do. Any registry speaking
that API works: Confluent's, Redpanda's, Apicurio's ccompat API, or the local one.
"""

from __future__ import annotations

import json
from typing import Any

import fastavro
import requests
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from pipeline.core.errors import IncompatibleSchema, RegistryError, UnknownSchemaId

COMPATIBILITY_LEVELS = ("BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE",
                        "FULL", "FULL_TRANSITIVE", "NONE")


def parse_plain(schema: dict) -> Any:
    """fastavro-parse ``schema`` with logical types stripped: timestamps stay epoch integers
    (exact, and no datetime built per record). The registered JSON keeps them."""
    return fastavro.parse_schema(_strip_logical(schema))


def _strip_logical(node: Any) -> Any:
    if isinstance(node, list):
        return [_strip_logical(branch) for branch in node]
    if not isinstance(node, dict):
        return node
    stripped = {k: _strip_logical(v) for k, v in node.items() if k != "logicalType"}
    if set(stripped) == {"type"} and isinstance(stripped["type"], str):
        return stripped["type"]
    return stripped


def subject_for(topic: str) -> str:
    """Confluent's TopicNameStrategy: the value schema of ``topic``."""
    return f"{topic}-value"


class SchemaRegistry:
    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.client = SchemaRegistryClient({"url": self.url, "timeout": int(timeout_s)})
        self._by_id: dict[int, tuple[dict, Any]] = {}

    # -- reads

    def schema(self, schema_id: int) -> tuple[dict, Any]:
        """(schema JSON, fastavro-parsed schema) for ``schema_id``; cached forever (ids are
        immutable)."""
        cached = self._by_id.get(schema_id)
        if cached is not None:
            return cached
        registered = self._call(lambda: self.client.get_schema(schema_id), f"schema id {schema_id}")
        raw = json.loads(registered.schema_str)
        entry = (raw, parse_plain(raw))
        self._by_id[schema_id] = entry
        return entry

    def latest(self, subject: str) -> tuple[int, int, dict] | None:
        """(version, id, schema JSON) of the subject's newest version, or None."""
        try:
            found = self.client.get_latest_version(subject)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                return None
            raise self._error(exc, f"subject {subject}") from None
        except Exception as exc:  # noqa: BLE001 - transport errors
            raise self._down(exc) from None
        return found.version, found.schema_id, json.loads(found.schema.schema_str)

    def subjects(self) -> list[str]:
        return self._call(self.client.get_subjects, "subjects")

    def versions(self, subject: str) -> list[int]:
        return self._call(lambda: self.client.get_versions(subject), f"subject {subject}")

    def compatibility(self, subject: str | None = None) -> str:
        return self._call(lambda: self.client.get_compatibility(subject), "compatibility")

    # -- writes

    def register(self, subject: str, schema: dict) -> int:
        """Register ``schema`` under ``subject`` (idempotent) and return its id."""
        text = json.dumps(schema, separators=(",", ":"))
        schema_id = self._call(lambda: self.client.register_schema(subject, Schema(text, "AVRO")),
                               f"subject {subject}")
        self._by_id.setdefault(schema_id, (schema, parse_plain(schema)))
        return schema_id

    def delete_subject(self, subject: str) -> bool:
        """Delete ``subject`` and all its versions for good (soft, then permanent, as the
        Confluent API asks); False if there was no such subject."""
        if self.latest(subject) is None:
            return False
        self._call(lambda: self.client.delete_subject(subject), f"subject {subject}")
        try:
            self.client.delete_subject(subject, permanent=True)
        except SchemaRegistryError as exc:
            if exc.http_status_code != 404:  # some registries delete at once
                raise self._error(exc, f"subject {subject}") from None
        except Exception as exc:  # noqa: BLE001 - transport errors
            raise self._down(exc) from None
        return True

    def set_compatibility(self, level: str, subject: str | None = None) -> None:
        if level not in COMPATIBILITY_LEVELS:
            raise RegistryError(f"unknown compatibility level {level!r}: one of "
                                f"{', '.join(COMPATIBILITY_LEVELS)}")
        self._call(lambda: self.client.set_compatibility(subject, level), "compatibility")

    def compatibility_messages(self, subject: str, schema: dict) -> list[str] | None:
        """The registry's own verdict on ``schema`` against the subject's latest version:
        None if compatible, else its messages (empty when it gives none)."""
        body = {"schema": json.dumps(schema), "schemaType": "AVRO"}
        url = f"{self.url}/compatibility/subjects/{subject}/versions/latest?verbose=true"
        try:
            response = requests.post(url, json=body, timeout=self.timeout_s, headers={
                "Content-Type": "application/vnd.schemaregistry.v1+json"})
        except requests.RequestException as exc:
            raise self._down(exc) from None
        if response.status_code == 404:
            return None  # no version yet: anything is compatible
        if response.status_code >= 400:
            raise RegistryError(f"registry at {self.url} answered {response.status_code} to a "
                                f"compatibility check of {subject}: {response.text[:300]}")
        verdict = response.json()
        if verdict.get("is_compatible", False):
            return None
        return [str(m) for m in verdict.get("messages") or []]

    # -- errors

    def _call(self, fn, what: str):
        try:
            return fn()
        except SchemaRegistryError as exc:
            raise self._error(exc, what) from None
        except Exception as exc:  # noqa: BLE001 - transport errors
            raise self._down(exc) from None

    def _error(self, exc: SchemaRegistryError, what: str) -> RegistryError:
        if exc.http_status_code == 409:
            return IncompatibleSchema(f"the registry at {self.url} refused {what}: "
                                      f"{exc.error_message}")
        if exc.http_status_code == 404 and what.startswith("schema id"):
            return UnknownSchemaId(f"{what} is not in the registry at {self.url}")
        return RegistryError(f"the registry at {self.url} refused {what} "
                             f"(HTTP {exc.http_status_code}, code {exc.error_code}): "
                             f"{exc.error_message}")

    def _down(self, exc: Exception) -> RegistryError:
        return RegistryError(f"the schema registry at {self.url} does not answer "
                             f"({type(exc).__name__}: {str(exc)[:200]}): start it with `make up` "
                             "or fix SCHEMA_REGISTRY_URL")
