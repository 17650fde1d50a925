"""Avro in C (pipeline.avro.codec + the extension pipeline.avro._avro): it reads what fastavro reads
and writes the very bytes fastavro writes, refuses bad bytes and bad values clearly, and
serde falls back to fastavro where it must."""

from __future__ import annotations

import io
import random
import re

import pytest
from fastavro import parse_schema, schemaless_writer

from pipeline.avro import codec, schemas
from pipeline.avro.codec import compile_reader, compile_writer, program
from pipeline.avro.registry import _strip_logical, parse_plain
from pipeline.avro.serde import Decoder, Encoder, SerdeError
from tests.support.records import SAMPLES

pytestmark = pytest.mark.skipif(codec._decode is None,
                                reason="pipeline.avro._avro is not built (no C compiler)")

EVERYTHING = {
    "type": "record", "name": "Everything", "namespace": "test.fd",
    "fields": [
        {"name": "n", "type": "null"},
        {"name": "yes", "type": "boolean"},
        {"name": "i", "type": "int"},
        {"name": "l", "type": "long"},
        {"name": "f", "type": "float"},
        {"name": "d", "type": "double"},
        {"name": "b", "type": "bytes"},
        {"name": "s", "type": "string"},
        {"name": "u", "type": ["null", "string", "long"]},
        {"name": "color", "type": {"type": "enum", "name": "Color",
                                    "symbols": ["RED", "GREEN", "BLUE"]}},
        {"name": "again", "type": "Color"},
        {"name": "qualified", "type": "test.fd.Color"},
        {"name": "h", "type": {"type": "fixed", "name": "Hash", "size": 4}},
        {"name": "items", "type": {"type": "array", "items": {
            "type": "record", "name": "Item", "fields": [
                {"name": "price", "type": "string"},
                {"name": "when", "type": {"type": "long", "logicalType": "timestamp-micros"}}]}}},
        {"name": "more", "type": {"type": "array", "items": "Item"}},
        {"name": "tags", "type": {"type": "map", "values": ["null", "double"]}},
        {"name": "nested", "type": {"type": "array", "items": {"type": "array",
                                                               "items": "int"}}},
    ],
}


def everything(rng: random.Random) -> dict:
    def item():
        return {"price": f"{rng.random() * 1e5:.8f}", "when": rng.randrange(-2**63, 2**63)}

    return {"n": None, "yes": rng.random() < 0.5, "i": rng.randrange(-2**31, 2**31),
            "l": rng.choice([0, -1, 1, 63, -64, 64, 2**63 - 1, -2**63,
                             rng.randrange(-2**63, 2**63)]),
            "f": 1.5, "d": rng.uniform(-1e300, 1e300), "b": rng.randbytes(rng.randrange(40)),
            "s": rng.choice(["", "BTCUSD", "ünïcødé ✓", "x" * 300]),
            "u": rng.choice([None, "text", rng.randrange(-10**12, 10**12)]),
            "color": rng.choice(["RED", "GREEN", "BLUE"]), "again": "BLUE",
            "qualified": "GREEN", "h": rng.randbytes(4),
            "items": [item() for _ in range(rng.randrange(5))],
            "more": [item() for _ in range(rng.randrange(200))],
            "tags": {f"k{j}": rng.choice([None, rng.random()]) for j in range(rng.randrange(4))},
            "nested": [[rng.randrange(-99, 99) for _ in range(rng.randrange(3))]
                       for _ in range(rng.randrange(3))]}


def encode(schema: dict, record: dict) -> bytes:
    out = io.BytesIO()
    schemaless_writer(out, parse_schema(_strip_logical(schema)), record)
    return out.getvalue()


def test_every_type_reads_back_as_written_and_as_fastavro_reads_it():
    rng = random.Random(7)
    read = compile_reader(EVERYTHING)
    for _ in range(300):
        record = everything(rng)
        data = b"\x00\x00\x00\x00\x07" + encode(EVERYTHING, record)
        value, end = read(data, 5)
        assert end == len(data)
        assert value == record
        assert list(value) == [f["name"] for f in EVERYTHING["fields"]]  # field order kept


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_catalog_record_reads_back_exactly(name):
    schema = schemas.load(name)
    data = encode(schema, SAMPLES[name])
    assert compile_reader(schema)(data, 0) == (SAMPLES[name], len(data))


def test_arrays_written_in_blocks_with_byte_sizes_are_read_too():
    schema = {"type": "array", "items": "long"}
    # two blocks: count -2 with its byte size, then 1 item, then the end
    data = bytes([3, 2, 2, 4]) + bytes([2, 6]) + bytes([0])
    assert compile_reader(schema)(data, 0) == ([1, 2, 3], len(data))


@pytest.mark.parametrize("data, match", [
    (b"", "truncated"),
    (b"\x0c\x41\x42", "truncated"),                     # a 6-byte string, 2 bytes there
    (b"\x01", "negative length"),
    (b"\xff" * 11, "longer than 10 bytes"),
    (b"\x04\xff\xfe", "utf-8"),                        # not UTF-8
], ids=["empty", "short-string", "negative", "endless-varint", "bad-utf8"])
def test_bad_bytes_raise_and_never_read_past_the_end(data, match):
    with pytest.raises(ValueError, match=match):
        compile_reader("string")(data, 0)


def test_out_of_range_union_branches_and_enum_symbols_are_errors():
    with pytest.raises(ValueError, match="union branch 2 out of range"):
        compile_reader(["null", "string"])(b"\x04", 0)
    with pytest.raises(ValueError, match="enum index 3 out of range"):
        compile_reader({"type": "enum", "name": "E", "symbols": ["A", "B"]})(b"\x06", 0)


def test_a_recursive_schema_is_left_to_fastavro():
    linked = {"type": "record", "name": "Node", "fields": [
        {"name": "value", "type": "long"}, {"name": "next", "type": ["null", "Node"]}]}
    with pytest.raises(codec.Unsupported, match="recursive"):
        program(linked)


class OneSchema:
    """A registry stand-in that knows one schema id: the decoder's own input, not a test
    of HTTP (the registry path is tested against Apicurio in test_serde.py)."""

    def __init__(self, schema: dict) -> None:
        self._schema = schema

    def schema(self, schema_id: int):
        return self._schema, parse_plain(self._schema)


@pytest.mark.parametrize("built", [True, False], ids=["c-extension", "without-extension"])
def test_the_decoder_gives_the_same_records_with_or_without_the_extension(monkeypatch, built):
    if not built:
        monkeypatch.setattr(codec, "_decode", None)
    schema = schemas.load("L2Update")
    decoder = Decoder(OneSchema(schema), readers=[schema])
    data = b"\x00\x00\x00\x00\x2a" + encode(schema, SAMPLES["L2Update"])
    assert decoder(data) == SAMPLES["L2Update"]
    assert (decoder.reader(data[1:5]) is None) is (not built)
    with pytest.raises(SerdeError, match="trailing byte|corrupt"):
        decoder(data + b"\x00")
    with pytest.raises(SerdeError):
        decoder(data[:-3])


def test_mutated_and_cut_bytes_fail_cleanly():
    """Random damage either decodes to something or raises ValueError: never a crash,
    never a read past the end."""
    rng = random.Random(11)
    read = compile_reader(EVERYTHING)
    good = [encode(EVERYTHING, everything(rng)) for _ in range(20)]
    for _ in range(3000):
        data = bytearray(rng.choice(good))
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = bytes(data[:rng.randrange(len(data) + 1)])
        try:
            _, end = read(data, 0)
        except ValueError:  # UnicodeDecodeError is one
            continue
        assert end <= len(data)


# --------------------------------------------------------------------------- writing


def test_every_type_is_written_byte_for_byte_as_fastavro_writes_it():
    rng = random.Random(3)
    write = compile_writer(EVERYTHING)
    for _ in range(300):
        record = everything(rng)
        assert write(record, b"\x00\x00\x00\x00\x07") == \
            b"\x00\x00\x00\x00\x07" + encode(EVERYTHING, record)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_catalog_record_is_written_as_fastavro_writes_it(name):
    schema = schemas.load(name)
    assert compile_writer(schema)(SAMPLES[name], b"") == encode(schema, SAMPLES[name])


def test_a_missing_optional_field_is_written_with_its_default():
    record = dict(SAMPLES["L2Update"])
    del record["event_id"]
    write = compile_writer(schemas.load("L2Update"))
    assert write(record, b"") == write(SAMPLES["L2Update"], b"")


@pytest.mark.parametrize("change, message", [
    ({"changes": [{"side": "BID", "price": 1.5, "quantity": "1"}]},
     "changes.0.price: expected a str, got float 1.5"),
    ({"sequence": "7"}, "sequence: expected an int, got str '7'"),
    ({"symbol": None}, "symbol: expected a str, got NoneType None"),
    ({"sequence": 2**64}, "sequence: 18446744073709551616 does not fit in a 64-bit long"),
    ({"changes": "BID 1 1"}, "changes: expected a list"),
], ids=["nested-float", "text-for-int", "none", "too-big", "not-a-list"])
def test_values_that_do_not_fit_name_the_field(change, message):
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        compile_writer(schemas.load("L2Update"))({**SAMPLES["L2Update"], **change}, b"")


def test_ints_out_of_32_bits_and_unknown_enum_symbols_are_refused():
    with pytest.raises(ValueError, match="32-bit int"):
        compile_writer("int")(2**31, b"")
    with pytest.raises(ValueError, match="not one of the enum's symbols"):
        compile_writer(EVERYTHING)({**everything(random.Random(1)), "color": "PINK"}, b"")


def test_overlapping_unions_are_left_to_fastavro():
    with pytest.raises(codec.Unsupported, match="overlap"):
        compile_writer(["null", "long", "double"])


class Registering(OneSchema):
    def register(self, subject: str, schema: dict) -> int:
        return 42


@pytest.mark.parametrize("built", [True, False], ids=["c-extension", "without-extension"])
def test_the_encoder_writes_the_same_bytes_with_or_without_the_extension(monkeypatch, built):
    if not built:
        monkeypatch.setattr(codec, "_encode", None)
    schema = schemas.load("L2Update")
    encoder = Encoder(Registering(schema), "sim.md.l2")
    assert (encoder._write is None) is (not built)
    data = encoder(SAMPLES["L2Update"])
    assert data == b"\x00\x00\x00\x00\x2a" + encode(schema, SAMPLES["L2Update"])
    with pytest.raises(SerdeError, match="cannot encode a gemini.pipeline.L2Update for sim.md.l2"):
        encoder({**SAMPLES["L2Update"], "sequence": "seven"})
