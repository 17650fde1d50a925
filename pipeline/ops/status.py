"""What is running and how it is doing: one collection for `pipeline status` and metrics.

Per process (from the supervisor's state): up, restarts, last error. Per consumer group of
the namespace: members, lag per partition, records/s. Per topic: end offsets, records/s.
The producer's last-message age, the execution mode and the kill switch. And what each
process reports through the metrics interface (``pipeline/runtime/metrics.py``): the
``status/metrics-<process>.json`` files its runner or producer writes, exposed as
``pipeline_<name>{process=...}`` (dead letters, rejections, snapshots, reconnects...).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from confluent_kafka import ConsumerGroupTopicPartitions

from pipeline.kafka.catalog import Namespace, describe_topics
from pipeline.kafka.clients import make_admin
from pipeline.kafka.cluster_health import INTERNAL_TOPICS, describe_cluster
from pipeline.ops import kill_switch
from pipeline.runtime.metrics import exposition, read_metrics

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    taken_at: float
    processes: list[dict]
    topics: dict[str, tuple[int, ...]]  # topic -> end offsets
    # group -> {"members": n, "lag": {tp: lag}, "offsets": {tp: committed}, "committed": total}
    groups: dict[str, dict]
    producer: dict | None
    execution: dict
    phase: str = "unknown"
    rates: dict[str, float] = field(default_factory=dict)  # topic or group -> records/s
    # topic or group -> {"<topic>[<partition>]": records/s}: a topic's appends, a group's commits
    partition_rates: dict[str, dict[str, float]] = field(default_factory=dict)
    portfolio: Any = None  # pipeline.ops.portfolio_view.PortfolioView, when it could be read
    cluster: Any = None  # pipeline.kafka.cluster_health.ClusterHealth of the namespace's topics
    # process -> its metrics snapshot (pipeline.runtime.metrics.MetricsRegistry.snapshot)
    process_metrics: dict[str, dict] = field(default_factory=dict)


def partition_label(topic: str, partition: int) -> str:
    return f"{topic}[{partition}]"


def split_label(label: str) -> tuple[str, str]:
    """"ns.trades[3]" -> ("ns.trades", "3")."""
    topic, partition = label[:-1].rsplit("[", 1)
    return topic, partition


def _per_partition(now: dict[str, int], before: dict[str, int], dt: float) -> dict[str, float]:
    """Records/s of each partition seen in both snapshots (offsets only grow; a reset
    counts as 0)."""
    return {label: max(offset - before[label], 0) / dt
            for label, offset in now.items() if label in before}


def _end_offsets(topic: str, ends: tuple[int, ...]) -> dict[str, int]:
    return {partition_label(topic, p): end for p, end in enumerate(ends)}


def collect(run_dir: Path, state: dict, previous: Snapshot | None = None) -> Snapshot:
    bootstrap, namespace = state["bootstrap"], Namespace(state["namespace"])
    topics = {t.name: t.end_offsets for t in describe_topics(bootstrap, namespace, timeout=5)}
    groups = group_lags(bootstrap, namespace, topics)
    now = time.time()
    partition_rates: dict[str, dict[str, float]] = {}
    if previous is not None and now > previous.taken_at:
        dt = now - previous.taken_at
        for name, ends in topics.items():
            if name in previous.topics:
                partition_rates[name] = _per_partition(
                    _end_offsets(name, ends), _end_offsets(name, previous.topics[name]), dt)
        for name, group in groups.items():
            if name in previous.groups:
                partition_rates[name] = _per_partition(
                    group["offsets"], previous.groups[name].get("offsets", {}), dt)
    rates = {name: sum(per.values()) for name, per in partition_rates.items()}
    producer = None
    producer_file = run_dir / "status" / "producer-gemini.json"
    if producer_file.exists():
        producer = json.loads(producer_file.read_text())
        producer["age_s"] = now - producer_file.stat().st_mtime + (
            producer.get("last_message_age_s") or 0)
    execution = {"mode": _execution_mode(state), "kill_switch": kill_switch.is_on(run_dir)}
    return Snapshot(now, state.get("processes", []), topics, groups, producer, execution,
                    state.get("phase", "unknown"), rates, partition_rates,
                    _portfolio(bootstrap, state.get("registry"), namespace, topics),
                    describe_cluster(bootstrap, [*topics, *INTERNAL_TOPICS], timeout=5),
                    process_metrics(run_dir, state.get("processes", [])))


def process_metrics(run_dir: Path, processes: list[dict]) -> dict[str, dict]:
    """The processes' metrics files in ``run_dir``: those of ``processes`` when the state
    names any (a file left by another topology's process is not ours), else all."""
    found = read_metrics(run_dir / "status")
    names = {p["name"] for p in processes}
    return {name: data for name, data in found.items() if not names or name in names}


def group_lags(bootstrap: str, namespace: Namespace, topics: dict[str, tuple[int, ...]]
               ) -> dict[str, dict]:
    """The namespace's consumer groups: members, lag and committed offset per partition
    (``topics``: end offsets per topic, as :func:`describe_topics` gives them)."""
    admin = make_admin(bootstrap)
    groups = {}
    listed = admin.list_consumer_groups(request_timeout=5).result()
    ids = sorted(g.group_id for g in listed.valid if g.group_id.startswith(f"{namespace}."))
    described = admin.describe_consumer_groups(ids, request_timeout=5) if ids else {}
    for group_id in ids:
        members = len(described[group_id].result().members)
        offsets = admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group_id)], request_timeout=5)[group_id].result()
        lag, committed = {}, {}
        for tp in offsets.topic_partitions:
            if tp.offset < 0 or tp.topic not in topics:
                continue
            label = partition_label(tp.topic, tp.partition)
            lag[label] = max(topics[tp.topic][tp.partition] - tp.offset, 0)
            committed[label] = tp.offset
        groups[group_id] = {"members": members, "lag": lag, "offsets": committed,
                            "committed": sum(committed.values())}
    return groups


def _portfolio(bootstrap: str, registry: str | None, namespace: Namespace,
               topics: dict[str, tuple[int, ...]]) -> Any:
    """The portfolio topics' newest records, when the namespace has them (else None)."""
    if not registry or namespace.topic("portfolio.pnl") not in topics:
        return None
    from pipeline.ops.portfolio_view import read_view

    try:
        return read_view(bootstrap, registry, namespace, tail=500)
    except Exception as exc:  # noqa: BLE001 - status shows what it can
        log.warning("portfolio not readable: %s", exc)
        return None


def _execution_mode(state: dict) -> str:
    for proc in state.get("processes", []):
        if proc["name"].startswith("execution"):
            cmd = proc.get("cmd", [])
            return cmd[cmd.index("--mode") + 1] if "--mode" in cmd else "paper"
    return state.get("execution_mode") or "not running"  # one running elsewhere (compose)


Sample = tuple[dict[str, object], object]  # labels, value


def _family(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> list[str]:
    """One metric family: its HELP and TYPE lines, then a line per sample."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(f"{name}{{{text}}} {value}" if text else f"{name} {value}")
    return lines


def prometheus(snapshot: Snapshot, namespace: str) -> str:
    """The snapshot in Prometheus' text exposition format."""
    processes, topics, groups = snapshot.processes, snapshot.topics, snapshot.groups
    rates = snapshot.partition_rates

    def per_partition(group: str):
        for tp, value in groups[group]["lag"].items():
            topic, partition = split_label(tp)
            yield {"group": group, "topic": topic, "partition": partition}, value

    lines = _family("pipeline_process_up", "gauge", "1 if the supervised process is running.",
                    (({"process": p["name"]}, int(p["up"])) for p in processes))
    lines += _family("pipeline_process_restarts_total", "counter", "Restarts by the supervisor.",
                     (({"process": p["name"]}, p["restarts"]) for p in processes))
    lines += _family("pipeline_topic_end_offset", "gauge", "End offset of a topic partition.",
                     (({"topic": t, "partition": i}, end)
                      for t, ends in topics.items() for i, end in enumerate(ends)))
    lines += _family("pipeline_topic_records_per_second", "gauge",
                     "Records appended per second to a topic partition, between the last two "
                     "collections.",
                     (({"topic": t, "partition": split_label(label)[1]}, f"{rate:.3f}")
                      for t in topics for label, rate in rates.get(t, {}).items()))
    lines += _family("pipeline_group_lag", "gauge", "Records a consumer group has yet to commit.",
                     (sample for g in groups for sample in per_partition(g)))
    lines += _family("pipeline_group_members", "gauge", "Members of a consumer group.",
                     (({"group": g}, data["members"]) for g, data in groups.items()))
    lines += _family("pipeline_group_records_per_second", "gauge",
                     "Records a consumer group committed per second on a partition, between "
                     "the last two collections.",
                     (({"group": g, "topic": split_label(tp)[0],
                        "partition": split_label(tp)[1]}, f"{rate:.3f}")
                      for g in groups for tp, rate in rates.get(g, {}).items()))
    if snapshot.producer is not None:
        producer = snapshot.producer
        lines += _family("pipeline_producer_last_message_age_seconds", "gauge",
                         "Seconds since the producer's last message.",
                         [({}, f'{producer["age_s"]:.3f}')])
        lines += _family("pipeline_producer_frames_total", "counter",
                         "WebSocket frames the producer received.",
                         [({}, producer.get("frames", 0))])
        lines += _family("pipeline_producer_reconnects_total", "counter",
                         "Reconnections of the producer.", [({}, producer.get("reconnects", 0))])
    lines += _family("pipeline_execution_kill_switch", "gauge",
                     "1 while the kill switch file exists.",
                     [({}, int(snapshot.execution["kill_switch"]))])
    lines += _portfolio_metrics(snapshot.portfolio)
    lines += exposition(snapshot.process_metrics)
    lines += _family("pipeline_info", "gauge", "The namespace and the execution mode.",
                     [({"namespace": namespace, "mode": snapshot.execution["mode"]}, 1)])
    return "\n".join(lines) + "\n"


def _portfolio_metrics(view: Any) -> list[str]:
    """Per strategy: equity, PnL, fees, drawdown, halted, positions, fills and rejections
    by reason (a figure that needs a stale mark has no sample)."""
    if view is None:
        return []
    pnl = view.pnl

    def gauge(field_name: str):
        for strategy, record in sorted(pnl.items()):
            if record[field_name] is not None:
                yield {"strategy": strategy, "currency": record["currency"]}, record[field_name]

    lines = _family("pipeline_strategy_equity", "gauge",
                    "Strategy equity: capital + realized + unrealized, in its currency.",
                    gauge("equity"))
    lines += _family("pipeline_strategy_realized_pnl", "gauge",
                     "Realized PnL after fees.", gauge("realized_pnl"))
    lines += _family("pipeline_strategy_unrealized_pnl", "gauge",
                     "Open positions at the marks less their cost.", gauge("unrealized_pnl"))
    lines += _family("pipeline_strategy_fees", "gauge", "Fees paid.", gauge("fees"))
    lines += _family("pipeline_strategy_drawdown", "gauge",
                     "Peak equity minus equity.", gauge("drawdown"))
    lines += _family("pipeline_strategy_halted", "gauge",
                     "1 while the strategy is halted (risk stop or operator).",
                     (({"strategy": s}, int(s in view.halts or r["halted"]))
                      for s, r in sorted(pnl.items())))
    lines += _family("pipeline_strategy_position", "gauge", "Position size per symbol.",
                     (({"strategy": p["strategy_id"], "symbol": p["symbol"]}, p["quantity"])
                      for p in view.positions))
    lines += _family("pipeline_strategy_fills_total", "counter", "Fills counted.",
                     (({"strategy": s}, r["fills"]) for s, r in sorted(pnl.items())))
    lines += _family("pipeline_strategy_rejections_total", "counter",
                     "Rejected orders by reason.",
                     (({"strategy": s, "reason": reason}, n) for s, r in sorted(pnl.items())
                      for reason, n in sorted(r["rejections"].items())))
    if view.reconciliation is not None:
        lines += _family("pipeline_reconciliation_differences", "gauge",
                         "Differences the last reconciliation with Gemini found.",
                         [({}, view.reconciliation["differences"])])
    return lines


def status_json(snapshot: Snapshot) -> dict[str, Any]:
    """The snapshot as JSON-safe values for the web dashboard: processes (without their
    command lines, which name key files), groups with their lag and rates, topic rates,
    the producer and execution. Values a browser only displays."""
    processes = [{k: p.get(k) for k in ("name", "up", "pid", "restarts", "last_exit",
                                        "last_error", "gave_up", "finished", "started_at")}
                 for p in snapshot.processes]
    groups = {name: {"members": g["members"], "lag": sum(g["lag"].values()),
                     "lag_by_partition": g["lag"],
                     "records_per_s": round(snapshot.rates.get(name, 0.0), 3)}
              for name, g in sorted(snapshot.groups.items())}
    topics = {name: {"end_offset": sum(ends), "partitions": len(ends),
                     "records_per_s": round(snapshot.rates.get(name, 0.0), 3)}
              for name, ends in sorted(snapshot.topics.items())}
    producer = None
    if snapshot.producer is not None:
        producer = {k: snapshot.producer.get(k) for k in ("frames", "reconnects", "age_s",
                                                          "state", "url")}
    return {"taken_at": snapshot.taken_at, "phase": snapshot.phase, "processes": processes,
            "groups": groups, "topics": topics, "producer": producer,
            "execution": dict(snapshot.execution)}
