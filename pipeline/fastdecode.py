"""Avro decoding in C: the writer schema compiled once, the bytes walked by pipeline._avro.

fastavro's ``schemaless_reader`` spends most of its ~5 µs per record on per-call set-up
(schema checks, a reader per call), and every group and replay decodes hundreds of
thousands of records of a handful of schemas. :func:`compile_reader` turns one writer
schema into a *program* (nested tuples of opcodes, built here in Python) that
``pipeline._avro.decode``, a small C extension built by ``pip install``, runs over the
bytes: about 4.7x fastavro on ``Bar``. It returns exactly what fastavro returns for a
schema parsed like ``pipeline.registry.parse_plain`` (logical types stripped: timestamps
stay integers). :class:`pipeline.serde.Decoder` uses it for every record whose writer
schema is its reader's; schema resolution, recursive schemas and builds without a C
compiler stay with fastavro.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Any, Callable

from pipeline.registry import _strip_logical

try:
    from pipeline._avro import decode as _decode
except ImportError:  # built without a C compiler: the Decoder reads with fastavro
    _decode = None

Reader = Callable[[bytes, int], tuple[Any, int]]
# Opcodes, as in pipeline/_avro.c.
(NULL, BOOLEAN, LONG, FLOAT, DOUBLE, BYTES, STRING, RECORD, UNION, ARRAY, MAP, ENUM,
 FIXED) = range(13)
_PRIMITIVES = {"null": (NULL,), "boolean": (BOOLEAN,), "int": (LONG,), "long": (LONG,),
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
            return (UNION, tuple(self.value(branch, space) for branch in schema))
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
            program = (RECORD, tuple(sys.intern(n) for n, _ in fields),
                       tuple(p for _, p in fields))
        self.named[full] = program
        self.named.setdefault(name.rsplit(".", 1)[-1], program)
        return program


def program(schema: Any) -> tuple:
    """The program ``pipeline._avro.decode`` runs for Avro binary written with ``schema``
    (JSON; logical types are ignored: values come back as stored)."""
    return _Compiler().value(_strip_logical(schema), None)


def compile_reader(schema: Any) -> Reader:
    """A function ``read(data, pos) -> (value, end)`` for Avro binary written with
    ``schema``; raises :class:`Unsupported` for what only fastavro reads."""
    if _decode is None:
        raise Unsupported("the C decoder pipeline._avro is not built")
    return partial(_decode, program(schema))
