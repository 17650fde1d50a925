"""`pipeline portfolio`, `pipeline strategy` and `pipeline kill-switch`: positions and
PnL, and stopping trading."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pipeline.cli.common import RunDirOption, console, endpoints_for, settings_for
from pipeline.core.errors import PipelineError

portfolio_app = typer.Typer(invoke_without_command=True,
                            help="Positions and PnL per strategy, from the portfolio group.")
strategy_app = typer.Typer(no_args_is_help=True, help="Halt or resume a strategy's trading.")
PortfolioNamespace = typer.Option(None, "--namespace", "-n", envvar="PIPELINE_NAMESPACE",
                                  help="\\[default: the running topology's]")


@portfolio_app.callback()
def portfolio(ctx: typer.Context, run_dir: Optional[Path] = RunDirOption,
              namespace: Optional[str] = PortfolioNamespace,
              watch: bool = typer.Option(False, "--watch", help="Refresh every 2 seconds.")
              ) -> None:
    """Positions and PnL per strategy (what the portfolio group last published)."""
    if ctx.invoked_subcommand is not None:
        return
    import time

    from rich.live import Live

    from pipeline.ops.portfolio_view import read_view

    _, bootstrap, registry, ns = endpoints_for(run_dir, namespace)
    if not watch:
        console.print(_portfolio_tables(read_view(bootstrap, registry, ns), ns))
        return
    with Live(_portfolio_tables(read_view(bootstrap, registry, ns), ns), console=console,
              refresh_per_second=1) as live:
        try:
            while True:
                time.sleep(2.0)
                live.update(_portfolio_tables(read_view(bootstrap, registry, ns), ns))
        except KeyboardInterrupt:
            pass


def _money(text: Optional[str], places: int = 2) -> str:
    from decimal import Decimal

    return "stale" if text is None else f"{Decimal(text):,.{places}f}"


def pnl_line(strategy: str, pnl: dict, halt: Optional[dict]) -> str:
    state = f"[red]HALTED[/] ({halt['reason']}: {halt['detail']})" if halt else "trading"
    stale = f" [yellow]stale: {', '.join(pnl['stale_symbols'])}[/]" if pnl["stale"] else ""
    return (f"{strategy}: equity {_money(pnl['equity'], 4)} {pnl['currency']}, realized "
            f"{_money(pnl['realized_pnl'], 4)}, unrealized {_money(pnl['unrealized_pnl'], 4)}, "
            f"fees {_money(pnl['fees'], 4)}, drawdown {_money(pnl['drawdown'], 4)}, "
            f"{pnl['fills']} fills, {state}{stale}")


def _portfolio_tables(view, namespace):
    from rich.console import Group

    positions = Table(title=f"positions (namespace {namespace})")
    for column in ("strategy", "symbol", "quantity", "avg entry", "mark", "unrealized",
                   "realized", "fills"):
        positions.add_column(column, justify="left" if column in ("strategy", "symbol")
                             else "right")
    for p in view.positions:
        positions.add_row(p["strategy_id"], p["symbol"], p["quantity"],
                          _money(p["average_entry"], 8) if p["average_entry"] else "-",
                          p["mark"] or "stale",
                          _money(p["unrealized_pnl"], 4), _money(p["realized_pnl"], 4),
                          str(p["fills"]))
    pnl = Table(title="PnL per strategy")
    for column in ("strategy", "equity", "realized", "unrealized", "fees", "drawdown",
                   "daily", "exposure", "fills", "rejected", "state"):
        pnl.add_column(column, justify="left" if column in ("strategy", "state") else "right")
    for strategy, r in sorted(view.pnl.items()):
        halt = view.halts.get(strategy)
        pnl.add_row(strategy, f"{_money(r['equity'], 4)} {r['currency']}",
                    _money(r["realized_pnl"], 4), _money(r["unrealized_pnl"], 4),
                    _money(r["fees"], 4), _money(r["drawdown"], 4), _money(r["daily_pnl"], 4),
                    _money(r["exposure"], 4), str(r["fills"]),
                    str(sum(r["rejections"].values())),
                    f"[red]HALTED[/] {halt['reason']}" if halt else
                    ("[yellow]stale[/]" if r["stale"] else "trading"))
    parts = [positions, pnl]
    if not view.pnl:
        parts.append("no PnL yet: is the portfolio group running (topology.toml), and has "
                     "any order filled?")
    if view.reconciliation is not None:
        r = view.reconciliation
        parts.append(f"reconciliation: {r['detail']}")
        parts += [f"  {d['kind']}: {d['detail']}" for d in view.differences[:20]]
    return Group(*parts)


@portfolio_app.command("plot")
def portfolio_plot(strategy: str = typer.Option(..., "--strategy", "-s", help="Strategy id."),
                   run_dir: Optional[Path] = RunDirOption,
                   namespace: Optional[str] = PortfolioNamespace,
                   out: Optional[Path] = typer.Option(None, help="Directory for equity.png, "
                                                      "equity.html, equity.csv \\[default: "
                                                      "<run dir>/portfolio/<strategy>]"),
                   gap_s: float = typer.Option(60.0, help="A pause longer than this breaks "
                                               "the line.")) -> None:
    """Draw a strategy's live equity and drawdown from the PnL Parquet files."""
    from pipeline.ops.portfolio_plot import plot_live
    from pipeline.sinks.pnl import read_pnl

    settings, _, _, ns = endpoints_for(run_dir, namespace)
    root = settings.run_dir / "parquet" / ns.name / "portfolio.pnl"
    files = plot_live(read_pnl(root, strategy), strategy,
                      out or settings.run_dir / "portfolio" / strategy, gap_s)
    console.print(f"wrote {files['png']}, {files['html']} and {files['csv']}", highlight=False)


def _control(strategy_id: str, halted: bool, run_dir, namespace, yes: bool) -> None:
    from pipeline.ops.portfolio_view import set_halt

    _, bootstrap, registry, ns = endpoints_for(run_dir, namespace)
    verb = "halt" if halted else "resume"
    if not yes and not typer.confirm(f"{verb} strategy {strategy_id!r} in namespace {ns}?"):
        raise typer.Exit(1)
    set_halt(bootstrap, registry, ns, strategy_id, halted)
    console.print(f"strategy {strategy_id} {'halted' if halted else 'resumed'}: execution "
                  "acts on it from its next batch", highlight=False)


@strategy_app.command("halt")
def strategy_halt(strategy_id: str = typer.Argument(..., help="The strategy's id."),
                  run_dir: Optional[Path] = RunDirOption,
                  namespace: Optional[str] = PortfolioNamespace,
                  yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask.")) -> None:
    """Stop one strategy: its open orders are cancelled and new ones rejected."""
    _control(strategy_id, True, run_dir, namespace, yes)


@strategy_app.command("resume")
def strategy_resume(strategy_id: str = typer.Argument(..., help="The strategy's id."),
                    run_dir: Optional[Path] = RunDirOption,
                    namespace: Optional[str] = PortfolioNamespace,
                    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask.")) -> None:
    """Let a halted strategy trade again; its drawdown and daily loss start afresh."""
    _control(strategy_id, False, run_dir, namespace, yes)


def kill_switch_command(
        state: str = typer.Argument(..., help="on | off | show"),
        run_dir: Optional[Path] = RunDirOption,
        yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask.")) -> None:
    """Stop all trading (on: execution rejects and cancels everything) or resume it."""
    from pipeline.ops import kill_switch

    settings = settings_for(run_dir)
    if state not in ("on", "off", "show"):
        raise PipelineError(f"kill-switch {state!r}: say on, off or show")
    if state != "show":
        on = state == "on"
        if not yes and not typer.confirm(kill_switch.CONFIRM[on]):
            raise typer.Exit(1)
        kill_switch.turn(settings.run_dir, on)
    console.print(f"kill switch {'ON' if kill_switch.is_on(settings.run_dir) else 'off'} "
                  f"({kill_switch.kill_switch_path(settings.run_dir)})", highlight=False)
