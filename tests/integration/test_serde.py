"""Avro in the Confluent wire format through a real registry (Apicurio) and real Kafka: the tests
that need Kafka (those that do not: tests/unit/avro/test_serde.py)."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from pipeline.avro import schemas
from pipeline.avro.registry import IncompatibleSchema, RegistryError, SchemaRegistry
from pipeline.avro.serde import HEADER, Decoder, Encoder, Serde, SerdeError
from pipeline.gemini.capture import received_frames
from pipeline.gemini.marketdata import V2Normalizer
from pipeline.kafka.catalog import TOPICS, ensure_topics
from pipeline.kafka.clients import ReliableProducer
from pipeline.kafka.deadletter import STAGE_DECODE, parse_dead_letter
from pipeline.ops.settings import REPO_ROOT
from pipeline.runtime.runner import GroupConfig, GroupRunner, Handler, Record
from tests.support.kafka_io import read_all
from tests.support.processes import PIPELINE
from tests.support.records import SAMPLES
from tests.unit.avro.test_serde import dead_registry  # noqa: F401 - shared with the unit tests

CAPTURE = "gemini_v2_l2_capture_2021-06-24.txt"


AVRO_TOPICS = [t for t in TOPICS if t.value_schema]


def epoch_ints(value, schema_field_units: dict[str, int]):
    """confluent-kafka's deserializer turns timestamp logical types into datetimes: back to
    the epoch integers our records carry."""
    if isinstance(value, dict):
        return {k: (round(v.timestamp() * schema_field_units[k])
                    if isinstance(v, datetime.datetime) else epoch_ints(v, schema_field_units))
                for k, v in value.items()}
    if isinstance(value, list):
        return [epoch_ints(v, schema_field_units) for v in value]
    return value


def time_units(record: str) -> dict[str, int]:
    units = {}

    def walk(node):
        if isinstance(node, dict):
            for field in node.get("fields", ()):
                t = field["type"]
                branches = t if isinstance(t, list) else [t]
                for b in branches:
                    if isinstance(b, dict) and b.get("logicalType") == "timestamp-millis":
                        units[field["name"]] = 1000
                    if isinstance(b, dict) and b.get("logicalType") == "timestamp-micros":
                        units[field["name"]] = 1_000_000
                    walk(b)
            if node.get("type") == "array":
                walk(node["items"])

    walk(schemas.load(record))
    return units


@pytest.mark.broker
def test_every_record_type_round_trips_through_kafka_and_the_registry(kafka, registry, namespace):
    ensure_topics(kafka, namespace)
    serde = Serde(SchemaRegistry(registry.url))
    producer = ReliableProducer(kafka)
    for topic in AVRO_TOPICS:
        sample = SAMPLES[topic.value_schema]
        producer.produce(namespace.topic(topic.name),
                         serde.encoder(namespace.topic(topic.name))(sample), key=b"BTCUSD")
    producer.flush()
    decode = Serde(SchemaRegistry(registry.url)).decoder()  # a fresh client: ids fetched anew
    for topic in AVRO_TOPICS:
        (record,) = read_all(kafka, namespace.topic(topic.name), expect=1)
        assert record.value[0] == 0
        assert decode(record.value) == SAMPLES[topic.value_schema], topic.name


@pytest.mark.broker
@pytest.mark.parametrize("record", sorted(SAMPLES))
def test_confluent_kafkas_own_serde_and_ours_are_byte_compatible(registry, namespace, record):
    topic = next(namespace.topic(t.name) for t in AVRO_TOPICS if t.value_schema == record)
    reg = SchemaRegistry(registry.url)
    ours = Encoder(reg, topic)
    ctx = SerializationContext(topic, MessageField.VALUE)
    theirs = AvroSerializer(reg.client, json.dumps(schemas.load(record)),
                            conf={"auto.register.schemas": False, "use.latest.version": True})
    sample = SAMPLES[record]
    ours_bytes, their_bytes = ours(sample), theirs(sample, ctx)
    assert ours_bytes == their_bytes
    assert Decoder(reg)(their_bytes) == sample
    assert epoch_ints(AvroDeserializer(reg.client)(ours_bytes, ctx), time_units(record)) == sample


@pytest.mark.broker
def test_decimal_strings_from_the_real_capture_come_back_identical(registry, namespace,
                                                                   shared_data):
    serde = Serde(SchemaRegistry(registry.url))
    decode = serde.decoder()
    normalizer = V2Normalizer("capture")
    strings = 0
    for frame in received_frames(shared_data / CAPTURE):
        raw = json.loads(frame.text)
        for out in normalizer.normalize(raw, frame.received_us):
            back = decode(serde.encoder(namespace.topic(out.topic))(out.value))
            assert back == out.value
            if out.topic == "md.l2" and raw["type"] == "l2_updates":
                sent = [(c[1], c[2]) for c in raw["changes"]]
                assert [(c["price"], c["quantity"]) for c in back["changes"]] == sent
                strings += 2 * len(sent)
    assert strings > 9000  # about 4,600 changes, each a price and a quantity


def trade_v2() -> dict:
    schema = schemas.load("Trade")
    schema["fields"].append({"name": "venue", "type": ["null", "string"], "default": None,
                             "doc": "Where the trade printed (added in version 2)."})
    return schema


@pytest.mark.broker
def test_an_optional_field_evolves_and_old_and_new_readers_read_mixed_data(kafka, registry,
                                                                             namespace):
    from pipeline.avro.schemas import register_namespace

    reg = SchemaRegistry(registry.url)
    register_namespace(reg, namespace)
    topic = namespace.topic("md.trades")
    ensure_topics(kafka, namespace, ["md.trades"])
    v1, v2 = Encoder(reg, topic), Encoder(reg, topic, trade_v2())
    assert v1.schema_id != v2.schema_id
    assert reg.versions(f"{topic}-value") == [1, 2]
    old_record = SAMPLES["Trade"]
    new_record = {**SAMPLES["Trade"], "trade_id": 2, "venue": "gemini"}
    producer = ReliableProducer(kafka)
    for encoded in (v1(old_record), v2(new_record), v1({**old_record, "trade_id": 3})):
        producer.produce(topic, encoded, key=b"ETHUSD")
    producer.flush()
    mixed = [r.value for r in read_all(kafka, topic, expect=3)]
    old_reader = Decoder(reg, [schemas.load("Trade")])
    new_reader = Decoder(reg, [trade_v2()])
    assert [old_reader(m) for m in mixed] == [
        old_record, SAMPLES["Trade"] | {"trade_id": 2}, old_record | {"trade_id": 3}]
    assert [new_reader(m) for m in mixed] == [
        old_record | {"venue": None}, new_record, old_record | {"trade_id": 3, "venue": None}]


def run_check(registry_url: str, namespace, directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PIPELINE, "schemas", "check", "-n", str(namespace), "--dir",
                           str(directory)], capture_output=True, text=True, timeout=120,
                          env={"PATH": str(Path(sys.executable).parent),
                               "SCHEMA_REGISTRY_URL": registry_url}, cwd=REPO_ROOT)


def schema_dir_with(tmp_path: Path, record: str, schema: dict) -> Path:
    directory = tmp_path / "schemas"
    directory.mkdir(parents=True)
    for name in schemas.names():
        (directory / f"{name}.avsc").write_text(json.dumps(schema if name == record
                                                           else schemas.load(name)))
    return directory


@pytest.mark.broker
def test_an_incompatible_change_is_refused_by_the_registry_and_by_check(registry, namespace,
                                                                         tmp_path):
    from pipeline.avro.schemas import register_namespace

    reg = SchemaRegistry(registry.url)
    register_namespace(reg, namespace)
    topic = namespace.topic("md.trades")
    bad = schemas.load("Trade")
    bad["fields"].append({"name": "venue", "type": "string", "doc": "required: no default"})
    with pytest.raises(IncompatibleSchema, match="venue"):
        Encoder(reg, topic, bad)
    assert reg.versions(f"{topic}-value") == [1]
    result = run_check(registry.url, namespace, schema_dir_with(tmp_path, "Trade", bad))
    assert result.returncode == 1
    # Trade is the value of md.trades and bars.late: both subjects would break.
    assert f"{topic}-value (Trade): incompatible" in result.stdout
    assert f"{namespace.topic('bars.late')}-value (Trade): incompatible" in result.stdout
    assert "field 'venue' is new and has no default" in result.stdout
    assert "2 schema(s) incompatible" in result.stderr
    good = run_check(registry.url, namespace, schema_dir_with(tmp_path / "ok", "Trade", trade_v2()))
    assert good.returncode == 0 and f"{topic}-value (Trade): compatible" in good.stdout


@pytest.mark.broker
def test_removing_a_required_field_warns_under_backward_and_is_refused_under_full(registry,
                                                                                 namespace,
                                                                                 tmp_path):
    from pipeline.avro.schemas import register_namespace

    reg = SchemaRegistry(registry.url)
    register_namespace(reg, namespace)
    topic = namespace.topic("md.trades")
    removed = schemas.load("Trade")
    removed["fields"] = [f for f in removed["fields"] if f["name"] != "quantity"]
    directory = schema_dir_with(tmp_path, "Trade", removed)
    # BACKWARD (new readers read old data) allows a removal; old readers would break: warn.
    result = run_check(registry.url, namespace, directory)
    assert result.returncode == 0
    assert "field 'quantity' is removed but has no default" in result.stdout
    # Under FULL the registry refuses it, and check says which field.
    reg.set_compatibility("FULL", f"{topic}-value")
    with pytest.raises(IncompatibleSchema):
        Encoder(reg, topic, removed)
    result = run_check(registry.url, namespace, directory)
    assert result.returncode == 1 and "field 'quantity' is removed" in result.stdout


@pytest.mark.broker
def test_after_a_registry_restart_old_records_still_decode(registry, namespace):
    reg = SchemaRegistry(registry.url)
    topic = namespace.topic("bars")
    encoded = Encoder(reg, topic)(SAMPLES["Bar"])
    schema_id = int.from_bytes(encoded[1:5], "big")
    registry.restart()
    fresh = SchemaRegistry(registry.url)  # no cache: the id must resolve from storage
    assert Decoder(fresh)(encoded) == SAMPLES["Bar"]
    assert Encoder(fresh, topic).schema_id == schema_id, "ids are stable across restarts"


@pytest.mark.broker
def test_unknown_ids_and_truncated_records_are_clear_errors(registry, namespace):
    reg = SchemaRegistry(registry.url)
    good = Encoder(reg, namespace.topic("md.trades"))(SAMPLES["Trade"])
    decode = Decoder(reg)
    with pytest.raises(RegistryError, match="schema id 987654 is not in the registry"):
        decode(HEADER.pack(0, 987654) + good[5:])
    with pytest.raises(SerdeError, match="corrupt or truncated"):
        decode(good[:-9])
    with pytest.raises(SerdeError, match="trailing byte"):
        decode(good + b"\x00\x01")


class Keep(Handler):
    def __init__(self, sink: list[Record]) -> None:
        self.sink = sink

    def handle(self, record: Record):
        self.sink.append(record)
        return ()


@pytest.mark.broker
def test_bad_records_go_to_the_dead_letter_topic_and_the_group_goes_on(kafka, registry, topics):
    t = topics("md.trades", "dlq")
    reg = SchemaRegistry(registry.url)
    good = Encoder(reg, t["md.trades"])(SAMPLES["Trade"])
    bad = [b'{"not": "avro"}', HEADER.pack(0, 987655) + good[5:], good[:-9]]
    producer = ReliableProducer(kafka)
    for value in [good, bad[0], good, bad[1], bad[2], good]:
        producer.produce(t["md.trades"], value, key=b"ETHUSD")
    producer.flush()
    kept: list[Record] = []
    config = GroupConfig(group_id="serde-dlq", topics=[t["md.trades"]],
                         dead_letter_topic=t["dlq"], handler=lambda: Keep(kept),
                         decoder=Decoder(reg))
    stats = GroupRunner(config, kafka).run(max_records=6, idle_timeout_s=20)
    assert stats.records == 6 and stats.dead_letters == 3
    assert [r.offset for r in kept] == [0, 2, 5]
    assert all(r.value == SAMPLES["Trade"] for r in kept)
    letters = sorted((parse_dead_letter(d.key, d.value, list(d.headers))
                      for d in read_all(kafka, t["dlq"], expect=3)), key=lambda d: d.source_offset)
    assert [(d.source_offset, d.stage, d.value) for d in letters] == [
        (1, STAGE_DECODE, bad[0]), (3, STAGE_DECODE, bad[1]), (4, STAGE_DECODE, bad[2])]
    assert "magic byte" in letters[0].error_message
    assert "987655 is not in the registry" in letters[1].error_message
    assert "truncated" in letters[2].error_message


@pytest.mark.broker
def test_with_the_registry_down_records_are_dead_lettered_and_the_group_goes_on(kafka, registry,
                                                                              topics):
    t = topics("md.trades", "dlq")
    good = Encoder(SchemaRegistry(registry.url), t["md.trades"])(SAMPLES["Trade"])
    producer = ReliableProducer(kafka)
    for _ in range(3):
        producer.produce(t["md.trades"], good, key=b"ETHUSD")
    producer.flush()
    config = GroupConfig(group_id="serde-down", topics=[t["md.trades"]],
                         dead_letter_topic=t["dlq"], handler=lambda: Keep([]),
                         decoder=Decoder(dead_registry()))
    stats = GroupRunner(config, kafka).run(max_records=3, idle_timeout_s=20)
    assert stats.records == 3 and stats.dead_letters == 3
    letters = [parse_dead_letter(d.key, d.value, list(d.headers))
               for d in read_all(kafka, t["dlq"], expect=3)]
    assert all("does not answer" in d.error_message and d.value == good for d in letters)


