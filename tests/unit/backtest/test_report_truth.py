"""Backtest reports tell the truth for book and multi-symbol runs: buy & hold of the
symbols traded at the prices the backtest used, gaps as gaps in the plot's data, what the
stats cover, per-symbol breakdowns. Screenshots go to run/test-screenshots/report-truth/
(gitignored) for a person to look at."""

from __future__ import annotations

import csv
import json
import math
import shutil
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest

from pipeline.backtest import report
from pipeline.backtest.engine import L2, TRADE, backtest_events, event_time_us
from pipeline.ops.settings import REPO_ROOT
from pipeline.strategy import load_strategy
from tests.support.backtest_strategies import Scripted

SCREENSHOTS = REPO_ROOT / "run" / "test-screenshots" / "report-truth"
BASE_US = 1_700_000_000_000_000
GAP_MS = 30 * 60 * 1000


def screenshot_dir(name: str) -> Path:
    target = SCREENSHOTS / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    return target


def l2(at_ms: int, symbol: str, changes: list[tuple[str, str, str]],
       snapshot: bool = False) -> tuple:
    record = {"symbol": symbol, "snapshot": snapshot,
              "changes": [{"side": s, "price": p, "quantity": q} for s, p, q in changes],
              "exchange_ts_ms": None, "received_ts_us": BASE_US + at_ms * 1000,
              "connection_id": "c", "sequence": at_ms, "event_id": None}
    return (event_time_us(L2, record), "sim.md.l2", 0, at_ms, L2, record)


def two_symbol_stream() -> list[tuple]:
    """AAAUSD first in the topic, swinging from 100 to 1000; BBBUSD creeping up from 50 to
    51; one change a second for 20 s, nothing for 30 minutes, 20 s more."""
    events = [l2(0, "AAAUSD", [("BID", "99", "5"), ("ASK", "101", "5")], snapshot=True),
              l2(1, "BBBUSD", [("BID", "49.9", "5"), ("ASK", "50.1", "5")], snapshot=True)]
    times = [*range(1000, 21_000, 1000), *range(20_000 + GAP_MS, 41_000 + GAP_MS, 1000)]
    for n, at in enumerate(times, start=1):
        aaa = 100 + 900 * n // len(times)
        bbb = Decimal(50) + Decimal(n) / len(times)
        events.append(l2(at, "AAAUSD", [("BID", str(aaa - 1), "5"), ("ASK", str(aaa + 1), "5")],
                         snapshot=True))
        events.append(l2(at + 1, "BBBUSD", [("BID", str(bbb - Decimal("0.1")), "5"),
                                            ("ASK", str(bbb + Decimal("0.1")), "5")],
                         snapshot=True))
    return events


def assert_no_point_inside_gaps(data: pd.DataFrame, gaps: list[tuple[int, int]]) -> None:
    """Inside each gap the plotted data has exactly one row, all NaN (the line's break)."""
    times = data.index.as_unit("ms").asi8
    for a, b in gaps:
        inside = data[(times > a) & (times < b)]
        assert len(inside) == 1 and inside.isna().all(axis=None), (a, b)
    assert data.dropna(how="all").index.is_monotonic_increasing


def without_plotly_js(page: str) -> str:
    """The page without the plotly.js it inlines (that library's own code has "None" in
    it), checking that what is cut is exactly plotly.js and nothing of the report."""
    from pipeline.backtest.report_interactive import plotly_js

    tag = '<script id="plotlyjs">'
    start = page.index(tag)
    end = page.index("</script>", start)
    assert page[start + len(tag):end] == plotly_js()
    return page[:start] + page[end + len("</script>"):]


def read_plot_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_buy_and_hold_is_the_traded_symbol_at_its_mids_and_the_plot_breaks_at_the_gap(
        tmp_path):
    strategy = Scripted({1: [dict(side="BUY", amount="10")]})  # call 1: BBBUSD's snapshot
    result = backtest_events(strategy, two_symbol_stream(), fill="book", commission="0.001",
                             sample_ms=1000)
    assert set(result.marks) == {"AAAUSD", "BBBUSD"}  # AAAUSD first in the topic, untraded
    assert report.traded_symbols(result) == ["BBBUSD"]
    stats = report.compute_stats(result)
    # By hand: BBBUSD's mid at the first equity point (its snapshot, 50) and at the end.
    last = Decimal(50) + Decimal(40) / 40
    assert stats["Buy & Hold Return [%]"] == pytest.approx(float((last / 50 - 1) * 100),
                                                           rel=1e-12)
    hold = report.buy_and_hold(result)["BBBUSD"]
    assert (hold["first"], hold["last"]) == (Decimal(50), last)
    assert stats["Symbols"] == "BBBUSD" and stats["Gaps"] == 1
    assert stats["Buy & Hold Of"].startswith("equal-weight BBBUSD (book mid)")
    gaps = report.find_gaps(result.equity_labels_ms)
    ((a, b),) = gaps
    assert b - a == GAP_MS and stats["Time in Gaps"] == pd.Timedelta(b - a, unit="ms")
    # A run of 31 minutes: the annualized figures are empty and say why.
    why = report.notes(stats)
    assert set(why) == set(report.ANNUALIZED)
    assert all(math.isnan(stats[key]) for key in report.ANNUALIZED)
    rows = dict(report.stats_rows(stats))
    assert rows["Sharpe Ratio"] == report.SHORT_RUN_NOTE and "None" not in rows.values()
    # The breakdown, exact from the ledger.
    (trade,) = result.trades
    per = report.symbol_breakdown(result)
    assert list(per) == ["BBBUSD"]
    assert per["BBBUSD"]["trades"] == 1 and per["BBBUSD"]["fills"] == 2
    assert per["BBBUSD"]["pnl"] == trade.pnl == result.realized["BBBUSD"]
    assert per["BBBUSD"]["fees"] == trade.commission > 0
    # The files: the plotted data breaks at the gap; stats.json says what it covers.
    out = screenshot_dir("two-symbols")
    files = report.write_outputs(out, result, stats, {}, "scripted BBBUSD", html=True)
    data = report.plot_frame(result)
    assert_no_point_inside_gaps(data, gaps)
    lines = read_plot_csv(files["plot"])
    assert len(lines) == len(result.equity) + 1
    assert [r["time"] for r in lines] == [report._iso(int(t.value // 1_000_000))
                                          for t in data.index]
    nan_rows = [r for r in lines if r["equity"] == "NaN"]
    assert len(nan_rows) == 1 and all(v == "NaN" for k, v in nan_rows[0].items() if k != "time")
    assert float(lines[-1]["buy_hold_pct"]) == pytest.approx(stats["Buy & Hold Return [%]"])
    saved = json.loads(files["stats"].read_text())
    assert saved["coverage"]["symbols"] == ["BBBUSD"]
    assert [g["duration"] for g in saved["coverage"]["gaps"]] == [
        str(pd.Timedelta(b - a, unit="ms"))]
    assert saved["per_symbol"]["BBBUSD"]["pnl"] == str(trade.pnl)
    assert saved["notes"]["Return (Ann.) [%]"] == report.SHORT_RUN_NOTE
    assert saved["stats"]["Buy & Hold Return [%]"] == stats["Buy & Hold Return [%]"]
    page = files["html"].read_text()
    assert "Per symbol" in page and "BBBUSD" in page and "AAAUSD" not in page
    assert report.SHORT_RUN_NOTE in page and "None" not in without_plotly_js(page)


def test_two_traded_symbols_are_an_equal_weight_buy_and_hold_with_a_row_each():
    strategy = Scripted({0: [dict(side="BUY", amount="1")], 1: [dict(side="BUY", amount="10")]})
    result = backtest_events(strategy, two_symbol_stream(), fill="book", commission="0.001")
    assert report.traded_symbols(result) == ["AAAUSD", "BBBUSD"]
    stats = report.compute_stats(result)
    aaa = (Decimal(1000) / 100 - 1) * 100
    bbb = (Decimal(51) / 50 - 1) * 100
    assert stats["Buy & Hold Return [%]"] == pytest.approx(float((aaa + bbb) / 2), rel=1e-12)
    per = report.symbol_breakdown(result)
    assert [per[s]["trades"] for s in ("AAAUSD", "BBBUSD")] == [1, 1]
    assert per["AAAUSD"]["buy_and_hold_pct"] == pytest.approx(float(aaa))
    assert sum((r["pnl"] for r in per.values()), Decimal(0)) == \
        result.final_equity - result.initial_cash
    curve = report.buy_and_hold_curve(result)
    assert curve[-1] == pytest.approx(stats["Buy & Hold Return [%]"])


def capture_twice(shared_data: Path, pause_min: int = 32) -> list[tuple]:
    """The demo capture as two ``make demo`` runs leave it: the same frames twice, the
    second copy ``pause_min`` minutes after the first began."""
    from pipeline.gemini.capture import received_frames
    from pipeline.gemini.marketdata import V2Normalizer

    events: list[tuple] = []
    frames = received_frames(shared_data / "gemini_v2_l2_capture_2021-06-24.txt")
    for copy_no in range(2):
        normalizer = V2Normalizer("c")
        for frame in frames:
            shifted = frame.received_us + copy_no * pause_min * 60_000_000
            for record in normalizer.normalize_text(frame.text, shifted):
                kind = L2 if record.topic == "md.l2" else TRADE
                value = dict(record.value)
                events.append((event_time_us(kind, value), f"sim.{record.topic}", 0,
                               len(events), kind, value))
    return events


def mid_by_hand(events: list[tuple], symbol: str, before_us: int | None) -> Decimal:
    """``symbol``'s mid from its L2 records received before ``before_us`` (all: None),
    rebuilt without the engine's book."""
    bids: dict[Decimal, Decimal] = {}
    asks: dict[Decimal, Decimal] = {}
    for when, _, _, _, kind, record in sorted(events, key=lambda e: (e[0], e[3])):
        if kind != L2 or record["symbol"] != symbol or (before_us is not None
                                                        and when >= before_us):
            continue
        if record["snapshot"]:
            bids.clear()
            asks.clear()
        for change in record["changes"]:
            side = bids if change["side"] == "BID" else asks
            price, quantity = Decimal(change["price"]), Decimal(change["quantity"])
            if quantity:
                side[price] = quantity
            else:
                side.pop(price, None)
    return (max(bids) + min(asks)) / 2


def test_mid_quoter_on_two_demo_captures_reports_filusd_and_the_pause_as_a_gap(shared_data):
    events = capture_twice(shared_data)
    strategy = load_strategy("pipeline.strategy:MidQuoter",
                             {"symbol": "FILUSD", "spread_bps": 10, "tick": "0.0001"})
    result = backtest_events(strategy, events, fill="book")
    assert len(result.marks) == 10 and result.trades  # ten symbols replayed, FILUSD traded
    assert report.traded_symbols(result) == ["FILUSD"]
    stats = report.compute_stats(result)
    first_label = result.equity_labels_ms[0]
    first = mid_by_hand(events, "FILUSD", (first_label + 1000) * 1000)
    last = mid_by_hand(events, "FILUSD", None)
    assert report.buy_and_hold(result)["FILUSD"]["first"] == first
    assert stats["Buy & Hold Return [%]"] == pytest.approx(float((last / first - 1) * 100),
                                                           rel=1e-12)
    gaps = report.find_gaps(result.equity_labels_ms)
    ((a, b),) = gaps
    assert 30 * 60_000 < b - a < 32 * 60_000
    out = screenshot_dir("mid-quoter")
    files = report.write_outputs(out, result, stats, {}, "MidQuoter FILUSD (two demo runs)",
                                 html=True)
    assert_no_point_inside_gaps(report.plot_frame(result), gaps)
    saved = json.loads(files["stats"].read_text())
    assert saved["stats"]["Symbols"] == "FILUSD" and saved["stats"]["Gaps"] == 1
    assert list(saved["per_symbol"]) == ["FILUSD"]
    assert saved["per_symbol"]["FILUSD"]["trades"] == len(result.trades)
    page = files["html"].read_text()
    assert "buy &amp; hold: equal-weight FILUSD (book mid)" in page
