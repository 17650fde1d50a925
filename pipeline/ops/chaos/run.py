"""One chaos run: the demo topology on a local cluster, a seeded fault schedule, then the
invariants over every record written.

The venue runs in this process (it is the witness: every frame it sent, its books, the
orders it was asked to place), the topology under an in-process supervisor that restarts
what is killed, exactly as ``pipeline up`` would. Execution trades on the venue through
Gemini's order API (sandbox mode), so resting orders, fills and cancels are all covered.

When the schedule is done the sources stop (the venue's market holds still), the kill
switch cancels every open order, every group drains, the topology stops gracefully, and
the records are read back and checked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.core.decimals import fixed
from pipeline.core.errors import PipelineError
from pipeline.kafka.catalog import Namespace
from pipeline.kafka.cluster_health import describe_cluster
from pipeline.kafka.security import write_secret
from pipeline.ops import kill_switch
from pipeline.ops.broker import LocalCluster, LocalKafka, local_kafka
from pipeline.ops.chaos.invariants import (
    Check,
    SentConnection,
    VenueOrders,
    check_archive,
    check_bars,
    check_books,
    check_dlq,
    check_frames,
    check_orders,
    check_positions,
)
from pipeline.ops.chaos.schedule import BROKER_FAULTS, FAULT_KINDS, Fault, make_schedule
from pipeline.ops.registry_server import LocalRegistry
from pipeline.ops.services import free_port
from pipeline.ops.settings import REPO_ROOT, Settings, ensure_writable_dir
from pipeline.ops.supervisor import Supervisor
from pipeline.replay.archive import read_records as read_archive

log = logging.getLogger(__name__)

NAMESPACE = "sim-chaos"
CAPTURE = REPO_ROOT.parent / "shared" / "data" / "gemini_v2_l2_capture_2021-06-24.txt"
CAPTURE_SYMBOLS = ("BTCGBP", "LINKETH", "FILUSD", "ZECLTC", "BATBTC", "ETHEUR", "LTCETH",
                   "GRTUSD", "ANKRUSD", "ALCXUSD")
GENERATOR_SYMBOLS = ("BTCUSD", "ETHUSD", "SOLUSD")
INTERVALS = ("1m", "5m", "1h", "1d")
DEPTH = 10
GROUPS = ("orderbook", "bars", "strategy", "execution", "portfolio", "archive")
ARCHIVED = ("md.l2", "md.trades")  # the archive group's topics (raw.frames is not archived)
ARCHIVE_ROLL_S = 5.0  # files rolled often, so kills land between and inside flushes
API_KEY = "account-chaos-key"


@dataclass
class ChaosConfig:
    run_dir: Path
    minutes: float = 10.0
    seed: int = 1
    nodes: int = 3
    rate: float | None = None  # the generator at this many events/s instead of the capture
    capture: Path = CAPTURE
    faults: list[Fault] | None = None  # an explicit schedule (tests); None: make_schedule
    keep: bool = False  # leave the cluster, registry and records in place afterwards
    drain_timeout_s: float = 240.0


@dataclass
class ChaosReport:
    schedule: list[Fault]
    injected: Counter = field(default_factory=Counter)  # kind -> faults applied
    log: list[str] = field(default_factory=list)  # what each fault did, in order
    checks: list[Check] = field(default_factory=list)
    restarts: dict[str, int] = field(default_factory=dict)  # process -> restarts

    @property
    def held(self) -> bool:
        return bool(self.checks) and all(c.held for c in self.checks)


class _ChaosSupervisor(Supervisor):
    """The topology's supervisor, with the producer pointed at this process's venue."""

    def __init__(self, topology: Any, settings: Settings, venue_url: str) -> None:
        super().__init__(topology, settings)
        self.venue_url = venue_url

    def _source(self) -> None:
        self._launch_producer(self.venue_url)

    def child(self, name: str):
        return next(c for c in self.children if c.name == name)


class ChaosRun:
    """See the module doc; :meth:`run` does it all and returns the report."""

    def __init__(self, config: ChaosConfig, say: Callable[[str], None] = print) -> None:
        self.config, self.say = config, say
        self.run_dir = Path(config.run_dir).resolve()
        self.kafka: LocalKafka = local_kafka(self.run_dir, nodes=config.nodes)
        self.registry = LocalRegistry(self.run_dir)
        self.namespace = Namespace(NAMESPACE)
        self.symbols = GENERATOR_SYMBOLS if config.rate else CAPTURE_SYMBOLS
        self.groups = list(GROUPS)
        self.report = ChaosReport(config.faults if config.faults is not None else make_schedule(
            config.seed, config.minutes, self.groups, config.nodes))
        self.malformed_hits = 0
        self.killed_connections: set[int] = set()  # venue connections open at a producer kill
        self.drained = Check("every group caught up, no order live, after the sources stopped")
        self._restarts: list[threading.Thread] = []

    # -- the whole run

    def run(self) -> ChaosReport:
        self._prepare()
        try:
            self._start()
            try:
                self._inject()
                self._drain()
            finally:
                self._stop_topology()
            self._check()
        finally:
            if not self.config.keep:
                self._teardown()
        return self.report

    def _prepare(self) -> None:
        if self.kafka.state() is not None or self.registry.state() is not None:
            raise PipelineError(f"{self.run_dir} has a broker or registry running: stop it "
                                "(`pipeline down --run-dir ...`) or choose another run dir")
        if not self.config.rate and not Path(self.config.capture).is_file():
            raise PipelineError(f"the capture {self.config.capture} is missing (../shared/data "
                                "beside the repo); run on the generator with --rate N")
        ensure_writable_dir(self.run_dir)
        for leftover in ("kafka", "registry", "parquet", "logs", kill_switch.KILL_SWITCH_FILE):
            path = self.run_dir / leftover
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def _start(self) -> None:
        from pipeline.venue.server import RunningVenue, VenueConfig

        cfg = self.config
        what = f"a {cfg.nodes}-node cluster" if cfg.nodes > 1 else "one broker"
        self.say(f"starting {what}, the registry and the venue in {self.run_dir}")
        self.bootstrap = self.kafka.start(port=0, controller_port=0).bootstrap_servers
        self.registry_state = self.registry.start(self.bootstrap, port=0)
        secret = secrets.token_hex(24)
        self.venue = RunningVenue(VenueConfig(
            capture=None if cfg.rate else Path(cfg.capture), symbols=list(self.symbols),
            speed=1.0, loop=True, rate=cfg.rate, seed=cfg.seed, heartbeat_s=1.0,
            record_frames=True, api_keys={API_KEY: {"secret": secret, "time_nonce": True}}))
        secrets_dir = ensure_writable_dir(self.run_dir / "secrets")
        key_file = secrets_dir / "chaos-venue-key.json"
        write_secret(key_file, json.dumps({"api_key": API_KEY, "api_secret": secret,
                                           "nonce": "time"}))
        topology_file = self.run_dir / "topology.chaos.toml"
        topology_file.write_text(self._topology_text(key_file))
        from pipeline.ops.topology import load

        settings = Settings(self.run_dir, None, None, NAMESPACE)
        self.supervisor = _ChaosSupervisor(load(topology_file), settings, self.venue.ws_url)
        self.supervisor.start()
        self._watcher = threading.Thread(target=self.supervisor.watch, name="supervisor",
                                         daemon=True)
        self._watcher.start()
        self.say(f"topology up: {', '.join(c.name for c in self.supervisor.children)}; "
                 f"{len(self.report.schedule)} faults over {cfg.minutes:g} min (seed {cfg.seed})")

    def _topology_text(self, key_file: Path) -> str:
        symbols = ", ".join(f'"{s}"' for s in self.symbols)
        strategy_symbol = "BTCUSD" if self.config.rate else "FILUSD"
        tick = "0.01" if self.config.rate else "0.0001"
        state = self.kafka.state()
        port = state.ports[0] if isinstance(self.kafka, LocalCluster) else state.port
        limit = 10_000  # every kill is a restart: the supervisor must never give up here
        processes = [
            ("orderbook", "consumers.orderbook", f"{{ depth = {DEPTH} }}"),
            ("bars", "consumers.bars", f'{{ intervals = "{",".join(INTERVALS)}" }}'),
            ("strategy", "consumers.strategy",
             f'{{ strategy = "pipeline.strategy:MidQuoter", params = {{ symbol = '
             f'"{strategy_symbol}", spread_bps = 10, tick = "{tick}", amount = "0.1", '
             f'max_inventory = "1" }}, inputs = '
             '"book.snapshots" }'),
            ("execution", "consumers.execution",
             f'{{ mode = "sandbox", venue_url = "{self.venue.http_url}", venue_ws_url = '
             f'"{self.venue.ws_url}", api_key_file = "{key_file}" }}'),
            ("portfolio", "consumers.portfolio", '{ capital = "10000" }'),
            ("archive", "consumers.archive", f"{{ roll_seconds = {ARCHIVE_ROLL_S} }}"),
        ]
        blocks = "\n".join(f'[[process]]\nname = "{n}"\nrun = "{r}"\nargs = {a}\n'
                           f"restart_limit = {limit}\n" for n, r, a in processes)
        return (f'# Written by `pipeline chaos` for this run.\nnamespace = "{NAMESPACE}"\n'
                f"symbols = [{symbols}]\n\n[source]\nkind = \"venue\"\nprotocol = \"ws\"\n"
                f"port = {self.venue.port}\n\n[infra]\nlisten = \"127.0.0.1\"\n"
                f"kafka_port = {port}\nregistry_port = {self.registry_state.port}\n"
                f"metrics_port = {free_port()}\nweb_port = 0\n\n{blocks}")

    # -- faults

    def _inject(self) -> None:
        start = time.monotonic()
        for fault in self.report.schedule:
            delay = start + fault.at_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                done = self._apply(fault)
            except Exception as exc:  # noqa: BLE001 - a fault that could not be applied
                done = f"not applied: {exc}"
            self.report.log.append(f"{fault.describe()}: {done}")
            self.say(f"  {fault.describe()}: {done}")
            if not done.startswith("not applied"):
                self.report.injected[fault.kind] += 1
        remaining = start + self.config.minutes * 60 - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        for thread in self._restarts:
            thread.join(300)

    def _apply(self, fault: Fault) -> str:
        kind = fault.kind
        if kind in ("kill_group", "kill_producer"):
            child = self.supervisor.child(fault.target if kind == "kill_group" else "producer")
            if child.pid is None or not child.up:
                return f"not applied: {child.name} is not running (restarting)"
            if kind == "kill_producer":  # its open connections may lose frames it had read
                self.killed_connections |= self._venue_call(self._open_connections())
            os.kill(child.pid, 9)
            return f"killed {child.name} (pid {child.pid})"
        if kind in BROKER_FAULTS:
            return self._kill_broker(fault)
        if kind == "restart_registry":
            port = self.registry_state.port
            self.registry.stop()
            self.registry_state = self.registry.start(self.bootstrap, port=port)
            return f"registry restarted on port {port}"
        action = {"venue_drop": "drop", "venue_stall": "stall", "venue_malformed": "malformed",
                  "venue_gap": "skip_update_id"}[kind]
        hit = self._venue_call(self.venue.venue.apply_fault(
            {"action": action, "seconds": 4, "version": "ws"}, market_only=True))
        if kind == "venue_malformed":
            self.malformed_hits += hit
        return f"{action} on {hit} connection(s)"

    def _kill_broker(self, fault: Fault) -> str:
        if not isinstance(self.kafka, LocalCluster):
            return "not applied: one broker (broker faults need --nodes 3)"
        for thread in self._restarts:  # one broker at a time
            thread.join(300)
        self._await_in_sync(120)
        if fault.kind == "kill_controller":
            node, role = self._quorum_leader(), "the controller leader"
        elif fault.kind == "kill_leader":
            node, role = self._requests_leader()
        else:
            node, role = int(fault.target), "a broker"
        pid = self.kafka.node(node).kill()
        thread = threading.Thread(target=self._restart_node, args=(fault.down_s,), daemon=True)
        thread.start()
        self._restarts = [thread]
        return f"killed node {node} ({role}, pid {pid}), back in {fault.down_s:.0f}s"

    def _requests_leader(self) -> tuple[int, str]:
        """The leader of the busiest partition of orders.requests (the strategy's symbol)."""
        from pipeline.kafka.catalog import describe_topics

        topic = self.namespace.topic("orders.requests")
        ends = next(t.end_offsets for t in describe_topics(self.bootstrap, self.namespace)
                    if t.name == topic)
        partition = max(range(len(ends)), key=lambda p: ends[p])
        leader = describe_cluster(self.bootstrap, [topic]).leader_of(topic, partition)
        return leader, f"leader of {topic}[{partition}]"

    def _restart_node(self, after_s: float) -> None:
        time.sleep(after_s)
        try:
            self.kafka.start(port=0, controller_port=0)
        except PipelineError as exc:
            log.error("restarting the killed node failed: %s", exc)

    def _quorum_leader(self) -> int:
        assert isinstance(self.kafka, LocalCluster)
        out = self.kafka.node(1).run_tool("org.apache.kafka.tools.MetadataQuorumCommand",
                                          "--bootstrap-server", self.bootstrap, "describe",
                                          "--status")
        match = re.search(r"LeaderId:\s*(\d+)", out)
        if match is None:
            raise PipelineError(f"the quorum did not name its leader: {out[:200]}")
        return int(match.group(1))

    def _await_in_sync(self, timeout: float) -> None:
        """Until no partition is under-replicated (a restarted node has caught up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not describe_cluster(self.bootstrap, timeout=5).under_replicated:
                    return
            except PipelineError:
                pass
            time.sleep(1.0)

    async def _open_connections(self) -> set[int]:
        return {id(c) for c in self.venue.venue.connections if not c.closed and not c.is_trading}

    def _venue_call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.venue.loop).result(15)

    # -- drain and stop

    def _drain(self) -> None:
        """Stop the sources, cancel every open order, wait until every group caught up."""
        from pipeline.kafka.catalog import describe_topics
        from pipeline.ops.status import group_lags

        venue = self.venue.venue
        venue.paused = True

        async def sent_now() -> dict[int, int]:
            return {id(c): len(c.sent or ()) for c in venue.connections if not c.closed}

        self.sent_at_stop = self._venue_call(sent_now())
        self.say("sources stopped; kill switch on; draining")
        started = time.monotonic()
        self._await_in_sync(120)
        kill_switch.turn(self.run_dir, True)
        deadline = time.monotonic() + self.config.drain_timeout_s
        stable_since, last = time.monotonic(), None
        while time.monotonic() < deadline:
            try:
                topics = {t.name: t.end_offsets
                          for t in describe_topics(self.bootstrap, self.namespace, timeout=5)}
                lags = group_lags(self.bootstrap, self.namespace, topics)
            except PipelineError:
                time.sleep(1.0)
                continue
            live = self._venue_call(self._live_orders())
            # committed offsets only: portfolio.pnl is appended every few seconds anyway
            view = tuple(sorted((g, v["committed"]) for g, v in lags.items()))
            # The bars group commits a trade only once every bar it is in has closed (a
            # restart rebuilds open bars from the topic): its lag is its open bars' trades.
            # The bars invariant checks that it closed every bar it should have.
            behind = sum(n for g, v in lags.items() if not g.endswith(".bars")
                         for n in v["lag"].values() if n > 1)
            if view != last:
                stable_since, last = time.monotonic(), view
            if not behind and not live and time.monotonic() - stable_since >= 8.0 and \
                    len(lags) >= len(self.groups):
                took = time.monotonic() - started
                self.say(f"drained: {len(lags)} groups caught up, no order live at the venue")
                self.drained.records = sum(v["committed"] for v in lags.values())
                self.drained.notes.append(f"{len(lags)} groups caught up {took:.0f}s after "
                                          "the sources stopped")
                return
            time.sleep(1.0)
        lagging = {g: sum(v["lag"].values()) for g, v in lags.items() if sum(v["lag"].values())}
        problem = (f"not drained {self.config.drain_timeout_s:.0f}s after the sources stopped: "
                   f"{len(lags)} groups, lag {lagging or 0}, {len(live)} order(s) live at the "
                   f"venue, committed offsets last moved {time.monotonic() - stable_since:.0f}s "
                   "ago")
        self.drained.fail(problem)
        self.say(f"{problem}: checking what there is")

    async def _live_orders(self) -> list[str | None]:
        exchange = self.venue.venue.exchange
        return [o.client_order_id for o in exchange.active_orders(API_KEY)]

    def _stop_topology(self) -> None:
        supervisor = getattr(self, "supervisor", None)
        if supervisor is None:
            return
        self.report.restarts = {c.name: c.restarts for c in supervisor.children}
        supervisor.stop()
        self._watcher.join(30)

    def _teardown(self) -> None:
        venue = getattr(self, "venue", None)
        if venue is not None:
            venue.stop()
        self.registry.stop()
        self.kafka.stop()

    # -- invariants

    def _check(self) -> None:
        from pipeline.avro.registry import SchemaRegistry
        from pipeline.avro.serde import Serde
        from pipeline.runtime.runner import read_to_end
        from pipeline.sinks.bars import read_all_bars

        decoder = Serde(SchemaRegistry(self.registry_state.url)).decoder()

        def positioned(name: str) -> list[tuple[int, int, dict]]:
            topic = self.namespace.topic(name)
            return [(m.partition(), m.offset(), decoder(m.value()))
                    for m in read_to_end(self.bootstrap, topic, 120) if m.value() is not None]

        def records(name: str) -> list[dict]:
            return [record for _, _, record in positioned(name)]

        self.say("reading every topic back")
        venue = self.venue.venue
        sent_at_stop, killed = self.sent_at_stop, self.killed_connections

        async def witness():
            sent = [SentConnection(tuple(c.sent or ()), sent_at_stop.get(id(c)), id(c) in killed)
                    for c in venue.history if not c.is_trading]
            books = {s: ([(fixed(p), fixed(q))
                          for p, q in venue.market.levels(s, "bid")[:DEPTH]],
                         [(fixed(p), fixed(q))
                          for p, q in venue.market.levels(s, "ask")[:DEPTH]])
                     for s in self.symbols if s in venue.market.books}
            orders = venue.exchange._orders.values()
            placements = [e.get("client_order_id") for e in venue.wstrading.log
                          if e.get("method") == "order.place"]
            placements += [e.get("client_order_id") for e in venue.rest_log
                           if e.get("path") == "/v1/order/new"]
            witness_orders = VenueOrders(
                placements,
                {o.client_order_id: o.executed_amount for o in orders
                 if o.client_order_id and o.api_key == API_KEY},
                [o.client_order_id for o in orders if o.is_live and o.api_key == API_KEY])
            return sent, books, witness_orders

        sent, books, venue_orders = self._venue_call(witness())
        raw_frames = records("raw.frames")
        in_topics = {name: positioned(name) for name in ARCHIVED}
        trades = [record for _, _, record in in_topics["md.trades"]]
        archive_root = self.run_dir / "parquet" / NAMESPACE / "archive"
        in_archive = {name: list(read_archive(archive_root, name))
                      if (archive_root / name).is_dir() else [] for name in ARCHIVED}
        events = records("orders.events")
        dead = [m.value() for m in read_to_end(self.bootstrap, self.namespace.topic("dlq"), 60)]
        parquet = read_all_bars(self.run_dir / "parquet" / NAMESPACE / "bars") \
            if (self.run_dir / "parquet" / NAMESPACE / "bars").exists() else []
        from pipeline.venue.server import MALFORMED

        self.report.checks = [
            self.drained,
            check_frames(sent, raw_frames),
            check_books(books, records("book.snapshots"), DEPTH),
            check_bars(trades, records("bars.late"), records("bars"), parquet, INTERVALS),
            check_orders(records("orders.requests"), events, venue_orders),
            check_positions(events, records("portfolio.positions")),
            check_dlq(dead, sent, raw_frames, MALFORMED.encode(), self.malformed_hits),
            check_archive(in_topics, {name: [(p, o, r) for p, o, _, r in rows]
                                      for name, rows in in_archive.items()}),
        ]


def run_chaos(config: ChaosConfig, say: Callable[[str], None] = print) -> ChaosReport:
    """Run it (see the module doc); the report says which invariants held."""
    return ChaosRun(config, say).run()


def fault_rows(report: ChaosReport) -> list[tuple[str, int, int, str]]:
    """(kind, scheduled, injected, what it does) for the report's table."""
    scheduled = Counter(f.kind for f in report.schedule)
    return [(kind, scheduled[kind], report.injected[kind], what)
            for kind, what in FAULT_KINDS.items() if scheduled[kind]]
