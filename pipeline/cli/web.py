"""`pipeline web`: the web dashboard."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.common import RunDirOption, endpoints_for
from pipeline.core.errors import PipelineError


def web(run_dir: Optional[Path] = RunDirOption,
        namespace: Optional[str] = typer.Option(None, "--namespace", "-n",
                                                help="Default: the running topology's."),
        host: str = typer.Option("127.0.0.1", help="Address to listen on."),
        port: int = typer.Option(8050, help="Port to listen on."),
        bootstrap: Optional[str] = typer.Option(None, help="Default: the running topology's."),
        registry: Optional[str] = typer.Option(None, help="Default: the running topology's."),
        symbols: Optional[str] = typer.Option(None, help="Comma-separated; default: the "
                                                         "running topology's."),
        status_url: Optional[str] = typer.Option(
            None, help="The supervisor's /status.json; default: from its state file."),
        bar_interval: Optional[str] = typer.Option(
            None, help="The candles' bar interval; default: the topology's shortest."),
        allow_remote: bool = typer.Option(False, "--allow-remote",
                                          help="Serve other machines too (no login!).")) -> None:
    """The web dashboard: topology, symbols (depth, candles), trading, backtests."""
    from pipeline.ops.supervisor import read_state
    from pipeline.ops.topology import load as load_topology
    from pipeline.web.server import WebConfig, serve

    settings, found_bootstrap, found_registry, ns = endpoints_for(run_dir, namespace)
    state = read_state(settings.run_dir) or {}
    running = load_topology(Path(state["topology"])) if state.get("topology") else None
    if symbols is None and running is not None:
        symbols = ",".join(running.symbols)
    if not symbols:
        raise PipelineError("which symbols? --symbols A,B (or run it beside `make up`)")
    if bar_interval is None:
        from pipeline.ops.supervisor import chart_interval

        bar_interval = chart_interval(running) if running is not None else "1m"
    if status_url is None and state.get("metrics_port"):
        status_url = f"http://127.0.0.1:{state['metrics_port']}/status.json"
    config = WebConfig(settings.run_dir, str(ns), [s.strip().upper() for s in
                                                   symbols.split(",") if s.strip()],
                       status_url, allow_remote, bar_interval=bar_interval)
    serve(config, bootstrap or found_bootstrap, registry or found_registry, host, port)
