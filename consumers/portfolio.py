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
import os
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
from pipeline.runtime.runner import (
    GroupConfig,
    Handler,
    Output,
    Record,
    group_parser,
    log_to_stderr,
    run_until_stopped,
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


def make_group(bootstrap: str, registry_url: str, namespace: Namespace,
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


def _decimal_or_map(text: str | None, what: str) -> tuple[Decimal, dict[str, Decimal]]:
    """--capital: one amount for every strategy, or a JSON object per strategy ("*": the
    rest)."""
    if text is None:
        return Decimal(0), {}
    text = text.strip()
    if text.startswith("{"):
        raw = json.loads(text)
        per = {k: Decimal(str(v)) for k, v in raw.items()}
        return per.pop("*", Decimal(0)), per
    try:
        return Decimal(text), {}
    except ArithmeticError:
        raise PipelineError(f"{what} must be an amount or a JSON object, not {text!r}") from None


def settings_from_args(args) -> PortfolioSettings:
    default, capital = _decimal_or_map(args.capital, "--capital")
    limits = {k: RiskStop.parse(v) for k, v in json.loads(args.limits or "{}").items()}
    symbols = frozenset(s for s in (args.symbols or "").split(",") if s)
    config = PortfolioConfig(capital=capital, default_capital=default, currency=args.currency,
                             limits=limits, symbols=symbols,
                             max_mark_age_ms=None if args.max_mark_age_s in ("off", "none")
                             else int(float(args.max_mark_age_s) * 1000),
                             pnl_interval_ms=int(args.pnl_interval * 1000))
    return PortfolioSettings(
        config, Path(args.run_dir or os.environ.get("PIPELINE_RUN_DIR") or "run"),
        Path(args.parquet_root) if args.parquet_root else None, mode=args.mode,
        venue_url=args.venue_url, reconcile_interval_s=args.reconcile_interval,
        reconcile_grace_s=args.reconcile_grace)


def main(argv: list[str] | None = None) -> int:
    from pipeline.kafka.catalog import ensure_topics

    ap = group_parser("python -m consumers.portfolio", __doc__.split("\n")[0])
    ap.add_argument("--capital", default=None, help="each strategy's starting equity: one "
                    "amount, or a JSON object {strategy_id: amount, \"*\": the others} [0]")
    ap.add_argument("--currency", default="USD", help="what equity and PnL are in")
    ap.add_argument("--limits", default=None, help="JSON {strategy_id or \"*\": "
                    "{\"max_drawdown\": \"100\" or \"5%%\", \"max_daily_loss\": \"50\"}}")
    ap.add_argument("--symbols", default=None, help="known symbols (comma-separated): a "
                    "fill of another goes to the dead-letter topic [default: any]")
    ap.add_argument("--max-mark-age-s", default="60", help="older marks are stale, or off")
    ap.add_argument("--pnl-interval", type=float, default=10.0,
                    help="seconds between periodic PnL records")
    ap.add_argument("--mode", choices=("paper", "sandbox", "live"), default="paper",
                    help="sandbox/live: reconcile with Gemini (the key execution uses)")
    ap.add_argument("--venue-url", default=None)
    ap.add_argument("--api-key-file", default=None)
    ap.add_argument("--reconcile-interval", type=float, default=300.0)
    ap.add_argument("--reconcile-grace", type=float, default=30.0)
    ap.add_argument("--parquet-root", default=None)
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--group", default=None, help="group id [default: <namespace>.portfolio]")
    args = ap.parse_args(argv)
    log_to_stderr()
    try:
        namespace = Namespace(args.namespace)
        settings = settings_from_args(args)
        credentials = GeminiCredentials.load(args.api_key_file) \
            if settings.mode in RECONCILING_MODES else None
        ensure_topics(args.bootstrap, namespace, TOPICS)
        config = make_group(args.bootstrap, args.registry, namespace, settings,
                            credentials=credentials, group_id=args.group)
    except (PipelineError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    run_until_stopped(config, args.bootstrap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
