"""Bar logic (pipeline/market/bars.py) on synthetic trades with known answers, and on real trades
from a Gemini capture against pandas ``resample``. No Kafka."""

from __future__ import annotations

import json
from decimal import ROUND_HALF_EVEN, Decimal, localcontext

import pandas as pd
import pytest

from pipeline.gemini.capture import received_frames
from pipeline.gemini.marketdata import V2Normalizer
from pipeline.market.bars import (
    INTERVALS_MS,
    Bar,
    BarBuilder,
    BarSettings,
    Emitted,
    build_bars,
    decimal_text,
    round_half_even,
)

DAY = 86_400_000
NOON = 1_624_492_800_000 + 12 * 3_600_000  # 2021-06-24 12:00:00 UTC
S, M = 1_000, 60_000


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: int = 0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def trade(tid: int, ts: int, price: str = "100", qty: str = "1", side: str = "BUY",
          symbol: str = "BTCUSD", snapshot: bool = False, conn: str = "c1", seq: int = 0) -> dict:
    return {"symbol": symbol, "trade_id": tid, "price": price, "quantity": qty,
            "taker_side": side, "exchange_ts_ms": ts, "received_ts_us": 0,
            "connection_id": conn, "sequence": seq if snapshot else tid, "from_snapshot": snapshot}


def by(bars: list[Bar], interval: str = "1m") -> dict[int, Bar]:
    return {b.start_ms: b for b in bars if b.interval == interval}


def only_1m(**kw) -> BarSettings:
    return BarSettings(intervals=("1m",), **kw)


# --------------------------------------------------------------------------- arithmetic


def test_decimal_text_is_canonical_plain():
    cases = {"302.750": "302.75", "100.00": "100", "1E+2": "100", "0.000": "0", "0": "0",
             "0.00001": "0.00001", "1E-8": "0.00000001", "12.5": "12.5"}
    assert {k: decimal_text(Decimal(k)) for k in cases} == cases


def test_vwap_rounds_half_even_at_12_places_exactly():
    assert round_half_even(Decimal("5"), Decimal("3")) == Decimal("1.666666666667")
    assert round_half_even(Decimal("1.0000000000005"), Decimal(1)) == Decimal("1.000000000000")
    assert round_half_even(Decimal("1.0000000000015"), Decimal(1)) == Decimal("1.000000000002")
    # Just above a half: a 60-digit quotient would round to ...5 and then to even; exact is up.
    tiny = Decimal("1.0000000000005" + "0" * 56 + "1")
    assert round_half_even(tiny, Decimal(1)) == Decimal("1.000000000001")


# --------------------------------------------------------------------------- bars


def test_known_bar_open_high_low_close_volume_vwap_and_sides():
    trades = [trade(1, NOON + 0, "0.1", "3", "BUY"),
              trade(2, NOON + 20 * S, "0.2", "0.3", "SELL"),
              trade(3, NOON + 40 * S, "0.15", "0.7", "UNKNOWN"),
              trade(4, NOON + 59_999, "0.12", "0.000001", "SELL")]
    bars, late, dups = build_bars(trades, only_1m())
    assert (late, dups) == ([], 0)
    assert [b.record() for b in bars] == [{
        "symbol": "BTCUSD", "interval": "1m", "start_ms": NOON, "end_ms": NOON + M,
        "open": "0.1", "high": "0.2", "low": "0.1", "close": "0.12",
        "volume": "4.000001", "trade_count": 4,
        # (0.3 + 0.06 + 0.105 + 0.00000012) / 4.000001 = 0.11625000093749976...
        "vwap": "0.116250000937", "buy_volume": "3", "sell_volume": "0.300001",
        "filled": False, "source": "trades"}]
    notional = Decimal("0.3") + Decimal("0.06") + Decimal("0.105") + Decimal("0.00000012")
    with localcontext() as ctx:
        ctx.prec = 80
        expected = (notional / Decimal("4.000001")).quantize(Decimal("1e-12"), ROUND_HALF_EVEN)
    assert bars[0].vwap == expected


def test_a_trade_exactly_on_a_boundary_opens_the_next_bar():
    bars, _, _ = build_bars([trade(1, NOON + 59_999, "1"), trade(2, NOON + M, "2")], only_1m())
    one = by(bars)
    assert one[NOON].close == Decimal(1) and one[NOON].trade_count == 1
    assert one[NOON + M].open == Decimal(2) and one[NOON + M].trade_count == 1


def test_open_and_close_go_by_exchange_time_not_arrival():
    trades = [trade(1, NOON + 30 * S, "2"), trade(2, NOON + 10 * S, "1"),
              trade(3, NOON + 50 * S, "4"), trade(4, NOON + 40 * S, "3")]
    bar = build_bars(trades, only_1m())[0][0]
    assert (bar.open, bar.close, bar.high, bar.low) == (1, 4, 4, 1)


def test_coarser_intervals_are_exact_aggregates_of_the_finest():
    trades = [trade(i, NOON + i * 7_919, f"{100 + (i * 37) % 23}.{i % 10}", f"0.{i:03d}",
                    "BUY" if i % 3 else "SELL") for i in range(1, 800)]
    bars, late, _ = build_bars(trades)  # 1m, 5m, 1h, 1d
    assert not late
    ones = sorted(by(bars, "1m").values(), key=lambda b: b.start_ms)
    for interval, length in (("5m", 5 * M), ("1h", 60 * M), ("1d", DAY)):
        for coarse in by(bars, interval).values():
            parts = [b for b in ones if coarse.start_ms <= b.start_ms < coarse.end_ms]
            assert coarse.end_ms - coarse.start_ms == length
            assert coarse.open == parts[0].open and coarse.close == parts[-1].close
            assert coarse.high == max(b.high for b in parts)
            assert coarse.low == min(b.low for b in parts)
            assert coarse.volume == sum(b.volume for b in parts)
            assert coarse.trade_count == sum(b.trade_count for b in parts)
            assert coarse.buy_volume == sum(b.buy_volume for b in parts)
    assert sum(b.trade_count for b in ones) == len(trades)
    assert sum(b.trade_count for b in by(bars, "1d").values()) == len(trades)


# --------------------------------------------------------------------------- lateness


def test_late_trade_within_the_allowed_lateness_still_counts():
    b = BarBuilder(only_1m(lateness_ms=5 * S), clock=Clock())
    out = Emitted()
    b.add(trade(1, NOON + 10 * S, "10"), out)
    b.add(trade(2, NOON + M + 4_999, "11"), out)  # event time 12:01:04.999: 12:00 still open
    b.add(trade(3, NOON + 30 * S, "9"), out)  # 34.999 s late, within lateness: counts
    assert not out.bars and not out.late
    b.add(trade(4, NOON + M + 5 * S, "12"), out)  # 12:01:05.000 = end + lateness: closes
    assert [bar.start_ms for bar in out.bars] == [NOON]
    assert out.bars[0].trade_count == 2 and out.bars[0].low == 9


def test_late_trade_beyond_the_lateness_goes_to_late_output_and_bar_stays():
    b = BarBuilder(BarSettings(lateness_ms=5 * S), clock=Clock())
    out = Emitted()
    for t in (trade(1, NOON + 10 * S, "10"), trade(2, NOON + M + 5 * S, "11")):
        b.add(t, out)
    closed = list(out.bars)
    assert [(x.interval, x.start_ms, x.trade_count) for x in closed] == [("1m", NOON, 1)]
    late = trade(3, NOON + 59 * S, "1", "5")
    b.add(late, out)
    assert out.late == [late]
    b.drain(out)
    one = by(out.bars)
    assert list(one) == [NOON, NOON + M] and one[NOON] == closed[0]  # never re-emitted
    # A late trade counts in no interval, so coarser bars stay aggregates of finer ones.
    assert by(out.bars, "5m")[NOON].trade_count == 2
    assert by(out.bars, "5m")[NOON].low == 10


def test_quiet_symbol_gets_its_last_bar_from_the_wall_clock():
    clock = Clock(NOON + 30 * S + 80)  # live: the wall clock runs 80 ms behind the exchange
    b = BarBuilder(BarSettings(intervals=("1m", "5m"), lateness_ms=5 * S), clock=clock)
    out = b.add(trade(1, NOON + 30 * S, "10"))
    clock.now = NOON + M + 5 * S + 79
    assert not b.advance(out).bars
    clock.now = NOON + M + 5 * S + 80  # wall clock passed the bar's end + lateness
    assert [(x.interval, x.start_ms) for x in b.advance(out).bars] == [("1m", NOON)]
    clock.now = NOON + 5 * M + 5 * S + 80
    assert [(x.interval, x.start_ms) for x in b.advance().bars] == [("5m", NOON)]
    assert b.add(trade(2, NOON + 4 * M, "1")).late  # its 1m bar closed by the wall clock


def test_replayed_history_is_closed_by_event_time_not_by_todays_clock():
    trades = [trade(i, NOON + i * 2 * S, str(100 + i % 7)) for i in range(1, 400)]
    clock = Clock(NOON + 5 * 365 * DAY)  # years later: a replay of history
    b = BarBuilder(clock=clock)
    out = Emitted()
    for t in trades:
        clock.now += 1
        b.add(t, out)
        b.advance(out)
    assert not out.late
    b.drain(out)
    assert out.bars == build_bars(trades)[0]


def test_forward_fill_off_skips_empty_intervals_and_on_fills_them():
    trades = [trade(1, NOON + 10 * S, "10"), trade(2, NOON + 3 * M + 10 * S, "12"),
              trade(3, NOON + 3 * M + 20 * S, "13")]
    bars, _, _ = build_bars(trades, only_1m())
    assert sorted(by(bars)) == [NOON, NOON + 3 * M]
    bars, _, _ = build_bars(trades, only_1m(fill_gaps=True))
    one = by(bars)
    assert sorted(one) == [NOON + i * M for i in range(4)]
    for start in (NOON + M, NOON + 2 * M):
        assert one[start].record() | {"start_ms": 0, "end_ms": 0} == {
            "symbol": "BTCUSD", "interval": "1m", "start_ms": 0, "end_ms": 0, "open": "10",
            "high": "10", "low": "10", "close": "10", "volume": "0", "trade_count": 0,
            "vwap": None, "buy_volume": "0", "sell_volume": "0", "filled": True,
            "source": "trades"}
    assert not one[NOON + 3 * M].filled and one[NOON + 3 * M].close == 13


def test_forward_fill_follows_the_wall_clock_for_a_quiet_symbol():
    clock = Clock(NOON + 10 * S)
    b = BarBuilder(only_1m(fill_gaps=True, lateness_ms=0), clock=clock)
    b.add(trade(1, NOON + 10 * S, "7"))
    clock.now = NOON + 3 * M + 1
    bars = b.advance().bars
    assert [(x.start_ms, x.filled, x.close) for x in bars] == [
        (NOON, False, 7), (NOON + M, True, 7), (NOON + 2 * M, True, 7)]


# --------------------------------------------------------------------------- snapshots


def test_snapshot_replay_is_deduped_and_applied_oldest_first():
    clock = Clock(0)
    b = BarBuilder(only_1m(), clock=clock)
    out = Emitted()
    for i in range(1, 6):  # live trades 1..5 on connection c1
        b.add(trade(i, NOON + i * S, str(10 + i)), out)
    # Reconnect: Gemini replays recent trades newest first; 6 and 7 happened in the gap.
    replay = [trade(i, NOON + i * S, str(10 + i), snapshot=True, conn="c2", seq=0)
              for i in (7, 6, 5, 4, 3)]
    for t in replay:
        b.add(t, out)
    b.add(trade(8, NOON + 8 * S, "18", conn="c2"), out)  # a live trade ends the run
    assert out.duplicates == 3 and not out.late
    b.drain(out)
    bar = out.bars[0]
    assert bar.trade_count == 8 and bar.volume == 8
    assert (bar.open, bar.close) == (11, 18)


def test_a_held_snapshot_run_is_applied_after_the_hold_time():
    clock = Clock(NOON)
    b = BarBuilder(only_1m(snapshot_hold_ms=1000), clock=clock)
    for t in (trade(3, NOON - 2 * S, "3", snapshot=True),
              trade(2, NOON - 3 * S, "2", snapshot=True)):
        b.add(t)
    clock.now += 999
    b.advance()
    assert b.open_bars() == 0
    clock.now += 1
    b.advance()
    assert b.open_bars() == 1
    bar = b.drain().bars[0]
    assert (bar.open, bar.close, bar.trade_count) == (2, 3, 2)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("change, message", [
    ({"price": "0"}, "not positive"), ({"price": "-1"}, "not positive"),
    ({"quantity": "-0.5"}, "negative"), ({"taker_side": "sell"}, "unknown taker_side"),
    ({"price": "1e5"}, "plain decimal"), ({"quantity": 3}, "plain decimal"),
    ({"exchange_ts_ms": None}, "integers"), ({"price": None}, "plain decimal"),
])
def test_invalid_trades_raise_value_error_and_change_nothing(change, message):
    b = BarBuilder(only_1m(), clock=Clock())
    b.add(trade(1, NOON, "10"))
    before = json.dumps(b.state(), sort_keys=True)
    with pytest.raises(ValueError, match=message):
        b.add(trade(2, NOON + S) | change)
    assert json.dumps(b.state(), sort_keys=True) == before


def test_missing_field_and_too_many_places_are_invalid():
    b = BarBuilder(only_1m(max_places=18, max_digits=15), clock=Clock())
    bad = trade(1, NOON)
    del bad["price"]
    with pytest.raises(ValueError, match="not a Trade record"):
        b.add(bad)
    with pytest.raises(ValueError, match="more than 18 decimal places"):
        b.add(trade(2, NOON, "0.0000000000000000001"))
    with pytest.raises(ValueError, match="more than 15 integer digits"):
        b.add(trade(3, NOON, "1", "1000000000000000"))
    b.add(trade(4, NOON, "999999999999999.000000000000000001", "0.000000000000000001"))


# --------------------------------------------------------------------------- state


def test_state_survives_json_and_continues_exactly():
    trades = [trade(i, NOON + i * 3_001, f"{50 + i % 13}.{i % 100:02d}", f"0.{i:04d}",
                    "SELL" if i % 4 else "BUY") for i in range(1, 1500)]
    trades[700:705] = [trade(t["trade_id"], t["exchange_ts_ms"], t["price"], snapshot=True,
                             conn="c9", seq=1) for t in reversed(trades[700:705])]
    whole = build_bars(trades, BarSettings(fill_gaps=True))
    b = BarBuilder(BarSettings(fill_gaps=True), clock=lambda: 0)
    out = Emitted()
    for t in trades[:702]:
        b.add(t, out)
    restored = BarBuilder.restore(json.loads(json.dumps(b.state())),
                                  BarSettings(fill_gaps=True), clock=lambda: 0)
    for t in trades[702:]:
        restored.add(t, out)
    restored.drain(out)
    assert (out.bars, out.late, out.duplicates) == whole


# --------------------------------------------------------------------------- real data


def capture_trades(path) -> list[dict]:
    normalizer = V2Normalizer("capture")
    found = []
    for frame in received_frames(path):
        found += [n.value for n in normalizer.normalize_text(frame.text, frame.received_us)
                  if n.topic == "md.trades"]
    return found


@pytest.mark.parametrize("interval, rule", [("1m", "1min"), ("5m", "5min"), ("1h", "1h")])
def test_capture_bars_match_pandas_resample(shared_data, interval, rule):
    trades = capture_trades(shared_data / "gemini_v2_l2_capture_2021-06-24.txt")
    assert len(trades) > 500 and sum(t["from_snapshot"] for t in trades) == 500
    bars, late, dups = build_bars(trades, BarSettings(intervals=(interval,)))
    assert (late, dups) == ([], 0)
    df = pd.DataFrame({"symbol": [t["symbol"] for t in trades],
                       "tid": [t["trade_id"] for t in trades],
                       "ts": [t["exchange_ts_ms"] for t in trades],
                       "price": [Decimal(t["price"]) for t in trades],
                       "qty": [Decimal(t["quantity"]) for t in trades]})
    df["notional"] = [p * q for p, q in zip(df.price, df.qty)]
    df = df.sort_values(["ts", "tid"], kind="stable")
    df.index = pd.to_datetime(df.ts, unit="ms", utc=True)
    expected = {}
    for symbol, group in df.groupby("symbol"):
        r = group.resample(rule)
        frame = pd.DataFrame({"open": r.price.first(), "high": r.price.max(),
                              "low": r.price.min(), "close": r.price.last(),
                              "volume": r.qty.sum(), "count": r.price.count(),
                              "notional": r.notional.sum()})
        for start, row in frame[frame["count"] > 0].iterrows():
            with localcontext() as ctx:
                ctx.prec = 80
                vwap = (row.notional / row.volume).quantize(Decimal("1e-12"), ROUND_HALF_EVEN)
            expected[(symbol, int(start.timestamp() * 1000))] = (
                row.open, row.high, row.low, row.close, row.volume, int(row["count"]), vwap)
    got = {(b.symbol, b.start_ms): (b.open, b.high, b.low, b.close, b.volume, b.trade_count,
                                    b.vwap) for b in bars}
    assert got == expected
    assert len(got) >= 10


# --------------------------------------------------------------------------- Parquet store


def test_parquet_writes_merge_into_one_file_per_partition_and_repeat_harmlessly(tmp_path):
    from pipeline.sinks.bars import BarWriter, read_all_bars, read_bars

    trades = [trade(i, NOON - 2 * 3_600_000 + i * 20_011, f"{100 + i % 9}.25", "0.5",
                    symbol="ETHUSD" if i % 3 else "BTCUSD") for i in range(1, 1200)]
    bars = build_bars(trades)[0]
    root = tmp_path / "bars"
    writer = BarWriter(root, fsync=False)
    first = writer.write(bars[: len(bars) // 2])
    second = writer.write(bars)  # overlaps the first half: a re-flush after a crash
    again = BarWriter(root).write(bars)  # a new process: reads the files back
    assert (first.added + second.added, second.skipped, again.added, again.skipped) == \
        (len(bars), len(bars) // 2, 0, len(bars))
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.parquet"))
    assert "symbol=BTCUSD/interval=1h/date=2021-06-24/BTCUSD-1h-2021-06-24.parquet" in files
    assert len(files) == len({(b.symbol, b.interval) for b in bars})  # one day each
    assert not list(tmp_path.glob(".bars.staging/*"))  # nothing half-written left behind
    assert read_all_bars(root) == sorted(
        bars, key=lambda b: (b.symbol, INTERVALS_MS[b.interval], b.start_ms))

    frame = read_bars(root, "btcusd", "5m", start="2021-06-24 11:30", end=NOON)
    want = [b for b in bars if b.symbol == "BTCUSD" and b.interval == "5m"
            and NOON - 30 * M <= b.start_ms < NOON]
    assert list(frame.index) == [pd.Timestamp(b.start_ms, unit="ms", tz="UTC") for b in want]
    assert list(frame.vwap) == [b.vwap for b in want] and isinstance(frame.vwap.iloc[0], Decimal)
    assert read_bars(root, "BTCUSD", "1m", start="2030-01-01").empty
