"""Avro binary in C: the schema compiled once, the bytes walked by ``pipeline.avro._avro``.

fastavro's ``schemaless_reader``/``schemaless_writer`` spend most of their 4–7 µs per
record on per-call set-up (schema checks, a reader or writer per call), and every group,
the producer and every replay handle hundreds of thousands of records of a handful of
schemas. :func:`program` turns a schema into nested tuples of opcodes (built here, in
Python) that ``pipeline.avro._avro``, a small C extension built by ``pip install``, runs:
:func:`compile_reader` decodes about 4.7x faster than fastavro on ``Bar`` and
:func:`compile_writer` encodes ``L2Update`` about 5x faster, with exactly fastavro's
results (values as for a schema parsed like ``pipeline.avro.registry.parse_plain``: logical
types stripped, timestamps stay integers; bytes identical on the way out).
:class:`pipeline.avro.serde.Encoder` and :class:`~pipeline.avro.serde.Decoder` use them; schema
resolution (data of another schema version), recursive schemas, unions whose branches
overlap, and builds without a C compiler stay with fastavro.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Any, Callable

from pipeline.avro.registry import _strip_logical

try:
    from pipeline.avro._avro import decode as _decode
    from pipeline.avro._avro import encode as _encode
except ImportError:  # built without a C compiler: serde reads and writes with fastavro
    _decode = _encode = None

Reader = Callable[[bytes, int], tuple[Any, int]]
# Opcodes, as in pipeline/avro/_avro.c.
(NULL, BOOLEAN, LONG, FLOAT, DOUBLE, BYTES, STRING, RECORD, UNION, ARRAY, MAP, ENUM,
 FIXED) = range(13)
_PRIMITIVES = {"null": (NULL,), "boolean": (BOOLEAN,), "int": (LONG, 32), "long": (LONG,),
               "float": (FLOAT,), "double": (DOUBLE,), "bytes": (BYTES,),
               "string": (STRING,)}


class Unsupported(Exception):
    """A schema (or a build) only fastavro reads."""


class _Compiler:
    """Writer schema -> program. Named types are compiled once and shared; a type that
    refers to itself is not supported (the caller falls back to fastavro)."""

    def __init__(self) -> None:
        self.named: dict[str, tuple] = {}
        self._expanding: set[str] = set()
        self.ambiguous = False  # a union two of whose branches could take the same value

    def value(self, schema: Any, space: str | None) -> tuple:
        if isinstance(schema, str):
            if schema in _PRIMITIVES:
                return _PRIMITIVES[schema]
            full = schema if "." in schema or not space else f"{space}.{schema}"
            for name in (full, schema):
                if name in self._expanding:
                    raise Unsupported(f"recursive type {schema}")
                if name in self.named:
                    return self.named[name]
            raise Unsupported(f"unknown type {schema}")
        if isinstance(schema, list):
            branches = tuple(self.value(branch, space) for branch in schema)
            ops = [b[0] for b in branches]
            if sum(op in (RECORD, MAP) for op in ops) > 1 or sum(
                    op in (LONG, FLOAT, DOUBLE) for op in ops) > 1 or sum(
                    op in (STRING, ENUM) for op in ops) > 1 or sum(
                    op in (BYTES, FIXED) for op in ops) > 1:
                self.ambiguous = True  # which branch a value goes to is fastavro's call
            return (UNION, branches)
        kind = schema.get("type")
        if kind in _PRIMITIVES:
            return _PRIMITIVES[kind]
        if kind == "array":
            return (ARRAY, self.value(schema["items"], space))
        if kind == "map":
            return (MAP, self.value(schema["values"], space))
        if kind in ("record", "error", "enum", "fixed"):
            return self.named_type(schema, space)
        raise Unsupported(f"type {kind!r}")

    def named_type(self, schema: dict, space: str | None) -> tuple:
        name = schema["name"]
        space = schema.get("namespace", space) if "." not in name else name.rsplit(".", 1)[0]
        full = name if "." in name or not space else f"{space}.{name}"
        kind = schema["type"]
        if kind == "enum":
            program: tuple = (ENUM, tuple(schema["symbols"]))
        elif kind == "fixed":
            program = (FIXED, int(schema["size"]))
        else:
            self._expanding.update((full, name.rsplit(".", 1)[-1]))
            fields = [(f["name"], self.value(f["type"], space)) for f in schema["fields"]]
            self._expanding.difference_update((full, name.rsplit(".", 1)[-1]))
            # names, programs, and the defaults a missing key is written with (as fastavro)
            program = (RECORD, tuple(sys.intern(n) for n, _ in fields),
                       tuple(p for _, p in fields),
                       tuple(f.get("default") for f in schema["fields"]))
        self.named[full] = program
        self.named.setdefault(name.rsplit(".", 1)[-1], program)
        return program


def program(schema: Any) -> tuple:
    """The program ``pipeline.avro._avro`` runs for Avro binary of ``schema`` (JSON; logical
    types are ignored: values are as stored)."""
    return _Compiler().value(_strip_logical(schema), None)


def compile_writer(schema: Any) -> Callable[[Any, bytes], bytes]:
    """A function ``write(value, prefix) -> prefix + Avro binary`` for ``schema``, bytes
    for bytes what fastavro's ``schemaless_writer`` writes; a value that does not fit
    raises TypeError or ValueError naming the field (``changes.2.price: expected a str,
    got float 1.5``). Raises :class:`Unsupported` for what only fastavro writes."""
    if _encode is None:
        raise Unsupported("the C encoder pipeline.avro._avro is not built")
    compiler = _Compiler()
    compiled = compiler.value(_strip_logical(schema), None)
    if compiler.ambiguous:
        raise Unsupported("a union whose branches overlap")
    return partial(_encode, compiled)


def compile_reader(schema: Any) -> Reader:
    """A function ``read(data, pos) -> (value, end)`` for Avro binary written with
    ``schema``; raises :class:`Unsupported` for what only fastavro reads."""
    if _decode is None:
        raise Unsupported("the C decoder pipeline.avro._avro is not built")
    return partial(_decode, program(schema))
