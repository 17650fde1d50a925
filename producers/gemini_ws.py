"""The Gemini WebSocket producer: market data frames into Kafka.

Three protocols:

- ``ws``, Gemini's new WebSocket API (the default): one connection to
  ``{ws base}/?snapshot=-1`` subscribing ``{symbol}@depth@100ms`` and ``{symbol}@trade`` for
  every symbol. An update-id gap (:class:`UpdateGap`) resnapshots only that symbol, on the
  same connection: UNSUBSCRIBE then SUBSCRIBE its depth stream, whose new initial book is
  the symbol's next ``L2Update``, flagged ``snapshot: true``; the other symbols go on.
  The API sends no heartbeats, so after half the heartbeat timeout of silence the feed
  sends a ``ping`` request; only a connection that does not even answer that times out.
- ``v2``, the archived ``/v2/marketdata``: one connection, the ``l2`` subscription.
- ``v1``, the archived ``/v1/marketdata/{symbol}``: one connection per symbol, opened
  ``v1_stagger_s`` apart (Gemini rate-limits new connections).

Every frame is kept on the raw topic; valid frames become ``L2Update``/``Trade`` records
keyed by symbol; frames that are not valid market data go to the dead-letter topic with
their text; valid frames carrying nothing kept are counted in ``FeedStats.skipped``. A
disconnect, a heartbeat timeout or a v1 ``socket_sequence`` gap ends the connection; the
producer reconnects with capped exponential backoff and jitter, and the new connection's
first book is flagged as a snapshot, so consumers reset rather than merge into a stale book.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import signal
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import websocket

from pipeline.avro.serde import Serde
from pipeline.gemini.marketdata import (
    FrameError,
    SequenceGap,
    UpdateGap,
    V1Normalizer,
    V2Normalizer,
    WsNormalizer,
)
from pipeline.gemini.ws_session import WS_LIVE as GEMINI_NEW_WS  # the new API
from pipeline.gemini.ws_session import WS_SANDBOX as SANDBOX_NEW_WS
from pipeline.kafka.catalog import Namespace
from pipeline.kafka.clients import ReliableProducer
from pipeline.kafka.deadletter import STAGE_INGEST, dead_letter_headers
from pipeline.runtime.metrics import (
    MetricsRegistry,
    MetricsWriter,
    metrics_path,
    process_metrics_path,
    report_totals,
)

log = logging.getLogger(__name__)

GEMINI_WS = "wss://api.gemini.com"  # v1 and v2
SANDBOX_WS = "wss://api.sandbox.gemini.com"
PROTOCOLS = ("ws", "v2", "v1")
Normalizer = WsNormalizer | V2Normalizer | V1Normalizer


def base_for(protocol: str, base_url: str) -> str:
    """The base URL a protocol connects to. Gemini serves the new API on its own host, so
    Gemini's v1/v2 host given for ``ws`` maps to it (and back); any other host (the local
    venue) serves all three."""
    base_url = base_url.rstrip("/")
    pairs = {GEMINI_WS: GEMINI_NEW_WS, SANDBOX_WS: SANDBOX_NEW_WS}
    if protocol == "ws":
        return pairs.get(base_url, base_url)
    return {new: old for old, new in pairs.items()}.get(base_url, base_url)


@dataclass
class FeedConfig:
    base_url: str = GEMINI_NEW_WS  # scheme://host[:port], the paths are Gemini's
    symbols: list[str] = field(default_factory=lambda: ["BTCUSD", "ETHUSD"])
    protocol: str = "ws"  # "ws" (new API), "v2" (one connection, l2), "v1" (one per symbol)
    heartbeat_timeout_s: float = 10.0  # v1/v2 heartbeats come every 5 s; ws: pinged
    connect_timeout_s: float = 10.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    progress_interval_s: float = 10.0
    v1_stagger_s: float = 0.5  # between opening v1's per-symbol connections


@dataclass
class FeedStats:
    frames: int = 0
    records: int = 0
    dead_letters: int = 0
    connections: int = 0
    reconnects: int = 0
    heartbeat_timeouts: int = 0
    sequence_gaps: int = 0
    update_gaps: int = 0  # ws: update-id gaps, each resnapshotting one symbol
    pings: int = 0  # ws: ping requests sent on quiet connections
    skipped: Counter = field(default_factory=Counter)  # valid frames not kept, by kind
    delivery_failures: int = 0
    last_message_at: float = 0.0
    last_error: str | None = None

    def report(self, metrics: MetricsRegistry) -> None:
        """The figures as the metrics interface's counters (a collector)."""
        report_totals(metrics, [(f"{name}_total", getattr(self, name)) for name in (
            "frames", "records", "dead_letters", "connections", "reconnects",
            "heartbeat_timeouts", "sequence_gaps", "update_gaps", "pings",
            "delivery_failures")])
        for kind, n in list(self.skipped.items()):
            metrics.set_total("skipped_total", n, kind=kind)

    def snapshot(self) -> dict:
        age = time.time() - self.last_message_at if self.last_message_at else None
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**values, "skipped": dict(self.skipped), "last_message_age_s": age}


class Disconnected(Exception):
    """The connection ended; the feed reconnects."""


class IngestSink:
    """Frames of any connection to Kafka records: raw frame, normalized records, dead letters."""

    def __init__(self, producer: ReliableProducer, serde: Serde, namespace: Namespace,
                 stats: FeedStats, owner: str = "producer:gemini") -> None:
        self.producer, self.stats, self.owner = producer, stats, owner
        self.topics = {name: namespace.topic(name)
                       for name in ("raw.frames", "md.l2", "md.trades", "dlq")}
        self.encode = {name: serde.encoder(self.topics[name])
                       for name in ("raw.frames", "md.l2", "md.trades")}

    def frame(self, text: str, received_us: int, normalizer: Normalizer,
              url: str, index: int) -> None:
        """Publish one received frame. Raises SequenceGap or UpdateGap (the caller
        resubscribes)."""
        self.stats.frames += 1
        self.stats.last_message_at = received_us / 1e6
        conn = normalizer.connection_id
        try:
            records = normalizer.normalize_text(text, received_us)
        except (SequenceGap, UpdateGap):
            self._raw(text, received_us, conn, url, index, conn)  # kept, then resubscribe
            raise
        except FrameError as exc:
            self.stats.dead_letters += 1
            self.stats.last_error = str(exc)
            log.warning("dead-lettering frame %d of %s: %s", index, conn, exc)
            self.producer.produce(self.topics["dlq"], text.encode(), conn, dead_letter_headers(
                source_topic=url, source_partition=-1, source_offset=index, owner=self.owner,
                stage=STAGE_INGEST, error=exc, original_headers=[("connection_id", conn.encode())]))
            records = []
        self._raw(text, received_us, conn, url, index, records[0].key if records else conn)
        for record in records:
            self.producer.produce(self.topics[record.topic],
                                  self.encode[record.topic](record.value),
                                  record.key, timestamp=received_us // 1000)
        self.stats.records += len(records)
        if self.stats.frames % 256 == 0:
            self.producer.poll(0)  # serve delivery reports; per frame would cost ~3 us

    def _raw(self, text: str, received_us: int, conn: str, url: str, index: int, key: str) -> None:
        self.producer.produce(self.topics["raw.frames"], self.encode["raw.frames"]({
            "url": url, "connection_id": conn, "sequence": index, "received_ts_us": received_us,
            "text": text}), key, timestamp=received_us // 1000)


class GeminiFeed:
    """Keeps one WebSocket connection alive and feeds its frames to the sink."""

    def __init__(self, config: FeedConfig, sink: IngestSink, symbol: str | None = None,
                 start_delay_s: float = 0.0) -> None:
        self.config, self.sink, self.symbol = config, sink, symbol
        self.start_delay_s = start_delay_s
        base = base_for(config.protocol, config.base_url)
        if config.protocol == "ws":
            self.url = f"{base}/?snapshot=-1"
        elif config.protocol == "v2":
            self.url = f"{base}/v2/marketdata"
        else:
            self.url = f"{base}/v1/marketdata/{symbol}?heartbeat=true"
        self._request_ids = itertools.count(1)

    def run(self, stop: threading.Event) -> None:
        stats, attempt = self.sink.stats, 0
        stop.wait(self.start_delay_s)
        while not stop.is_set():
            received_any = False
            try:
                received_any = self._session(stop)
            except (Disconnected, SequenceGap, OSError, websocket.WebSocketException) as exc:
                if stop.is_set():
                    break
                stats.reconnects += 1
                stats.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("%s: %s; reconnecting", self.url, stats.last_error)
                received_any = received_any or getattr(exc, "received_any", False)
            if received_any:
                attempt = 0  # a working connection resets the backoff
            delay = min(self.config.backoff_max_s, self.config.backoff_initial_s * 2 ** attempt)
            attempt += 1
            stop.wait(delay * random.uniform(0.5, 1.0))

    def _session(self, stop: threading.Event) -> bool:
        ws = websocket.create_connection(self.url, timeout=self.config.connect_timeout_s,
                                         enable_multithread=True)
        conn_id = uuid.uuid4().hex[:12]
        stats = self.sink.stats
        stats.connections += 1
        normalizer: Normalizer
        if self.config.protocol == "ws":
            normalizer = WsNormalizer(conn_id, stats.skipped)
            for symbol in self.config.symbols:
                normalizer.expect_snapshot(symbol)  # ?snapshot=-1: each one's first frame
            self._request(ws, "SUBSCRIBE", [stream for s in self.config.symbols
                                            for stream in _streams(s)])
        elif self.config.protocol == "v2":
            normalizer = V2Normalizer(conn_id, stats.skipped)
            ws.send(json.dumps({"type": "subscribe", "subscriptions": [
                {"name": "l2", "symbols": [s.upper() for s in self.config.symbols]}]}))
        else:
            normalizer = V1Normalizer(conn_id, self.symbol or "", stats.skipped)
        log.info("connected to %s (connection %s)", self.url, conn_id)
        ws.settimeout(0.25)  # short, so stop requests and heartbeat timeouts are noticed
        last, pinged, index = time.monotonic(), False, 0
        try:
            while not stop.is_set():
                try:
                    opcode, data = ws.recv_data()
                except websocket.WebSocketTimeoutException:
                    quiet = time.monotonic() - last
                    if (self.config.protocol == "ws" and not pinged
                            and quiet > self.config.heartbeat_timeout_s / 2):
                        self._request(ws, "ping")  # the new API sends no heartbeats
                        stats.pings += 1
                        pinged = True
                    if quiet > self.config.heartbeat_timeout_s:
                        self.sink.stats.heartbeat_timeouts += 1
                        raise _ended(Disconnected(f"no message for "
                                                  f"{self.config.heartbeat_timeout_s:g} s "
                                                  "(heartbeat timeout)"), index) from None
                    continue
                except (websocket.WebSocketConnectionClosedException, OSError) as exc:
                    raise _ended(Disconnected(f"connection lost: {exc}"), index) from exc
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    raise _ended(Disconnected("closed by the server"), index)
                if opcode not in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                    continue
                last, pinged = time.monotonic(), False
                text = data.decode("utf-8", errors="replace")
                try:
                    self.sink.frame(text, time.time_ns() // 1000, normalizer, self.url, index)
                except SequenceGap as gap:
                    stats.sequence_gaps += 1
                    raise _ended(gap, index + 1) from None  # the gap itself, marked
                except UpdateGap as gap:
                    stats.update_gaps += 1
                    stats.last_error = f"UpdateGap: {gap}"
                    log.warning("%s; resnapshotting %s", gap, gap.symbol)
                    depth = _streams(gap.symbol)[:1]
                    ended = self._request(ws, "UNSUBSCRIBE", depth)
                    self._request(ws, "SUBSCRIBE", depth)  # its initial book comes again
                    assert isinstance(normalizer, WsNormalizer)
                    normalizer.expect_snapshot(gap.symbol, after=ended)
                index += 1
        finally:
            ws.close(timeout=1)
        return index > 0

    def _request(self, ws: websocket.WebSocket, method: str, params: object = None) -> str:
        """Send a new-API request; its answer comes back as a frame like any other."""
        request: dict = {"id": str(next(self._request_ids)), "method": method}
        if params is not None:
            request["params"] = params
        ws.send(json.dumps(request))
        return request["id"]


def _streams(symbol: str) -> list[str]:
    """The new API's streams of one symbol: its book (first) and its trades."""
    return [f"{symbol.lower()}@depth@100ms", f"{symbol.lower()}@trade"]


def _ended(exc: Exception, frames: int) -> Exception:
    exc.received_any = frames > 0  # type: ignore[attr-defined]
    return exc


def run_producer(config: FeedConfig, bootstrap: str, serde: Serde, namespace: Namespace,
                 status_file: Path | None = None, stop: threading.Event | None = None) -> FeedStats:
    """Run the feeds until SIGTERM/SIGINT (or ``stop``), then flush everything produced."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    stats = FeedStats()
    metrics = MetricsRegistry()
    metrics.collect(stats.report)
    path = process_metrics_path() or (
        metrics_path(status_file.parent, "producer-gemini") if status_file is not None else None)
    metrics_out = MetricsWriter(metrics, path) if path is not None else None
    producer = ReliableProducer(bootstrap)
    sink = IngestSink(producer, serde, namespace, stats)
    feeds = ([GeminiFeed(config, sink)] if config.protocol != "v1"
             else [GeminiFeed(config, sink, s.upper(), start_delay_s=i * config.v1_stagger_s)
                   for i, s in enumerate(config.symbols)])
    threads = [threading.Thread(target=feed.run, args=(stop,), name=f"feed-{i}", daemon=True)
               for i, feed in enumerate(feeds)]
    for thread in threads:
        thread.start()
    last_frames, last_at = 0, time.monotonic()
    while not stop.wait(config.progress_interval_s):
        now = time.monotonic()
        stats.delivery_failures = producer.tracker.failed_total
        rate = (stats.frames - last_frames) / (now - last_at)
        last_frames, last_at = stats.frames, now
        report = stats.snapshot() | {"frames_per_s": rate}
        log.info("frames %d (%.0f/s), records %d, dead letters %d, reconnects %d, "
                 "update gaps %d, skipped %d, last message %.1fs ago, delivery failures %d",
                 stats.frames, rate, stats.records, stats.dead_letters, stats.reconnects,
                 stats.update_gaps, sum(stats.skipped.values()),
                 report["last_message_age_s"] or 0, stats.delivery_failures)
        if status_file is not None:
            status_file.parent.mkdir(parents=True, exist_ok=True)
            status_file.write_text(json.dumps(report))
        if metrics_out is not None:
            metrics_out.write()
    for thread in threads:
        thread.join(10)
    producer.flush()  # raises DeliveryFailed if anything was not acknowledged
    stats.delivery_failures = producer.tracker.failed_total
    if metrics_out is not None:
        metrics_out.write()
    log.info("producer stopped: %d frames, %d records, %d dead letters, %d update gaps, "
             "skipped %s", stats.frames, stats.records, stats.dead_letters, stats.update_gaps,
             dict(stats.skipped))
    return stats
