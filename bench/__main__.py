"""`make bench` / `python -m bench`: start what the benchmarks need, run them, report.

A broker and a registry are started under run/bench (unless KAFKA_BOOTSTRAP_SERVERS /
SCHEMA_REGISTRY_URL name running ones) and stopped afterwards.
"""

from __future__ import annotations

import os
import sys

import typer

import bench.figures
from bench import (
    backtest,
    bars,
    book,
    consume,
    execution,
    ingest,
    latency,
    memory,
    orders_ack,
    portfolio,
    scale,
    serde,
)
from bench.figures import SMOKE_EVENTS, report
from pipeline.core.errors import PipelineError
from pipeline.ops.broker import LocalBroker
from pipeline.ops.registry_server import LocalRegistry
from pipeline.ops.settings import REPO_ROOT

RUN_DIR = REPO_ROOT / "run" / "bench"


def main(events: int = typer.Option(200_000, help="records per benchmark (default sized "
                                     "for under 10 minutes here)")) -> None:
    if events < SMOKE_EVENTS:
        bench.figures.REPEATS = 1  # a smoke run of the harness: one run per figure
    broker, registry = LocalBroker(RUN_DIR), LocalRegistry(RUN_DIR)
    try:
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or \
            broker.start(port=0, controller_port=0, quiet=False).bootstrap_servers
        registry_url = os.environ.get("SCHEMA_REGISTRY_URL") or \
            registry.start(bootstrap, port=0, quiet=False).url
        figures = serde.run(registry_url, events)
        figures += ingest.run(bootstrap, registry_url, events)
        figures += book.run(events)
        figures += bars.run(bootstrap, registry_url, events)
        figures += execution.run(bootstrap, registry_url, events)
        figures += orders_ack.run(bootstrap, registry_url, events)
        figures += portfolio.run(events)
        figures += consume.run(bootstrap, registry_url, events)
        figures += backtest.run(bootstrap, registry_url, events)
        figures += scale.run(bootstrap, registry_url, events)
        figures += latency.run(bootstrap, registry_url, events)
        figures += memory.run(bootstrap, registry_url, events)
        path = report(figures, RUN_DIR / "results")
        print(f"figures written to {path}")
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from exc
    finally:  # only what this run uses: a given broker/registry is someone else's
        if not os.environ.get("SCHEMA_REGISTRY_URL"):
            registry.stop()
        if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
            broker.stop()


if __name__ == "__main__":
    typer.run(main)
