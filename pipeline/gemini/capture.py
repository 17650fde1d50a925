"""Read WebSocket captures in the format of ``../shared/data`` (see its README).

Each line is a connection opening (``URL <-> TS``), a message the client sent
(``URL <- TS: JSON``) or a received frame (``TS: JSON``), TS in Unix seconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Iterator

from pipeline.core.errors import PipelineError

_OPEN = re.compile(r"^(\S+) <-> (\d+(?:\.\d+)?)$")
_SENT = re.compile(r"^(\S+) <- (\d+(?:\.\d+)?): (.*)$")
_RECV = re.compile(r"^(\d+(?:\.\d+)?): (.*)$")


@dataclass(frozen=True, slots=True)
class CaptureLine:
    kind: str  # "open", "sent" or "recv"
    received_us: int  # the capture's timestamp, in microseconds
    text: str  # the frame's JSON text, unchanged ("" for "open")
    url: str | None = None
    line_no: int = 0


def _micros(seconds: str) -> int:
    return int(Decimal(seconds) * 1_000_000)


def read_capture(path: str | Path) -> Iterator[CaptureLine]:
    """Yield the capture's lines in order; a line of no known shape is an error naming it."""
    with open(path, encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if m := _RECV.match(line):
                yield CaptureLine("recv", _micros(m.group(1)), m.group(2), None, line_no)
            elif m := _SENT.match(line):
                yield CaptureLine("sent", _micros(m.group(2)), m.group(3), m.group(1), line_no)
            elif m := _OPEN.match(line):
                yield CaptureLine("open", _micros(m.group(2)), "", m.group(1), line_no)
            else:
                raise PipelineError(f"{path}:{line_no}: not a capture line: {line[:80]!r}")


def received_frames(path: str | Path) -> list[CaptureLine]:
    """Only the frames the client received, in order."""
    return [line for line in read_capture(path) if line.kind == "recv"]
