"""A faster Avro decoder for replays: the writer schema compiled once, bytes walked in C.

fastavro's ``schemaless_reader`` spends most of its ~5 µs per record on per-call set-up
(schema checks, a reader per call); a replay decodes hundreds of thousands of records of
a handful of schemas. :func:`compile_reader` turns one writer schema into a *program*
(nested tuples of opcodes, built here in Python) that ``pipeline._avro.decode``, a small
C extension built by ``pip install``, runs over the bytes: about 4x fastavro on ``Bar``
and ``L2Update``. It returns exactly what fastavro returns for a schema parsed like
``pipeline.registry.parse_plain`` (logical types stripped: timestamps stay integers).

:class:`FastDecoder` is a drop-in for :class:`pipeline.serde.Decoder` on the read side:
records whose writer schema equals the reader's (the usual case) take the compiled path;
those that need Avro schema resolution (written with another version), recursive
schemas, and every record when the extension could not be built (no C compiler) go to
the :class:`~pipeline.serde.Decoder` it wraps. Bad bytes raise the same
:class:`~pipeline.serde.SerdeError`.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Any, Callable, Iterable

from pipeline import schemas
from pipeline.registry import SchemaRegistry, _strip_logical
from pipeline.serde import Decoder, SerdeError

try:
    from pipeline._avro import decode as _decode
except ImportError:  # built without a C compiler: FastDecoder falls back to fastavro
    _decode = None

Reader = Callable[[bytes, int], tuple[Any, int]]
# Opcodes, as in pipeline/_avro.c.
(NULL, BOOLEAN, LONG, FLOAT, DOUBLE, BYTES, STRING, RECORD, UNION, ARRAY, MAP, ENUM,
 FIXED) = range(13)
_PRIMITIVES = {"null": (NULL,), "boolean": (BOOLEAN,), "int": (LONG,), "long": (LONG,),
               "float": (FLOAT,), "double": (DOUBLE,), "bytes": (BYTES,),
               "string": (STRING,)}


class _Unsupported(Exception):
    pass


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
                    raise _Unsupported(f"recursive type {schema}")
                if name in self.named:
                    return self.named[name]
            raise _Unsupported(f"unknown type {schema}")
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
        raise _Unsupported(f"type {kind!r}")

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
    ``schema``; raises :class:`_Unsupported` for what only fastavro reads."""
    if _decode is None:
        raise _Unsupported("the C decoder pipeline._avro is not built")
    return partial(_decode, program(schema))


class FastDecoder:
    """Decodes Confluent-framed Avro like :class:`pipeline.serde.Decoder`, faster."""

    def __init__(self, registry: SchemaRegistry, readers: Iterable[dict] | None = None) -> None:
        self.registry = registry
        self.fallback = Decoder(registry, readers)
        found = list(readers) if readers is not None else [schemas.load(n) for n in schemas.names()]
        self._readers = {schemas.full_name_of(raw): raw for raw in found}
        self._compiled: dict[bytes, Reader | None] = {}

    def __call__(self, data: bytes | None) -> dict:
        if data is None or len(data) < 5 or data[0] != 0:
            return self.fallback(data)  # raises the right SerdeError
        header = data[1:5]
        read = self._compiled.get(header, False)
        if read is False:
            read = self._compile(header)
        if read is None:
            return self.fallback(data)
        try:
            value, end = read(data, 5)
        except Exception as exc:  # noqa: BLE001 - bad bytes fail in many ways
            raise SerdeError(f"corrupt or truncated Avro body for schema id "
                             f"{int.from_bytes(header, 'big')} ({len(data)} bytes): "
                             f"{type(exc).__name__}: {exc}") from None
        if end != len(data):
            raise SerdeError(f"{len(data) - end} trailing byte(s) after the Avro body for "
                             f"schema id {int.from_bytes(header, 'big')}: corrupt record")
        return value

    def reader(self, header: bytes) -> Reader | None:
        """The compiled reader for a 4-byte schema id (None: that schema is read by the
        fallback), for callers that inline the fast path."""
        read = self._compiled.get(header, False)
        return self._compile(header) if read is False else read

    def _compile(self, header: bytes) -> Reader | None:
        schema_id = int.from_bytes(header, "big")
        raw, _ = self.registry.schema(schema_id)
        reader = self._readers.get(schemas.full_name_of(raw)) if isinstance(raw, dict) else None
        read: Reader | None = None
        if reader is None or schemas.same_schema(reader, raw):
            try:
                read = compile_reader(raw)
            except (_Unsupported, KeyError, TypeError, ValueError, SyntaxError):
                read = None  # anything unusual: fastavro reads it
        self._compiled[header] = read
        return read
