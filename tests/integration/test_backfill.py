"""Backfill from Gemini's public history, end to end: the local venue over real sockets,
a real broker and registry, `pipeline load gemini trades|candles` in-process and as a
command."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Decoder
from pipeline.core.errors import PipelineError
from pipeline.gemini.history import Since
from pipeline.gemini.public_rest import PublicClient
from pipeline.kafka.catalog import Namespace, ensure_topics
from pipeline.kafka.clients import ReliableProducer
from pipeline.ops.settings import REPO_ROOT
from pipeline.runtime.runner import read_to_end
from pipeline.venue.server import RunningVenue, VenueConfig
from producers.gemini_history import backfill_candles, backfill_trades
from tests.support.processes import PIPELINE, cli, cluster_env

END_MS = 1_750_000_000_000  # the venue's history ends here (2025-06-15 15:06:40 UTC)
DEPTH = 1200
SIDES = {"buy": "BUY", "sell": "SELL"}


@pytest.fixture(scope="module")
def venue():
    running = RunningVenue(VenueConfig(symbols=["BTCUSD", "ETHUSD"], history_trades=DEPTH,
                                       history_end_ms=END_MS))
    try:
        yield running
    finally:
        running.stop()


def history(venue, symbol: str = "BTCUSD"):
    return venue.venue.public_history.history.trades(symbol)


def topic_records(kafka: str, registry, topic: str) -> list[tuple[int, bytes, dict]]:
    """(partition, key, value) of every record, in offset order per partition."""
    decode = Decoder(SchemaRegistry(registry.url))
    return [(m.partition(), m.key(), decode(m.value())) for m in read_to_end(kafka, topic)]


def assert_trades_equal(records, expected, symbol="BTCUSD"):
    values = [v for _, key, v in records if key == symbol.encode()]
    assert [v["trade_id"] for v in values] == [t.tid for t in expected]
    assert [(v["price"], v["quantity"], v["taker_side"], v["exchange_ts_ms"]) for v in values] \
        == [(t.price, t.amount, SIDES[t.side], t.timestamp_ms) for t in expected]
    assert all(v["symbol"] == symbol and v["connection_id"].startswith("rest-backfill-")
               and not v["from_snapshot"] and v["exchange_ts_ns"] is None for v in values)


def fresh_rate(venue) -> None:
    """Forget what earlier tests spent of the venue's public rate."""
    venue.venue.public_history.gate._state.clear()


def test_a_backfill_is_the_venues_history_trade_for_trade(venue, kafka, registry, namespace):
    fresh_rate(venue)
    before = len(venue.venue.public_history.log)
    report = backfill_trades(venue.http_url, kafka, registry.url, namespace, "btcusd")
    expected = history(venue)
    assert (report.loaded, report.already, report.complete) == (DEPTH, 0, True)
    assert report.pages == DEPTH // 500 + 1 and report.rate_limited == 0
    assert (report.first_tid, report.last_tid) == (expected[0].tid, expected[-1].tid)
    records = topic_records(kafka, registry, namespace.topic("md.trades"))
    assert len(records) == DEPTH
    assert_trades_equal(records, expected)
    # one partition, the one a live trade of BTCUSD lands in: same key, same producer
    probe_ns = Namespace(f"sim-p{uuid.uuid4().hex[:8]}")
    ensure_topics(kafka, probe_ns, ["md.trades"])
    probe = ReliableProducer(kafka)
    probe.produce(probe_ns.topic("md.trades"), b"probe", key="BTCUSD")
    probe.flush()
    live_partition = next(read_to_end(kafka, probe_ns.topic("md.trades"))).partition()
    assert {p for p, _, _ in records} == {live_partition}
    # pages of the run share its connection id and count up as its sequence
    values = [v for _, _, v in records]
    assert len({v["connection_id"] for v in values}) == 1
    assert [v["sequence"] for v in values] == sorted(v["sequence"] for v in values)
    assert {v["sequence"] for v in values} == {0, 1, 2}
    # within Gemini's public rate, never refused
    log = venue.venue.public_history.log[before:]
    assert len(log) == report.requests == report.pages
    assert all(entry["status"] == 200 for entry in log)
    assert venue.venue.public_history.max_per_minute() <= 120


def test_a_run_stopped_halfway_resumes_and_loads_each_trade_once(venue, kafka, registry,
                                                                 namespace):
    fresh_rate(venue)
    expected = history(venue)
    start = expected[100]
    since = Since(ms=start.timestamp_ms)
    wanted = [t for t in expected if t.timestamp_ms >= start.timestamp_ms]
    first = backfill_trades(venue.http_url, kafka, registry.url, namespace, "BTCUSD", since,
                            limit=200, max_pages=2)
    assert (first.loaded, first.complete, first.resumed_from) == (400, False, None)
    assert_trades_equal(topic_records(kafka, registry, namespace.topic("md.trades")),
                        wanted[:400])
    second = backfill_trades(venue.http_url, kafka, registry.url, namespace, "BTCUSD", since,
                             limit=200)
    assert second.resumed_from == wanted[399].tid and second.complete
    assert second.loaded == len(wanted) - 400 and second.first_tid == wanted[400].tid
    assert_trades_equal(topic_records(kafka, registry, namespace.topic("md.trades")), wanted)
    # a third run, as the command: nothing new, and it says so
    env = cluster_env(kafka, registry.url)
    again = cli("load", "gemini", "trades", "--symbol", "BTCUSD", "--since",
                f"tid:{start.tid}", "-n", str(namespace), "--rest-url", venue.http_url, env=env)
    assert again.returncode == 0, again.stderr
    assert f"0 trades loaded: {namespace}.md.trades already has every BTCUSD trade" in again.stdout
    assert f"up to tid {wanted[-1].tid}" in again.stdout
    assert len(topic_records(kafka, registry, namespace.topic("md.trades"))) == len(wanted)


def test_a_command_killed_mid_run_then_run_again_loads_every_trade_once(venue, kafka, registry,
                                                                       namespace):
    """`kill -9` of `pipeline load gemini trades` between or inside pages (50 trades a
    page at one request a second, after a burst of five): the next run finishes the job."""
    fresh_rate(venue)
    expected = history(venue)[DEPTH - 500:]
    args = [PIPELINE, "load", "gemini", "trades", "--symbol", "BTCUSD", "--since",
            f"tid:{history(venue)[DEPTH - 501].tid}", "-n", str(namespace), "--rest-url",
            venue.http_url, "--limit-trades", "50"]
    env = cluster_env(kafka, registry.url)
    proc = subprocess.Popen(args, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    topic = namespace.topic("md.trades")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            if len(topic_records(kafka, registry, topic)) >= 250:
                break
        except Exception:  # noqa: BLE001 - the topic may not exist yet
            continue
    assert proc.poll() is None, "the backfill ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    partial = topic_records(kafka, registry, topic)
    assert 250 <= len(partial) < 500
    assert_trades_equal(partial, expected[:len(partial)])  # a prefix, nothing doubled
    done = cli(*args[1:], env=env)
    assert done.returncode == 0, done.stderr
    assert f"{500 - len(partial)} BTCUSD trades loaded" in done.stdout
    assert_trades_equal(topic_records(kafka, registry, topic), expected)


def test_the_command_loads_a_symbol_next_to_another(venue, kafka, registry, namespace):
    fresh_rate(venue)
    backfill_trades(venue.http_url, kafka, registry.url, namespace, "BTCUSD", limit=500)
    env = cluster_env(kafka, registry.url, GEMINI_REST_URL=venue.http_url)  # the settings' URL
    done = cli("load", "gemini", "trades", "--symbol", "ETHUSD", "-n", str(namespace), env=env)
    assert done.returncode == 0, done.stderr
    assert f"{DEPTH} ETHUSD trades loaded into {namespace}.md.trades" in done.stdout
    records = topic_records(kafka, registry, namespace.topic("md.trades"))
    assert_trades_equal(records, history(venue, "ETHUSD"), "ETHUSD")
    assert_trades_equal(records, history(venue, "BTCUSD"), "BTCUSD")


class CrowdedClient(PublicClient):
    """A backfill's client whose address another client floods (twelve requests at once)
    just before the backfill's first request."""

    def __init__(self, base_url: str, pool: ThreadPoolExecutor, **kwargs) -> None:
        super().__init__(base_url, **kwargs)
        self.pool, self.burst = pool, []

    def get(self, path, params):
        if not self.burst:
            url = f"{self.base_url}/v1/trades/BTCUSD?limit_trades=1"
            self.burst = [self.pool.submit(requests.get, url, timeout=30) for _ in range(12)]
            time.sleep(0.3)  # the burst has reached the venue
        return super().get(path, params)


def test_a_429_is_backed_off_and_the_load_completes(venue, kafka, registry, namespace):
    """The venue serves two of the burst, queues five and refuses the rest with 429
    RateLimit, the backfill's first request too; the backfill waits, asks again, and every
    trade still lands once."""
    fresh_rate(venue)
    before = len(venue.venue.public_history.log)
    with ThreadPoolExecutor(12) as pool:
        client = CrowdedClient(venue.http_url, pool, backoff_s=0.5)
        report = backfill_trades(venue.http_url, kafka, registry.url, namespace, "BTCUSD",
                                 Since(tid=history(venue)[DEPTH - 600].tid), limit=50,
                                 client=client)
        statuses = sorted(f.result().status_code for f in client.burst)
    assert statuses == [200] * 7 + [429] * 5  # two served, five queued, the rest refused
    log = venue.venue.public_history.log[before:]
    refused = [e for e in log if e["status"] == 429]
    assert all(e["reason"] == "RateLimit" for e in refused)
    assert report.rate_limited >= 1 and len(refused) == 5 + report.rate_limited
    assert report.requests == len(log) - 12 == report.pages + report.rate_limited
    assert report.loaded == 599 and report.complete
    assert_trades_equal(topic_records(kafka, registry, namespace.topic("md.trades")),
                        history(venue)[DEPTH - 599:])


def test_unknown_symbol_and_since_past_history_write_nothing(venue, kafka, registry, namespace):
    fresh_rate(venue)
    with pytest.raises(PipelineError, match="unknown symbol FOOUSD: .* answered InvalidSymbol"):
        backfill_trades(venue.http_url, kafka, registry.url, namespace, "FOOUSD")
    env = cluster_env(kafka, registry.url)
    unknown = cli("load", "gemini", "trades", "--symbol", "FOOUSD", "-n", str(namespace),
                  "--rest-url", venue.http_url, env=env)
    assert unknown.returncode == 1
    assert unknown.stderr.strip().splitlines() == [
        f"error: unknown symbol FOOUSD: {venue.http_url} answered InvalidSymbol; nothing was "
        "written"]
    late = cli("load", "gemini", "trades", "--symbol", "BTCUSD", "--since",
               "2025-06-16T00:00:00Z", "-n", str(namespace), "--rest-url", venue.http_url,
               env=env)
    assert late.returncode == 0, late.stderr
    assert late.stdout.strip() == ("nothing to load: Gemini has no BTCUSD trades after "
                                   "2025-06-16 00:00:00 UTC; nothing was written")
    candles = cli("load", "gemini", "candles", "--symbol", "FOOUSD", "-n", str(namespace),
                  "--rest-url", venue.http_url, env=env)
    assert candles.returncode == 1 and "unknown symbol FOOUSD" in candles.stderr
    live = cli("load", "gemini", "trades", "--symbol", "BTCUSD", "-n", "live",
               "--rest-url", venue.http_url, env=env)
    assert live.returncode == 1 and "not live data" in live.stderr
    assert topic_records(kafka, registry, namespace.topic("md.trades")) == []


def test_candles_are_the_venues_and_a_second_load_writes_none(venue, kafka, registry,
                                                              namespace):
    fresh_rate(venue)
    candles = venue.venue.public_history.history.candles("BTCUSD", "1hr")
    report = backfill_candles(venue.http_url, kafka, registry.url, namespace, "BTCUSD", "1h")
    assert (report.candles, report.published, report.already) == (len(candles), len(candles), 0)
    bars = [v for _, key, v in topic_records(kafka, registry, namespace.topic("bars"))]
    assert [(b["start_ms"], b["open"], b["high"], b["low"], b["close"], b["volume"])
            for b in bars] == list(reversed(candles))  # oldest first, the exact text
    assert all(b["interval"] == "1h" and b["end_ms"] == b["start_ms"] + 3_600_000
               and b["symbol"] == "BTCUSD" for b in bars)
    env = cluster_env(kafka, registry.url)
    again = cli("load", "gemini", "candles", "--symbol", "BTCUSD", "--interval", "1hr",
                "-n", str(namespace), "--rest-url", venue.http_url, env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == (f"0 1h BTCUSD bars published to {namespace}.bars from "
                                    f"{len(candles)} 1hr candles, {len(candles)} already there")
    assert len(topic_records(kafka, registry, namespace.topic("bars"))) == len(candles)
