"""Pipeline processes for the latency and memory benchmarks, started as deployed.

Each group runs as its own ``python -m consumers.X`` (the producer as ``pipeline produce``),
with its output in a log file. We wait on what the runtime logs ("assigned"), read lag
from the committed offsets, read peak RSS from /proc/<pid>/status, and stop with SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import ConsumerGroupTopicPartitions

from pipeline.kafka.catalog import Namespace, describe_topics
from pipeline.kafka.clients import make_admin
from pipeline.ops.settings import REPO_ROOT
from pipeline.trading.signing import env_name


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid


def start(name: str, argv: list[str], work: Path, bootstrap: str, registry_url: str,
          keys: dict[str, str] | None = None, extra_env: dict[str, str] | None = None) -> Proc:
    """``python <argv>`` in the repo, logging to ``work/<name>.log``; ``keys`` are strategy
    signing keys, passed as the environment variables the strategy group reads;
    ``extra_env`` more variables (a Gemini key)."""
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "SCHEMA_REGISTRY_URL": registry_url,
           "PIPELINE_RUN_DIR": str(work),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    env.update({env_name(sid): secret for sid, secret in (keys or {}).items()})
    env.update(extra_env or {})
    log = work / f"{name}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen([sys.executable, *argv], cwd=REPO_ROOT, env=env,
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    return Proc(name, popen, log)


def group(module: str, name: str, work: Path, bootstrap: str, registry_url: str,
          namespace: Namespace, *flags: str, keys: dict[str, str] | None = None,
          env: dict[str, str] | None = None) -> Proc:
    """A consumer group's own entry point, as the supervisor launches it."""
    return start(name, ["-m", module, "--bootstrap", bootstrap, "--registry", registry_url,
                        "--namespace", str(namespace), *flags], work, bootstrap, registry_url,
                 keys, env)


def wait_for_log(procs: list[Proc], text: str, timeout_s: float = 90.0) -> None:
    """Until every process's log contains ``text`` (e.g. the runtime's "assigned")."""
    deadline = time.monotonic() + timeout_s
    waiting = list(procs)
    while waiting:
        for proc in list(waiting):
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}: "
                                   f"{tail(proc)}")
            if text in proc.log.read_text(errors="replace"):
                waiting.remove(proc)
        if waiting and time.monotonic() > deadline:
            raise RuntimeError(f"{waiting[0].name} did not log {text!r} within "
                               f"{timeout_s:.0f}s: {tail(waiting[0])}")
        time.sleep(0.1)


def rss_kb(pid: int | str, field: str = "VmRSS") -> int:
    """A process's (or "self"'s) resident set (VmRSS) or its peak so far (VmHWM), in kB.

    VmHWM is the peak of the program itself: ``ru_maxrss`` from ``wait4`` is not, since
    Linux counts in it the parent's RSS at the fork (or vfork) before the exec."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def stop(proc: Proc, timeout_s: float = 60.0) -> None:
    """SIGTERM, then :func:`wait`."""
    if proc.popen.returncode is None:
        proc.popen.send_signal(signal.SIGTERM)
    wait(proc, timeout_s)


def wait(proc: Proc, timeout_s: float = 60.0) -> None:
    """Wait for the process to exit; SIGKILL after ``timeout_s``."""
    try:
        proc.popen.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.popen.kill()
        proc.popen.wait()


def stop_all(procs: list[Proc]) -> None:
    """Best effort, in reverse order of start; each is waited for."""
    for proc in reversed(procs):
        if proc.popen.returncode is None:
            stop(proc)


def lag(bootstrap: str, group_id: str, namespace: Namespace, topics: list[str]) -> int:
    """Records of ``topics`` the group has not committed yet (all of them before its
    first commit)."""
    ends = {t.name: t.end_offsets for t in describe_topics(bootstrap, namespace, timeout=10)}
    admin = make_admin(bootstrap)
    result = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group_id)],
                                               request_timeout=10)[group_id].result()
    committed = {(tp.topic, tp.partition): tp.offset for tp in result.topic_partitions}
    behind = 0
    for name in topics:
        topic = namespace.topic(name)
        for partition, end in enumerate(ends[topic]):
            behind += max(end - max(committed.get((topic, partition), 0), 0), 0)
    return behind


def tail(proc: Proc, lines: int = 3) -> str:
    try:
        return " | ".join(proc.log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "no log"


def endpoints_parser(prog: str) -> argparse.ArgumentParser:
    """The command line of a bench child process: where Kafka, the registry and its
    namespace are (the parent passes all three)."""
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    ap.add_argument("--registry", required=True, help="schema registry URL")
    ap.add_argument("--namespace", required=True, help="topic namespace (sim, live, ...)")
    return ap

