"""The interactive report (backtest/report_interactive.py), without a broker: the figure of a
real backtest over the start of the hourly file (its candles, trades, equity, drawdown),
gaps as gaps, book runs, the self-contained page and its hooks, and the sweep's chart.
The browser test of the page is in test_backtest.py, after the parity backtest."""

from __future__ import annotations

import base64
import json
import math
import re
from decimal import Decimal

import numpy as np
import pandas as pd
import pytest

from pipeline.backtest import report, report_interactive
from pipeline.backtest import run as backtest_run
from pipeline.backtest.config import BacktestConfig
from pipeline.backtest.engine import BAR, backtest_events, event_time_us
from pipeline.core.errors import PipelineError
from pipeline.strategy import FULL_EQUITY, load_strategy
from tests.conftest import SHARED_DATA
from tests.support.backtest_strategies import Scripted

CSV = SHARED_DATA / "BTCUSD_GEMINI_1h.csv"
SMA = "pipeline.strategy:SmaCross"
PARAMS = {"fast": 10, "slow": 20, "amount": None, "fraction": FULL_EQUITY}
N_BARS = 3000
HOUR = 3_600_000


def bar_events(bars: list[dict]) -> list[tuple]:
    return [(event_time_us(BAR, b), "sim.bars", 0, i, BAR, b) for i, b in enumerate(bars)]


@pytest.fixture(scope="module")
def hourly_bars() -> list[dict]:
    if not CSV.exists():
        pytest.skip(f"real data not found at {CSV} (../shared/data beside the repo)")
    from producers.csv_bars import parse_ohlcv_csv

    return parse_ohlcv_csv(CSV).bars[:N_BARS]


@pytest.fixture(scope="module")
def hourly(hourly_bars):
    """SmaCross 10/20 over the first 3,000 bars of the real hourly file, and its figure."""
    result = backtest_events(load_strategy(SMA, PARAMS), bar_events(hourly_bars),
                             commission="0.002")
    assert len(result.trades) > 50
    return result, report_interactive.backtest_figure(result)


def values(v) -> np.ndarray:
    """A trace's array as plotly.py holds it (numpy or a tuple/list)."""
    return np.asarray(v, dtype="float64")


def named(fig, name: str) -> list:
    return [t for t in fig.data if t.name == name]


def decode(array) -> np.ndarray:
    """An array of the figure's JSON: a list, or plotly's typed array ``{dtype, bdata}``."""
    if isinstance(array, dict):
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=np.dtype(array["dtype"]))
    return np.array([math.nan if v is None else v for v in array], dtype="float64")


def test_entries_and_exits_are_the_trades_at_their_times_and_prices(hourly):
    result, fig = hourly
    frame = report.trades_frame(result.trades)
    (entries,), (exits,) = named(fig, "entries"), named(fig, "exits")
    assert len(entries.x) == len(exits.x) == len(result.trades) == len(frame)
    assert list(entries.x) == [t.value // 10**6 for t in frame["EntryTime"]]
    assert list(entries.y) == list(frame["EntryPrice"])
    assert list(exits.x) == [t.value // 10**6 for t in frame["ExitTime"]]
    assert list(exits.y) == list(frame["ExitPrice"])
    # hover: side, size, prices, P&L of that very trade
    for t, text in zip(result.trades[:20], entries.text):
        side = "long" if t.size > 0 else "short"
        assert f"BTCUSD {side} {abs(t.size)}<br>" in text
        assert f"at {t.entry_price}<br>" in text and f"at {t.exit_price}<br>" in text
        assert f"P&L {report._fmt(float(t.pnl))} " in text
    assert list(exits.text) == list(entries.text)
    assert entries.legendgroup == exits.legendgroup == "BTCUSD"
    assert not named(fig, "open")  # finalize_trades closed everything


def test_candles_are_the_bars_the_run_consumed(hourly, hourly_bars):
    result, fig = hourly
    assert result.bars == hourly_bars and result.bars[0] is hourly_bars[0]  # no copies
    (candles,) = [t for t in fig.data if t.type == "candlestick"]
    assert len(candles.x) == len(result.bars) == N_BARS
    assert list(values(candles.x)) == [b["start_ms"] for b in hourly_bars]
    for key in ("open", "high", "low", "close"):
        assert list(values(getattr(candles, key))) == [float(b[key]) for b in hourly_bars]


def test_equity_and_drawdown_rows_share_the_time_axis(hourly):
    result, fig = hourly
    (equity,), (drawdown,) = named(fig, "equity"), named(fig, "drawdown")
    assert len(equity.x) == len(result.equity) == N_BARS  # no gaps in the hourly file
    assert list(values(equity.y)) == [float(v) for v in result.equity]
    assert list(values(equity.x)) == result.equity_labels_ms
    dd = values(drawdown.y)
    assert len(dd) == len(result.equity) and np.nanmax(dd) <= 0 and np.nanmin(dd) < -1
    expected = report.equity_frame(result)["DrawdownPct"].to_numpy() * -100
    assert dd == pytest.approx(expected)
    layout = fig.layout.to_plotly_json()
    axes = sorted(k for k in layout if re.fullmatch(r"xaxis\d*", k))
    assert len(axes) == 3  # price, equity, drawdown
    bottom = axes[-1]
    assert all(layout[a]["matches"] == "x" + bottom[5:] for a in axes[:-1])
    assert all(layout[a]["type"] == "date" for a in axes)
    rows = {t.name: t.yaxis for t in fig.data}
    assert rows["BTCUSD bars"] == rows["entries"] == rows["exits"] == "y"
    assert (rows["equity"], rows["drawdown"]) == ("y2", "y3")


def gapped_bars() -> list[dict]:
    """A rising then falling hourly series of 200 bars with 12 hours missing after bar 100."""
    bars = []
    for i in range(200):
        start = 1_600_000_000_000 // HOUR * HOUR + (i + (12 if i >= 100 else 0)) * HOUR
        close = Decimal(100 + i if i < 120 else 340 - i)
        bars.append({"symbol": "BTCUSD", "interval": "1h", "start_ms": start,
                     "end_ms": start + HOUR, "open": str(close - 1), "high": str(close + 2),
                     "low": str(close - 2), "close": str(close), "volume": "1",
                     "trade_count": None, "vwap": None, "buy_volume": None,
                     "sell_volume": None, "filled": False, "source": "test"})
    return bars


def test_gaps_are_shaded_and_break_the_lines_nothing_drawn_inside():
    strategy = load_strategy(SMA, {"fast": 5, "slow": 10, "amount": "1"})
    result = backtest_events(strategy, bar_events(gapped_bars()), commission="0.002")
    gaps = report.find_gaps(result.equity_labels_ms)
    ((a, b),) = gaps
    assert b - a == 13 * HOUR
    fig = report_interactive.backtest_figure(result)
    (candles,) = [t for t in fig.data if t.type == "candlestick"]
    assert len(candles.x) == 200
    assert not any(a < x < b for x in values(candles.x))
    for name in ("equity", "drawdown"):
        (trace,) = named(fig, name)
        x, y = values(trace.x), values(trace.y)
        inside = (x > a) & (x < b)
        assert inside.sum() == 1 and np.isnan(y[inside]).all(), name  # the break
        assert np.isfinite(y[~inside]).all()
    (area,) = named(fig, "drawdown area")  # filled per stretch, never across the gap
    assert area.fill == "toself"
    ax, ay = values(area.x), values(area.y)
    assert not (((ax > a) & (ax < b)) & np.isfinite(ay)).any()
    shapes = [s for s in fig.layout.shapes if s.type == "rect"]
    assert [(s.x0, s.x1) for s in shapes] == [(a, b)] * 3  # on each row
    breaks = fig.layout.xaxis.rangebreaks
    assert len(breaks) == 1  # the 13 hours are drawn narrower, still visible
    lo, hi = (pd.Timestamp(v).value // 10**6 for v in breaks[0].bounds)
    assert a < lo < hi < b
    assert "1 gap(s)" in fig.layout.xaxis3.title.text  # the bottom row's axis says so


def test_a_book_run_draws_the_mids_and_a_row_and_legend_group_per_traded_symbol():
    from tests.unit.backtest.test_report_truth import two_symbol_stream

    strategy = Scripted({0: [dict(side="BUY", amount="1")], 1: [dict(side="BUY", amount="10")]})
    result = backtest_events(strategy, two_symbol_stream(), fill="book", commission="0.001")
    assert not result.bars
    fig = report_interactive.backtest_figure(result)
    mids = [t for t in fig.data if t.name.endswith("book mid")]
    assert [t.name for t in mids] == ["AAAUSD book mid", "BBBUSD book mid"]
    assert [t.yaxis for t in mids] == ["y", "y2"]
    entries, exits = named(fig, "entries"), named(fig, "exits")
    assert [t.legendgroup for t in entries] == [t.legendgroup for t in exits] == \
        ["AAAUSD", "BBBUSD"]
    assert [t.yaxis for t in entries] == ["y", "y2"]
    assert sum(len(t.x) for t in entries) == sum(len(t.x) for t in exits) == \
        len(result.trades) == 2
    (gap,) = report.find_gaps(result.equity_labels_ms)
    for mid in mids:
        x, y = values(mid.x), values(mid.y)
        assert np.isnan(y[(x > gap[0]) & (x < gap[1])]).all()
        assert np.isfinite(y[(x < gap[0]) | (x > gap[1])]).all()


def test_the_page_is_self_contained_with_its_hooks(hourly, tmp_path):
    result, fig = hourly
    stats = report.compute_stats(result)
    files = report.write_outputs(tmp_path, result, stats, {}, "SmaCross 10/20", html=True)
    assert files["png"].exists()  # the static chart stays
    page = files["html"].read_text()
    assert not re.search(r"<script[^>]*\bsrc\s*=", page) and "<link" not in page
    chart = re.search(r'<div id="chart" data-trades="(\d+)"></div>', page)
    assert chart and int(chart.group(1)) == len(result.trades)
    assert page.count('<table id="stats">') == 1
    trades = re.search(r'<table id="trades">(.*?)</table>', page).group(1)
    assert trades.count("<tr>") == len(result.trades) + 1
    assert f"<td>{result.trades[0].entry_price}</td>" in trades
    assert "<th>Sharpe Ratio</th>" in page
    raw = re.search(r'<script id="figure" type="application/json">(.*?)</script>', page,
                    re.S).group(1)
    figure = json.loads(raw)
    by_name = {t.get("name"): t for t in figure["data"]}
    assert len(by_name["entries"]["x"]) == len(by_name["exits"]["x"]) == len(result.trades)
    assert len(decode(by_name["BTCUSD bars"]["x"])) == N_BARS
    assert list(decode(by_name["equity"]["y"])) == [float(v) for v in result.equity]
    assert page.index('<script id="plotlyjs">') < page.index('<div id="chart"')
    # the only http(s) in the page is inside plotly.js's own code
    rest = page.replace(report_interactive.plotly_js(), "")
    assert "http://" not in rest and "https://" not in rest
    assert len(page) < len(report_interactive.plotly_js()) + 2_000_000


def sweep_table(bars: list[dict], grid: dict, interrupted_at: int | None = None) -> pd.DataFrame:
    """What ``sweep`` returns, row by row as its workers compute them, over ``bars``."""
    import itertools

    backtest_run._WORKER_EVENTS = bar_events(bars)
    try:
        keys = list(grid)
        rows = [backtest_run._run_combination(
                    i, {"amount": None, "fraction": "0.5", **dict(zip(keys, combo))},
                    BacktestConfig(SMA, "sim"))[1]
                for i, combo in enumerate(itertools.product(*grid.values()))]
    finally:
        backtest_run._WORKER_EVENTS = None
    combinations = len(rows)
    if interrupted_at is not None:
        del rows[interrupted_at]
    table = pd.DataFrame(rows)
    table.attrs.update(interrupted=interrupted_at is not None, combinations=combinations)
    return table


@pytest.fixture(scope="module")
def short_bars(hourly_bars) -> list[dict]:
    return hourly_bars[:1200]


def test_the_sweep_heatmap_is_the_tables_values(short_bars, tmp_path):
    grid = {"fast": [5, 10], "slow": [20, 30, 40]}
    table = sweep_table(short_bars, grid)
    for metric in (report_interactive.DEFAULT_METRIC, "Sharpe Ratio", "BTCUSD PnL"):
        fig = report_interactive.sweep_figure(table, grid, metric)
        (heat,) = fig.data
        assert heat.type == "heatmap"
        assert list(heat.y) == ["5", "10"] and list(heat.x) == ["20", "30", "40"]
        for i, fast in enumerate(grid["fast"]):
            for j, slow in enumerate(grid["slow"]):
                (row,) = table[(table["fast"] == fast) & (table["slow"] == slow)].index
                assert heat.z[i][j] == pytest.approx(float(table.loc[row, metric]))
        assert metric in fig.layout.title.text
    assert len({z for row in heat.z for z in row}) == 6
    fig = report_interactive.sweep_figure(table, grid, "Sharpe Ratio", "SmaCross")
    path = report_interactive.write_sweep_html(tmp_path / "sweep.html", table, grid,
                                               "Sharpe Ratio", "SmaCross")
    page = path.read_text()
    assert '<div id="chart" data-metric="Sharpe Ratio" data-combinations="6"></div>' in page
    assert re.search(r'<table id="sweep">(.*?)</table>', page).group(1).count("<tr>") == 7
    assert not re.search(r"<script[^>]*\bsrc\s*=", page)
    figure = json.loads(re.search(r'<script id="figure" type="application/json">(.*?)'
                                  r"</script>", page, re.S).group(1))
    assert figure["data"][0]["z"] == [list(r) for r in fig.data[0].z]


def test_one_parameter_is_bars_more_than_two_the_best_over_the_rest(short_bars):
    grid = {"slow": [20, 30]}
    table = sweep_table(short_bars, grid)
    (bars,) = report_interactive.sweep_figure(table, {"slow": [20, 30]}).data
    assert bars.type == "bar" and list(bars.x) == ["20", "30"]
    assert list(bars.y) == pytest.approx(list(table["Return [%]"]))
    grid3 = {"fast": [5, 10], "slow": [20, 30], "fraction": ["0.5", "0.25"]}
    table3 = sweep_table(short_bars, grid3)
    fig = report_interactive.sweep_figure(table3, grid3, "Return [%]")
    for i, fast in enumerate(grid3["fast"]):
        for j, slow in enumerate(grid3["slow"]):
            cell = table3[(table3["fast"] == fast) & (table3["slow"] == slow)]["Return [%]"]
            assert len(cell) == 2 and fig.data[0].z[i][j] == pytest.approx(cell.max())
    assert "the highest over fraction" in fig.layout.title.text
    # an interrupted sweep: the missing combination is an empty cell, and the title says so
    short = sweep_table(short_bars, {"fast": [5, 10], "slow": [20, 30]}, interrupted_at=1)
    fig = report_interactive.sweep_figure(short, {"fast": [5, 10], "slow": [20, 30]})
    assert fig.data[0].z[0][1] is None and None not in fig.data[0].z[1]
    assert "interrupted: 3 of 4" in fig.layout.title.text


def test_a_metric_the_sweep_cannot_draw_is_refused():
    report_interactive.check_metric("Sharpe Ratio")
    report_interactive.check_metric("FILUSD PnL")
    for bad in ("Sharp Ratio", "Duration", "PnL"):
        with pytest.raises(PipelineError, match="not a statistic a sweep can draw"):
            report_interactive.check_metric(bad)
    with pytest.raises(PipelineError, match="no column 'XYZUSD PnL'"):
        report_interactive.sweep_figure(pd.DataFrame({"fast": [1], "Return [%]": [1.0]}),
                                        {"fast": [1]}, "XYZUSD PnL")
