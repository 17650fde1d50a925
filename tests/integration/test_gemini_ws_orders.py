"""Sandbox execution over Gemini's WebSocket API, against the local venue over real sockets:
orders, fills with fees from the order events, cancels, the kill switch as
``order.cancel_session``, and a dropped socket (cancel-on-disconnect, fills while away
recovered exactly once)."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal as D

import pytest

from pipeline.core.errors import PipelineError
from pipeline.gemini.execution import GeminiCredentials
from pipeline.gemini.ws_session import WsSession, ws_auth_headers
from pipeline.venue.rest import VenueKey
from pipeline.venue.server import RunningVenue, VenueConfig
from tests.integration.test_execution import (  # noqa: F401
    SMA_KEY,
    cancel_request,
    env,
    move_venue_market,
    publish_venue_book,
    sandbox,
    venue_live_orders,
)
from tests.support.orders import by_id, exchange_orders_per_id, order_request, venue_book
from tests.support.waiting import wait_for

WS_KEY, WS_SECRET = "account-ws", "ws-api-secret-9a8b7c6d5e4f"
REST_ONLY_KEY, REST_ONLY_SECRET = "account-rest", "rest-api-secret-0f1e2d3c"

pytestmark = pytest.mark.broker


@pytest.fixture
def venue():
    running = RunningVenue(VenueConfig(
        symbols=["BTCUSD"], rate=2, start_on_subscribe=False,
        api_keys={WS_KEY: VenueKey(WS_SECRET, time_nonce=True), REST_ONLY_KEY: REST_ONLY_SECRET}))
    wait_for(lambda: venue_book(running)[1], 10, "the venue's first book")
    yield running
    running.stop()


@pytest.fixture
def credentials() -> GeminiCredentials:
    return GeminiCredentials(WS_KEY, WS_SECRET, nonce="time")


def ws_settings(env, venue, **kw):
    return sandbox(env, venue, transport="ws", **kw)


def ws_calls(venue) -> list[tuple]:
    return [(e["method"], e.get("client_order_id"), e.get("outcome"))
            for e in venue.venue.wstrading.log]


def on_venue(venue, fn):
    async def run():
        return fn()
    return asyncio.run_coroutine_threadsafe(run(), venue.loop).result(10)


def trading_connections(venue) -> list:
    return on_venue(venue, lambda: [c for c in venue.venue.wsapi.connections
                                    if c.session is not None])


def test_orders_rest_fill_with_fees_cancel_and_the_kill_switch_cancels_the_session(
        env, venue, credentials):
    bid, ask = publish_venue_book(env, venue)
    taker = order_request(SMA_KEY, price=str(ask + 5), amount="0.001")
    resting = order_request(SMA_KEY, price=str(bid - D("20.00")), amount="0.002")
    doomed = order_request(SMA_KEY, price=str(bid - D("50.00")), amount="0.001")
    last = order_request(SMA_KEY, price=str(bid - D("60.00")), amount="0.001")
    env.requests(taker, resting, doomed, last)
    with env.group(ws_settings(env, venue), credentials):
        env.wait_terminal([taker["client_order_id"]])
        env.tail.wait(lambda v: sum(e["kind"] == "BOOKED" for e in v) >= 3 and v, 30, "BOOKED")
        # The market comes down to the resting buy: it fills as a maker, with its fee.
        move_venue_market(venue, [["sell", str(bid - D("20.00")), "0.002"]])
        cancel = cancel_request(doomed, "1")
        env.requests(cancel)
        events = env.wait_terminal([resting["client_order_id"], doomed["client_order_id"]])
        assert venue_live_orders(venue) == [last["client_order_id"]]
        (env.run_dir / "kill-switch").touch()
        killed = env.wait_terminal([last["client_order_id"]])[last["client_order_id"]][-1]
    took = by_id(env.events())[taker["client_order_id"]]
    assert [e["kind"] for e in took] == ["ACCEPTED", "FILLED"]
    fill = took[-1]
    assert fill["liquidity"] == "TAKER" and D(fill["last_fill_fee"]) > 0
    assert fill["exchange_order_id"] and fill["filled_amount"] == "0.001"
    made = events[resting["client_order_id"]]
    assert [e["kind"] for e in made] == ["ACCEPTED", "BOOKED", "FILLED"]
    assert made[-1]["liquidity"] == "MAKER" and made[-1]["last_fill_price"] == str(bid - 20)
    assert D(made[-1]["last_fill_fee"]) == D("0.0025") * (bid - 20) * D("0.002")
    gone = events[doomed["client_order_id"]][-1]
    assert (gone["kind"], gone["reason"], gone["request_id"]) == \
        ("CANCELLED", "Requested", cancel["client_order_id"])
    assert (killed["kind"], killed["reason"]) == ("CANCELLED", "risk:kill_switch")
    assert venue_live_orders(venue) == []
    methods = [m for m, _, _ in ws_calls(venue)]
    assert methods.count("order.place") == 4 and methods.count("order.cancel") == 1
    assert methods[-1] == "order.cancel_session"
    assert [e for e in venue.venue.rest_log if e["path"] == "/v1/order/new"] == []  # no REST
    assert exchange_orders_per_id(venue) == {r["client_order_id"]: 1
                                             for r in (taker, resting, doomed, last)}


def test_a_refused_order_is_rejected_with_geminis_reason_once(env, venue, credentials):
    bid, _ = publish_venue_book(env, venue)
    poor = order_request(SMA_KEY, price=str(bid - 10), amount="500")  # far beyond the funds
    env.requests(poor)
    with env.group(ws_settings(env, venue), credentials):
        events = env.wait_terminal([poor["client_order_id"]])
        time.sleep(0.5)  # the venue's REJECTED order event has come and gone
    assert [(e["kind"], e["reason"]) for e in events[poor["client_order_id"]]] == [
        ("REJECTED", "gemini:InsufficientFunds")]
    assert [e for e in env.events() if e["kind"] == "UNKNOWN"] == []


def test_a_dropped_socket_cancels_the_session_and_fills_while_away_come_once(
        env, venue, credentials):
    bid, _ = publish_venue_book(env, venue)
    price = bid - D("30.00")
    half = order_request(SMA_KEY, price=str(price), amount="0.004")
    other = order_request(SMA_KEY, price=str(bid - D("70.00")), amount="0.001")
    env.requests(half, other)
    with env.group(ws_settings(env, venue), credentials) as group:
        env.tail.wait(lambda v: sum(e["kind"] == "BOOKED" for e in v) >= 2 and v, 30, "BOOKED")
        [conn] = trading_connections(venue)
        # The venue stops sending on the socket: the fill's order event is stuck...
        on_venue(venue, lambda: setattr(conn.base, "stalled_until", time.monotonic() + 60))
        move_venue_market(venue, [["sell", str(price), "0.0015"]])
        # ...and the connection drops: its order events are lost, and cancel-on-disconnect
        # cancels what rested.
        on_venue(venue, conn.base.drop)
        events = env.wait_terminal([half["client_order_id"], other["client_order_id"]])
        assert group.handler.counts["recovered_fills"] == 1
        assert group.handler.counts["ws_connections"] >= 2
    kinds = [(e["kind"], e["last_fill_amount"], e["reason"])
             for e in events[half["client_order_id"]]]
    assert kinds == [("ACCEPTED", None, None), ("BOOKED", None, None),
                     ("PARTIALLY_FILLED", "0.0015", None),
                     ("CANCELLED", None, "CancelOnDisconnect")]
    assert events[half["client_order_id"]][2]["last_fill_fee"] is not None
    assert [e["kind"] for e in events[other["client_order_id"]]][-1] == "CANCELLED"
    assert venue_live_orders(venue) == []
    # Exactly once: one fill event for the one venue fill, across the reconnect.
    fills = [e for e in env.events() if e["kind"] in ("PARTIALLY_FILLED", "FILLED")]
    assert len(fills) == 1


def test_an_order_event_of_an_order_no_one_here_placed_is_published_as_unknown(
        env, venue, credentials):
    bid, _ = publish_venue_book(env, venue)
    mine = order_request(SMA_KEY, price=str(bid - 40), amount="0.001")
    env.requests(mine)
    with env.group(ws_settings(env, venue), credentials):
        env.tail.wait(lambda v: any(e["kind"] == "BOOKED" for e in v) and v, 30, "BOOKED")
        # Someone else places an order with the same key (say, by hand on the website).
        on_venue(venue, lambda: venue.venue.exchange.new_order(
            WS_KEY, "BTCUSD", "0.001", str(bid - 45), "buy", client_order_id="by-hand-1"))
        unknown = env.tail.wait(lambda v: [e for e in v if e["kind"] == "UNKNOWN"] or None, 30,
                                "the UNKNOWN event")
    assert [(e["client_order_id"], e["strategy_id"], e["reason"]) for e in unknown] == [
        ("by-hand-1", "external", "gemini:NEW"), ("by-hand-1", "external", "gemini:OPEN")]


def test_the_websocket_login_refuses_keys_gemini_refuses(venue):
    # An increasing-nonce (REST-only) key: the handshake is refused with the one message.
    session = WsSession(venue.ws_url, REST_ONLY_KEY, REST_ONLY_SECRET, 5)
    with pytest.raises(PipelineError, match="time-based nonce"):
        session.connect()
    # A bad signature.
    session = WsSession(venue.ws_url, WS_KEY, "not-the-secret", 5)
    with pytest.raises(PipelineError, match="401"):
        session.connect()
    # A clock 45 s off.
    session = WsSession(venue.ws_url, WS_KEY, WS_SECRET, 5, clock_s=lambda: time.time() - 45)
    with pytest.raises(PipelineError, match="401"):
        session.connect()
    # The right key: trading methods answer; without a login they say -1002.
    session = WsSession(venue.ws_url, WS_KEY, WS_SECRET, 5)
    session.connect()
    try:
        answer = session.request("order.cancel_all", {})
        assert answer["status"] == 200 and answer["result"] == {"cancelledOrders": []}
    finally:
        session.close()


def test_the_handshake_headers_are_geminis():
    headers = ws_auth_headers("account-x", "secret", 1700000000)
    assert headers["X-GEMINI-NONCE"] == "1700000000"
    assert headers["X-GEMINI-PAYLOAD"] == "MTcwMDAwMDAwMA=="  # base64 of the nonce's text
    import hashlib
    import hmac
    assert headers["X-GEMINI-SIGNATURE"] == hmac.new(b"secret", b"MTcwMDAwMDAwMA==",
                                                     hashlib.sha384).hexdigest()


def arm(venue, **fault) -> None:
    import requests
    answer = requests.post(venue.http_url + "/_venue/order-faults", json=fault, timeout=5)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("fault", ["error_after", "drop_after"])
def test_a_5xx_or_a_drop_after_the_venue_placed_the_order_is_followed_not_rejected(
        env, venue, credentials, fault):
    _, ask = publish_venue_book(env, venue)
    taker = order_request(SMA_KEY, price=str(ask + 5), amount="0.001")
    after = order_request(SMA_KEY, price=str(ask + 5), amount="0.001")
    arm(venue, action=fault, path="order.place")
    env.requests(taker, after)
    with env.group(ws_settings(env, venue), credentials) as group:
        events = env.wait_terminal([taker["client_order_id"], after["client_order_id"]])
        assert group.handler.counts["in_doubt"] == 1
    for request in (taker, after):
        got = events[request["client_order_id"]]
        assert [e["kind"] for e in got] == ["ACCEPTED", "FILLED"], got
        assert got[-1]["last_fill_fee"] is not None and got[-1]["liquidity"] == "TAKER"
    assert exchange_orders_per_id(venue) == {taker["client_order_id"]: 1,
                                             after["client_order_id"]: 1}
    status = [e for e in venue.venue.rest_log if e["path"] == "/v1/order/status"]
    assert [e["client_order_id"] for e in status] == [taker["client_order_id"]]


def test_a_rate_limited_order_is_retried_not_rejected(env, venue, credentials):
    _, ask = publish_venue_book(env, venue)
    taker = order_request(SMA_KEY, price=str(ask + 5), amount="0.001")
    arm(venue, action="rate_limit", path="order.place", count=2)
    env.requests(taker)
    with env.group(ws_settings(env, venue), credentials):
        events = env.wait_terminal([taker["client_order_id"]])
    assert [e["kind"] for e in events[taker["client_order_id"]]] == ["ACCEPTED", "FILLED"]
    assert [o for m, c, o in ws_calls(venue) if m == "order.place"] == [
        "RateLimit", "RateLimit", "accepted"]


def test_a_strategys_cancel_all_cancels_its_orders_of_the_symbol_and_no_one_elses(
        env, venue, credentials):
    """CANCEL_ALL is one strategy's orders of one symbol: one order.cancel each (Gemini's
    order.cancel_all would take every strategy's orders on the account with it)."""
    from tests.integration.test_execution import MOMO_KEY

    bid, _ = publish_venue_book(env, venue)
    mine = [order_request(SMA_KEY, price=str(bid - D(step)), amount="0.001")
            for step in ("30.00", "40.00")]
    theirs = order_request(MOMO_KEY, strategy_id="momo", price=str(bid - 35), amount="0.001")
    env.requests(*mine, theirs)
    with env.group(ws_settings(env, venue), credentials):
        env.tail.wait(lambda v: sum(e["kind"] == "BOOKED" for e in v) >= 3 and v, 30, "BOOKED")
        cancel_all = cancel_request(mine[0], "all", action="CANCEL_ALL")
        env.requests(cancel_all)
        events = env.wait_terminal([r["client_order_id"] for r in mine])
        assert venue_live_orders(venue) == [theirs["client_order_id"]]
    for request in mine:
        last = events[request["client_order_id"]][-1]
        assert (last["kind"], last["reason"], last["request_id"]) == \
            ("CANCELLED", "Requested", cancel_all["client_order_id"])
    methods = [m for m, _, _ in ws_calls(venue)]
    assert methods.count("order.cancel") == 2 and "order.cancel_all" not in methods


def test_an_order_resting_when_execution_stopped_is_closed_by_the_next_one(
        env, venue, credentials):
    """The session that placed an order dies with its process, and cancel-on-disconnect
    cancels the order at Gemini. The next process's key check logs in before it restores
    what was open; it must still re-read the restored order and publish its CANCELLED
    (found by `pipeline chaos`: the order stayed followed, with no terminal event)."""
    bid, _ = publish_venue_book(env, venue)
    resting = order_request(SMA_KEY, price=str(bid - D("50.00")), amount="0.002")
    env.requests(resting)
    cid = resting["client_order_id"]
    with env.group(ws_settings(env, venue), credentials):
        env.tail.wait(lambda v: any(e["kind"] == "BOOKED" for e in v) and v, 30, "BOOKED")
    wait_for(lambda: venue_live_orders(venue) == [], 10, "cancel-on-disconnect")
    assert [e["kind"] for e in by_id(env.events())[cid]] == ["ACCEPTED", "BOOKED"]
    with env.group(ws_settings(env, venue, check_key=True), credentials):
        events = env.wait_terminal([cid])
    story = [(e["kind"], e["reason"]) for e in events[cid]]
    assert story == [("ACCEPTED", None), ("BOOKED", None), ("CANCELLED", "CancelOnDisconnect")]
