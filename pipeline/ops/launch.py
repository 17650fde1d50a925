"""Starts one consumer group of the topology: the one launcher of every group.

The supervisor runs each instance of a ``[[process]]`` as

    python -m pipeline.ops.launch RUN --process NAME --topology PATH [--overlay PATH]
        --namespace NS --bootstrap HOST:PORT --registry URL --run-dir DIR [--instance I]

(``RUN`` is the process's ``run``, so that the command line alone says which Kafka
principal the child is: pipeline/ops/broker_secure.py ``role_for``). The child reads the
topology itself and builds the group's ``Config`` from its ``args`` (checked when the
topology was loaded), and its :class:`~pipeline.runtime.contract.GroupContext` from what
the supervisor decided: where Kafka and the registry are, the namespace, the instance,
the run directory, the topology's symbols and the run's strategy-key file.
``pipeline run NAME`` runs a process the same way, in the foreground.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from pipeline.core.cluster import Cluster
from pipeline.core.errors import PipelineError
from pipeline.kafka.catalog import Namespace
from pipeline.ops import topology as topology_module
from pipeline.ops.topology import Process, Topology
from pipeline.runtime.contract import (
    GroupContext,
    GroupModule,
    config_from_args,
    load_group,
    run_group,
)
from pipeline.runtime.runner import log_to_stderr

log = logging.getLogger(__name__)
MODULE = "pipeline.ops.launch"


def strategy_keys_file(run_dir: Path) -> Path:
    """The run's strategy signing keys (the supervisor creates it, 0600)."""
    return Path(run_dir) / "secrets" / "strategy-keys.json"


def instance_name(proc: Process, index: int) -> str:
    """Instance ``index``'s name within its group: its index when several run and the
    group takes one (``MULTI_INSTANCE``), else "0"."""
    several = proc.instances > 1 and load_group(proc.run).multi_instance
    return str(index) if several else "0"


def process_context(topology: Topology, proc: Process, index: int, cluster: Cluster,
                    run_dir: Path) -> GroupContext:
    keys = strategy_keys_file(run_dir)
    return GroupContext(cluster=cluster, namespace=topology.namespace, name=proc.name,
                        instance=instance_name(proc, index), run_dir=Path(run_dir),
                        symbols=topology.symbols, strategy_keys=keys if keys.exists() else None)


def command(topology: Topology, proc: Process, index: int, cluster: Cluster, run_dir: Path,
            python: str = sys.executable) -> list[str]:
    """The command line of instance ``index`` of ``proc``."""
    cmd = [python, "-m", MODULE, proc.run, "--process", proc.name,
           "--topology", str(topology.path)]
    cmd += ["--overlay", str(topology.overlay)] if topology.overlay is not None else []
    cmd += ["--namespace", str(topology.namespace), "--bootstrap", cluster.bootstrap,
            "--registry", cluster.registry_url, "--run-dir", str(run_dir)]
    if proc.instances > 1 and load_group(proc.run).multi_instance:
        cmd += ["--instance", str(index)]
    return cmd


def resolve(topology: Topology, name: str, cluster: Cluster, run_dir: Path, index: int = 0,
            expected_run: str | None = None) -> tuple[GroupModule, GroupContext, Any]:
    """Instance ``index`` of process ``name``: its group, context and config (for a
    legacy user group, its args)."""
    proc = topology.process(name)
    if expected_run is not None and proc.run != expected_run:
        raise PipelineError(f"process {name} runs {proc.run} in {topology.path}, not "
                            f"{expected_run}: the topology changed since it was started")
    group = load_group(proc.run)
    config: Any = proc.args if group.legacy else proc.config
    if config is None:  # a Process made in code, not loaded
        config = config_from_args(group.config, proc.args)  # type: ignore[arg-type]
    return group, process_context(topology, proc, index, cluster, run_dir), config


def run_process(topology: Topology, name: str, cluster: Cluster, run_dir: Path,
                index: int = 0) -> int:
    """Run instance ``index`` of process ``name`` in this process until stopped."""
    return run_group(*resolve(topology, name, cluster, run_dir, index))


def run_target(target: str, args: dict, cluster: Cluster, namespace: Namespace, name: str | None,
               run_dir: Path) -> int:
    """``pipeline run module:function``: a group outside any topology, ``args`` its settings."""
    group = load_group(target)
    config = args if group.legacy else config_from_args(group.config, args)  # type: ignore[arg-type]
    ctx = GroupContext(cluster=cluster, namespace=namespace,
                       name=name or target.rpartition(":")[2], run_dir=Path(run_dir))
    return run_group(group, ctx, config)


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.ops.settings import Settings
    from pipeline.runtime.runner import local_cluster

    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    ap.add_argument("run", help="the process's `run` (module or module:function)")
    ap.add_argument("--process", required=True, help="the process's name in the topology")
    ap.add_argument("--topology", required=True)
    ap.add_argument("--overlay")
    ap.add_argument("--namespace", help="[default: the topology's]")
    ap.add_argument("--bootstrap")
    ap.add_argument("--registry")
    ap.add_argument("--run-dir")
    ap.add_argument("--instance", type=int, default=0)
    args = ap.parse_args(argv)
    log_to_stderr()
    try:
        loaded = topology_module.load(args.topology, args.overlay)
        if args.namespace:
            loaded = dataclasses.replace(loaded, namespace=Namespace(args.namespace))
        settings = Settings.from_env(args.run_dir)
        cluster = local_cluster(args.run_dir, args.bootstrap, args.registry)
        resolved = resolve(loaded, args.process, cluster, settings.run_dir, args.instance,
                           expected_run=args.run)
    except PipelineError as exc:
        log.error("%s", exc)
        return 2
    return run_group(*resolved)


if __name__ == "__main__":
    sys.exit(main())
