"""One trading core: the order-book backtest and paper execution fill alike, and the simulator
agrees with the local venue (the independent oracle) where their models meet. Pure logic: no
broker: the tests that need Kafka (those that do not: tests/unit/trading/test_paper_trading.py)."""

from __future__ import annotations

import json  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from decimal import Decimal
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pipeline.avro.registry import SchemaRegistry  # noqa: E402
from pipeline.avro.serde import Decoder  # noqa: E402
from pipeline.backtest.config import BacktestConfig  # noqa: E402
from pipeline.backtest.run import run_backtest  # noqa: E402
from pipeline.core.cluster import Cluster  # noqa: E402
from pipeline.kafka.catalog import Namespace  # noqa: E402
from pipeline.ops.services import free_port  # noqa: E402
from tests.support.kafka_io import read_all  # noqa: E402
from tests.support.processes import CAPTURE, CAPTURE_SYMBOLS, cli  # noqa: E402
from tests.support.waiting import wait_for  # noqa: E402
from tests.unit.trading.test_paper_trading import values  # noqa: F401 - shared with the unit tests

QUOTER = {"symbol": "FILUSD", "tick": "0.0001", "spread_bps": 10, "requote_bps": 5}


PARITY_TOPOLOGY = """
namespace = "{namespace}"
symbols = {symbols}
[source]
kind = "venue"
capture = "{capture}"
speed = 1.0
loop = false
port = {venue_port}
heartbeat_s = 1.0
[infra]
metrics_port = {metrics_port}
web_port = 0

[[process]]
name = "orderbook"
run = "consumers.orderbook"
args = {{ depth = 10 }}

[[process]]
name = "strategy"
run = "consumers.strategy"
args = {{ strategy = "pipeline.strategy:MidQuoter", params = {params}, inputs = "book.snapshots" }}

[[process]]
name = "execution"
run = "consumers.execution"
args = {{ mode = "paper" }}

[[process]]
name = "portfolio"
run = "consumers.portfolio"
args = {{ capital = "100000", max_mark_age_s = "off", pnl_interval = 1 }}
"""


def fills_of(events: list[dict]) -> list[tuple]:
    return [(e["client_order_id"], e["side"], e["last_fill_price"], e["last_fill_amount"],
             e["liquidity"], e["last_fill_fee"])
            for e in events if e["last_fill_amount"] and not e["client_order_id"].startswith(
                "finalize")]


@pytest.mark.broker
def test_the_topology_on_the_capture_and_the_backtest_of_it_place_and_fill_the_same_orders(
        kafka, registry, up_env, shared_data, tmp_path):
    """The whole topology replays the capture at recorded speed with MidQuoter in paper
    mode; a book backtest of what it recorded gives the same client order ids and the same
    fills. Then the kill switch leaves no order open."""
    namespace = Namespace(f"sim-t{uuid.uuid4().hex[:10]}")
    venue_port = free_port()
    path = tmp_path / "topology.toml"
    params = "{ " + ", ".join(f'{k} = {json.dumps(v)}' for k, v in QUOTER.items()) + " }"
    path.write_text(PARITY_TOPOLOGY.format(
        namespace=namespace, symbols=json.dumps(CAPTURE_SYMBOLS), capture=shared_data / CAPTURE,
        venue_port=venue_port, metrics_port=free_port(), params=params))
    started = cli("up", "--topology", str(path), env=up_env)
    assert started.returncode == 0, started.stderr + started.stdout
    import requests as http
    wait_for(lambda: http.get(f"http://127.0.0.1:{venue_port}/_venue/status",
                              timeout=5).json()["source_done"], 90,
             "the venue to replay the capture")
    decode = Decoder(SchemaRegistry(registry.url))
    events_topic = namespace.topic("orders.events")

    def settled():  # every order request decided, then nothing new for 3 s
        placed = {r["client_order_id"] for r in values(kafka, decode,
                                                       namespace.topic("orders.requests"))
                  if r["action"] in ("NEW", "REPLACE")}
        events = values(kafka, decode, events_topic)
        if not events or placed - {e["client_order_id"] for e in events}:
            return None
        time.sleep(3)
        return len(events) == len(read_all(kafka, events_topic)) and len(events)

    wait_for(settled, 60, "order events to settle")
    live = values(kafka, decode, events_topic)
    requests = values(kafka, decode, namespace.topic("orders.requests"))
    backtest = run_backtest(BacktestConfig("pipeline.strategy:MidQuoter", namespace, QUOTER,
                                           fill="book", cash="100000", finalize_trades=False),
                            Cluster(kafka, registry.url))
    replayed = backtest.engine.order_events
    # Same orders: the orders live execution accepted are the ones the backtest placed.
    backtest_orders = [e["client_order_id"] for e in replayed if e["kind"] == "ACCEPTED"] + \
        [e["request_id"] for e in replayed if e["kind"] == "CANCEL_REJECTED" and
         e.get("request_id")]
    print(f"live: {len(requests)} requests, {len(fills_of(live))} fills; backtest: "
          f"{len(set(backtest_orders))} orders, {len(fills_of(replayed))} fills")
    placed = [r["client_order_id"] for r in requests if r["action"] in ("NEW", "REPLACE")]
    accepted_live = [e["client_order_id"] for e in live if e["kind"] == "ACCEPTED"]
    assert len(placed) >= 10 and set(accepted_live) <= set(placed)
    only_live = set(accepted_live) - set(backtest_orders)
    only_backtest = set(backtest_orders) - set(accepted_live)
    print("only live:", [(r["trigger"], r["action"], r["side"], r["price"]) for r in requests
                         if r["client_order_id"] in only_live])
    print("only backtest:", [(e["kind"], e["side"], e["price"], e["event_ms"]) for e in replayed
                             if e["client_order_id"] in only_backtest])
    print("their live events:", [(e["client_order_id"][-6:], e["kind"], e["reason"])
                                 for e in live if e["client_order_id"] in only_backtest])
    # One race is physical, not a difference of the models: the backtest's strategy reaches
    # the exchange at once, the live one a group hop (tens of ms) later. When a trade fills
    # a quote inside that hop, live refuses its replace (replace:order_closed) where the
    # backtest replaced it; the live quote's fill then stands for the replacement's.
    raced = {cid for cid in only_backtest
             if [e["reason"] for e in live if e["client_order_id"] == cid] ==
             ["replace:order_closed"]}
    targets = {r["target_client_order_id"] for r in requests if r["client_order_id"] in raced}
    filled_live = {e["client_order_id"] for e in live if e["kind"] == "FILLED"}
    assert not only_live and only_backtest == raced and targets <= filled_live, \
        "the same orders reach the exchange"
    print(f"{len(raced)} replace(s) raced by a fill inside the strategy -> execution hop")
    # Same fills: price, amount, liquidity and fee of each, order by order.
    assert len(fills_of(live)) >= 3
    assert sorted(f for f in fills_of(live) if f[0] not in targets) == \
        sorted(f for f in fills_of(replayed) if f[0] not in raced | targets)
    # The portfolio group's position and PnL equal a fold of orders.events done here:
    # position = signed fills, cash = capital - fills' notional - fees, marked at the mid
    # of each symbol's last snapshot.
    position, cash, fees = Decimal(0), Decimal(100000), Decimal(0)
    for event in live:
        if event["last_fill_amount"]:
            signed = Decimal(event["last_fill_amount"]) * (1 if event["side"] == "buy" else -1)
            position += signed
            cash -= signed * Decimal(event["last_fill_price"]) + Decimal(event["last_fill_fee"])
            fees += Decimal(event["last_fill_fee"])
    book = [b for b in values(kafka, decode, namespace.topic("book.snapshots"))
            if b["symbol"] == "FILUSD"][-1]
    mark = (Decimal(book["bids"][0]["price"]) + Decimal(book["asks"][0]["price"])) / 2

    def portfolio_caught_up():
        mine = [r for r in values(kafka, decode, namespace.topic("portfolio.pnl"))
                if r["strategy_id"] == "mid-quoter" and r["trigger"] == "timer"]
        return mine and mine[-1]["fills"] == len(fills_of(live)) and mine[-1]

    last = wait_for(portfolio_caught_up, 30, "the portfolio to count every fill")
    assert Decimal(last["equity"]) == cash + position * mark
    assert Decimal(last["fees"]) == fees and not last["stale"]
    held = [p for p in values(kafka, decode, namespace.topic("portfolio.positions"))
            if p["symbol"] == "FILUSD"][-1]
    assert Decimal(held["quantity"]) == position
    shown = cli("portfolio", "--namespace", str(namespace), env=up_env)
    assert shown.returncode == 0, shown.stderr
    assert "mid-quoter" in shown.stdout and held["quantity"] in shown.stdout
    print(shown.stdout)
    # Never more than one bid and one ask open: a replacement opens only once the order it
    # replaces is closed (at the same millisecond at most).
    spans: dict[str, list] = {}
    for event in live:
        if event["kind"] == "ACCEPTED":
            spans[event["client_order_id"]] = [event["side"], event["event_ms"], 1 << 62]
        elif event["kind"] in ("FILLED", "CANCELLED", "EXPIRED") and \
                event["client_order_id"] in spans:
            spans[event["client_order_id"]][2] = event["event_ms"]
    opened = sorted(spans.values(), key=lambda s: (s[0], s[1]))
    for (side_a, _, closed_a), (side_b, opened_b, _) in zip(opened, opened[1:]):
        assert side_a != side_b or closed_a <= opened_b, "two quotes open on one side"
    # The kill switch: every open order cancelled within a batch, none left open.
    run_dir = Path(up_env["PIPELINE_RUN_DIR"])
    (run_dir / "kill-switch").touch()

    def no_open_orders():
        open_ = set()
        for event in values(kafka, decode, events_topic):
            if event["kind"] in ("ACCEPTED", "BOOKED", "PARTIALLY_FILLED"):
                open_.add(event["client_order_id"])
            elif event["kind"] in ("FILLED", "CANCELLED", "EXPIRED", "REJECTED"):
                open_.discard(event["client_order_id"])
        return not open_

    wait_for(no_open_orders, 10, "the kill switch to cancel every open order")
    killed = [e for e in values(kafka, decode, events_topic) if e["reason"] == "risk:kill_switch"]
    assert killed and all(e["kind"] == "CANCELLED" for e in killed)


