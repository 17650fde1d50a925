"""Avro in the Confluent wire format through a real registry (Apicurio) and real Kafka.

The tests that need Kafka: tests/integration/test_serde.py."""

from __future__ import annotations

import copy
import io
import json
import socket

import pytest
from fastavro import schemaless_reader, schemaless_writer

from pipeline.avro import schemas
from pipeline.avro.registry import RegistryError, SchemaRegistry
from pipeline.avro.serde import HEADER, Decoder, SerdeError
from tests.support.records import SAMPLES


def dead_registry() -> SchemaRegistry:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return SchemaRegistry(f"http://127.0.0.1:{port}", timeout_s=2)


def test_every_schema_documents_every_field_and_has_a_sample():
    assert sorted(SAMPLES) == sorted(schemas.names())
    for name in schemas.names():
        def walk(node, path):
            if isinstance(node, dict) and node.get("type") == "record":
                assert node.get("doc"), path
                for field in node["fields"]:
                    assert field.get("doc"), f"{path}.{field['name']} has no doc"
                    walk(field["type"], f"{path}.{field['name']}")
            elif isinstance(node, dict) and node.get("type") == "array":
                walk(node["items"], path)
            elif isinstance(node, list):
                for branch in node:
                    walk(branch, path)
        walk(schemas.load(name), name)


def test_no_price_or_quantity_is_a_binary_float():
    for name in schemas.names():
        text = json.dumps(schemas.load(name))
        assert '"float"' not in text and '"double"' not in text, name


@pytest.mark.parametrize("data,match", [
    (b'{"type":"trade"}', "starts with 0x7b, expected the magic byte 0x00"),
    (b"\x00\x00\x01", "not the Confluent wire format"),
    (b"", "starts with nothing"),
    (None, "tombstone"),
])
def test_bytes_that_are_not_the_wire_format_are_a_clear_error(data, match):
    with pytest.raises(SerdeError, match=match):
        Decoder(dead_registry())(data)


def test_a_registry_that_is_down_is_a_clear_error():
    with pytest.raises(RegistryError, match="does not answer"):
        Decoder(dead_registry())(HEADER.pack(0, 12345) + b"\x02")


def test_removing_logical_types_keeps_exact_epoch_integers():
    sample = copy.deepcopy(SAMPLES["Bar"])
    buf = io.BytesIO()
    schemaless_writer(buf, schemas.parsed("Bar"), sample)
    buf.seek(0)
    assert schemaless_reader(buf, schemas.parsed("Bar"), None)["start_ms"] == 1444316400000


