"""The ``strategy`` consumer group: a strategy plug-in fed from Kafka, signed orders out.

It feeds bars, book snapshots and trades to one :class:`Strategy` and turns each intent
into an ``OrderRequest``: a ``client_order_id`` derived from the strategy id and the
triggering record (so reprocessing yields the same id), creation time, expiry, and an
HMAC signature with the strategy's own key. Consume-transform-produce runs in a Kafka
transaction: requests, the strategy's state and the input offsets commit together, so a
crash never emits a request twice (for read_committed readers such as execution), never
loses one, and a restart resumes from exactly the state of the last commit (the state is
restored from the compacted ``strategy.state`` topic, not rebuilt by guessing from a
partial replay: a position depends on the whole history).

One instance per strategy: its state spans all the symbols it trades.
"""

from __future__ import annotations

import json
import logging
import pickle
import sys
import time
import uuid
from typing import Callable, Iterable

from confluent_kafka import Consumer, TopicPartition

from pipeline.catalog import Namespace
from pipeline.errors import PipelineError
from pipeline.registry import SchemaRegistry
from pipeline.runtime import (GroupConfig, Handler, Output, Record, group_parser,
                              log_to_stderr, run_until_stopped)
from pipeline.serde import Decoder, Serde
from pipeline.signing import StrategyKeys, client_order_id, sign
from pipeline.strategy import OrderIntent, Strategy, load_strategy

log = logging.getLogger(__name__)
INPUTS = {"bars": "on_bar", "book.snapshots": "on_book", "md.trades": "on_trade",
          "orders.events": "on_order_event"}


class StrategyError(Exception):
    """A strategy raised: names the strategy and the input it was given."""


class StrategyHandler(Handler):
    def __init__(self, strategy: Strategy, namespace: Namespace, serde: Serde, key: bytes,
                 bootstrap: str, group_id: str, inputs: Iterable[str], ttl_ms: int = 30_000,
                 clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self.strategy, self.key, self.ttl_ms, self.clock_ms = strategy, key, ttl_ms, clock_ms
        self.bootstrap, self.group_id, self.decoder = bootstrap, group_id, serde.decoder()
        self.callbacks = {namespace.topic(name): getattr(strategy, INPUTS[name])
                          for name in inputs}
        self.out_topic = namespace.topic("orders.requests")
        self.state_topic = namespace.topic("strategy.state")
        self.encode = serde.encoder(self.out_topic)
        self.encode_state = serde.encoder(self.state_topic)
        self.strategy_class = f"{type(strategy).__module__}:{type(strategy).__qualname__}"
        self.requests = 0
        self._dirty = False
        self._restored = False

    def handle(self, record: Record) -> Iterable[Output]:
        trigger = f"{record.topic}/{record.partition}/{record.offset}"
        intents = self._call(record.topic, record.value, trigger)
        self._dirty = True
        return [self._request(intent, trigger, i) for i, intent in enumerate(intents)]

    def end_batch(self) -> Iterable[Output]:
        """Save the state in the batch's transaction, beside its requests and offsets."""
        if not self._dirty:
            return ()
        self._dirty = False
        value = self.encode_state({
            "strategy_id": self.strategy.strategy_id, "strategy_class": self.strategy_class,
            "state": pickle.dumps(self.strategy.__dict__, protocol=pickle.HIGHEST_PROTOCOL),
            "saved_ms": self.clock_ms()})
        return [Output(self.state_topic, value, self.strategy.strategy_id)]

    def _call(self, topic: str, value: dict, trigger: str) -> list[OrderIntent]:
        try:
            return list(self.callbacks[topic](value) or ())
        except Exception as exc:  # noqa: BLE001 - any strategy bug: name who and on what
            raise StrategyError(f"strategy {self.strategy.strategy_id} raised "
                                f"{type(exc).__name__} on {trigger}: {exc}") from exc

    def _request(self, intent: OrderIntent, trigger: str, index: int) -> Output:
        if intent.amount is None:  # a fraction of equity, or close_position: backtest-only
            what = ("closing its position" if intent.close_position
                    else f"a fraction {intent.fraction} of equity")
            raise StrategyError(f"strategy {self.strategy.strategy_id} asked for {what} on "
                                f"{trigger}: the live strategy group sends concrete amounts "
                                "only (fractions and closes are resolved by the backtest's "
                                "simulated broker); give the strategy an amount")
        now = self.clock_ms()
        request = {
            "client_order_id": client_order_id(self.strategy.strategy_id, trigger, index),
            "strategy_id": self.strategy.strategy_id, "symbol": intent.symbol,
            "side": intent.side, "order_type": intent.order_type, "price": intent.price,
            "amount": intent.amount, "options": list(intent.options), "created_ms": now,
            "expires_ms": now + self.ttl_ms, "trigger": trigger}
        request["signature"] = sign(request, self.key)
        self.requests += 1
        return Output(self.out_topic, self.encode(request), intent.symbol)

    # -- restore after a restart

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        if self._restored:
            return None  # a rebalance inside a running process: the state is current
        self._restored = True
        saved = self._latest_state()
        if saved is None:
            log.info("strategy %s starts fresh (no saved state)", self.strategy.strategy_id)
            return None
        if saved["strategy_class"] != self.strategy_class:
            raise PipelineError(f"the saved state of strategy {self.strategy.strategy_id} was "
                                f"written by {saved['strategy_class']}, not "
                                f"{self.strategy_class}: use a new strategy id")
        self.strategy.__dict__.update(pickle.loads(saved["state"]))
        log.info("strategy %s restored its state saved at %d", self.strategy.strategy_id,
                 saved["saved_ms"])
        return None

    def _latest_state(self) -> dict | None:
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"state-{uuid.uuid4()}",
                             "enable.auto.commit": False, "isolation.level": "read_committed"})
        try:
            tp = TopicPartition(self.state_topic, 0)
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            latest = None
            if high > low:
                consumer.assign([TopicPartition(self.state_topic, 0, low)])
                position = low
                while position < high:
                    msgs = consumer.consume(500, 1.0)
                    if not msgs:
                        # Transaction markers take offsets but are never delivered.
                        position = consumer.position([tp])[0].offset
                        continue
                    for msg in msgs:
                        if msg.error():
                            continue
                        position = msg.offset() + 1
                        value = self.decoder(msg.value())
                        if value["strategy_id"] == self.strategy.strategy_id:
                            latest = value
            return latest
        finally:
            consumer.close()


def make_group(bootstrap: str, registry_url: str, namespace: Namespace, strategy: Strategy,
               key: bytes, inputs: Iterable[str] = ("bars",), instance: int = 0,
               ttl_ms: int = 30_000) -> GroupConfig:
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
                                                       group_id, inputs, ttl_ms),
                       decoder=Decoder(registry), batch_size=500,
                       transactional_id=f"{group_id}.{instance}")


def main(argv: list[str] | None = None) -> int:
    from pipeline.catalog import ensure_topics

    ap = group_parser("python -m consumers.strategy")
    ap.add_argument("--strategy", default="pipeline.strategy:SmaCross", help="module:Class")
    ap.add_argument("--params", default="{}", help="JSON object of strategy parameters")
    ap.add_argument("--inputs", default="bars", help="comma-separated: bars, book.snapshots, "
                                                     "md.trades, orders.events")
    ap.add_argument("--strategy-keys", help="0600 JSON file {strategy_id: secret}")
    ap.add_argument("--instance", type=int, default=0)
    args = ap.parse_args(argv)
    log_to_stderr()
    strategy = load_strategy(args.strategy, json.loads(args.params))
    key = StrategyKeys.load(args.strategy_keys).key(strategy.strategy_id)
    if key is None:
        raise PipelineError(f"no signing key for strategy {strategy.strategy_id}: put it in "
                            "the key file or the environment")
    namespace = Namespace(args.namespace)
    inputs = [s.strip() for s in args.inputs.split(",") if s.strip()]
    ensure_topics(args.bootstrap, namespace, [*inputs, "orders.requests", "strategy.state", "dlq"])
    run_until_stopped(make_group(args.bootstrap, args.registry, namespace, strategy, key, inputs,
                                 args.instance), args.bootstrap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
