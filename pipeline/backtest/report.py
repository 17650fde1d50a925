"""The numbers traders expect from a backtest, the trade list, and the equity curve.

:func:`compute_stats` computes, under backtesting.py's own labels and with its
definitions (``backtesting/_stats.py``, 0.6.x), from the equity points and the closed
trades of an :class:`~pipeline.backtest.engine.EngineResult`:

* **Start / End / Duration**: first and last equity point (bars are labelled with their
  start, as backtesting.py's data index; book replays are sampled every ``sample_ms``);
* **Exposure Time [%]**: share of equity points from a trade's entry point to its exit
  point (inclusive), i.e. "in bars", not in clock time;
* **Equity Final / Peak [$]**, **Return [%]** (final over first point);
* **Buy & Hold Return [%]**: the equal-weight combination of the symbols the strategy
  traded (:func:`traded_symbols`; the first symbol replayed when it traded none), i.e. the
  mean of each symbol's return from its first mark at or after the strategy's
  ``warmup_bars``-th point to its last mark, marked to the prices the backtest used (bar
  closes; book mids for book fills). With one symbol this is backtesting.py's figure (it
  starts after its indicators' warm-up); :func:`buy_and_hold` gives the per-symbol figures;
* **Return (Ann.) [%]**: the geometric mean of daily returns (equity resampled to the
  last value per UTC day; weekly/monthly/yearly for such data), compounded over 365 days
  a year when the data has weekends, else 252; **Volatility (Ann.) [%]**: backtesting.py's
  compounding formula ``sqrt((var + (1+g)^2)^N - (1+g)^(2N))`` of the daily returns;
  **CAGR [%]** over the calendar duration;
* **Sharpe Ratio** = annual return / annual volatility (risk-free rate 0); **Sortino
  Ratio** = annual return / (root mean square of negative daily returns · √N); **Calmar
  Ratio** = annual return / max drawdown;
* **Alpha [%] / Beta**: Jensen's alpha and the beta of per-point log returns against the
  buy & hold (the traded symbol's marks; the equal-weight combination for several);
* **Max. / Avg. Drawdown [%]** (drawdown = 1 − equity / running peak; the average is over
  drawdown periods' peaks) and their **Durations** (from a peak to recovery, or to the
  end), rounded up to the data's resolution;
* **# Trades**, **Win Rate [%]** (trades with P&L > 0), **Best / Worst Trade [%]**,
  **Avg. Trade [%]** (geometric mean of trade returns), **Max. / Avg. Trade Duration**;
* **Profit Factor**: sum of winning trades' returns over the absolute sum of losing
  trades' returns (backtesting.py uses returns, not cash P&L); **Expectancy [%]**: mean
  trade return; **SQN**: √n · mean P&L / std P&L; **Kelly Criterion**;
* **Commissions [$]**: entry plus exit commissions of the closed trades.

Beyond backtesting.py's figures, the stats say what they cover: **Symbols** (traded),
**Buy & Hold Of** (symbols and prices), **Span**, **Gaps** and **Time in Gaps**
(:func:`find_gaps`); :func:`symbol_breakdown` gives trades, fills, P&L, fees and exposure
per symbol. For a run shorter than a day the annualized figures (:data:`ANNUALIZED`) are
empty (NaN, null in ``stats.json``) and :func:`notes` says why.

**Gaps.** A gap is a stretch between two consecutive equity points (taken at each bar, or
at each ``sample_ms`` cell in which a market event arrived) longer than
``max(GAP_FACTOR x the median spacing of the points, GAP_FLOOR_MS)``: 5 x and 60 s, so a
missing hourly bar or two is not a gap but five hours without a bar are, and a book replay
sampled every second has a gap after a minute with no market event at all. The plot breaks
its lines there instead of drawing a ramp, and the stats list them.

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

from pipeline.backtest.engine import EngineResult
from pipeline.core.errors import PipelineError
from pipeline.trading.accounting import TRADE_COLUMNS, ClosedTrade

#: The statistics backtesting.py computes the same way (the parity test compares these).
COMPARABLE = ("Start", "End", "Duration", "Exposure Time [%]", "Equity Final [$]",
              "Equity Peak [$]", "Commissions [$]", "Return [%]", "Buy & Hold Return [%]",
              "Return (Ann.) [%]", "Volatility (Ann.) [%]", "CAGR [%]", "Sharpe Ratio",
              "Sortino Ratio", "Calmar Ratio", "Alpha [%]", "Beta", "Max. Drawdown [%]",
              "Avg. Drawdown [%]", "Max. Drawdown Duration", "Avg. Drawdown Duration",
              "# Trades", "Win Rate [%]", "Best Trade [%]", "Worst Trade [%]",
              "Avg. Trade [%]", "Max. Trade Duration", "Avg. Trade Duration", "Profit Factor",
              "Expectancy [%]", "SQN", "Kelly Criterion")


#: Annualized figures: empty (NaN) for a run shorter than a day, see :func:`notes`.
ANNUALIZED = ("Return (Ann.) [%]", "Volatility (Ann.) [%]", "CAGR [%]", "Sharpe Ratio",
              "Sortino Ratio", "Calmar Ratio")
#: A gap: consecutive equity points further apart than max(GAP_FACTOR x the median spacing,
#: GAP_FLOOR_MS) (see the module doc).
GAP_FACTOR = 5
GAP_FLOOR_MS = 60_000
SHORT_RUN_NOTE = ("n/a: the run spans less than a day; annualized figures need daily "
                  "returns")


def gap_threshold_ms(labels_ms: list[int]) -> int:
    """The spacing of equity points above which they are a gap (see the module doc)."""
    if len(labels_ms) < 2:
        return GAP_FLOOR_MS
    median = float(np.median(np.diff(np.asarray(labels_ms, dtype="int64"))))
    return max(int(GAP_FACTOR * median), GAP_FLOOR_MS)


def find_gaps(labels_ms: list[int]) -> list[tuple[int, int]]:
    """The gaps of the equity points: ``(last point before, first point after)`` in ms,
    in order; pure, so the plot and the stats agree on them."""
    threshold = gap_threshold_ms(labels_ms)
    return [(a, b) for a, b in zip(labels_ms, labels_ms[1:]) if b - a > threshold]


def traded_symbols(result: EngineResult) -> list[str]:
    """The symbols the strategy traded (closed trades, open lots, fills), sorted; the first
    symbol replayed (``primary``) when it traded none."""
    symbols = {t.symbol for t in result.trades} | {lot.symbol for lot in result.open_lots} \
        | {s for s, n in result.fill_count.items() if n}
    if symbols:
        return sorted(symbols)
    return [result.primary] if result.primary is not None else []


def mark_source(result: EngineResult) -> str:
    """What the marks are: the prices the backtest valued positions at."""
    return "book mid" if result.fill == "book" else "bar close"


def _warmup(result: EngineResult) -> int:
    return min(max(int(getattr(result.strategy, "warmup_bars", 0) or 0), 0),
               max(len(result.equity_labels_ms) - 1, 0))


def _marks_of(result: EngineResult, symbol: str) -> list[Decimal | None]:
    """A symbol's mark at each equity point (the primary's own marks when none recorded)."""
    marks = result.marks.get(symbol)
    if not marks and symbol == result.primary:
        marks = result.primary_marks
    return list(marks or [])


def _series(result: EngineResult, symbol: str) -> np.ndarray:
    marks = _marks_of(result, symbol)
    n = len(result.equity_labels_ms)
    values = [float(m) if m is not None else math.nan for m in marks]
    return np.array(values + [math.nan] * (n - len(values)), dtype=float)


def buy_and_hold(result: EngineResult) -> dict[str, dict[str, Any]]:
    """Per traded symbol: buying at its first mark at or after the warm-up point and
    holding to its last mark: ``first``/``last`` (exact Decimals), their times (ms) and the
    return in percent (float, as the statistics)."""
    out: dict[str, dict[str, Any]] = {}
    start = _warmup(result)
    labels = result.equity_labels_ms
    for symbol in traded_symbols(result):
        marks = _marks_of(result, symbol)
        known = [(i, m) for i, m in enumerate(marks) if m is not None]
        after = [(i, m) for i, m in known if i >= start]
        if not after:
            out[symbol] = {"first": None, "last": None, "first_ms": None, "last_ms": None,
                           "return_pct": math.nan}
            continue
        (i0, first), (i1, last) = after[0], known[-1]
        out[symbol] = {"first": first, "last": last, "first_ms": labels[i0],
                       "last_ms": labels[i1],
                       "return_pct": (float(last) - float(first)) / float(first) * 100}
    return out


def buy_and_hold_curve(result: EngineResult) -> np.ndarray:
    """The equal-weight buy & hold of the traded symbols at each equity point, in percent
    from its start (NaN before every symbol has a mark after the warm-up)."""
    start = _warmup(result)
    curves = []
    for symbol in traded_symbols(result):
        c = _series(result, symbol)
        c[:start] = math.nan
        valid = np.flatnonzero(~np.isnan(c))
        if not len(valid):
            return np.full(len(result.equity_labels_ms), math.nan)
        curves.append(c / c[valid[0]] - 1)
    if not curves:
        return np.full(len(result.equity_labels_ms), math.nan)
    return np.mean(curves, axis=0) * 100


def symbol_breakdown(result: EngineResult) -> dict[str, dict[str, Any]]:
    """Per traded symbol: closed trades, fills, P&L (realized after fees, plus the open lots
    at the final marks; exact), fees (closed trades' commissions plus open lots' entry fees;
    exact), Exposure Time [%] (share of equity points inside one of its trades, as the
    total's) and its buy & hold return."""
    n = max(len(result.equity_labels_ms), 1)
    holds = buy_and_hold(result)
    out: dict[str, dict[str, Any]] = {}
    for symbol in traded_symbols(result):
        trades = [t for t in result.trades if t.symbol == symbol]
        lots = [lot for lot in result.open_lots if lot.symbol == symbol]
        pnl = result.realized.get(symbol, Decimal(0))
        mark = result.final_marks.get(symbol)
        if mark is not None:
            pnl += sum((lot.size * (mark - lot.entry_price) for lot in lots), Decimal(0))
        fees = sum((t.commission for t in trades), Decimal(0)) + \
            sum((lot.entry_fee for lot in lots if lot.entry_fee is not None), Decimal(0))
        held = np.zeros(n, dtype=bool)
        for t in trades:
            held[t.entry_index:t.exit_index + 1] = True
        for lot in lots:
            held[lot.entry_index:] = True
        out[symbol] = {"trades": len(trades), "fills": result.fill_count.get(symbol, 0),
                       "pnl": pnl, "fees": fees, "exposure_pct": float(held.mean() * 100),
                       "open_size": sum((lot.size for lot in lots), Decimal(0)),
                       "buy_and_hold_pct": holds.get(symbol, {}).get("return_pct", math.nan)}
    return out


def coverage(result: EngineResult) -> dict[str, Any]:
    """What the statistics cover: symbols, span, the gap rule and the gaps."""
    labels = result.equity_labels_ms
    gaps = find_gaps(labels)
    return {
        "symbols": traded_symbols(result),
        "buy_and_hold": f"equal-weight {' + '.join(traded_symbols(result)) or '-'} "
                        f"({mark_source(result)}), from equity point {_warmup(result)}",
        "start": _iso(labels[0]) if labels else None,
        "end": _iso(labels[-1]) if labels else None,
        "gap_rule": f"equity points more than max({GAP_FACTOR} x median spacing, "
                    f"{GAP_FLOOR_MS // 1000} s) = {gap_threshold_ms(labels) / 1000:g} s apart",
        "gaps": [{"start": _iso(a), "end": _iso(b), "duration": str(pd.Timedelta(b - a,
                                                                              unit="ms"))}
                 for a, b in gaps],
    }


def notes(stats: dict[str, Any]) -> dict[str, str]:
    """Why a figure is empty, by label (the annualized ones of a run shorter than a day)."""
    duration = stats.get("Duration")
    if isinstance(duration, pd.Timedelta) and duration < pd.Timedelta(days=1):
        return {key: SHORT_RUN_NOTE for key in ANNUALIZED if key in stats}
    return {}


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
    holds = buy_and_hold(result)
    s["Buy & Hold Return [%]"] = float(np.mean([h["return_pct"] for h in holds.values()])) \
        if holds else math.nan

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
    symbols = traded_symbols(result)
    if len(symbols) == 1:  # the symbol's own marks (backtesting.py's Close)
        c = _series(result, symbols[0])
    else:  # the equal-weight combination, as a level
        c = buy_and_hold_curve(result) / 100 + 1
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
    if s["Duration"] < pd.Timedelta(days=1):  # nothing to annualize (see notes())
        for key in ANNUALIZED:
            s[key] = np.nan
    cover = coverage(result)
    gaps = find_gaps(result.equity_labels_ms)
    s["Symbols"] = ", ".join(cover["symbols"])
    s["Buy & Hold Of"] = cover["buy_and_hold"]
    s["Span"] = f"{cover['start']} to {cover['end']}"
    s["Gaps"] = len(gaps)
    s["Time in Gaps"] = pd.Timedelta(sum(b - a for a, b in gaps), unit="ms")
    return s


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


def plot_frame(result: EngineResult) -> pd.DataFrame:
    """What the equity plot draws, by time: ``equity`` (currency), ``return_pct`` (of the
    first point), ``drawdown_pct`` (negative), ``buy_hold_pct`` (:func:`buy_and_hold_curve`),
    with one all-NaN row in the middle of each gap (:func:`find_gaps`) so the lines break
    there instead of ramping across it. ``equity_plot.csv`` is this frame."""
    frame = equity_frame(result)
    equity = frame["Equity"].to_numpy()
    data = pd.DataFrame({
        "equity": equity,
        "return_pct": (equity / equity[0] - 1) * 100 if len(equity) else equity,
        "drawdown_pct": -frame["DrawdownPct"].to_numpy() * 100 + 0.0,  # no -0.0
        "buy_hold_pct": buy_and_hold_curve(result),
    }, index=frame.index)
    gaps = find_gaps(result.equity_labels_ms)
    if gaps:
        breaks = pd.DataFrame(math.nan, columns=data.columns,
                              index=_index([(a + b) // 2 for a, b in gaps]))
        data = pd.concat([data, breaks]).sort_index(kind="stable")
    data.index.name = "time"
    return data


def plot_equity(result: EngineResult, path: Path, title: str = "") -> pd.DataFrame:
    """The strategy's equity (currency on the left, return in percent on the right, scaled
    to the equity alone), the buy & hold of the traded symbols in percent in its own panel
    (its swings do not flatten the equity), and the drawdown; lines break at gaps, which
    are shaded. Returns the plotted :func:`plot_frame`."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    data = plot_frame(result)
    gaps = find_gaps(result.equity_labels_ms)
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(11, 7.5), sharex=True,
                                              gridspec_kw={"height_ratios": [3, 1.5, 1]})
    try:
        start = float(data["equity"].dropna().iloc[0])
        axis = _GapAxis(result.equity_labels_ms, gaps)
        x = axis.x(data.index.as_unit("ms").asi8)
        top.plot(x, data["equity"], color="#1f77b4", linewidth=0.9, label="equity")
        shown = data["equity"][data["equity"] > 0]
        if len(shown) and shown.max() / shown.min() > 20:  # e.g. a ruin next to a bull run
            top.set_yscale("log")
        else:
            top.ticklabel_format(axis="y", useOffset=False, style="plain")
        digits = _digits(data["equity"])
        top.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.{digits}f}"))
        top.set_ylabel("equity")
        right = top.twinx()  # the same scale and limits, its ticks read as percent
        right.set_yscale(top.get_yscale())
        right.set_ylim(top.get_ylim())
        pct_digits = _digits(data["return_pct"])
        right.yaxis.set_major_formatter(FuncFormatter(
            lambda v, _: f"{(v / start - 1) * 100:+.{pct_digits}f}%"))
        right.set_ylabel("return %")
        final = data["return_pct"].dropna()
        top.set_title(title or "equity")
        top.legend([f"equity ({final.iloc[-1]:+.3g}% at the end)" if len(final) else
                    "equity"], loc="upper left")
        symbols = traded_symbols(result)
        label = f"buy & hold {' + '.join(symbols)} ({mark_source(result)}"
        label += ", equal weight)" if len(symbols) > 1 else ")"
        bh = data["buy_hold_pct"].dropna()
        if len(bh):
            middle.plot(x, data["buy_hold_pct"], color="#7f7f7f", linewidth=0.8,
                        label=f"{label}: {bh.iloc[-1]:+.4g}%")
            middle.legend(loc="upper left")
        bh_digits = _digits(data["buy_hold_pct"])
        middle.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:+.{bh_digits}f}%"))
        middle.set_ylabel("buy & hold %")
        bottom.fill_between(x, data["drawdown_pct"], 0, color="#d62728", alpha=0.5,
                            linewidth=0)
        dd_digits = _digits(data["drawdown_pct"])
        bottom.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.{dd_digits}f}%"))
        bottom.set_ylabel("drawdown %")
        for ax in (top, middle, bottom):
            ax.grid(alpha=0.3)
            for a, b in gaps:
                ax.axvspan(*axis.x(np.array([a, b])), color="#cccccc", alpha=0.5,
                           linewidth=0)
        for a, b in gaps[:20]:
            middle.annotate(f"{pd.Timedelta(b - a, unit='ms')} without data".replace(
                "0 days ", ""), (float(axis.x(np.array([(a + b) // 2]))[0]), 0.5),
                xycoords=("data", "axes fraction"), rotation=90, ha="center", va="center",
                fontsize=7, color="#555555")
        bottom.xaxis.set_major_locator(MaxNLocator(8))
        bottom.xaxis.set_major_formatter(FuncFormatter(lambda v, _: axis.label(v)))
        if gaps:
            bottom.set_xlabel(f"UTC; shaded: gaps (no market event for over "
                              f"{gap_threshold_ms(result.equity_labels_ms) / 1000:g} s), "
                              "drawn narrower than their length")
        fig.autofmt_xdate()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return data


class _GapAxis:
    """The plot's x axis: time in ms, with each gap drawn at most a few percent of the
    covered time wide (a 30-minute pause beside 2 minutes of data would otherwise squeeze
    the data to the edges); :meth:`label` gives a position's real UTC time."""

    def __init__(self, labels_ms: list[int], gaps: list[tuple[int, int]]) -> None:
        span = (labels_ms[-1] - labels_ms[0]) if labels_ms else 0
        covered = span - sum(b - a for a, b in gaps)
        self.real = [labels_ms[0] if labels_ms else 0]
        self.drawn = [0.0]
        for a, b in gaps:
            before = self.drawn[-1] + (a - self.real[-1])
            self.real += [a, b]
            self.drawn += [before, before + min(b - a, max(0.03 * covered, 1.0))]
        self.real.append(labels_ms[-1] if labels_ms else 0)
        self.drawn.append(self.drawn[-1] + (self.real[-1] - self.real[-2]))
        self.span = span

    def x(self, ms: np.ndarray) -> np.ndarray:
        return np.interp(np.asarray(ms, dtype=float), self.real, self.drawn)

    def label(self, drawn: float) -> str:
        when = pd.Timestamp(int(np.interp(drawn, self.drawn, self.real)), unit="ms")
        fmt = "%Y-%m-%d" if self.span > 4 * 86_400_000 else \
            "%m-%d %H:%M" if self.span > 3_600_000 else "%H:%M:%S"
        return when.strftime(fmt)


def _digits(values: pd.Series) -> int:
    """Decimals that tell a panel's ticks apart (its range over about five ticks)."""
    values = values.dropna()
    span = float(values.max() - values.min()) if len(values) else 0.0
    if not span or not math.isfinite(span):
        return 2
    return min(max(1 - math.floor(math.log10(span / 5)), 0), 10) if span < 500 else 0


def plot_csv(data: pd.DataFrame) -> str:
    """:func:`plot_frame` as CSV (ISO times, NaN where the lines break)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("time", *data.columns))
    for when, row in zip(data.index, data.itertuples(index=False)):
        writer.writerow((_iso(int(when.value // 1_000_000)),
                         *("NaN" if math.isnan(v) else repr(float(v)) for v in row)))
    return out.getvalue()


def stats_rows(stats: dict[str, Any]) -> list[tuple[str, str]]:
    """The statistics as (label, text) for a table: an empty figure shows why
    (:func:`notes`) instead of ``None``."""
    why = notes(stats)
    shown = stats_json(stats)
    return [(key, why[key] if key in why and shown[key] is None else
             "n/a" if shown[key] is None else _fmt(stats[key]) if isinstance(
                 shown[key], float) else str(shown[key])) for key in shown]


def breakdown_json(result: EngineResult) -> dict[str, dict[str, Any]]:
    """:func:`symbol_breakdown` with :func:`buy_and_hold`'s prices, JSON-able (exact
    decimals as text)."""
    holds = buy_and_hold(result)
    out = {}
    for symbol, row in symbol_breakdown(result).items():
        hold = holds.get(symbol, {})
        out[symbol] = {
            "trades": row["trades"], "fills": row["fills"], "pnl": str(row["pnl"]),
            "fees": str(row["fees"]), "exposure_pct": row["exposure_pct"],
            "open_size": str(row["open_size"]),
            "buy_and_hold_pct": None if math.isnan(row["buy_and_hold_pct"]) else
            row["buy_and_hold_pct"],
            "buy_and_hold_first": None if hold.get("first") is None else str(hold["first"]),
            "buy_and_hold_last": None if hold.get("last") is None else str(hold["last"]),
            "buy_and_hold_from": None if hold.get("first_ms") is None else _iso(hold["first_ms"]),
            "buy_and_hold_to": None if hold.get("last_ms") is None else _iso(hold["last_ms"]),
        }
    return out


def breakdown_columns(result: EngineResult) -> dict[str, Any]:
    """:func:`symbol_breakdown` as flat columns (``FILUSD Trades``, ``FILUSD PnL``, ...)
    for a sweep's table; exact decimals as text."""
    out: dict[str, Any] = {}
    for symbol, row in symbol_breakdown(result).items():
        out[f"{symbol} Trades"] = row["trades"]
        out[f"{symbol} PnL"] = str(row["pnl"])
        out[f"{symbol} Fees"] = str(row["fees"])
        out[f"{symbol} Exposure Time [%]"] = row["exposure_pct"]
        out[f"{symbol} Buy & Hold Return [%]"] = row["buy_and_hold_pct"]
    return out


def write_html(path: Path, title: str, stats: dict[str, Any], trades_text: str,
               png: Path | None, result: EngineResult | None = None) -> None:
    """A self-contained page: the interactive chart of ``result``
    (:func:`pipeline.backtest.report_interactive.backtest_figure`: prices with the trades, equity,
    drawdown; plotly.js inline), the statistics (with what they cover: gaps, per symbol)
    and the trade list. Hooks for tools and tests: ``<div id="chart" data-trades="N">``
    (N closed trades), ``<script id="figure" type="application/json">`` (the figure),
    ``<table id="stats">``, ``<table id="trades">``; plotly.js is ``<script
    id="plotlyjs">``. Without ``result`` the chart is the ``png`` (embedded), as before."""
    import base64
    import html

    from pipeline.backtest import report_interactive

    def table(head: list[str], rows: list[list[Any]]) -> str:
        return ("<table><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in head)
                + "</tr>" + "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>"
                                                      for c in row) + "</tr>" for row in rows)
                + "</table>")

    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                   for k, v in stats_rows(stats))
    extra = ""
    if result is not None:
        cover = coverage(result)
        extra += (f"<h2>Coverage</h2><p>Symbols: {html.escape(', '.join(cover['symbols']))}; "
                  f"buy &amp; hold: {html.escape(cover['buy_and_hold'])}; from "
                  f"{html.escape(str(cover['start']))} to {html.escape(str(cover['end']))}; "
                  f"a gap is {html.escape(cover['gap_rule'])}.</p>")
        extra += table(["gap start", "gap end", "duration"],
                       [[g["start"], g["end"], g["duration"]] for g in cover["gaps"]]) \
            if cover["gaps"] else "<p>No gaps.</p>"
        per = breakdown_json(result)
        extra += "<h2>Per symbol</h2>" + table(
            ["symbol", "trades", "fills", "P&L", "fees", "exposure time %", "buy & hold %",
             "open size"],
            [[sym, r["trades"], r["fills"], r["pnl"], r["fees"], f"{r['exposure_pct']:.2f}",
              "n/a" if r["buy_and_hold_pct"] is None else f"{r['buy_and_hold_pct']:+.4f}",
              r["open_size"]] for sym, r in per.items()])
    lines = list(csv.reader(io.StringIO(trades_text)))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in lines[0]) if lines else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>"
                   for line in lines[1:])
    tables = (f"<h2>Statistics</h2><table id=\"stats\">{rows}</table>{extra}"
              f"<h2>Trades</h2><table id=\"trades\"><tr>{head}</tr>{body}</table>")
    if result is not None:
        path.write_text(report_interactive.page(
            title, report_interactive.backtest_figure(result), tables,
            chart_attrs={"data-trades": len(result.trades)},
            script=report_interactive.autoscale_script()))
        return
    image = ""
    if png is not None and png.exists():
        data = base64.b64encode(png.read_bytes()).decode()
        image = f'<img alt="equity and drawdown" src="data:image/png;base64,{data}">'
    path.write_text(
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font:14px sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}"
        "th{text-align:left}</style>"
        f"<h1>{html.escape(title)}</h1>{image}{tables}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value and abs(value) < 0.01:  # a tiny return is not "-0.0000"
            return f"{value:.4g}"
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
    """trades.csv, equity.csv, stats.json (with ``summary``, ``notes``, ``coverage`` and
    ``per_symbol``), equity.png and the data it draws (equity_plot.csv) [, report.html]."""
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
    files["stats"].write_text(json.dumps({
        "summary": summary, "stats": stats_json(stats), "notes": notes(stats),
        "coverage": coverage(result), "per_symbol": breakdown_json(result)},
        indent=2, default=str) + "\n")
    files["png"] = directory / "equity.png"
    plotted = plot_equity(result, files["png"], title)
    files["plot"] = directory / "equity_plot.csv"
    files["plot"].write_text(plot_csv(plotted))
    if html:
        files["html"] = directory / "report.html"
        write_html(files["html"], title, stats, trades_text, files["png"], result)
    return files
