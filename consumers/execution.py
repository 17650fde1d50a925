"""The ``execution`` consumer group: signed order requests in, orders out, order events out.

For each ``OrderRequest`` on ``<ns>.orders.requests`` (key: symbol) it checks, in order:

1. ``unknown_strategy``: no signing key for the request's ``strategy_id``;
2. ``bad_signature``: the HMAC-SHA256 of the request does not match (any field changed,
   or signed with another key);
3. ``duplicate``: its ``client_order_id`` was acted on before (also across restarts and
   rebalances: see "at most once" below);
4. ``risk:kill_switch``: the kill switch is on: the file ``<run_dir>/kill-switch`` exists
   (``run/kill-switch`` by default: ``touch`` it to stop all trading of every instance,
   remove it to resume); checked once per batch, so flipping it takes effect within one
   batch;
5. ``expired``: ``expires_ms`` is in the past (injected clock);
6. ``invalid_request``: amount or price is not a positive decimal (or a LIMIT without one);
7. the risk limits of ``pipeline.risk`` (``risk:price_band``, ``risk:max_notional``,
   ``risk:max_position``, ``risk:rate_limit``) against the latest ``BookSnapshot`` of the
   symbol, which the group reads from ``<ns>.book.snapshots`` alongside the requests;

A request that fails 1 or 2 is not remembered (a forger must not be able to burn a real
strategy's id); every authenticated request is decided once and remembered, whatever the
decision (``rejected:<reason>`` in ``orders.seen``), so a replay is a ``duplicate``.

It then executes the request in one of three modes and publishes ``OrderEvent`` records (key:
client_order_id) to ``<ns>.orders.events``: ACCEPTED, then PARTIALLY_FILLED / FILLED /
CANCELLED, or one REJECTED with the reason. Amounts are exact decimal strings.

* ``paper`` (default): filled against the latest snapshot by ``pipeline.paper`` (a taker
  at the snapshot's levels, never resting: partial fills cancel the rest). No HTTP.
* ``sandbox``: sent to Gemini's sandbox or the local venue (``--venue-url``).
* ``live``: sent to Gemini. Only with ``--live``, an API key and secret present, and a
  ``live`` namespace; otherwise the group refuses to start.

An order is sent as ``POST /v1/order/new`` (``exchange limit``, with the request's
``client_order_id``; a MARKET request as an immediate-or-cancel limit at the price band's
edge), signed with a nonce from a ``NonceSource`` file under the run directory (strictly
increasing across restarts), through a token bucket (``gemini_rate_per_s``, default 5/s)
that every private call shares. Orders still live after placement are followed with
``order/status`` every ``follow_interval_s`` until they fill or are cancelled.

At most once per client_order_id, and exactly one outcome per request
------------------------------------------------------------------------

The group runs in transactional mode: each batch's order events, its ``SeenOrder``
records (compacted ``<ns>.orders.seen``, key client_order_id) and its input offsets
commit in one Kafka transaction. On assignment the handler reads ``orders.seen`` to its
end, waiting until no transaction written before it started is still open (so a killed
predecessor's work is either visible or aborted), and refuses every id found there.

A paper order or a rejection has no effect outside Kafka, so the transaction is enough.
A sandbox/live order is an effect outside Kafka that a transaction cannot take back, so
before any HTTP the handler writes ``SeenOrder(outcome="sending")``, the *intent*, with a
separate idempotent (non-transactional) producer and waits for the broker's ack. Kill -9
at each point:

* before the intent is acked: nothing left the process; the transaction is aborted and
  the request is read again and handled as new;
* after the intent, before or during the HTTP call, or after it but before the commit:
  the transaction (events, final SeenOrder, offsets) is aborted, the intent survives.
  The request is read again, finds ``sending`` and is *reconciled*: ``order/status`` by
  client_order_id. Found: the order is adopted (ACCEPTED and its fills are published,
  nothing is sent). Not found: the order was never placed and never will be, because
  the status call was signed with a nonce larger than the lost request's, and the
  exchange refuses any nonce at or below the last one it accepted; so it is sent now
  (re-checked against expiry and risk first);
* after the commit: events, ``sent``/``open:<order_id>``/``paper``/``rejected:<reason>``
  and offsets are all visible; the request is not read again (and if a copy comes, it is
  a ``duplicate``).

An HTTP timeout or connection error while sending is the same "in doubt" case in the
same process: ``order/status`` by client_order_id decides, never a blind resend. If the
status cannot be had either (Gemini unreachable), the batch must neither commit nor
dead-letter the request: ``ExecutionHalted`` aborts the batch's transaction (as a kill -9
at that point would, which the intent makes safe), the command line exits with status 3
and the restarted group reconciles.

Nonces: a request Gemini refuses with ``InvalidNonce`` was not executed (the nonce is
checked before anything else), so the handler moves the nonce file forward (to the
larger of its value and the clock, plus ``nonce_jump_us``) and retries once with a new
nonce; a second refusal rejects the request (``gemini:InvalidNonce``).

State restored on assignment: seen ids from ``orders.seen``; positions, open orders and
their fills so far from ``orders.events`` (the latest non-REJECTED event per id of this
mode); the per-strategy rate window from the ``seen_ms`` of recent seen ids; the latest
book per symbol from the last ``snapshot_lookback`` records of each assigned
``book.snapshots`` partition, read before the first request is handled (the group then
goes on from that partition's end).

Instances: start more with distinct ``--instance`` names (each is its own static group
member and transactional.id; two processes with one name fence each other). A symbol's
requests and snapshots share a partition number (same key, same partition count), and
the default range assignor gives both to the same instance.

Secrets (the Gemini secret, strategy keys) are never logged, put in a topic or in an
exception message; events carry Gemini's reason codes, not its messages.

Run: ``python -m consumers.execution --bootstrap HOST:PORT --registry URL --namespace NS
[--mode paper|sandbox|live] [--live] [--venue-url URL] --strategy-keys FILE
[--api-key-file FILE]`` (the Gemini key/secret from ``GEMINI_API_KEY`` and
``GEMINI_API_SECRET`` or a 0600 JSON file ``{"api_key": ..., "api_secret": ...}``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, NoReturn

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from pipeline import risk
from pipeline.catalog import Namespace
from pipeline.errors import PipelineError
from pipeline.gemini.rest import (LIVE_URL, SANDBOX_URL, GeminiApiError, GeminiError,
                                  GeminiRestClient, NonceSource)
from pipeline.kafka import ReliableProducer
from pipeline.paper import DEFAULT_FEE_RATE, PaperBook
from pipeline.registry import SchemaRegistry
from pipeline.risk import BookTop, RiskLimits, RiskState, plain
from pipeline.runtime import (GroupConfig, Handler, Output, Record, group_parser,
                              log_to_stderr, run_until_stopped)
from pipeline.serde import Decoder, Serde
from pipeline.signing import StrategyKeys, read_private_json, verify

log = logging.getLogger(__name__)

MODES = ("paper", "sandbox", "live")
KILL_SWITCH_FILE = "kill-switch"
SENDING = "sending"
TERMINAL_KINDS = ("FILLED", "CANCELLED", "REJECTED")
ZERO = Decimal(0)


class ExecutionHalted(BaseException):
    """An order's fate is unknown and cannot be learned now: stop without committing.

    A ``BaseException`` on purpose: the runtime dead-letters a handler's ``Exception`` and
    commits the batch, which would forget an order that may be live. Raised through
    ``GroupRunner.run``, it aborts the batch's transaction and leaves the group without
    committing (as a kill -9 at that point would, which the intent makes safe); the command
    line then exits with status 3 and the restarted group reconciles.
    """


@dataclass(frozen=True)
class ExecutionSettings:
    mode: str = "paper"  # paper | sandbox | live
    run_dir: Path = Path("run")  # the pipeline's run directory: kill switch, execution/
    risk: RiskLimits = field(default_factory=RiskLimits)
    venue_url: str | None = None  # default: Gemini's sandbox / live URL for the mode
    live_confirmed: bool = False  # the --live flag: live mode needs it as well
    gemini_rate_per_s: float = 5.0  # every private call goes through this token bucket
    gemini_burst: int = 5
    gemini_timeout_s: float = 10.0
    status_attempts: int = 3  # order/status tries to settle an order in doubt
    status_backoff_s: float = 0.5
    follow_interval_s: float = 2.0  # how often a live order's status is polled
    paper_fee_rate: Decimal = DEFAULT_FEE_RATE
    snapshot_lookback: int = 1000  # book.snapshots records re-read per partition on assign
    nonce_jump_us: int = 60_000_000  # how far past the clock an InvalidNonce moves the nonce
    kill_switch_file: Path | None = None  # default: <run_dir>/kill-switch
    restore_timeout_s: float = 60.0  # waiting for a dead member's open transaction to end
    batch_size: int | None = None  # default: 500 for paper, 10 when orders go over HTTP
    instance: str = "0"  # with the group id: transactional.id and group.instance.id

    @property
    def sends_http(self) -> bool:
        return self.mode in ("sandbox", "live")

    @property
    def url(self) -> str:
        return self.venue_url or (LIVE_URL if self.mode == "live" else SANDBOX_URL)

    @property
    def kill_switch_path(self) -> Path:
        return self.kill_switch_file or Path(self.run_dir) / KILL_SWITCH_FILE

    @property
    def nonce_path(self) -> Path:
        return Path(self.run_dir) / "execution" / "gemini-nonce"


class GeminiCredentials:
    """A Gemini API key and secret; the secret is never shown (repr, str, logs)."""

    def __init__(self, api_key: str, api_secret: str) -> None:
        if not api_key or not api_secret:
            raise PipelineError("a Gemini API key and secret are both needed")
        self.api_key = api_key
        self.__secret = api_secret

    def __repr__(self) -> str:
        return f"GeminiCredentials(api_key={self.api_key!r}, api_secret=***)"

    __str__ = __repr__

    def client(self, url: str, nonces: NonceSource, timeout_s: float) -> GeminiRestClient:
        return GeminiRestClient(url, self.api_key, self.__secret, nonces, timeout_s)

    @classmethod
    def load(cls, key_file: str | Path | None = None,
             environ: Mapping[str, str] | None = None) -> "GeminiCredentials | None":
        """From a 0600 JSON file ``{"api_key": ..., "api_secret": ...}``, else from
        ``GEMINI_API_KEY``/``GEMINI_API_SECRET``; None when neither has them."""
        if key_file is not None:
            path = Path(key_file)
            data = read_private_json(path, "API key file")
            if not isinstance(data, dict) or not all(isinstance(data.get(k), str) and data[k]
                                                     for k in ("api_key", "api_secret")):
                raise PipelineError(f"API key file {path} must be a JSON object with "
                                    "\"api_key\" and \"api_secret\"")
            return cls(data["api_key"], data["api_secret"])
        env = os.environ if environ is None else environ
        if env.get("GEMINI_API_KEY") and env.get("GEMINI_API_SECRET"):
            return cls(env["GEMINI_API_KEY"], env["GEMINI_API_SECRET"])
        return None


class TokenBucket:
    """``rate`` calls per second sustained, bursts of ``burst``; ``take`` blocks."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0 or burst < 1:
            raise PipelineError("the Gemini rate limit needs rate > 0 and burst >= 1")
        self.rate, self.burst, self.clock, self.sleep = rate, burst, clock, sleep
        self.tokens = float(burst)
        self.at = clock()

    def take(self) -> None:
        self._refill()
        if self.tokens < 1:
            self.sleep((1 - self.tokens) / self.rate)
            self._refill()
        self.tokens -= 1

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now


@dataclass
class Seen:
    outcome: str
    seen_ms: int
    strategy_id: str


@dataclass
class Followed:
    """An order live at the exchange whose fills we still publish."""

    client_order_id: str
    strategy_id: str
    symbol: str
    side: str
    price: str | None
    amount: str
    order_id: str
    seen_ms: int
    filled: Decimal = ZERO
    next_poll: float = 0.0


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def read_committed(bootstrap: str, topic: str, timeout_s: float) -> Iterator[Message]:
    """Every committed record of ``topic``, to its end.

    First waits until every record written before the call is decided: the committed
    end (the last stable offset) must reach the end including open transactions, so an
    open transaction of a dead member (aborted when its transactional.id restarts, or
    after transaction.timeout.ms) is never mistaken for the end of the topic.
    """
    group = f"restore-{uuid.uuid4()}"
    base = {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}
    uncommitted = Consumer({**base, "isolation.level": "read_uncommitted"})
    consumer = Consumer({**base, "isolation.level": "read_committed"})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        deadline = time.monotonic() + timeout_s
        ends: dict[int, int] = {}
        for p in sorted(meta.partitions):
            target = uncommitted.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            while True:
                low, stable = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                if stable >= target:
                    break
                if time.monotonic() > deadline:
                    raise PipelineError(
                        f"{topic}[{p}] still has a transaction open after {timeout_s:.0f}s "
                        f"(stable offset {stable} < end {target}): is another execution "
                        "instance stuck?")
                time.sleep(0.05)
            if stable > low:
                ends[p] = stable
        if not ends:
            return
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        while ends:
            for msg in consumer.consume(1000, 0.2):
                if msg.error() is None:
                    yield msg
            for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
                if tp.offset >= ends[tp.partition]:
                    del ends[tp.partition]
            if ends and time.monotonic() > deadline + 60:
                raise PipelineError(f"could not read {topic} to its end: stuck at "
                                    f"{sorted(ends.items())}")
    finally:
        consumer.close()
        uncommitted.close()


class ExecutionHandler(Handler):
    def __init__(self, namespace: Namespace, serde: Serde, bootstrap: str,
                 settings: ExecutionSettings, keys: StrategyKeys,
                 credentials: GeminiCredentials | None = None,
                 clock_ms: Callable[[], int] = wall_clock_ms) -> None:
        self.settings, self.keys, self.clock_ms, self.bootstrap = settings, keys, clock_ms, bootstrap
        self.mode = settings.mode.upper()
        self.topic = {n: namespace.topic(n) for n in ("orders.requests", "book.snapshots",
                                                      "orders.events", "orders.seen")}
        self.encode_event = serde.encoder(self.topic["orders.events"])
        self.encode_seen = serde.encoder(self.topic["orders.seen"])
        self.decode = serde.decoder()
        self.books: dict[str, BookTop] = {}
        self.paper_books: dict[str, PaperBook] = {}
        self.seen: dict[str, Seen] = {}
        self.state = RiskState()
        self.followed: dict[str, Followed] = {}
        self.counts: Counter = Counter()
        self._owned: set[int] = set()
        self._partitions = 0
        self._kill_checked = False
        self._killed = False
        self.halted: str | None = None
        self.client: GeminiRestClient | None = None
        self.intents: ReliableProducer | None = None
        if settings.sends_http:
            if credentials is None:
                raise PipelineError(f"{settings.mode} mode needs a Gemini API key and secret")
            self.nonces = NonceSource(settings.nonce_path)
            self.client = credentials.client(settings.url, self.nonces, settings.gemini_timeout_s)
            self.bucket = TokenBucket(settings.gemini_rate_per_s, settings.gemini_burst)
            self.intents = ReliableProducer(bootstrap, **{"linger.ms": 0})

    # -- records

    def handle(self, record: Record) -> Iterable[Output]:
        if record.topic == self.topic["book.snapshots"]:
            self._on_snapshot(record.value)
            return ()
        return self._on_request(record.value)

    def _on_snapshot(self, snapshot: dict) -> None:
        top = BookTop.from_snapshot(snapshot)
        known = self.books.get(top.symbol)
        if known is not None and known.ts_ms > top.ts_ms:
            return  # an older snapshot (re-read after a restart): keep the newer
        self.books[top.symbol] = top
        self.paper_books.setdefault(top.symbol, PaperBook()).replace(top.bids, top.asks)

    def _on_request(self, req: dict) -> list[Output]:
        cid, strategy_id = req["client_order_id"], req["strategy_id"]
        key = self.keys.key(strategy_id)
        if key is None:
            return self._reject(req, "unknown_strategy", remember=False)
        if not verify(req, key):
            return self._reject(req, "bad_signature", remember=False)
        prior = self.seen.get(cid)
        if prior is not None and prior.outcome != SENDING:
            return self._reject(req, "duplicate", remember=False,
                                detail=f"already {prior.outcome}")
        if prior is not None:
            # An intent without an outcome: a predecessor may have placed the order.
            self.counts["reconciled"] += 1
            order = self._status_fence(cid)
            if order is not None:
                log.info("%s: in doubt after a restart; found at the exchange, adopting it", cid)
                return self._adopt(req, order, prior.seen_ms, price_sent=order.get("price"))
            log.info("%s: in doubt after a restart; not at the exchange (fenced), sending", cid)
        now = self.clock_ms()
        if self._kill_switch():
            return self._reject(req, risk.KILL_SWITCH)
        if req["expires_ms"] < now:
            return self._reject(req, "expired", detail=f"expired {now - req['expires_ms']} ms ago")
        side = req["side"].lower()
        amount = risk.parse_amount(req["amount"])
        price = risk.parse_amount(req["price"]) if req["order_type"] == "LIMIT" else None
        if amount is None or (req["order_type"] == "LIMIT" and price is None):
            return self._reject(req, "invalid_request",
                                detail="amount and a LIMIT's price must be positive decimals")
        decision = risk.check(self.settings.risk, self.state, self.books.get(req["symbol"]),
                              strategy_id=strategy_id, symbol=req["symbol"], side=side,
                              order_type=req["order_type"], price=price, amount=amount,
                              now_ms=now)
        if not decision.accepted:
            return self._reject(req, decision.reason, price=decision.price, detail=decision.detail)
        self.state.note_accepted(strategy_id, now)
        if not self.settings.sends_http:
            return self._paper(req, decision.price, amount, now)
        return self._send(req, decision.price, now if prior is None else prior.seen_ms)

    def _kill_switch(self) -> bool:
        if not self._kill_checked:
            killed = self.settings.kill_switch_path.exists()
            if killed != self._killed:
                log.warning("kill switch %s (%s)", "ON: rejecting every request" if killed
                            else "off", self.settings.kill_switch_path)
            self._killed, self._kill_checked = killed, True
        return self._killed

    # -- outcomes

    def _event(self, req: dict, kind: str, *, reason: str | None = None,
               price: str | None = None, filled: Decimal = ZERO, avg: str | None = None,
               fee: str | None = None, fee_currency: str | None = None,
               order_id: str | None = None) -> Output:
        self.counts[kind] += 1
        value = self.encode_event({
            "client_order_id": req["client_order_id"], "strategy_id": req["strategy_id"],
            "symbol": req["symbol"], "kind": kind, "reason": reason, "mode": self.mode,
            "exchange_order_id": order_id, "side": str(req["side"]).lower(),
            "price": price if price is not None else req.get("price"), "amount": req["amount"],
            "filled_amount": plain(filled), "avg_fill_price": avg, "fee": fee,
            "fee_currency": fee_currency, "event_ms": self.clock_ms()})
        return Output(self.topic["orders.events"], value, req["client_order_id"])

    def _remember(self, req: dict, outcome: str, seen_ms: int) -> Output:
        cid = req["client_order_id"]
        self.seen[cid] = Seen(outcome, seen_ms, req["strategy_id"])
        value = self.encode_seen({"client_order_id": cid, "strategy_id": req["strategy_id"],
                                  "outcome": outcome, "seen_ms": seen_ms})
        return Output(self.topic["orders.seen"], value, cid)

    def _reject(self, req: dict, reason: str, *, remember: bool = True,
                price: Decimal | None = None, detail: str = "") -> list[Output]:
        log.info("REJECTED %s (%s %s): %s%s", req["client_order_id"], req["strategy_id"],
                 req["symbol"], reason, f" ({detail})" if detail else "")
        out = [self._event(req, "REJECTED", reason=reason,
                           price=plain(price) if price is not None else None)]
        if remember:  # an authenticated request is decided once, whatever the decision
            out.append(self._remember(req, f"rejected:{reason}", self.clock_ms()))
        return out

    def _paper(self, req: dict, price: Decimal, amount: Decimal, now: int) -> list[Output]:
        side = req["side"].lower()
        book = self.paper_books[req["symbol"]]  # risk.check passed: a snapshot is known
        result = book.fill(req["symbol"], side, price, amount, req["options"],
                           self.settings.paper_fee_rate)
        filled = result.filled
        if filled:
            self.state.apply_fill(req["symbol"], side, filled)
        sent = plain(price)
        out = [self._event(req, "ACCEPTED", price=sent)]
        fills = dict(price=sent, filled=filled, fee=plain(result.fee),
                     fee_currency=result.fee_currency,
                     avg=plain(result.avg_price) if result.avg_price is not None else None)
        if result.cancel_reason is None:
            out.append(self._event(req, "FILLED", **fills))
        else:
            if filled:
                out.append(self._event(req, "PARTIALLY_FILLED", **fills))
            out.append(self._event(req, "CANCELLED", reason=result.cancel_reason, **fills))
        out.append(self._remember(req, "paper", now))
        return out

    # -- over HTTP

    def _call(self, what: str, fn: Callable[[], dict]) -> dict:
        """One private call through the rate limit; an InvalidNonce refusal (nothing was
        executed) moves the nonce source forward and retries once."""
        self.bucket.take()
        try:
            return fn()
        except GeminiApiError as exc:
            if exc.reason != "InvalidNonce":
                raise
            self.counts["invalid_nonce"] += 1
            moved = self.nonces.advance(self.settings.nonce_jump_us)
            log.warning("%s: Gemini refused the nonce; nonce file moved forward to %d, "
                        "retrying once", what, moved)
            self.bucket.take()
            return fn()

    def _status_fence(self, cid: str) -> dict | None:
        """The order with ``cid`` at the exchange, or None if it is not there.

        None is final: this call's nonce is above any nonce a lost order request carried,
        so that request can no longer be accepted. Raises ExecutionHalted when the
        exchange cannot be asked.
        """
        assert self.client is not None
        for attempt in range(self.settings.status_attempts):
            try:
                return self._call(f"status {cid}",
                                  lambda: self.client.order_status(client_order_id=cid))
            except GeminiApiError as exc:
                if exc.reason == "OrderNotFound":
                    return None
                failure = f"{exc.reason} ({exc.http_status})"
            except GeminiError as exc:
                failure = type(exc).__name__
            log.warning("%s: order status unknown (%s), attempt %d", cid, failure, attempt + 1)
            time.sleep(self.settings.status_backoff_s * (attempt + 1))
        self._halt(f"order {cid} is in doubt and its status cannot be had: stopping "
                   "without committing; a restart reconciles it")

    def _halt(self, why: str) -> NoReturn:
        """Stop without committing this batch (see ``ExecutionHalted``)."""
        self.halted = why
        log.critical("execution halted: %s", why)
        raise ExecutionHalted(why)

    def _send(self, req: dict, price: Decimal, seen_ms: int) -> list[Output]:
        cid = req["client_order_id"]
        # The intent: durable before anything leaves the process.
        assert self.intents is not None
        try:
            self.intents.produce(self.topic["orders.seen"], self.encode_seen({
                "client_order_id": cid, "strategy_id": req["strategy_id"], "outcome": SENDING,
                "seen_ms": seen_ms}), cid)
            self.intents.flush(30)
        except Exception as exc:  # noqa: BLE001 - without the intent nothing may be sent
            self._halt(f"cannot record the intent for {cid}: {exc}")
        self.seen[cid] = Seen(SENDING, seen_ms, req["strategy_id"])
        try:
            return self._place(req, price, seen_ms)
        except ExecutionHalted:
            raise
        except Exception as exc:  # noqa: BLE001 - an order may be live: never dead-letter it
            log.exception("order %s: unexpected error after its intent", cid)
            self._halt(f"order {cid}: {type(exc).__name__} after its intent")

    def _place(self, req: dict, price: Decimal, seen_ms: int) -> list[Output]:
        assert self.client is not None
        cid = req["client_order_id"]
        price_text = req["price"] if req["order_type"] == "LIMIT" else plain(price)
        options = list(req["options"]) if req["order_type"] == "LIMIT" else ["immediate-or-cancel"]

        def new_order() -> dict:
            return self.client.new_order(req["symbol"], req["amount"], price_text,
                                         req["side"].lower(), client_order_id=cid,
                                         options=options)

        for attempt in (1, 2):
            try:
                order = self._call(f"new order {cid}", new_order)
                break
            except GeminiApiError as exc:
                return self._reject(req, f"gemini:{exc.reason}", price=Decimal(price_text),
                                    detail=f"HTTP {exc.http_status}")
            except GeminiError as exc:  # timeout or connection failure: in doubt
                self.counts["in_doubt"] += 1
                log.warning("%s: %s while sending; asking for its status instead of resending",
                            cid, type(exc).__name__)
                found = self._status_fence(cid)
                if found is not None:
                    order = found
                    break
                if attempt == 2:
                    return self._reject(req, "gemini:unreachable", price=Decimal(price_text))
                log.info("%s: not at the exchange and fenced by the status call: sending once more",
                         cid)
        return self._adopt(req, order, seen_ms, price_sent=price_text)

    def _adopt(self, req: dict, order: dict, seen_ms: int, price_sent: str | None) -> list[Output]:
        """Events and state for an order the exchange has (just placed, or found)."""
        cid = req["client_order_id"]
        followed = Followed(cid, req["strategy_id"], req["symbol"], req["side"].lower(),
                            price_sent, req["amount"], str(order["order_id"]), seen_ms)
        out = [self._event(req, "ACCEPTED", price=price_sent, order_id=followed.order_id)]
        out += self._progress(followed, order, req)
        return out

    def _progress(self, f: Followed, order: dict, req: dict | None = None) -> list[Output]:
        """Events for what changed in an exchange order since we last looked."""
        req = req or {"client_order_id": f.client_order_id, "strategy_id": f.strategy_id,
                      "symbol": f.symbol, "side": f.side, "price": f.price, "amount": f.amount}
        executed = Decimal(order["executed_amount"])
        new = executed - f.filled
        if new > 0:
            self.state.apply_fill(f.symbol, f.side, new)
            f.filled = executed
        fills = dict(price=f.price, filled=executed, order_id=f.order_id,
                     avg=order.get("avg_execution_price") if executed else None)
        out: list[Output] = []
        if order.get("is_cancelled"):
            if new > 0:
                out.append(self._event(req, "PARTIALLY_FILLED", **fills))
            out.append(self._event(req, "CANCELLED", reason=order.get("reason") or "Cancelled",
                                   **fills))
        elif not order.get("is_live"):
            out.append(self._event(req, "FILLED", **fills))
        else:
            if new > 0:
                out.append(self._event(req, "PARTIALLY_FILLED", **fills))
            remaining = Decimal(order["remaining_amount"])
            self.state.note_open(f.client_order_id, f.symbol, f.side, remaining)
            if f.client_order_id not in self.followed:
                self.followed[f.client_order_id] = f
                f.next_poll = time.monotonic() + self.settings.follow_interval_s
                out.append(self._remember(req, f"open:{f.order_id}", f.seen_ms))
            return out
        self.state.note_closed(f.client_order_id)
        self.followed.pop(f.client_order_id, None)
        out.append(self._remember(req, "sent", f.seen_ms))
        return out

    def end_batch(self) -> Iterable[Output]:
        self._kill_checked = False  # look at the kill switch again in the next batch
        if not self.followed or self.client is None:
            return ()
        now = time.monotonic()
        due = [f for f in self.followed.values() if f.next_poll <= now and self._owns(f.symbol)]
        out: list[Output] = []
        for f in due[:max(1, int(self.settings.gemini_rate_per_s))]:
            f.next_poll = now + self.settings.follow_interval_s
            try:
                order = self._call(f"follow {f.client_order_id}",
                                   lambda: self.client.order_status(order_id=int(f.order_id)))
            except GeminiError as exc:  # read-only: try again next time
                log.warning("%s: status poll failed: %s", f.client_order_id,
                            getattr(exc, "reason", type(exc).__name__))
                continue
            out += self._progress(f, order)
        return out

    def _owns(self, symbol: str) -> bool:
        """Whether this instance owns ``symbol``'s requests partition (librdkafka's default
        partitioner: CRC-32 of the key), so exactly one instance follows its orders."""
        if not self._partitions or len(self._owned) >= self._partitions:
            return True
        return zlib.crc32(symbol.encode()) % self._partitions in self._owned

    # -- restore

    def on_assign(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        started = time.monotonic()
        self._owned = {tp.partition for tp in partitions if tp.topic == self.topic["orders.requests"]}
        timeout = self.settings.restore_timeout_s
        seen: dict[str, Seen] = {}
        for msg in read_committed(self.bootstrap, self.topic["orders.seen"], timeout):
            value = self._decoded(msg)
            if value is not None:
                seen[value["client_order_id"]] = Seen(value["outcome"], value["seen_ms"],
                                                      value["strategy_id"])
        latest: dict[str, dict] = {}
        for msg in read_committed(self.bootstrap, self.topic["orders.events"], timeout):
            value = self._decoded(msg)
            if value is not None and value["mode"] == self.mode and value["kind"] != "REJECTED":
                latest[value["client_order_id"]] = value
        self.seen, self.state, self.followed = seen, RiskState(), {}
        for event in latest.values():
            if Decimal(event["filled_amount"]):
                self.state.apply_fill(event["symbol"], event["side"], Decimal(event["filled_amount"]))
        now = self.clock_ms()
        self.state.restore_accepted(
            (s.strategy_id, s.seen_ms) for s in seen.values()
            if s.seen_ms > now - risk.MINUTE_MS and not s.outcome.startswith("rejected:"))
        for cid, s in seen.items():
            if not s.outcome.startswith("open:"):
                continue
            event = latest.get(cid)
            if event is None:
                log.error("%s is open at the exchange (order %s) but has no event: not followed",
                          cid, s.outcome[5:])
                continue
            f = Followed(cid, s.strategy_id, event["symbol"], event["side"], event["price"],
                         event["amount"], s.outcome[5:], s.seen_ms,
                         Decimal(event["filled_amount"]))
            self.followed[cid] = f
            self.state.note_open(cid, f.symbol, f.side, Decimal(f.amount) - f.filled)
        in_doubt = sum(s.outcome == SENDING for s in seen.values())
        starts = self._snapshot_starts(partitions)
        log.info("restored %d seen id(s) (%d in doubt, reconciled when their requests come "
                 "again), %d open order(s), positions %s in %.2fs", len(seen), in_doubt,
                 len(self.followed), {k: plain(v) for k, v in self.state.positions.items()},
                 time.monotonic() - started)
        return starts

    def _decoded(self, msg: Message) -> dict | None:
        try:
            return self.decode(msg.value())
        except Exception as exc:  # noqa: BLE001 - an unreadable record is skipped, loudly
            log.error("unreadable record at %s[%d]@%d: %s", msg.topic(), msg.partition(),
                      msg.offset(), exc)
            return None

    def _snapshot_starts(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """Load the latest books before any request is handled, and say where to go on.

        The last ``snapshot_lookback`` records of each assigned ``book.snapshots``
        partition are read here, to their current end (the newest book per symbol), and
        the group resumes those partitions at that end; requests resume at their committed
        offsets. Reading them in the group's own fetch instead would race the requests:
        a request could be handled before its symbol's book came back."""
        snapshots = self.topic["book.snapshots"]
        consumer = Consumer({"bootstrap.servers": self.bootstrap,
                             "group.id": f"restore-{uuid.uuid4()}", "enable.auto.commit": False,
                             "isolation.level": "read_committed"})
        try:
            meta = consumer.list_topics(self.topic["orders.requests"], timeout=10)
            self._partitions = len(meta.topics[self.topic["orders.requests"]].partitions)
            starts, ranges = [], {}
            for tp in partitions:
                if tp.topic == snapshots:
                    low, high = consumer.get_watermark_offsets(tp, timeout=10)
                    if high > low:
                        ranges[tp.partition] = (max(low, high - self.settings.snapshot_lookback),
                                                high)
                    tp = TopicPartition(snapshots, tp.partition, high)
                starts.append(tp)
            if ranges:
                consumer.assign([TopicPartition(snapshots, p, first)
                                 for p, (first, _) in ranges.items()])
                deadline = time.monotonic() + self.settings.restore_timeout_s
                while ranges:
                    for msg in consumer.consume(1000, 0.2):
                        value = self._decoded(msg) if msg.error() is None else None
                        if value is not None:
                            self._on_snapshot(value)
                    for tp in consumer.position([TopicPartition(snapshots, p) for p in ranges]):
                        if tp.offset >= ranges[tp.partition][1]:
                            del ranges[tp.partition]
                    if ranges and time.monotonic() > deadline:
                        raise PipelineError(f"could not read {snapshots} to its end: stuck at "
                                            f"{sorted(ranges.items())}")
            return starts
        finally:
            consumer.close()

    def close(self) -> Iterable[Output]:
        if self.client is not None:
            self.client.close()
        if self.intents is not None:
            self.intents.flush(10)
        return ()


def check_mode(namespace: Namespace, settings: ExecutionSettings,
               credentials: GeminiCredentials | None) -> None:
    """Refuse a configuration that could trade by accident."""
    if settings.mode not in MODES:
        raise PipelineError(f"unknown mode {settings.mode!r}: use {', '.join(MODES)}")
    if settings.mode == "live":
        if not settings.live_confirmed:
            raise PipelineError("live mode sends real orders: pass --live as well to confirm")
        if not namespace.is_live:
            raise PipelineError(f"live mode refuses namespace {namespace}: live orders only "
                                "from live data (a live or live-<suffix> namespace)")
    if settings.sends_http and credentials is None:
        raise PipelineError(f"{settings.mode} mode needs a Gemini API key and secret: set "
                            "GEMINI_API_KEY and GEMINI_API_SECRET or pass --api-key-file")


def make_group(bootstrap: str, registry_url: str, namespace: Namespace,
               settings: ExecutionSettings = ExecutionSettings(), *,
               keys: StrategyKeys | None = None, credentials: GeminiCredentials | None = None,
               clock_ms: Callable[[], int] = wall_clock_ms,
               group_id: str | None = None) -> GroupConfig:
    """The group's configuration (transactional); its id defaults to
    ``<namespace>.execution``. ``keys`` default to ``StrategyKeys.load()`` (environment)."""
    check_mode(namespace, settings, credentials)
    keys = keys if keys is not None else StrategyKeys.load()
    registry = SchemaRegistry(registry_url)
    serde = Serde(registry)
    group_id = group_id or f"{namespace}.execution"
    member = f"{group_id}-{settings.instance}"
    batch_size = settings.batch_size or (10 if settings.sends_http else 500)
    return GroupConfig(
        group_id=group_id,
        topics=[namespace.topic("orders.requests"), namespace.topic("book.snapshots")],
        dead_letter_topic=namespace.topic("dlq"),
        handler=lambda: ExecutionHandler(namespace, serde, bootstrap, settings, keys,
                                         credentials, clock_ms),
        decoder=Decoder(registry), batch_size=batch_size,
        transactional_id=member,
        # Static membership: a restarted instance takes its partitions back at once. A
        # short fetch wait: partitions that start later (e.g. after an offset reset) join
        # the next fetch without waiting out the broker's hold on an idle one.
        consumer_overrides={"group.instance.id": member, "fetch.wait.max.ms": 50},
        producer_overrides={"linger.ms": 0, "transaction.timeout.ms": 30000})


def _limit(text: str) -> Decimal | None:
    """A limit from the command line: a decimal, or "off"."""
    return None if text.lower() in ("off", "none") else Decimal(text)


def main(argv: list[str] | None = None) -> int:
    from pipeline.catalog import ensure_topics

    ap = group_parser("python -m consumers.execution")
    ap.add_argument("--mode", choices=MODES, default="paper")
    ap.add_argument("--live", action="store_true", help="confirm live mode: real orders")
    ap.add_argument("--venue-url", help="Gemini's URL [default: sandbox or live for the mode]")
    ap.add_argument("--strategy-keys", help="0600 JSON file {strategy_id: key}; the "
                    "environment's PIPELINE_STRATEGY_KEY_<ID> are used as well")
    ap.add_argument("--api-key-file", help="0600 JSON file {\"api_key\", \"api_secret\"} "
                    "[default: GEMINI_API_KEY / GEMINI_API_SECRET]")
    ap.add_argument("--run-dir", default=None,
                    help="the pipeline's run directory: <run-dir>/kill-switch, the nonce file "
                    "<run-dir>/execution/gemini-nonce [default: $PIPELINE_RUN_DIR or ./run]")
    ap.add_argument("--group", default=None, help="group id [default: <namespace>.execution]")
    ap.add_argument("--instance", default="0", help="this instance's name within the group")
    ap.add_argument("--gemini-rate", type=float, default=5.0, help="private calls per second")
    ap.add_argument("--gemini-burst", type=int, default=None)
    ap.add_argument("--max-notional", type=_limit, default=RiskLimits.max_notional,
                    help="quote currency per order, or off")
    ap.add_argument("--max-position", type=_limit, default=RiskLimits.max_position,
                    help="base currency per symbol, or off")
    ap.add_argument("--price-band-bps", type=Decimal, default=RiskLimits.price_band_bps)
    ap.add_argument("--max-orders-per-minute", type=_limit,
                    default=RiskLimits.max_orders_per_minute, help="per strategy, or off")
    ap.add_argument("--max-book-age-s", type=_limit,
                    default=RiskLimits.max_book_age_ms / 1000, help="seconds, or off")
    ap.add_argument("--follow-interval", type=float, default=2.0)
    ap.add_argument("--batch-size", type=int, default=None)
    args = ap.parse_args(argv)
    log_to_stderr()
    run_dir = Path(args.run_dir or os.environ.get("PIPELINE_RUN_DIR") or "run")
    try:
        namespace = Namespace(args.namespace)
        credentials = GeminiCredentials.load(args.api_key_file) \
            if args.mode != "paper" else None
        keys = StrategyKeys.load(args.strategy_keys)
        limits = RiskLimits(max_notional=args.max_notional, max_position=args.max_position,
                            price_band_bps=args.price_band_bps,
                            max_orders_per_minute=None if args.max_orders_per_minute is None
                            else int(args.max_orders_per_minute),
                            max_book_age_ms=None if args.max_book_age_s is None
                            else int(args.max_book_age_s * 1000))
        settings = ExecutionSettings(
            mode=args.mode, run_dir=run_dir, risk=limits, venue_url=args.venue_url,
            live_confirmed=args.live, gemini_rate_per_s=args.gemini_rate,
            gemini_burst=args.gemini_burst or max(1, int(args.gemini_rate)),
            follow_interval_s=args.follow_interval, batch_size=args.batch_size,
            instance=args.instance)
        check_mode(namespace, settings, credentials)
        ensure_topics(args.bootstrap, namespace, ["orders.requests", "book.snapshots",
                                                  "orders.events", "orders.seen", "dlq"])
        config = make_group(args.bootstrap, args.registry, namespace, settings, keys=keys,
                            credentials=credentials, group_id=args.group)
    except PipelineError as exc:
        log.error("%s", exc)
        return 2
    log.info("execution: mode %s, namespace %s, %r, run dir %s, limits %s", args.mode,
             namespace, keys, run_dir, limits)
    try:
        run_until_stopped(config, args.bootstrap)
    except ExecutionHalted as exc:
        log.error("execution halted: %s", exc)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
