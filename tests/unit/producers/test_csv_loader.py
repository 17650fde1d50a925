"""The historical OHLCV loader: parsing and validation alone, then publishing to a real broker.

The tests that need Kafka: tests/integration/test_csv_loader.py."""

from __future__ import annotations

import csv
from datetime import datetime, timezone
from pathlib import Path

import pytest

from pipeline.core.errors import PipelineError
from producers.csv_bars import (
    CRYPTODATADOWNLOAD,
    INTERVALS_MS,
    SEED,
    RowProblem,
    parse_ohlcv_csv,
)

REAL = "BTCUSD_GEMINI_1h.csv"


REAL_ROWS = 32_842


# The real file writes two tiny volumes in exponent notation; they load as the exact plain
# decimal (through Decimal, never a float), so every one of its hours is published.
EXPONENT_ROWS = {"2015-12-21 04:00": ("8e-05", "0.00008"),
                 "2015-12-18 03:00": ("6.539e-05", "0.00006539")}


HOUR = 3_600_000


def ms(text: str) -> int:
    """Epoch ms of a UTC time written ``2019-07-08 00:00``."""
    return int(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()) * 1000


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def file_rows(path: Path) -> dict[int, list[str]]:
    """The real file read independently of the loader: start_ms -> [open..volume]."""
    with path.open(newline="") as f:
        return {ms(row["Date"]): [row[k] for k in ("Open", "High", "Low", "Close", "Volume")]
                for row in csv.DictReader(f)}


def check_real_bars(bars: list[dict], path: Path) -> None:
    assert len(bars) == REAL_ROWS
    starts = [bar["start_ms"] for bar in bars]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    assert starts[0] == ms("2015-10-08 15:00") and starts[-1] == ms("2019-07-08 00:00")
    assert set(range(starts[0], starts[-1] + HOUR, HOUR)) == set(starts), "no hour missing"
    rows = file_rows(path)
    for when, (written, plain) in EXPONENT_ROWS.items():
        assert rows[ms(when)][4] == written
        rows[ms(when)][4] = plain
    for bar in bars:
        assert bar["interval"] == "1h" and bar["end_ms"] == bar["start_ms"] + HOUR
        assert [bar[k] for k in ("open", "high", "low", "close", "volume")] == rows[bar["start_ms"]]
        assert (bar["symbol"], bar["source"], bar["filled"]) == ("BTCUSD", REAL, False)
        assert bar["trade_count"] is bar["vwap"] is bar["buy_volume"] is bar["sell_volume"] is None
    by_start = {bar["start_ms"]: bar for bar in bars}
    spot = {  # copied from the file by hand: the strings must survive byte for byte
        "2019-07-08 00:00": ("11475.07", "11540.33", "11469.53", "11506.43", "10.77073088"),
        "2019-07-07 23:00": ("11423.0", "11482.72", "11423.0", "11475.07", "32.99655899"),
        "2019-07-07 22:00": ("11526.25", "11572.74", "11333.59", "11423.0", "48.9377301868"),
        "2015-10-08 15:00": ("245.0", "245.0", "244.92", "244.92", "3.016925828"),
    }
    for when, ohlcv in spot.items():
        bar = by_start[ms(when)]
        assert (bar["open"], bar["high"], bar["low"], bar["close"], bar["volume"]) == ohlcv
    zero_volume = [bar for bar in bars if bar["volume"] == "0.0"]  # as the file writes it
    assert len(zero_volume) == 1066


def test_the_real_file_parses_to_every_hour_with_exact_strings(shared_data):
    parsed = parse_ohlcv_csv(shared_data / REAL)
    assert (parsed.format, parsed.symbol, parsed.interval, parsed.rows) == (SEED, "BTCUSD", "1h",
                                                                            REAL_ROWS)
    assert parsed.problems == []
    check_real_bars(parsed.bars, shared_data / REAL)


CDD = """https://www.CryptoDataDownload.com
Unix Timestamp,Date,Symbol,Open,High,Low,Close,Volume BTC,Volume USD
1562545800000,2019-07-08 00-AM,BTCUSD,11480.1,11490,11470.25,11485,1.25,14356.25
1562545500,2019-07-08 00-AM,BTCUSD,11475.07,11481,11475.07,11480.1,0.5,5740.05
1562545200000,2019-07-08 00-AM,BTCUSD,11470,11476,11469.53,11475.07,0.00000001,0.0001
1562544900,2019-07-08 00-AM,BTCUSD,11466.5,11471,11466.5,11470,0,0
"""


def test_cryptodatadownload_file_with_seconds_and_milliseconds(tmp_path):
    parsed = parse_ohlcv_csv(write(tmp_path / "Gemini_BTCUSD_5m.csv", CDD))
    assert (parsed.format, parsed.symbol, parsed.interval, parsed.rows) == (
        CRYPTODATADOWNLOAD, "BTCUSD", "5m", 4)
    assert parsed.problems == []
    assert [(b["start_ms"], b["end_ms"], b["open"], b["high"], b["low"], b["close"], b["volume"])
            for b in parsed.bars] == [
        (ms("2019-07-08 00:15"), ms("2019-07-08 00:20"), "11466.5", "11471", "11466.5", "11470",
         "0"),
        (ms("2019-07-08 00:20"), ms("2019-07-08 00:25"), "11470", "11476", "11469.53", "11475.07",
         "0.00000001"),
        (ms("2019-07-08 00:25"), ms("2019-07-08 00:30"), "11475.07", "11481", "11475.07",
         "11480.1", "0.5"),
        (ms("2019-07-08 00:30"), ms("2019-07-08 00:35"), "11480.1", "11490", "11470.25",
         "11485", "1.25"),
    ]
    assert {(b["interval"], b["source"], b["filled"]) for b in parsed.bars} == {
        ("5m", "Gemini_BTCUSD_5m.csv", False)}


def test_base_volume_is_found_whatever_the_column_order(tmp_path):
    text = (CDD.replace("Volume BTC,Volume USD", "Volume USD,Volume BTC")
            .replace("BTCUSD", "btc/usd"))
    parsed = parse_ohlcv_csv(write(tmp_path / "f.csv", text))
    assert parsed.symbol == "BTCUSD"
    assert [b["volume"] for b in parsed.bars] == ["0", "0.0001", "5740.05", "14356.25"]


@pytest.mark.parametrize("interval", list(INTERVALS_MS))
def test_the_interval_is_inferred_from_the_spacing(tmp_path, interval):
    step = INTERVALS_MS[interval]
    start = ms("2019-07-01 00:00")
    lines = [f"{datetime.fromtimestamp((start + i * step) / 1000, timezone.utc):%Y-%m-%d %H:%M:%S},"
             f"BTCUSD,10,11,9,10.5,{i}" for i in range(5)]
    # one gap (a missing bar) does not change the answer
    del lines[2]
    parsed = parse_ohlcv_csv(write(tmp_path / "f.csv", "Date,Symbol,Open,High,Low,Close,Volume\n"
                                   + "\n".join(reversed(lines)) + "\n"))
    assert parsed.interval == interval and parsed.problems == []
    assert [(b["start_ms"], b["end_ms"]) for b in parsed.bars] == [
        (start + i * step, start + (i + 1) * step) for i in (0, 1, 3, 4)]


def test_an_explicit_interval_wins_and_misaligned_rows_are_rejected(tmp_path):
    path = write(tmp_path / "f.csv", "Date,Symbol,Open,High,Low,Close,Volume\n"
                 "2019-07-02 00:00:00,BTCUSD,10,11,9,10,1\n"
                 "2019-07-01 12:00:00,BTCUSD,10,11,9,10,1\n"
                 "2019-07-01 00:00:00,BTCUSD,10,11,9,10,1\n")
    with pytest.raises(PipelineError, match="mostly 43200 s apart"):
        parse_ohlcv_csv(path)  # 12 h is no bar interval
    parsed = parse_ohlcv_csv(path, interval="1d")
    assert [b["start_ms"] for b in parsed.bars] == [ms("2019-07-01 00:00"), ms("2019-07-02 00:00")]
    assert parsed.problems == [RowProblem(3, "time 2019-07-01 12:00:00 UTC is not aligned to "
                                             "the 1d interval")]


BAD = """Date,Symbol,Open,High,Low,Close,Volume
2019-07-08 13:00:00,BTCUSD,100,101,99,100.5,1
2019-07-08 12:00:00,BTCUSD,100,100,100,100,0.25
2019-07-08 11:00:00,BTCUSD,100.5,101,99,100,1.5
2019-07-08 10:00:00,BTCUSD,100,99,101,100,1
2019-07-08 09:00:00,BTCUSD,0,101,99,100,1
2019-07-08 08:00:00,BTCUSD,102,101,99,100,1
2019-07-08 07:00:00,BTCUSD,100,101,99,100,-0.5
2019-07-08 06:00:00,BTCUSD,100,abc,99,100,1
2019-07-08 05:00:00,BTCUSD,100,101,99,100,2
2019-07-08 05:00:00,BTCUSD,100,101,99,100,3
2019-07-08 04:00:00,ETHUSD,100,101,99,100,1
2019-07-08 03:00:00,BTCUSD,100,101,99,100,0
2019-07-08 02:00:00,BTCUSD,1e2,101,99,100,1
2019-07-08 01:00:00,BTCUSD,"1,000.5",1001,99,100,1
yesterday,BTCUSD,100,101,99,100,1
2019-07-07 23:00:00,BTCUSD, 100.50 ,101.00,99,100.25,0.001
2019-07-07 22:00:00,BTCUSD,100,101,99,98,1
2019-07-07 21:00:00,BTCUSD,100,101,99,100

2019-07-07 20:00:00,BTCUSD,100,101,99,100,7
"""


BAD_PROBLEMS = [
    RowProblem(5, "high 99 is below low 101"),
    RowProblem(6, "open 0 is not positive"),
    RowProblem(7, "open 102 is outside [low 99, high 101]"),
    RowProblem(8, "volume -0.5 is negative"),
    RowProblem(9, "high 'abc' is not a decimal number"),
    RowProblem(11, "duplicate timestamp 2019-07-08 05:00:00 UTC: line 10 has the same time"),
    RowProblem(12, "symbol 'ETHUSD' is not the file's symbol 'BTCUSD'"),
    RowProblem(15, "open '1,000.5' has a thousands separator"),
    RowProblem(16, "date 'yesterday' is not a date-time like 2019-07-08 00:00:00"),
    RowProblem(18, "close 98 is outside [low 99, high 101]"),
    RowProblem(19, "expected 7 fields, got 6"),
]


BAD_GOOD = [  # (start, open, high, low, close, volume) of the rows that must load, in time order
    ("2019-07-07 20:00", "100", "101", "99", "100", "7"),
    ("2019-07-07 23:00", "100.50", "101.00", "99", "100.25", "0.001"),
    ("2019-07-08 02:00", "100", "101", "99", "100", "1"),  # open written 1e2
    ("2019-07-08 03:00", "100", "101", "99", "100", "0"),
    ("2019-07-08 05:00", "100", "101", "99", "100", "2"),
    ("2019-07-08 11:00", "100.5", "101", "99", "100", "1.5"),
    ("2019-07-08 12:00", "100", "100", "100", "100", "0.25"),
    ("2019-07-08 13:00", "100", "101", "99", "100.5", "1"),
]


def ohlcv(bar: dict) -> tuple:
    return (bar["start_ms"], bar["open"], bar["high"], bar["low"], bar["close"], bar["volume"])


def test_bad_rows_are_reported_by_line_and_the_rows_around_them_kept(tmp_path):
    parsed = parse_ohlcv_csv(write(tmp_path / "bad.csv", BAD))
    assert parsed.problems == BAD_PROBLEMS
    assert [ohlcv(bar) for bar in parsed.bars] == [(ms(when), *rest) for when, *rest in BAD_GOOD]
    assert (parsed.rows, parsed.interval, parsed.symbol) == (19, "1h", "BTCUSD")


def test_an_expected_symbol_rejects_every_other(tmp_path):
    parsed = parse_ohlcv_csv(write(tmp_path / "bad.csv", BAD), symbol="ethusd", interval="1h")
    assert [ohlcv(bar) for bar in parsed.bars] == [(ms("2019-07-08 04:00"), "100", "101", "99",
                                                    "100", "1")]
    assert RowProblem(2, "symbol 'BTCUSD' is not the file's symbol 'ETHUSD'") in parsed.problems


def test_a_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(PipelineError, match=r"nope\.csv: no such file"):
        parse_ohlcv_csv(tmp_path / "nope.csv")


def test_an_unknown_header_is_one_clear_error(tmp_path):
    path = write(tmp_path / "trades.csv", "time,price,amount\n1562544000,11475.07,0.5\n")
    with pytest.raises(PipelineError) as err:
        parse_ohlcv_csv(path)
    message = str(err.value)
    assert str(path) in message and "unknown header on line 1" in message
    assert "Date,Symbol,Open,High,Low,Close,Volume" in message


@pytest.mark.parametrize("text, problem", [
    ("", "the file is empty"),
    ("\n  \n", "the file is empty"),
    ("Date,Symbol,Open,High,Low,Close,Volume\n", "no data rows after the header"),
    ("Date,Symbol,Open,High,Low,Close,Volume\n2019-07-08 00:00:00,BTCUSD,1,1,1,1,1\n",
     "fewer than two valid rows, cannot infer the bar interval"),
    ("Date,Symbol,Open,High,Low,Close,Volume\n2019-07-08 02:00:00,BTCUSD,1,1,1,1,1\n"
     "2019-07-08 00:00:00,BTCUSD,1,1,1,1,1\n", "rows are mostly 7200 s apart"),
])
def test_a_file_with_nothing_to_load_is_one_clear_error(tmp_path, text, problem):
    path = write(tmp_path / "f.csv", text)
    with pytest.raises(PipelineError, match=problem) as err:
        parse_ohlcv_csv(path)
    assert str(err.value).startswith(f"{path}: ")


def test_an_unknown_interval_is_refused(tmp_path):
    with pytest.raises(PipelineError, match="unknown interval '2h'"):
        parse_ohlcv_csv(write(tmp_path / "f.csv", BAD), interval="2h")


