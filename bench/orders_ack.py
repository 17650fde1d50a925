"""Order -> acknowledged by the venue: Gemini's WebSocket API beside its REST API, alone
and end to end (a venue frame -> the order it triggers acknowledged by the venue).

The execution client as deployed (:class:`~pipeline.gemini.ws_execution.GeminiWsExecution`
and :class:`~pipeline.gemini.execution.GeminiExecution`), each placing the same kind of
order on one local venue (generator, BTCUSD) over real loopback sockets: an
immediate-or-cancel buy through the best ask (so it fills and closes, and nothing piles
up). A sample runs from the ``place()`` call (the request has passed execution's
decision) to its return with the ACCEPTED event: the venue's answer to ``order.place``
over the open, authenticated socket, or to a signed ``POST /v1/order/new`` (a kept-alive
HTTP connection). Orders are paced under Gemini's 10 a second, so neither path waits on
the rate limit. The two run alternately in one process, on one venue, in the same run.

End to end (:func:`frame_to_ack`): the end-to-end latency bench's path (venue frame ->
producer -> orderbook group -> MidQuoter's strategy group -> ``orders.requests``), then
the execution group in sandbox mode sending to the same venue over the WebSocket API or
REST; a sample runs from the frame's send to the venue's acknowledgement of the frame's
first order (its ``order.place`` answered, or its ``POST /v1/order/new``), both read on
the venue's clock in this process. The frames are paced at ``E2E_RATE`` a second, so
MidQuoter's requotes (a replace per side per frame that moves the mid: a cancel and an
order each) stay under Gemini's 10 calls a second and nothing waits on the rate limit.
Only frames that moved the mid give a sample (a third to a half of them).
"""

from __future__ import annotations

import tempfile
import time
from decimal import Decimal
from pathlib import Path

from bench.execution import _percentile
from bench.figures import Figure
from pipeline.gemini.execution import GeminiCredentials, GeminiExecution, GeminiSettings
from pipeline.gemini.ws_execution import GeminiWsExecution
from pipeline.gemini.ws_session import WsSession
from pipeline.trading.signing import client_order_id
from pipeline.venue.rest import VenueKey
from pipeline.venue.server import RunningVenue, VenueConfig

# One key each: an account's order events reach every socket of its key, and the REST
# client's orders would be events of orders the WebSocket client does not follow.
KEYS = {"ws": ("account-bench-ws", "bench-api-secret-13579bdf"),
        "rest": ("account-bench-rest", "bench-api-secret-2468ace0")}
E2E_RATE = 3.0  # venue events a second end to end
E2E_FRAMES = (30, 150)  # frames measured per transport, from --events
PACE_S = 0.11  # under Gemini's 10 calls a second per key
MIN_ORDERS, MAX_ORDERS = 40, 150


def _request(i: int, price: str) -> dict:
    now = int(time.time() * 1000)
    trigger = f"bench-ack/{i}/{time.monotonic_ns()}"
    return {"client_order_id": client_order_id("bench", trigger), "strategy_id": "bench",
            "symbol": "BTCUSD", "side": "BUY", "order_type": "LIMIT", "price": price,
            "amount": "0.0001", "options": ["immediate-or-cancel"], "created_ms": now,
            "expires_ms": now + 60_000, "trigger": trigger, "signature": ""}


def measure(n: int) -> dict[str, list[float]]:
    venue = RunningVenue(VenueConfig(symbols=["BTCUSD"], rate=20, start_on_subscribe=False,
                                     api_keys={key: VenueKey(secret, time_nonce=True)
                                               for key, secret in KEYS.values()}))
    work = Path(tempfile.mkdtemp(prefix="bench-ack-"))
    try:
        settings = GeminiSettings(rate_per_s=10, burst=10, check_key=False)
        clients = {}
        for transport in ("rest", "ws"):
            credentials = GeminiCredentials(*KEYS[transport], nonce="time")
            nonces = credentials.nonces(work / "nonce")
            rest = credentials.client(venue.http_url, nonces, 10)
            if transport == "ws":
                session = WsSession(venue.ws_url, credentials.api_key,
                                    credentials.secret_for_signing(), 10)
                clients[transport] = GeminiWsExecution(session, rest, nonces, "SANDBOX",
                                                       lambda *a: None, settings)
                clients[transport].poll(0)  # connect and subscribe before timing
            else:
                clients[transport] = GeminiExecution(rest, nonces, "SANDBOX",
                                                     lambda *a: None, settings)
        samples: dict[str, list[float]] = {"rest": [], "ws": []}
        for i in range(n + 5):
            for transport, client in clients.items():
                price = _price_through_ask(venue)
                request = _request(i, price)
                start = time.perf_counter()
                events, _ = client.place(request, None, int(time.time() * 1000))
                took = (time.perf_counter() - start) * 1000
                if events[0]["kind"] != "ACCEPTED":
                    raise RuntimeError(f"bench order refused: {events[0]['reason']}")
                if i >= 5:  # warm-up: connections, first lookups
                    samples[transport].append(took)
                time.sleep(PACE_S)
        for client in clients.values():
            client.close()
        return samples
    finally:
        venue.stop()


def _price_through_ask(venue: RunningVenue) -> str:
    import asyncio

    async def best_ask():
        levels = venue.venue.market.levels("BTCUSD", "ask")
        return levels[0][0] if levels else Decimal("0")

    ask = asyncio.run_coroutine_threadsafe(best_ask(), venue.loop).result(10)
    return format((ask + 50).quantize(Decimal("0.01")), "f")


def frame_to_ack(bootstrap: str, registry_url: str, frames: int) -> dict[str, list[float]]:
    """Frame sent -> first order acknowledged, in ms, per transport (see the module doc)."""
    from bench import latency

    samples: dict[str, list[float]] = {}
    for transport in ("rest", "ws"):
        key, secret = KEYS[transport]
        work = Path(tempfile.mkdtemp(prefix=f"bench-ack-{transport}-"))

        def acked(venue: RunningVenue, transport: str = transport) -> dict[str, float]:
            if transport == "ws":
                log = list(venue.venue.wstrading.log)
                return {e["client_order_id"]: e["at"] for e in log if e.get("at")}
            return {e["client_order_id"]: e["at"] for e in list(venue.venue.rest_log)
                    if e["path"] == "/v1/order/new" and e["outcome"] == "accepted"}

        try:
            found, _, _ = latency.measure(
                bootstrap, registry_url, frames, work, rate=E2E_RATE, acked=acked,
                execution=("--mode", "sandbox", "--gemini-transport", transport,
                           "--venue-url", "{venue}", "--gemini-rate", "10",
                           "--gemini-burst", "10", "--price-band-bps", "500",
                           "--max-book-age-s", "off"),
                venue_keys={key: VenueKey(secret, time_nonce=True)},
                env={"GEMINI_API_KEY": key, "GEMINI_API_SECRET": secret,
                     "GEMINI_NONCE": "time"})
        finally:
            import shutil
            shutil.rmtree(work, ignore_errors=True)
        samples[transport] = [ms for _, ms in found]
    return samples


def run(bootstrap: str, registry_url: str, events: int) -> list[Figure]:
    n = max(MIN_ORDERS, min(events // 1000, MAX_ORDERS))
    samples = measure(n)
    name = "Gemini order -> acknowledged by the venue, WebSocket API (order.place)"
    base = "the same over REST (signed POST /v1/order/new, kept-alive connection)"
    figures = [Figure(f"{name}, {label}", _percentile(samples["ws"], q), "ms",
                      len(samples["ws"]), f"{base}, {label}", _percentile(samples["rest"], q),
                      "") for label, q in (("p50", 0.5), ("p99", 0.99))]
    low, high = E2E_FRAMES
    e2e = frame_to_ack(bootstrap, registry_url, max(low, min(events // 2000, high)))
    name = (f"end to end @{E2E_RATE:.0f} events/s: venue frame sent -> its order acknowledged "
            "by the venue, WebSocket API (sandbox execution)")
    base = "the same, orders over REST"
    figures += [Figure(f"{name}, {label}", _percentile(e2e["ws"], q), "ms", len(e2e["ws"]),
                       f"{base}, {label}", _percentile(e2e["rest"], q), "")
                for label, q in (("p50", 0.5), ("p99", 0.99))]
    return figures


if __name__ == "__main__":
    import os
    for figure in run(os.environ["KAFKA_BOOTSTRAP_SERVERS"], os.environ["SCHEMA_REGISTRY_URL"],
                      40_000):
        print(f"{figure.name}: {figure.value:.2f} ms vs {figure.baseline}: "
              f"{figure.baseline_value:.2f} ms (x{figure.ratio:.2f})")
