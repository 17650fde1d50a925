"""The one metrics interface: what a process counts, by name and labels, and how those
figures reach the supervisor's Prometheus exposition (``pipeline/ops/status.py``).

Every process has one :class:`MetricsRegistry`. The group runner reports its figures to
it (``records_total``, ``outputs_total``, ``dead_letters_total``, ``commits_total``,
``batches_total``), handlers report theirs through ``Handler.metrics`` (the runner binds
it: ``self.metrics.inc("rejections_total", reason="risk:max_notional")``), the WebSocket
producer its own (``reconnects_total``, ``frames_total``...). Two kinds, as Prometheus has
them: counters only go up (:meth:`MetricsRegistry.inc`), gauges are set
(:meth:`MetricsRegistry.set`). A figure that is already counted elsewhere (``GroupStats``)
is read at snapshot time by a *collector* instead, so no hot loop pays for it twice.

The path to the exposition: :class:`MetricsWriter` writes the registry's snapshot as JSON
to ``<run dir>/status/metrics-<process>.json`` (atomically, at most every few seconds,
from the process's own loop: I/O at the edge); the supervisor's metrics server reads every
such file (:func:`read_metrics`) at each collection and exposes each figure as
``pipeline_<name>{process="<process>", <labels>}``. The supervisor names the process in
``PIPELINE_PROCESS`` (with ``PIPELINE_RUN_DIR``); a process started by hand writes nothing
unless given a path. No dependency beyond the standard library.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

log = logging.getLogger(__name__)

COUNTER, GAUGE = "counter", "gauge"
WRITE_EVERY_S = 2.0
PROCESS_ENV = "PIPELINE_PROCESS"
RUN_DIR_ENV = "PIPELINE_RUN_DIR"
PREFIX = "metrics-"
_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

#: What the shipped figures mean (the exposition's HELP lines; others get a generic one).
HELP = {
    "records_total": "Records the process consumed (a group) or produced (the producer).",
    "outputs_total": "Records a consumer group produced (dead letters included).",
    "dead_letters_total": "Records sent to the dead-letter topic.",
    "batches_total": "Batches a consumer group handled.",
    "commits_total": "Commits (or transactions) of a consumer group.",
    "rejections_total": "Orders rejected, by reason.",
    "order_events_total": "Order events published, by kind.",
    "refusals_total": "Strategy intents that made no order request.",
    "snapshots_total": "Book snapshots published.",
    "book_health_total": "Book health events, by kind.",
    "reconnects_total": "Reconnections of a WebSocket feed.",
    "frames_total": "WebSocket frames received.",
    "heartbeat_timeouts_total": "Connections ended by a heartbeat timeout.",
    "sequence_gaps_total": "Sequence gaps in a v1 feed (each a resubscribe).",
    "update_gaps_total": "Update-id gaps in the new API feed (each a resnapshot).",
    "skipped_total": "Valid frames carrying nothing kept, by kind.",
    "delivery_failures_total": "Produced records the brokers did not acknowledge.",
}

Labels = tuple[tuple[str, str], ...]
Key = tuple[str, Labels]


class Metrics(Protocol):
    """What a handler (or anything) reports to."""

    def inc(self, name: str, amount: float = 1, **labels: object) -> None: ...

    def set(self, name: str, value: float, **labels: object) -> None: ...


class NullMetrics:
    """Reports go nowhere (a handler outside a runner)."""

    def inc(self, name: str, amount: float = 1, **labels: object) -> None:
        pass

    def set(self, name: str, value: float, **labels: object) -> None:
        pass


NULL_METRICS = NullMetrics()


def _labels(labels: dict[str, object]) -> Labels:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


class MetricsRegistry:
    """Counters and gauges by name and labels; safe to report to from any thread.
    ``labels`` are constant labels of every figure (e.g. ``group``)."""

    def __init__(self, **labels: object) -> None:
        self.labels = {k: str(v) for k, v in labels.items()}
        self._kinds: dict[str, str] = {}
        self._values: dict[Key, float] = {}
        self._collectors: list[Callable[[MetricsRegistry], None]] = []
        self._lock = threading.Lock()

    def _kind(self, name: str, kind: str) -> None:
        known = self._kinds.setdefault(name, kind)
        if known != kind:
            raise ValueError(f"metric {name} is a {known}, not a {kind}")

    def inc(self, name: str, amount: float = 1, **labels: object) -> None:
        """Add ``amount`` (>= 0) to a counter."""
        if amount < 0:
            raise ValueError(f"counter {name} cannot go down by {amount}")
        key = (name, _labels(labels))
        with self._lock:
            self._kind(name, COUNTER)
            self._values[key] = self._values.get(key, 0) + amount

    def set(self, name: str, value: float, **labels: object) -> None:
        """Set a gauge."""
        key = (name, _labels(labels))
        with self._lock:
            self._kind(name, GAUGE)
            self._values[key] = value

    def set_total(self, name: str, total: float, **labels: object) -> None:
        """A counter counted elsewhere, at its current total (for collectors)."""
        key = (name, _labels(labels))
        with self._lock:
            self._kind(name, COUNTER)
            self._values[key] = total

    def collect(self, collector: Callable[[MetricsRegistry], None]) -> None:
        """Run ``collector(self)`` before every snapshot (figures kept elsewhere)."""
        self._collectors.append(collector)

    def value(self, name: str, **labels: object) -> float | None:
        for collector in self._collectors:
            collector(self)
        return self._values.get((name, _labels(labels)))

    def samples(self) -> list[tuple[str, str, dict[str, str], float]]:
        """(kind, name, labels, value) of every figure, sorted."""
        for collector in self._collectors:
            collector(self)
        with self._lock:
            values, kinds = dict(self._values), dict(self._kinds)
        return [(kinds[name], name, dict(labels), value)
                for (name, labels), value in sorted(values.items())]

    def snapshot(self) -> dict[str, Any]:
        """JSON-safe: ``{"labels": {...}, "metrics": [[kind, name, labels, value], ...]}``."""
        return {"labels": dict(self.labels),
                "metrics": [list(sample) for sample in self.samples()]}


def metrics_path(status_dir: Path, process: str) -> Path:
    return status_dir / f"{PREFIX}{process}.json"


def process_metrics_path(environ: dict[str, str] | None = None) -> Path | None:
    """Where this process's metrics go when the supervisor runs it, else None."""
    env = os.environ if environ is None else environ
    process, run_dir = env.get(PROCESS_ENV), env.get(RUN_DIR_ENV)
    if not process or not run_dir:
        return None
    return metrics_path(Path(run_dir) / "status", process)


class MetricsWriter:
    """Writes a registry's snapshot to ``path``, at most every ``every_s`` (``maybe``) or
    now (``write``); a write that fails is logged once and retried next time."""

    def __init__(self, registry: MetricsRegistry, path: Path,
                 every_s: float = WRITE_EVERY_S, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.registry, self.path, self.every_s, self.clock = registry, path, every_s, clock
        self._next = 0.0
        self._failing = False

    def maybe(self) -> None:
        if self.clock() >= self._next:
            self.write()

    def write(self) -> None:
        self._next = self.clock() + self.every_s
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            staging = self.path.with_name(self.path.name + ".tmp")
            staging.write_text(json.dumps(self.registry.snapshot()))
            os.replace(staging, self.path)
            self._failing = False
        except OSError as exc:
            if not self._failing:
                log.warning("metrics not written to %s: %s", self.path, exc)
            self._failing = True


def read_metrics(status_dir: Path) -> dict[str, dict[str, Any]]:
    """Every process's last snapshot in ``status_dir``, by process name (unreadable or
    half-written files are skipped)."""
    out: dict[str, dict[str, Any]] = {}
    if not status_dir.is_dir():
        return out
    for path in sorted(status_dir.glob(f"{PREFIX}*.json")):
        try:
            out[path.name[len(PREFIX):-len(".json")]] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return out


def escape_label(value: str) -> str:
    """A label value in Prometheus' text format."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def exposition(snapshots: dict[str, dict[str, Any]], prefix: str = "pipeline_") -> list[str]:
    """The processes' figures in Prometheus' text format: one family per name (HELP and
    TYPE once), a sample per process and labels (``process``, the registry's constant
    labels, the figure's own)."""
    families: dict[str, tuple[str, list[str]]] = {}
    for process, snapshot in sorted(snapshots.items()):
        constant = snapshot.get("labels") or {}
        for kind, name, labels, value in snapshot.get("metrics") or ():
            full = {"process": process, **constant, **labels}
            if not _NAME.fullmatch(str(name)) or not all(_NAME.fullmatch(k) for k in full):
                continue  # not a Prometheus name: never break the whole exposition
            text = ",".join(f'{k}="{escape_label(str(v))}"' for k, v in full.items())
            kind_seen, lines = families.setdefault(name, (kind, []))
            if kind_seen == kind:
                lines.append(f"{prefix}{name}{{{text}}} {_number(value)}")
    out: list[str] = []
    for name, (kind, lines) in sorted(families.items()):
        out += [f"# HELP {prefix}{name} {HELP.get(name, 'Reported by the process.')}",
                f"# TYPE {prefix}{name} {kind}", *lines]
    return out


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def report_totals(registry: MetricsRegistry, totals: Iterable[tuple[str, float]]) -> None:
    """Counters counted elsewhere, as (name, total) pairs (a collector's usual body)."""
    for name, total in totals:
        registry.set_total(name, total)
