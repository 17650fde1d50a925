"""The live equity curve of one strategy, from the ``portfolio.pnl`` Parquet copy.

:func:`plot_live` draws what :func:`pipeline.sinks.pnl.read_pnl` returns for a strategy:
``equity.png`` (equity with the return on capital, over the drawdown), ``equity.html``
(the chart embedded, plus a few figures) and ``equity.csv`` (the plotted series).

**Breaks, not interpolation.** A row without equity (a mark was missing: the record is
stale) is not a point: the line stops before it and starts again after it. A gap longer
than ``gap_s`` between two consecutive records (the pipeline was idle or stopped) breaks
the line too, so a straight segment never claims values nobody computed. In the CSV a
stale row is a row with ``NaN`` at its own time; a gap is an extra ``NaN`` row halfway
between the two records. Equity and drawdown in the CSV are the exact decimals.

Conventions are :mod:`pipeline.backtest.report`'s: matplotlib on the Agg backend, naive UTC times
on the x axis, one self-contained HTML page with the PNG as a data URI.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.backtest.report import _iso
from pipeline.core.decimals import plain
from pipeline.core.errors import PipelineError

#: What the CSV holds, in order.
CSV_COLUMNS = ("time", "equity", "drawdown")


def plot_live(frame: pd.DataFrame, strategy_id: str, out_dir: Path,
              gap_s: float = 60.0) -> dict[str, Path]:
    """Writes ``equity.png``, ``equity.html`` and ``equity.csv`` for ``strategy_id``'s rows
    of ``frame`` (``read_pnl``'s columns; other strategies' rows are ignored) into
    ``out_dir``, and returns their paths under ``png``, ``html`` and ``csv``.

    Raises :class:`PipelineError` when the strategy has no row, or no row with equity
    (nothing could be drawn: every mark was missing)."""
    rows = _rows_of(frame, strategy_id)
    series = _series(rows, gap_s)
    stats = _stats(rows, strategy_id)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"png": out_dir / "equity.png", "html": out_dir / "equity.html",
             "csv": out_dir / "equity.csv"}
    _write_csv(files["csv"], series)
    title = f"{strategy_id}: live equity ({stats['currency']})"
    image = _plot(series, title, stats["currency"], stats["_capital"])
    files["png"].write_bytes(image)
    _write_html(files["html"], title, stats, image)
    return files


def _rows_of(frame: pd.DataFrame, strategy_id: str) -> pd.DataFrame:
    """The strategy's rows in seq order, with ``ms`` (int epoch milliseconds) added."""
    rows = frame[frame["strategy"] == strategy_id] if len(frame) else frame.iloc[0:0]
    if not len(rows):
        raise PipelineError(f"no PnL rows for strategy {strategy_id!r}: check the id, or "
                            "that the portfolio consumer group has written any for it")
    rows = rows.sort_values("seq", ignore_index=True)
    if rows["equity"].isna().all():
        raise PipelineError(f"strategy {strategy_id!r} has {len(rows)} PnL rows but all are "
                            "stale (no equity: a mark was missing), nothing to plot")
    times = pd.to_datetime(rows["event_time"], utc=True)
    rows = rows.assign(ms=(times - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1))
    return rows


def _series(rows: pd.DataFrame, gap_s: float) -> list[tuple[int, Decimal | None,
                                                             Decimal | None]]:
    """(ms, equity, drawdown) per row, None at stale rows, plus a (midpoint, None, None)
    break between two records more than ``gap_s`` apart: the plotted series, exactly."""
    out: list[tuple[int, Decimal | None, Decimal | None]] = []
    previous: int | None = None
    for ms, equity, drawdown in zip(rows["ms"], rows["equity"], rows["drawdown"]):
        ms = int(ms)
        if previous is not None and ms - previous > gap_s * 1000:
            out.append(((previous + ms) // 2, None, None))
        equity = None if _missing(equity) else equity
        drawdown = None if equity is None or _missing(drawdown) else drawdown
        out.append((ms, equity, drawdown))
        previous = ms
    return out


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or \
        (isinstance(value, Decimal) and value.is_nan()) or value is pd.NA


def _last(rows: pd.DataFrame, column: str) -> Any:
    """The column's last non-null value (stale rows may lack some figures), else None."""
    values = rows[column].dropna()
    return values.iloc[-1] if len(values) else None


def _stats(rows: pd.DataFrame, strategy_id: str) -> dict[str, Any]:
    """The table's figures, as display text (exact decimals); ``_capital`` is for the
    return axis."""
    currency = _last(rows, "currency") or ""
    priced = rows[rows["equity"].notna()]
    capital = _last(priced, "capital")
    last_equity = priced["equity"].iloc[-1]
    drawdowns = priced["drawdown"].dropna()
    max_dd = max(drawdowns) if len(drawdowns) else None
    pcts = priced["drawdown_pct"].dropna()
    max_pct = max(pcts) if len(pcts) else None

    def money(value: Any) -> str:
        return "n/a" if value is None else f"{plain(value)} {currency}".strip()

    ret = ""
    if capital:
        ret = f" ({plain(((last_equity - capital) / capital * 100).quantize(Decimal('0.01')))}%)"
    stale = int((rows["stale"].fillna(False).astype(bool) | rows["equity"].isna()).sum())
    return {
        "currency": currency,
        "Strategy": strategy_id,
        "First time": _iso(int(rows["ms"].iloc[0])),
        "Last time": _iso(int(rows["ms"].iloc[-1])),
        "Rows": str(len(rows)),
        "Capital": money(capital),
        "Last equity": money(last_equity) + ret,
        "Last equity time": _iso(int(priced["ms"].iloc[-1])),
        "Realized PnL": money(_last(rows, "realized_pnl")),
        "Fees": money(_last(rows, "fees")),
        "Max drawdown": money(max_dd) + ("" if max_pct is None else
                                         f" ({plain((max_pct * 100).quantize(Decimal('0.01')))}%)"),
        "Fills": str(int(_last(rows, "fills") or 0)),
        "Stale rows": str(stale),
        "Halted": "yes" if bool(rows["halted"].iloc[-1]) else "no",
        "_capital": None if capital is None else float(capital),
    }


def _write_csv(path: Path, series: list[tuple[int, Decimal | None, Decimal | None]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for ms, equity, drawdown in series:
            writer.writerow((_iso(ms), "NaN" if equity is None else plain(equity),
                             "NaN" if drawdown is None else plain(drawdown)))


def _plot(series: list[tuple[int, Decimal | None, Decimal | None]], title: str,
          currency: str, capital: float | None) -> bytes:
    """The PNG: equity (return on capital on the right axis) over the drawdown, filled
    downward. Returned, not saved, so the HTML embeds these bytes without reading back."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    times = pd.to_datetime(np.array([s[0] for s in series], dtype="int64"), unit="ms")
    equity = np.array([math.nan if s[1] is None else float(s[1]) for s in series])
    drawdown = np.array([math.nan if s[2] is None else float(s[2]) for s in series])
    # A point with a break on both sides draws no line segment: mark it so it shows.
    valid = ~np.isnan(equity)
    before = np.r_[False, valid[:-1]]
    after = np.r_[valid[1:], False]
    alone = valid & ~before & ~after
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    try:
        top.plot(times, equity, color="#1f77b4", linewidth=0.9, label="equity")
        if alone.any():
            top.plot(times[alone], equity[alone], ".", color="#1f77b4", markersize=4)
        top.set_ylabel(f"equity {currency}".strip())
        top.set_title(title)
        top.grid(alpha=0.3)
        if capital:
            right = top.secondary_yaxis(
                "right", functions=(lambda e: (e - capital) / capital * 100,
                                    lambda r: capital + r / 100 * capital))
            right.set_ylabel("return % of capital")
        bottom.fill_between(times, -drawdown, 0, color="#d62728", alpha=0.5, linewidth=0)
        bottom.plot(times, -drawdown, color="#d62728", linewidth=0.6)
        if alone.any():
            bottom.plot(times[alone], -drawdown[alone], ".", color="#d62728", markersize=3)
        bottom.set_ylabel(f"drawdown {currency}".strip())
        bottom.set_xlabel("time (UTC)")
        bottom.grid(alpha=0.3)
        fig.tight_layout()
        out = io.BytesIO()
        fig.savefig(out, format="png", dpi=100)
        return out.getvalue()
    finally:
        plt.close(fig)


def _write_html(path: Path, title: str, stats: dict[str, Any], png: bytes) -> None:
    """One self-contained page (report.py's style): the chart as a data URI, the figures."""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in stats.items() if k != "currency" and not k.startswith("_"))
    data = base64.b64encode(png).decode()
    path.write_text(
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font:14px sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}"
        "th{text-align:left}</style>"
        f"<h1>{html.escape(title)}</h1>"
        f'<img alt="equity and drawdown" src="data:image/png;base64,{data}">'
        f"<h2>Statistics</h2><table>{rows}</table>\n")
