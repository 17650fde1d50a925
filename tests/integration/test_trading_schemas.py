"""The records strategies see are typed after the schemas, and the trading core's schema changes
are BACKWARD compatible with what was released: the registry takes them, `pipeline schemas check`
passes them, and old records still read and verify: the tests that need Kafka (those that do not:
tests/unit/avro/test_trading_schemas.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.avro import schemas
from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.schemas import register_namespace
from pipeline.avro.serde import Decoder, Encoder
from pipeline.trading.signing import client_order_id, sign, verify
from tests.support.processes import PIPELINE, cluster_env
from tests.unit.avro.test_trading_schemas import RELEASED  # noqa: F401 - shared with the unit tests


def released_dir(tmp_path: Path) -> Path:
    """The schema directory as released: today's, with the released versions of the
    schemas the trading core changed (PaperState is new, so it is left out)."""
    directory = tmp_path / "released"
    shutil.copytree(schemas.SCHEMA_DIR, directory)
    for path in RELEASED.glob("*.avsc"):
        shutil.copy(path, directory / path.name)
    return directory


@pytest.mark.broker
def test_the_new_schemas_pass_the_registry_and_check_against_the_released_ones(
        kafka, registry, namespace, tmp_path):
    reg = SchemaRegistry(registry.url)
    register_namespace(reg, namespace, directory=released_dir(tmp_path))
    result = subprocess.run([PIPELINE, "schemas", "check", "-n", str(namespace)],
                            capture_output=True, text=True, timeout=120,
                            env=cluster_env(kafka, registry.url))
    assert result.returncode == 0, result.stdout + result.stderr
    for record in ("OrderRequest", "OrderEvent", "StrategyState"):
        assert f"({record}): compatible" in result.stdout, result.stdout
    assert "incompatible" not in result.stdout
    # And the registry takes them: registering today's gives each a second version.
    register_namespace(reg, namespace)
    for topic in ("orders.requests", "orders.events", "strategy.state"):
        assert reg.versions(f"{namespace.topic(topic)}-value") == [1, 2]


@pytest.mark.broker
def test_records_written_with_the_released_schemas_read_and_verify_with_the_new_ones(
        registry, namespace):
    reg = SchemaRegistry(registry.url)
    old = {name: json.loads((RELEASED / f"{name}.avsc").read_text())
           for name in ("OrderRequest", "OrderEvent", "StrategyState")}
    key = b"a-strategy-key"
    request = {"client_order_id": client_order_id("sma", "bars/0/1"), "strategy_id": "sma",
               "symbol": "BTCUSD", "side": "BUY", "order_type": "LIMIT", "price": "100.5",
               "amount": "0.01", "options": [], "created_ms": 1, "expires_ms": 2,
               "trigger": "bars/0/1"}
    request["signature"] = sign(request, key)  # as a strategy group of the old version did
    data = Encoder(reg, namespace.topic("orders.requests"), old["OrderRequest"])(request)
    read = Decoder(reg, [schemas.load("OrderRequest")])(data)
    assert read["action"] == "NEW" and read["target_client_order_id"] is None
    assert verify(read, key), "a request signed before the new fields still verifies"
    event = {"client_order_id": "x", "strategy_id": "sma", "symbol": "BTCUSD",
             "kind": "FILLED", "reason": None, "mode": "PAPER", "exchange_order_id": None,
             "side": "buy", "price": "1", "amount": "1", "filled_amount": "1",
             "avg_fill_price": "1", "fee": "0", "fee_currency": "USD", "event_ms": 1}
    data = Encoder(reg, namespace.topic("orders.events"), old["OrderEvent"])(event)
    new_event = Decoder(reg, [schemas.load("OrderEvent")])(data)
    assert new_event["kind"] == "FILLED" and new_event["last_fill_amount"] is None
    # An old reader meets a new kind: Avro's enum default, UNKNOWN, not an error.
    booked = {**new_event, "kind": "BOOKED", "liquidity": "MAKER"}
    data = Encoder(reg, namespace.topic("orders.events"))(booked)
    assert Decoder(reg, [old["OrderEvent"]])(data)["kind"] == "UNKNOWN"
    state = {"strategy_id": "sma", "strategy_class": "m:C", "state": b"\x80\x05pickle",
             "saved_ms": 1}
    data = Encoder(reg, namespace.topic("strategy.state"), old["StrategyState"])(state)
    assert Decoder(reg, [schemas.load("StrategyState")])(data)["format"] == "pickle"


