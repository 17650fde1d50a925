"""The execution group against the real broker and registry, and the local venue over real sockets
for sandbox mode (no mocks of HTTP or Kafka): the tests that need Kafka (those that do not:
tests/unit/trading/test_execution.py)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import time
from decimal import Decimal
from pathlib import Path

import pytest

from pipeline.core.rules import SymbolRules
from pipeline.gemini.rest import GeminiRestClient, NonceSource
from pipeline.gemini.symbols import load_rules
from pipeline.kafka.catalog import Namespace, ensure_topics
from pipeline.trading.risk import RiskLimits
from pipeline.trading.signing import sign
from tests.support.kafka_io import committed, read_all
from tests.support.orders import (
    ExecutionProcess,
    FaultyProxy,
    GroupThread,
    Tail,
    by_id,
    exchange_orders_per_id,
    kinds,
    new_orders,
    order_request,
    produce,
    venue_book,
    write_secret_file,
)
from tests.support.waiting import wait_for
from tests.unit.trading.test_execution import (  # noqa: F401 - shared with the unit tests
    API_KEY,
    API_SECRET,
    ASKS,
    BIDS,
    LOOSE,
    MOMO_KEY,
    SMA_KEY,
    TERMINAL,
    D,
    Env,
    credentials,
    env,
    outcome,
    replace_limits,
    sandbox,
    venue,
)


def publish_venue_book(env: Env, venue) -> tuple[Decimal, Decimal]:
    """Publish the venue's current book as a snapshot; returns (best bid, best ask)."""
    bids, asks = venue_book(venue)
    env.snapshot(bids, asks)
    return D(bids[0][0]), D(asks[0][0])


def test_signed_request_reaches_the_venue_and_fills(env, venue, credentials):
    _, ask = publish_venue_book(env, venue)
    buy = order_request(SMA_KEY, price=str(ask + 1), amount="0.001")
    sell = order_request(MOMO_KEY, strategy_id="momo", side="SELL", order_type="MARKET",
                         amount="0.002")
    env.requests(buy, sell)
    with env.group(sandbox(env, venue), credentials):
        events = env.wait_terminal([buy["client_order_id"], sell["client_order_id"]])
    assert kinds(events[buy["client_order_id"]]) == {buy["client_order_id"]: ["ACCEPTED", "FILLED"]}
    filled = events[buy["client_order_id"]][-1]
    assert filled["mode"] == "SANDBOX" and filled["filled_amount"] == "0.001"
    assert filled["exchange_order_id"] and D(filled["avg_fill_price"]) <= ask + 1
    sold = [e["kind"] for e in events[sell["client_order_id"]]]
    assert sold[0] == "ACCEPTED" and sold[-1] in ("FILLED", "CANCELLED")
    # The market sell went out as an immediate-or-cancel limit at the band's lower edge.
    assert D(events[sell["client_order_id"]][0]["price"]) < ask
    log = {e["client_order_id"]: e for e in new_orders(venue)}
    assert set(log) == {buy["client_order_id"], sell["client_order_id"]}
    assert all(e["api_key"] == API_KEY and e["status"] == 200 for e in log.values())
    assert env.seen() == {buy["client_order_id"]: "sent", sell["client_order_id"]: "sent"}


def test_forged_expired_and_replayed_requests_are_rejected_and_never_reach_the_venue(
        env, venue, credentials):
    _, ask = publish_venue_book(env, venue)
    price = str(ask + 1)
    good = order_request(SMA_KEY, price=price, amount="0.001")
    wrong_key = order_request(MOMO_KEY, price=price, amount="0.001")  # sma's id, momo's key
    tampered = order_request(SMA_KEY, price=price, amount="0.001")
    tampered["amount"] = "0.5"  # changed after signing
    expired = order_request(SMA_KEY, price=price, amount="0.001",
                            created_ms=int(time.time() * 1000) - 120_000, ttl_ms=60_000)
    unknown = order_request(b"whatever", strategy_id="nobody", price=price, amount="0.001")
    replay = dict(good)  # the very same signed request again
    env.requests(good, wrong_key, tampered, expired, unknown, replay)
    with env.group(sandbox(env, venue), credentials):
        events = env.wait_terminal([r["client_order_id"] for r in
                                    (good, wrong_key, tampered, expired, unknown)])
        env.wait_events(7)
    # A second replay after a restart: the seen ids come back from orders.seen.
    env.requests(dict(good))
    with env.group(sandbox(env, venue), credentials):
        env.wait_events(8)
    events = by_id(env.events())
    reasons = {cid: [(e["kind"], e["reason"]) for e in evs] for cid, evs in events.items()}
    assert reasons[good["client_order_id"]] == [("ACCEPTED", None), ("FILLED", None),
                                                ("REJECTED", "duplicate"),
                                                ("REJECTED", "duplicate")]
    assert reasons[wrong_key["client_order_id"]] == [("REJECTED", "bad_signature")]
    assert reasons[tampered["client_order_id"]] == [("REJECTED", "bad_signature")]
    assert reasons[expired["client_order_id"]] == [("REJECTED", "expired")]
    assert reasons[unknown["client_order_id"]] == [("REJECTED", "unknown_strategy")]
    # Only the good one ever reached the venue, once; nothing else was even attempted.
    sent = [e["client_order_id"] for e in venue.venue.rest_log]
    assert sent == [good["client_order_id"]]
    # Forged requests leave no trace in orders.seen (they cannot burn a real id).
    seen = env.seen()
    assert seen == {good["client_order_id"]: "sent", expired["client_order_id"]: "rejected:expired"}


def test_a_resting_order_is_followed_until_it_fills_also_across_a_restart(
        env, venue, credentials):
    bid, _ = publish_venue_book(env, venue)
    price = bid - D("5.00")  # below the best bid: it rests
    resting = order_request(SMA_KEY, price=str(price), amount="0.002")
    settings = sandbox(env, venue, follow_interval_s=0.2)
    env.requests(resting)
    cid = resting["client_order_id"]
    with env.group(settings, credentials):
        accepted = env.tail.wait(lambda values: [e for e in values if e["client_order_id"] == cid
                                                 and e["kind"] == "BOOKED"] and
                                 [e for e in values if e["client_order_id"] == cid],
                                 30, "ACCEPTED and BOOKED")
    assert [e["kind"] for e in accepted] == ["ACCEPTED", "BOOKED"]
    # committed with the ACCEPTED and BOOKED events, in the same transaction
    assert env.seen()[cid] == f"open:{accepted[0]['exchange_order_id']}"
    # While the group is down, the market comes to the order: it fills as a maker.
    move_venue_market(venue, [["sell", format(price, "f"), "1"]])
    with env.group(settings, credentials):  # restored from orders.seen + orders.events
        events = env.wait_terminal([cid])
    assert [(e["kind"], e["filled_amount"]) for e in events[cid]] == \
        [("ACCEPTED", "0"), ("BOOKED", "0"), ("FILLED", "0.002")]
    assert events[cid][-1]["avg_fill_price"] == format(price, "f")
    assert events[cid][-1]["last_fill_amount"] == "0.002"
    assert env.seen()[cid] == "sent"
    assert [e["path"] for e in venue.venue.rest_log if e["client_order_id"] == cid] == \
        ["/v1/order/new"]  # followed by order_id, never sent again


def move_venue_market(venue, changes: list[list[str]], symbol: str = "BTCUSD") -> None:
    """Apply book changes on the venue's loop and let its exchange fill what now crosses,
    as its market feed does."""
    from pipeline.venue.market import MarketEvent

    async def move():
        venue.venue.market.apply(MarketEvent(symbol, changes))
        return venue.venue.exchange.on_book_update(symbol)

    assert asyncio.run_coroutine_threadsafe(move(), venue.loop).result(10)


def process_args(env: Env, venue, keys_file: Path, *extra: str) -> list[str]:
    return ["--bootstrap", env.kafka, "--registry", env.registry_url, "--namespace",
            str(env.namespace), "--mode", "sandbox",
            "--venue-url", venue.http_url if venue else "http://127.0.0.1:9",
            "--strategy-keys", str(keys_file), "--run-dir", str(env.run_dir),
            "--gemini-transport", "rest",  # the WebSocket path: test_gemini_ws_orders.py
            "--gemini-rate", "10", "--gemini-burst", "10", "--max-notional", "off",
            "--max-position", "off", "--max-orders-per-minute", "off", "--price-band-bps", "500",
            "--max-book-age-s", "off", *extra]


def test_kill_9_at_random_points_gives_exactly_one_order_and_one_outcome_per_request(
        env, venue, tmp_path):
    seed = int(os.environ.get("EXECUTION_TEST_SEED") or random.randrange(10**6))
    rng = random.Random(seed)
    print(f"seed {seed} (EXECUTION_TEST_SEED={seed} repeats the kill points' choice)")
    bid, ask = publish_venue_book(env, venue)
    requests = [order_request(SMA_KEY, side=side, price=str(ask + 5 if side == "BUY" else bid - 5),
                              amount="0.0001", options=["immediate-or-cancel"])
                for side in ["BUY", "SELL"] * 100]
    ids = [r["client_order_id"] for r in requests]
    keys_file = write_secret_file(tmp_path / "strategy-keys.json", {"sma": SMA_KEY.decode()})
    secrets = {"GEMINI_API_KEY": API_KEY, "GEMINI_API_SECRET": API_SECRET}
    env.requests(*requests)
    processes = []
    try:
        for threshold in (rng.randint(5, 45), rng.randint(70, 110), rng.randint(135, 175)):
            proc = ExecutionProcess(process_args(env, venue, keys_file), tmp_path, secrets)
            processes.append(proc)
            wait_for(lambda: len(new_orders(venue, None)) >= threshold, 60,  # noqa: B023 - wait_for calls it at once
                     f"{threshold} orders at the venue", interval=0.002)
            time.sleep(rng.random() * 0.02)
            proc.kill()
        proc = ExecutionProcess(process_args(env, venue, keys_file), tmp_path, secrets)
        processes.append(proc)
        events = env.wait_terminal(ids, timeout=60)
        assert proc.terminate() == 0
    finally:
        for proc in processes:
            proc.ensure_dead()
    # Exactly one order per request reached the venue, and the exchange holds exactly one.
    accepted = [e["client_order_id"] for e in new_orders(venue)]
    assert sorted(accepted) == sorted(ids), "an order was sent twice or never"
    assert all(n == 1 for n in exchange_orders_per_id(venue).values())
    assert set(exchange_orders_per_id(venue)) == set(ids)
    # Exactly one ACCEPTED and one terminal event per request (read_committed).
    for cid in ids:
        got = [e["kind"] for e in events[cid]]
        assert got.count("ACCEPTED") == 1 and sum(k in TERMINAL for k in got) == 1, (cid, got)
        assert got[-1] in ("FILLED", "CANCELLED"), (cid, got)
    assert set(env.seen().values()) == {"sent"}
    reconciled = [e for e in venue.venue.rest_log if e["path"] == "/v1/order/status"]
    print(f"{len(reconciled)} order(s) were in doubt after a kill and reconciled by status")
    # Secrets never reach a log or a topic.
    for proc in processes:
        text = proc.log_text()
        assert API_SECRET not in text and SMA_KEY.decode() not in text
    for name in ("orders.events", "orders.seen", "dlq"):
        for record in read_all(env.kafka, env.topic[name]):
            assert API_SECRET.encode() not in record.value and SMA_KEY not in record.value


def test_an_intent_without_an_outcome_is_reconciled_by_status_before_anything_is_sent(
        env, venue, credentials):
    """The two windows a kill -9 can leave, set up exactly: an intent whose order never
    left (sent now, once) and an intent whose order the venue has (adopted, not resent)."""
    bid, ask = publish_venue_book(env, venue)
    lost = order_request(SMA_KEY, price=str(ask + 1), amount="0.001")
    placed = order_request(SMA_KEY, side="SELL", price=str(bid - 1), amount="0.001")
    intents = [{"client_order_id": r["client_order_id"], "strategy_id": "sma",
                "outcome": "sending", "seen_ms": int(time.time() * 1000)} for r in (lost, placed)]
    produce(env.kafka, env.serde.encoder(env.topic["orders.seen"]), intents, "client_order_id",
            producer=env.producer)
    predecessor = GeminiRestClient(venue.http_url, API_KEY, API_SECRET,
                                   NonceSource(env.settings().nonce_path))
    order_id = predecessor.new_order("BTCUSD", "0.001", str(bid - 1), "sell",
                                     client_order_id=placed["client_order_id"])["order_id"]
    predecessor.close()
    env.requests(lost, placed)
    with env.group(sandbox(env, venue), credentials):
        events = env.wait_terminal([lost["client_order_id"], placed["client_order_id"]])
    calls = [(e["path"], e["client_order_id"], e["outcome"]) for e in venue.venue.rest_log]
    assert calls == [
        ("/v1/order/new", placed["client_order_id"], "accepted"),  # the predecessor's
        # the group asks before it acts; "not found" is final: that call's nonce fences
        # any lost request with a smaller one
        ("/v1/order/status", lost["client_order_id"], "OrderNotFound"),
        ("/v1/order/new", lost["client_order_id"], "accepted"),
        ("/v1/order/status", placed["client_order_id"], "accepted"),  # found: adopted
    ]
    assert exchange_orders_per_id(venue) == {lost["client_order_id"]: 1,
                                             placed["client_order_id"]: 1}
    for request in (lost, placed):
        assert [e["kind"] for e in events[request["client_order_id"]]] == ["ACCEPTED", "FILLED"]
    assert events[placed["client_order_id"]][0]["exchange_order_id"] == str(order_id)
    assert env.seen() == {lost["client_order_id"]: "sent", placed["client_order_id"]: "sent"}


def test_a_timeout_is_settled_by_asking_for_the_status_never_by_resending(
        env, venue, credentials):
    """A lost response (the order is placed) is adopted; a lost request (nothing placed)
    is sent once more, after the status call has fenced it."""
    bid, ask = publish_venue_book(env, venue)
    lost_response = order_request(SMA_KEY, price=str(ask + 1), amount="0.001")
    lost_request = order_request(SMA_KEY, side="SELL", price=str(bid - 1), amount="0.001")
    proxy = FaultyProxy(venue.http_url, ["response", "request"], hold_s=1.5)
    try:
        env.requests(lost_response, lost_request)
        settings = sandbox(env, venue, venue_url=proxy.url, timeout_s=0.5)
        with env.group(settings, credentials) as group:
            events = env.wait_terminal([lost_response["client_order_id"],
                                        lost_request["client_order_id"]])
            assert group.handler.counts["in_doubt"] == 2
    finally:
        proxy.close()
    calls = [(e["path"], e["client_order_id"], e["outcome"]) for e in venue.venue.rest_log]
    assert calls == [
        ("/v1/order/new", lost_response["client_order_id"], "accepted"),  # answer lost
        ("/v1/order/status", lost_response["client_order_id"], "accepted"),  # found: adopted
        # the lost request never arrived; the status call's nonce fences it, then one resend
        ("/v1/order/status", lost_request["client_order_id"], "OrderNotFound"),
        ("/v1/order/new", lost_request["client_order_id"], "accepted"),
    ]
    assert exchange_orders_per_id(venue) == {lost_response["client_order_id"]: 1,
                                             lost_request["client_order_id"]: 1}
    for request in (lost_response, lost_request):
        assert [e["kind"] for e in events[request["client_order_id"]]] == ["ACCEPTED", "FILLED"]


def test_an_order_in_doubt_that_cannot_be_settled_stops_the_process_without_committing(
        env, tmp_path):
    env.snapshot()
    request = order_request(SMA_KEY, price="34050.00", amount="0.001")
    produce(env.kafka, env.serde.encoder(env.topic["orders.seen"]), [{
        "client_order_id": request["client_order_id"], "strategy_id": "sma",
        "outcome": "sending", "seen_ms": int(time.time() * 1000)}], "client_order_id",
        producer=env.producer)
    env.requests(request)
    keys_file = write_secret_file(tmp_path / "strategy-keys.json", {"sma": SMA_KEY.decode()})
    args = process_args(env, None, keys_file)
    # Nothing listens on port 9: the status cannot be had, so the order stays in doubt.
    args[args.index("--venue-url") + 1] = "http://127.0.0.1:9"
    rules = tmp_path / "rules.json"  # nor its symbol rules: they come from a file instead
    rules.write_text(json.dumps({"symbols": [
        SymbolRules("BTCUSD", D("0.01"), D("1E-8"), D("0.00001")).to_details()]}))
    args += ["--rules-file", str(rules)]
    proc = ExecutionProcess(args, tmp_path, {"GEMINI_API_KEY": API_KEY,
                                             "GEMINI_API_SECRET": API_SECRET})
    try:
        assert proc.proc.wait(60) == 3
    finally:
        proc.ensure_dead()
    assert "in doubt and its status cannot be had" in proc.log_text()
    # Neither dead-lettered nor committed: the next start reconciles it again.
    assert read_all(env.kafka, env.topic["dlq"]) == []
    assert env.events() == []
    assert set(committed(env.kafka, f"{env.namespace}.execution",
                         env.topic["orders.requests"]).values()) == {-1001}


def test_nonces_grow_across_restarts_and_a_refused_nonce_is_recovered_without_a_duplicate(
        env, venue, credentials):
    settings = sandbox(env, venue)
    nonce_file = settings.nonce_path
    nonce_file.parent.mkdir(parents=True)
    # Start far ahead of the clock, so the file (not the clock) decides every nonce.
    nonce_file.write_text(f"{time.time_ns() // 1000 + 3_600_000_000}\n")
    old_file = nonce_file.with_name("nonce-as-it-was")
    shutil.copy(nonce_file, old_file)
    _, ask = publish_venue_book(env, venue)
    price = str(ask + 1)

    def run(*requests):
        env.requests(*requests)
        with env.group(settings, credentials):
            env.wait_terminal([r["client_order_id"] for r in requests])

    run(order_request(SMA_KEY, price=price, amount="0.001"),
        order_request(SMA_KEY, price=price, amount="0.001"))
    before = [e["nonce"] for e in venue.venue.rest_log]
    assert len(before) == 2 and before[0] < before[1]
    after_restart = order_request(SMA_KEY, price=price, amount="0.001")
    run(after_restart)
    first_after = venue.venue.rest_log[2]
    assert first_after["client_order_id"] == after_restart["client_order_id"]
    assert first_after["nonce"] > max(before) and first_after["outcome"] == "accepted"

    shutil.copy(old_file, nonce_file)  # an old nonce file comes back (a restored backup)
    recovered = order_request(SMA_KEY, price=price, amount="0.001")
    run(recovered)
    mine = [(e["outcome"], e["nonce"]) for e in venue.venue.rest_log
            if e["client_order_id"] == recovered["client_order_id"]]
    assert [outcome for outcome, _ in mine] == ["InvalidNonce", "accepted"]
    assert mine[0][1] <= max(before) < mine[1][1]  # reused, then moved past the venue's last
    assert exchange_orders_per_id(venue)[recovered["client_order_id"]] == 1
    kinds_ = [e["kind"] for e in by_id(env.events())[recovered["client_order_id"]]]
    assert kinds_ == ["ACCEPTED", "FILLED"]
    assert int(nonce_file.read_text()) >= mine[1][1]


def test_paper_orders_take_the_full_book_rest_and_fill_later_as_makers_without_http(env):
    env.snapshot(asks=[("35000.00", "9")], bids=[("34900.00", "9")],
                 published_ms=int(time.time() * 1000) - 1000)
    env.snapshot()  # the latest: BIDS / ASKS, mid 34000
    partial = order_request(SMA_KEY, price="34020.00", amount="1.5")
    rest = order_request(SMA_KEY, price="34060.00", amount="0.2")  # 34010/34020 are used up
    market_sell = order_request(SMA_KEY, side="SELL", order_type="MARKET", amount="1.25")
    fok = order_request(SMA_KEY, price="34060.00", amount="100", options=["fill-or-kill"])
    env.requests(partial, rest, market_sell, fok)
    with env.group(env.settings()) as group:
        events = env.wait_terminal([r["client_order_id"] for r in (rest, market_sell, fok)])
        assert group.handler.rest is None  # paper mode has no HTTP client at all
        # What the taker could not fill rests at 34020; a seller trading there fills it.
        booked = env.tail.wait(lambda values: any(e["kind"] == "BOOKED" for e in values)
                               and values, 30, "the remainder BOOKED")
        env.trade("BTCUSD", "SELL", "34020.00", "2")
        events = env.wait_terminal([partial["client_order_id"]])
    got = {cid: [(e["kind"], e["filled_amount"], e["avg_fill_price"], e["reason"]) for e in evs]
           for cid, evs in events.items()}
    assert got[partial["client_order_id"]] == [
        ("ACCEPTED", "0", None, None),
        ("PARTIALLY_FILLED", "0.5", "34010", None),
        ("PARTIALLY_FILLED", "1", "34015", None),  # 0.5 @ 34010 + 0.5 @ 34020
        ("BOOKED", "1", "34015", None),
        ("FILLED", "1.5", str((D("34010") * D("0.5") + D("34020")) / D("1.5")), None)]
    fills = [(e["last_fill_price"], e["last_fill_amount"], e["liquidity"], e["last_fill_fee"])
             for e in events[partial["client_order_id"]] if e["last_fill_amount"]]
    assert fills == [("34010", "0.5", "TAKER", "68.02"), ("34020", "0.5", "TAKER", "68.04"),
                     ("34020", "0.5", "MAKER", "34.02")]  # Gemini's API fees: 0.4 % / 0.2 %
    assert got[rest["client_order_id"]][-1] == ("FILLED", "0.2", "34050", None)
    assert got[market_sell["client_order_id"]][-1] == ("FILLED", "1.25", "33988", None)
    assert got[fok["client_order_id"]][-1] == ("CANCELLED", "0", None, "FillOrKillWouldNotFill")
    filled = events[partial["client_order_id"]][-1]
    assert (filled["mode"] == "PAPER" and filled["fee"] == "170.08"
            and filled["fee_currency"] == "USD")
    # A MARKET order goes out as an immediate-or-cancel at the band's edge: 34000 - 5%.
    assert events[market_sell["client_order_id"]][0]["price"] == "32300"
    assert set(env.seen().values()) == {"paper"}
    assert booked


def run_paper(env: Env, limits: RiskLimits, requests: list[dict], **kw) -> dict[str, list[tuple]]:
    """Run a paper group over ``requests``; (kind, reason) per event per request."""
    env.requests(*requests)
    with env.group(env.settings(risk=limits), **kw):
        events = env.wait_terminal([r["client_order_id"] for r in requests])
    return {r["client_order_id"]: [(e["kind"], e["reason"]) for e in events[r["client_order_id"]]]
            for r in requests}


def test_max_notional_rejects_only_orders_above_it(env):
    env.snapshot()
    limits = replace_limits(max_notional=D(1000))
    requests = [order_request(SMA_KEY, price="34010.00", amount="0.02"),  # 680.2
                order_request(SMA_KEY, price="34010.00", amount="0.03"),  # 1020.3
                # a MARKET buy is checked at its price, the band's edge (34000 + 5%)
                order_request(SMA_KEY, order_type="MARKET", amount="0.029"),  # 1035.3
                order_request(SMA_KEY, side="SELL", price="33990.00", amount="0.029")]  # 985.71
    got = run_paper(env, limits, requests)
    assert [outcome(got[r["client_order_id"]]) for r in requests] == \
        ["ok", "risk:max_notional", "risk:max_notional", "ok"]


def test_price_band_rejects_prices_outside_it_and_symbols_without_a_fresh_book(env):
    env.snapshot()  # BTCUSD mid 34000: a 100 bps band is 33660 .. 34340
    env.snapshot(symbol="SOLUSD", bids=[("35.000", "10")], asks=[("35.010", "10")],
                 published_ms=int(time.time() * 1000) - 120_000)  # two minutes old
    limits = replace_limits(price_band_bps=D(100), max_book_age_ms=60_000)
    requests = [order_request(SMA_KEY, price="34340.00", amount="0.01"),
                order_request(SMA_KEY, price="34340.01", amount="0.01"),
                order_request(SMA_KEY, side="SELL", price="33660.00", amount="0.01"),
                order_request(SMA_KEY, side="SELL", price="33659.99", amount="0.01"),
                order_request(SMA_KEY, symbol="ETHUSD", price="1900.00", amount="0.01"),  # no book
                order_request(SMA_KEY, symbol="SOLUSD", price="35.005", amount="1")]  # stale book
    got = run_paper(env, limits, requests)
    assert [outcome(got[r["client_order_id"]]) for r in requests] == \
        ["ok", "risk:price_band", "ok", "risk:price_band", "risk:price_band", "risk:price_band"]


def test_max_position_follows_fills_and_survives_a_restart(env):
    env.snapshot()
    limits = replace_limits(max_position=D(1))
    first = [order_request(SMA_KEY, price="34020.00", amount="0.6"),  # position 0.6
             order_request(MOMO_KEY, strategy_id="momo", price="34050.00", amount="0.5"),  # 1.1
             order_request(SMA_KEY, side="SELL", price="33980.00", amount="1.5"),  # -0.9
             order_request(SMA_KEY, side="SELL", price="33980.00", amount="0.2"),  # -1.1
             order_request(SMA_KEY, price="34050.00", amount="0.3")]  # -0.6: closer to flat
    got = run_paper(env, limits, first)
    assert [outcome(got[r["client_order_id"]]) for r in first] == \
        ["ok", "risk:max_position", "ok", "risk:max_position", "ok"]
    env.snapshot()  # fresh liquidity
    # After a restart the position (-0.6) comes back from orders.events.
    second = [order_request(SMA_KEY, side="SELL", price="33990.00", amount="0.5"),  # -1.1
              order_request(SMA_KEY, side="SELL", price="33990.00", amount="0.4")]  # -1.0
    got = run_paper(env, limits, second)
    assert [outcome(got[r["client_order_id"]]) for r in second] == ["risk:max_position", "ok"]


def test_rate_limit_counts_accepted_orders_per_strategy_per_minute(env):
    env.snapshot()
    now = [int(time.time() * 1000)]
    limits = replace_limits(max_orders_per_minute=3, max_book_age_ms=None)
    sma = [order_request(SMA_KEY, price="34050.00", amount="0.01") for _ in range(4)]
    momo = [order_request(MOMO_KEY, strategy_id="momo", price="34050.00", amount="0.01")
            for _ in range(2)]
    got = run_paper(env, limits, sma + momo, clock_ms=lambda: now[0])
    assert [outcome(got[r["client_order_id"]]) for r in sma + momo] == \
        ["ok", "ok", "ok", "risk:rate_limit", "ok", "ok"]
    # The window comes back after a restart; a minute later it has moved on.
    later = [order_request(SMA_KEY, price="34050.00", amount="0.01")]
    got = run_paper(env, limits, later, clock_ms=lambda: now[0])
    assert outcome(got[later[0]["client_order_id"]]) == "risk:rate_limit"
    now[0] += 61_000
    later = [order_request(SMA_KEY, price="34050.00", amount="0.01", created_ms=now[0])]
    got = run_paper(env, limits, later, clock_ms=lambda: now[0])
    assert outcome(got[later[0]["client_order_id"]]) == "ok"


def test_kill_switch_file_rejects_every_order_while_present(env):
    env.snapshot()
    switch = env.run_dir / "kill-switch"
    env.run_dir.mkdir(parents=True)
    before = order_request(SMA_KEY, price="34050.00", amount="0.01")
    during = [order_request(SMA_KEY, price="34050.00", amount="0.01"),
              order_request(MOMO_KEY, strategy_id="momo", side="SELL", order_type="MARKET",
                            amount="0.01")]
    forged = order_request(MOMO_KEY, price="34050.00", amount="0.01")  # wrong key
    after = order_request(SMA_KEY, price="34050.00", amount="0.01")
    with env.group(env.settings()):
        env.requests(before)
        env.wait_terminal([before["client_order_id"]])
        switch.touch()  # flipped at runtime: takes effect from the next batch
        time.sleep(0.1)
        env.requests(*during, forged)
        env.wait_terminal([r["client_order_id"] for r in during + [forged]])
        switch.unlink()
        time.sleep(0.1)
        count = len(env.events())
        env.requests(after, during[0])  # a request refused by the switch stays refused
        env.wait_events(count + 3)
    events = by_id(env.events())
    assert outcome([(e["kind"], e["reason"]) for e in events[before["client_order_id"]]]) == "ok"
    for request in during:
        assert [(e["kind"], e["reason"]) for e in events[request["client_order_id"]]][0] == \
            ("REJECTED", "risk:kill_switch")
    assert [e["reason"] for e in events[forged["client_order_id"]]] == ["bad_signature"]
    assert outcome([(e["kind"], e["reason"]) for e in events[after["client_order_id"]]]) == "ok"
    assert [e["reason"] for e in events[during[0]["client_order_id"]]] == \
        ["risk:kill_switch", "duplicate"]


def paper_args(env: Env, keys_file: Path) -> list[str]:
    return ["--bootstrap", env.kafka, "--registry", env.registry_url, "--namespace",
            str(env.namespace), "--mode", "paper", "--strategy-keys", str(keys_file),
            "--run-dir", str(env.run_dir), "--max-notional", "off", "--max-position", "off",
            "--max-orders-per-minute", "off", "--price-band-bps", "500", "--max-book-age-s",
            "off", "--checkpoint-interval", "600"]  # the books' checkpoint stays behind


def committed_past(env: Env, name: str, count: int) -> bool:
    offsets = committed(env.kafka, f"{env.namespace}.execution", env.topic[name])
    return sum(max(o, 0) for o in offsets.values()) >= count


def run_paper_script(env: Env, tmp_path: Path, kill: bool) -> dict[str, list[tuple]]:
    """Resting paper orders, book changes, then trades and cancels; with ``kill``, the
    execution process is killed -9 between the book changes and the trades."""
    keys_file = write_secret_file(tmp_path / f"keys-{env.namespace}.json",
                                  {"sma": SMA_KEY.decode()})
    t0 = int(time.time() * 1000)

    def req(n: int, **kw) -> dict:  # the same ids in every run: the triggers are the same
        return order_request(SMA_KEY, trigger=f"script/{n}", created_ms=t0, **kw)

    resting = [req(1, price="99.50", amount="1"), req(2, side="SELL", price="101.00", amount="2"),
               req(3, price="100.00", amount="1")]
    env.snapshot(bids=[("100.00", "1"), ("99.00", "5")], asks=[("101.00", "1"), ("102.00", "5")])
    env.requests(*resting)
    proc = ExecutionProcess(paper_args(env, keys_file), tmp_path, {})
    try:
        env.tail.wait(lambda v: sum(e["kind"] == "BOOKED" for e in v) >= 3 and v, 60, "3 BOOKED")
        # The queue ahead of the bid at 100 shrinks to 0.4; at 101 others join behind us.
        env.l2("BTCUSD", [("BID", "100.00", "0.4"), ("ASK", "101.00", "3")])
        wait_for(lambda: committed_past(env, "md.l2", 2), 30, "the book changes committed")
        if kill:
            proc.kill()
            proc = ExecutionProcess(paper_args(env, keys_file), tmp_path, {})
        env.trade("BTCUSD", "SELL", "100.00", "0.5")  # 0.4 ahead trades, 0.1 reaches us
        env.trade("BTCUSD", "BUY", "101.00", "1.5")  # 1 ahead, then 0.5 of ours
        wait_for(lambda: committed_past(env, "md.trades", 2), 30, "the trades committed")
        # 3 shown at 101 since the change before the kill: a taker gets all 3 only if the
        # restarted books re-applied it.
        taker = req(6, price="101.00", amount="3", options=["immediate-or-cancel"])
        env.requests(cancel(req, 4, resting[0]), replace(req, 5, resting[1], "101.50"), taker)
        ids = [r["client_order_id"] for r in resting]
        env.wait_terminal([ids[0], ids[1], taker["client_order_id"]], 60)
        assert proc.terminate() == 0
    finally:
        proc.ensure_dead()
    return {cid: [(e["kind"], e["filled_amount"], e["last_fill_price"], e["last_fill_amount"],
                   e["liquidity"], e["reason"]) for e in events]
            for cid, events in by_id(env.events()).items()}


def cancel(req, n: int, target: dict) -> dict:
    request = req(n, amount="0", price=None, order_type="LIMIT")
    return resign(request, action="CANCEL", target_client_order_id=target["client_order_id"],
                  price=None)


def replace(req, n: int, target: dict, price: str) -> dict:
    request = req(n, side=target["side"], price=price, amount=target["amount"])
    return resign(request, action="REPLACE", target_client_order_id=target["client_order_id"])


def resign(request: dict, **changes) -> dict:
    from pipeline.trading.signing import sign

    request = {**request, **changes}
    request["signature"] = sign(request, SMA_KEY)
    return request


@pytest.mark.broker
def test_kill_9_with_resting_paper_orders_goes_on_as_an_uninterrupted_run(
        kafka, registry, topics, tmp_path):
    runs = {}
    for kill in (False, True):
        namespace = Namespace(f"sim-t{random.getrandbits(40):010x}")
        ensure_topics(kafka, namespace, ["orders.requests", "book.snapshots", "md.l2",
                                         "md.trades", "orders.events", "orders.seen",
                                         "paper.state", "dlq"])
        env = Env(kafka, registry.url, namespace, tmp_path / f"run-{kill}")
        try:
            runs[kill] = run_paper_script(env, tmp_path, kill)
        finally:
            env.close()
    assert runs[True] == runs[False]
    fills = sorted((f[2], f[3], f[4]) for events in runs[True].values() for f in events if f[3])
    # Only a restored queue gives 0.1 at 100 (0.4 ahead, not 1) and 0.5 at 101, and only
    # re-applied books the taker's 3 at 101.
    assert fills == [("100", "0.1", "MAKER"), ("101", "0.5", "MAKER"), ("101", "3", "TAKER")]
    reasons = sorted(f[5] for events in runs[True].values() for f in events if f[5])
    assert reasons == ["Requested", "Requested"]


def cancel_request(target: dict, n: str, key: bytes = SMA_KEY, strategy_id: str = "sma",
                   action: str = "CANCEL", **changes) -> dict:
    request = order_request(key, strategy_id=strategy_id, symbol=target["symbol"],
                            side=target["side"], price=None, amount="0",
                            trigger=f"cancel/{n}/{time.monotonic_ns()}")
    return resign_with(request, key, action=action,
                       target_client_order_id=target["client_order_id"], **changes)


def resign_with(request: dict, key: bytes, **changes) -> dict:
    from pipeline.trading.signing import sign

    request = {**request, **changes}
    request["signature"] = sign(request, key)
    return request


def venue_live_orders(venue) -> list[str]:
    async def live():
        return sorted(o.client_order_id for o in venue.venue.exchange._orders.values()
                      if o.is_live)
    return asyncio.run_coroutine_threadsafe(live(), venue.loop).result(10)


def test_sandbox_cancels_replaces_and_the_kill_switch_reach_the_venue(env, venue, credentials):
    bid, _ = publish_venue_book(env, venue)
    low = str(bid - D("50.00"))
    first = order_request(SMA_KEY, price=low, amount="0.001")
    second = order_request(SMA_KEY, price=low, amount="0.002")
    env.requests(first, second)
    settings = sandbox(env, venue, follow_interval_s=0.2)
    with env.group(settings, credentials):
        env.tail.wait(lambda v: sum(e["kind"] == "BOOKED" for e in v) >= 2 and v, 30, "BOOKED")
        cancel = cancel_request(first, "1")
        moved = resign_with(order_request(SMA_KEY, price=str(bid - D("40.00")), amount="0.003"),
                            SMA_KEY, action="REPLACE",
                            target_client_order_id=second["client_order_id"])
        nobody = cancel_request({**first, "client_order_id": "never-sent"}, "2")
        env.requests(cancel, moved, nobody)
        events = env.wait_terminal([first["client_order_id"], second["client_order_id"]])
        env.tail.wait(lambda v: any(e["kind"] == "BOOKED" and e["client_order_id"] ==
                                    moved["client_order_id"] for e in v) and v, 30,
                      "the replacement BOOKED")
        assert venue_live_orders(venue) == [moved["client_order_id"]]
        (env.run_dir / "kill-switch").touch()
        killed = env.wait_terminal([moved["client_order_id"]])[moved["client_order_id"]][-1]
    assert (killed["kind"], killed["reason"]) == ("CANCELLED", "risk:kill_switch")
    assert venue_live_orders(venue) == []
    assert any(e["path"] == "/v1/order/cancel/session" for e in venue.venue.rest_log)
    cancelled = events[first["client_order_id"]][-1]
    assert (cancelled["kind"], cancelled["reason"], cancelled["request_id"]) == \
        ("CANCELLED", "Requested", cancel["client_order_id"])
    assert events[second["client_order_id"]][-1]["request_id"] == moved["client_order_id"]
    rejected = [e for e in env.events() if e["client_order_id"] == "never-sent"]
    assert [(e["kind"], e["reason"]) for e in rejected] == [("CANCEL_REJECTED", "unknown_order")]
    # The unknown id never reached the venue; every other call did, once.
    paths = [e["path"] for e in venue.venue.rest_log]
    assert paths.count("/v1/order/new") == 3 and paths.count("/v1/order/cancel") == 2


def test_paper_refuses_foreign_and_unknown_cancels_and_a_replace_of_a_filled_order(env):
    env.snapshot()
    mine = order_request(SMA_KEY, price="33000.00", amount="0.1")  # rests far below
    filled = order_request(SMA_KEY, price="34010.00", amount="0.1")  # takes the ask
    theirs = order_request(MOMO_KEY, strategy_id="momo", price="33100.00", amount="0.1")
    env.requests(mine, filled, theirs)
    with env.group(env.settings()):
        env.tail.wait(lambda v: sum(e["kind"] == "BOOKED" for e in v) >= 2 and v, 30, "BOOKED")
        foreign = cancel_request(mine, "f", MOMO_KEY, "momo")  # momo cancels sma's order
        unknown = cancel_request({**mine, "client_order_id": "no-such-order"}, "u")
        late = resign_with(order_request(SMA_KEY, price="34005.00", amount="0.1"), SMA_KEY,
                           action="REPLACE", target_client_order_id=filled["client_order_id"])
        env.requests(foreign, unknown, late)
        env.wait_terminal([late["client_order_id"]])
        env.tail.wait(lambda v: sum(e["kind"] == "CANCEL_REJECTED" for e in v) >= 3 and v, 30,
                      "the refusals")
    events = env.events()
    refusals = sorted((e["client_order_id"], e["kind"], e["reason"], e["strategy_id"])
                      for e in events if e["kind"] in ("CANCEL_REJECTED", "REJECTED"))
    assert refusals == sorted([
        (mine["client_order_id"], "CANCEL_REJECTED", "not_owner", "momo"),
        ("no-such-order", "CANCEL_REJECTED", "unknown_order", "sma"),
        (filled["client_order_id"], "CANCEL_REJECTED", "order_closed", "sma"),
        (late["client_order_id"], "REJECTED", "replace:order_closed", "sma")])
    # Nothing changed: sma's and momo's orders still rest.
    last = {e["client_order_id"]: e["kind"] for e in events if e["kind"] != "CANCEL_REJECTED"}
    assert last[mine["client_order_id"]] == "BOOKED" and last[theirs["client_order_id"]] == "BOOKED"


PORTFOLIO_TOPICS = ["orders.events", "book.snapshots", "strategy.control", "portfolio.positions",
                    "portfolio.pnl", "portfolio.reconciliation", "portfolio.state", "dlq"]


def portfolio_group(env: Env, config, credentials=None, **kw) -> GroupThread:
    from consumers.portfolio import PortfolioSettings
    from consumers.portfolio import group_config as portfolio_config

    ensure_topics(env.kafka, env.namespace, PORTFOLIO_TOPICS)
    settings = PortfolioSettings(config, run_dir=env.run_dir, **kw)
    return GroupThread(portfolio_config(env.kafka, env.registry_url, env.namespace, settings,
                                        credentials=credentials), env.kafka)


def test_a_strategy_crossing_its_drawdown_limit_is_halted_and_stays_halted_across_restarts(env):
    """The portfolio's risk stop halts sma within a batch of the fill that crossed it:
    execution cancels its resting order and rejects its new ones, also after a restart,
    until an operator resumes it; another strategy trades on."""
    from pipeline.ops.portfolio_view import set_halt
    from pipeline.trading.portfolio import PortfolioConfig, RiskStop

    ensure_topics(env.kafka, env.namespace, PORTFOLIO_TOPICS)
    env.snapshot()  # mid 34000; asks 34010 (0.5), 34020 (0.5), ...
    config = PortfolioConfig(default_capital=D(100_000), max_mark_age_ms=None,
                             limits={"sma": RiskStop.parse({"max_drawdown": "10"})},
                             pnl_interval_ms=200)
    resting = order_request(SMA_KEY, price="33000.00", amount="0.01")
    # 0.5 at 34010 pays a 68.02 taker fee and 5 of spread: a drawdown of 73.02 > 10
    loser = order_request(SMA_KEY, order_type="MARKET", amount="0.5")
    after = order_request(SMA_KEY, price="33000.00", amount="0.01")
    momo = order_request(MOMO_KEY, strategy_id="momo", price="33000.00", amount="0.01")
    with portfolio_group(env, config), env.group(env.settings()):
        env.requests(resting)
        env.tail.wait(lambda v: any(e["kind"] == "BOOKED" for e in v) and v, 30, "BOOKED")
        env.requests(loser)
        events = env.wait_terminal([resting["client_order_id"], loser["client_order_id"]])
        cancelled = events[resting["client_order_id"]][-1]
        assert (cancelled["kind"], cancelled["reason"]) == ("CANCELLED", "risk:strategy_halted")
        filled = events[loser["client_order_id"]][-1]
        assert filled["kind"] == "FILLED"
        halted_after_ms = cancelled["event_ms"] - filled["event_ms"]
        print(f"halted {halted_after_ms} ms after the fill that crossed the limit")
        assert halted_after_ms < 5_000  # a portfolio batch, then execution's next one
        env.requests(after, momo)
        events = env.wait_terminal([after["client_order_id"]])
        assert [(e["kind"], e["reason"]) for e in events[after["client_order_id"]]] == \
            [("REJECTED", "risk:strategy_halted")]
        env.tail.wait(lambda v: any(e["client_order_id"] == momo["client_order_id"] and
                                    e["kind"] == "BOOKED" for e in v) and v, 30, "momo BOOKED")
    again = order_request(SMA_KEY, price="33001.00", amount="0.01")
    resumed = order_request(SMA_KEY, price="33002.00", amount="0.01")
    with env.group(env.settings()):  # a restarted execution: still halted
        env.requests(again)
        events = env.wait_terminal([again["client_order_id"]])
        assert [(e["kind"], e["reason"]) for e in events[again["client_order_id"]]] == \
            [("REJECTED", "risk:strategy_halted")]
        set_halt(env.kafka, env.registry_url, env.namespace, "sma", False)
        time.sleep(1.5)  # execution reads strategy.control once per batch
        env.snapshot()  # a fresh book for the risk checks
        env.requests(resumed)
        first = env.tail.wait(lambda v: [e for e in v if e["client_order_id"] ==
                                         resumed["client_order_id"]], 30, "the resumed order")
        assert (first[0]["kind"], first[0]["reason"]) == ("ACCEPTED", None)
    controls = [env.decoder(r.value) for r in read_all(env.kafka,
                                                       env.namespace.topic("strategy.control"))]
    assert [(c["strategy_id"], c["halted"], c["reason"], c["by"]) for c in controls] == \
        [("sma", True, "max_drawdown", "portfolio"), ("sma", False, "operator", "operator")]
    assert controls[0]["detail"] == "drawdown 73.02 USD > limit 10"


def reconciliation_events(tail: Tail, kind: str, after_ms: int = 0, timeout: float = 30):
    """The differences of the first check after ``after_ms`` that found one of ``kind``."""
    def found(values):
        group: list[dict] = []
        for record in values:
            if record["kind"] != "CHECKED":
                group.append(record)
                continue
            if record["at_ms"] > after_ms and any(g["kind"] == kind for g in group):
                return group
            group = []
    return tail.wait(found, timeout, f"a reconciliation finding {kind}")


def test_reconciliation_reports_an_order_behind_the_pipelines_back_and_a_fill_while_down(
        env, venue, credentials):
    from pipeline.trading.portfolio import PortfolioConfig

    bid, _ = publish_venue_book(env, venue)
    price = bid - D("5.00")  # rests below the best bid
    ours = order_request(SMA_KEY, price=str(price), amount="0.002")
    settings = sandbox(env, venue, follow_interval_s=0.2)
    config = PortfolioConfig(default_capital=D(0), max_mark_age_ms=None)
    with portfolio_group(env, config, credentials, mode="sandbox", venue_url=venue.http_url,
                         reconcile_interval_s=0.3, reconcile_grace_s=0.0):
        checks = Tail(env.kafka, env.namespace.topic("portfolio.reconciliation"), env.decoder)
        cid = ours["client_order_id"]
        with env.group(settings, credentials):
            env.requests(ours)
            booked = env.tail.wait(lambda v: [e for e in v if e["client_order_id"] == cid and
                                              e["kind"] == "BOOKED"], 30, "BOOKED")[0]
            clean = checks.wait(lambda v: [r for r in v if r["kind"] == "CHECKED" and
                                           r["at_ms"] > booked["event_ms"] + 500 and
                                           r["differences"] == 0], 30, "a clean check")
            assert "compared" in clean[0]["detail"] or "baseline" in clean[0]["detail"]
            # Behind the pipeline's back: an order on the same account.
            rest = credentials.client(venue.http_url, NonceSource(
                env.run_dir / "execution" / "gemini-nonce"), 10)
            foreign = rest.new_order("btcusd", "0.001", str(price - D("10.00")), "buy",
                                     client_order_id="by-hand-1")
            found = reconciliation_events(checks, "UNKNOWN_ORDER", clean[0]["at_ms"])
            unknown = [r for r in found if r["kind"] == "UNKNOWN_ORDER"]
            assert [(r["subject"], r["symbol"], r["actual"]) for r in unknown] == \
                [(foreign["order_id"], "BTCUSD", "0.001")]
            assert "left alone" in unknown[0]["detail"]
            # reported, never adopted nor cancelled
            assert rest.order_status(order_id=int(foreign["order_id"]))["is_live"] is True
            rest.cancel_order(int(foreign["order_id"]))
            rest.close()
        # Execution is down: the market comes to our order and fills it.
        move_venue_market(venue, [["sell", format(price, "f"), "1"]])
        down_at = int(time.time() * 1000)
        found = reconciliation_events(checks, "FILL_MISSING", down_at)
        by_kind = {r["kind"]: r for r in found}
        missing = by_kind["FILL_MISSING"]
        assert (missing["subject"], missing["expected"], missing["actual"]) == \
            (booked["exchange_order_id"], "0", "0.002")
        assert by_kind["MISSING_ORDER"]["subject"] == cid  # open in the pipeline, not on Gemini
        balances = {r["subject"]: r for r in found if r["kind"] == "BALANCE"}
        assert D(balances["BTC"]["actual"]) - D(balances["BTC"]["expected"]) == D("0.002")
        # Execution comes back, follows the order and publishes the fill: the amounts agree;
        # the fee does not, as REST order status has no per-fill fee (mytrades has).
        with env.group(settings, credentials):
            env.wait_terminal([cid])
            back_at = int(time.time() * 1000) + 1000
            found = reconciliation_events(checks, "FILL_MISMATCH", back_at)
        kinds_found = sorted(r["kind"] for r in found)
        fee = [r for r in found if r["kind"] == "FILL_MISMATCH"][0]
        assert (fee["subject"], fee["expected"]) == (booked["exchange_order_id"], "0")
        assert D(fee["actual"]) == price * D("0.002") * venue.venue.exchange.maker_fee
        assert "FILL_MISSING" not in kinds_found and "MISSING_ORDER" not in kinds_found
        usd = [r for r in found if r["kind"] == "BALANCE"]
        assert [(r["subject"], D(r["expected"]) - D(r["actual"])) for r in usd] == \
            [("USD", D(fee["actual"]))]
    checks.close()


def rule_breakers() -> list[tuple[dict, str]]:
    """Requests Gemini's rules refuse, each with the reason execution must give."""
    long_id = order_request(SMA_KEY, price="34000.00", amount="0.001")
    long_id["client_order_id"] += "-too-long-for-gemini"  # 44 characters: over the 36
    long_id["signature"] = sign({k: v for k, v in long_id.items() if k != "signature"}, SMA_KEY)
    return [
        (order_request(SMA_KEY, price="34000.005", amount="0.001"), "rules:InvalidPrice"),
        (order_request(SMA_KEY, price="34000.00", amount="0.000001"), "rules:InvalidQuantity"),
        (order_request(SMA_KEY, symbol="ETHUSD", price="2000.00", amount="0.01"),
         "rules:MarketNotOpen"),  # post_only: a GTC limit is refused
        (order_request(SMA_KEY, price="34000.00", amount="0.001",
                       options=["maker-or-cancel", "fill-or-kill"]), "rules:ConflictingOptions"),
        (long_id, "rules:ClientOrderIdTooLong"),
    ]


def test_orders_breaking_the_symbol_rules_are_refused_before_any_http_and_alike_in_paper(
        env, venue, credentials):
    rules = load_rules(venue.http_url, env.run_dir, ["BTCUSD"])  # the venue's own table
    assert rules == {"BTCUSD": SymbolRules("BTCUSD", D("0.01"), D("1E-8"), D("0.00001"),
                                           "open", "BTC", "USD")}
    table = {**rules, "ETHUSD": SymbolRules("ETHUSD", D("0.01"), D("0.000001"), D("0.001"),
                                            "post_only")}
    publish_venue_book(env, venue)
    outcomes = {}
    for mode in ("SANDBOX", "PAPER"):
        cases = rule_breakers()
        env.requests(*(request for request, _ in cases))
        settings = sandbox(env, venue, symbol_rules=table) if mode == "SANDBOX" else \
            env.settings(symbol_rules=table)
        with env.group(settings, credentials if mode == "SANDBOX" else None):
            events = env.wait_terminal([r["client_order_id"] for r, _ in cases])
        outcomes[mode] = [[(e["kind"], e["reason"], e["mode"]) for e in
                           events[r["client_order_id"]]] for r, _ in cases]
        assert outcomes[mode] == [[("REJECTED", reason, mode)] for _, reason in cases]
        assert venue.venue.rest_log == []  # not one call reached the venue, in either mode


