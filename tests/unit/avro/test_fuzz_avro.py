"""The C Avro codec fuzzed: the quick run of ``fuzz/avro_asan.py`` (20,000 mutated records
and 5,000 mutated values per schema, the normal build, no sanitizer) so the driver never
rots, and the regression tests of what its ASan/UBSan run found. The million-record run
under AddressSanitizer is ``make fuzz``. No broker is needed."""

from __future__ import annotations

import io

import pytest

from fuzz import avro_asan
from pipeline.avro import codec, schemas
from pipeline.avro._avro import decode, encode

SEED = 20261202


def test_quick_fuzz_of_every_schema_ends_in_values_or_documented_errors():
    """Every mutated record decodes (and round-trips) or raises ValueError, every mutated
    value encodes or raises TypeError/ValueError/OverflowError; both outcomes occur for
    every schema, so the mutations reach past the first byte."""
    out = io.StringIO()
    names = schemas.names()
    results = avro_asan.run(names, 20_000, 5_000, SEED, exact_buffers=False, out=out)
    assert list(results) == names and len(names) == 17
    for name, (decoded, encoded, _) in results.items():
        assert sum(decoded.values()) == 20_000 and sum(encoded.values()) == 5_000
        assert decoded["decoded"] > 500 and decoded["ValueError"] > 1000, (name, decoded)
        assert set(decoded) <= {"decoded", "decoded, trailing bytes", "ValueError",
                                "UnicodeDecodeError"}, decoded
        assert encoded["encoded"] > 500 and encoded["TypeError"] > 500, (name, encoded)
    assert out.getvalue().count("\n") == 18  # the header and a row per schema


def test_mutations_are_seeded():
    """The same seed, the same mutations: a failure's seed reruns it."""
    first = avro_asan.run(["Trade"], 2_000, 500, 7, exact_buffers=False, out=io.StringIO())
    again = avro_asan.run(["Trade"], 2_000, 500, 7, exact_buffers=False, out=io.StringIO())
    assert first["Trade"][:2] == again["Trade"][:2]


# Regression tests, each named after the input that found it.

BOOK_CHECKPOINT = codec.program(schemas.load("BookCheckpoint"))


def _int_field_program() -> tuple:
    """A record of one Avro ``int``, as codec.program compiles it."""
    return codec.program({"type": "record", "name": "One", "fields": [
        {"name": "source_partition", "type": "int"}]})


def test_an_int_field_holding_8848425966_is_a_decode_error():
    """``source_partition`` (an Avro int) as the varint of 8848425966: decoded to that
    Python int, which encode() then refused ("does not fit in a 32-bit int"): a consumer
    could read a record it could not write again. Now: ValueError, like other bad bytes."""
    prog = _int_field_program()
    data = avro_asan.zigzag_varint(8_848_425_966)
    with pytest.raises(ValueError, match="32-bit"):
        decode(prog, data, 0)
    for edge in (2**31 - 1, -2**31):  # the range itself still reads
        assert decode(prog, avro_asan.zigzag_varint(edge), 0)[0] == {"source_partition": edge}


def test_an_array_block_count_of_minus_2_to_the_63_is_a_decode_error():
    """An array block count of -2**63 (varint ``ff..ff 01``): ``-count`` overflowed, which
    UBSan reports as undefined behaviour (the normal build went on reading garbage)."""
    prog = codec.program({"type": "array", "items": "long"})
    with pytest.raises(ValueError, match="block count"):
        decode(prog, b"\xff" * 9 + b"\x01" + b"\x02\x00", 0)
    assert decode(prog, b"\x03\x02\x02\x04\x00", 0) == ([1, 2], 5)  # a sized block: -2, 2 bytes


def test_encoding_a_lone_surrogate_is_a_value_error_naming_the_field():
    """``{"symbol": "\\ud800"}``: UTF-8 encoding failed with UnicodeEncodeError, and naming
    the field re-raised it with one argument, which a UnicodeEncodeError cannot take:
    the caller got "TypeError: function takes exactly 5 arguments (1 given)"."""
    prog = codec.program(schemas.load("Trade"))
    with pytest.raises(ValueError, match=r"^symbol: 'utf-8' codec can't encode"):
        encode(prog, {"symbol": "\ud800"}, b"")


def test_an_empty_prefix_and_an_empty_value_encode():
    """``encode(program, value, b"")``: the empty prefix was copied with memcpy into a
    buffer not yet allocated (NULL), undefined behaviour UBSan reports; the ASan run
    (``make fuzz``) is the real check of this one, this is its result."""
    assert encode(codec.program("null"), None, b"") == b""
    assert encode(codec.program("string"), "", b"") == b"\x00"
    assert encode(codec.program("long"), -1, b"\x00") == b"\x00\x01"
