"""plot_live: the live equity chart breaks at stale rows and idle gaps, and its CSV says so.

Pure: PnL rows go through the real Parquet sink (PnlWriter / read_pnl), no Kafka.
"""

from __future__ import annotations

import csv
from decimal import Decimal
from pathlib import Path

import pytest

from pipeline.core.errors import PipelineError
from pipeline.ops.portfolio_plot import plot_live
from pipeline.sinks.pnl import PnlWriter, read_pnl

T0 = 1_717_200_000_000  # 2024-06-01T00:00:00Z


def row(seq: int, event_ms: int, equity: str | None, drawdown: str | None, *,
        strategy: str = "mom-1", realized: str = "0", fees: str = "0", fills: int = 0,
        halted: bool = False) -> dict:
    stale = equity is None
    return {"strategy_id": strategy, "seq": seq, "event_ms": event_ms, "trigger": "timer",
            "currency": "USD", "capital": "1000", "realized_pnl": realized,
            "unrealized_pnl": None if stale else "0", "fees": fees, "equity": equity,
            "peak_equity": None if stale else "1010", "drawdown": drawdown,
            "drawdown_pct": None if stale or drawdown is None else
            str(Decimal(drawdown) / Decimal("1010")),
            "daily_pnl": None if stale else "0", "exposure": None if stale else "0",
            "fills": fills, "stale": stale, "halted": halted,
            "stale_symbols": ["btcusd"] if stale else []}


# seq 3 is stale (no mark); between seq 5 and 6 the pipeline was stopped for 5 minutes.
ROWS = [
    row(1, T0, "1000", "0"),
    row(2, T0 + 10_000, "1010", "0", fills=1, fees="0.25"),
    row(3, T0 + 20_000, None, None, fills=1, fees="0.25"),
    row(4, T0 + 30_000, "997.5", "12.5", fills=2, fees="0.5", realized="-2"),
    row(5, T0 + 40_000, "1001.125", "8.875", fills=2, fees="0.5", realized="-2"),
    row(6, T0 + 340_000, "1003", "7", fills=3, fees="0.75", realized="1.5", halted=True),
    row(7, T0 + 350_000, "1004.5", "5.5", fills=3, fees="0.75", realized="1.5", halted=True),
]


@pytest.fixture
def frame(tmp_path: Path):
    root = tmp_path / "pnl"
    PnlWriter(root, fsync=False).write(ROWS + [row(1, T0, "50", "0", strategy="other")])
    return read_pnl(root)


def test_plot_live_writes_png_html_and_the_plotted_series(frame, tmp_path: Path) -> None:
    out = tmp_path / "plot"
    files = plot_live(frame, "mom-1", out)
    assert files == {"png": out / "equity.png", "html": out / "equity.html",
                     "csv": out / "equity.csv"}
    assert all(p.is_file() for p in files.values())
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with files["csv"].open(newline="") as f:
        lines = list(csv.DictReader(f))
    # 7 rows + 1 break row for the 300 s gap (halfway between seq 5 and 6).
    assert [r["time"] for r in lines] == [
        "2024-06-01T00:00:00Z", "2024-06-01T00:00:10Z", "2024-06-01T00:00:20Z",
        "2024-06-01T00:00:30Z", "2024-06-01T00:00:40Z", "2024-06-01T00:03:10Z",
        "2024-06-01T00:05:40Z", "2024-06-01T00:05:50Z"]
    nan_at = [i for i, r in enumerate(lines) if r["equity"] == "NaN"]
    assert nan_at == [2, 5]  # the stale row, the gap
    assert [i for i, r in enumerate(lines) if r["drawdown"] == "NaN"] == nan_at
    given = [Decimal(r["equity"]) for r in ROWS if r["equity"] is not None]
    assert [Decimal(r["equity"]) for r in lines if r["equity"] != "NaN"] == given
    assert [Decimal(r["drawdown"]) for r in lines if r["drawdown"] != "NaN"] == \
        [Decimal(r["drawdown"]) for r in ROWS if r["drawdown"] is not None]

    page = files["html"].read_text()
    assert "mom-1" in page and "USD" in page
    assert "12.5 USD" in page  # max drawdown
    assert "data:image/png;base64," in page
    assert "<th>Stale rows</th><td>1</td>" in page
    assert "<th>Halted</th><td>yes</td>" in page
    assert "<th>Fills</th><td>3</td>" in page


def test_a_shorter_gap_threshold_breaks_more(frame, tmp_path: Path) -> None:
    files = plot_live(frame, "mom-1", tmp_path / "plot", gap_s=5)
    with files["csv"].open(newline="") as f:
        equity = [r["equity"] for r in csv.DictReader(f)]
    # every step is >= 10 s apart now: a break between each two consecutive rows
    assert equity.count("NaN") == 1 + 6


def test_no_rows_or_only_stale_rows_raise(frame, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="no PnL rows for strategy 'missing'"):
        plot_live(frame, "missing", tmp_path / "a")
    with pytest.raises(PipelineError, match="no PnL rows"):
        plot_live(read_pnl(tmp_path / "empty"), "mom-1", tmp_path / "b")
    root = tmp_path / "stale"
    PnlWriter(root, fsync=False).write([row(1, T0, None, None), row(2, T0 + 1000, None, None)])
    with pytest.raises(PipelineError, match="all are stale"):
        plot_live(read_pnl(root), "mom-1", tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
