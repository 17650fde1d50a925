"""`make bench` / `python -m bench`: start what the benchmarks need, run them, report.

A broker and a registry are started under run/bench (unless KAFKA_BOOTSTRAP_SERVERS /
SCHEMA_REGISTRY_URL name running ones) and stopped afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys

from bench import bars, book, execution, ingest, serde
from bench.figures import report
from pipeline.broker import LocalBroker
from pipeline.config import REPO_ROOT
from pipeline.errors import PipelineError
from pipeline.registry_server import LocalRegistry

RUN_DIR = REPO_ROOT / "run" / "bench"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--events", type=int, default=200_000,
                    help="records per benchmark (default sized for a few minutes here)")
    args = ap.parse_args(argv)
    broker, registry = LocalBroker(RUN_DIR), LocalRegistry(RUN_DIR)
    try:
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or \
            broker.start(port=0, controller_port=0, quiet=False).bootstrap_servers
        registry_url = os.environ.get("SCHEMA_REGISTRY_URL") or \
            registry.start(bootstrap, port=0, quiet=False).url
        figures = serde.run(registry_url, args.events)
        figures += ingest.run(bootstrap, registry_url, args.events)
        figures += book.run(args.events)
        figures += bars.run(bootstrap, registry_url, args.events)
        figures += execution.run(bootstrap, registry_url, args.events)
        path = report(figures, RUN_DIR / "results")
        print(f"figures written to {path}")
        return 0
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        registry.stop()
        broker.stop()


if __name__ == "__main__":
    sys.exit(main())
