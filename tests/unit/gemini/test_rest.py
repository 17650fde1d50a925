"""Gemini's private REST API, both sides, over real sockets: no Kafka, no mocks of HTTP.

A real aiohttp server on 127.0.0.1 serves the venue's REST routes over an ``Exchange``
fed by a small in-memory book; ``GeminiRestClient`` (or plain ``requests`` with hand-made
headers, for the malformed cases) talks to it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import multiprocessing
import os
import socket
import stat
import threading
from decimal import Decimal
from pathlib import Path

import pytest
import requests
from aiohttp import web

from pipeline.core.errors import PipelineError
from pipeline.gemini.rest import (
    LIVE_URL,
    SANDBOX_URL,
    GeminiApiError,
    GeminiRestClient,
    GeminiTimeout,
    NonceSource,
    sign_request,
)
from pipeline.venue.exchange import Exchange, ExchangeError, split_symbol
from pipeline.venue.rest import add_rest_routes

KEY, SECRET = "account-trader", "trader-secret-0123456789"
OTHER_KEY, OTHER_SECRET = "account-other", "other-secret-9876543210"
D = Decimal


class DictBook:
    """A BookSource over plain lists: {symbol: {"bid": [(p, q)], "ask": [(p, q)]}}."""

    def __init__(self, books: dict[str, dict[str, list[tuple[str, str]]]]) -> None:
        self.books = books

    def symbols(self) -> set[str]:
        return set(self.books)

    def levels(self, symbol: str, side: str) -> list[tuple[Decimal, Decimal]]:
        return [(D(p), D(q)) for p, q in self.books.get(symbol, {}).get(side, [])]


def starting_book() -> DictBook:
    return DictBook({
        "BTCUSD": {
            "bid": [("30000", "1"), ("29990", "2")],
            "ask": [("30010", "0.5"), ("30020", "1"), ("30050", "2")],
        },
        "ETHBTC": {"bid": [("0.055", "10")], "ask": [("0.056", "10")]},
    })


class Venue:
    """The REST side of the local venue on a free port, its event loop in a thread."""

    def __init__(self) -> None:
        self.book = starting_book()
        self.exchange = Exchange(self.book)
        self.log: list[dict] = []
        app = web.Application()
        add_rest_routes(app, self.exchange, {KEY: SECRET, OTHER_KEY: OTHER_SECRET}, self.log)
        self.runner = web.AppRunner(app)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._run(self._start())
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def _start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def on_loop(self, function, *args):
        """Run ``function`` on the server's loop, so it never races a request."""

        async def call():
            return function(*args)

        return self._run(call())

    def move_book(self, symbol: str, side: str, levels: list[tuple[str, str]]) -> list:
        """Replace one side of the book and tell the exchange, as a market feed would."""

        def move():
            self.book.books.setdefault(symbol, {})[side] = levels
            return self.exchange.on_book_update(symbol)

        return self.on_loop(move)

    def close(self) -> None:
        self._run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def raw(self, path: str, headers: dict[str, str]) -> tuple[int, dict]:
        response = requests.post(self.url + path, headers=headers, timeout=10)
        return response.status_code, response.json()

    def entries(self, **match) -> list[dict]:
        """Log entries matching ``match``, without their timing (``at``)."""
        return [{k: v for k, v in e.items() if k != "at"} for e in self.log
                if all(e.get(k) == v for k, v in match.items())]


@pytest.fixture
def venue():
    venue = Venue()
    yield venue
    venue.close()


@pytest.fixture
def nonces(tmp_path: Path) -> NonceSource:
    return NonceSource(tmp_path / "nonce-trader")


@pytest.fixture
def client(venue: Venue, nonces: NonceSource):
    client = GeminiRestClient(venue.url, KEY, SECRET, nonces, timeout_s=10)
    yield client
    client.close()


def balances(client: GeminiRestClient) -> dict[str, tuple[Decimal, Decimal]]:
    return {b["currency"]: (D(b["amount"]), D(b["available"])) for b in client.balances()}


def assert_error_shape(body: dict, reason: str) -> None:
    assert set(body) == {"result", "reason", "message"}
    assert body["result"] == "error"
    assert body["reason"] == reason
    assert isinstance(body["message"], str) and body["message"]


def assert_no_order(client: GeminiRestClient, client_order_id: str) -> None:
    with pytest.raises(GeminiApiError) as refused:
        client.order_status(client_order_id=client_order_id)
    assert (refused.value.reason, refused.value.http_status) == ("OrderNotFound", 404)


ORDER = {"symbol": "btcusd", "amount": "0.1", "price": "29000", "side": "buy",
         "type": "exchange limit"}


# --------------------------------------------------------------------- signing


def test_signature_matches_an_independent_computation() -> None:
    payload = {"symbol": "btcusd", "amount": "0.5", "price": "30000.01", "side": "buy",
               "type": "exchange limit"}
    headers = sign_request("/v1/order/new", payload, "key-ABC", "test-secret-XYZ",
                           1700000000000001)

    text = ('{"request": "/v1/order/new", "nonce": 1700000000000001, "symbol": "btcusd", '
            '"amount": "0.5", "price": "30000.01", "side": "buy", "type": "exchange limit"}')
    encoded = base64.b64encode(text.encode()).decode()
    digest = hmac.new(b"test-secret-XYZ", encoded.encode(), hashlib.sha384).hexdigest()
    assert headers == {
        "Content-Type": "text/plain",
        "Content-Length": "0",
        "Cache-Control": "no-cache",
        "X-GEMINI-APIKEY": "key-ABC",
        "X-GEMINI-PAYLOAD": encoded,
        "X-GEMINI-SIGNATURE": digest,
    }
    # the same vector computed by `openssl dgst -sha384 -hmac test-secret-XYZ`
    assert digest == ("ae599c32da51d45a2af1e582431b0f00eb162bfc825b35f84b47b3909b5210"
                      "0fa6101c016a775c9558c5599bf7e7e789")
    assert json.loads(base64.b64decode(headers["X-GEMINI-PAYLOAD"])) == {
        "request": "/v1/order/new", "nonce": 1700000000000001, **payload}


def test_public_base_urls() -> None:
    assert LIVE_URL == "https://api.gemini.com"
    assert SANDBOX_URL == "https://api.sandbox.gemini.com"


def test_sign_request_refuses_to_overwrite_request_or_nonce() -> None:
    with pytest.raises(ValueError):
        sign_request("/v1/balances", {"nonce": 5}, KEY, SECRET, 6)


# --------------------------------------------------------------------- orders


def test_signed_order_is_accepted_and_fills_against_the_book(venue, client) -> None:
    order = client.new_order("btcusd", "1", "30020", "buy", client_order_id="fill-1")

    assert order["client_order_id"] == "fill-1"
    assert order["symbol"] == "btcusd" and order["side"] == "buy"
    assert order["type"] == "exchange limit" and order["exchange"] == "gemini"
    assert (order["executed_amount"], order["remaining_amount"]) == ("1", "0")
    assert D(order["avg_execution_price"]) == D("30015")  # 0.5 @ 30010 + 0.5 @ 30020
    assert (order["is_live"], order["is_cancelled"]) == (False, False)
    assert (order["price"], order["original_amount"]) == ("30020", "1")
    assert order["order_id"] == order["id"] and order["options"] == []
    assert order["timestamp"] == str(order["timestampms"] // 1000)

    fee = D("30015") * D("0.0035")
    assert balances(client)["USD"] == (D(1_000_000) - D("30015") - fee,) * 2
    assert balances(client)["BTC"] == (D(11), D(11))

    trades = client.my_trades("btcusd")
    assert [(t["price"], t["amount"], D(t["fee_amount"])) for t in trades] == [
        ("30020", "0.5", D("52.535")),  # newest first; 0.35% of 15010
        ("30010", "0.5", D("52.5175")),
    ]
    for trade in trades:
        assert trade["type"] == "Buy" and trade["aggressor"] is True
        assert trade["fee_currency"] == "USD" and trade["order_id"] == order["order_id"]
        assert trade["client_order_id"] == "fill-1" and trade["is_auction_fill"] is False
        assert trade["exchange"] == "gemini"
    assert trades[0]["tid"] > trades[1]["tid"]
    assert client.my_trades("btcusd", limit_trades=1) == trades[:1]

    assert venue.entries(path="/v1/order/new") == [{
        "path": "/v1/order/new", "api_key": KEY, "nonce": venue.log[0]["nonce"],
        "outcome": "accepted", "client_order_id": "fill-1", "status": 200}]


def test_sell_pays_fee_from_the_proceeds(client) -> None:
    order = client.new_order("BTCUSD", D("1.5"), D("29990"), "sell")
    assert order["executed_amount"] == "1.5"
    assert D(order["avg_execution_price"]) == (D(30000) + D("0.5") * D(29990)) / D("1.5")
    proceeds = D(30000) + D(14995)
    assert balances(client)["USD"][0] == D(1_000_000) + proceeds - proceeds * D("0.0035")
    assert balances(client)["BTC"][0] == D("8.5")
    assert {t["type"] for t in client.my_trades("btcusd")} == {"Sell"}


def test_maker_or_cancel_that_would_cross_is_cancelled(client) -> None:
    before = balances(client)
    order = client.new_order("btcusd", "0.1", "30010", "buy", client_order_id="moc-cross",
                             options=["maker-or-cancel"])
    assert (order["is_cancelled"], order["is_live"]) == (True, False)
    assert order["executed_amount"] == "0" and order["remaining_amount"] == "0.1"
    assert order["reason"] == "MakerOrCancelWouldTake"
    assert order["options"] == ["maker-or-cancel"]
    assert balances(client) == before and client.my_trades("btcusd") == []

    resting = client.new_order("btcusd", "0.1", "30005", "buy", options=["maker-or-cancel"])
    assert (resting["is_live"], resting["is_cancelled"]) == (True, False)


def test_immediate_or_cancel_fills_partly_and_cancels_the_rest(client) -> None:
    order = client.new_order("btcusd", "1", "30010", "buy", client_order_id="ioc",
                             options=["immediate-or-cancel"])
    assert (order["executed_amount"], order["remaining_amount"]) == ("0.5", "0.5")
    assert order["avg_execution_price"] == "30010"
    assert (order["is_cancelled"], order["is_live"]) == (True, False)
    assert order["reason"] == "ImmediateOrCancelWouldPost"
    usd, btc = balances(client)["USD"], balances(client)["BTC"]
    assert btc == (D("10.5"), D("10.5"))
    assert usd[0] == usd[1] == D(1_000_000) - D(15005) * D("1.0035")  # nothing held


def test_fill_or_kill_that_cannot_fill_all_fills_nothing(client) -> None:
    order = client.new_order("btcusd", "5", "30050", "buy", options=["fill-or-kill"])
    assert order["is_cancelled"] is True and order["executed_amount"] == "0"
    assert order["reason"] == "FillOrKillWouldNotFill"
    done = client.new_order("btcusd", "3.5", "30050", "buy", options=["fill-or-kill"])
    assert done["executed_amount"] == "3.5" and done["is_cancelled"] is False


def test_resting_order_fills_on_a_later_book_update(venue, client) -> None:
    order = client.new_order("btcusd", "0.3", "30100", "sell", client_order_id="rest-1")
    assert (order["is_live"], order["executed_amount"]) == (True, "0")
    assert balances(client)["BTC"] == (D(10), D("9.7"))  # the sell holds its amount

    assert venue.move_book("BTCUSD", "bid", [("30000", "1")]) == []  # does not cross yet
    fills = venue.move_book("BTCUSD", "bid", [("30150", "1"), ("30000", "1")])
    assert [(f.price, f.amount, f.aggressor) for f in fills] == [(D(30100), D("0.3"), False)]

    status = client.order_status(client_order_id="rest-1")
    assert status["order_id"] == order["order_id"]
    assert (status["is_live"], status["executed_amount"], status["remaining_amount"]) == (
        False, "0.3", "0")
    assert status["avg_execution_price"] == "30100"  # a maker fills at its own price
    (trade,) = client.my_trades("btcusd")
    assert (trade["type"], trade["aggressor"], trade["price"]) == ("Sell", False, "30100")
    assert D(trade["fee_amount"]) == D("9030") * D("0.0025")  # the maker fee
    assert balances(client)["USD"][0] == D(1_000_000) + D(9030) - D("22.575")
    assert balances(client)["BTC"] == (D("9.7"), D("9.7"))


def test_resting_order_takes_each_level_only_once(venue, client) -> None:
    order = client.new_order("btcusd", "2", "30000", "buy")
    venue.move_book("BTCUSD", "ask", [("29990", "1"), ("30050", "2")])
    assert client.order_status(order_id=int(order["order_id"]))["executed_amount"] == "1"
    assert venue.move_book("BTCUSD", "ask", [("29990", "1"), ("30060", "2")]) == []
    fills = venue.move_book("BTCUSD", "ask", [("29990", "4")])  # 3 more at that price
    assert [f.amount for f in fills] == [D(1)]
    status = client.order_status(order_id=int(order["order_id"]))
    assert (status["executed_amount"], status["is_live"]) == ("2", False)


def test_order_status_by_client_order_id_and_by_order_id(client) -> None:
    first = client.new_order("btcusd", "0.1", "29000", "buy", client_order_id="cid-a")
    second = client.new_order("btcusd", "0.2", "29100", "buy", client_order_id="cid-b")
    assert client.order_status(client_order_id="cid-a") == first
    assert client.order_status(client_order_id="cid-b")["original_amount"] == "0.2"
    assert client.order_status(order_id=int(second["order_id"])) == second
    with pytest.raises(ValueError):
        client.order_status(order_id=1, client_order_id="cid-a")
    assert_no_order(client, "cid-never-sent")


def test_cancel_releases_the_held_funds(client) -> None:
    order = client.new_order("btcusd", "10", "29000", "buy", client_order_id="big")
    held = D(290000) * D("1.0035")
    assert balances(client)["USD"] == (D(1_000_000), D(1_000_000) - held)
    cancelled = client.cancel_order(int(order["order_id"]))
    assert (cancelled["is_cancelled"], cancelled["is_live"]) == (True, False)
    assert cancelled["reason"] == "Requested"
    assert balances(client)["USD"] == (D(1_000_000), D(1_000_000))


def test_accounts_are_separate_per_api_key(venue, client, tmp_path) -> None:
    order = client.new_order("btcusd", "0.1", "29000", "buy", client_order_id="mine")
    other = GeminiRestClient(venue.url, OTHER_KEY, OTHER_SECRET,
                             NonceSource(tmp_path / "nonce-other"))
    assert_no_order(other, "mine")
    with pytest.raises(GeminiApiError) as refused:
        other.cancel_order(int(order["order_id"]))
    assert refused.value.reason == "OrderNotFound"
    assert balances(other)["USD"] == (D(1_000_000), D(1_000_000))
    other.close()


# ------------------------------------------------- cancel all, cancel session, active orders


def resting_orders(venue: Venue, client: GeminiRestClient, prefix: str) -> list[dict]:
    """Three BTCUSD orders that rest: buys below the venue's best bid, a sell above its ask."""
    bid = venue.on_loop(venue.book.levels, "BTCUSD", "bid")[0][0]
    ask = venue.on_loop(venue.book.levels, "BTCUSD", "ask")[0][0]
    specs = [("0.1", bid - 100, "buy"), ("0.2", ask + 100, "sell"), ("0.3", bid - 200, "buy")]
    placed = [client.new_order("btcusd", amount, price, side, client_order_id=f"{prefix}-{i}")
              for i, (amount, price, side) in enumerate(specs, 1)]
    for order in placed:
        assert (order["is_live"], order["executed_amount"]) == (True, "0")
    return placed


def ids(orders: list[dict]) -> list[int]:
    return [int(order["order_id"]) for order in orders]


def cancel_answer(order_ids: list[int]) -> dict:
    return {"result": "ok", "details": {"cancelledOrders": order_ids, "cancelRejects": []}}


def test_active_orders_lists_exactly_the_live_orders(venue, client) -> None:
    filled = client.new_order("btcusd", "0.1", "30010", "buy", client_order_id="filled")
    killed = client.new_order("btcusd", "0.1", "30010", "buy", client_order_id="killed",
                              options=["maker-or-cancel"])
    assert (filled["is_live"], killed["is_live"]) == (False, False)
    assert client.active_orders() == []

    placed = resting_orders(venue, client, "live")
    active = client.active_orders()
    assert ids(active) == ids(placed)  # exactly the three, by order id; not filled/killed
    assert [(o["client_order_id"], o["side"], o["price"], o["original_amount"],
             o["remaining_amount"], o["executed_amount"]) for o in active] == [
        ("live-1", "buy", "29900", "0.1", "0.1", "0"),
        ("live-2", "sell", "30110", "0.2", "0.2", "0"),
        ("live-3", "buy", "29800", "0.3", "0.3", "0"),
    ]
    for order in active:  # each entry has the shape (and content) of order status
        assert order == client.order_status(order_id=int(order["order_id"]))
        assert (order["is_live"], order["is_cancelled"], order["symbol"]) == (
            True, False, "btcusd")
        assert "reason" not in order

    # a partial fill shows in remaining_amount, a full fill drops the order from the list
    venue.move_book("BTCUSD", "bid", [("30110", "0.05"), ("30000", "1")])
    assert [(o["client_order_id"], o["remaining_amount"]) for o in client.active_orders()] == [
        ("live-1", "0.1"), ("live-2", "0.15"), ("live-3", "0.3")]
    venue.move_book("BTCUSD", "ask", [("29900", "5")])
    assert [o["client_order_id"] for o in client.active_orders()] == ["live-2", "live-3"]
    assert [e["outcome"] for e in venue.entries(path="/v1/orders")] == ["accepted"] * 4


def test_cancel_session_cancels_the_rest_and_cancel_all_then_finds_none(venue, client) -> None:
    first, second, third = resting_orders(venue, client, "s")
    assert balances(client)["USD"][1] < D(1_000_000)  # the buys hold funds
    cancelled = client.cancel_order(int(second["order_id"]))
    assert cancelled["reason"] == "Requested"

    answer = client.cancel_session()
    assert answer == cancel_answer([int(first["order_id"]), int(third["order_id"])])
    assert client.active_orders() == []
    for order in (first, second, third):
        status = client.order_status(order_id=int(order["order_id"]))
        assert (status["is_live"], status["is_cancelled"], status["reason"]) == (
            False, True, "Requested")
        assert status["remaining_amount"] == order["remaining_amount"]
    assert balances(client)["USD"] == (D(1_000_000), D(1_000_000))  # holds released
    assert balances(client)["BTC"] == (D(10), D(10))

    assert client.cancel_all() == cancel_answer([])  # nothing left to cancel
    assert client.cancel_session() == cancel_answer([])
    assert [(e["path"], e["outcome"], e["status"]) for e in venue.log
            if e["path"].startswith("/v1/order/cancel/")] == [
        ("/v1/order/cancel/session", "accepted", 200),
        ("/v1/order/cancel/all", "accepted", 200),
        ("/v1/order/cancel/session", "accepted", 200),
    ]

    again = resting_orders(venue, client, "again")  # the key can trade on afterwards
    assert client.cancel_all() == cancel_answer(ids(again))
    assert client.active_orders() == []


def test_cancel_all_and_active_orders_leave_another_keys_orders_alone(venue, client,
                                                                       tmp_path) -> None:
    other = GeminiRestClient(venue.url, OTHER_KEY, OTHER_SECRET,
                             NonceSource(tmp_path / "nonce-other"))
    theirs = resting_orders(venue, other, "theirs")
    mine = resting_orders(venue, client, "mine")
    assert ids(client.active_orders()) == ids(mine)
    assert ids(other.active_orders()) == ids(theirs)

    assert client.cancel_all() == cancel_answer(ids(mine))
    assert client.active_orders() == []
    still = other.active_orders()
    assert ids(still) == ids(theirs)
    assert [(o["is_live"], o["remaining_amount"]) for o in still] == [
        (True, "0.1"), (True, "0.2"), (True, "0.3")]

    assert other.cancel_session() == cancel_answer(ids(theirs))
    assert other.active_orders() == []
    assert client.cancel_session() == cancel_answer([])
    other.close()


def test_exchange_cancel_all_returns_the_orders_it_cancelled_by_order_id() -> None:
    exchange = Exchange(starting_book())
    a = exchange.new_order(KEY, "ETHBTC", "1", "0.05", "buy")
    b = exchange.new_order(KEY, "BTCUSD", "0.1", "29000", "buy")
    done = exchange.new_order(KEY, "BTCUSD", "0.1", "30010", "buy")  # fills at once
    c = exchange.new_order(KEY, "BTCUSD", "0.1", "31000", "sell")
    theirs = exchange.new_order(OTHER_KEY, "BTCUSD", "0.1", "29000", "buy")
    assert not done.is_live
    assert exchange.active_orders(KEY) == [a, b, c]
    assert exchange.cancel_all(KEY) == [a, b, c]
    assert [(o.is_live, o.is_cancelled, o.cancel_reason) for o in (a, b, c)] == [
        (False, True, "Requested")] * 3
    assert (done.is_cancelled, done.cancel_reason) == (False, None)
    assert exchange.active_orders(KEY) == [] and exchange.cancel_all(KEY) == []
    assert exchange.active_orders(OTHER_KEY) == [theirs] and theirs.is_live


CANCEL_ALL_PATHS = ["/v1/order/cancel/all", "/v1/order/cancel/session", "/v1/orders"]


@pytest.mark.parametrize("path", CANCEL_ALL_PATHS)
def test_bad_signature_old_nonce_and_wrong_endpoint_are_refused(venue, client, nonces,
                                                                 path) -> None:
    def live() -> list[int]:  # straight from the exchange: uses no nonce
        return [o.order_id for o in venue.on_loop(venue.exchange.active_orders, KEY)]

    order = client.new_order("btcusd", "0.1", "29000", "buy", client_order_id="keep")
    nonce = nonces.next()
    forged = sign_request(path, {}, KEY, "not-the-secret", nonce)
    status, body = venue.raw(path, forged)
    assert status == 400
    assert_error_shape(body, "InvalidSignature")
    assert live() == [int(order["order_id"])]

    elsewhere = sign_request("/v1/balances", {}, KEY, SECRET, nonce)
    status, body = venue.raw(path, elsewhere)
    assert status == 400
    assert_error_shape(body, "EndpointMismatch")
    assert live() == [int(order["order_id"])]

    genuine = sign_request(path, {}, KEY, SECRET, nonce)  # the refusals did not use it up
    status, body = venue.raw(path, genuine)
    assert status == 200
    if path == "/v1/orders":
        assert ids(body) == [int(order["order_id"])]
    else:
        assert body == cancel_answer([int(order["order_id"])])
        assert live() == []

    later = client.new_order("btcusd", "0.1", "29000", "buy", client_order_id="later")
    status, body = venue.raw(path, genuine)  # the very same request, replayed
    assert status == 400
    assert_error_shape(body, "InvalidNonce")
    lower = sign_request(path, {}, KEY, SECRET, nonce - 1)
    status, body = venue.raw(path, lower)
    assert status == 400
    assert_error_shape(body, "InvalidNonce")
    expected_live = [int(later["order_id"])]
    if path == "/v1/orders":
        expected_live.insert(0, int(order["order_id"]))
    assert live() == expected_live  # the replays cancelled nothing

    assert [(e["nonce"], e["outcome"], e["status"]) for e in venue.entries(path=path)] == [
        (nonce, "InvalidSignature", 400),
        (nonce, "EndpointMismatch", 400),
        (nonce, "accepted", 200),
        (nonce, "InvalidNonce", 400),
        (nonce - 1, "InvalidNonce", 400),
    ]


def test_the_venue_uses_the_core_symbol_rules() -> None:
    from pipeline.core import symbols
    from pipeline.venue import exchange

    assert exchange.split_symbol is symbols.split_symbol
    assert exchange.LONG_QUOTES is symbols.LONG_QUOTES



# --------------------------------------------------------------------- refusals


def test_wrong_signature_is_refused_and_does_not_use_up_the_nonce(venue, client, nonces) -> None:
    nonce = nonces.next()
    payload = {**ORDER, "client_order_id": "forged"}
    forged = sign_request("/v1/order/new", payload, KEY, "not-the-secret", nonce)
    status, body = venue.raw("/v1/order/new", forged)
    assert status == 400
    assert_error_shape(body, "InvalidSignature")
    assert venue.entries(client_order_id="forged")[0]["outcome"] == "InvalidSignature"

    genuine = sign_request("/v1/order/new", {**ORDER, "client_order_id": "genuine"}, KEY,
                           SECRET, nonce)  # the same nonce: the forgery did not use it up
    status, body = venue.raw("/v1/order/new", genuine)
    assert status == 200 and body["client_order_id"] == "genuine"
    assert_no_order(client, "forged")


def test_reused_nonce_is_refused(venue, client, nonces) -> None:
    nonce = nonces.next()
    headers = sign_request("/v1/order/new", {**ORDER, "client_order_id": "once"}, KEY, SECRET,
                           nonce)
    assert venue.raw("/v1/order/new", headers)[0] == 200
    status, body = venue.raw("/v1/order/new", headers)  # the very same request, replayed
    assert status == 400
    assert_error_shape(body, "InvalidNonce")
    assert [e["outcome"] for e in venue.entries(client_order_id="once")] == [
        "accepted", "InvalidNonce"]

    again = sign_request("/v1/order/new", {**ORDER, "client_order_id": "same-nonce"}, KEY,
                         SECRET, nonce)
    status, body = venue.raw("/v1/order/new", again)
    assert_error_shape(body, "InvalidNonce")
    assert_no_order(client, "same-nonce")
    assert len(venue.exchange.trades(KEY, "BTCUSD")) == 0
    assert client.order_status(client_order_id="once")["original_amount"] == "0.1"


def test_lower_nonce_is_refused_and_the_next_higher_one_accepted(venue, client, nonces) -> None:
    nonce = nonces.next()
    assert venue.raw("/v1/balances", sign_request("/v1/balances", {}, KEY, SECRET, nonce))[0] == 200
    lower = sign_request("/v1/order/new", {**ORDER, "client_order_id": "lower"}, KEY, SECRET,
                         nonce - 1)
    status, body = venue.raw("/v1/order/new", lower)
    assert status == 400
    assert_error_shape(body, "InvalidNonce")
    next_one = sign_request("/v1/balances", {}, KEY, SECRET, nonce + 1)
    assert venue.raw("/v1/balances", next_one)[0] == 200
    assert [e["outcome"] for e in venue.log] == ["accepted", "InvalidNonce", "accepted"]
    assert venue.log[1]["nonce"] == nonce - 1
    assert_no_order(client, "lower")


def test_unknown_api_key_is_refused(venue, client) -> None:
    headers = sign_request("/v1/order/new", {**ORDER, "client_order_id": "stranger"},
                           "account-nobody", "whatever", 1)
    status, body = venue.raw("/v1/order/new", headers)
    assert status == 400
    assert_error_shape(body, "InvalidSignature")
    assert body["message"] == "unknown API key"
    assert venue.entries(client_order_id="stranger")[0]["api_key"] == "account-nobody"
    assert_no_order(client, "stranger")


@pytest.mark.parametrize("header, reason", [
    ("X-GEMINI-APIKEY", "MissingApikeyHeader"),
    ("X-GEMINI-PAYLOAD", "MissingPayloadHeader"),
    ("X-GEMINI-SIGNATURE", "MissingSignatureHeader"),
])
def test_missing_header_is_refused(venue, client, nonces, header, reason) -> None:
    headers = sign_request("/v1/order/new", {**ORDER, "client_order_id": "headless"}, KEY,
                           SECRET, nonces.next())
    del headers[header]
    status, body = venue.raw("/v1/order/new", headers)
    assert status == 400
    assert_error_shape(body, reason)
    assert [e["outcome"] for e in venue.log] == [reason]
    assert_no_order(client, "headless")


def test_payload_for_another_endpoint_is_refused(venue, client, nonces) -> None:
    headers = sign_request("/v1/balances", {**ORDER, "client_order_id": "elsewhere"}, KEY,
                           SECRET, nonces.next())
    status, body = venue.raw("/v1/order/new", headers)
    assert status == 400
    assert_error_shape(body, "EndpointMismatch")
    assert_no_order(client, "elsewhere")


def test_payload_that_is_not_json_is_refused(venue, nonces) -> None:
    encoded = base64.b64encode(b"not json").decode()
    headers = {"X-GEMINI-APIKEY": KEY, "X-GEMINI-PAYLOAD": encoded,
               "X-GEMINI-SIGNATURE": hmac.new(SECRET.encode(), encoded.encode(),
                                              hashlib.sha384).hexdigest()}
    status, body = venue.raw("/v1/balances", headers)
    assert status == 400
    assert_error_shape(body, "InvalidJson")


def test_unknown_symbol_is_refused(venue, client) -> None:
    with pytest.raises(GeminiApiError) as refused:
        client.new_order("dogeeur", "1", "1", "buy", client_order_id="nosuch")
    assert (refused.value.reason, refused.value.http_status) == ("InvalidSymbol", 400)
    assert venue.entries(client_order_id="nosuch")[0]["outcome"] == "InvalidSymbol"
    assert_no_order(client, "nosuch")


def test_insufficient_funds_is_refused(venue, client) -> None:
    before = balances(client)
    with pytest.raises(GeminiApiError) as refused:
        client.new_order("btcusd", "100", "30000", "buy", client_order_id="too-big")
    assert (refused.value.reason, refused.value.http_status) == ("InsufficientFunds", 406)
    with pytest.raises(GeminiApiError) as refused:
        client.new_order("btcusd", "10.5", "29000", "sell", client_order_id="too-many")
    assert refused.value.reason == "InsufficientFunds"
    assert_no_order(client, "too-big")
    assert_no_order(client, "too-many")
    assert balances(client) == before

    # funds held by a resting order are not available to the next one
    client.new_order("btcusd", "30", "29000", "buy")
    with pytest.raises(GeminiApiError) as refused:
        client.new_order("btcusd", "5", "29000", "buy", client_order_id="held")
    assert refused.value.reason == "InsufficientFunds"
    assert_no_order(client, "held")


@pytest.mark.parametrize("amount, price, reason", [
    ("0", "30000", "InvalidQuantity"),
    ("-1", "30000", "InvalidQuantity"),
    ("lots", "30000", "InvalidQuantity"),
    ("1", "0", "InvalidPrice"),
    ("1", "-5", "InvalidPrice"),
    ("1", "NaN", "InvalidPrice"),
])
def test_non_positive_amount_or_price_is_refused(client, amount, price, reason) -> None:
    with pytest.raises(GeminiApiError) as refused:
        client.new_order("btcusd", amount, price, "buy", client_order_id="bad-number")
    assert (refused.value.reason, refused.value.http_status) == (reason, 400)
    assert_no_order(client, "bad-number")


def test_duplicate_client_order_id_can_be_refused(client) -> None:
    client.new_order("btcusd", "0.1", "29000", "buy", client_order_id="dup")
    second = client.new_order("btcusd", "0.2", "29000", "buy", client_order_id="dup")
    assert client.order_status(client_order_id="dup") == second  # Gemini allows it

    strict = Exchange(starting_book(), allow_duplicate_client_order_id=False)
    strict.new_order(KEY, "BTCUSD", "0.1", "29000", "buy", client_order_id="dup")
    with pytest.raises(ExchangeError) as refused:
        strict.new_order(KEY, "BTCUSD", "0.1", "29000", "buy", client_order_id="dup")
    assert refused.value.reason == "DuplicateClientOrderId"


def test_symbol_currencies() -> None:
    assert split_symbol("BTCUSD") == ("BTC", "USD")
    assert split_symbol("ethbtc") == ("ETH", "BTC")
    assert split_symbol("BTCGUSD") == ("BTC", "GUSD")
    assert split_symbol("ETHUSDT") == ("ETH", "USDT")
    assert split_symbol("GUSDUSD") == ("GUSD", "USD")


def test_cross_pair_is_paid_in_its_quote_currency(client) -> None:
    order = client.new_order("ethbtc", "2", "0.056", "buy")
    assert order["executed_amount"] == "2"
    assert balances(client)["ETH"][0] == D(12)
    assert balances(client)["BTC"][0] == D(10) - D("0.112") * D("1.0035")
    assert client.my_trades("ethbtc")[0]["fee_currency"] == "BTC"


# --------------------------------------------------------------------- client


def test_timeout_is_its_own_error(tmp_path) -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        client = GeminiRestClient(url, KEY, SECRET, NonceSource(tmp_path / "n"), timeout_s=0.3)
        with pytest.raises(GeminiTimeout) as timed_out:
            client.new_order("btcusd", "1", "1", "buy", client_order_id="maybe")
        assert "order status" in str(timed_out.value)
        client.close()


def test_the_secret_is_never_shown(venue, client) -> None:
    with pytest.raises(GeminiApiError) as refused:
        client.new_order("btcusd", "100", "30000", "buy")
    assert SECRET not in str(refused.value) and SECRET not in repr(client)
    assert SECRET not in json.dumps(venue.log)


def test_client_refuses_float_amounts(client) -> None:
    with pytest.raises(TypeError):
        client.new_order("btcusd", 0.1, "30000", "buy")


# --------------------------------------------------------------------- nonces


def test_nonce_source_increases_across_a_restart(tmp_path) -> None:
    path = tmp_path / "run" / "gemini.nonce"
    first = NonceSource(path, clock_us=lambda: 1_000)
    assert [first.next(), first.next()] == [1_000, 1_001]
    assert path.read_text() == "1001\n"  # durable before it was returned

    restarted = NonceSource(path, clock_us=lambda: 5)  # and the clock went back
    assert restarted.next() == 1_002
    later = NonceSource(path, clock_us=lambda: 9_000_000)
    assert later.next() == 9_000_000

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(str(path) + ".lock").st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["gemini.nonce", "gemini.nonce.lock"]


def test_advancing_the_nonce_source_skips_ahead_of_the_clock_and_the_file(tmp_path) -> None:
    """After an InvalidNonce the exchange may have seen nonces above ours: jump past them."""
    path = tmp_path / "gemini.nonce"
    source = NonceSource(path, clock_us=lambda: 1_000)
    assert source.next() == 1_000
    assert source.advance(500) == 1_500 and path.read_text() == "1500\n"
    assert source.next() == 1_501
    assert NonceSource(path, clock_us=lambda: 9_000).advance(500) == 9_500  # the clock is ahead


def test_nonce_source_with_the_real_clock_is_strictly_increasing(tmp_path) -> None:
    source = NonceSource(tmp_path / "n")
    drawn = [source.next() for _ in range(200)]
    assert all(a < b for a, b in zip(drawn, drawn[1:]))
    assert drawn[0] > 1_600_000_000_000_000  # microseconds since the epoch


def test_corrupt_nonce_file_is_an_error_not_a_reset(tmp_path) -> None:
    path = tmp_path / "n"
    path.write_text("garbage")
    with pytest.raises(PipelineError, match="corrupt"):
        NonceSource(path).next()


def _frozen_clock() -> int:
    return 1


def _draw(path: str, count: int, frozen: bool, out) -> None:
    source = NonceSource(path, clock_us=_frozen_clock) if frozen else NonceSource(path)
    out.put([source.next() for _ in range(count)])


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-clock", "real-clock"])
def test_two_processes_sharing_the_file_never_reuse_a_nonce(tmp_path, frozen) -> None:
    path, count = str(tmp_path / "shared.nonce"), 300
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    workers = [context.Process(target=_draw, args=(path, count, frozen, out)) for _ in range(2)]
    for worker in workers:
        worker.start()
    drawn = [out.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    for mine in drawn:
        assert all(a < b for a, b in zip(mine, mine[1:]))
    every = sorted(drawn[0] + drawn[1])
    assert len(set(every)) == 2 * count
    if frozen:  # every nonce came from last + 1 under the lock: no gap, no repeat
        assert every == list(range(1, 2 * count + 1))
    assert int(Path(path).read_text()) == every[-1]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_symbols_that_appear_later_get_starting_balances(venue, client) -> None:
    assert "ETH" in balances(client) and "SOL" not in balances(client)
    venue.move_book("SOLUSD", "ask", [("31", "5")])
    assert balances(client)["SOL"] == (D(10), D(10))
    assert balances(client)["USD"] == (D(1_000_000), D(1_000_000))


def test_configured_starting_balances() -> None:
    exchange = Exchange(starting_book(), initial_balances={"usd": D(100)})
    assert [(b.currency, b.amount) for b in exchange.balances(KEY)] == [("USD", D(100))]
    with pytest.raises(ExchangeError) as refused:
        exchange.new_order(KEY, "BTCUSD", "1", "30000", "buy")
    assert refused.value.reason == "InsufficientFunds"
