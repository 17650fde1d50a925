"""Gemini's symbol rules: the one pure check, the loader and its cache against the local venue over
real HTTP, the venue's own enforcement, and execution's decision and the simulator refusing the
same orders with the same reasons. Only the last test (execution over the WebSocket API) needs the
broker: the tests that need Kafka (those that do not: tests/unit/gemini/test_symbol_rules.py)."""

from __future__ import annotations

import pytest

from pipeline.gemini.symbols import load_rules
from tests.integration.test_execution import env  # noqa: F401  (the broker fixture of the last test)
from tests.unit.gemini.test_symbol_rules import BTC, TABLE, D  # noqa: F401 - shared with the unit tests

WS_KEY, WS_SECRET = "account-ws-rules", "ws-rules-secret-0a1b2c3d4e5f"


@pytest.fixture
def ws_venue():
    from pipeline.venue.rest import VenueKey
    from pipeline.venue.server import RunningVenue, VenueConfig
    from tests.support.orders import venue_book
    from tests.support.waiting import wait_for

    running = RunningVenue(VenueConfig(symbols=["BTCUSD"], rate=2, start_on_subscribe=False,
                                       api_keys={WS_KEY: VenueKey(WS_SECRET, time_nonce=True)}))
    wait_for(lambda: venue_book(running)[1], 10, "the venue's first book")
    yield running
    running.stop()


@pytest.mark.broker
def test_over_the_websocket_api_too_no_order_method_is_called_for_a_refused_order(
        env, ws_venue) -> None:
    from pipeline.gemini.execution import GeminiCredentials
    from tests.integration.test_execution import SMA_KEY, publish_venue_book, rule_breakers, sandbox
    from tests.support.orders import order_request

    table = {**load_rules(ws_venue.http_url, env.run_dir, ["BTCUSD"]),
             "ETHUSD": TABLE["ETHUSD"]}
    _, ask = publish_venue_book(env, ws_venue)
    cases = rule_breakers()
    good = order_request(SMA_KEY, price=str(ask + 5), amount="0.001")
    env.requests(*(request for request, _ in cases), good)
    ws = sandbox(env, ws_venue, transport="ws", symbol_rules=table)
    with env.group(ws, GeminiCredentials(WS_KEY, WS_SECRET, nonce="time")):
        events = env.wait_terminal([r["client_order_id"] for r, _ in cases] +
                                   [good["client_order_id"]])
    assert [[(e["kind"], e["reason"]) for e in events[r["client_order_id"]]]
            for r, _ in cases] == [[("REJECTED", reason)] for _, reason in cases]
    assert events[good["client_order_id"]][-1]["kind"] == "FILLED"
    calls = [(e["method"], e.get("client_order_id")) for e in ws_venue.venue.wstrading.log]
    assert calls == [("order.place", good["client_order_id"])]  # only the valid one went out
    assert [e for e in ws_venue.venue.rest_log if e["path"] == "/v1/order/new"] == []


