"""The ``execution`` consumer group: signed order requests in, orders out, order events out.

Each ``OrderRequest`` on ``<ns>.orders.requests`` (key: symbol) is decided by the pure
:func:`~pipeline.trading.execution.decide` (signature, dedupe, kill switch, expiry,
validation, risk: see there) and acted on by an execution client; the group publishes the
``OrderEvent`` records (key: client_order_id) to ``<ns>.orders.events`` and remembers every
decided id in the compacted ``<ns>.orders.seen``. Requests are NEW, CANCEL, CANCEL_ALL or
REPLACE (cancel, then the new order once the cancel is confirmed).

Modes and their clients:

* ``paper`` (default): :class:`~pipeline.trading.paper.PaperExecution`, the simulated
  exchange the order-book backtest runs, fed ``md.l2`` and ``md.trades`` (the full book,
  not the snapshots' depth): orders rest with queue position, fill as makers or takers
  with Gemini's API fees, expire at ``expires_ms``, and are cancelled by requests. Risk
  is checked against that book. No HTTP.
* ``sandbox``: :class:`~pipeline.gemini.execution.GeminiExecution` against Gemini's
  sandbox or the local venue (``--venue-url``); risk is checked against ``book.snapshots``.
* ``live``: the same against Gemini. Only with ``--live``, an API key and secret present,
  and a ``live`` namespace; otherwise the group refuses to start.

**Kill switch.** The file ``<run_dir>/kill-switch`` (``touch`` it to stop all trading, of
every instance; remove it to resume) is read once per batch: while it exists every new
order is rejected (``risk:kill_switch``), and when it appears every open order is
cancelled within that batch (paper: in the simulator; Gemini: ``/v1/order/cancel/session``).

**Strategy halts.** Every instance follows the compacted ``<ns>.strategy.control`` in full
(read once per batch, like the kill switch): when a strategy's newest record halts it (the
``portfolio`` group's risk stop on drawdown or daily loss, or ``pipeline strategy halt``),
its open orders are cancelled within that batch and its new orders are rejected
(``risk:strategy_halted``) until a resume (``pipeline strategy resume ID``). A restarted
instance reads the topic to its end first, so a halt survives restarts.

**Symbol rules.** Every NEW and REPLACE is checked against Gemini's rules for its symbol
(price and amount steps, minimum amount, market status, options, client_order_id:
:mod:`pipeline.trading.rules`) before any client sees it, and refused
``rules:<Gemini's reason>``, in every mode. They are loaded once at start-up
(:func:`pipeline.gemini.symbols.startup_rules`): sandbox and live from the mode's own URL,
cached per day in ``<run_dir>/gemini``; paper from ``--rules-url`` or ``--rules-file``
when given, else none (only ids and options are checked).

**Exactly one outcome per request.** The group is transactional: a batch's order events,
its ``SeenOrder`` records, paper mode's state and the input offsets commit together. On
assignment it reads ``orders.seen`` to its end (waiting for transactions a dead member
left open) and refuses every id found there; positions, open orders and the rate window
come back from ``orders.events``. A Gemini order is an effect outside Kafka that a
transaction cannot take back: see :mod:`pipeline.gemini.execution` for the durable intent
recorded before it is sent and how a restart reconciles it (never by sending twice).

**Causal order (paper).** Requests, L2 changes and trades are three topics the consumer
interleaves as it fetches them. A request is held (in memory, its offset not committed)
until its partition's ``md.l2`` has reached the record that triggered it (a trigger
``md.l2/<partition>/<offset>``) and both market-data topics have reached the end they had
when the partition was assigned, so a request is never decided on a book older than the
one its strategy saw; a market-data partition silent for ``hold_idle_s`` counts as caught up.

**Paper orders survive restarts.** With its events, each batch writes the simulator's
orders (queue positions, taken liquidity) of the symbols that changed to the compacted
``<ns>.paper.state``, and every ``checkpoint_interval_s`` its touched books. A restarted
instance loads both for its ``md.l2`` partitions, re-applies the ``md.l2`` records between
each book's offset and the committed offset, and goes on filling, expiring and cancelling
the same resting orders, as an uninterrupted run would have.

Instances: start more with distinct ``ctx.instance`` names (``instances`` in the topology,
``--instance`` on the command line; each is its own static group member and
transactional.id). A symbol's requests, L2 changes, trades and snapshots share a
partition number (same key, same partition count), and the default range assignor gives
them to the same instance.

Secrets (the Gemini secret, strategy keys) are never logged, put in a topic or in an
exception message; events carry Gemini's reason codes, not its messages.

Run: ``python -m consumers.execution --bootstrap HOST:PORT --registry URL --namespace NS
[--mode paper|sandbox|live] [--live] [--venue-url URL] --strategy-keys FILE
[--api-key-file FILE]`` (the Gemini key/secret from ``GEMINI_API_KEY`` and
``GEMINI_API_SECRET`` or a 0600 JSON file ``{"api_key": ..., "api_secret": ...}``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Callable, Iterable

from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Decoder, Serde
from pipeline.core.decimals import plain
from pipeline.core.errors import PipelineError
from pipeline.core.records import OrderEvent
from pipeline.core.vocabulary import (
    TERMINAL_KINDS,
    ExecutionMode,
    OrderEventKind,
    PaperStateKind,
)
from pipeline.gemini.execution import GeminiCredentials, GeminiExecution, GeminiSettings
from pipeline.gemini.ratelimit import SharedTokenBucket
from pipeline.gemini.rest import LIVE_URL, SANDBOX_URL
from pipeline.gemini.symbols import startup_rules
from pipeline.gemini.ws_execution import GeminiWsExecution
from pipeline.gemini.ws_session import WS_LIVE, WS_SANDBOX, WsSession
from pipeline.kafka.catalog import Namespace
from pipeline.kafka.clients import ReliableProducer
from pipeline.ops.kill_switch import kill_switch_path
from pipeline.runtime.context import AssignContext, Follower, Partition
from pipeline.runtime.contract import GroupContext, convert, group_main
from pipeline.runtime.runner import (
    GroupConfig,
    Handler,
    Output,
    Record,
)
from pipeline.trading import risk
from pipeline.trading.execution import (
    CANCEL,
    CANCEL_ALL,
    CANCEL_REJECT,
    NEW,
    RECONCILE,
    REJECT,
    REPLACE,
    SENDING,
    ExecutionHalted,
    Seen,
    cancel_rejected,
    decide,
    request_event,
)
from pipeline.trading.fees import GEMINI_API_FEES, FeeSchedule
from pipeline.trading.orders import REQUESTED
from pipeline.trading.paper import PaperExecution
from pipeline.trading.risk import RiskLimits, RiskState
from pipeline.trading.rules import RulesTable
from pipeline.trading.signing import StrategyKeys
from pipeline.trading.simulator import QUEUE_MODELS, SimulatorConfig

log = logging.getLogger(__name__)
# Several instances may run, each named by ctx.instance (in its transactional.id and
# group.instance.id); the supervisor gives each its index (pipeline/ops/launch.py).
MULTI_INSTANCE = True
EXIT_CODES = {ExecutionHalted: 3}  # an order's fate unknown: stopped without committing

MODES = tuple(mode.value.lower() for mode in ExecutionMode)  # as --mode spells them
K = OrderEventKind


@dataclass(frozen=True)
class ExecutionSettings:
    mode: str = "paper"  # paper | sandbox | live
    run_dir: Path = Path("run")  # the pipeline's run directory: kill switch, execution/
    risk: RiskLimits = field(default_factory=RiskLimits)
    venue_url: str | None = None  # default: Gemini's sandbox / live URL for the mode
    venue_ws_url: str | None = None  # default: from venue_url, else Gemini's WebSocket API
    live_confirmed: bool = False  # the --live flag: live mode needs it as well
    gemini: GeminiSettings = field(default_factory=GeminiSettings)  # sandbox / live
    paper_fees: FeeSchedule = GEMINI_API_FEES
    paper_queue: str = "risk-averse"  # the simulator's queue model
    paper_latency_ms: int = 0  # added to the real latency of the pipeline
    checkpoint_interval_s: float = 5.0  # paper books to paper.state
    book_depth: int = 10  # levels of the books risk is checked against (paper)
    hold_idle_s: float = 1.0  # paper: a market-data partition this quiet has caught up
    snapshot_lookback: int = 1000  # book.snapshots records re-read per partition on assign
    kill_switch_file: Path | None = None  # default: <run_dir>/kill-switch
    restore_timeout_s: float = 60.0  # waiting for a dead member's open transaction to end
    batch_size: int | None = None  # default: 500 for paper, 10 when orders go over HTTP
    instance: str = "0"  # with the group id: transactional.id and group.instance.id
    symbol_rules: RulesTable | None = None  # Gemini's, by symbol (main loads them); None: none

    @property
    def sends_http(self) -> bool:
        return self.mode in ("sandbox", "live")

    @property
    def url(self) -> str:
        return self.venue_url or (LIVE_URL if self.mode == "live" else SANDBOX_URL)

    @property
    def ws_url(self) -> str:
        """The WebSocket API for orders: the venue's, else Gemini's sandbox / live one."""
        if self.venue_ws_url:
            return self.venue_ws_url
        if self.venue_url:  # the local venue serves the WebSocket API on the same port
            return "ws" + self.venue_url[4:] if self.venue_url.startswith("http") else \
                self.venue_url
        return WS_LIVE if self.mode == "live" else WS_SANDBOX

    @property
    def kill_switch_path(self) -> Path:
        return self.kill_switch_file or kill_switch_path(self.run_dir)

    @property
    def nonce_path(self) -> Path:
        return Path(self.run_dir) / "execution" / "gemini-nonce"

    @property
    def rate_path(self) -> Path:
        """The key's shared rate budget (see pipeline.gemini.ratelimit), beside its nonces."""
        return Path(self.run_dir) / "execution" / "gemini-rate"

    def simulator(self) -> SimulatorConfig:
        return SimulatorConfig(fees=self.paper_fees, queue=self.paper_queue,
                               latency_ms=self.paper_latency_ms,
                               mode=ExecutionMode.PAPER.value, rules=self.symbol_rules)


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class ExecutionHandler(Handler):
    def __init__(self, namespace: Namespace, serde: Serde, bootstrap: str,
                 settings: ExecutionSettings, keys: StrategyKeys,
                 credentials: GeminiCredentials | None = None,
                 clock_ms: Callable[[], int] = wall_clock_ms, group_id: str = "") -> None:
        self.settings, self.keys, self.clock_ms = settings, keys, clock_ms
        self.bootstrap = bootstrap
        self.group_id = group_id or f"{namespace}.execution"
        self.mode = ExecutionMode(settings.mode.upper()).value
        self.topic = {n: namespace.topic(n) for n in (
            "orders.requests", "book.snapshots", "md.l2", "md.trades", "orders.events",
            "orders.seen", "paper.state", "strategy.control")}
        self.encode_event = serde.encoder(self.topic["orders.events"])
        self.encode_seen = serde.encoder(self.topic["orders.seen"])
        self.decode = serde.decoder()
        self.seen: dict[str, Seen] = {}
        self.state = RiskState()
        self.counts: Counter = Counter()
        self.halted: str | None = None
        # strategy.control: halted strategies (their newest record), read by every
        # instance in full (a broadcast, not a partition of the group's input)
        self.halts: dict[str, dict] = {}
        self._to_cancel: set[str] = set()  # halted strategies whose orders to cancel
        self._control: Follower | None = None  # strategy.control, followed from the restore
        self._killed: bool | None = None  # this batch's reading of the kill switch
        self._kill_done = False  # open orders cancelled since the switch came on
        self.rest = None
        self.intents: ReliableProducer | None = None
        self.paper: PaperExecution | None = None
        self.gemini: GeminiExecution | None = None
        if settings.sends_http:
            if credentials is None:
                raise PipelineError(f"{settings.mode} mode needs a Gemini API key and secret")
            nonces = credentials.nonces(settings.nonce_path)
            self.rest = credentials.client(settings.url, nonces, settings.gemini.timeout_s)
            self.intents = ReliableProducer(bootstrap, **{"linger.ms": 0})
            # One rate budget per key, shared by every instance on this run directory.
            bucket = SharedTokenBucket(settings.rate_path, settings.gemini.rate_per_s,
                                       settings.gemini.burst)
            if settings.gemini.transport == "ws":
                session = WsSession(settings.ws_url, credentials.api_key,
                                    credentials.secret_for_signing(), settings.gemini.timeout_s)
                self.gemini = GeminiWsExecution(session, self.rest, nonces, self.mode,
                                                self._record_intent, settings.gemini, clock_ms,
                                                bucket)
            else:
                self.gemini = GeminiExecution(self.rest, nonces, self.mode, self._record_intent,
                                              settings.gemini, clock_ms, bucket)
            self.gemini.counts = self.counts
            if settings.gemini.check_key:
                log.info("%s", self.gemini.check_key())
            self.client = self.gemini
        else:
            self.encode_state = serde.encoder(self.topic["paper.state"])
            self.paper = PaperExecution(settings.simulator(), settings.book_depth)
            self.client = self.paper
        self._last_checkpoint = time.monotonic()
        # Paper's causal order (see the module doc): per md.l2/md.trades partition, the
        # next offset read, the end it had at assignment, when it last delivered.
        self._read: dict[tuple[str, int], int] = {}
        self._marks: dict[tuple[str, int], int] = {}
        self._heard: dict[tuple[str, int], float] = {}
        self._assigned_at = time.monotonic()
        self._held: dict[int, list[Record]] = {}  # requests partition -> waiting requests

    @property
    def topics(self) -> list[str]:
        """What the group reads: requests and, for its books, the market data (paper) or
        the snapshots (Gemini)."""
        if self.paper is not None:
            return [self.topic["orders.requests"], self.topic["md.l2"], self.topic["md.trades"]]
        return [self.topic["orders.requests"], self.topic["book.snapshots"]]

    # -- records

    def handle(self, record: Record) -> Iterable[Output]:
        topic = record.topic
        if topic == self.topic["orders.requests"]:
            if self.paper is None:
                return self._on_request(record.value)
            held = self._held.setdefault(record.partition, [])
            if held or not self._ready(record):
                held.append(record)
                return ()
            return self._on_request(record.value)
        if topic == self.topic["book.snapshots"]:
            self.gemini.on_snapshot(record.value)  # type: ignore[union-attr]
            return ()
        source = (topic, record.partition)
        self._read[source] = record.offset + 1
        self._heard[source] = time.monotonic()
        if topic == self.topic["md.l2"]:
            out = self._events(self.paper.on_l2(record.value, record.partition,  # type: ignore[union-attr]
                                                record.offset, self.clock_ms()))
        else:
            out = self._events(self.paper.on_trade(record.value, self.clock_ms()))  # type: ignore[union-attr]
        if self._held.get(record.partition):
            out += self._release(record.partition)
        return out

    def _ready(self, request: Record) -> bool:
        """Whether the market data of the request's partition has caught up with it."""
        p = request.partition
        now = time.monotonic()
        trigger = request.value.get("trigger") or ""
        needs = [((self.topic["md.l2"], p), self._marks.get((self.topic["md.l2"], p), 0)),
                 ((self.topic["md.trades"], p), self._marks.get((self.topic["md.trades"], p), 0))]
        if trigger.startswith("md.l2/"):
            _, part, offset = trigger.split("/", 2)
            if part.isdigit() and offset.isdigit():
                needs.append(((self.topic["md.l2"], int(part)), int(offset) + 1))
        idle = self.settings.hold_idle_s
        for source, offset in needs:
            if self._read.get(source, 0) >= offset:
                continue
            heard = self._heard.get(source, self._assigned_at)
            if now - heard < idle:
                return False
        return True

    def _release(self, partition: int) -> list[Output]:
        """The held requests of ``partition`` that are ready now, in order."""
        held, out = self._held[partition], []
        while held and self._ready(held[0]):
            out += self._on_request(held.pop(0).value)
        return out

    def commit_offsets(self, offsets: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        """Held requests are not committed: a restart reads them again."""
        requests = self.topic["orders.requests"]
        for partition, held in self._held.items():
            if held and (requests, partition) in offsets:
                offsets[(requests, partition)] = held[0].offset
        return offsets

    def _on_request(self, req: dict) -> list[Output]:
        cid = req["client_order_id"]
        now = self.clock_ms()
        verdict = self._decide(req, now)
        seen_ms = now
        if verdict.action == RECONCILE:
            prior = self.seen[cid]
            seen_ms = prior.seen_ms
            found = self.gemini.reconcile(req, prior) if self.gemini is not None else None
            if found is not None:
                events, outcome = found
                return self._events(events) + [self._remember(req, outcome, seen_ms)]
            verdict = self._decide(req, now, settled=True)
        action = verdict.action
        if action == REJECT:
            log.info("REJECTED %s (%s %s): %s%s", cid, req["strategy_id"], req["symbol"],
                     verdict.reason, f" ({verdict.detail})" if verdict.detail else "")
            out = self._events([request_event(
                req, K.REJECTED, now, self.mode, reason=verdict.reason,
                price=plain(verdict.price) if verdict.price is not None else None)])
            if verdict.remember:
                out.append(self._remember(req, f"rejected:{verdict.reason}", now))
            return out
        if action == CANCEL_REJECT:
            return self._events([cancel_rejected(req, verdict.reason, now, self.mode)]) + \
                [self._remember(req, f"rejected:{verdict.reason}", now)]
        client = self.client
        if action == NEW:
            self.state.note_accepted(req["strategy_id"], now)
            events, outcome = client.place(req, verdict.price, now, seen_ms)
        elif action == REPLACE:
            self.state.note_accepted(req["strategy_id"], now)
            events, outcome = client.replace(req, verdict.price, now)
        elif action == CANCEL:
            events, outcome = client.cancel(req, now)
        else:
            assert action == CANCEL_ALL
            events, outcome = client.cancel_all(req, now, REQUESTED)
        return self._events(events) + [self._remember(req, outcome, seen_ms)]

    def _decide(self, req: dict, now: int, settled: bool = False):
        return decide(req, keys=self.keys, seen=self.seen, killed=self._kill_switch(),
                      now_ms=now, limits=self.settings.risk, state=self.state,
                      book=self.client.book(req["symbol"]), settled=settled,
                      halted=self.halts, rules=self.settings.symbol_rules)

    def _kill_switch(self) -> bool:
        if self._killed is None:
            killed = self.settings.kill_switch_path.exists()
            if killed != self._kill_done:
                log.warning("kill switch %s (%s)", "ON: cancelling every open order and "
                            "rejecting every new one" if killed else "off",
                            self.settings.kill_switch_path)
            self._killed = killed
        return self._killed

    # -- outputs

    def _events(self, events: list[OrderEvent]) -> list[Output]:
        out = []
        for event in events:
            self.counts[event["kind"]] += 1
            self.metrics.inc("order_events_total", kind=event["kind"])
            if event["kind"] == K.REJECTED:
                self.metrics.inc("rejections_total", reason=event.get("reason") or "unknown")
            self.state.on_event(event)
            out.append(Output(self.topic["orders.events"], self.encode_event(event),
                              event["client_order_id"]))
            cid = event["client_order_id"]
            known = self.seen.get(cid)
            if event["kind"] in TERMINAL_KINDS and known is not None and \
                    known.outcome.startswith("open:"):
                out.append(self._remember_id(cid, known.strategy_id, "sent", known.seen_ms))
        return out

    def _remember(self, req: dict, outcome: str, seen_ms: int) -> Output:
        return self._remember_id(req["client_order_id"], req["strategy_id"], outcome, seen_ms)

    def _remember_id(self, cid: str, strategy_id: str, outcome: str, seen_ms: int) -> Output:
        self.seen[cid] = Seen(outcome, seen_ms, strategy_id)
        value = self.encode_seen({"client_order_id": cid, "strategy_id": strategy_id,
                                  "outcome": outcome, "seen_ms": seen_ms})
        return Output(self.topic["orders.seen"], value, cid)

    def _record_intent(self, cid: str, strategy_id: str, seen_ms: int) -> None:
        """Durable before anything leaves the process: a separate idempotent producer,
        outside the batch's transaction, waited for."""
        assert self.intents is not None
        self.intents.produce(self.topic["orders.seen"], self.encode_seen({
            "client_order_id": cid, "strategy_id": strategy_id, "outcome": SENDING,
            "seen_ms": seen_ms}), cid)
        self.intents.flush(30)
        self.seen[cid] = Seen(SENDING, seen_ms, strategy_id)

    def end_batch(self) -> Iterable[Output]:
        now = self.clock_ms()
        self._killed = None  # read the switch again
        out: list[Output] = []
        if self._kill_switch():
            if not self._kill_done:
                events, _ = self.client.cancel_all(None, now, risk.KILL_SWITCH)
                out += self._events(events)
                self._kill_done = True
        else:
            self._kill_done = False
        self._read_controls()
        for strategy_id in sorted(self._to_cancel):
            events = self.client.cancel_strategy(strategy_id, now, risk.STRATEGY_HALTED)
            log.warning("strategy %s halted: %d open order(s) cancelled", strategy_id,
                        sum(e["kind"] == K.CANCELLED.value for e in events))
            out += self._events(events)
        self._to_cancel.clear()
        if self.paper is not None:
            for partition in [p for p, held in self._held.items() if held]:
                out += self._release(partition)
        out += self._events(self.client.poll(now))
        if self.paper is not None:
            out += self._paper_state()
        self._killed = None
        return out

    def _paper_state(self, everything: bool = False) -> list[Output]:
        now_us = time.time_ns() // 1000
        due = everything or time.monotonic() - self._last_checkpoint >= \
            self.settings.checkpoint_interval_s
        if due:
            self._last_checkpoint = time.monotonic()
        states = self.paper.order_states(now_us) + self.paper.book_states(now_us, due)  # type: ignore[union-attr]
        return [Output(self.topic["paper.state"], self.encode_state(s),
                       f"{s['symbol']}|{s['kind']}") for s in states]

    def on_revoke(self, partitions: list[Partition]) -> Iterable[Output]:
        """The next owner restores from what is written now (held requests it reads again)."""
        for tp in partitions:
            if tp.topic == self.topic["orders.requests"]:
                self._held.pop(tp.partition, None)
        return self._paper_state(everything=True) if self.paper is not None else ()

    # -- strategy halts

    def _apply_control(self, value: dict) -> None:
        strategy_id = value["strategy_id"]
        if value["halted"]:
            if strategy_id not in self.halts:
                log.warning("strategy %s halted (%s: %s, by %s): cancelling its orders, "
                            "rejecting new ones", strategy_id, value["reason"], value["detail"],
                            value["by"])
                self._to_cancel.add(strategy_id)
            self.halts[strategy_id] = value
        elif self.halts.pop(strategy_id, None) is not None:
            log.warning("strategy %s resumed by %s", strategy_id, value["by"])
            self._to_cancel.discard(strategy_id)

    def _read_controls(self) -> None:
        """New ``strategy.control`` records since the last batch."""
        if self._control is None:
            return
        while True:
            msgs = self._control.poll(100)
            if not msgs:
                return
            for msg in msgs:
                value = self._decoded(msg)
                if value is not None:
                    self._apply_control(value)

    def _restore_controls(self, ctx: AssignContext, timeout: float) -> None:
        """Every strategy's newest control record; then follow the topic from there. A
        strategy halted before the restart has its orders cancelled again (idempotent)."""
        topic = self.topic["strategy.control"]
        self.halts, self._to_cancel, starts = {}, set(), {}
        for msg in ctx.read_to_end(topic, timeout):
            starts[msg.partition] = msg.offset + 1
            value = self._decoded(msg)
            if value is not None:
                self._apply_control(value)
        if self._control is not None:
            self._control.close()
        self._control = ctx.follow(topic, starts)

    # -- restore

    def on_assign(self, ctx: AssignContext, partitions: list[Partition]
                  ) -> list[Partition] | None:
        started = time.monotonic()
        timeout = self.settings.restore_timeout_s
        self._restore_controls(ctx, timeout)
        seen: dict[str, Seen] = {}
        for msg in ctx.read_to_end(self.topic["orders.seen"], timeout):
            value = self._decoded(msg)
            if value is not None:
                seen[value["client_order_id"]] = Seen(value["outcome"], value["seen_ms"],
                                                      value["strategy_id"])
        self.seen, self.state = seen, RiskState()
        latest: dict[str, dict] = {}
        for msg in ctx.read_to_end(self.topic["orders.events"], timeout):
            value = self._decoded(msg)
            if value is not None and value["mode"] == self.mode:
                self.state.on_event(value)
                if value["kind"] not in ("REJECTED", "CANCEL_REJECTED"):
                    latest[value["client_order_id"]] = value
        now = self.clock_ms()
        self.state.restore_accepted(
            (s.strategy_id, s.seen_ms) for s in seen.values()
            if s.seen_ms > now - risk.MINUTE_MS and not s.outcome.startswith("rejected:"))
        in_doubt = sum(s.outcome == SENDING for s in seen.values())
        starts = None
        if self.paper is not None:
            restored = self._restore_paper(ctx, partitions)
            what = f"{restored} paper order(s) resting"
        else:
            owned = [tp.partition for tp in partitions if tp.topic == self.topic["orders.requests"]]
            what = f"{self.gemini.restore(seen, latest)} open order(s) followed"  # type: ignore[union-attr]
            starts = self._snapshot_starts(ctx, partitions, owned)
        log.info("restored %d seen id(s) (%d in doubt, reconciled when their requests come "
                 "again), %s, positions %s in %.2fs", len(seen), in_doubt, what,
                 {k: plain(v) for k, v in self.state.positions.items()},
                 time.monotonic() - started)
        return starts

    def _restore_paper(self, ctx: AssignContext, partitions: list[Partition]) -> int:
        """The simulator as it was at the last commit: its state records, then the md.l2
        records between each book's offset and the committed offset, to the books only."""
        l2 = self.topic["md.l2"]
        mine = {tp.partition for tp in partitions if tp.topic == l2}
        paper = self.paper = PaperExecution(self.settings.simulator(), self.settings.book_depth)
        self.client = paper
        self._marks, self._read, self._heard, self._held = {}, {}, {}, {}
        for topic in (l2, self.topic["md.trades"]):
            owned = [tp.partition for tp in partitions if tp.topic == topic]
            if owned:
                for p, (_, high) in ctx.end_offsets(topic, owned).items():
                    self._marks[(topic, p)] = high
        paper.remember_owners({cid: s.strategy_id for cid, s in self.seen.items()})
        latest: dict[str, dict] = {}
        for msg in ctx.read_to_end(self.topic["paper.state"], self.settings.restore_timeout_s):
            value = self._decoded(msg)
            if value is not None and value["source_partition"] in mine:
                latest[f"{value['symbol']}|{value['kind']}"] = value
        for state in latest.values():
            paper.restore(state)
        books = {s["symbol"]: s for s in latest.values() if s["kind"] == PaperStateKind.BOOK}
        committed = ctx.committed_offsets(l2, mine)
        trades = ctx.committed_offsets(self.topic["md.trades"], mine)
        self._read.update({(l2, p): o for p, o in committed.items()})
        self._read.update({(self.topic["md.trades"], p): o for p, o in trades.items()})
        ranges: dict[int, tuple[int, int]] = {}
        for book in books.values():
            p = book["source_partition"]
            if p in committed and book["source_offset"] + 1 < committed[p]:
                first = min(ranges.get(p, (book["source_offset"] + 1,))[0],
                            book["source_offset"] + 1)
                ranges[p] = (first, committed[p])
        replayed = 0
        for msg in ctx.read_range(l2, ranges, self.settings.restore_timeout_s):
            value = self._decoded(msg)
            if value is None:
                continue
            book = books.get(value["symbol"])
            if book is not None and msg.offset <= book["source_offset"]:
                continue  # inside that book's state already
            paper.replay_book(value, msg.partition, msg.offset)
            replayed += 1
        self._last_checkpoint = time.monotonic()
        # The market data's silence counts from now, when reading can start: the restore
        # above (reading paper.state to its end) may itself take longer than hold_idle_s.
        self._assigned_at = time.monotonic()
        log.info("paper: %d book(s) and %d orders state(s) restored, %d md.l2 record(s) "
                 "re-applied to the books", len(books), len(latest) - len(books), replayed)
        return paper.open_orders()

    def _decoded(self, msg: Record) -> dict | None:
        try:
            return self.decode(msg.value)
        except Exception as exc:  # noqa: BLE001 - an unreadable record is skipped, loudly
            log.error("unreadable record at %s[%d]@%d: %s", msg.topic, msg.partition,
                      msg.offset, exc)
            return None

    def _snapshot_starts(self, ctx: AssignContext, partitions: list[Partition], owned: list[int]
                         ) -> list[Partition]:
        """Load the latest books before any request is handled, and say where to go on.

        The last ``snapshot_lookback`` records of each assigned ``book.snapshots``
        partition are read here, to their current end (the newest book per symbol), and
        the group resumes those partitions at that end; requests resume at their committed
        offsets. Reading them in the group's own fetch instead would race the requests:
        a request could be handled before its symbol's book came back."""
        snapshots = self.topic["book.snapshots"]
        self.gemini.own(owned, len(ctx.partitions(self.topic["orders.requests"])))  # type: ignore[union-attr]
        marks = ctx.end_offsets(snapshots, [tp.partition for tp in partitions
                                            if tp.topic == snapshots])
        starts, ranges = [], {}
        for tp in partitions:
            if tp.topic == snapshots:
                low, high = marks[tp.partition]
                if high > low:
                    ranges[tp.partition] = (max(low, high - self.settings.snapshot_lookback), high)
                tp = tp.at(high)
            starts.append(tp)
        for msg in ctx.read_range(snapshots, ranges, self.settings.restore_timeout_s):
            value = self._decoded(msg)
            if value is not None:
                self.gemini.on_snapshot(value)  # type: ignore[union-attr]
        return starts

    def close(self) -> Iterable[Output]:
        if self._control is not None:
            self._control.close()
            self._control = None
        if self.gemini is not None:
            # The WebSocket's end cancels the orders it placed (cancel-on-disconnect); the
            # next start re-reads them. Closes the REST session as well.
            self.gemini.close()
        elif self.rest is not None:
            self.rest.close()
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
    if settings.mode == "sandbox" and namespace.is_live:
        raise PipelineError(f"sandbox mode refuses namespace {namespace}: its risk checks "
                            "need the sandbox's own books (pipeline produce gemini --sandbox, "
                            "namespace sandbox), never live ones")
    if settings.sends_http and credentials is None:
        raise PipelineError(f"{settings.mode} mode needs a Gemini API key and secret: set "
                            "GEMINI_API_KEY and GEMINI_API_SECRET or pass --api-key-file")
    if settings.sends_http and settings.gemini.transport == "ws" and \
            credentials is not None and credentials.nonce != "time":
        raise PipelineError(
            "orders over Gemini's WebSocket API need an account key with \"Uses a time-based "
            "nonce\": set GEMINI_NONCE=time (or \"nonce\": \"time\" in the key file) for such "
            "a key, or send orders over REST with --gemini-transport rest")


TOPICS_PAPER = ("orders.requests", "md.l2", "md.trades", "orders.events", "orders.seen",
                "paper.state", "strategy.control", "dlq")
TOPICS_GEMINI = ("orders.requests", "book.snapshots", "orders.events", "orders.seen",
                 "strategy.control", "dlq")


def group_config(bootstrap: str, registry_url: str, namespace: Namespace,
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
    names = TOPICS_GEMINI if settings.sends_http else TOPICS_PAPER
    return GroupConfig(
        group_id=group_id,
        topics=[namespace.topic(n) for n in names
                if n not in ("orders.events", "orders.seen", "paper.state", "strategy.control",
                             "dlq")],
        dead_letter_topic=namespace.topic("dlq"),
        handler=lambda: ExecutionHandler(namespace, serde, bootstrap, settings, keys,
                                         credentials, clock_ms, group_id),
        decoder=Decoder(registry), batch_size=batch_size,
        transactional_id=member,
        # Static membership: a restarted instance takes its partitions back at once. A
        # short fetch wait: partitions that start later (e.g. after an offset reset) join
        # the next fetch without waiting out the broker's hold on an idle one.
        consumer_overrides={"group.instance.id": member, "fetch.wait.max.ms": 50},
        producer_overrides={"linger.ms": 0, "transaction.timeout.ms": 30000})


def _limit(value: object) -> Decimal | None:
    """A limit: a decimal (a string or an integer), or "off"."""
    if isinstance(value, str) and value.lower() in ("off", "none"):
        return None
    return convert(Decimal, value)


def _count_limit(value: object) -> int | None:
    limit = _limit(value)
    return None if limit is None else int(limit)


def _help(text: str, parse=None) -> dict:
    return {"help": text} if parse is None else {"help": text, "parse": parse}


@dataclass(frozen=True)
class Config:
    """The execution group's settings: a topology's ``args`` (pipeline/runtime/contract.py)."""

    mode: str = field(default="paper", metadata={"choices": MODES, "help": "paper, sandbox "
                                                                           "or live"})
    live: bool = field(default=False, metadata=_help("confirm live mode: real orders"))
    venue_url: str | None = field(default=None, metadata=_help(
        "Gemini's URL [default: sandbox or live for the mode]"))
    strategy_keys: Path | None = field(default=None, metadata=_help(
        "0600 JSON file {strategy_id: key} [default: the run's key file]; the environment's "
        "PIPELINE_STRATEGY_KEY_<ID> are used as well"))
    api_key_file: Path | None = field(default=None, metadata=_help(
        "0600 JSON file {\"api_key\", \"api_secret\"} [default: GEMINI_API_KEY / "
        "GEMINI_API_SECRET]"))
    group: str | None = field(default=None, metadata=_help(
        "group id [default: <namespace>.execution]"))
    gemini_transport: str = field(default="ws", metadata={"choices": ("ws", "rest"), "help": (
        "sandbox/live: orders over the WebSocket API (ws: a time-based nonce key) or REST")})
    venue_ws_url: str | None = field(default=None, metadata=_help(
        "the WebSocket API's URL [default: from venue_url, else Gemini's for the mode]"))
    gemini_rate: float = field(default=5.0, metadata=_help("private calls per second"))
    gemini_burst: int | None = None
    max_notional: Decimal | None = field(default=RiskLimits.max_notional, metadata=_help(
        "quote currency per order, or off", _limit))
    max_position: Decimal | None = field(default=RiskLimits.max_position, metadata=_help(
        "base currency per symbol, or off", _limit))
    price_band_bps: Decimal = RiskLimits.price_band_bps
    max_orders_per_minute: int | None = field(default=RiskLimits.max_orders_per_minute,
                                              metadata=_help("per strategy, or off",
                                                             _count_limit))
    max_book_age_s: Decimal | None = field(
        default=None if RiskLimits.max_book_age_ms is None else
        Decimal(RiskLimits.max_book_age_ms) / 1000, metadata=_help("seconds, or off", _limit))
    symbols: tuple[str, ...] = field(default=(), metadata=_help(
        "symbols whose rules to load, comma-separated [default: the topology's; else every "
        "symbol Gemini lists]"))
    rules_url: str | None = field(default=None, metadata=_help(
        "load Gemini's symbol rules from this URL (cached per day in <run_dir>/gemini) "
        "[default: the mode's URL; paper: none]"))
    rules_file: Path | None = field(default=None, metadata=_help(
        "symbol rules from a file: a rules cache or recorded /v1/symbols/details responses "
        "(paper, or when Gemini is unreachable)"))
    no_rules: bool = field(default=False, metadata=_help("paper only: no symbol rules"))
    follow_interval: float = 2.0
    batch_size: int | None = None
    queue: str = field(default="risk-averse", metadata={
        "choices": QUEUE_MODELS, "help": "paper: queue position of resting orders"})
    latency_ms: int = field(default=0, metadata=_help(
        "paper: added latency of orders and cancels"))
    maker_fee: Decimal = field(default=GEMINI_API_FEES.maker, metadata=_help(
        "paper: fee of fills that rested"))
    taker_fee: Decimal = field(default=GEMINI_API_FEES.taker, metadata=_help(
        "paper: fee of fills that took"))
    checkpoint_interval: float = field(default=5.0, metadata=_help(
        "paper: seconds between checkpoints of the books to paper.state"))


def make_group(ctx: GroupContext, config: Config = Config()) -> GroupConfig:
    """The group of the contract (pipeline/runtime/contract.py): checks the mode, loads the
    keys, the credentials and the symbol rules, creates its topics."""
    from pipeline.kafka.catalog import ensure_topics

    namespace, run_dir = ctx.namespace, ctx.run_dir
    credentials = GeminiCredentials.load(config.api_key_file) \
        if config.mode != "paper" else None
    keys = StrategyKeys.load(config.strategy_keys or ctx.strategy_keys)
    limits = RiskLimits(max_notional=config.max_notional, max_position=config.max_position,
                        price_band_bps=config.price_band_bps,
                        max_orders_per_minute=config.max_orders_per_minute,
                        max_book_age_ms=None if config.max_book_age_s is None
                        else int(config.max_book_age_s * 1000))
    settings = ExecutionSettings(
        mode=config.mode, run_dir=run_dir, risk=limits, venue_url=config.venue_url,
        live_confirmed=config.live, venue_ws_url=config.venue_ws_url,
        gemini=GeminiSettings(rate_per_s=config.gemini_rate, transport=config.gemini_transport,
                              burst=config.gemini_burst or max(1, int(config.gemini_rate)),
                              follow_interval_s=config.follow_interval),
        batch_size=config.batch_size, instance=ctx.instance, paper_queue=config.queue,
        paper_latency_ms=config.latency_ms,
        paper_fees=FeeSchedule(maker=config.maker_fee, taker=config.taker_fee),
        checkpoint_interval_s=config.checkpoint_interval)
    check_mode(namespace, settings, credentials)
    symbols = config.symbols or ctx.symbols
    settings = replace(settings, symbol_rules=startup_rules(
        config.mode, settings.url, run_dir, list(symbols) if symbols else None,
        config.rules_url, config.rules_file, config.no_rules))
    ensure_topics(ctx.bootstrap, namespace,
                  TOPICS_GEMINI if settings.sends_http else TOPICS_PAPER)
    made = group_config(ctx.bootstrap, ctx.registry_url, namespace, settings, keys=keys,
                        credentials=credentials, group_id=config.group)
    log.info("execution: mode %s, namespace %s, %r, run dir %s, limits %s", config.mode,
             namespace, keys, run_dir, limits)
    return made


def main(argv: list[str] | None = None) -> int:
    return group_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
