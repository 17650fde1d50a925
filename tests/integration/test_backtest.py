"""Backtests over Kafka topics: parity with backtesting.py, determinism, bad input, sweeps,
book-driven fills, the event-time merge: the tests that need Kafka (those that do not:
tests/unit/backtest/test_backtest.py)."""

from __future__ import annotations

import json
import math
import random
import re
import warnings
from decimal import Decimal

import numpy as np
import pandas as pd
import pytest

from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Encoder
from pipeline.backtest.config import BacktestConfig
from pipeline.backtest.report import COMPARABLE, buy_and_hold, find_gaps
from pipeline.backtest.run import run_backtest, sweep
from pipeline.core.cluster import Cluster
from pipeline.core.errors import PipelineError
from pipeline.kafka.catalog import Namespace, ensure_topics
from pipeline.kafka.clients import ReliableProducer
from pipeline.ops.settings import REPO_ROOT
from pipeline.strategy import FULL_EQUITY
from producers.csv_bars import load_csv_bars
from tests.conftest import SHARED_DATA
from tests.support.processes import cli, cluster_env
from tests.unit.backtest.test_backtest import l2  # noqa: F401 - shared with the unit tests

CSV = SHARED_DATA / "BTCUSD_GEMINI_1h.csv"


SMA = "pipeline.strategy:SmaCross"


PARITY = {"fast": 10, "slow": 20, "amount": None, "fraction": FULL_EQUITY}


@pytest.fixture(scope="module")
def bars_ns(kafka, registry) -> Namespace:
    """The real hourly file, loaded once into a namespace of this module."""
    if not CSV.exists():
        pytest.skip(f"real data not found at {CSV} (../shared/data beside the repo)")
    namespace = Namespace(f"sim-bt{random.Random().getrandbits(40):010x}")
    report = load_csv_bars(CSV, kafka, registry.url, namespace)
    assert report.published == 32_842
    return namespace


def reference_run(allow_short: bool = True, fast: int = 10, slow: int = 20):
    """backtesting.py's SmaCross example on the same file: ascending OHLCV, 0.2%
    commission, 1,000,000 cash, market orders at the next open, finalize_trades=True."""
    from backtesting import Backtest, Strategy
    from backtesting.lib import crossover

    def sma(values, n):
        return pd.Series(values).rolling(n).mean()

    class Cross(Strategy):
        n1, n2 = fast, slow

        def init(self):
            self.sma1 = self.I(sma, self.data.Close, self.n1)
            self.sma2 = self.I(sma, self.data.Close, self.n2)

        def next(self):
            if crossover(self.sma1, self.sma2):
                self.position.close()
                self.buy()
            elif crossover(self.sma2, self.sma1):
                self.position.close()
                if allow_short:
                    self.sell()

    data = pd.read_csv(CSV, parse_dates=["Date"], index_col="Date").sort_index()
    data = data[["Open", "High", "Low", "Close", "Volume"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # prices above cash, float index warnings
        return Backtest(data, Cross, cash=1_000_000, commission=0.002,
                        finalize_trades=True).run()


def end_offset(kafka: str, topic: str, partition: int) -> int:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": kafka, "group.id": "test-backtest"})
    try:
        return consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1]
    finally:
        consumer.close()


def assert_same_stat(key, ours, theirs):
    if isinstance(theirs, (pd.Timestamp, pd.Timedelta)) or theirs is pd.NaT:
        assert (pd.isna(ours) and pd.isna(theirs)) or ours == theirs, key
    elif isinstance(theirs, (int, np.integer)):
        assert ours == theirs, key
    elif theirs is None or (isinstance(theirs, float) and math.isnan(theirs)):
        assert ours is None or math.isnan(ours), key
    else:
        assert ours == pytest.approx(float(theirs), rel=1e-6, abs=1e-9), key


def render_report(path, screenshot) -> dict:
    """Open a report in headless Chromium; what its figure drew (markers named entries and
    exits, candles, price/equity/drawdown rows) and the ``data-trades`` hook. Fails on any
    console error; saves a screenshot."""
    from tests.support.browser import WatchedPage, chromium

    with chromium() as browser:
        watched = WatchedPage(browser)
        try:
            watched.page.goto(path.as_uri())
            watched.page.wait_for_selector("#chart.js-plotly-plot", timeout=120_000)
            watched.page.wait_for_function(
                "() => document.querySelector('#chart .main-svg g.trace.boxes path')",
                timeout=120_000)
            drawn = watched.page.evaluate("""() => {
                const gd = document.getElementById('chart');
                const count = name => gd.data.filter(t => t.name === name)
                    .reduce((n, t) => n + t.x.length, 0);
                return {entries: count('entries'), exits: count('exits'),
                        hook: Number(gd.dataset.trades),
                        candles: gd._fullData.filter(t => t.type === 'candlestick')
                            .reduce((n, t) => n + t.x.length, 0),
                        rows: Object.keys(gd._fullLayout).filter(
                            k => /^yaxis\\d*$/.test(k)).length};
            }""")
            watched.page.screenshot(path=str(screenshot))
        finally:
            watched.close()
    assert watched.errors == []
    return drawn


@pytest.mark.broker
@pytest.mark.parametrize("allow_short", [True, False], ids=["long-short", "long-only"])
def test_parity_with_backtesting_py_on_the_real_hourly_file(kafka, registry, bars_ns, tmp_path,
                                                            allow_short):
    out = tmp_path / "out"
    ours = run_backtest(BacktestConfig(SMA, bars_ns, {**PARITY, "allow_short": allow_short},
                                       cash="1000000", commission="0.002", fill="next-open"),
                        Cluster(kafka, registry.url), out_dir=out, html=True)
    theirs = reference_run(allow_short)
    trades = theirs["_trades"]
    mine = ours.engine.trades
    assert len(mine) == len(trades) > 500
    for t, row in zip(mine, trades.itertuples()):
        assert (int(t.size), t.entry_bar, t.exit_bar) == (row.Size, row.EntryBar, row.ExitBar)
        assert float(t.entry_price) == row.EntryPrice and float(t.exit_price) == row.ExitPrice
        assert pd.Timestamp(t.entry_ms, unit="ms") == row.EntryTime
        assert pd.Timestamp(t.exit_ms, unit="ms") == row.ExitTime
        assert float(t.pnl) == pytest.approx(row.PnL, rel=1e-9, abs=1e-6)
        assert float(t.commission) == pytest.approx(row.Commission, rel=1e-9)
        assert float(t.return_pct) == pytest.approx(row.ReturnPct, rel=1e-9, abs=1e-12)
    assert float(ours.final_equity) == pytest.approx(theirs["Equity Final [$]"], rel=1e-9)
    for key in COMPARABLE:
        assert_same_stat(key, ours.stats[key], theirs[key])
    # the frame and the files
    frame = ours.trades
    assert list(frame["Size"]) == list(trades["Size"].astype(float))
    assert sorted(p.name for p in out.iterdir()) == ["equity.csv", "equity.png",
                                                    "equity_plot.csv", "report.html",
                                                    "stats.json", "trades.csv"]
    # What the report says it covers: the one symbol, the whole file, its gaps as gaps.
    assert ours.stats["Symbols"] == ours.engine.primary == "BTCUSD"
    assert ours.stats["Buy & Hold Of"].startswith("equal-weight BTCUSD (bar close)")
    gaps = find_gaps(ours.engine.equity_labels_ms)
    assert ours.stats["Gaps"] == len(gaps)
    plotted = pd.read_csv(out / "equity_plot.csv", parse_dates=["time"])
    assert len(plotted) == len(ours.engine.equity) + len(gaps)
    times = plotted["time"].astype("int64") // 10**6
    for a, b in gaps:
        assert plotted[(times > a) & (times < b)]["equity"].isna().all()
    shots = REPO_ROOT / "run" / "test-screenshots" / "report-truth" / f"smacross-{allow_short}"
    shots.mkdir(parents=True, exist_ok=True)
    for name in ("equity.png", "report.html", "stats.json"):
        (shots / name).write_bytes((out / name).read_bytes())
    # The interactive report draws in a browser: one entry and one exit marker per trade of
    # backtesting.py's list, a candle per bar, no console error.
    drawn = render_report(out / "report.html", shots / "report.png")
    assert drawn == {"entries": len(trades), "exits": len(trades), "hook": len(trades),
                     "candles": len(ours.engine.bars), "rows": 3}
    assert len(ours.engine.bars) == 32_842
    assert (out / "trades.csv").read_text() == ours.trades_csv
    assert (out / "equity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "stats.json").read_text())["summary"]
    assert summary["final_equity"] == str(ours.final_equity) and not summary["interrupted"]
    assert summary["events"] == 32_842


@pytest.mark.broker
def test_same_inputs_give_byte_identical_trades_and_stats(kafka, registry, bars_ns, tmp_path):
    config = BacktestConfig(SMA, bars_ns, {"fast": 7, "slow": 30, "amount": "0.5"},
                            commission="0.001", slippage="0.0005")
    runs = [run_backtest(config, Cluster(kafka, registry.url), out_dir=tmp_path / f"run{i}")
            for i in range(2)]
    a, b = runs
    assert len(a.engine.trades) > 100
    assert a.trades_csv == b.trades_csv
    assert (tmp_path / "run0" / "trades.csv").read_bytes() == \
        (tmp_path / "run1" / "trades.csv").read_bytes()
    assert (tmp_path / "run0" / "equity.csv").read_bytes() == \
        (tmp_path / "run1" / "equity.csv").read_bytes()
    assert json.loads((tmp_path / "run0" / "stats.json").read_text())["stats"] == \
        json.loads((tmp_path / "run1" / "stats.json").read_text())["stats"]
    assert a.final_equity == b.final_equity
    # a fixed amount of 0.5 BTC: the trade sizes are exactly it
    assert {t.size for t in a.engine.trades} == {Decimal("0.5"), Decimal("-0.5")}


@pytest.mark.broker
def test_a_time_range_is_resolved_with_offsets_for_times(kafka, registry, bars_ns):
    start, end = "2018-01-01", "2018-07-01T00:00:00Z"
    cluster = Cluster(kafka, registry.url)
    result = run_backtest(BacktestConfig(SMA, bars_ns, PARITY, start, end), cluster)
    first, last = result.stats["Start"], result.stats["End"]
    assert first == pd.Timestamp("2018-01-01 00:00") and last == pd.Timestamp("2018-06-30 23:00")
    assert result.engine.events == (pd.Timestamp(end).tz_localize(None) -
                                    pd.Timestamp(start)) // pd.Timedelta("1h")
    # an offset range: the same bars as the first 1000 of the file
    partition = next(p for p in range(6) if end_offset(kafka, bars_ns.topic("bars"), p))
    by_offsets = run_backtest(BacktestConfig(
        SMA, bars_ns, PARITY, offsets={(bars_ns.topic("bars"), partition): (0, 1000)}), cluster)
    assert by_offsets.engine.events == 1000
    assert by_offsets.stats["Start"] == pd.Timestamp("2015-10-08 15:00")


@pytest.mark.broker
def test_bad_input_is_one_clear_error_and_writes_nothing(kafka, registry, bars_ns, namespace,
                                                         tmp_path):
    out = tmp_path / "out"

    def fails(match, *args, **kwargs):
        with pytest.raises(PipelineError, match=match):
            run_backtest(BacktestConfig(*args, **kwargs), Cluster(kafka, registry.url),
                         out_dir=out)
        assert not out.exists()
        assert list(tmp_path.iterdir()) == [], "no temporary directory left behind"

    fails(r"no records to replay in .*bars between 2030-01-01 .* holds records stamped "
          r"2015-10-08 15:00:00 UTC to 2019-07-08 00:00:00 UTC",
          SMA, bars_ns, PARITY, start="2030-01-01", end="2031-01-01")
    fails(r"topic\(s\) .*\.bars do not exist", SMA, namespace, PARITY)
    fails("does not take these parameters", SMA, bars_ns, {"speed": 3})
    fails("need 0 < fast < slow", SMA, bars_ns, {"fast": 20, "slow": 10})
    fails("exactly one of amount and fraction", SMA, bars_ns, {"fraction": "0.5"})
    fails("unknown fill model", SMA, bars_ns, PARITY, fill="close")
    fails("cannot replay .*dlq", SMA, bars_ns, PARITY, topics=["dlq"])
    fails("not epoch ms or an ISO date-time", SMA, bars_ns, PARITY, start="yesterday")
    # a strategy that raises: which strategy, which record
    fails(r"strategy tests.support.backtest_strategies:RaisesAt \(id raises-at\) raised "
          r"ZeroDivisionError in on_bar on sim-\w+\.bars\[\d\]@98 \(event time "
          r"1444672800000000 µs, bar .*start_ms=1444669200000.*"
          r"unlucky bar", "tests.support.backtest_strategies:RaisesAt", bars_ns,
          {"start_ms": 1444669200000})  # the 99th bar (offset 98): 2015-10-12 17:00 UTC
    # an existing, non-empty output directory is refused before anything runs
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PipelineError, match="exists and is not empty"):
        run_backtest(BacktestConfig(SMA, bars_ns, PARITY), Cluster(kafka, registry.url),
                     out_dir=out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.broker
def test_ctrl_c_stops_cleanly_and_reports_what_was_done(kafka, registry, bars_ns, tmp_path):
    out = tmp_path / "out"
    result = run_backtest(BacktestConfig("tests.support.backtest_strategies:CtrlCAt", bars_ns,
                                         {**PARITY, "at": 50}),
                          Cluster(kafka, registry.url), out_dir=out)
    assert result.interrupted
    assert 50 <= result.engine.events < 32_842
    summary = json.loads((out / "stats.json").read_text())["summary"]
    assert summary["interrupted"] and summary["events"] == result.engine.events
    assert (out / "trades.csv").exists() and (out / "equity.png").exists()


@pytest.mark.broker
def test_a_parameter_sweep_runs_in_processes_one_row_per_combination(kafka, registry, bars_ns):
    grid = {"fast": [5, 10], "slow": [20, 30]}
    cluster = Cluster(kafka, registry.url)
    table = sweep(BacktestConfig(SMA, bars_ns, {"amount": None, "fraction": FULL_EQUITY}), grid,
                  cluster, workers=2)
    assert list(zip(table["fast"], table["slow"])) == [(5, 20), (5, 30), (10, 20), (10, 30)]
    single = run_backtest(BacktestConfig(SMA, bars_ns, PARITY), cluster)
    row = table.iloc[2]
    assert row["# Trades"] == len(single.engine.trades)
    assert row["Equity Final (exact)"] == str(single.final_equity)
    assert row["Sharpe Ratio"] == pytest.approx(single.stats["Sharpe Ratio"])
    assert len(set(table["Equity Final (exact)"])) == 4
    with pytest.raises(PipelineError, match="fast < slow"):
        sweep(BacktestConfig(SMA, bars_ns, PARITY), {"fast": [10, 30]}, cluster)


@pytest.mark.broker
def test_mid_quoter_replays_the_capture_from_kafka_through_the_book_deterministically(
        kafka, registry, namespace, shared_data, tmp_path):
    from pipeline.gemini.capture import received_frames
    from pipeline.gemini.marketdata import V2Normalizer

    ensure_topics(kafka, namespace, ["md.l2", "md.trades"])
    registry_client = SchemaRegistry(registry.url)
    encoders = {name: Encoder(registry_client, namespace.topic(name))
                for name in ("md.l2", "md.trades")}
    producer = ReliableProducer(kafka)
    normalizer = V2Normalizer("c")
    counts = {"md.l2": 0, "md.trades": 0}
    for frame in received_frames(shared_data / "gemini_v2_l2_capture_2021-06-24.txt"):
        for record in normalizer.normalize_text(frame.text, frame.received_us):
            producer.produce(namespace.topic(record.topic), encoders[record.topic](record.value),
                             key=record.key)
            counts[record.topic] += 1
    producer.flush()
    params = {"symbol": "FILUSD", "tick": "0.0001", "spread_bps": 10, "requote_bps": 5}
    config = BacktestConfig("pipeline.strategy:MidQuoter", namespace, params, fill="book",
                            cash="100000")
    runs = [run_backtest(config, Cluster(kafka, registry.url)) for _ in range(2)]
    a, b = runs
    assert a.topics == [namespace.topic("md.l2"), namespace.topic("md.trades")]
    assert a.engine.by_kind["l2"] == counts["md.l2"] == 655
    assert a.engine.by_kind["trade"] == counts["md.trades"] == 516
    assert a.engine.snapshots_emitted > 50  # FILUSD's own: MidQuoter declares its symbol
    # Quotes rest, are replaced as the mid moves (cancelled first), and fill as makers when
    # FILUSD's buyers lift them.
    orders = a.engine.orders
    assert orders.submitted > 10 and orders.filled >= 3 and orders.cancelled >= 5
    assert len(a.engine.trades) >= 2 and a.engine.pending_orders <= 2
    assert a.trades_csv == b.trades_csv and a.final_equity == b.final_equity
    assert a.summary()["orders"] == b.summary()["orders"]
    # The report's benchmark is the symbol traded, not the topic's first one.
    assert a.stats["Symbols"] == "FILUSD" and a.stats["Buy & Hold Of"].startswith(
        "equal-weight FILUSD (book mid)")
    assert a.stats["Buy & Hold Return [%]"] == b.stats["Buy & Hold Return [%]"] == \
        buy_and_hold(a.engine)["FILUSD"]["return_pct"]
    # The command line with that day's symbol rules: MidQuoter's default 0.001 FIL is below
    # FILUSD's minimum of 0.1, so every order is refused as Gemini would, and nothing trades.
    out = tmp_path / "ruled"
    done = pipeline_cli(kafka, registry, "backtest", "pipeline.strategy:MidQuoter", "-n",
                        str(namespace), "--fill", "book", "--cash", "100000",
                        "--params", json.dumps(params), "--out", str(out), "--no-progress",
                        "--rules-file", str(shared_data / "gemini_rest_symbols_2021-06-24.txt"))
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "stats.json").read_text())
    assert report["stats"]["# Trades"] == 0
    orders = report["summary"]["orders"]
    assert orders["rejected"] == orders["submitted"] > 10 and orders["filled"] == 0


def pipeline_cli(kafka: str, registry, *args: str, timeout: float = 240):
    # PYTHONPATH: the test strategies live in tests/, as a user's would in their own package
    return cli(*args, env=cluster_env(kafka, registry.url, COLUMNS="200",
                                      PYTHONPATH=str(REPO_ROOT)), timeout=timeout)


@pytest.mark.broker
def test_the_backtest_command_prints_the_statistics_and_writes_the_same_trades(
        kafka, registry, bars_ns, tmp_path):
    out = tmp_path / "cli"
    done = pipeline_cli(kafka, registry, "backtest", SMA, "-n", str(bars_ns),
                        "--params", json.dumps(PARITY), "--out", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    api = run_backtest(BacktestConfig(SMA, bars_ns, PARITY), Cluster(kafka, registry.url))
    assert (out / "trades.csv").read_text() == api.trades_csv
    assert {p.name for p in out.iterdir()} == {"trades.csv", "equity.csv", "stats.json",
                                               "equity.png", "equity_plot.csv"}
    stats = json.loads((out / "stats.json").read_text())["stats"]
    assert stats["# Trades"] == len(api.engine.trades) == 1879
    assert re.search(r"# Trades\s*│\s*1879", done.stdout)
    assert f"final equity {api.final_equity}" in done.stdout
    assert "32,842 events" in done.stdout


@pytest.mark.broker
@pytest.mark.parametrize("args, message", [
    (["--topics", "no.such.topic"], "no.such.topic"),
    (["--start", "2001-01-01", "--end", "2001-02-01"], "no records to replay"),
    (["--params", "{fast: 1}"], "--params is not JSON"),
    (["--offsets", "bars:0:10"], "TOPIC:PARTITION:FROM-TO"),
    (["--params", json.dumps({**PARITY, "start_ms": 1})], "does not take these parameters"),
], ids=["unknown-topic", "empty-range", "bad-json", "bad-offsets", "bad-parameter"])
def test_the_backtest_command_fails_in_one_line_and_writes_nothing(kafka, registry, bars_ns,
                                                                   tmp_path, args, message):
    params = [] if "--params" in args else ["--params", json.dumps(PARITY)]
    out = tmp_path / "out"
    done = pipeline_cli(kafka, registry, "backtest", SMA, "-n", str(bars_ns), *params, *args,
                        "--out", str(out), "--no-progress")
    assert done.returncode == 1
    assert message in done.stderr and done.stderr.startswith("error:")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not out.exists()


@pytest.mark.broker
def test_a_strategy_that_raises_names_itself_and_the_record(kafka, registry, bars_ns, tmp_path):
    start_ms = 1444669200000  # the 99th bar
    out = tmp_path / "out"
    done = pipeline_cli(kafka, registry, "backtest",
                        "tests.support.backtest_strategies:RaisesAt", "-n", str(bars_ns),
                        "--params", json.dumps({"start_ms": start_ms}), "--out", str(out),
                        "--no-progress")
    assert done.returncode == 1
    assert "tests.support.backtest_strategies:RaisesAt" in done.stderr
    assert "ZeroDivisionError" in done.stderr and "unlucky bar" in done.stderr
    assert str(bars_ns.topic("bars")) in done.stderr
    assert not out.exists()


@pytest.mark.broker
def test_ctrl_c_in_the_command_exits_130_and_keeps_what_was_done(kafka, registry, bars_ns,
                                                                 tmp_path):
    out = tmp_path / "out"
    done = pipeline_cli(kafka, registry, "backtest", "tests.support.backtest_strategies:CtrlCAt",
                        "-n", str(bars_ns), "--params", json.dumps({**PARITY, "at": 200}),
                        "--out", str(out), "--no-progress")
    assert done.returncode == 130, done.stderr
    assert "interrupted after" in done.stdout
    summary = json.loads((out / "stats.json").read_text())["summary"]
    assert summary["interrupted"] and 200 <= summary["events"] < 32_842


@pytest.mark.broker
def test_the_backtest_command_sweeps_a_grid(kafka, registry, bars_ns, tmp_path):
    out = tmp_path / "sweep"
    done = pipeline_cli(kafka, registry, "backtest", SMA, "-n", str(bars_ns),
                        "--params", json.dumps({"amount": None, "fraction": FULL_EQUITY}),
                        "--grid", json.dumps({"fast": [10], "slow": [20, 30]}),
                        "--html", "--metric", "Sharpe Ratio", "--out", str(out),
                        "--no-progress")
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(out / "sweep.csv")
    # sweep.html: the metric over the grid, its cells the table's values
    page = (out / "sweep.html").read_text()
    assert '<div id="chart" data-metric="Sharpe Ratio" data-combinations="2">' in page
    figure = json.loads(re.search(r'<script id="figure" type="application/json">(.*?)</script>',
                                  page, re.S).group(1))
    (heat,) = figure["data"]
    assert (heat["type"], heat["y"], heat["x"]) == ("heatmap", ["10"], ["20", "30"])
    assert heat["z"][0] == pytest.approx(list(table["Sharpe Ratio"]), rel=1e-12)
    assert f"chart {out / 'sweep.html'}" in done.stdout
    assert list(zip(table["fast"], table["slow"])) == [(10, 20), (10, 30)]
    assert table["# Trades"].iloc[0] == 1879
    # what the rows cover, and the per-symbol columns
    assert list(table["Symbols"]) == ["BTCUSD"] * 2 and list(table["Gaps"]) == [0, 0]
    assert table["BTCUSD Trades"].iloc[0] == 1879
    assert list(table["BTCUSD Buy & Hold Return [%]"]) == list(table["Buy & Hold Return [%]"])
    assert "2 of 2 combination(s)" in done.stdout


