"""The numbers traders expect from a backtest, the trade list, and the equity curve.

:func:`compute_stats` computes, under backtesting.py's own labels and with its
definitions (``backtesting/_stats.py``, 0.6.x), from the equity points and the closed
trades of an :class:`~pipeline.backtest.EngineResult`:

* **Start / End / Duration**: first and last equity point (bars are labelled with their
  start, as backtesting.py's data index; book replays are sampled every ``sample_ms``);
* **Exposure Time [%]**: share of equity points from a trade's entry point to its exit
  point (inclusive), i.e. "in bars", not in clock time;
* **Equity Final / Peak [$]**, **Return [%]** (final over first point);
* **Buy & Hold Return [%]**: the traded (first) symbol's mark from the strategy's
  ``warmup_bars``-th point to the last one (backtesting.py starts after its indicators'
  warm-up);
* **Return (Ann.) [%]**: the geometric mean of daily returns (equity resampled to the
  last value per UTC day; weekly/monthly/yearly for such data), compounded over 365 days
  a year when the data has weekends, else 252; **Volatility (Ann.) [%]**: backtesting.py's
  compounding formula ``sqrt((var + (1+g)^2)^N - (1+g)^(2N))`` of the daily returns;
  **CAGR [%]** over the calendar duration;
* **Sharpe Ratio** = annual return / annual volatility (risk-free rate 0); **Sortino
  Ratio** = annual return / (root mean square of negative daily returns · √N); **Calmar
  Ratio** = annual return / max drawdown;
* **Alpha [%] / Beta**: Jensen's alpha and the beta of per-point log returns against the
  traded symbol's;
* **Max. / Avg. Drawdown [%]** (drawdown = 1 − equity / running peak; the average is over
  drawdown periods' peaks) and their **Durations** (from a peak to recovery, or to the
  end), rounded up to the data's resolution;
* **# Trades**, **Win Rate [%]** (trades with P&L > 0), **Best / Worst Trade [%]**,
  **Avg. Trade [%]** (geometric mean of trade returns), **Max. / Avg. Trade Duration**;
* **Profit Factor**: sum of winning trades' returns over the absolute sum of losing
  trades' returns (backtesting.py uses returns, not cash P&L); **Expectancy [%]**: mean
  trade return; **SQN**: √n · mean P&L / std P&L; **Kelly Criterion**;
* **Commissions [$]**: entry plus exit commissions of the closed trades.

Trade returns are after commissions and relative to the entry value, as backtesting.py's
``ReturnPct``. Statistics are floats (computed with numpy from the exact results); the
trade list CSV carries the exact decimals.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.backtest import EngineResult
from pipeline.trading.accounting import TRADE_COLUMNS, ClosedTrade
from pipeline.errors import PipelineError

#: The statistics backtesting.py computes the same way (the parity test compares these).
COMPARABLE = ("Start", "End", "Duration", "Exposure Time [%]", "Equity Final [$]",
              "Equity Peak [$]", "Commissions [$]", "Return [%]", "Buy & Hold Return [%]",
              "Return (Ann.) [%]", "Volatility (Ann.) [%]", "CAGR [%]", "Sharpe Ratio",
              "Sortino Ratio", "Calmar Ratio", "Alpha [%]", "Beta", "Max. Drawdown [%]",
              "Avg. Drawdown [%]", "Max. Drawdown Duration", "Avg. Drawdown Duration",
              "# Trades", "Win Rate [%]", "Best Trade [%]", "Worst Trade [%]",
              "Avg. Trade [%]", "Max. Trade Duration", "Avg. Trade Duration", "Profit Factor",
              "Expectancy [%]", "SQN", "Kelly Criterion")


def _index(labels_ms: list[int]) -> pd.DatetimeIndex:
    """Naive UTC timestamps (as backtesting.py's index of a UTC CSV)."""
    return pd.DatetimeIndex(pd.to_datetime(np.asarray(labels_ms, dtype="int64"), unit="ms"))


def trades_frame(trades: list[ClosedTrade]) -> pd.DataFrame:
    """The trade list as a DataFrame in backtesting.py's column names (floats), plus
    ``Symbol``; exact values are in :func:`trades_csv`."""
    frame = pd.DataFrame({
        "Symbol": [t.symbol for t in trades],
        "Size": [float(t.size) for t in trades],
        "EntryBar": np.array([t.entry_bar for t in trades], dtype="int64"),
        "ExitBar": np.array([t.exit_bar for t in trades], dtype="int64"),
        "EntryIndex": np.array([t.entry_index for t in trades], dtype="int64"),
        "ExitIndex": np.array([t.exit_index for t in trades], dtype="int64"),
        "EntryPrice": [float(t.entry_price) for t in trades],
        "ExitPrice": [float(t.exit_price) for t in trades],
        "PnL": [float(t.pnl) for t in trades],
        "Commission": [float(t.commission) for t in trades],
        "ReturnPct": [float(t.return_pct) for t in trades],
        "EntryTime": pd.to_datetime(np.array([t.entry_ms for t in trades], dtype="int64"),
                                    unit="ms"),
        "ExitTime": pd.to_datetime(np.array([t.exit_ms for t in trades], dtype="int64"),
                                   unit="ms"),
    })
    frame["Duration"] = frame["ExitTime"] - frame["EntryTime"]
    return frame


def trades_csv(trades: list[ClosedTrade]) -> str:
    """The trade list as CSV with exact decimals and ISO UTC times: byte-identical for
    identical runs."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(TRADE_COLUMNS)
    for t in trades:
        writer.writerow((t.symbol, t.size, t.entry_bar, t.exit_bar, _iso(t.entry_ms),
                         _iso(t.exit_ms), t.entry_price, t.exit_price, t.pnl, t.return_pct,
                         t.commission))
    return out.getvalue()


def _iso(ms: int) -> str:
    return pd.Timestamp(ms, unit="ms").strftime("%Y-%m-%dT%H:%M:%S.%fZ").replace(".000000Z", "Z")


def _drawdown_duration_peaks(dd: pd.Series) -> tuple[pd.Series, pd.Series]:
    """backtesting.py's ``compute_drawdown_duration_peaks``, vectorised: for each stretch
    between two points at a peak (dd == 0; the last point closes the last stretch), its
    duration and deepest drawdown, at the stretch's last point."""
    values = dd.to_numpy()
    iloc = np.unique(np.r_[(values == 0).nonzero()[0], len(values) - 1])
    prev, cur = iloc[:-1], iloc[1:]
    keep = cur > prev + 1
    prev, cur = prev[keep], cur[keep]
    if not len(cur):
        return (dd.replace(0, np.nan),) * 2
    index = dd.index
    durations = pd.Series(index[cur] - index[prev], index=index[cur])
    bounds = np.ravel(np.column_stack([prev, cur + 1]))
    peaks = np.maximum.reduceat(np.r_[values, 0.0], bounds)[::2]
    peaks = pd.Series(peaks, index=index[cur])
    return durations.reindex(index), peaks.reindex(index)


def _geometric_mean(returns: pd.Series) -> float:
    returns = returns.fillna(0) + 1
    if np.any(returns <= 0):
        return 0
    return float(np.exp(np.log(returns).sum() / (len(returns) or np.nan)) - 1)


def equity_frame(result: EngineResult) -> pd.DataFrame:
    index = _index(result.equity_labels_ms)
    equity = np.array([float(v) for v in result.equity], dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        dd = 1 - equity / np.maximum.accumulate(equity) if len(equity) else equity
    duration, _ = _drawdown_duration_peaks(pd.Series(dd, index=index)) if len(equity) \
        else (pd.Series(dtype="timedelta64[ns]"), None)
    return pd.DataFrame({"Equity": equity, "DrawdownPct": dd, "DrawdownDuration": duration},
                        index=index)


def compute_stats(result: EngineResult, risk_free_rate: float = 0.0) -> dict[str, Any]:
    """The statistics (see the module doc); an ordered dict under backtesting.py's labels."""
    if not result.equity:
        raise PipelineError("no equity points: the replay produced no bar or book to mark on")
    index = _index(result.equity_labels_ms)
    equity = np.array([float(v) for v in result.equity], dtype=float)
    dd = 1 - equity / np.maximum.accumulate(equity)
    dd_dur, dd_peaks = _drawdown_duration_peaks(pd.Series(dd, index=index))
    equity_df = pd.DataFrame({"Equity": equity}, index=index)
    trades = trades_frame(result.trades)
    pl, returns, durations = trades["PnL"], trades["ReturnPct"], trades["Duration"]
    period = pd.Series(index[-100:]).diff().dropna().median() if len(index) > 1 else None

    def rounded(value: Any) -> Any:
        if not isinstance(value, pd.Timedelta) or period is None or pd.isna(period):
            return value
        return value.ceil(period.resolution_string)

    s: dict[str, Any] = {}
    s["Start"] = index[0]
    s["End"] = index[-1]
    s["Duration"] = s["End"] - s["Start"]
    have_position = np.repeat(0, len(index))
    for entry, exit_ in zip(trades["EntryIndex"], trades["ExitIndex"]):
        have_position[entry:exit_ + 1] = 1
    s["Exposure Time [%]"] = have_position.mean() * 100
    s["Equity Final [$]"] = equity[-1]
    s["Equity Peak [$]"] = equity.max()
    s["Commissions [$]"] = float(sum((t.commission for t in result.trades), Decimal(0)))
    s["Return [%]"] = (equity[-1] - equity[0]) / equity[0] * 100
    marks = _marks(result)
    warmup = min(max(int(getattr(result.strategy, "warmup_bars", 0) or 0), 0),
                 max(len(marks) - 1, 0))
    first = next((m for m in marks[warmup:] if not math.isnan(m)), math.nan)
    s["Buy & Hold Return [%]"] = (marks[-1] - first) / first * 100 if len(marks) else math.nan

    gmean_day_return = 0.0
    day_returns = np.array(np.nan)
    annual_trading_days = np.nan
    if period is not None and not pd.isna(period):
        freq_days = period.days
        have_weekends = index.day_of_week.to_series().between(5, 6).mean() > 2 / 7 * .6
        annual_trading_days = (52 if freq_days == 7 else 12 if freq_days == 31 else
                               1 if freq_days == 365 else (365 if have_weekends else 252))
        freq = {7: "W", 31: "ME", 365: "YE"}.get(freq_days, "D")
        day_returns = equity_df["Equity"].resample(freq).last().dropna().pct_change().dropna()
        gmean_day_return = _geometric_mean(day_returns)
    annualized_return = (1 + gmean_day_return) ** annual_trading_days - 1
    s["Return (Ann.) [%]"] = annualized_return * 100
    with np.errstate(invalid="ignore"):
        s["Volatility (Ann.) [%]"] = np.sqrt(
            (day_returns.var(ddof=int(bool(day_returns.shape))) + (1 + gmean_day_return) ** 2)
            ** annual_trading_days - (1 + gmean_day_return) ** (2 * annual_trading_days)) * 100
    years = (s["Duration"].days + s["Duration"].seconds / 86400) / 365.25
    s["CAGR [%]"] = ((equity[-1] / equity[0]) ** (1 / years) - 1) * 100 if years else np.nan
    s["Sharpe Ratio"] = (s["Return (Ann.) [%]"] - risk_free_rate * 100) / \
        (s["Volatility (Ann.) [%]"] or np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        s["Sortino Ratio"] = (annualized_return - risk_free_rate) / \
            (np.sqrt(np.mean(day_returns.clip(-np.inf, 0) ** 2)) * np.sqrt(annual_trading_days))
    max_dd = -np.nan_to_num(dd.max())
    s["Calmar Ratio"] = annualized_return / (-max_dd or np.nan)
    beta = np.nan
    c = np.asarray(marks, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        equity_log_returns = np.log(equity[1:] / equity[:-1])
        market_log_returns = np.log(c[1:] / c[:-1])
        if len(equity_log_returns) > 1 and len(market_log_returns) > 1:
            cov = np.cov(equity_log_returns, market_log_returns)
            beta = cov[0, 1] / cov[1, 1]
    s["Alpha [%]"] = s["Return [%]"] - risk_free_rate * 100 - \
        beta * (s["Buy & Hold Return [%]"] - risk_free_rate * 100)
    s["Beta"] = beta
    s["Max. Drawdown [%]"] = max_dd * 100
    s["Avg. Drawdown [%]"] = -dd_peaks.mean() * 100
    s["Max. Drawdown Duration"] = rounded(dd_dur.max())
    s["Avg. Drawdown Duration"] = rounded(dd_dur.mean())
    s["# Trades"] = n = len(trades)
    win_rate = np.nan if not n else (pl > 0).mean()
    s["Win Rate [%]"] = win_rate * 100
    s["Best Trade [%]"] = returns.max() * 100
    s["Worst Trade [%]"] = returns.min() * 100
    s["Avg. Trade [%]"] = _geometric_mean(returns) * 100
    s["Max. Trade Duration"] = rounded(durations.max())
    s["Avg. Trade Duration"] = rounded(durations.mean())
    s["Profit Factor"] = returns[returns > 0].sum() / (abs(returns[returns < 0].sum()) or np.nan)
    s["Expectancy [%]"] = returns.mean() * 100
    s["SQN"] = np.sqrt(n) * pl.mean() / (pl.std() or np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        s["Kelly Criterion"] = win_rate - (1 - win_rate) / (pl[pl > 0].mean() / -pl[pl < 0].mean())
    return s


def _marks(result: EngineResult) -> list[float]:
    return [float(m) if m is not None else math.nan for m in result.primary_marks]


def stats_json(stats: dict[str, Any]) -> dict[str, Any]:
    """Stats as JSON-able values: times ISO, durations as text, NaN as null."""
    out: dict[str, Any] = {}
    for key, value in stats.items():
        if isinstance(value, pd.Timestamp):
            out[key] = value.isoformat()
        elif isinstance(value, pd.Timedelta):
            out[key] = None if pd.isna(value) else str(value)
        elif value is None or (isinstance(value, float) and math.isnan(value)):
            out[key] = None
        elif isinstance(value, (np.integer, int)):
            out[key] = int(value)
        elif isinstance(value, (np.floating, float)):
            out[key] = None if math.isnan(float(value)) else float(value)
        elif pd.isna(value):
            out[key] = None
        else:
            out[key] = str(value)
    return out


# --------------------------------------------------------------------------- files


def plot_equity(result: EngineResult, path: Path, title: str = "") -> None:
    """The equity curve over the drawdown, as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    frame = equity_frame(result)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    try:
        top.plot(frame.index, frame["Equity"], color="#1f77b4", linewidth=0.9, label="equity")
        marks = np.array(_marks(result), dtype=float)
        if len(marks) and not np.all(np.isnan(marks)):
            first = marks[~np.isnan(marks)][0]
            top.plot(frame.index, marks / first * frame["Equity"].iloc[0], color="#999999",
                     linewidth=0.6, label=f"buy & hold {result.primary or ''}".strip())
        shown = frame["Equity"][frame["Equity"] > 0]
        if len(shown) and shown.max() / shown.min() > 20:  # e.g. a ruin next to a bull run
            top.set_yscale("log")
        top.set_ylabel("equity")
        top.set_title(title or "equity")
        top.legend(loc="upper left")
        top.grid(alpha=0.3)
        bottom.fill_between(frame.index, -frame["DrawdownPct"] * 100, 0, color="#d62728",
                            alpha=0.5, linewidth=0)
        bottom.set_ylabel("drawdown %")
        bottom.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def write_html(path: Path, title: str, stats: dict[str, Any], trades_text: str,
               png: Path | None) -> None:
    """A self-contained page: statistics, the chart (embedded) and the trade list."""
    import base64
    import html

    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in stats.items())
    image = ""
    if png is not None and png.exists():
        data = base64.b64encode(png.read_bytes()).decode()
        image = f'<img alt="equity and drawdown" src="data:image/png;base64,{data}">'
    lines = list(csv.reader(io.StringIO(trades_text)))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in lines[0]) if lines else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>"
                   for line in lines[1:])
    path.write_text(
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font:14px sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}"
        "th{text-align:left}</style>"
        f"<h1>{html.escape(title)}</h1>{image}<h2>Statistics</h2><table>{rows}</table>"
        f"<h2>Trades</h2><table><tr>{head}</tr>{body}</table>")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}"
    return str(value)


class OutputDir:
    """Writes into a temporary directory beside ``target`` and renames it into place on
    :meth:`commit`, so ``target`` is either absent or complete. A ``target`` that exists
    and is not empty is refused up front."""

    def __init__(self, target: str | os.PathLike) -> None:
        self.target = Path(target)
        if self.target.exists() and (not self.target.is_dir() or any(self.target.iterdir())):
            raise PipelineError(f"{self.target} exists and is not empty: choose a new output "
                                "directory or delete it")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-",
                                          dir=self.target.parent))

    def commit(self) -> Path:
        if self.target.exists():
            self.target.rmdir()  # empty (checked above)
        os.rename(self.path, self.target)
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def write_outputs(directory: Path, result: EngineResult, stats: dict[str, Any],
                  summary: dict[str, Any], title: str, html: bool = False) -> dict[str, Path]:
    """trades.csv, equity.csv, stats.json (with ``summary``), equity.png [, report.html]."""
    files = {}
    trades_text = trades_csv(result.trades)
    files["trades"] = directory / "trades.csv"
    files["trades"].write_text(trades_text)
    files["equity"] = directory / "equity.csv"
    with files["equity"].open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("time", "equity"))
        for label, value in zip(result.equity_labels_ms, result.equity):
            writer.writerow((_iso(label), value))
    files["stats"] = directory / "stats.json"
    files["stats"].write_text(json.dumps({"summary": summary, "stats": stats_json(stats)},
                                         indent=2, default=str) + "\n")
    files["png"] = directory / "equity.png"
    plot_equity(result, files["png"], title)
    if html:
        files["html"] = directory / "report.html"
        write_html(files["html"], title, stats, trades_text, files["png"])
    return files
