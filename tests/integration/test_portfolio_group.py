"""The portfolio group against the real broker and registry: a backtest's order events
replayed through it give the backtest's equity and realized PnL exactly; kill -9 mid-stream
counts no fill twice and misses none; bad fills go to the dead-letter topic."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from decimal import Decimal as D
from pathlib import Path

import pytest
from confluent_kafka import Producer

from consumers.portfolio import PortfolioSettings, group_config
from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Serde
from pipeline.backtest.engine import L2, TRADE, backtest_events, event_time_us
from pipeline.core.decimals import plain
from pipeline.kafka.deadletter import parse_dead_letter
from pipeline.ops.settings import REPO_ROOT
from pipeline.sinks.pnl import read_pnl
from pipeline.strategies.mid_quoter import MidQuoter
from pipeline.trading.portfolio import Portfolio, PortfolioConfig
from tests.support.kafka_io import committed, read_all
from tests.support.orders import GroupThread
from tests.support.waiting import wait_for

pytestmark = pytest.mark.broker

TOPICS = ("orders.events", "book.snapshots", "strategy.control", "portfolio.positions",
          "portfolio.pnl", "portfolio.reconciliation", "portfolio.state", "dlq")
T0 = 1_700_000_000_000


def snapshot(symbol: str, bid: str, ask: str, ms: int) -> dict:
    return {"symbol": symbol, "depth": 1, "bids": [{"price": bid, "quantity": "1"}],
            "asks": [{"price": ask, "quantity": "1"}], "exchange_ts_ms": None,
            "received_ts_us": ms * 1000, "published_ts_us": ms * 1000, "source_partition": 0,
            "source_offset": 0, "connection_id": "test", "sequence": 0}


def fill_event(cid: str, strategy: str, symbol: str, side: str, amount: str, price: str,
               fee: str, ms: int, total: str, filled: str, kind: str) -> dict:
    return {"client_order_id": cid, "strategy_id": strategy, "symbol": symbol, "kind": kind,
            "reason": None, "mode": "PAPER", "exchange_order_id": None, "side": side,
            "price": price, "amount": total, "filled_amount": filled, "avg_fill_price": price,
            "fee": fee, "fee_currency": "USD", "event_ms": ms, "last_fill_price": price,
            "last_fill_amount": amount, "liquidity": "MAKER", "last_fill_fee": fee,
            "request_id": None}


class Publisher:
    def __init__(self, kafka: str, registry_url: str, namespace) -> None:
        self.serde = Serde(SchemaRegistry(registry_url))
        self.namespace = namespace
        self.producer = Producer({"bootstrap.servers": kafka, "enable.idempotence": True,
                                  "linger.ms": 5})

    def send(self, name: str, values: list[dict], key: str, partition: int | None = None) -> None:
        """Produce in order; ``partition`` pins them (a strategy's fills in one partition
        keep their order, so FIFO lots are matched as they were made)."""
        topic = self.namespace.topic(name)
        encode = self.serde.encoder(topic)
        for value in values:
            extra = {} if partition is None else {"partition": partition}
            self.producer.produce(topic, key=value[key], value=encode(value), **extra)
        assert self.producer.flush(30) == 0


def capture_events(path: Path) -> list[tuple]:
    """The real capture as backtest events (md.l2 and md.trades), without Kafka."""
    from pipeline.gemini.capture import received_frames
    from pipeline.gemini.marketdata import V2Normalizer

    normalizer, offsets, events = V2Normalizer("c"), {"md.l2": 0, "md.trades": 0}, []
    for frame in received_frames(path):
        for record in normalizer.normalize_text(frame.text, frame.received_us):
            kind = L2 if record.topic == "md.l2" else TRADE
            offset = offsets[record.topic]
            offsets[record.topic] += 1
            events.append((event_time_us(kind, record.value), f"sim.{record.topic}", 0, offset,
                           kind, record.value))
    return events


def settings(tmp_path: Path, **config) -> PortfolioSettings:
    config.setdefault("max_mark_age_ms", None)
    config.setdefault("pnl_interval_ms", 10**9)
    return PortfolioSettings(PortfolioConfig(**config), run_dir=tmp_path / "run",
                             flush_interval_s=0.2)


def drained(kafka: str, group_id: str, topic: str, ends: dict[int, int]) -> bool:
    got = committed(kafka, group_id, topic)
    return all(got.get(p, 0) >= end for p, end in ends.items() if end)


def ends_of(kafka: str, topic: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for record in read_all(kafka, topic):
        out[record.partition] = max(out.get(record.partition, 0), record.offset + 1)
    return out


def test_a_backtests_order_events_through_the_group_give_its_equity_and_realized_pnl(
        kafka, registry, namespace, topics, shared_data, tmp_path):
    """Two book backtests of MidQuoter over the real capture (each its own strategy id);
    their order events, replayed through the live group, give each backtest's final
    equity and realized PnL exactly, and its position."""
    topics(*TOPICS)
    events = capture_events(shared_data / "gemini_v2_l2_capture_2021-06-24.txt")
    results = {}
    for strategy_id, symbol, tick in (("mq-grt", "GRTUSD", "0.00001"),
                                      ("mq-fil", "FILUSD", "0.0001")):
        quoter = MidQuoter(symbol=symbol, tick=tick, spread_bps=2, requote_bps=2,
                           strategy_id=strategy_id)
        results[strategy_id] = backtest_events(quoter, events, fill="book", cash="100000",
                                               finalize_trades=False)
    fills = {s: [e for e in r.order_events if e["last_fill_amount"] is not None]
             for s, r in results.items()}
    assert {e["side"] for e in fills["mq-grt"]} == {"buy", "sell"}  # a lot is closed
    assert sum(map(len, fills.values())) >= 6
    publish = Publisher(kafka, registry.url, namespace)
    # The marks the backtests' final equity used, as book snapshots (mid = the mark).
    marks = {s: m for r in results.values() for s, m in r.final_marks.items()}
    publish.send("book.snapshots", [snapshot(s, plain(m), plain(m), T0)
                                    for s, m in sorted(marks.items())], "symbol")
    group_id = f"{namespace}.portfolio"
    config = group_config(kafka, registry.url, namespace, settings(
        tmp_path, default_capital=D("100000")))
    with GroupThread(config, kafka):
        wait_for(lambda: drained(kafka, group_id, namespace.topic("book.snapshots"),
                                 ends_of(kafka, namespace.topic("book.snapshots"))), 60,
                 "the marks")
        for partition, result in enumerate(results.values()):
            publish.send("orders.events", result.order_events, "client_order_id",
                         partition=partition)
        ends = {p: len(r.order_events) for p, r in enumerate(results.values())}
        wait_for(lambda: drained(kafka, group_id, namespace.topic("orders.events"), ends), 60,
                 "the order events")
    decode = publish.serde.decoder()
    pnl = [decode(r.value) for r in read_all(kafka, namespace.topic("portfolio.pnl"))]
    positions = {(p["strategy_id"], p["symbol"]): p for p in
                 (decode(r.value) for r in read_all(kafka, namespace.topic("portfolio.positions")))}
    letters = read_all(kafka, namespace.topic("dlq"))
    assert not letters, [parse_dead_letter(r.key, None, list(r.headers)) for r in letters[:3]]
    for strategy_id, result in results.items():
        mine = [r for r in pnl if r["strategy_id"] == strategy_id]
        assert [r["seq"] for r in mine] == list(range(1, len(fills[strategy_id]) + 1))
        last = mine[-1]
        assert D(last["equity"]) == result.final_equity
        assert D(last["realized_pnl"]) == sum(result.realized.values())
        assert last["fills"] == len(fills[strategy_id])
        symbol = fills[strategy_id][0]["symbol"]
        held = sum((lot.size for lot in result.open_lots), D(0))
        assert D(positions[(strategy_id, symbol)]["quantity"]) == held
        print(f"{strategy_id}: {len(fills[strategy_id])} fills; equity {last['equity']} = "
              f"{result.final_equity}, realized {last['realized_pnl']}")


def stream(seed: int = 3) -> dict[str, list[dict]]:
    """Per strategy, orders filled in one to three parts, both sides, two symbols."""
    rng = random.Random(seed)
    out: dict[str, list[dict]] = {"s1": [], "s2": []}
    ms = T0
    for n in range(1600):
        strategy = "s1" if n % 2 else "s2"
        symbol = rng.choice(["BTCUSD", "ETHUSD"])
        side = rng.choice(["buy", "sell"])
        base = 30000 if symbol == "BTCUSD" else 2000
        price = str(base + rng.randint(-50, 50))
        parts = [str(D(rng.randint(1, 40)) / 1000) for _ in range(rng.randint(1, 3))]
        total = sum(D(p) for p in parts)
        filled = D(0)
        for k, part in enumerate(parts):
            ms += 1
            filled += D(part)
            fee = plain(D(part) * D(price) * D("0.002"))
            kind = "FILLED" if k == len(parts) - 1 else "PARTIALLY_FILLED"
            out[strategy].append(fill_event(f"{strategy}-{n}", strategy, symbol, side, part,
                                            price, fee, ms, plain(total), plain(filled), kind))
    return out


def expected_after(events: dict[str, list[dict]], marks: dict[str, D]) -> dict[str, dict]:
    """An uninterrupted fold: the pure portfolio over each strategy's events in order."""
    portfolio = Portfolio(PortfolioConfig(default_capital=D(10**6), max_mark_age_ms=None))
    for symbol, mark in marks.items():
        portfolio.on_book(snapshot(symbol, plain(mark), plain(mark), T0))
    for strategy_events in events.values():
        for event in strategy_events:
            portfolio.on_event(event, event["event_ms"])
    return {s: portfolio.valuation(s, T0) for s in events}


class PortfolioProcess:
    def __init__(self, kafka: str, registry_url: str, namespace, run_dir: Path) -> None:
        self.log = run_dir / f"portfolio-{time.monotonic_ns()}.log"
        run_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "consumers.portfolio", "--bootstrap", kafka, "--registry",
             registry_url, "--namespace", str(namespace), "--capital", "1000000",
             "--symbols", "BTCUSD,ETHUSD", "--max-mark-age-s", "off", "--pnl-interval", "1",
             "--run-dir", str(run_dir)], cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(60) == 0, self.log.read_text()[-3000:]
        self._log.close()


def test_kill_9_mid_stream_counts_no_fill_twice_and_bad_fills_go_to_the_dlq(
        kafka, registry, namespace, topics, tmp_path):
    topics(*TOPICS)
    publish = Publisher(kafka, registry.url, namespace)
    marks = {"BTCUSD": D("30010"), "ETHUSD": D("1995.5")}
    publish.send("book.snapshots", [snapshot(s, plain(m - 1), plain(m + 1), T0)
                                    for s, m in marks.items()], "symbol")
    events = stream()
    bad = [fill_event("bad-1", "s1", "DOGEUSD", "buy", "1", "0.1", "0", T0, "1", "1", "FILLED"),
           fill_event("bad-2", "s1", "BTCUSD", "buy", "-1", "30000", "0", T0, "1", "1",
                      "FILLED")]
    publish.send("orders.events", bad, "client_order_id", partition=2)
    publish.send("orders.events", events["s1"], "client_order_id", partition=0)
    publish.send("orders.events", events["s2"], "client_order_id", partition=1)
    ends = {0: len(events["s1"]), 1: len(events["s2"]), 2: 2}
    group_id, topic = f"{namespace}.portfolio", namespace.topic("orders.events")
    run_dir = tmp_path / "run"
    first = PortfolioProcess(kafka, registry.url, namespace, run_dir)
    try:
        def done() -> int:
            return sum(max(v, 0) for v in committed(kafka, group_id, topic).values())
        wait_for(lambda: done() > 0, 60, "a first commit")
        done_before_kill = done()  # (after the kill, the open transaction blocks this)
        first.kill()
    finally:
        if first.proc.poll() is None:
            first.kill()
    assert done_before_kill < sum(ends.values()), "killed too late to test anything"
    second = PortfolioProcess(kafka, registry.url, namespace, run_dir)
    try:
        wait_for(lambda: drained(kafka, group_id, topic, ends), 90, "the rest of the fills")
        time.sleep(1.5)  # one periodic record at the final marks
        second.stop()
    finally:
        if second.proc.poll() is None:
            second.kill()
    decode = publish.serde.decoder()
    pnl = [decode(r.value) for r in read_all(kafka, namespace.topic("portfolio.pnl"))]
    want = expected_after(events, marks)
    for strategy in ("s1", "s2"):
        mine = [r for r in pnl if r["strategy_id"] == strategy]
        fill_records = [r for r in mine if r["trigger"] == "fill"]
        # one record per fill: none counted twice, none missed; seq without a gap
        assert len(fill_records) == len(events[strategy])
        assert [r["seq"] for r in mine] == list(range(1, len(mine) + 1))
        last = mine[-1]
        assert last["fills"] == len(events[strategy])
        assert D(last["realized_pnl"]) == want[strategy].realized
        assert D(last["fees"]) == want[strategy].fees
        assert D(last["equity"]) == want[strategy].equity
    # the Parquet copy: every record once
    parquet = read_pnl(run_dir / "parquet" / str(namespace) / "portfolio.pnl")
    assert sorted(zip(parquet["strategy"], parquet["seq"])) == \
        sorted((r["strategy_id"], r["seq"]) for r in pnl)
    # bad fills: in the dead-letter topic with their offsets, no position of theirs
    letters = [parse_dead_letter(r.key, r.value, list(r.headers))
               for r in read_all(kafka, namespace.topic("dlq"))]
    assert sorted((d.source_topic, d.source_partition, d.source_offset) for d in letters) == \
        [(topic, 2, 0), (topic, 2, 1)]
    assert "unknown symbol 'DOGEUSD'" in letters[0].error_message
    positions = {(decode(r.value)["strategy_id"], decode(r.value)["symbol"])
                 for r in read_all(kafka, namespace.topic("portfolio.positions"))}
    assert ("s1", "DOGEUSD") not in positions
