"""The one consumer-group contract, for the shipped groups and a user's alike.

A group is a module with:

* ``Config``: a frozen dataclass of the group's settings (what a topology's
  ``[[process]].args`` table holds), each field typed and with its default;
* ``MULTI_INSTANCE: bool``: whether several instances may run (each then gets its own
  ``ctx.instance``, which it must put in its transactional and static member ids);
* ``make_group(ctx, config) -> GroupConfig``: the group, given the :class:`GroupContext`
  the runtime supplies and the ``Config`` the user wrote.

The topology names it by ``run = "package.module"`` (or ``"package.module:function"``,
another function of the module with the same signature). This module holds the generic
parts: loading a group from its ``run`` string, turning a TOML table into its ``Config``
(every problem naming the key), and the command line ``python -m consumers.X`` derives from
the ``Config`` for development.

A field's ``metadata`` may hold ``help`` (the flag's help), ``choices`` and ``parse``: a
function from the value as written (a TOML value, or the flag's text) to the field's
value, raising ``ValueError`` or ``PipelineError`` when it does not fit.

Legacy: a ``module:function`` whose module has no ``Config`` is called the way user groups
were before, ``function(bootstrap=, registry_url=, namespace=, name=, **args)``, with its
args unchecked until it runs.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import importlib
import json
import logging
import sys
import types
import typing
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pipeline.core.cluster import Cluster
from pipeline.core.errors import PipelineError
from pipeline.kafka.catalog import Namespace
from pipeline.runtime.runner import GroupConfig, GroupStats, log_to_stderr, run_until_stopped

log = logging.getLogger(__name__)
_MAPPINGS = (dict, Mapping, collections.abc.Mapping)
ErrorAt = Callable[[str, str], PipelineError]  # (key, message) -> the error to raise


@dataclass(frozen=True)
class GroupContext:
    """What the runtime (the supervisor, ``pipeline run``, a group's ``main``) supplies to
    ``make_group``; never the user's settings, never a secret."""

    cluster: Cluster
    namespace: Namespace
    name: str  # the topology's process name (a user group's id is <namespace>.<name>)
    instance: str = "0"  # this instance's index, when MULTI_INSTANCE and several run
    run_dir: Path = Path("run")  # the run directory: state, Parquet, kill switch, secrets/
    symbols: tuple[str, ...] = ()  # the topology's symbols; (): not known (any symbol)
    strategy_keys: Path | None = None  # the run's strategy signing-key file (0600), if any

    @property
    def bootstrap(self) -> str:
        return self.cluster.bootstrap

    @property
    def registry_url(self) -> str:
        return self.cluster.registry_url


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class GroupModule:
    """A group as a topology's ``run`` names it."""

    run: str
    module: types.ModuleType
    make_group: Callable[..., GroupConfig]
    config: type | None  # the Config dataclass; None: a legacy user group
    multi_instance: bool

    @property
    def legacy(self) -> bool:
        return self.config is None


def load_group(run: str | types.ModuleType) -> GroupModule:
    """The group of ``run``: ``"package.module"`` (its ``make_group``) or
    ``"package.module:function"``; or a module object itself."""
    if isinstance(run, types.ModuleType):
        module, attr = run, "make_group"
        spec = getattr(module, "__spec__", None)
        run = spec.name if spec is not None else module.__name__
    else:
        module_name, _, attr = run.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise PipelineError(f"cannot load group {run}: {exc}") from None
        attr = attr or "make_group"
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise PipelineError(f"cannot load group {run}: module {module.__name__} has no "
                            f"function {attr}")
    config = getattr(module, "Config", None)
    if config is not None and not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        raise PipelineError(f"group {run}: Config must be a dataclass")
    if config is None and ":" not in run:
        raise PipelineError(f"group {run}: the module has no Config dataclass (see "
                            "pipeline/runtime/contract.py)")
    return GroupModule(run, module, factory, config, bool(getattr(module, "MULTI_INSTANCE",
                                                                  False)))


def build_group(group: GroupModule, ctx: GroupContext, config: Any) -> GroupConfig:
    """``make_group(ctx, config)``, checked; ``config`` is a dict of args for a legacy group."""
    if group.legacy:
        made = group.make_group(bootstrap=ctx.bootstrap, registry_url=ctx.registry_url,
                                namespace=ctx.namespace, name=ctx.name, **dict(config))
    else:
        made = group.make_group(ctx, config)
    if not isinstance(made, GroupConfig):
        raise PipelineError(f"{group.run} returned {type(made).__name__}, not a GroupConfig")
    return made


# --------------------------------------------------------------------------- args -> Config


def _default_error(key: str, message: str) -> PipelineError:
    return PipelineError(f"key {key!r}: {message}")


def config_from_args(cls: type, args: Mapping[str, Any], error: ErrorAt = _default_error) -> Any:
    """``cls`` (a Config dataclass) from a TOML table: an unknown key, a value of the wrong
    type or one its field refuses raises ``error(key, message)``."""
    specs = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in args:
        if key not in specs:
            raise error(key, f"unknown key; allowed here: {', '.join(sorted(specs))}")
    values = {}
    for key, value in args.items():
        try:
            values[key] = _field_value(specs[key], hints[key], value)
        except (ValueError, PipelineError) as exc:
            raise error(key, str(exc)) from None
    try:
        return cls(**values)
    except (ValueError, PipelineError) as exc:
        raise error(next(iter(args), cls.__name__), str(exc)) from None


def _field_value(spec: dataclasses.Field, hint: Any, value: Any) -> Any:
    parse = spec.metadata.get("parse")
    converted = parse(value) if parse is not None else convert(hint, value)
    choices = spec.metadata.get("choices")
    if choices is not None and converted not in choices:
        raise ValueError(f"must be one of {', '.join(map(str, choices))}, not {value!r}")
    return converted


def _type_name(hint: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            Decimal: "a decimal (a string like \"0.5\", or an integer)",
            Path: "a path (a string)"}.get(hint, getattr(hint, "__name__", str(hint)))


def convert(hint: Any, value: Any) -> Any:
    """A TOML value as type ``hint``: bool, int, float, str, Decimal (a string or an
    integer, never a float), Path, ``X | None``, ``tuple[str, ...]`` (an array, or a
    comma-separated string) and ``dict`` (a table)."""
    origin, params = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [p for p in params if p is not type(None)]
        if value is None and len(options) < len(params):
            return None
        problems = []
        for option in options:
            try:
                return convert(option, value)
            except ValueError as exc:
                problems.append(str(exc))
        raise ValueError(" or ".join(problems))
    if origin is tuple or hint is tuple:
        item = params[0] if params else str
        items = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) \
            else value
        if not isinstance(items, list):
            raise ValueError(f"must be an array or a comma-separated string, not {value!r}")
        return tuple(convert(item, v) for v in items)
    if origin in _MAPPINGS or hint in _MAPPINGS:
        if not isinstance(value, dict):
            raise ValueError(f"must be a table, not {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, not {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, not {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, not {value!r}")
        return float(value)
    if hint is Decimal:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"must be {_type_name(Decimal)}, not {value!r}"
                             + (": a float is not exact" if isinstance(value, float) else ""))
        try:
            result = Decimal(value)
        except InvalidOperation:
            raise ValueError(f"must be {_type_name(Decimal)}, not {value!r}") from None
        if not result.is_finite():
            raise ValueError(f"must be a finite decimal, not {value!r}")
        return result
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, not {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, str):
            raise ValueError(f"must be a path (a string), not {value!r}")
        return Path(value)
    raise ValueError(f"cannot take a value of type {hint!r}")


# --------------------------------------------------------------------------- the command line


CONTEXT_FLAGS = ("bootstrap", "registry", "namespace", "run_dir", "instance", "name",
                 "log_level")


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _from_text(spec: dataclasses.Field, hint: Any, text: str) -> Any:
    """A flag's text as the TOML value it stands for, then as the field's value."""
    if spec.metadata.get("parse") is not None:
        return _field_value(spec, hint, text)
    kinds = [p for p in typing.get_args(hint) if p is not type(None)] \
        if typing.get_origin(hint) in (typing.Union, types.UnionType) else [hint]
    base = kinds[0] if len(kinds) == 1 else str
    raw: Any = text
    origin = typing.get_origin(base)
    if base in (int, float):
        try:
            raw = base(text)
        except ValueError:
            raise ValueError(f"must be {_type_name(base)}, not {text!r}") from None
    elif base in _MAPPINGS or origin in _MAPPINGS:
        try:
            raw = json.loads(text)
        except ValueError:
            raise ValueError(f"must be a JSON object, not {text!r}") from None
    return _field_value(spec, hint, raw)


def config_parser(cls: type, prog: str, description: str | None = None
                  ) -> argparse.ArgumentParser:
    """The development command line of a group: where Kafka, the registry and the
    namespace are (default: the run directory's, ``PIPELINE_NAMESPACE``), the context, and
    one flag per ``Config`` field (``--field-name``; a bool that defaults to false is a
    switch, one that defaults to true gets ``--no-field-name``)."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--bootstrap", help="Kafka bootstrap servers [default: the run dir's]")
    ap.add_argument("--registry", help="schema registry URL [default: the run dir's]")
    ap.add_argument("--namespace", "-n", help="topic namespace [default: PIPELINE_NAMESPACE]")
    ap.add_argument("--run-dir", help="the run directory [default: $PIPELINE_RUN_DIR or ./run]")
    ap.add_argument("--name", help="the process name [default: the module's]")
    ap.add_argument("--log-level", default="INFO")
    multi = bool(getattr(sys.modules.get(cls.__module__), "MULTI_INSTANCE", False))
    if multi:
        ap.add_argument("--instance", default="0", help="unique per running instance")
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        if not spec.init:
            continue
        if spec.name in CONTEXT_FLAGS:
            raise PipelineError(f"{cls.__qualname__}.{spec.name}: the runtime supplies that")
        hint, help_text = hints[spec.name], spec.metadata.get("help")
        default = spec.default if spec.default is not dataclasses.MISSING else (
            spec.default_factory() if spec.default_factory is not dataclasses.MISSING
            else None)
        if hint is bool:
            if default:
                ap.add_argument(_flag(f"no_{spec.name}"), dest=spec.name, action="store_false",
                                help=help_text)
            else:
                ap.add_argument(_flag(spec.name), action="store_true", help=help_text)
            continue

        def typed(text: str, spec=spec, hint=hint) -> Any:
            try:
                return _from_text(spec, hint, text)
            except PipelineError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc) or f"bad value {text!r}") from None

        shown = ",".join(map(str, default)) if isinstance(default, tuple) else \
            json.dumps(default) if isinstance(default, dict) else default
        suffix = f" [default: {shown}]" if default is not None and "[default" not in (
            help_text or "") else ""
        ap.add_argument(_flag(spec.name), type=typed, default=argparse.SUPPRESS,
                        metavar=spec.name.upper(), help=f"{help_text or ''}{suffix}".strip())
    return ap


def config_from_namespace(cls: type, parsed: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    given = {k: v for k, v in vars(parsed).items() if k in names}
    return cls(**given)


def context_from_namespace(parsed: argparse.Namespace, default_name: str) -> GroupContext:
    """The context of a development run: the flags given, else the run directory's."""
    from pipeline.ops.settings import Settings
    from pipeline.runtime.runner import local_cluster

    settings = Settings.from_env(parsed.run_dir)
    cluster = local_cluster(parsed.run_dir, parsed.bootstrap, parsed.registry)
    return GroupContext(cluster=cluster, namespace=Namespace(parsed.namespace or
                                                             settings.namespace),
                        name=parsed.name or default_name,
                        instance=str(getattr(parsed, "instance", "0")),
                        run_dir=settings.run_dir)


def run_group(group: GroupModule, ctx: GroupContext, config: Any) -> int:
    """Build the group and run it in this process until SIGTERM or Ctrl-C, as the
    supervisor runs it; the exit code. A build that fails (a bad setting, a missing key)
    is one logged line and exit code 2; an exception the module lists in its
    ``EXIT_CODES`` ({type: code}) ends the run with that code. The runtime's counts are
    printed as one JSON line on stdout at a clean exit."""
    try:
        made = build_group(group, ctx, config)
    except (PipelineError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    codes: Mapping[type, int] = getattr(group.module, "EXIT_CODES", {})
    try:
        stats: GroupStats = run_until_stopped(made, ctx.bootstrap)
    except BaseException as exc:
        code = next((c for kind, c in codes.items() if isinstance(exc, kind)), None)
        if code is None:
            raise
        log.error("%s halted: %s", ctx.name, exc)
        return code
    print(json.dumps(dataclasses.asdict(stats)), flush=True)
    return 0


def group_main(module: types.ModuleType | str, argv: Sequence[str] | None = None) -> int:
    """The ``main`` of every group module: ``python -m consumers.X [flags]`` for
    development, the flags derived from its ``Config`` (:func:`config_parser`)."""
    group = load_group(module)
    assert group.config is not None
    name = group.run.rpartition(".")[2]
    doc = (group.module.__doc__ or "").strip().split("\n")[0] or None
    parsed = config_parser(group.config, f"python -m {group.run}", doc).parse_args(argv)
    log_to_stderr(parsed.log_level)
    try:
        config = config_from_namespace(group.config, parsed)
        ctx = context_from_namespace(parsed, name)
    except (PipelineError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    return run_group(group, ctx, config)
