"""Avro schema compatibility by the specification's resolution rules, with field paths.

``backward_problems(new, old)`` answers the question a registry asks under BACKWARD
compatibility: can a reader using ``new`` read data written with ``old``? Each problem
names the field it is about, which is what a person needs to fix a schema.
"""

from __future__ import annotations

from typing import Any

PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
# writer type -> reader types it may be read as (Avro spec, "Schema Resolution")
PROMOTIONS = {
    "int": {"int", "long", "float", "double"},
    "long": {"long", "float", "double"},
    "float": {"float", "double"},
    "string": {"string", "bytes"},
    "bytes": {"bytes", "string"},
}

Schema = Any  # parsed JSON of an Avro schema


def backward_problems(new: Schema, old: Schema) -> list[str]:
    """Why a reader with schema ``new`` cannot read data written with ``old`` (empty: it can)."""
    checker = _Checker(_names(new), _names(old), forward=False)
    checker.check(new, old, _top_name(new))
    return checker.problems


def forward_problems(new: Schema, old: Schema) -> list[str]:
    """Why a reader still on ``old`` cannot read data written with ``new`` (empty: it can)."""
    checker = _Checker(_names(old), _names(new), forward=True)
    checker.check(old, new, _top_name(new))
    return checker.problems


def problems(new: Schema, old: Schema, level: str) -> list[str]:
    """Problems under a registry compatibility level (BACKWARD, FORWARD, FULL, NONE, ..._TRANSITIVE
    checked against the one ``old`` given)."""
    level = level.upper().removesuffix("_TRANSITIVE")
    found: list[str] = []
    if level in ("BACKWARD", "FULL"):
        found += backward_problems(new, old)
    if level in ("FORWARD", "FULL"):
        found += forward_problems(new, old)
    return found


def _top_name(schema: Schema) -> str:
    return schema.get("name", "value") if isinstance(schema, dict) else str(schema)


def _fullname(schema: dict, namespace: str | None) -> str:
    name = schema["name"]
    if "." in name:
        return name
    ns = schema.get("namespace", namespace)
    return f"{ns}.{name}" if ns else name


def _names(schema: Schema) -> dict[str, dict]:
    """Every named type (record, enum, fixed) in ``schema`` by full and short name."""
    found: dict[str, dict] = {}

    def walk(node: Schema, namespace: str | None) -> None:
        if isinstance(node, list):
            for branch in node:
                walk(branch, namespace)
        elif isinstance(node, dict):
            kind = node.get("type")
            if kind in ("record", "error", "enum", "fixed"):
                full = _fullname(node, namespace)
                found[full] = found[full.rsplit(".", 1)[-1]] = node
                namespace = full.rsplit(".", 1)[0] if "." in full else namespace
                for field in node.get("fields", ()):
                    walk(field["type"], namespace)
            elif kind == "array":
                walk(node["items"], namespace)
            elif kind == "map":
                walk(node["values"], namespace)
            elif isinstance(kind, (dict, list)):
                walk(kind, namespace)

    walk(schema, None)
    return found


class _Checker:
    def __init__(self, reader_names: dict[str, dict], writer_names: dict[str, dict],
                 forward: bool = False) -> None:
        self.reader_names, self.writer_names = reader_names, writer_names
        self.forward = forward
        self.problems: list[str] = []
        self._seen: set[tuple[int, int]] = set()

    def _resolve(self, node: Schema, names: dict[str, dict]) -> Schema:
        if isinstance(node, str) and node not in PRIMITIVES:
            return names.get(node, node)
        if isinstance(node, dict) and node.get("type") in PRIMITIVES and len(node) > 0:
            # {"type": "long", "logicalType": ...}: logical types resolve as their base
            return node["type"]
        if isinstance(node, dict) and isinstance(node.get("type"), (dict, list)):
            return self._resolve(node["type"], names)
        return node

    @staticmethod
    def _kind(node: Schema) -> str:
        if isinstance(node, list):
            return "union"
        if isinstance(node, dict):
            return node["type"] if node["type"] != "error" else "record"
        return node

    def matches(self, reader: Schema, writer: Schema) -> bool:
        """Whether ``writer`` resolves into ``reader`` (without recording problems)."""
        probe = _Checker(self.reader_names, self.writer_names, self.forward)
        probe.check(reader, writer, "")
        return not probe.problems

    def check(self, reader: Schema, writer: Schema, path: str) -> None:
        reader = self._resolve(reader, self.reader_names)
        writer = self._resolve(writer, self.writer_names)
        rk, wk = self._kind(reader), self._kind(writer)
        if wk == "union":
            for branch in writer:
                if rk == "union":
                    if not any(self.matches(rb, branch) for rb in reader):
                        self.problems.append(f"{path}: the old schema can hold "
                                             f"{self._describe(branch)}, which the new union "
                                             "cannot")
                else:
                    self.check(reader, branch, path)
            return
        if rk == "union":
            if not any(self.matches(branch, writer) for branch in reader):
                self.problems.append(f"{path}: old type {self._describe(writer)} is not in the "
                                     "new union")
            return
        if rk in PRIMITIVES or wk in PRIMITIVES:
            if not (rk in PRIMITIVES and wk in PRIMITIVES and
                    (rk == wk or rk in PROMOTIONS.get(wk, ()))):
                self.problems.append(f"{path}: type changed from {self._describe(writer)} to "
                                     f"{self._describe(reader)}")
            return
        if rk != wk:
            self.problems.append(f"{path}: type changed from {wk} to {rk}")
            return
        key = (id(reader), id(writer))
        if key in self._seen:  # recursive types
            return
        self._seen.add(key)
        if rk == "record":
            self._check_record(reader, writer, path)
        elif rk == "enum":
            missing = [s for s in writer["symbols"] if s not in reader["symbols"]]
            if missing and "default" not in reader:
                self.problems.append(f"{path}: enum {reader['name']} lost symbol(s) "
                                     f"{', '.join(missing)} and has no default")
        elif rk == "array":
            self.check(reader["items"], writer["items"], f"{path}[]")
        elif rk == "map":
            self.check(reader["values"], writer["values"], f"{path}{{}}")
        elif rk == "fixed":
            if reader["size"] != writer["size"]:
                self.problems.append(f"{path}: fixed size changed from {writer['size']} to "
                                     f"{reader['size']}")

    def _check_record(self, reader: dict, writer: dict, path: str) -> None:
        writer_fields = {}
        for field in writer["fields"]:
            writer_fields[field["name"]] = field
        for field in reader["fields"]:
            names = [field["name"], *field.get("aliases", ())]
            old = next((writer_fields[n] for n in names if n in writer_fields), None)
            where = f"{path}.{field['name']}"
            if old is None:
                if "default" in field:
                    continue
                if self.forward:
                    self.problems.append(
                        f"{where}: field '{field['name']}' is removed but has no default in the "
                        "old schema, so readers still on the old schema cannot read new data")
                else:
                    self.problems.append(
                        f"{where}: field '{field['name']}' is new and has no default, so data "
                        "written with the old schema cannot be read (add a default)")
                continue
            self.check(field["type"], old["type"], where)

    def _describe(self, node: Schema) -> str:
        if isinstance(node, dict):
            return node.get("name", node["type"])
        if isinstance(node, list):
            return "union"
        return str(node)
