"""End-to-end latency: a venue frame sent -> the order request it triggers committed.

The real path, every part as deployed: the local venue (generator, one symbol, paced at
``RATE`` events per second: latency, not queueing) serves frames of Gemini's WebSocket API
(the producer's default protocol) over a real WebSocket to the producer (``pipeline
produce gemini``, its own process) -> ``md.l2`` -> the orderbook group (``python -m
consumers.orderbook``) -> ``book.snapshots`` -> the strategy group (``python -m
consumers.strategy``, ``MidQuoter`` requoting on every move of the mid, so every
snapshot gives requests) -> ``orders.requests``, in a transaction. Paper execution runs
beside it, as deployed, so the strategy's quotes are acknowledged, replaced and filled
and its view of its orders stays what it is in a real run.

What links the two ends is already in the records: the venue keeps the time it sent each
frame (``VenueConfig.record_sends``), indexed like the producer's ``sequence`` (the
frame's index on its connection); a snapshot carries the ``sequence`` of the frame that
moved its top, and a request's ``trigger`` names that frame's ``md.l2`` record
(``md.l2/partition/offset``, the snapshot's source).
This process reads both topics ``read_committed``: t1 is the delivery here of the first
request of a snapshot. The venue runs in this process, so both ends use one clock. One
symbol, so one partition all the way: requests come in frame order, and the run ends when
a request for a frame after the measured ones has arrived (none of theirs is missed).
The split per stage (venue -> producer -> snapshot published -> request visible, from the
records' wall-clock stamps) is printed next to the figures.

Only snapshots that changed the top of book are published (the orderbook group's
periodic republication is set to an hour), so each sample is one frame that moved the
top. Baseline, same run: the round trip of a WebSocket ping to the same venue on
loopback (websocket-client ping -> aiohttp's pong).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import websocket

from bench import groups
from bench.execution import _percentile, _reader
from bench.figures import Figure
from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Serde
from pipeline.kafka.catalog import Namespace, ensure_topics
from pipeline.venue.server import Connection, RunningVenue, VenueConfig

RATE = 300.0  # venue events per second (frames: a few more, a market order adds trades)
SYMBOL = "BTCUSD"
WARM_UP_S = 2.0  # after the first request: connections, schema lookups, first fetches
MIN_FRAMES, MAX_FRAMES = 300, 9_000  # frames measured after the warm-up: ~1 to 27 s
PINGS = 2_000
STRATEGY = ("pipeline.strategy:MidQuoter", f'{{"symbol": "{SYMBOL}", "requote_bps": 0}}',
            "mid-quoter")
TOPICS = ["raw.frames", "md.l2", "md.trades", "dlq", "book.snapshots", "book.health",
          "book.checkpoints", "orders.requests", "orders.events", "orders.seen", "paper.state",
          "strategy.state"]


def ping_round_trips(url: str, count: int) -> list[float]:
    """Round trips in ms of ``count`` WebSocket pings, one at a time."""
    ws = websocket.create_connection(url, timeout=10)
    try:
        out = []
        for i in range(count):
            start = time.perf_counter()
            ws.ping(str(i))
            while True:
                opcode, data = ws.recv_data(control_frame=True)
                if opcode == websocket.ABNF.OPCODE_PONG and data == str(i).encode():
                    break
            out.append((time.perf_counter() - start) * 1000)
        return out
    finally:
        ws.close()


def _subscribed(venue: RunningVenue, timeout_s: float = 60.0) -> Connection:
    """The producer's connection, once it has subscribed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for conn in list(venue.venue.connections):
            if conn.symbols and conn.sent_at is not None:
                return conn
        time.sleep(0.05)
    raise RuntimeError("the producer never subscribed to the venue")


PAPER = ("--mode", "paper")


def measure(bootstrap: str, registry_url: str, frames: int, work: Path, *,
            rate: float = RATE, execution: tuple[str, ...] = PAPER,
            venue_keys: dict | None = None, env: dict[str, str] | None = None,
            acked: Callable[[RunningVenue], dict[str, float]] | None = None,
            ) -> tuple[list[tuple[float, float]], list[float], dict[str, list[float]]]:
    """Over ``frames`` paced frames after the warm-up: (frame sent (perf_counter), latency
    ms) per frame that moved the top, by send time; ping round trips in ms; per stage ms.

    The sample ends when the frame's first request is visible, or, with ``acked`` (the
    venue's acknowledgement time per client_order_id), when the venue acknowledged that
    request's order: then ``execution`` names how orders reach the venue (its ``--mode``
    and transport), with ``venue_keys`` and the key in ``env``."""
    namespace = Namespace(f"sim-benchlat{int(time.time())}")
    ensure_topics(bootstrap, namespace, TOPICS)
    decode = Serde(SchemaRegistry(registry_url)).decoder()
    venue = RunningVenue(VenueConfig(symbols=[SYMBOL], rate=rate, record_sends=True,
                                     seed=11, api_keys=venue_keys or {}))
    procs: list[groups.Proc] = []
    try:
        pings = ping_round_trips(f"{venue.ws_url}/v2/marketdata", PINGS)  # market not started
        spec, params, strategy_id = STRATEGY
        procs.append(groups.group("consumers.orderbook", "orderbook", work, bootstrap,
                                  registry_url, namespace, "--snapshot-interval", "3600"))
        keys = {strategy_id: "bench-latency-key-0123456789abcdef"}
        procs.append(groups.group("consumers.strategy", "strategy", work, bootstrap,
                                  registry_url, namespace, "--strategy", spec, "--params",
                                  params, "--inputs", "book.snapshots", keys=keys))
        execution = tuple(a.replace("{venue}", venue.http_url) for a in execution)
        procs.append(groups.group("consumers.execution", "execution", work, bootstrap,
                                  registry_url, namespace, *execution, "--run-dir",
                                  str(work), "--max-notional", "off", "--max-position", "off",
                                  "--max-orders-per-minute", "off", keys=keys, env=env))
        snapshots = _reader(bootstrap, namespace.topic("book.snapshots"))
        requests = _reader(bootstrap, namespace.topic("orders.requests"))
        groups.wait_for_log(procs, " assigned ")
        procs.append(groups.start("producer", [
            "-m", "pipeline.cli", "produce", "gemini", "--url", venue.ws_url, "-n",
            str(namespace), "--symbols", SYMBOL, "--run-dir", str(work)], work, bootstrap,
            registry_url))
        conn = _subscribed(venue)
        # A wall-clock reading of perf_counter, for the stage breakdown (records carry
        # wall-clock microseconds; the latency itself uses perf_counter only).
        wall_minus_perf = time.time() - time.perf_counter()
        by_snapshot: dict[tuple[int, int], dict] = {}  # md.l2 (partition, offset) -> snapshot
        arrived: list[tuple[tuple[int, int], float]] = []  # requests not matched yet
        done: dict[tuple[int, int], float] = {}  # first request per snapshot, when
        connection_id = None
        first = last = None  # the frames measured: indices first .. last-1
        newest = -1  # the newest frame whose request has arrived
        first_id: dict[tuple[int, int], str] = {}  # snapshot -> its first request's id
        deadline = time.monotonic() + 120 + frames / rate
        while last is None or newest < last:  # one symbol: one partition, in order
            if time.monotonic() > deadline:
                raise RuntimeError(f"latency bench: requests stopped coming "
                                   f"({groups.tail(procs[0])})")
            msg = requests.poll(0.002)
            if msg is not None and msg.error() is None:
                request = decode(msg.value())
                _, partition, offset = request["trigger"].rsplit("/", 2)
                key = (int(partition), int(offset))
                arrived.append((key, time.perf_counter()))
                if request.get("action", "NEW") in ("NEW", "REPLACE"):
                    first_id.setdefault(key, request["client_order_id"])
            while (snap := snapshots.poll(0)) is not None:
                if snap.error() is None:
                    value = decode(snap.value())
                    connection_id = connection_id or value["connection_id"]
                    if value["connection_id"] == connection_id:  # no reconnect mixed in
                        # a request's trigger is the md.l2 record its snapshot includes
                        by_snapshot[(value["source_partition"], value["source_offset"])] = value
            while arrived and arrived[0][0] in by_snapshot:
                key, t1 = arrived.pop(0)
                done.setdefault(key, t1)
                newest = max(newest, by_snapshot[key]["sequence"])
            if first is None and done:
                time.sleep(WARM_UP_S)  # what arrives meanwhile is read late: not measured
                first = len(conn.sent_at)
            if first is not None and last is None and len(conn.sent_at) >= first + frames:
                last = first + frames
        snapshots.close()
        requests.close()
        sent = list(conn.sent_at)
        if acked is not None:
            time.sleep(2.0)  # the last orders' acknowledgements
            acks = acked(venue)
            done = {key: acks[first_id[key]] for key in done
                    if key in first_id and first_id[key] in acks}
        samples: list[tuple[float, float]] = []
        stages: dict[str, list[float]] = {"venue send -> producer receive": [],
                                          "producer receive -> snapshot published": [],
                                          "snapshot published -> request visible": []}
        for key, t1 in done.items():
            sequence = by_snapshot[key]["sequence"]
            if not first <= sequence < last:
                continue
            t0, snap = sent[sequence], by_snapshot[key]
            samples.append((t0, (t1 - t0) * 1000))
            received, published = snap["received_ts_us"] / 1e6, snap["published_ts_us"] / 1e6
            stages["venue send -> producer receive"].append(
                (received - wall_minus_perf - t0) * 1000)
            stages["producer receive -> snapshot published"].append((published - received) * 1000)
            stages["snapshot published -> request visible"].append(
                (t1 + wall_minus_perf - published) * 1000)
        if not samples:
            raise RuntimeError("latency bench: no request could be matched to a frame")
        return sorted(samples), pings, stages
    finally:
        groups.stop_all(procs)
        venue.stop()


def run(bootstrap: str, registry_url: str, events: int) -> list[Figure]:
    n = max(MIN_FRAMES, min(events // 20, MAX_FRAMES))
    work = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    try:
        samples, pings, stages = measure(bootstrap, registry_url, n, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    latencies = [ms for _, ms in samples]
    for stage, values in stages.items():
        print(f"latency stage {stage}: p50 {_percentile(values, 0.5):.2f} ms, "
              f"p99 {_percentile(values, 0.99):.2f} ms")
    name = (f"end-to-end latency @{RATE:.0f} events/s: venue frame sent -> order request "
            "committed (producer, orderbook, strategy processes)")
    base = "loopback WebSocket ping round trip to the venue"
    return [Figure(f"{name}, {label}", _percentile(latencies, q), "ms", len(latencies),
                   f"{base}, {label}", _percentile(pings, q), "")
            for label, q in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999))]
