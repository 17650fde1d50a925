"""Memory: peak RSS of each group (and of the producer) after N L2 changes.

Every process runs as deployed: the orderbook, bars and strategy groups from their own
entry points (``MidQuoter`` on ``book.snapshots``, as a book-driven strategy runs), and the
producer's own ingest path, :class:`producers.gemini_ws.IngestSink` (normaliser, Avro
encoders, the idempotent producer with its million-record queue) fed by the venue's
generator instead of a socket, which is faster than the WebSocket and gives an exact
count (``python -m bench.memory feed``). The groups start first, on a fresh namespace;
once each has joined its group its RSS is read: the baseline, the same process idle. Then
the feed runs, every group runs until it has committed everything there is for it (the
strategy after the orderbook, whose snapshots it reads); then its peak RSS (VmHWM, the
high-water mark of the program since its exec) is read and it is stopped with SIGTERM.
The feed reports its own VmHWM once everything it produced is acknowledged.

The issue asks for 10 million changes; ``python -m bench`` scales it to ``2 x --events``
(capped at 10M: ``--events 5000000`` does the full run).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import groups
from bench.figures import Figure
from bench.groups import endpoints_parser
from pipeline.kafka.catalog import Namespace, ensure_topics

MAX_CHANGES = 10_000_000
SYMBOLS = ["BTCUSD", "ETHUSD", "SOLUSD", "LTCUSD"]
TOPICS = ["raw.frames", "md.l2", "md.trades", "dlq", "book.snapshots", "book.health",
          "book.checkpoints", "bars", "bars.late", "orders.requests", "strategy.state"]
KEYS = {"mid-quoter": "bench-memory-key-0123456789abcdef"}


def feed(bootstrap: str, registry_url: str, namespace: Namespace, changes: int) -> dict:
    """The producer's ingest path over generated frames until ``changes`` level changes
    are in; returns counts, this process's RSS once set up and its peak (kB)."""
    from pipeline.avro.registry import SchemaRegistry
    from pipeline.avro.serde import Serde
    from pipeline.gemini.marketdata import V2Normalizer
    from pipeline.kafka.clients import ReliableProducer
    from pipeline.venue.market import generated_events, render_v2
    from producers.gemini_ws import FeedStats, IngestSink

    stats = FeedStats()
    producer = ReliableProducer(bootstrap)
    sink = IngestSink(producer, Serde(SchemaRegistry(registry_url)), namespace, stats)
    normalizer = V2Normalizer("bench-memory")
    url = "generator://bench-memory/v2/marketdata"
    idle = groups.rss_kb("self")
    done = index = 0
    for event in generated_events(SYMBOLS, seed=7):
        for frame in render_v2(event):
            sink.frame(frame, time.time_ns() // 1000, normalizer, url, index)
            index += 1
        done += len(event.changes)
        if done >= changes:
            break
    producer.flush()
    return {"frames": stats.frames, "records": stats.records, "changes": done,
            "idle_rss_kb": idle, "peak_rss_kb": groups.rss_kb("self", "VmHWM")}


def run(bootstrap: str, registry_url: str, events: int) -> list[Figure]:
    changes = min(MAX_CHANGES, 2 * events)
    namespace = Namespace(f"sim-benchmem{int(time.time())}")
    ensure_topics(bootstrap, namespace, TOPICS)
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    procs = {
        "orderbook": groups.group("consumers.orderbook", "orderbook", work, bootstrap,
                                  registry_url, namespace, "--checkpoint-interval", "1"),
        "bars": groups.group("consumers.bars", "bars", work, bootstrap, registry_url, namespace,
                             "--parquet-root", str(work / "bars"), "--run-dir", str(work)),
        "strategy": groups.group("consumers.strategy", "strategy", work, bootstrap,
                                 registry_url, namespace, "--strategy",
                                 "pipeline.strategy:MidQuoter", "--inputs", "book.snapshots",
                                 keys=KEYS),
    }
    inputs = {"orderbook": ("orderbook", ["md.l2"]), "bars": ("bars", ["md.trades"]),
              "strategy": ("strategy.mid-quoter", ["book.snapshots"])}
    try:
        groups.wait_for_log(list(procs.values()), " assigned ")
        idle = {name: groups.rss_kb(proc.pid) for name, proc in procs.items()}
        feeder = groups.start("producer", ["-m", "bench.memory", "feed", "--bootstrap",
                                           bootstrap, "--registry", registry_url,
                                           "--namespace", str(namespace), "--changes",
                                           str(changes)], work, bootstrap, registry_url)
        procs["producer"] = feeder
        groups.wait(feeder, timeout_s=300 + changes / 2_000)  # exits once all is acknowledged
        if feeder.popen.returncode != 0:
            raise RuntimeError(f"memory bench: the feed failed: {groups.tail(feeder)}")
        fed = json.loads(feeder.log.read_text().strip().splitlines()[-1])
        idle["producer"], peak = fed["idle_rss_kb"], {"producer": fed["peak_rss_kb"]}
        for name in ("orderbook", "bars", "strategy"):  # the strategy reads the orderbook's
            group_name, topics = inputs[name]
            _drain(bootstrap, f"{namespace}.{group_name}", namespace, topics, procs[name],
                   timeout_s=120 + changes / 5_000)
            peak[name] = groups.rss_kb(procs[name].pid, "VmHWM")
            groups.stop(procs[name])
    finally:
        groups.stop_all(list(procs.values()))
        shutil.rmtree(work, ignore_errors=True)
    figures = []
    for name in ("producer", "orderbook", "bars", "strategy"):
        what = "producer ingest path (IngestSink)" if name == "producer" else f"{name} group"
        figures.append(Figure(f"peak RSS, {what}, after {fed['changes']:,} L2 changes",
                              peak[name] / 1024, "MB", fed["changes"],
                              "the same process idle (RSS once started)", idle[name] / 1024,
                              ""))
    return figures


def _drain(bootstrap: str, group_id: str, namespace: Namespace, topics: list[str],
           proc: groups.Proc, timeout_s: float) -> None:
    """Until the group has committed every record of ``topics``."""
    deadline = time.monotonic() + timeout_s
    while (behind := groups.lag(bootstrap, group_id, namespace, topics)) > 0:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited: {groups.tail(proc)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{group_id} still {behind} records behind after "
                               f"{timeout_s:.0f}s")
        time.sleep(0.5)


def main(argv: list[str]) -> int:
    ap = endpoints_parser("python -m bench.memory feed")
    ap.add_argument("--changes", type=int, required=True)
    args = ap.parse_args(argv)
    print(json.dumps(feed(args.bootstrap, args.registry, Namespace(args.namespace),
                          args.changes)))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["feed"]:
        sys.exit("usage: python -m bench.memory feed --bootstrap B --registry R --namespace NS "
                 "--changes N")
    sys.exit(main(sys.argv[2:]))
