"""`pipeline bars`: the OHLCV bars the bars group writes to Parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.common import RunDirOption, console, settings_for
from pipeline.core.errors import PipelineError

bars_app = typer.Typer(no_args_is_help=True, help="OHLCV bars written by the bars group.")


@bars_app.command("read")
def bars_read(
    symbol: str = typer.Argument(..., help="e.g. BTCUSD"),
    run_dir: Optional[Path] = RunDirOption,
    namespace: str = typer.Option("sim", "--namespace", "-n"),
    interval: str = typer.Option("1m", help="1m, 5m, 1h, 1d, ..."),
    start: Optional[str] = typer.Option(None, help="ISO time, inclusive (UTC)."),
    end: Optional[str] = typer.Option(None, help="ISO time, exclusive (UTC)."),
    root: Optional[Path] = typer.Option(None, help="Parquet root \\[default: "
                                                   "<run_dir>/parquet/<namespace>/bars]."),
) -> None:
    """Print the bars of SYMBOL from Parquet (`read_bars` returns the same DataFrame)."""
    import pandas as pd

    from pipeline.sinks.bars import read_bars

    settings = settings_for(run_dir)
    root = root or settings.run_dir / "parquet" / namespace / "bars"
    frame = read_bars(root, symbol.upper(), interval,
                      pd.Timestamp(start, tz="UTC") if start else None,
                      pd.Timestamp(end, tz="UTC") if end else None)
    if frame.empty:
        raise PipelineError(f"no {interval} bars of {symbol.upper()} in {root}"
                            + (f" between {start} and {end}" if start or end else ""))
    console.print(frame.to_string(max_rows=60))
    console.print(f"{len(frame)} bar(s)")
