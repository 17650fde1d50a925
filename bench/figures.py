"""A benchmark figure and how a run prints and saves them."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class Figure:
    name: str
    value: float
    unit: str
    events: int
    baseline: str
    baseline_value: float
    target: str = ""

    @property
    def ratio(self) -> float:
        """value / baseline, so > 1 means faster when the unit is a rate."""
        return self.value / self.baseline_value if self.baseline_value else float("nan")


# Runs per figure, the fastest counting. A smoke run of the harness (``--events`` below
# SMOKE_EVENTS, as tests/integration/test_bench.py does) measures each once: figures mean nothing.
REPEATS = 3
SMOKE_EVENTS = 10_000


def runs(repeats: int = 3) -> int:
    """How many runs a figure takes: ``repeats``, or one in a smoke run."""
    return min(repeats, REPEATS)


def best_rate(fn, events: int, repeats: int = 3) -> float:
    """Events per second of the fastest of ``repeats`` runs of ``fn()``."""
    best = float("inf")
    for _ in range(runs(repeats)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return events / best


def machine() -> dict:
    import confluent_kafka
    import fastavro

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from pipeline.ops.broker import kafka_version

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "kafka": kafka_version(), "confluent_kafka": confluent_kafka.__version__,
            "librdkafka": confluent_kafka.libversion()[0], "fastavro": fastavro.__version__}


def _number(value: float) -> str:
    """Whole numbers with separators; small ones (a ping in ms) keep 3 significant digits."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def report(figures: list[Figure], out_dir: Path) -> Path:
    table = Table(title="benchmarks (higher is faster; ratio = figure / baseline)")
    for column in ("figure", "value", "unit", "events", "baseline", "baseline value", "ratio",
                   "target"):
        table.add_column(column, justify="right" if "value" in column or column in
                         ("events", "ratio") else "left")
    for f in figures:
        table.add_row(f.name, _number(f.value), f.unit, f"{f.events:,}", f.baseline,
                      _number(f.baseline_value), f"{f.ratio:.2f}", f.target)
    # piped (make bench > file, CI logs): whole lines, not an 80-column squeeze
    Console(soft_wrap=True, width=None if sys.stdout.isatty() else 240).print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / time.strftime("bench-%Y%m%dT%H%M%S.json")
    about = machine()
    path.write_text(json.dumps({"machine": about, "time": time.time(),
                                "figures": [asdict(f) | {"ratio": f.ratio} for f in figures]},
                               indent=2))
    path.with_suffix(".md").write_text(markdown(figures, about))
    return path


def markdown(figures: list[Figure], about: dict) -> str:
    """The same table in Markdown, headed by the machine (what BENCHMARKS.md holds)."""
    lines = [f"{about['cpu']}, {about['cores']} cores; Python {about['python']}, Apache Kafka "
             f"{about['kafka']}, confluent-kafka {about['confluent_kafka']} (librdkafka "
             f"{about['librdkafka']}), fastavro {about['fastavro']}.", "",
             "| figure | value | unit | events | baseline (same run) | baseline value | ratio "
             "| target |", "| --- | ---: | --- | ---: | --- | ---: | ---: | --- |"]
    for f in figures:
        lines.append(f"| {f.name} | {_number(f.value)} | {f.unit} | {f.events:,} | "
                     f"{f.baseline} | {_number(f.baseline_value)} | {f.ratio:.2f} | "
                     f"{f.target} |")
    return "\n".join(lines) + "\n"
