"""Order requests, book snapshots and execution groups for tests.

Requests are signed with ``pipeline.trading.signing`` exactly as the strategy group signs them and
encoded with the real serde; the execution group runs in a thread (``GroupThread``) or as
a real process (``ExecutionProcess``), against the real broker and the local venue.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from pipeline.avro.serde import Decoder, Encoder
from pipeline.ops.settings import REPO_ROOT
from pipeline.runtime.runner import GroupConfig, GroupRunner
from pipeline.trading.signing import client_order_id, sign
from tests.support.kafka_io import read_all

_triggers = itertools.count(1)


def order_request(key: bytes, *, strategy_id: str = "sma", symbol: str = "BTCUSD",
                  side: str = "BUY", order_type: str = "LIMIT", price: str | None = "34000.00",
                  amount: str = "0.01", options: list[str] | None = None,
                  created_ms: int | None = None, ttl_ms: int = 600_000,
                  trigger: str | None = None) -> dict:
    """A request signed with ``key``, with a fresh deterministic client_order_id."""
    now = created_ms if created_ms is not None else int(time.time() * 1000)
    trigger = trigger or f"test/{os.getpid()}/{next(_triggers)}/{time.monotonic_ns()}"
    request = {"client_order_id": client_order_id(strategy_id, trigger), "strategy_id": strategy_id,
               "symbol": symbol, "side": side, "order_type": order_type,
               "price": None if order_type == "MARKET" else price, "amount": amount,
               "options": list(options or []), "created_ms": now, "expires_ms": now + ttl_ms,
               "trigger": trigger}
    request["signature"] = sign(request, key)
    return request


def book_snapshot(symbol: str, bids: list[tuple[str, str]], asks: list[tuple[str, str]],
                  published_ms: int | None = None) -> dict:
    published_us = (published_ms if published_ms is not None else int(time.time() * 1000)) * 1000
    return {"symbol": symbol, "depth": max(len(bids), len(asks)),
            "bids": [{"price": p, "quantity": q} for p, q in bids],
            "asks": [{"price": p, "quantity": q} for p, q in asks],
            "exchange_ts_ms": None, "received_ts_us": published_us,
            "published_ts_us": published_us, "source_partition": 0, "source_offset": 0,
            "connection_id": "test", "sequence": 0}


def produce(bootstrap: str, encoder: Encoder, values: list[dict], key_field: str = "symbol",
            producer: Producer | None = None) -> None:
    """Encode and produce ``values`` keyed by ``key_field``, in order; wait for every ack."""
    producer = producer or Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                                     "linger.ms": 0})
    for value in values:
        producer.produce(encoder.topic, key=value[key_field], value=encoder(value))
    assert producer.flush(30) == 0


class Tail:
    """Follows a topic from its beginning (read_committed) and keeps what it read."""

    def __init__(self, bootstrap: str, topic: str, decoder: Decoder) -> None:
        self.decoder = decoder
        self.values: list[dict] = []
        self.consumer = Consumer({"bootstrap.servers": bootstrap,
                                  "group.id": f"tail-{uuid.uuid4()}",
                                  "enable.auto.commit": False, "isolation.level": "read_committed",
                                  "fetch.wait.max.ms": 50})
        meta = self.consumer.list_topics(topic, timeout=10).topics[topic]
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])

    def poll(self, timeout: float = 0.2) -> list[dict]:
        for msg in self.consumer.consume(1000, timeout):
            if msg.error() is None:
                self.values.append(self.decoder(msg.value()))
        return self.values

    def wait(self, predicate, timeout: float = 30, what: str = "records"):
        """Poll until ``predicate(values)`` is truthy; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = predicate(self.poll())
            if result:
                return result
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                             f"have {len(self.values)} record(s)")

    def to_end(self, timeout: float = 30) -> list[dict]:
        """Everything committed so far (up to the end offsets as of the call)."""
        parts = self.consumer.assignment()
        ends = {tp.partition: self.consumer.get_watermark_offsets(tp, timeout=10)[1]
                for tp in parts}
        deadline = time.monotonic() + timeout
        while True:
            self.poll(0.05)
            positions = {tp.partition: tp.offset for tp in self.consumer.position(parts)}
            if all(end == 0 or positions[p] >= end for p, end in ends.items()):
                return self.values
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read to the end: {positions} < {ends}")

    def close(self) -> None:
        self.consumer.close()


def read_values(bootstrap: str, topic: str, decoder: Decoder, expect: int | None = None,
                timeout: float = 30) -> list[dict]:
    return [decoder(r.value) for r in read_all(bootstrap, topic, expect=expect, timeout=timeout)]


def by_id(events: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for event in events:
        out.setdefault(event["client_order_id"], []).append(event)
    return out


def kinds(events: list[dict]) -> dict[str, list[str]]:
    return {cid: [e["kind"] for e in evs] for cid, evs in by_id(events).items()}


def venue_book(venue, symbol: str = "BTCUSD", depth: int = 10):
    """The running venue's current book (read on its own loop, so never mid-update)."""

    async def levels():
        market = venue.venue.market
        return ([(format(p, "f"), format(q, "f")) for p, q in market.levels(symbol, "bid")[:depth]],
                [(format(p, "f"), format(q, "f")) for p, q in market.levels(symbol, "ask")[:depth]])

    return asyncio.run_coroutine_threadsafe(levels(), venue.loop).result(10)


def new_orders(venue, outcome: str | None = "accepted") -> list[dict]:
    """The venue's log of ``/v1/order/new`` requests (with ``outcome``, None: all)."""
    return [e for e in list(venue.venue.rest_log) if e["path"] == "/v1/order/new"
            and (outcome is None or e["outcome"] == outcome)]


def exchange_orders_per_id(venue) -> Counter:
    """How many orders the venue's exchange holds per client_order_id."""

    async def count():
        return Counter(o.client_order_id for o in venue.venue.exchange._orders.values())

    return asyncio.run_coroutine_threadsafe(count(), venue.loop).result(10)


class GroupThread:
    """One in-process instance of a group, running until ``stop()``."""

    def __init__(self, config: GroupConfig, bootstrap: str) -> None:
        self.runner = GroupRunner(config, bootstrap)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=config.group_id, daemon=True)
        self.thread.start()

    @property
    def handler(self):
        return self.runner._handler

    def _run(self) -> None:
        try:
            self.runner.run()
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def stop(self, timeout: float = 30) -> None:
        self.runner.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the group did not stop"
        if self.error is not None:
            raise self.error

    def __enter__(self) -> "GroupThread":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ExecutionProcess:
    """``python -m consumers.execution ...`` as a real process, its log in a file."""

    def __init__(self, args: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.log = log_dir / f"execution-{time.monotonic_ns()}.log"
        self._log_file = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "consumers.execution", *args],
                                     cwd=REPO_ROOT, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, env={**os.environ, **env})

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log_file.close()

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log_file.close()

    def ensure_dead(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log_file.close()

    def log_text(self) -> str:
        return self.log.read_text()


def write_secret_file(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    path.chmod(0o600)
    return path


def decimal_sum(values) -> Decimal:
    return sum((Decimal(v) for v in values), Decimal(0))


class FaultyProxy:
    """An HTTP proxy in front of the venue that loses chosen ``/v1/order/new`` calls:
    ``faults`` is a list consumed in order, one entry per order call: "response" forwards
    the call but answers only after the client gave up, "request" never forwards it, None
    passes it through. Every other call passes through. Real sockets, real timeouts."""

    def __init__(self, target: str, faults: list[str | None], hold_s: float = 2.0) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                headers = {k: v for k, v in self.headers.items() if k.lower().startswith("x-gemini")
                           or k.lower() in ("content-type", "content-length", "cache-control")}
                fault = proxy.faults.pop(0) if self.path == "/v1/order/new" and proxy.faults \
                    else None
                proxy.seen.append((self.path, fault))
                if fault == "request":
                    time.sleep(proxy.hold_s)
                    return self._answer(504, b'{"result":"error","reason":"Lost"}')
                answer = requests.post(target + self.path, headers=headers, timeout=10)
                if fault == "response":
                    time.sleep(proxy.hold_s)
                self._answer(answer.status_code, answer.content)

            def _answer(self, status: int, body: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up long ago

            def log_message(self, *args) -> None:
                pass

        self.faults, self.hold_s = list(faults), hold_s
        self.seen: list[tuple[str, str | None]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
