"""What the command groups share: the console, the options every group takes, the
settings and endpoints a command connects to."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

# Piped output (logs, scripts, tests) gets whole lines, not an 80-column squeeze.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
RunDirOption = typer.Option(None, "--run-dir", envvar="PIPELINE_RUN_DIR",
                            help="Where logs, broker data and state live \\[default: ./run].")


def settings_for(run_dir: Optional[Path]):
    from pipeline.ops.settings import Settings

    settings = Settings.from_env(run_dir)
    if not settings.bootstrap_servers:
        from pipeline.ops.broker import LocalBroker

        # The run dir's broker, if secured, is the operator's: commands connect as admin
        # unless KAFKA_SECURITY_*/KAFKA_CLIENT_PROPERTIES say otherwise.
        LocalBroker.from_settings(settings).state()
    return settings


def registry_for(run_dir: Optional[Path]):
    from pipeline.avro.registry import SchemaRegistry
    from pipeline.ops.registry_server import registry_url

    return SchemaRegistry(registry_url(settings_for(run_dir)))


def endpoints_for(run_dir: Optional[Path], namespace: Optional[str]):
    """(settings, bootstrap, registry URL, namespace) of the running topology, or of the
    run directory's broker and registry."""
    from pipeline.ops.supervisor import running_endpoints

    settings = settings_for(run_dir)
    return (settings, *running_endpoints(settings, namespace))


def setup_logging(level: str = "INFO") -> None:
    from pipeline.runtime.runner import log_to_stderr

    log_to_stderr(level)
