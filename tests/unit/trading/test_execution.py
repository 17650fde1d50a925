"""The execution group against the real broker and registry, and the local venue over
real sockets for sandbox mode (no mocks of HTTP or Kafka).

The tests that need Kafka: tests/integration/test_execution.py."""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path

import pytest
from confluent_kafka import Producer

from consumers.execution import ExecutionSettings, check_mode, group_config, main
from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Serde
from pipeline.core.errors import PipelineError
from pipeline.gemini.execution import GeminiCredentials, GeminiSettings
from pipeline.gemini.ratelimit import TokenBucket
from pipeline.kafka.catalog import Namespace
from pipeline.trading import risk
from pipeline.trading.risk import BookTop, RiskLimits, RiskState
from pipeline.trading.signing import StrategyKeys
from pipeline.venue.server import RunningVenue, VenueConfig
from tests.support.orders import (
    GroupThread,
    Tail,
    book_snapshot,
    by_id,
    produce,
    venue_book,
    write_secret_file,
)
from tests.support.waiting import wait_for

D = Decimal


SMA_KEY = b"sma-signing-key-0123456789abcdef"


MOMO_KEY = b"momo-signing-key-fedcba9876543210"


API_KEY, API_SECRET = "account-exec", "exec-api-secret-5f4e3d2c1b0a"


TERMINAL = ("FILLED", "CANCELLED", "REJECTED")


LOOSE = RiskLimits(max_notional=None, max_position=None, max_orders_per_minute=None,
                   price_band_bps=D(500))


BIDS = [("33990.00", "1"), ("33980.00", "2")]


ASKS = [("34010.00", "0.5"), ("34020.00", "0.5"), ("34050.00", "5")]  # mid 34000


class Env:
    """The test's topics, serde, keys and a way to start execution groups."""

    def __init__(self, kafka: str, registry_url: str, namespace: Namespace, run_dir: Path) -> None:
        self.kafka, self.registry_url, self.namespace, self.run_dir = \
            kafka, registry_url, namespace, run_dir
        self.serde = Serde(SchemaRegistry(registry_url))
        self.decoder = self.serde.decoder()
        self.keys = StrategyKeys({"sma": SMA_KEY, "momo": MOMO_KEY})
        self.topic = {n: namespace.topic(n) for n in ("orders.requests", "book.snapshots",
                                                      "md.l2", "md.trades", "orders.events",
                                                      "orders.seen", "paper.state", "dlq")}
        self._tail: Tail | None = None
        self._seen: Tail | None = None
        self.producer = Producer({"bootstrap.servers": kafka, "enable.idempotence": True,
                                  "linger.ms": 0})
        for name in ("orders.requests", "book.snapshots", "md.l2", "md.trades", "orders.events",
                     "orders.seen", "paper.state"):
            self.serde.encoder(self.topic[name])  # registers: the decoder then needs no lookups

    def settings(self, **kw) -> ExecutionSettings:
        kw.setdefault("risk", LOOSE)
        kw.setdefault("run_dir", self.run_dir)
        return ExecutionSettings(**kw)

    def group(self, settings: ExecutionSettings, credentials=None, **kw) -> GroupThread:
        config = group_config(self.kafka, self.registry_url, self.namespace, settings,
                            keys=self.keys, credentials=credentials, **kw)
        return GroupThread(config, self.kafka)

    def requests(self, *requests: dict) -> list[dict]:
        produce(self.kafka, self.serde.encoder(self.topic["orders.requests"]), list(requests),
                producer=self.producer)
        return list(requests)

    def snapshot(self, bids=BIDS, asks=ASKS, symbol: str = "BTCUSD", **kw) -> None:
        """The book as the orderbook group publishes it (sandbox/live risk) and as the
        feed's snapshot record (paper's books)."""
        snap = book_snapshot(symbol, bids, asks, **kw)
        produce(self.kafka, self.serde.encoder(self.topic["book.snapshots"]), [snap],
                producer=self.producer)
        self.l2(symbol, [("BID", p, q) for p, q in bids] + [("ASK", p, q) for p, q in asks],
                snapshot=True, received_us=snap["received_ts_us"])

    def l2(self, symbol: str, changes: list[tuple[str, str, str]], snapshot: bool = False,
           received_us: int | None = None) -> None:
        produce(self.kafka, self.serde.encoder(self.topic["md.l2"]), [{
            "symbol": symbol, "snapshot": snapshot,
            "changes": [{"side": s, "price": p, "quantity": q} for s, p, q in changes],
            "exchange_ts_ms": None, "received_ts_us": received_us or time.time_ns() // 1000,
            "connection_id": "test", "sequence": 0, "event_id": None}], producer=self.producer)

    def trade(self, symbol: str, taker: str, price: str, quantity: str) -> None:
        now = time.time_ns()
        produce(self.kafka, self.serde.encoder(self.topic["md.trades"]), [{
            "symbol": symbol, "trade_id": now, "price": price, "quantity": quantity,
            "taker_side": taker, "exchange_ts_ms": now // 1_000_000,
            "received_ts_us": now // 1000, "connection_id": "test", "sequence": 0,
            "from_snapshot": False}], producer=self.producer)

    @property
    def tail(self) -> Tail:
        if self._tail is None:
            self._tail = Tail(self.kafka, self.topic["orders.events"], self.decoder)
        return self._tail

    def events(self) -> list[dict]:
        """The committed order events so far."""
        return list(self.tail.poll(0.1))

    def wait_events(self, count: int, timeout: float = 30) -> list[dict]:
        return self.tail.wait(lambda values: len(values) >= count and list(values), timeout,
                              f"{count} order events")

    def wait_terminal(self, ids, timeout: float = 30) -> dict[str, list[dict]]:
        """Events per id once every id in ``ids`` has a terminal event."""
        ids = set(ids)

        def done(values):
            events = by_id(values)
            if all(any(e["kind"] in TERMINAL for e in events.get(i, [])) for i in ids):
                return events
        return self.tail.wait(done, timeout, f"a terminal event for each of {len(ids)} request(s)")

    def close(self) -> None:
        for tail in (self._tail, self._seen):
            if tail is not None:
                tail.close()
        self.producer.flush(10)
        self.producer = None

    def seen(self) -> dict[str, str]:
        """The latest outcome per id in orders.seen (committed)."""
        if self._seen is None:
            self._seen = Tail(self.kafka, self.topic["orders.seen"], self.decoder)
        return {v["client_order_id"]: v["outcome"] for v in self._seen.to_end()}


@pytest.fixture
def env(kafka, registry, namespace, topics, tmp_path) -> Env:
    topics("orders.requests", "book.snapshots", "md.l2", "md.trades", "orders.events",
           "orders.seen", "paper.state", "dlq")
    env = Env(kafka, registry.url, namespace, tmp_path / "run")
    yield env
    env.close()


@pytest.fixture
def venue():
    running = RunningVenue(VenueConfig(symbols=["BTCUSD"], rate=2, start_on_subscribe=False,
                                       api_keys={API_KEY: API_SECRET}))
    wait_for(lambda: venue_book(running)[1], 10, "the venue's first book")
    yield running
    running.stop()


@pytest.fixture
def credentials() -> GeminiCredentials:
    return GeminiCredentials(API_KEY, API_SECRET)


def sandbox(env: Env, venue, **kw) -> ExecutionSettings:
    # The venue serves 10 calls a second per key, as Gemini does; the start-up key check
    # has tests of its own, so the call logs here hold only the orders' calls.
    gemini = {"rate_per_s": 10.0, "burst": 10, "check_key": False, "transport": "rest",
              **{k: kw.pop(k) for k in ("follow_interval_s", "timeout_s", "check_key",
                                        "transport") if k in kw}}
    kw["gemini"] = GeminiSettings(**gemini)
    kw.setdefault("venue_url", venue.http_url)
    return env.settings(mode="sandbox", **kw)


def outcome(events: list[tuple]) -> str:
    """"ok" for an order that went through, else its rejection reason."""
    kind, reason = events[-1]
    return reason if kind == "REJECTED" else "ok"


def replace_limits(**kw) -> RiskLimits:
    base = dict(max_notional=None, max_position=None, max_orders_per_minute=None,
                price_band_bps=D(500), max_book_age_ms=60_000)
    return RiskLimits(**{**base, **kw})


def test_live_mode_needs_the_flag_keys_and_a_live_namespace(tmp_path):
    creds = GeminiCredentials("k", "s", nonce="time")
    live = ExecutionSettings(mode="live", live_confirmed=True)
    check_mode(Namespace("live"), live, creds)  # all three: allowed
    # Orders over the WebSocket API (the default) need a key with a time-based nonce.
    with pytest.raises(PipelineError, match="time-based nonce.*--gemini-transport rest"):
        check_mode(Namespace("live"), live, GeminiCredentials("k", "s"))
    check_mode(Namespace("live"), ExecutionSettings(
        mode="live", live_confirmed=True, gemini=GeminiSettings(transport="rest")),
        GeminiCredentials("k", "s"))
    with pytest.raises(PipelineError, match="--live"):
        check_mode(Namespace("live"), ExecutionSettings(mode="live"), creds)
    with pytest.raises(PipelineError, match="refuses namespace sim-x"):
        check_mode(Namespace("sim-x"), live, creds)
    with pytest.raises(PipelineError, match="refuses namespace replay-x"):
        check_mode(Namespace("replay-x"), live, creds)
    with pytest.raises(PipelineError, match="API key and secret"):
        check_mode(Namespace("live"), live, None)
    with pytest.raises(PipelineError, match="API key and secret"):
        check_mode(Namespace("sim"), ExecutionSettings(mode="sandbox"), None)
    with pytest.raises(PipelineError, match="sandbox mode refuses namespace live"):
        check_mode(Namespace("live"), ExecutionSettings(mode="sandbox"), creds)
    # The command line refuses before touching Kafka (nothing listens on port 9).
    key_file = write_secret_file(tmp_path / "gemini.json", {"api_key": "k", "api_secret": "s"})
    common = ["--bootstrap", "127.0.0.1:9", "--registry", "http://127.0.0.1:9",
              "--api-key-file", str(key_file), "--run-dir", str(tmp_path)]
    assert main([*common, "--namespace", "sim", "--mode", "live", "--live"]) == 2
    assert main([*common, "--namespace", "live", "--mode", "live"]) == 2
    key_file.chmod(0o644)
    assert main([*common, "--namespace", "sim", "--mode", "sandbox"]) == 2  # readable by others


@pytest.mark.parametrize("load,what,content", [
    (GeminiCredentials.load, "API key file", {"api_key": "k", "api_secret": "s"}),
    (StrategyKeys.load, "key file", {"sma": "s"}),
])
def test_secret_files_others_can_read_or_that_are_not_json_are_refused(tmp_path, load, what,
                                                                      content):
    path = write_secret_file(tmp_path / "secret.json", content)
    assert load(path) is not None
    for mode in (0o640, 0o604):
        path.chmod(mode)
        with pytest.raises(PipelineError, match=rf"^{what} .* is readable by others \(mode "
                                                rf"0{mode:o}\): `chmod 600 "):
            load(path)
    path.write_text("{not json")
    path.chmod(0o600)
    with pytest.raises(PipelineError, match=rf"^{what} .* is not JSON: Expecting property name"):
        load(path)
    with pytest.raises(PipelineError, match=rf"^{what} .*missing.json cannot be read: No such"):
        load(tmp_path / "missing.json")


def test_the_gemini_secret_is_never_shown():
    creds = GeminiCredentials("account-1", "s3cr3t-value")
    assert "s3cr3t" not in repr(creds) and "s3cr3t" not in str(creds)
    assert "s3cr3t" not in repr(StrategyKeys({"sma": b"s3cr3t-value"}))


def test_token_bucket_allows_a_burst_then_the_rate():
    now = [0.0]
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(5, 5, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        bucket.take()
    assert slept == []
    for _ in range(10):
        bucket.take()
    assert now[0] == pytest.approx(2.0)  # 10 more at 5/s


def book(bids=BIDS, asks=ASKS, ts_ms=1_000_000) -> BookTop:
    return BookTop.from_snapshot(book_snapshot("BTCUSD", bids, asks, published_ms=ts_ms))


def decide(limits: RiskLimits, state: RiskState | None = None, top: BookTop | None = None,
           **kw):
    order = dict(strategy_id="sma", symbol="BTCUSD", side="buy", order_type="LIMIT",
                 price=D("34000"), amount=D("0.01"), now_ms=1_000_500)
    order.update(kw)
    return risk.check(limits, state or RiskState(), top if top is not None else book(), **order)


def test_risk_rules_one_by_one():
    assert decide(RiskLimits()).accepted
    assert decide(RiskLimits(), kill_switch=True).reason == "risk:kill_switch"
    assert risk.check(RiskLimits(), RiskState(), None, strategy_id="s", symbol="X", side="buy",
                      order_type="LIMIT", price=D(1), amount=D(1), now_ms=0).reason == \
        "risk:price_band"
    assert decide(RiskLimits(max_book_age_ms=100)).reason == "risk:price_band"
    assert decide(RiskLimits(), top=book(bids=[])).reason == "risk:price_band"  # one-sided
    assert decide(RiskLimits(max_notional=D(340)), price=D("34000"), amount=D("0.01")).accepted
    assert decide(RiskLimits(max_notional=D(339)), price=D("34000"),
                  amount=D("0.01")).reason == "risk:max_notional"
    state = RiskState()
    state.apply_fill("BTCUSD", "buy", D("0.5"))
    state.note_open("open-1", "BTCUSD", "buy", D("0.4"))
    limits = RiskLimits(max_position=D(1))
    assert decide(limits, state, amount=D("0.1")).accepted  # 0.5 + 0.4 open + 0.1
    assert decide(limits, state, amount=D("0.11")).reason == "risk:max_position"
    assert decide(replace_limits(max_position=D(1)), state, side="sell", price=D("34000"),
                  amount=D("1.5")).accepted
    assert decide(RiskLimits(max_position_by_symbol={"BTCUSD": D("0.05")}),
                  amount=D("0.06")).reason == "risk:max_position"
    state = RiskState()
    for at in (1_000_000, 1_000_100):
        state.note_accepted("sma", at)
    limits = RiskLimits(max_orders_per_minute=2)
    assert decide(limits, state).reason == "risk:rate_limit"
    assert decide(limits, state, strategy_id="other").accepted
    assert decide(limits, state, now_ms=1_060_001, top=book(ts_ms=1_060_000)).accepted
    for at in range(2_000_000, 2_600_000, 1000):  # ten minutes of orders, one a second
        state.note_accepted("sma", at)
    assert len(state.recent["sma"]) == 60  # the window keeps one minute, not the history


def test_market_orders_are_priced_at_the_band_edge_on_the_tick_grid():
    top = book(bids=[("100.01", "1")], asks=[("100.04", "1")])  # mid 100.025, tick 0.01
    limits = RiskLimits(price_band_bps=D(100))
    assert risk.band_edge(top, "buy", D(100)) == D("101.02")  # 101.02525 rounded down
    assert risk.band_edge(top, "sell", D(100)) == D("99.03")  # 99.02475 rounded up
    decision = risk.check(limits, RiskState(), top, strategy_id="s", symbol="BTCUSD",
                          side="buy", order_type="MARKET", price=None, amount=D(1),
                          now_ms=top.ts_ms)
    assert decision.accepted and decision.price == D("101.02")


