"""The topology file: which data source, which processes, and how many of each.

One TOML file (``topology.toml`` in the repo, or ``--topology PATH`` /
``PIPELINE_TOPOLOGY``) says everything ``pipeline up`` runs. An overlay file with the
same shape (``--overlay``) overrides keys per environment. Loading validates it all and
names the file, line and key of anything wrong.

Adding a consumer group is one ``[[process]]`` entry: ``run`` names a group module
(``Config``, ``MULTI_INSTANCE``, ``make_group(ctx, config)``: pipeline/runtime/contract.py),
or ``module:function``; its ``args`` are checked against the module's ``Config`` here.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError, PipelineError
from pipeline.kafka.catalog import Namespace
from pipeline.ops.settings import REPO_ROOT

DEFAULT_TOPOLOGY = REPO_ROOT / "topology.toml"
SOURCE_KINDS = ("gemini", "venue", "replay")
_TOP_KEYS = {"namespace", "symbols", "source", "infra", "process", "topic"}
_SOURCE_KEYS = {"kind", "url", "protocol", "capture", "speed", "loop", "rate", "seed", "port",
                "heartbeat_s", "api_keys_file", "from", "start", "end", "topics"}
REPLAY_TOPICS = ("md.l2", "md.trades")
_INFRA_KEYS = {"listen", "kafka_port", "controller_port", "registry_port", "metrics_port",
               "web_port"}
_PROCESS_KEYS = {"name", "run", "instances", "args", "after", "restart_limit"}
# The shipped groups; every other module is a user group (its own principal's ACLs).
SHIPPED_GROUPS = ("consumers.orderbook", "consumers.bars", "consumers.strategy",
                  "consumers.execution", "consumers.portfolio", "consumers.archive")
_TOPIC_KEYS = {"name", "partitions", "key", "description", "cleanup_policy", "retention_ms"}


@dataclass(frozen=True)
class Source:
    kind: str = "gemini"  # "gemini": Gemini's own feed; "venue": the local venue; "replay"
    url: str = "wss://api.gemini.com"
    protocol: str = "v2"
    capture: Path | None = None  # venue: replay this capture (else generate)
    speed: float | None = 1.0
    loop: bool = True
    rate: float = 200.0
    seed: int = 1
    port: int = 8090
    heartbeat_s: float = 5.0
    api_keys_file: Path | None = None
    # replay: re-publish a range of another namespace's topics (pipeline/replay/topology_replay.py);
    # speed None is as fast as possible
    replay_from: str | None = None
    start: str | None = None  # ISO time or epoch ms, inclusive
    end: str | None = None  # exclusive
    topics: tuple[str, ...] = REPLAY_TOPICS


@dataclass(frozen=True)
class Infra:
    listen: str = "127.0.0.1"
    kafka_port: int = 9092
    controller_port: int = 9093
    registry_port: int = 8081
    metrics_port: int = 9464
    web_port: int = 8050  # the dashboard (`pipeline web`); 0: none


@dataclass(frozen=True)
class Process:
    name: str
    run: str  # "consumers.orderbook" (a group module) or "module:function"
    instances: int = 1
    args: dict[str, Any] = field(default_factory=dict)
    restart_limit: int = 5
    # the args as the group's Config (checked at load); None for a legacy user group
    config: Any = field(default=None, compare=False)

    @property
    def module(self) -> str:
        return self.run.partition(":")[0]

    @property
    def is_user_group(self) -> bool:
        return self.module not in SHIPPED_GROUPS


@dataclass(frozen=True)
class Topology:
    path: Path
    namespace: Namespace
    symbols: tuple[str, ...]
    source: Source
    infra: Infra
    processes: tuple[Process, ...]
    topics: tuple[dict, ...] = ()
    overlay: Path | None = None  # the overlay merged in, if any (children load the same)

    def process(self, name: str) -> Process:
        for proc in self.processes:
            if proc.name == name:
                return proc
        raise PipelineError(f"no process {name!r} in {self.path}: have "
                            f"{', '.join(p.name for p in self.processes)}")


def load(path: str | Path | None = None, overlay: str | Path | None = None) -> Topology:
    """Read, merge and validate a topology; every problem names the file, line and key."""
    path = Path(path or DEFAULT_TOPOLOGY)
    data, text = _read(path)
    if overlay is not None:
        extra, _ = _read(Path(overlay))
        data = _merge(data, extra)
    where = _Locator(path, text)
    _only(data, _TOP_KEYS, where, "")
    try:
        namespace = Namespace(data.get("namespace", "live"))
    except PipelineError as exc:
        raise where.error("namespace", str(exc)) from None
    symbols = data.get("symbols", ["BTCUSD", "ETHUSD"])
    if not (isinstance(symbols, list) and symbols and all(
            isinstance(s, str) and s.isalnum() for s in symbols)):
        raise where.error("symbols", "must be a non-empty list of symbols like \"BTCUSD\"")
    source = _source(data.get("source", {}), where, path.parent)
    if source.kind == "gemini" and not namespace.is_live:
        raise where.error("namespace", f"{namespace} is not a live namespace, but the source is "
                          "Gemini itself: use live, or the local venue")
    if source.kind == "venue" and namespace.is_live:
        raise where.error("namespace", "the local venue's data must not go to a live namespace")
    if source.kind == "replay":
        problem = replay_problem(namespace, source)
        if problem:
            raise where.error(problem[0], problem[1])
    infra = _infra(data.get("infra", {}), where)
    processes = tuple(_process(i, raw, where) for i, raw in enumerate(data.get("process", [])))
    names = [p.name for p in processes]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise where.error("name", f"two processes are named {duplicate!r}", duplicate)
    topics = tuple(data.get("topic", []))
    for topic in topics:
        _only(topic, _TOPIC_KEYS, where, "topic")
    return Topology(path, namespace, tuple(s.upper() for s in symbols), source, infra,
                    processes, topics, Path(overlay) if overlay is not None else None)


def _read(path: Path) -> tuple[dict, str]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"topology {path} cannot be read: {exc.strerror}") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _Locator:
    """Finds the line of a key in the file, for error messages."""

    def __init__(self, path: Path, text: str) -> None:
        self.path, self.lines = path, text.splitlines()

    def line_of(self, key: str, near: str | None = None) -> int | None:
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
        hits = [i + 1 for i, line in enumerate(self.lines) if pattern.match(line)]
        if near is not None:
            hits = [n for n in hits if near in self.lines[n - 1]] or hits
        return hits[0] if hits else None

    def error(self, key: str, message: str, near: str | None = None,
              line: int | None = None) -> PipelineError:
        line = line or self.line_of(key.rsplit(".", 1)[-1], near)
        where = f"{self.path}:{line}" if line else str(self.path)
        return ConfigError(f"{where}: key {key!r}: {message}")

    def line_in_process(self, name: str, key: str) -> int | None:
        """The line of ``key`` (an ``args`` key, inline or not) in process ``name``'s entry."""
        start = next((i for i, line in enumerate(self.lines) if re.match(
            rf"""^\s*name\s*=\s*["']{re.escape(name)}["']""", line)), None)
        if start is None:
            return None
        begin = next((i for i in range(start, -1, -1)
                      if self.lines[i].strip().startswith("[[")), start)
        end = next((i for i in range(start + 1, len(self.lines))
                    if self.lines[i].strip().startswith("[[")), len(self.lines))
        pattern = re.compile(rf"""(^|[{{,\s])["']?{re.escape(key)}["']?\s*=""")
        for i in range(begin, end):
            if pattern.search(self.lines[i].split("#", 1)[0]):
                return i + 1
        return None

    def args_error(self, process: str, key: str, message: str) -> PipelineError:
        """A problem with ``args.<key>`` of a process, on the line of the key (else of the
        args, else of the process)."""
        line = self.line_in_process(process, key) or self.line_in_process(process, "args") or \
            self.line_in_process(process, "name")
        return self.error(f"process.args.{key}", f"process {process}: {message}", line=line)


def _only(table: dict, allowed: set[str], where: _Locator, prefix: str) -> None:
    for key in table:
        if key not in allowed:
            name = f"{prefix}.{key}" if prefix else key
            raise where.error(name, f"unknown key; allowed here: {', '.join(sorted(allowed))}")


def _typed(table: dict, key: str, kind: type | tuple, where: _Locator, prefix: str, default):
    if key not in table:
        return default
    value = table[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python, but `port = true` is a mistake
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise where.error(f"{prefix}.{key}", f"must be {names}, not {value!r}")
    return value


def _source(raw: dict, where: _Locator, base: Path) -> Source:
    _only(raw, _SOURCE_KEYS, where, "source")
    kind = raw.get("kind", "gemini")
    if kind not in SOURCE_KINDS:
        raise where.error("source.kind", f"must be one of {', '.join(SOURCE_KINDS)}, not {kind!r}")
    if kind == "replay":
        return _replay_source(raw, where)
    capture = raw.get("capture")
    capture_path = (base / capture).resolve() if capture else None
    if capture_path is not None and not capture_path.exists():
        raise where.error("source.capture", f"{capture_path} does not exist")
    keys = raw.get("api_keys_file")
    return Source(kind=kind, url=_typed(raw, "url", str, where, "source", Source.url),
                  protocol=_typed(raw, "protocol", str, where, "source", "v2"),
                  capture=capture_path,
                  speed=_typed(raw, "speed", (int, float), where, "source", 1.0),
                  loop=_typed(raw, "loop", bool, where, "source", True),
                  rate=_typed(raw, "rate", (int, float), where, "source", 200.0),
                  seed=_typed(raw, "seed", int, where, "source", 1),
                  port=_typed(raw, "port", int, where, "source", 8090),
                  heartbeat_s=_typed(raw, "heartbeat_s", (int, float), where, "source", 5.0),
                  api_keys_file=(base / keys).resolve() if keys else None)


def _replay_source(raw: dict, where: _Locator) -> Source:
    """``kind = "replay"``: ``from`` (namespace), ``start``/``end`` (ISO or epoch ms),
    ``speed`` (``"max"`` or a multiple of real time), ``topics`` (catalog names)."""
    from pipeline.replay.ranges import to_ms
    from pipeline.replay.topology_replay import catalog_names, parse_speed

    from_ns = _typed(raw, "from", str, where, "source", None)
    if from_ns is None:
        raise where.error("source.kind", "a replay source needs `from`, the namespace to replay")
    speed = raw.get("speed", "max")
    if isinstance(speed, bool) or not isinstance(speed, (int, float, str)):
        raise where.error("source.speed", f"must be \"max\" or a number, not {speed!r}")
    topics = _typed(raw, "topics", list, where, "source", list(REPLAY_TOPICS))
    if not topics or not all(isinstance(t, str) for t in topics):
        raise where.error("source.topics", "must be a list of catalog topics like \"md.l2\"")
    times = {k: _typed(raw, k, (str, int), where, "source", None) for k in ("start", "end")}
    checks = [("source.from", lambda: Namespace(from_ns)),
              ("source.speed", lambda: parse_speed(speed)),
              ("source.topics", lambda: catalog_names(topics))]
    checks += [(f"source.{k}", lambda k=k, v=v: to_ms(v, k)) for k, v in times.items()]
    for key, check in checks:
        try:
            check()
        except PipelineError as exc:
            raise where.error(key, str(exc)) from None
    try:
        return make_replay_source(from_ns, speed, times["start"], times["end"], topics)
    except PipelineError as exc:
        raise where.error("source.end", str(exc)) from None


def make_replay_source(from_ns: str, speed: str | float | None = None,
                       start: str | int | None = None, end: str | int | None = None,
                       topics=REPLAY_TOPICS) -> Source:
    """A replay source, checked without asking Kafka: the namespace is valid, the times
    parse and are in order, the speed is max or positive, the topics are in the catalog."""
    from pipeline.replay.ranges import to_ms
    from pipeline.replay.topology_replay import catalog_names, parse_speed

    Namespace(from_ns)
    start_ms, end_ms = to_ms(start, "start"), to_ms(end, "end")
    if start_ms is not None and end_ms is not None and end_ms <= start_ms:
        raise PipelineError(f"end {end} is not after start {start}: the range is empty")
    return Source(kind="replay", replay_from=from_ns, speed=parse_speed(speed),
                  start=None if start is None else str(start),
                  end=None if end is None else str(end), topics=catalog_names(topics))


def replay_problem(namespace: Namespace, source: Source) -> tuple[str, str] | None:
    """(key, why) when a replay source cannot run into ``namespace``."""
    if namespace.kind != "replay":
        return "namespace", (f"{namespace} is not a replay namespace, but the source is a "
                             "replay: use replay-NAME (e.g. replay-jun24)")
    if source.replay_from == namespace.name:
        return "source.from", f"a replay cannot read and write namespace {namespace}"
    return None


def as_replay(topology: Topology, from_ns: str, into: str, start: str | None = None,
              end: str | None = None, speed: str | float | None = None,
              topics=REPLAY_TOPICS) -> Topology:
    """The same topology fed by a replay of ``from_ns`` into namespace ``into`` instead of
    its own source (`pipeline up --replay-from`)."""
    import dataclasses

    namespace = Namespace(into)
    source = make_replay_source(from_ns, speed, start, end, topics)
    problem = replay_problem(namespace, source)
    if problem:
        raise PipelineError(problem[1])
    return dataclasses.replace(topology, namespace=namespace, source=source)


def _infra(raw: dict, where: _Locator) -> Infra:
    _only(raw, _INFRA_KEYS, where, "infra")
    ports = {k: _typed(raw, k, int, where, "infra", getattr(Infra, k))
             for k in _INFRA_KEYS - {"listen"}}
    for key, port in ports.items():
        if not 0 <= port < 65536:
            raise where.error(f"infra.{key}", f"{port} is not a port")
    return Infra(listen=_typed(raw, "listen", str, where, "infra", "127.0.0.1"), **ports)


def _process(index: int, raw: Any, where: _Locator) -> Process:
    if not isinstance(raw, dict):
        raise where.error("process", f"entry {index + 1} must be a table")
    _only(raw, _PROCESS_KEYS, where, "process")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9-]*", name):
        raise where.error("process.name", f"process {index + 1} needs a name in lowercase "
                          f"letters, digits and '-', not {name!r}")
    run = raw.get("run")
    if not isinstance(run, str) or not re.fullmatch(r"[\w.]+(:\w+)?", run):
        raise where.error("process.run", f"process {name}: `run` must be a module "
                          "(consumers.orderbook) or module:function", name)
    instances = raw.get("instances", 1)
    if not isinstance(instances, int) or isinstance(instances, bool) or not 1 <= instances <= 16:
        raise where.error("process.instances", f"process {name}: must be 1..16, not {instances!r}")
    args = raw.get("args", {})
    if not isinstance(args, dict):
        raise where.error("process.args", f"process {name}: must be a table")
    return Process(name=name, run=run, instances=instances, args=args,
                   restart_limit=raw.get("restart_limit", 5),
                   config=_group_config(name, run, args, where))


def _group_config(name: str, run: str, args: dict, where: _Locator) -> Any:
    """``args`` as the group's ``Config`` (None for a legacy user group)."""
    from pipeline.runtime.contract import config_from_args, load_group

    try:
        group = load_group(run)
    except PipelineError as exc:
        raise where.error("process.run", f"process {name}: {exc}", name) from None
    if group.config is None:
        return None
    return config_from_args(group.config, args,
                            lambda key, message: where.args_error(name, key, message))
