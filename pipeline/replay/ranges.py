"""What a replay reads: times, offset windows and topic names, as the user writes them.

Used by backtests (``pipeline backtest``), topology replays (``pipeline replay``) and the
topology file; kept free of Kafka and pandas so the commands that parse ranges start fast.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Sequence

from pipeline.core.errors import PipelineError
from pipeline.kafka.catalog import Namespace, split_topic

TimeLike = int | str | datetime | None
Offsets = dict[tuple[str, int], tuple[int, int]]  # (topic, partition) -> [first, end)


def to_ms(value: TimeLike, what: str = "time") -> int | None:
    """Epoch ms of an int (ms), an ISO date-time (UTC unless it says otherwise) or a
    datetime; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise PipelineError(f"{what} {value!r} is not a time")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        try:
            value = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise PipelineError(f"{what} {text!r} is not epoch ms or an ISO date-time like "
                                "2019-01-01 or 2019-01-01T12:00:00Z") from None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return int(value.timestamp() * 1000)
    raise PipelineError(f"{what} {value!r} is not a time")


def parse_offsets(specs: Sequence[str], namespace: Namespace | str | None = None) -> Offsets:
    """``["bars:0:100-200", ...]`` (end exclusive; catalog names are put in ``namespace``)
    -> ``{("sim.bars", 0): (100, 200)}``."""
    offsets: Offsets = {}
    for spec in specs:
        try:
            topic, partition, span = spec.rsplit(":", 2)
            first, end = span.split("-")
            key, value = (topic, int(partition)), (int(first), int(end))
        except ValueError:
            raise PipelineError(f"offsets {spec!r} must be TOPIC:PARTITION:FROM-TO, "
                                "e.g. bars:0:0-1000 (TO exclusive)") from None
        if not 0 <= value[0] <= value[1]:
            raise PipelineError(f"offsets {spec!r}: FROM must be >= 0 and <= TO")
        if key in offsets:
            raise PipelineError(f"offsets given twice for {topic}[{partition}]")
        offsets[key] = value
    if namespace is None:
        return offsets
    return {(resolve_topics(namespace, [t])[0], p): v for (t, p), v in offsets.items()}


def resolve_topics(namespace: Namespace | str | None, topics: Sequence[str]) -> list[str]:
    """Full topic names: catalog names (``bars``) are put in ``namespace``."""
    ns = Namespace(namespace) if isinstance(namespace, str) else namespace
    out = []
    for name in topics:
        if split_topic(name) is not None or ns is None:
            out.append(name)
        else:
            out.append(ns.topic(name))
    return out


def utc_text(ms: int) -> str:
    """``2021-06-24 00:14:26 UTC`` for epoch ms."""
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def range_text(start_ms: int | None, end_ms: int | None, offsets: Offsets | None) -> str:
    parts = []
    if start_ms is not None or end_ms is not None:
        parts.append(f" between {utc_text(start_ms) if start_ms is not None else 'the beginning'} "
                     f"and {utc_text(end_ms) if end_ms is not None else 'the end'}")
    if offsets:
        parts.append(" at offsets " + ", ".join(f"{t}[{p}] {a}..{b}"
                                                for (t, p), (a, b) in sorted(offsets.items())))
    return "".join(parts)
