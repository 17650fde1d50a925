"""The ``portfolio`` consumer group: fills and marks in, positions, PnL and risk stops out.

Reads ``<ns>.orders.events`` (every strategy's fills), ``<ns>.book.snapshots`` (marks: the
mid of each symbol's latest book) and ``<ns>.strategy.control`` (halts and resumes), folds
them with :class:`~pipeline.trading.portfolio.Portfolio` (the one accounting module the
backtest uses) and publishes:

* ``<ns>.portfolio.positions`` (compacted, key ``strategy|symbol``) on every fill and
  every ``pnl_interval_s`` for what is held;
* ``<ns>.portfolio.pnl`` (key strategy) on every fill and every ``pnl_interval_s``:
  realized, unrealized, fees, equity, drawdown, daily PnL; and the same rows to Parquet
  under ``<run_dir>/parquet/<ns>/portfolio.pnl`` (:mod:`pipeline.sinks.pnl`), beside the bars;
* ``<ns>.strategy.control``: a halt when a strategy crosses its ``max_drawdown`` or
  ``max_daily_loss`` (execution then cancels its orders and rejects new ones);
* ``<ns>.portfolio.reconciliation`` (sandbox/live only): at start-up, once caught up, and
  every ``reconcile_interval_s``, the differences with Gemini's balances, open orders and
  trades (:mod:`pipeline.trading.reconciliation`).

**Exactly once.** One batch is one Kafka transaction: the outputs, the whole portfolio
state (``<ns>.portfolio.state``, compacted, written in every batch that changed it) and the
input offsets commit together. A restart reads the newest state (read_committed: a state
of an aborted transaction is never seen) and resumes at the committed offsets, which are
the state's: no fill is counted twice and none is missed, without replaying history.
Parquet gets only rows of committed transactions (the runtime's ``after_commit`` says which
committed); until flushed they ride in every state record, so a crash between commit
and flush writes them on restart (rows are keyed by ``seq``: a second write changes
nothing).

One instance: a strategy's fills are spread over every partition of ``orders.events`` (its
key is the order id), so one member folds them all.

Run: ``python -m consumers.portfolio --bootstrap HOST:PORT --registry URL --namespace NS
[--capital 10000 | '{"mid-quoter": "10000"}'] [--limits '{"mid-quoter": {"max_drawdown":
"100", "max_daily_loss": "50"}}'] [--mode sandbox --venue-url URL]``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import zlib
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Callable, Iterable

from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Decoder, Serde
from pipeline.core.decimals import plain
from pipeline.core.errors import GeminiError, PipelineError
from pipeline.gemini.execution import GeminiCredentials
from pipeline.gemini.rest import LIVE_URL, SANDBOX_URL
from pipeline.kafka.catalog import Namespace
from pipeline.runtime.context import AssignContext, Partition
from pipeline.runtime.contract import GroupContext, convert, group_main
from pipeline.runtime.runner import (
    GroupConfig,
    Handler,
    Output,
    Record,
)
from pipeline.sinks.pnl import PnlWriter
from pipeline.trading.portfolio import Portfolio, PortfolioConfig, RiskStop
from pipeline.trading.reconciliation import ExchangeView, finding, reconcile

log = logging.getLogger(__name__)
TOPICS = ["orders.events", "book.snapshots", "strategy.control", "portfolio.positions",
          "portfolio.pnl", "portfolio.reconciliation", "portfolio.state", "dlq"]
RECONCILING_MODES = ("sandbox", "live")


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class PortfolioSettings:
    portfolio: PortfolioConfig = field(default_factory=PortfolioConfig)
    run_dir: Path = Path("run")
    parquet_root: Path | None = None  # default <run_dir>/parquet/<ns>/portfolio.pnl
    fsync: bool = True
    flush_interval_s: float = 1.0
    mode: str = "paper"  # paper: no reconciliation; sandbox | live: against Gemini
    venue_url: str | None = None
    reconcile_interval_s: float = 300.0
    reconcile_grace_s: float = 30.0
    restore_timeout_s: float = 60.0
    # The clock marks' age and the periodic records go by: the wall clock, or (default on
    # replay namespaces, whose books are history) the newest event time read.
    record_time: bool | None = None

    @property
    def url(self) -> str:
        return self.venue_url or (LIVE_URL if self.mode == "live" else SANDBOX_URL)


class PortfolioHandler(Handler):
    def __init__(self, namespace: Namespace, serde: Serde, bootstrap: str,
                 settings: PortfolioSettings, group_id: str,
                 credentials: GeminiCredentials | None = None,
                 clock_ms: Callable[[], int] = wall_clock_ms) -> None:
        self.settings, self.bootstrap, self.group_id = settings, bootstrap, group_id
        record_time = namespace.kind == "replay" if settings.record_time is None \
            else settings.record_time
        self._event_ms = 0  # the newest event time read (record_time)
        self.clock_ms = (lambda: self._event_ms) if record_time else clock_ms
        self.topic = {n: namespace.topic(n) for n in TOPICS}
        self.encode = {n: serde.encoder(self.topic[n]) for n in (
            "portfolio.positions", "portfolio.pnl", "strategy.control",
            "portfolio.reconciliation", "portfolio.state")}
        self.decode = serde.decoder()
        self.portfolio = Portfolio(settings.portfolio)
        root = settings.parquet_root or \
            Path(settings.run_dir) / "parquet" / namespace.name / "portfolio.pnl"
        self.writer = PnlWriter(Path(root).resolve(), fsync=settings.fsync)
        self.pending: list[dict] = []  # PnL rows of the open transaction
        self.confirmed: list[dict] = []  # committed, not yet in Parquet
        self._dirty = False
        self._last_flush = time.monotonic()
        self._records_in_batch = 0
        self.baseline: dict[str, Decimal] | None = None
        self.last_reconciled_ms: int | None = None
        self.rest = None
        if settings.mode in RECONCILING_MODES:
            if credentials is None:
                raise PipelineError(f"reconciliation in {settings.mode} mode needs the Gemini "
                                    "API key and secret execution uses")
            nonces = credentials.nonces(Path(settings.run_dir) / "execution" / "gemini-nonce")
            self.rest = credentials.client(settings.url, nonces, 10.0)

    # -- records

    def handle(self, record: Record) -> Iterable[Output]:
        self._records_in_batch += 1
        value, topic = record.value, record.topic
        if topic == self.topic["book.snapshots"]:
            when = value["received_ts_us"] // 1000
        else:
            when = value["event_ms"] if topic == self.topic["orders.events"] else value["at_ms"]
        self._event_ms = max(self._event_ms, when)
        now = self.clock_ms()
        if topic == self.topic["book.snapshots"]:
            self.portfolio.on_book(value)
            self._dirty = True
            return ()
        if topic == self.topic["strategy.control"]:
            out = self.portfolio.on_control(value, now)
        else:
            out = self.portfolio.on_event(value, now)
        self._dirty = True
        return self._outputs(out)

    def end_batch(self) -> Iterable[Output]:
        now = self.clock_ms()
        out = self._outputs(self.portfolio.tick(now))
        caught_up = self._records_in_batch == 0
        self._records_in_batch = 0
        if self.rest is not None and (self.last_reconciled_ms is None and caught_up or (
                self.last_reconciled_ms is not None and
                now - self.last_reconciled_ms >= self.settings.reconcile_interval_s * 1000)):
            out += self._reconcile(now)
        if time.monotonic() - self._last_flush >= self.settings.flush_interval_s:
            self._flush()
        if out or self._dirty:
            out.append(self._state(now))
            self._dirty = False
        return out

    def after_commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """The transaction committed: its PnL rows may go to Parquet (at the next flush)."""
        self.confirmed += self.pending
        self.pending = []

    def _outputs(self, items: list[tuple[str, dict]]) -> list[Output]:
        out = []
        for kind, record in items:
            if kind == "position":
                out.append(Output(self.topic["portfolio.positions"],
                                  self.encode["portfolio.positions"](record),
                                  f"{record['strategy_id']}|{record['symbol']}"))
            elif kind == "pnl":
                self.pending.append(record)
                # Kafka's timestamp stays the append time: a replay's fills are years old,
                # and retention would delete records stamped with their event time.
                out.append(Output(self.topic["portfolio.pnl"], self.encode["portfolio.pnl"](record),
                                  record["strategy_id"]))
            else:
                log.warning("halting strategy %s: %s", record["strategy_id"], record["detail"])
                out.append(Output(self.topic["strategy.control"],
                                  self.encode["strategy.control"](record), record["strategy_id"]))
        return out

    def _flush(self) -> None:
        if self.confirmed:
            self.writer.write(self.confirmed)
            self.confirmed = []
            self._dirty = True  # the next state no longer lists them
        self._last_flush = time.monotonic()

    def _state(self, now: int) -> Output:
        state = {"portfolio": self.portfolio.dump(),
                 "unflushed": self.confirmed + self.pending,
                 "baseline": None if self.baseline is None else
                 {c: plain(v) for c, v in self.baseline.items()},
                 "last_reconciled_ms": self.last_reconciled_ms, "event_ms": self._event_ms}
        value = self.encode["portfolio.state"]({
            "group_id": self.group_id, "saved_ms": now, "version": 1,
            "state": zlib.compress(json.dumps(state, separators=(",", ":")).encode(), 1)})
        return Output(self.topic["portfolio.state"], value, self.group_id)

    # -- reconciliation

    def _reconcile(self, now: int) -> list[Output]:
        self.last_reconciled_ms = now
        mode = self.settings.mode.upper()
        symbols = sorted({f["symbol"] for f in self.portfolio.order_fills.values()} |
                         {o["symbol"] for o in self.portfolio.open_orders.values()})
        try:
            balances = self.rest.balances()  # type: ignore[union-attr]
            orders = self.rest.active_orders()  # type: ignore[union-attr]
            trades = [dict(t, symbol=s) for s in symbols
                      for t in self.rest.my_trades(s.lower(), 500)]  # type: ignore[union-attr]
        except GeminiError as exc:
            log.warning("reconciliation: Gemini did not answer: %s", exc)
            events = [finding(now, mode, "ERROR", f"Gemini did not answer: "
                              f"{type(exc).__name__}", differences=0)]
        else:
            events, self.baseline = reconcile(self.portfolio,
                                              ExchangeView(balances, orders, trades),
                                              self.baseline, mode, now,
                                              int(self.settings.reconcile_grace_s * 1000))
        for event in events:
            (log.warning if event["kind"] not in ("CHECKED",) else log.info)(
                "reconciliation %s: %s", event["kind"], event["detail"])
        encode = self.encode["portfolio.reconciliation"]
        return [Output(self.topic["portfolio.reconciliation"], encode(e), mode) for e in events]

    # -- restore

    def on_assign(self, ctx: AssignContext, partitions: list[Partition]) -> None:
        started = time.monotonic()
        latest = None
        for msg in ctx.read_to_end(self.topic["portfolio.state"], self.settings.restore_timeout_s):
            if msg.key == self.group_id.encode():
                latest = msg
        self.portfolio = Portfolio(self.settings.portfolio)
        self.pending, self.confirmed = [], []
        self.baseline, self.last_reconciled_ms = None, None
        if latest is not None:
            value = self.decode(latest.value)
            raw = value["state"]  # zlib; plain JSON in states written before that
            state = json.loads(raw if raw[:1] == b"{" else zlib.decompress(raw))
            self.portfolio.load(state["portfolio"])
            if state["baseline"] is not None:
                self.baseline = {c: Decimal(v) for c, v in state["baseline"].items()}
            self.last_reconciled_ms = None  # reconcile again once caught up
            self._event_ms = max(self._event_ms, state.get("event_ms", 0))
            if state["unflushed"]:  # committed with that state: safe to write now
                self.writer.write(state["unflushed"])
        log.info("restored the portfolio of %d strateg(ies), %d open order(s) in %.2fs",
                 len(self.portfolio.accounts), len(self.portfolio.open_orders),
                 time.monotonic() - started)
        return None  # resume at the committed offsets: the state's

    def close(self) -> Iterable[Output]:
        self._flush()
        return [self._state(self.clock_ms())]


def group_config(bootstrap: str, registry_url: str, namespace: Namespace,
                 settings: PortfolioSettings = PortfolioSettings(), *,
               credentials: GeminiCredentials | None = None,
               clock_ms: Callable[[], int] = wall_clock_ms,
               group_id: str | None = None) -> GroupConfig:
    """The group's configuration (transactional, one instance); its id defaults to
    ``<namespace>.portfolio``."""
    registry = SchemaRegistry(registry_url)
    serde = Serde(registry)
    group_id = group_id or f"{namespace}.portfolio"
    return GroupConfig(
        group_id=group_id,
        topics=[namespace.topic(n) for n in ("orders.events", "book.snapshots",
                                             "strategy.control")],
        dead_letter_topic=namespace.topic("dlq"),
        handler=lambda: PortfolioHandler(namespace, serde, bootstrap, settings, group_id,
                                         credentials, clock_ms),
        decoder=Decoder(registry), batch_size=1000, transactional_id=f"{group_id}-0",
        consumer_overrides={"group.instance.id": f"{group_id}-0", "fetch.wait.max.ms": 50},
        producer_overrides={"linger.ms": 0})


MULTI_INSTANCE = False  # one instance: it holds every strategy's positions


def _json(value: object) -> object:
    """A table, also as a JSON object's text (the command line)."""
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError(f"not a JSON object: {value!r}") from None
    return value


def _capital(value: object) -> dict[str, Decimal]:
    """One amount for every strategy, or a table {strategy_id: amount, "*": the rest}."""
    value = _json(value)
    if isinstance(value, dict):
        return {str(k): convert(Decimal, v) for k, v in value.items()}
    return {"*": convert(Decimal, value)}


def _limits(value: object) -> dict[str, RiskStop]:
    value = _json(value)
    if not isinstance(value, dict):
        raise ValueError(f"must be a table {{strategy_id or \"*\": {{max_drawdown = "
                         f"\"100\" or \"5%\", max_daily_loss = \"50\"}}}}, not {value!r}")
    return {str(k): RiskStop.parse(v) for k, v in value.items()}


def _age(value: object) -> Decimal | None:
    if isinstance(value, str) and value.lower() in ("off", "none"):
        return None
    return convert(Decimal, value)


@dataclass(frozen=True)
class Config:
    """The portfolio group's settings: a topology's ``args`` (pipeline/runtime/contract.py)."""

    capital: dict[str, Decimal] = field(default_factory=dict, metadata={
        "parse": _capital, "help": "each strategy's starting equity: one amount, or a table "
        "(a JSON object) {strategy_id: amount, \"*\": the others} [default: 0]"})
    currency: str = field(default="USD", metadata={"help": "what equity and PnL are in"})
    limits: dict[str, RiskStop] = field(default_factory=dict, metadata={
        "parse": _limits, "help": "JSON {strategy_id or \"*\": {\"max_drawdown\": \"100\" "
        "or \"5%%\", \"max_daily_loss\": \"50\"}}"})
    symbols: tuple[str, ...] = field(default=(), metadata={
        "help": "known symbols (comma-separated): a fill of another goes to the dead-letter "
        "topic [default: the topology's; else any]"})
    max_mark_age_s: Decimal | None = field(default=Decimal(60), metadata={
        "parse": _age, "help": "older marks are stale, or off"})
    pnl_interval: float = field(default=10.0, metadata={
        "help": "seconds between periodic PnL records"})
    mode: str = field(default="paper", metadata={
        "choices": ("paper", "sandbox", "live"),
        "help": "sandbox/live: reconcile with Gemini (the key execution uses)"})
    venue_url: str | None = None
    api_key_file: Path | None = None
    reconcile_interval: float = 300.0
    reconcile_grace: float = 30.0
    parquet_root: Path | None = None
    group: str | None = field(default=None, metadata={
        "help": "group id [default: <namespace>.portfolio]"})


def settings_of(ctx: GroupContext, config: Config) -> PortfolioSettings:
    capital = dict(config.capital)
    default = capital.pop("*", Decimal(0))
    portfolio = PortfolioConfig(
        capital=capital, default_capital=default, currency=config.currency,
        limits=dict(config.limits), symbols=frozenset(config.symbols or ctx.symbols),
        max_mark_age_ms=None if config.max_mark_age_s is None
        else int(config.max_mark_age_s * 1000),
        pnl_interval_ms=int(config.pnl_interval * 1000))
    return PortfolioSettings(portfolio, ctx.run_dir, config.parquet_root, mode=config.mode,
                             venue_url=config.venue_url,
                             reconcile_interval_s=config.reconcile_interval,
                             reconcile_grace_s=config.reconcile_grace)


def make_group(ctx: GroupContext, config: Config = Config()) -> GroupConfig:
    """The group of the contract (pipeline/runtime/contract.py): loads the credentials
    (sandbox/live), creates its topics."""
    from pipeline.kafka.catalog import ensure_topics

    settings = settings_of(ctx, config)
    credentials = GeminiCredentials.load(config.api_key_file) \
        if settings.mode in RECONCILING_MODES else None
    ensure_topics(ctx.bootstrap, ctx.namespace, TOPICS)
    return group_config(ctx.bootstrap, ctx.registry_url, ctx.namespace, settings,
                        credentials=credentials, group_id=config.group)


def main(argv: list[str] | None = None) -> int:
    return group_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
