"""The records strategies see are typed after the schemas, and the trading core's schema
changes are BACKWARD compatible with what was released: the registry takes them, `pipeline
schemas check` passes them, and old records still read and verify.

The tests that need Kafka: tests/integration/test_trading_schemas.py."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import fastavro

from pipeline.avro import schemas
from pipeline.core.records import BY_SCHEMA

RELEASED = Path(__file__).resolve().parents[2] / "support" / "schemas_released"


def _nullable(avro_type) -> bool:
    return isinstance(avro_type, list) and "null" in avro_type


def test_every_typed_record_has_exactly_its_schemas_fields_and_optionality():
    for name, typed in BY_SCHEMA.items():
        schema = schemas.load(name)
        fields = {f["name"]: f for f in schema["fields"]}
        hints = typing.get_type_hints(typed)
        assert list(hints) == list(fields), f"{name}: fields or their order differ"
        for field_name, hint in hints.items():
            optional = type(None) in typing.get_args(hint)
            assert optional == _nullable(fields[field_name]["type"]), \
                f"{name}.{field_name}: optional in one, required in the other"


def test_every_released_schema_is_still_a_valid_avro_schema():
    for path in RELEASED.glob("*.avsc"):
        fastavro.parse_schema(json.loads(path.read_text()))


