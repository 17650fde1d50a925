"""`pipeline backtest`: a strategy over a namespace's history, and its statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pipeline.cli.common import RunDirOption, console, settings_for
from pipeline.core.errors import PipelineError


def backtest(
    strategy: str = typer.Argument(..., help="The strategy, module:Class "
                                             "(e.g. pipeline.strategy:SmaCross)."),
    run_dir: Optional[Path] = RunDirOption,
    namespace: str = typer.Option("sim", "--namespace", "-n",
                                  help="Namespace whose topics are replayed."),
    params: str = typer.Option("{}", help='Strategy parameters, a JSON object: '
                                           '\'{"fast": 10, "slow": 20}\'.'),
    grid: Optional[str] = typer.Option(None, help='A parameter sweep, a JSON object of lists '
                                                  '(\'{"fast": [5, 10], "slow": [20, 30]}\'): '
                                                  'one row per combination, in parallel.'),
    workers: int = typer.Option(2, help="Processes for --grid."),
    start: Optional[str] = typer.Option(None, help="From this record time, inclusive "
                                                   "(ISO, UTC unless it says, or epoch ms)."),
    end: Optional[str] = typer.Option(None, help="Up to this record time, exclusive."),
    offsets: list[str] = typer.Option([], "--offsets", help="TOPIC:PARTITION:FROM-TO (end "
                                                            "exclusive) instead of times; "
                                                            "repeat per partition."),
    topics: Optional[str] = typer.Option(None, help="Comma-separated catalog topics \\[default: "
                                                    "what the strategy and fill model need]."),
    fill: str = typer.Option("next-open", help="next-open: market orders at the next bar's "
                                               "open (backtesting.py); book: the simulated "
                                               "exchange, orders resting in the replayed L2 "
                                               "book with queue position."),
    cash: str = typer.Option("1000000", help="Starting cash."),
    commission: Optional[str] = typer.Option(None, help="next-open: fraction of each fill's "
                                                        "value, on entry and on exit "
                                                        "\\[default: 0.002]; book: both fees, "
                                                        "unless --maker-fee/--taker-fee."),
    maker_fee: Optional[str] = typer.Option(None, help="book: fee of fills that rested "
                                                       "\\[default: Gemini's API tier, 0.002]."),
    taker_fee: Optional[str] = typer.Option(None, help="book: fee of fills that took "
                                                       "\\[default: Gemini's API tier, 0.004]."),
    queue: str = typer.Option("risk-averse", help="book: queue position of resting orders: "
                                                  "risk-averse (behind what the book shows "
                                                  "at the price) or none (at the front)."),
    latency_ms: int = typer.Option(0, help="book: orders and cancels reach the simulated "
                                           "exchange this long after their trigger."),
    rules_file: Optional[Path] = typer.Option(None, help="book: Gemini's symbol rules the "
                                              "simulated exchange refuses orders by (a rules "
                                              "cache, or recorded /v1/symbols/details "
                                              "responses) \\[default: none]."),
    slippage: str = typer.Option("0", help="next-open: a fraction added to buys' and taken "
                                           "from sells' prices (backtesting.py's spread)."),
    lot: str = typer.Option("1", help="Fraction sizing rounds down to whole lots of this."),
    interval: Optional[str] = typer.Option(None, help="Bar interval to trade on when the "
                                                      "topic holds several."),
    finalize: bool = typer.Option(True, "--finalize/--no-finalize",
                                  help="Close open trades at the end (backtesting.py's "
                                       "finalize_trades)."),
    book_depth: int = typer.Option(10, help="Levels per side in the books given to "
                                            "on_book."),
    out: Optional[Path] = typer.Option(None, help="Directory for trades.csv, equity.csv, "
                                                  "stats.json, equity.png \\[default: "
                                                  "<run_dir>/backtests/<strategy>-<time>]."),
    html: bool = typer.Option(False, help="Also write report.html (with --grid: "
                                          "sweep.html)."),
    metric: Optional[str] = typer.Option(None, help="--grid --html: the statistic sweep.html "
                                                    "draws over the grid \\[default: "
                                                    "Return [%]]."),
    progress: bool = typer.Option(True, "--progress/--no-progress",
                                  help="A progress bar on stderr (events/s, ETA)."),
    source: str = typer.Option("kafka", help="kafka: the topics; archive: the same records "
                                             "from the Parquet archive (beyond retention)."),
    archive_root: Optional[Path] = typer.Option(None, help="The archive \\[default: "
                                                "<run_dir>/parquet/<namespace>/archive]."),
) -> None:
    """Replay topics of a namespace through a strategy with a simulated broker; print the
    statistics and write the trade list, equity curve and report. Ctrl-C stops after the
    current batch, keeps what was done and exits 130."""
    from datetime import datetime, timezone

    from pipeline.backtest.run import run_backtest, sweep
    from pipeline.ops.broker import bootstrap_servers
    from pipeline.ops.registry_server import registry_url
    from pipeline.replay.ranges import parse_offsets

    if metric is not None:
        from pipeline.backtest.report_interactive import check_metric

        if grid is None or not html:
            raise PipelineError("--metric chooses what sweep.html draws: give it with --grid "
                                "and --html")
        check_metric(metric)
    settings = settings_for(run_dir)
    cluster = None
    if source == "archive":  # no Kafka needed
        from pipeline.replay.archive import resolve_root

        archive_root = resolve_root(namespace, run_dir, archive_root)
    else:
        from pipeline.core.cluster import Cluster

        cluster = Cluster(bootstrap_servers(settings), registry_url(settings))
    strategy_params = _json_object(params, "--params")
    from pipeline.backtest.config import BacktestConfig

    config = BacktestConfig(strategy, namespace, strategy_params, start, end,
                            topics=topics.split(",") if topics else None,
                            offsets=parse_offsets(offsets, namespace) if offsets else None,
                            source=source, archive_root=archive_root, fill=fill, cash=cash,
                            commission=commission, slippage=slippage, lot=lot,
                            interval=interval, finalize_trades=finalize,
                            book_depth=book_depth, maker_fee=maker_fee, taker_fee=taker_fee,
                            queue=queue, latency_ms=latency_ms, rules_file=rules_file)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = out or settings.run_dir / "backtests" / f"{strategy.rpartition(':')[2]}-{stamp}"
    if grid is not None:
        from pipeline.backtest.report_interactive import DEFAULT_METRIC, write_sweep_html

        grid_values = _json_object(grid, "--grid")
        table = sweep(config, grid_values, cluster, workers=workers, progress=progress)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "sweep.csv", index=False)
        chart = ""
        if html and len(table):
            chart = ", chart " + str(write_sweep_html(
                out / "sweep.html", table, grid_values, metric or DEFAULT_METRIC,
                f"{strategy} {strategy_params}"))
        _print_sweep(table)
        done = len(table)
        console.print(f"{done} of {table.attrs['combinations']} combination(s); "
                      f"table written to {out / 'sweep.csv'}{chart}", highlight=False)
        if table.attrs["interrupted"]:
            console.print("[yellow]interrupted[/]: the combinations not started were dropped")
            raise typer.Exit(130)
        return
    result = run_backtest(config, cluster, out_dir=out, html=html, progress=progress)
    _print_stats(result)
    if result.interrupted:
        console.print(f"[yellow]interrupted[/] after {result.engine.events:,} events: the "
                      "report covers them; open trades were left open")
        raise typer.Exit(130)


def _json_object(text: str, option: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{option} is not JSON ({exc.msg} at column {exc.colno}): "
                            f"{text}") from None
    if not isinstance(value, dict):
        raise PipelineError(f"{option} must be a JSON object, got: {text}")
    return value


def _print_stats(result) -> None:
    from pipeline.backtest.report import breakdown_json, stats_rows

    table = Table("statistic", "value", title=f"{result.strategy} {result.params}")
    for key, value in stats_rows(result.stats):
        table.add_row(key, value)
    console.print(table)
    per = Table("symbol", "trades", "fills", "P&L", "fees", "exposure time %", "buy & hold %",
                title="per symbol")
    for symbol, row in breakdown_json(result.engine).items():
        hold = row["buy_and_hold_pct"]
        per.add_row(symbol, str(row["trades"]), str(row["fills"]), row["pnl"], row["fees"],
                    f"{row['exposure_pct']:.2f}", "n/a" if hold is None else f"{hold:+.4f}")
    console.print(per)
    read = result.read
    console.print(f"{result.engine.events:,} events from {', '.join(result.topics)} in "
                  f"{result.elapsed_s:.2f}s ({result.events_per_s:,.0f}/s; "
                  f"{read.skipped_time} outside the time range, {read.undecodable} "
                  f"undecodable); final equity {result.final_equity}", highlight=False)
    for name, path in sorted(result.files.items()):
        console.print(f"{name}: {path}", highlight=False)


def _print_sweep(frame) -> None:
    columns = [c for c in frame.columns if c in ("Return [%]", "Sharpe Ratio",
                                                 "Max. Drawdown [%]", "# Trades",
                                                 "Win Rate [%]", "Equity Final [$]")]
    params = [c for c in frame.columns if c not in columns and not c.endswith("]")
              and frame[c].map(lambda v: isinstance(v, (int, float, str, bool))).all()
              and c[:1].islower()]
    table = Table(*params, *columns)
    for _, row in frame.iterrows():
        table.add_row(*(str(row[c]) if c in params else f"{row[c]:,.2f}"
                        if isinstance(row[c], float) else str(row[c])
                        for c in params + columns))
    console.print(table)
