"""The ``strategy`` consumer group: a strategy plug-in fed from Kafka, signed orders out.

It feeds bars, book snapshots and trades to one :class:`Strategy`, and its own order
events (``orders.events``, read by default) to its view of its orders
(:class:`~pipeline.trading.tracker.OrderTracker`: open orders, positions, equity) and to
``on_order_event``; ``on_timer`` is called every ``timer_interval_ms`` of wall time. Intents
become ``OrderRequest``s through :func:`pipeline.trading.requests.build_requests`, the one
translation the order-book backtest uses too, so a request's ``client_order_id`` is derived
from the strategy id and the triggering record exactly as in a backtest (a book snapshot's
trigger is the ``md.l2`` record it includes up to), and fractions and ``close_position`` are
sized from the view. Each request gets an expiry (the strategy's ``order_ttl_ms``) and an
HMAC signature with the strategy's own key.

Consume-transform-produce runs in a Kafka transaction: requests, the strategy's state and
the input offsets commit together, so a crash never emits a request twice (for
read_committed readers such as execution), never loses one, and a restart resumes from
exactly the state of the last commit. The state is what ``save_state()`` returns and the
view, as JSON with the strategy's ``state_version`` (``strategy.state``, compacted): never a
pickle. A saved state that does not load stops the group with the strategy and version
named, rather than trading from an empty state (``--fresh-state`` starts from nothing on
purpose).

One instance per strategy: its state spans all the symbols it trades.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterable

from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Decoder, Serde
from pipeline.core.errors import PipelineError, StrategyFailed
from pipeline.core.vocabulary import Side
from pipeline.kafka.catalog import Namespace
from pipeline.runtime.context import AssignContext, Partition
from pipeline.runtime.contract import GroupContext, group_main
from pipeline.runtime.runner import (
    GroupConfig,
    Handler,
    Output,
    Record,
)
from pipeline.trading.fees import GEMINI_API_FEES
from pipeline.trading.requests import (
    IntentError,
    build_requests,
    event_trigger,
    record_trigger,
    snapshot_trigger,
)
from pipeline.trading.signing import StrategyKeys, sign
from pipeline.trading.strategy import Strategy, load_strategy
from pipeline.trading.tracker import OrderTracker

log = logging.getLogger(__name__)
# Several instances may run, each named by ctx.instance (in its transactional.id); the
# supervisor gives each its index (pipeline/ops/launch.py).
MULTI_INSTANCE = True
INPUTS = {"bars": "on_bar", "book.snapshots": "on_book", "md.trades": "on_trade",
          "orders.events": "on_order_event"}
STATE_FORMAT = "json"
DEFAULT_LOT = Decimal("0.00000001")  # fraction sizing's step without symbol rules


@dataclass(frozen=True)
class Config:
    """The strategy group's settings: a topology's ``args`` (pipeline/runtime/contract.py)."""

    strategy: str = field(default="pipeline.strategy:SmaCross", metadata={
        "help": "module:Class"})
    params: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "the strategy's parameters (a JSON object on the command line)"})
    inputs: tuple[str, ...] = field(default=("bars",), metadata={
        "help": "comma-separated: bars, book.snapshots, md.trades (the strategy's own "
                "orders.events are read as well)"})
    strategy_keys: Path | None = field(default=None, metadata={
        "help": "0600 JSON file {strategy_id: secret} [default: the run's key file]"})
    capital: Decimal | None = field(default=None, metadata={
        "help": "starting cash in the quote currency: the strategy's equity (and fraction "
                "sizing) starts from it"})
    lot: Decimal = field(default=DEFAULT_LOT, metadata={
        "help": "fraction sizing rounds down to whole lots of this"})
    no_order_events: bool = field(default=False, metadata={
        "help": "do not read orders.events (the strategy then sees no fills)"})
    fresh_state: bool = field(default=False, metadata={
        "help": "ignore the saved state and start from nothing"})


# The one strategy error, the backtest's too (pipeline.core.errors); the old name stays.
StrategyError = StrategyFailed


class StrategyHandler(Handler):
    def __init__(self, strategy: Strategy, namespace: Namespace, serde: Serde, key: bytes,
                 bootstrap: str, group_id: str, inputs: Iterable[str],
                 ttl_ms: int | None = None, capital: Decimal | None = None,
                 lot: Decimal = DEFAULT_LOT, fresh_state: bool = False,
                 clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self.strategy, self.key, self.clock_ms = strategy, key, clock_ms
        self.ttl_ms = strategy.order_ttl_ms if ttl_ms is None else ttl_ms
        self.bootstrap, self.group_id, self.decoder = bootstrap, group_id, serde.decoder()
        self.lot, self.fresh_state = lot, fresh_state
        self.kinds = {namespace.topic(name): name for name in inputs}
        self.out_topic = namespace.topic("orders.requests")
        self.state_topic = namespace.topic("strategy.state")
        self.encode = serde.encoder(self.out_topic)
        self.encode_state = serde.encoder(self.state_topic)
        self.strategy_class = f"{type(strategy).__module__}:{type(strategy).__qualname__}"
        self.tracker = OrderTracker(strategy.strategy_id, cash=capital)
        strategy.attach(self.tracker)
        self.tops: dict[str, tuple[Decimal | None, Decimal | None]] = {}  # best bid, ask
        self.timer_ms = strategy.timer_interval_ms
        self.next_timer_ms: int | None = None
        self.requests = 0
        self._dirty = False
        self._restored = False

    # -- records

    def handle(self, record: Record) -> Iterable[Output]:
        kind, value = self.kinds[record.topic], record.value
        where = f"{record.topic}/{record.partition}/{record.offset}"
        if kind == "orders.events":
            if not self.tracker.on_event(value):
                return ()  # another strategy's order
            self._dirty = True
            return self._run("on_order_event", value, event_trigger(value), where)
        self._dirty = True
        if kind == "book.snapshots":
            self._mark_book(value)
            return self._run("on_book", value, snapshot_trigger(value), where)
        if kind == "bars":
            self.tracker.mark_text(value["symbol"], value["close"])
        elif not value.get("from_snapshot"):
            self.tracker.mark(value["symbol"], Decimal(value["price"]))
        return self._run(INPUTS[kind], value,
                         record_trigger(record.topic, record.partition, record.offset), where)

    def _mark_book(self, snapshot: dict) -> None:
        bid = Decimal(snapshot["bids"][0]["price"]) if snapshot["bids"] else None
        ask = Decimal(snapshot["asks"][0]["price"]) if snapshot["asks"] else None
        self.tops[snapshot["symbol"]] = (bid, ask)
        self.tracker.mark_book(snapshot)

    def _price_of(self, symbol: str, side: str) -> Decimal | None:
        """What a buy (sell) would pay now: the best ask (bid), else the mark."""
        bid, ask = self.tops.get(symbol, (None, None))
        return (ask if side == Side.BUY else bid) or self.tracker.mark_of(symbol)

    def _run(self, callback: str, value: Any, trigger: str, where: str) -> list[Output]:
        try:
            intents = getattr(self.strategy, callback)(value)
            intents = list(intents or ())
        except Exception as exc:  # noqa: BLE001 - any strategy bug: name who and on what
            raise StrategyFailed(f"strategy {self.strategy.strategy_id} raised "
                                f"{type(exc).__name__} on {where} ({callback}): {exc}") from exc
        if not intents:
            return []
        try:
            requests, refused = build_requests(
                intents, strategy_id=self.strategy.strategy_id, tracker=self.tracker,
                trigger=trigger, now_ms=self.clock_ms(), ttl_ms=self.ttl_ms, lot=self.lot,
                price_of=self._price_of, fee_rate=GEMINI_API_FEES.taker)
        except IntentError as exc:
            raise StrategyFailed(f"strategy {self.strategy.strategy_id} in {callback} on "
                                f"{where}: {exc}") from None
        for refusal in refused:
            self.metrics.inc("refusals_total")
            log.info("strategy %s on %s: %s makes no order: %s", self.strategy.strategy_id,
                     trigger, refusal.intent, refusal.reason)
        out = []
        for request in requests:
            request["signature"] = sign(request, self.key)
            self.tracker.sent(request)
            self.requests += 1
            out.append(Output(self.out_topic, self.encode(request), request["symbol"]))
        return out

    def end_batch(self) -> Iterable[Output]:
        """Timers, then the state in the batch's transaction, beside its requests and
        offsets."""
        out: list[Output] = []
        if self.tracker.expire(self.clock_ms()):
            self._dirty = True
        if self.timer_ms:
            now = self.clock_ms()
            if self.next_timer_ms is None:
                self.next_timer_ms = (now // self.timer_ms + 1) * self.timer_ms
            while now >= self.next_timer_ms:
                at = self.next_timer_ms
                self.next_timer_ms += self.timer_ms
                self._dirty = True
                out += self._run("on_timer", at, f"timer/{at}", f"the timer at {at} ms")
        if not self._dirty:
            return out
        self._dirty = False
        state = {"strategy": self.strategy.save_state(), "orders": self.tracker.dump(),
                 "next_timer_ms": self.next_timer_ms}
        value = self.encode_state({
            "strategy_id": self.strategy.strategy_id, "strategy_class": self.strategy_class,
            "state": json.dumps(state, sort_keys=True, separators=(",", ":")).encode(),
            "saved_ms": self.clock_ms(), "format": STATE_FORMAT,
            "version": self.strategy.state_version})
        return out + [Output(self.state_topic, value, self.strategy.strategy_id)]

    # -- restore after a restart

    def on_assign(self, ctx: AssignContext, partitions: list[Partition]) -> None:
        if self._restored:
            return None  # a rebalance inside a running process: the state is current
        self._restored = True
        strategy = self.strategy
        saved = self._latest_state(ctx)
        if saved is None or self.fresh_state:
            log.info("strategy %s starts %s", strategy.strategy_id,
                     "fresh (--fresh-state)" if saved is not None else "fresh (no saved state)")
            return None
        where = (f"the saved state of strategy {strategy.strategy_id} (version "
                 f"{saved['version']}, saved at {saved['saved_ms']})")
        if saved["strategy_class"] != self.strategy_class:
            raise PipelineError(f"{where} was written by {saved['strategy_class']}, not "
                                f"{self.strategy_class}: use a new strategy id")
        if saved["format"] != STATE_FORMAT:
            raise PipelineError(f"{where} is a {saved['format']} written by an older version; "
                                "it is never loaded (a pickle read from a topic runs code): "
                                "start with --fresh-state to begin from nothing, or use a new "
                                "strategy id")
        try:
            state = json.loads(saved["state"])
            self.tracker.load(state["orders"])
            strategy.load_state(state["strategy"], saved["version"])
        except Exception as exc:  # noqa: BLE001 - refuse to trade from an empty state
            raise PipelineError(f"{where} does not load: {type(exc).__name__}: {exc}; "
                                "refusing to start rather than trading from an empty state "
                                "(--fresh-state starts from nothing)") from None
        self.next_timer_ms = state.get("next_timer_ms")
        log.info("strategy %s restored its state saved at %d (version %d): %d open order(s), "
                 "positions %s", strategy.strategy_id, saved["saved_ms"], saved["version"],
                 len(self.tracker.orders), {s: str(p) for s, p in self.tracker.positions.items()})
        return None

    def _latest_state(self, ctx: AssignContext) -> dict | None:
        latest = None
        for msg in ctx.read_to_end(self.state_topic):
            value = self.decoder(msg.value)
            if value["strategy_id"] == self.strategy.strategy_id:
                latest = value
        return latest


def group_config(bootstrap: str, registry_url: str, namespace: Namespace, strategy: Strategy,
               key: bytes, inputs: Iterable[str] = ("bars", "orders.events"), instance: int = 0,
               ttl_ms: int | None = None, capital: Decimal | None = None,
               lot: Decimal = DEFAULT_LOT, fresh_state: bool = False) -> GroupConfig:
    registry = SchemaRegistry(registry_url)
    serde = Serde(registry)
    inputs = list(inputs)
    unknown = [name for name in inputs if name not in INPUTS]
    if unknown:
        raise PipelineError(f"unknown strategy input(s) {unknown}: one of {list(INPUTS)}")
    group_id = f"{namespace}.strategy.{strategy.strategy_id}"

    return GroupConfig(group_id=group_id, topics=[namespace.topic(n) for n in inputs],
                       dead_letter_topic=namespace.topic("dlq"),
                       handler=lambda: StrategyHandler(strategy, namespace, serde, key, bootstrap,
                                                       group_id, inputs, ttl_ms, capital, lot,
                                                       fresh_state),
                       decoder=Decoder(registry), batch_size=500,
                       transactional_id=f"{group_id}.{instance}")


def make_group(ctx: GroupContext, config: Config = Config()) -> GroupConfig:
    """The group of the contract (pipeline/runtime/contract.py): loads the strategy and its
    signing key (``strategy_keys``, else the run's key file, and the environment), creates
    its topics."""
    from pipeline.kafka.catalog import ensure_topics

    try:
        strategy = load_strategy(config.strategy, config.params)
    except ValueError as exc:
        raise PipelineError(f"strategy {config.strategy} refused its parameters: {exc}") \
            from None
    key = StrategyKeys.load(config.strategy_keys or ctx.strategy_keys).key(strategy.strategy_id)
    if key is None:
        raise PipelineError(f"no signing key for strategy {strategy.strategy_id}: put it in "
                            "the key file or the environment")
    inputs = list(config.inputs)
    if not config.no_order_events and "orders.events" not in inputs:
        inputs.append("orders.events")
    ensure_topics(ctx.bootstrap, ctx.namespace,
                  [*inputs, "orders.requests", "strategy.state", "dlq"])
    return group_config(ctx.bootstrap, ctx.registry_url, ctx.namespace, strategy, key, inputs,
                        int(ctx.instance), capital=config.capital, lot=config.lot,
                        fresh_state=config.fresh_state)


def main(argv: list[str] | None = None) -> int:
    return group_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
