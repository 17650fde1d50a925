"""The interactive backtest report: Plotly figures of a backtest and of a sweep, and the
self-contained pages that draw them (plotly.js inlined from the plotly wheel: nothing is
fetched, nothing is built).

:func:`backtest_figure` has rows sharing one time axis (zoom or pan one, all follow; the
page rescales each row's y axis to what is in view):

* per symbol traded (the first replayed when none was), its prices: the candles of the bars
  the run consumed (``EngineResult.bars``, next-open fills), or the marks the backtest
  valued positions at (book mids for book fills, :func:`pipeline.backtest.report.mark_source`) as a
  line; on it the closed trades as two traces named ``entries`` and ``exits`` (one pair per
  symbol, in the symbol's legend group so they toggle together), whose hover says the
  trade's side, size, prices, P&L and return, a dotted line from each entry to its exit,
  and the lots still open (``open``);
* the equity;
* the drawdown, in percent (<= 0).

Gaps (:func:`pipeline.backtest.report.find_gaps`) are shaded on every row and every line breaks
there (a null point inside each gap, as :func:`pipeline.backtest.report.plot_frame`): nothing is
drawn across a stretch without data. Times are ms since the epoch on date axes (plotly.js
draws them as UTC); long series go as typed arrays (plotly's base64 ``bdata``).

:func:`sweep_figure` draws one statistic of a sweep's table: a heatmap over the first two
grid parameters (with more, the best value over the others, which the title says), or bars
over the one parameter.

Pure: no Kafka, and no I/O but the two ``write_*`` functions' one file each.
"""

from __future__ import annotations

import html
import math
from decimal import Decimal
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from pipeline.backtest import report
from pipeline.backtest.engine import BOOK_FILLS, EngineResult
from pipeline.core.errors import PipelineError
from pipeline.trading.accounting import ClosedTrade

#: The statistic ``sweep.html`` draws unless ``--metric`` says otherwise (the research
#: notebook's heatmap draws it too; the sweep itself keeps the grid's order, it ranks nothing).
DEFAULT_METRIC = "Return [%]"
#: Statistics where less is better: their "best over the other parameters" is the minimum.
LOWER_IS_BETTER = frozenset({"Volatility (Ann.) [%]", "Commissions [$]"})
#: Numeric statistics of :func:`pipeline.backtest.report.compute_stats` a sweep can draw (durations
#: and times are not numbers), plus the per-symbol columns of
#: :func:`pipeline.backtest.report.breakdown_columns` (``<SYMBOL> PnL`` ...).
SWEEP_METRICS = tuple(k for k in report.COMPARABLE if k not in (
    "Start", "End", "Duration", "Max. Drawdown Duration", "Avg. Drawdown Duration",
    "Max. Trade Duration", "Avg. Trade Duration")) + ("Gaps",)
SYMBOL_METRICS = (" Trades", " PnL", " Fees", " Exposure Time [%]", " Buy & Hold Return [%]")

_UP, _DOWN, _EQUITY, _GAP = "#26a69a", "#ef5350", "#1f77b4", "#9e9e9e"

# Rescales each row's y axis to the data in view after a zoom or pan of the shared time
# axis (plotly's autorange would keep the whole run's range), and back on a reset.
_AUTOSCALE_JS = """
(function () {
  var gd = document.getElementById('chart');
  var busy = false;
  function lo(t) { return t.type === 'candlestick' ? t.low : t.y; }
  function hi(t) { return t.type === 'candlestick' ? t.high : t.y; }
  gd.on('plotly_relayout', function (ev) {
    if (busy) { return; }
    var keys = Object.keys(ev), reset = false, moved = false;
    keys.forEach(function (k) {
      if (/^xaxis\\d*\\.autorange$/.test(k)) { reset = true; }
      if (/^xaxis\\d*\\.range/.test(k)) { moved = true; }
    });
    if (!reset && !moved) { return; }
    var ax = gd._fullLayout.xaxis, a = ax.r2l(ax.range[0]), b = ax.r2l(ax.range[1]);
    var update = {};
    var rows = {};
    gd._fullData.forEach(function (t) {
      if (t.visible !== true) { return; }
      var axis = 'yaxis' + (t.yaxis === 'y' ? '' : t.yaxis.slice(1));
      rows[axis] = rows[axis] || [Infinity, -Infinity];
      if (reset) { return; }
      var xs = t.x, ls = lo(t), hs = hi(t), r = rows[axis];
      for (var i = 0; i < xs.length; i++) {
        var x = xs[i];
        if (x < a || x > b) { continue; }
        var l = ls[i], h = hs[i];
        if (typeof l === 'number' && isFinite(l)) { r[0] = Math.min(r[0], l); }
        if (typeof h === 'number' && isFinite(h)) { r[1] = Math.max(r[1], h); }
      }
    });
    Object.keys(rows).forEach(function (axis) {
      var r = rows[axis];
      if (reset || !(r[0] <= r[1])) { update[axis + '.autorange'] = true; return; }
      var pad = (r[1] - r[0]) * 0.05 || Math.abs(r[1]) * 0.01 || 1;
      update[axis + '.range'] = [r[0] - pad, r[1] + pad];
    });
    busy = true;
    Plotly.relayout(gd, update).then(function () { busy = false; },
                                     function () { busy = false; });
  });
})();
"""


# --------------------------------------------------------------------------- backtest


def shown_symbols(result: EngineResult) -> list[str]:
    """The symbols with a price row: those traded (:func:`.report.traded_symbols`)."""
    return report.traded_symbols(result)


def _candles(result: EngineResult, symbol: str) -> dict[str, np.ndarray] | None:
    """The bars of ``symbol`` the run consumed, as arrays (None: no bars, a book run)."""
    bars = [b for b in result.bars if b["symbol"] == symbol]
    if not bars:
        return None
    return {"x": np.array([b["start_ms"] for b in bars], dtype="float64"),
            **{k: np.array([float(b[k]) for b in bars], dtype="float64")
               for k in ("open", "high", "low", "close")}}


def _broken(x_ms: np.ndarray, y: np.ndarray,
            gaps: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """``x``/``y`` with a NaN point in the middle of each gap: a line breaks there."""
    if not gaps:
        return x_ms, y
    middles = np.array([(a + b) // 2 for a, b in gaps], dtype="float64")
    at = np.searchsorted(x_ms, middles)
    return np.insert(x_ms, at, middles), np.insert(y, at, math.nan)


def _area(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed shapes between ``y`` and zero, one per stretch between NaN breaks (a
    ``fill="tozeroy"`` would bridge the gaps)."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    breaks = np.flatnonzero(np.isnan(y))
    for part in np.split(np.arange(len(y)), breaks):
        part = part[~np.isnan(y[part])]
        if not len(part):
            continue
        xs += [x[part], x[part][::-1], np.array([math.nan])]
        ys += [y[part], np.zeros(len(part)), np.array([math.nan])]
    if not xs:
        return np.array([], dtype="float64"), np.array([], dtype="float64")
    return np.concatenate(xs)[:-1], np.concatenate(ys)[:-1]


def _narrowed(labels_ms: list[int], gaps: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Range breaks that draw each gap at most 3% of the covered time wide (as the PNG's
    axis does): the shaded stretch stays visible, the data is not squeezed to the edges."""
    if not gaps:
        return []
    covered = labels_ms[-1] - labels_ms[0] - sum(b - a for a, b in gaps)
    keep = max(0.03 * covered, 1.0)
    out = []
    for a, b in gaps:
        if b - a > keep:
            out.append({"bounds": [report._iso(int(a + keep / 2)),
                                   report._iso(int(b - keep / 2))]})
    return out


def _num(value: Decimal) -> str:
    return report._fmt(float(value))


def _trade_text(t: ClosedTrade) -> str:
    side = "long" if t.size > 0 else "short"
    return (f"{t.symbol} {side} {abs(t.size)}<br>entry {report._iso(t.entry_ms)} at "
            f"{t.entry_price}<br>exit {report._iso(t.exit_ms)} at {t.exit_price}<br>"
            f"P&L {_num(t.pnl)} ({float(t.return_pct) * 100:+.2f}%), commission "
            f"{_num(t.commission)}")


def _trade_traces(result: EngineResult, symbol: str, several: bool) -> list[Any]:
    import plotly.graph_objects as go

    trades = [t for t in result.trades if t.symbol == symbol]
    texts = [_trade_text(t) for t in trades]
    group = dict(legendgroup=symbol, legendgrouptitle_text=symbol if several else None)
    longs = [t.size > 0 for t in trades]
    won = [t.pnl > 0 for t in trades]
    segments_x: list[float | None] = []
    segments_y: list[float | None] = []
    for t in trades:
        segments_x += [t.entry_ms, t.exit_ms, None]
        segments_y += [float(t.entry_price), float(t.exit_price), None]
    traces = [
        go.Scatter(name="entries", x=[t.entry_ms for t in trades],
                   y=[float(t.entry_price) for t in trades], mode="markers", text=texts,
                   hovertemplate="%{text}<extra>entry</extra>",
                   marker=dict(symbol=["triangle-up" if up else "triangle-down"
                                       for up in longs],
                               color=[_UP if up else _DOWN for up in longs], size=9,
                               line=dict(width=0.5, color="#333")), **group),
        go.Scatter(name="exits", x=[t.exit_ms for t in trades],
                   y=[float(t.exit_price) for t in trades], mode="markers", text=texts,
                   hovertemplate="%{text}<extra>exit</extra>",
                   marker=dict(symbol="x-thin", size=9,
                               line=dict(width=2, color=[_UP if w else _DOWN for w in won])),
                   **group),
        go.Scatter(name="trades", x=segments_x, y=segments_y, mode="lines", hoverinfo="skip",
                   line=dict(color="#555", width=1, dash="dot"), showlegend=False, **group),
    ]
    lots = [lot for lot in result.open_lots if lot.symbol == symbol]
    if lots:
        traces.append(go.Scatter(
            name="open", x=[lot.entry_ms for lot in lots],
            y=[float(lot.entry_price) for lot in lots], mode="markers",
            text=[f"{symbol} {'long' if lot.size > 0 else 'short'} {abs(lot.size)} open since "
                  f"{report._iso(lot.entry_ms)} at {lot.entry_price}" for lot in lots],
            hovertemplate="%{text}<extra>open</extra>",
            marker=dict(symbol="diamond-open", size=10, color="#333"), **group))
    return traces


def backtest_figure(result: EngineResult, title: str = "") -> Any:
    """The report's figure (see the module doc): a ``plotly.graph_objects.Figure``."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    symbols = shown_symbols(result)
    labels = result.equity_labels_ms
    gaps = report.find_gaps(labels)
    points = np.array(labels, dtype="float64")
    n_price = len(symbols)
    rows = n_price + 2
    titles = []
    for symbol in symbols:
        candles = _candles(result, symbol)
        what = "bars" if candles is not None else report.mark_source(result) if (
            result.fill == BOOK_FILLS) else "marks"
        titles.append(f"{symbol} ({what})")
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.025,
                        row_heights=[3.0] * n_price + [2.0, 1.2],
                        subplot_titles=[*titles, "equity", "drawdown %"])
    several = len(symbols) > 1
    for row, symbol in enumerate(symbols, start=1):
        candles = _candles(result, symbol)
        if candles is not None:
            fig.add_trace(go.Candlestick(
                name=f"{symbol} bars", x=candles["x"], open=candles["open"],
                high=candles["high"], low=candles["low"], close=candles["close"],
                increasing_line_color=_UP, decreasing_line_color=_DOWN,
                increasing_line_width=1, decreasing_line_width=1, legendgroup=symbol,
                legendgrouptitle_text=symbol if several else None), row=row, col=1)
        else:
            x, y = _broken(points, report._series(result, symbol), gaps)
            fig.add_trace(go.Scatter(
                name=f"{symbol} {report.mark_source(result)}", x=x, y=y, mode="lines",
                line=dict(color="#444", width=1), connectgaps=False, legendgroup=symbol,
                legendgrouptitle_text=symbol if several else None), row=row, col=1)
        for trace in _trade_traces(result, symbol, several):
            fig.add_trace(trace, row=row, col=1)
        fig.update_yaxes(title_text="price", row=row, col=1)
    data = report.plot_frame(result)
    x = data.index.as_unit("ms").asi8.astype("float64")
    fig.add_trace(go.Scatter(name="equity", x=x, y=data["equity"].to_numpy(), mode="lines",
                             line=dict(color=_EQUITY, width=1.2), connectgaps=False),
                  row=n_price + 1, col=1)
    drawdown = data["drawdown_pct"].to_numpy()
    fill = "rgba(239,83,80,0.35)"
    fig.add_trace(go.Scatter(name="drawdown", x=x, y=drawdown, mode="lines",
                             line=dict(color=_DOWN, width=0.8), connectgaps=False,
                             legendgroup="drawdown", fill=None if gaps else "tozeroy",
                             fillcolor=fill, hovertemplate="%{y:.4g}%<extra>drawdown</extra>"),
                  row=n_price + 2, col=1)
    if gaps:  # "tozeroy" would fill across the gaps: one closed shape per stretch instead
        fx, fy = _area(x, drawdown)
        fig.add_trace(go.Scatter(name="drawdown area", x=fx, y=fy, mode="none", fill="toself",
                                 fillcolor=fill, hoverinfo="skip", showlegend=False,
                                 legendgroup="drawdown"),
                      row=n_price + 2, col=1)
    fig.update_yaxes(title_text="equity", tickformat=f",.{report._digits(data['equity'])}f",
                     row=n_price + 1, col=1)
    fig.update_yaxes(title_text="%", row=n_price + 2, col=1)
    fig.update_xaxes(type="date", rangeslider_visible=False, showspikes=True,
                     spikemode="across", spikesnap="cursor", spikethickness=1,
                     rangebreaks=_narrowed(labels, gaps) or None)
    for a, b in gaps:
        fig.add_vrect(x0=a, x1=b, fillcolor=_GAP, opacity=0.25, line_width=0, layer="below")
    if gaps:
        fig.update_xaxes(title_text=(
            f"UTC; shaded: {len(gaps)} gap(s) (no market event for over "
            f"{report.gap_threshold_ms(labels) / 1000:g} s), drawn narrower than their length"),
            row=rows, col=1)
    fig.update_layout(
        template="plotly_white", height=260 * n_price + 430, hovermode="closest",
        dragmode="zoom", margin=dict(l=80, r=30, t=70, b=50),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0, groupclick="togglegroup"),
        title=dict(text=html.escape(title), x=0, font=dict(size=14)) if title else None)
    return fig


# --------------------------------------------------------------------------- sweep


def check_metric(metric: str) -> None:
    """Refuse a ``metric`` a sweep's table has no numbers for, before anything runs."""
    if metric in SWEEP_METRICS or any(metric.endswith(s) and len(metric) > len(s)
                                      for s in SYMBOL_METRICS):
        return
    raise PipelineError(f"--metric {metric!r} is not a statistic a sweep can draw: one of "
                        f"{', '.join(SWEEP_METRICS)}, or <SYMBOL>"
                        f"{'/<SYMBOL>'.join(SYMBOL_METRICS)}")


def _values(table: pd.DataFrame, metric: str) -> pd.Series:
    if metric not in table.columns:
        raise PipelineError(f"the sweep's table has no column {metric!r}")
    return pd.to_numeric(table[metric], errors="coerce").astype("float64")


def _label(value: Any) -> str:
    return str(value)


def _where(column: pd.Series, value: Any) -> np.ndarray:
    """Rows whose parameter equals ``value`` (by value: 1 and 1.0 are one point)."""
    return np.array([v == value for v in column], dtype=bool)


def sweep_cells(table: pd.DataFrame, grid: Mapping[str, Sequence[Any]],
                metric: str) -> tuple[list[str], list[str] | None, list[list[float | None]]]:
    """What :func:`sweep_figure` draws: ``(first parameter's values, second's (None with
    one parameter), z)`` as labels in the grid's order, with ``z[i][j]`` the metric at the
    i-th value of the first and the j-th of the second (with more parameters, the best
    over the others), None where no row has a number (an interrupted sweep, NaN
    statistics)."""
    keys = list(grid)
    values = _values(table, metric).to_numpy()
    best = min if metric in LOWER_IS_BETTER else max

    def cell(mask: np.ndarray) -> float | None:
        found = [float(v) for v in values[mask] if not math.isnan(v)]
        return best(found) if found else None

    firsts = [_where(table[keys[0]], a) for a in grid[keys[0]]]
    first = [_label(a) for a in grid[keys[0]]]
    if len(keys) == 1:
        return first, None, [[cell(m) for m in firsts]]
    seconds = [_where(table[keys[1]], b) for b in grid[keys[1]]]
    return first, [_label(b) for b in grid[keys[1]]], \
        [[cell(m & n) for n in seconds] for m in firsts]


def sweep_figure(table: pd.DataFrame, grid: Mapping[str, Sequence[Any]],
                 metric: str = DEFAULT_METRIC, title: str = "") -> Any:
    """``metric`` over the grid (see the module doc)."""
    import plotly.graph_objects as go

    keys = list(grid)
    if not keys:
        raise PipelineError("an empty grid has nothing to draw")
    first, second, z = sweep_cells(table, grid, metric)
    heading = f"{metric} by {' and '.join(keys[:2])}"
    if len(keys) > 2:
        heading += (f": the {'lowest' if metric in LOWER_IS_BETTER else 'highest'} over "
                    f"{', '.join(keys[2:])}")
    if table.attrs.get("interrupted"):
        heading += (f" (interrupted: {len(table)} of {table.attrs.get('combinations', '?')} "
                    "combinations)")
    if second is None:
        fig = go.Figure(go.Bar(x=first, y=z[0], name=metric,
                               hovertemplate=f"{html.escape(keys[0])}=%{{x}}<br>"
                                             f"{html.escape(metric)}=%{{y:.6g}}<extra></extra>",
                               marker_color=[_UP if (v or 0) >= 0 else _DOWN for v in z[0]]))
        fig.update_xaxes(type="category", title_text=keys[0])
        fig.update_yaxes(title_text=metric)
    else:
        cells = len(first) * len(second)
        fig = go.Figure(go.Heatmap(
            x=second, y=first, z=z, colorscale="RdYlGn", colorbar=dict(title=metric),
            reversescale=metric in LOWER_IS_BETTER, hoverongaps=False,
            texttemplate="%{z:.4g}" if cells <= 400 else None,
            hovertemplate=f"{html.escape(keys[0])}=%{{y}}<br>{html.escape(keys[1])}=%{{x}}"
                          f"<br>{html.escape(metric)}=%{{z:.6g}}<extra></extra>"))
        fig.update_xaxes(type="category", title_text=keys[1])
        fig.update_yaxes(type="category", title_text=keys[0])
    fig.update_layout(template="plotly_white", height=560,
                      title=dict(text=html.escape((title + ": " if title else "") + heading),
                                 x=0, font=dict(size=14)))
    return fig


# --------------------------------------------------------------------------- pages

_STYLE = ("body{font:14px sans-serif;margin:2em}table{border-collapse:collapse}"
          "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}"
          "th{text-align:left}#chart{width:100%}")


def plotly_js() -> str:
    """plotly.js, minified, as the plotly wheel ships it."""
    from plotly.offline import get_plotlyjs

    return str(get_plotlyjs())


def figure_json(fig: Any) -> str:
    """The figure as JSON that is safe inside a ``<script>`` element."""
    return str(fig.to_json()).replace("<", "\\u003c")  # plotly escapes it already; twice sure


def page(title: str, fig: Any, body: str, *, chart_attrs: Mapping[str, Any] | None = None,
         before: str = "", script: str = "") -> str:
    """A self-contained page: plotly.js inline (``<script id="plotlyjs">``), ``before``, the
    figure (``<div id="chart">`` drawn from ``<script id="figure" type="application/json">``),
    ``script`` (run once it is drawn), then ``body``."""
    attrs = "".join(f' {k}="{html.escape(str(v))}"' for k, v in (chart_attrs or {}).items())
    draw = ("(function(){var fig=JSON.parse(document.getElementById('figure').textContent);"
            "Plotly.newPlot('chart',fig.data,fig.layout,{responsive:true,displaylogo:false,"
            "scrollZoom:true})"
            + (".then(function(){" + script + "})" if script else "") + ";})();")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{_STYLE}</style><script id=\"plotlyjs\">{plotly_js()}</script>"
            f"</head><body><h1>{html.escape(title)}</h1>{before}<div id=\"chart\"{attrs}></div>"
            f"<script id=\"figure\" type=\"application/json\">{figure_json(fig)}</script>"
            f"<script>{draw}</script>{body}</body></html>")


def autoscale_script() -> str:
    """The page's script that rescales each row's y axis to the time in view."""
    return _AUTOSCALE_JS


def _table(table_id: str, head: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    return (f'<table id="{table_id}"><tr>'
            + "".join(f"<th>{html.escape(str(c))}</th>" for c in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row)
                      + "</tr>" for row in rows) + "</table>")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else report._fmt(value)
    if value is None or (not isinstance(value, (str, list, dict, tuple)) and pd.isna(value)):
        return "n/a"
    return str(value)


#: The columns ``sweep.html``'s table shows beside the parameters.
SWEEP_COLUMNS = ("Return [%]", "Sharpe Ratio", "Max. Drawdown [%]", "# Trades", "Win Rate [%]",
                 "Equity Final [$]")


def sweep_page(table: pd.DataFrame, grid: Mapping[str, Sequence[Any]],
               metric: str = DEFAULT_METRIC, title: str = "") -> str:
    """``sweep.html``: the figure of :func:`sweep_figure`, then the table (``<table
    id="sweep">``: the grid's parameters, the metric and the usual columns)."""
    fig = sweep_figure(table, grid, metric, title)
    keys = list(grid)
    columns = [c for c in (metric, *SWEEP_COLUMNS) if c in table.columns]
    columns = list(dict.fromkeys(columns))
    rows = [[_cell(row[c]) for c in (*keys, *columns)] for _, row in table.iterrows()]
    return page(f"sweep {title}".strip(), fig,
                "<h2>Combinations</h2>" + _table("sweep", [*keys, *columns], rows),
                chart_attrs={"data-metric": metric, "data-combinations": len(table)})


def write_sweep_html(path: Path, table: pd.DataFrame, grid: Mapping[str, Sequence[Any]],
                     metric: str = DEFAULT_METRIC, title: str = "") -> Path:
    """Write :func:`sweep_page` to ``path``."""
    Path(path).write_text(sweep_page(table, grid, metric, title))
    return Path(path)
