"""The topic catalog: names, namespaces and what each topic is declared as.

The tests that need Kafka: tests/integration/test_catalog.py."""

from __future__ import annotations

import pytest

from pipeline.core.errors import PipelineError
from pipeline.kafka.catalog import (
    TOPICS,
    Namespace,
    spec,
    split_topic,
)


@pytest.mark.parametrize("name,kind", [("live", "live"), ("sim", "sim"), ("sim-t1", "sim"),
                                       ("replay-jun24", "replay"), ("live-eu", "live")])
def test_namespaces_carry_their_kind(name, kind):
    ns = Namespace(name)
    assert ns.kind == kind
    assert ns.is_live == (kind == "live")
    assert ns.topic("md.l2") == f"{name}.md.l2"


@pytest.mark.parametrize("bad", ["", "prod", "replay", "sim.x", "SIM", "sim-", "live x", "sim-Ä"])
def test_bad_namespaces_are_refused(bad):
    with pytest.raises(PipelineError):
        Namespace(bad)


def test_live_simulated_and_replay_topics_never_share_a_name():
    names = {Namespace(ns).topic(t.name) for ns in ("live", "sim", "replay-a") for t in TOPICS}
    assert len(names) == 3 * len(TOPICS)


def test_every_topic_is_declared_once_with_its_meaning():
    assert len({t.name for t in TOPICS}) == len(TOPICS)
    for topic in TOPICS:
        assert topic.partitions >= 1 and topic.key and topic.description
        assert topic.cleanup_policy in ("delete", "compact")
    assert spec("book.snapshots").configs()["cleanup.policy"] == "compact"
    assert "retention.ms" not in spec("book.snapshots").configs()


def test_split_topic_recognises_only_catalog_topics():
    ns, topic = split_topic("sim-x.book.snapshots")
    assert ns == Namespace("sim-x") and topic.name == "book.snapshots"
    assert split_topic("sim-x.nope") is None
    assert split_topic("__consumer_offsets") is None
    assert split_topic("replay.md.l2") is None


