"""Execution latency: an OrderRequest landing in Kafka -> its OrderEvent committed.

The execution group runs as its own process in paper mode, exactly as deployed
(``python -m consumers.execution``), reading a requests topic and the ``md.l2`` and
``md.trades`` topics its simulated exchange matches against (a fresh book snapshot now
and then). This process produces signed requests at a steady rate
(``RATE`` per second, from a thread that sleeps between sends, so the figure is latency,
not queueing, and the client takes little CPU from what it measures) and reads
``orders.events`` with ``read_committed``. A request's latency runs from its
``produce()`` call to the delivery here of its terminal event (FILLED, CANCELLED or
REJECTED), which is only possible once the group's transaction has committed. Both ends
are timed in this process: no clocks are compared.

In the same run, next to it:

* the baseline: a small record's produce -> read_committed consume through Kafka alone,
  at the same rate;
* the floor of exactly-once: a bare transactional relay on the same runtime and
  subscriptions (decode the request, copy it twice to ``orders.events`` and once to
  ``orders.seen`` keyed by its client_order_id: the same partitions per transaction as
  execution), same rate, so what execution adds on top of Kafka transactions is visible;
* throughput: a burst of requests as fast as the group takes them, next to a bare
  produce -> consume of as many small records.

Targets: p99 < 20 ms, and within 1.5x of the relay's p99. ``python -m bench.execution
relay ...`` runs the relay group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from confluent_kafka import Consumer, Message, Producer, TopicPartition

from bench.figures import Figure
from bench.groups import endpoints_parser
from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Decoder, Serde
from pipeline.core.vocabulary import TERMINAL_KINDS
from pipeline.kafka.catalog import Namespace, end_offset, ensure_topics
from pipeline.kafka.clients import client_config, reader_config
from pipeline.ops.settings import REPO_ROOT
from pipeline.runtime.runner import (
    GroupConfig,
    Handler,
    Output,
    Record,
    run_until_stopped,
)
from pipeline.trading.signing import client_order_id, sign

RATE = 1000.0  # requests per second in the latency runs
WARM_UP = 300  # requests not timed: group start, schema lookups, a cold broker
MAX_REQUESTS = 20_000
KEY = b"bench-strategy-key-0123456789abcdef"
SYMBOLS = {"BTCUSD": ("34000.00", "0.01"), "ETHUSD": ("1900.00", "0.01"),
           "SOLUSD": ("35.000", "0.001")}
TERMINAL = TERMINAL_KINDS
TOPICS = ["orders.requests", "md.l2", "md.trades", "orders.events", "orders.seen",
          "paper.state", "dlq"]
Item = tuple[str, bytes, str, "int | None"]  # topic, value, key, timed index or None


def _snapshot(symbol: str) -> dict:
    """A fresh 20-level book as the feed's snapshot record (``md.l2``)."""
    mid, tick = SYMBOLS[symbol]
    decimals = len(tick.split(".")[1])

    def level(i: int) -> str:
        return f"{float(mid) + i * float(tick):.{decimals}f}"

    return {"symbol": symbol, "snapshot": True,
            "changes": [{"side": "BID", "price": level(-i), "quantity": "50"} for i in range(1, 21)]
            + [{"side": "ASK", "price": level(i), "quantity": "50"} for i in range(1, 21)],
            "exchange_ts_ms": None, "received_ts_us": time.time_ns() // 1000,
            "connection_id": "bench", "sequence": 0, "event_id": None}


def _request(i: int) -> dict:
    symbol = list(SYMBOLS)[i % len(SYMBOLS)]
    mid, tick = SYMBOLS[symbol]
    side = "BUY" if i % 2 == 0 else "SELL"
    decimals = len(tick.split(".")[1])
    # Five ticks through the mid, immediate-or-cancel: the order takes the first levels of
    # the other side and is done (FILLED, or CANCELLED for what the book no longer had).
    price = f"{float(mid) + (5 if side == 'BUY' else -5) * float(tick):.{decimals}f}"
    now = int(time.time() * 1000)
    trigger = f"bench/{os.getpid()}/{i}/{time.monotonic_ns()}"
    request = {"client_order_id": client_order_id("bench", trigger), "strategy_id": "bench",
               "symbol": symbol, "side": side, "order_type": "LIMIT", "price": price,
               "amount": "0.5", "options": ["immediate-or-cancel"], "created_ms": now,
               "expires_ms": now + 600_000,
               "trigger": trigger}
    request["signature"] = sign(request, KEY)
    return request


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _reader(bootstrap: str, topic: str) -> Consumer:
    """A read_committed consumer of ``topic`` from its current end."""
    consumer = Consumer(reader_config(bootstrap, f"bench-{uuid.uuid4()}", **{
        "isolation.level": "read_committed", "fetch.wait.max.ms": 50}))
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, end_offset(consumer, TopicPartition(topic, p)))
                     for p in meta.partitions])  # explicit offsets: nothing from now is missed
    return consumer


def _paced(producer: Producer, consumer: Consumer, items: list[Item], rate: float | None,
           finished: Callable[[Message], "int | None"], timeout_s: float = 120,
           ) -> tuple[dict[int, float], dict[int, float]]:
    """Produce ``items`` from a thread while this one consumes: timed items (with an
    index) at ``rate`` per second (None: all at once), untimed ones right after the item
    before them. ``finished(msg)`` names the index a delivered record completes, or None.
    Returns perf_counter times (sent per index, done per index) once every timed item is
    done."""
    timed = sum(index is not None for *_, index in items)
    sent: dict[int, float] = {}
    done: dict[int, float] = {}
    interval = 1.0 / rate if rate else 0.0

    def send() -> None:
        next_at = time.perf_counter()
        for n, (topic, value, key, index) in enumerate(items):
            if index is not None:
                pause = next_at - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                next_at += interval
                sent[index] = time.perf_counter()
            producer.produce(topic, value, key)
            if interval or n % 64 == 0:
                producer.poll(0)
        producer.flush(30)

    sender = threading.Thread(target=send, name="bench-producer", daemon=True)
    deadline = time.perf_counter() + timed * interval + timeout_s
    sender.start()
    while len(done) < timed:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"execution bench: {timed - len(done)} of {timed} records "
                               "never came back")
        msg = consumer.poll(0.05)
        if msg is not None and msg.error() is None:
            index = finished(msg)
            if index is not None and index not in done:
                done[index] = time.perf_counter()
    sender.join(30)
    return sent, done


class _Setup:
    """One namespace with the execution topics, and requests for it."""

    def __init__(self, bootstrap: str, registry_url: str, label: str) -> None:
        self.bootstrap, self.registry_url = bootstrap, registry_url
        self.namespace = Namespace(f"sim-bench{label}{int(time.time())}")
        ensure_topics(bootstrap, self.namespace, TOPICS)
        self.topic = {name: self.namespace.topic(name) for name in TOPICS}
        serde = Serde(SchemaRegistry(registry_url))
        self.encode_request = serde.encoder(self.topic["orders.requests"])
        self.encode_snapshot = serde.encoder(self.topic["md.l2"])
        serde.encoder(self.topic["orders.events"])  # registered: the decoder needs no lookup
        self.decode = serde.decoder()
        self.index: dict[str, int] = {}

    def requests(self, count: int, offset: int) -> list[Item]:
        """``count`` signed requests (timed 0..count-1), a fresh snapshot every 200."""
        self.index.clear()
        items: list[Item] = []
        for i in range(count):
            request = _request(offset + i)
            self.index[request["client_order_id"]] = i
            items.append((self.topic["orders.requests"], self.encode_request(request),
                          request["symbol"], i))
            if (offset + i) % 200 == 199:  # the book moves: fresh liquidity now and then
                symbol = request["symbol"]
                items.append((self.topic["md.l2"],
                               self.encode_snapshot(_snapshot(symbol)), symbol, None))
        return items

    def terminal(self, msg: Message) -> int | None:
        value = self.decode(msg.value())
        if value.get("kind", "FILLED") not in TERMINAL:  # the relay's copies have no kind
            return None
        return self.index.get(value["client_order_id"])

    def measure(self, command: list[str], n: int, log_path: Path,
                ) -> tuple[list[float], float]:
        """Start ``command`` (a group over this namespace); latencies in ms of ``n`` paced
        requests, then the throughput of a burst of ``n``."""
        producer = Producer(client_config(self.bootstrap, **{"enable.idempotence": True,
                                                            "linger.ms": 0}))
        for symbol in SYMBOLS:
            producer.produce(self.topic["md.l2"],
                             self.encode_snapshot(_snapshot(symbol)), symbol)
        producer.flush(30)
        with open(log_path, "w") as log:
            group = subprocess.Popen([sys.executable, *command], cwd=REPO_ROOT, stdout=log,
                                     stderr=subprocess.STDOUT)
            try:
                events = _reader(self.bootstrap, self.topic["orders.events"])
                _paced(producer, events, self.requests(WARM_UP, 0), RATE, self.terminal)
                sent, done = _paced(producer, events, self.requests(n, WARM_UP), RATE,
                                    self.terminal)
                latencies = [(done[i] - sent[i]) * 1000 for i in done]
                sent, done = _paced(producer, events, self.requests(n, WARM_UP + n), None,
                                    self.terminal)
                rate = n / (max(done.values()) - min(sent.values()))
                events.close()
            finally:
                group.send_signal(signal.SIGTERM)
                try:
                    group.wait(60)
                except subprocess.TimeoutExpired:
                    group.kill()
        return latencies, rate


def _kafka_alone(bootstrap: str, n: int) -> tuple[list[float], float]:
    """Round trip of a small record (produce -> read_committed consume), and a burst."""
    namespace = Namespace(f"sim-benchrt{int(time.time())}")
    ensure_topics(bootstrap, namespace, ["raw.frames"])
    topic = namespace.topic("raw.frames")
    producer = Producer(client_config(bootstrap, **{"enable.idempotence": True, "linger.ms": 0}))
    consumer = _reader(bootstrap, topic)

    def small(count: int) -> list[Item]:
        return [(topic, i.to_bytes(4, "big") + b"\x00" * 60, "BTCUSD", i) for i in range(count)]

    def numbered(msg: Message) -> int:
        return int.from_bytes(msg.value()[:4], "big")

    try:
        _paced(producer, consumer, small(WARM_UP), RATE, numbered)
        sent, done = _paced(producer, consumer, small(min(n, 5000)), RATE, numbered)
        latencies = [(done[i] - sent[i]) * 1000 for i in done]
        sent, done = _paced(producer, consumer, small(n), None, numbered)
        return latencies, n / (max(done.values()) - min(sent.values()))
    finally:
        consumer.close()


def run(bootstrap: str, registry_url: str, events: int) -> list[Figure]:
    n = min(events, MAX_REQUESTS)
    work = Path(tempfile.mkdtemp(prefix="bench-exec-"))
    base_ms, base_rate = _kafka_alone(bootstrap, n)

    relay = _Setup(bootstrap, registry_url, "relay")
    relay_ms, relay_rate = relay.measure(
        ["-m", "bench.execution", "relay", "--bootstrap", bootstrap, "--registry", registry_url,
         "--namespace", relay.namespace.name], n, work / "relay.log")

    keys = work / "keys.json"
    keys.write_text(json.dumps({"bench": KEY.decode()}))
    keys.chmod(0o600)
    execution = _Setup(bootstrap, registry_url, "exec")
    exec_ms, exec_rate = execution.measure(
        ["-m", "consumers.execution", "--bootstrap", bootstrap, "--registry", registry_url,
         "--namespace", execution.namespace.name, "--mode", "paper", "--strategy-keys",
         str(keys), "--run-dir", str(work / "run"), "--max-notional", "off",
         "--max-position", "off", "--max-orders-per-minute", "off", "--max-book-age-s", "off"],
        n, work / "execution.log")

    us = 1000.0
    b50, b99 = _percentile(base_ms, 0.5) * us, _percentile(base_ms, 0.99) * us
    base = "Kafka alone: produce -> read_committed consume, small record"
    figures = []
    for label, values in (("execution paper: request in Kafka -> order event committed",
                           exec_ms),
                          ("transactional relay (exactly-once floor), same path", relay_ms)):
        figures.append(Figure(f"{label}, p50", _percentile(values, 0.5) * us, "µs", n,
                              f"{base}, p50", b50, ""))
        figures.append(Figure(f"{label}, p99", _percentile(values, 0.99) * us, "µs", n,
                              f"{base}, p99", b99,
                              "p99 < 20,000 µs and < 1.5x the relay's"
                              if label.startswith("execution") else ""))
    figures.append(Figure("execution paper throughput (burst, to terminal event)", exec_rate,
                          "requests/s", n, "transactional relay, same burst", relay_rate, ""))
    figures.append(Figure("transactional relay throughput (burst)", relay_rate, "requests/s", n,
                          "Kafka alone: produce -> consume of small records", base_rate, ""))
    return figures


# --------------------------------------------------------------------------- the relay


class Relay(Handler):
    """Exactly-once floor: each request copied twice to orders.events and once to
    orders.seen, keyed by its client_order_id (execution's partitions per transaction)."""

    def __init__(self, namespace: Namespace, decode: Decoder) -> None:
        self.requests = namespace.topic("orders.requests")
        self.events = namespace.topic("orders.events")
        self.seen = namespace.topic("orders.seen")
        self.decode = decode

    def handle(self, record: Record):
        if record.topic != self.requests:
            return ()
        cid = self.decode(record.value)["client_order_id"]
        return (Output(self.events, record.value, cid), Output(self.events, record.value, cid),
                Output(self.seen, record.value, cid))


def relay_main(argv: list[str]) -> int:
    args = endpoints_parser("python -m bench.execution relay").parse_args(argv)
    namespace = Namespace(args.namespace)
    decoder = Decoder(SchemaRegistry(args.registry))
    group_id = f"{namespace}.relay"
    config = GroupConfig(  # execution's runtime settings (see consumers.execution.group_config)
        group_id=group_id, topics=[namespace.topic("orders.requests"), namespace.topic("md.l2"),
                                   namespace.topic("md.trades")],
        dead_letter_topic=namespace.topic("dlq"), handler=lambda: Relay(namespace, decoder),
        batch_size=500, transactional_id=f"{group_id}-0",
        consumer_overrides={"group.instance.id": f"{group_id}-0", "fetch.wait.max.ms": 50},
        producer_overrides={"linger.ms": 0, "transaction.timeout.ms": 30000})
    run_until_stopped(config, args.bootstrap)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["relay"]:
        sys.exit("usage: python -m bench.execution relay --bootstrap B --registry R --namespace NS")
    sys.exit(relay_main(sys.argv[2:]))
