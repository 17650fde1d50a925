"""Gemini's error classes, nonce settings, master keys and rate budget, against the local
venue over real HTTP: every answer that may have executed is followed, never taken as a
rejection; every refusal that executed nothing is retried or paused, never doubled."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal as D

import pytest
import requests

from pipeline.core.errors import PipelineError
from pipeline.gemini.execution import GeminiCredentials, GeminiExecution, GeminiSettings, check_key
from pipeline.gemini.ratelimit import SharedTokenBucket
from pipeline.gemini.rest import GeminiApiError, GeminiInDoubt, GeminiRateLimited, TimeNonce
from pipeline.venue.rest import VenueKey
from pipeline.venue.server import RunningVenue, VenueConfig
from tests.support.orders import exchange_orders_per_id, order_request, venue_book
from tests.support.waiting import wait_for

SMA_KEY = b"sma-signing-key-0123456789abcdef"
KEY, SECRET = "account-errors", "errors-api-secret-0a1b2c3d"
TIME_KEY, TIME_SECRET = "account-time", "time-api-secret-4e5f6a7b"
MASTER_KEY, MASTER_SECRET = "master-group", "master-api-secret-8c9d0e1f"


@pytest.fixture(scope="module")
def venue():
    running = RunningVenue(VenueConfig(symbols=["BTCUSD"], rate=2, start_on_subscribe=False,
                                       api_keys={KEY: SECRET,
                                                 TIME_KEY: VenueKey(TIME_SECRET, time_nonce=True),
                                                 MASTER_KEY: {"secret": MASTER_SECRET,
                                                              "accounts": ["primary"]}}))
    wait_for(lambda: venue_book(running)[1], 10, "the venue's first book")
    yield running
    running.stop()


def arm(venue, **fault) -> None:
    answer = requests.post(venue.http_url + "/_venue/order-faults", json=fault, timeout=5)
    assert answer.status_code == 200, answer.text


def calls(venue, cid: str) -> list[tuple[str, str]]:
    return [(e["path"], e["outcome"]) for e in venue.venue.rest_log
            if e["client_order_id"] == cid]


def execution(venue, tmp_path, credentials=None, **settings) -> GeminiExecution:
    credentials = credentials or GeminiCredentials(KEY, SECRET)
    nonces = credentials.nonces(tmp_path / "nonce")
    rest = credentials.client(venue.http_url, nonces, settings.pop("timeout_s", 2.0))
    settings = GeminiSettings(**{"rate_per_s": 10.0, "burst": 10, "status_backoff_s": 0.05,
                                 "rate_limit_backoff_s": 0.05, **settings})
    return GeminiExecution(rest, nonces, "SANDBOX", lambda *a: None, settings)


def crossing_buy(venue, **kw) -> dict:
    ask = D(venue_book(venue)[1][0][0])
    return order_request(SMA_KEY, price=str(ask + 50), amount="0.001", **kw)


@pytest.mark.parametrize("fault", ["error_after", "not_json_after"])
def test_a_5xx_or_garbage_after_the_venue_placed_the_order_is_followed_not_rejected(
        venue, tmp_path, fault):
    gemini = execution(venue, tmp_path)
    request = crossing_buy(venue)
    arm(venue, action=fault, path="/v1/order/new")
    events, outcome = gemini.place(request, None, int(time.time() * 1000))
    cid = request["client_order_id"]
    assert [e["kind"] for e in events] == ["ACCEPTED", "FILLED"]
    assert events[-1]["filled_amount"] == "0.001" and outcome == "sent"
    assert calls(venue, cid) == [("/v1/order/new", "accepted"),  # executed, answer 5xx/HTML
                                 ("/v1/order/status", "accepted")]  # asked, found: adopted
    assert exchange_orders_per_id(venue)[cid] == 1
    assert gemini.counts["in_doubt"] == 1


def test_a_5xx_before_executing_is_fenced_by_the_status_then_sent_once(venue, tmp_path):
    gemini = execution(venue, tmp_path)
    request = crossing_buy(venue)
    arm(venue, action="error_before", path="/v1/order/new")
    events, _ = gemini.place(request, None, int(time.time() * 1000))
    cid = request["client_order_id"]
    assert [e["kind"] for e in events] == ["ACCEPTED", "FILLED"]
    assert calls(venue, cid) == [("/v1/order/new", "System"), ("/v1/order/status", "OrderNotFound"),
                                 ("/v1/order/new", "accepted")]
    assert exchange_orders_per_id(venue)[cid] == 1


def test_a_429_is_retried_without_rejecting_the_request(venue, tmp_path):
    gemini = execution(venue, tmp_path)
    request = crossing_buy(venue)
    arm(venue, action="rate_limit", path="/v1/order/new", count=2)
    events, _ = gemini.place(request, None, int(time.time() * 1000))
    cid = request["client_order_id"]
    assert [e["kind"] for e in events] == ["ACCEPTED", "FILLED"]
    assert calls(venue, cid) == [("/v1/order/new", "RateLimit")] * 2 + [
        ("/v1/order/new", "accepted")]
    assert gemini.counts["rate_limited"] == 2 and gemini.counts["in_doubt"] == 0
    assert exchange_orders_per_id(venue)[cid] == 1


def test_the_venue_answers_429_past_the_rate_and_nothing_refused_executed(venue, tmp_path):
    """40 calls at once on one key: 10 a second are served, five more queued, the rest
    refused with 429 (the time-based key, so that arrival order cannot matter)."""
    credentials = GeminiCredentials(TIME_KEY, TIME_SECRET, nonce="time")
    time.sleep(1.1)  # a full bucket

    def call(_):
        rest = credentials.client(venue.http_url, TimeNonce(), 10)
        try:
            rest.balances()
            return "ok"
        except GeminiRateLimited as exc:
            assert exc.http_status == 429
            return "429"

    with ThreadPoolExecutor(40) as pool:
        outcomes = Counter(pool.map(call, range(40)))
    assert outcomes["ok"] + outcomes["429"] == 40
    assert 15 <= outcomes["ok"] < 40 and outcomes["429"] >= 1
    time.sleep(1.6)  # the rate drops back under the limit
    assert credentials.client(venue.http_url, TimeNonce(), 10).balances()


def test_maintenance_rejects_and_pauses_the_symbol_without_further_calls(venue, tmp_path):
    gemini = execution(venue, tmp_path, pause_s=60)
    first, second = crossing_buy(venue), crossing_buy(venue)
    arm(venue, action="error_before", path="/v1/order/new", status=503, reason="Maintenance")
    events, outcome = gemini.place(first, None, int(time.time() * 1000))
    assert [(e["kind"], e["reason"]) for e in events] == [("REJECTED", "gemini:Maintenance")]
    events, outcome = gemini.place(second, None, int(time.time() * 1000))
    assert [(e["kind"], e["reason"]) for e in events] == [("REJECTED", "gemini:Maintenance")]
    assert outcome == "rejected:gemini:Maintenance"
    assert calls(venue, first["client_order_id"]) == [("/v1/order/new", "Maintenance")]
    assert calls(venue, second["client_order_id"]) == []  # paused: never sent
    assert gemini.counts["in_doubt"] == 0


def test_a_time_based_nonce_key_works_with_seconds_and_fills(venue, tmp_path):
    credentials = GeminiCredentials(TIME_KEY, TIME_SECRET, nonce="time")
    gemini = execution(venue, tmp_path, credentials)
    assert "time-based" in gemini.check_key()
    request = crossing_buy(venue)
    events, _ = gemini.place(request, None, int(time.time() * 1000))
    assert [e["kind"] for e in events] == ["ACCEPTED", "FILLED"]
    nonces = [e["nonce"] for e in venue.venue.rest_log if e["api_key"] == TIME_KEY]
    assert all(abs(n - time.time()) < 30 for n in nonces) and len(nonces) >= 3
    assert not (tmp_path / "nonce").exists()  # nothing to store for a time-based nonce


def test_each_wrong_nonce_setting_gets_the_one_clear_message(venue, tmp_path):
    # A time-based key configured as increasing: microseconds are far outside its window.
    wrong = GeminiCredentials(TIME_KEY, TIME_SECRET, nonce="increasing")
    rest = wrong.client(venue.http_url, wrong.nonces(tmp_path / "n1"), 5)
    with pytest.raises(PipelineError, match='has "Uses a time-based nonce" set.*nonce = "time"'):
        check_key(rest, rest.nonce_source, 60_000_000)
    # An increasing key configured as time-based: it refuses a repeated seconds nonce.
    wrong = GeminiCredentials(KEY, SECRET, nonce="time")
    rest = wrong.client(venue.http_url, wrong.nonces(tmp_path / "n2"), 5)
    with pytest.raises(PipelineError, match='uses increasing nonces.*nonce = "increasing"'):
        check_key(rest, rest.nonce_source, 60_000_000)
    # Right settings pass.
    right = GeminiCredentials(KEY, SECRET)
    rest = right.client(venue.http_url, right.nonces(tmp_path / "n3"), 5)
    assert "increasing" in check_key(rest, rest.nonce_source, 60_000_000)


def test_a_time_based_nonce_outside_the_window_is_refused_with_a_clock_message(venue):
    skewed = TimeNonce(clock_s=lambda: time.time() - 45)
    rest = GeminiCredentials(TIME_KEY, TIME_SECRET, "time").client(venue.http_url, skewed, 5)
    with pytest.raises(GeminiApiError, match="InvalidNonce"):
        rest.balances()
    with pytest.raises(PipelineError, match="clock is more than 30 s"):
        skewed.advance(1)


def test_a_master_key_names_its_account_and_is_refused_without_one(venue, tmp_path):
    bare = GeminiCredentials(MASTER_KEY, MASTER_SECRET)
    rest = bare.client(venue.http_url, bare.nonces(tmp_path / "m1"), 5)
    with pytest.raises(GeminiApiError, match="MissingAccount"):
        rest.balances()
    scoped = GeminiCredentials(MASTER_KEY, MASTER_SECRET, account="primary")
    gemini = execution(venue, tmp_path, scoped)
    events, _ = gemini.place(crossing_buy(venue), None, int(time.time() * 1000))
    assert [e["kind"] for e in events] == ["ACCEPTED", "FILLED"]


def test_credentials_read_the_nonce_setting_and_account_from_the_environment():
    creds = GeminiCredentials.load(environ={"GEMINI_API_KEY": "k", "GEMINI_API_SECRET": "hush-42",
                                            "GEMINI_NONCE": "time", "GEMINI_ACCOUNT": "primary"})
    assert (creds.nonce, creds.account) == ("time", "primary")
    assert "hush-42" not in repr(creds) and "hush-42" not in str(creds)
    with pytest.raises(PipelineError, match="increasing or time"):
        GeminiCredentials("k", "s", nonce="sometimes")


def test_an_in_doubt_error_is_never_a_refusal():
    # The classes a caller branches on: "may have executed" is not a kind of refusal.
    assert not issubclass(GeminiInDoubt, GeminiApiError)
    assert issubclass(GeminiRateLimited, GeminiApiError)


def test_processes_sharing_the_rate_file_share_one_budget(tmp_path):
    now, slept = [1000.0], []

    def sleep(seconds):
        slept.append(round(seconds, 6))
        now[0] += seconds

    one = SharedTokenBucket(tmp_path / "rate", 5, 5, clock=lambda: now[0], sleep=sleep)
    two = SharedTokenBucket(tmp_path / "rate", 5, 5, clock=lambda: now[0], sleep=sleep)
    for bucket in (one, two, one, two, one):  # the burst of 5, split between two users
        bucket.take()
    assert slept == []
    two.take()  # the sixth call, whoever makes it, waits for the rate
    assert slept == [0.2]
    one.take()
    assert slept == [0.2, 0.2]
