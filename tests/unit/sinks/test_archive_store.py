"""The archive's files without Kafka: rows, the journal protocol's recovery at each point,
compaction, damaged files, reading back the records exactly (pipeline/sinks/archive.py,
pipeline/replay/archive.py)."""

from __future__ import annotations

from decimal import Decimal

import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import PipelineError
from pipeline.replay import archive
from pipeline.sinks import archive as store
from pipeline.sinks.archive import ArchiveError, ArchiveWriter, compact, data_files, to_row

DAY = 86_400_000
T0 = 1_624_493_666_000  # 2021-06-24


def trade(tid: int, ts: int, price: str = "302.750", qty: str = "0.00001",
          symbol: str = "ALCXUSD") -> dict:
    return {"symbol": symbol, "trade_id": tid, "price": price, "quantity": qty,
            "taker_side": "BUY", "exchange_ts_ms": ts, "received_ts_us": ts * 1000 + 7,
            "connection_id": "c1", "sequence": tid, "from_snapshot": False,
            "exchange_ts_ns": None}


def l2(seq: int, ts_us: int, changes: list[tuple[str, str, str]], symbol: str = "BTCUSD",
       snapshot: bool = False) -> dict:
    return {"symbol": symbol, "snapshot": snapshot,
            "changes": [{"side": s, "price": p, "quantity": q} for s, p, q in changes],
            "exchange_ts_ms": None, "received_ts_us": ts_us, "connection_id": "c1",
            "sequence": seq, "event_id": None, "first_update_id": None,
            "last_update_id": None, "exchange_ts_ns": None}


def rows(topic: str, records: list[dict], partition: int = 0, first: int = 0) -> list[dict]:
    return [to_row(topic, r, partition, first + i, T0 + i) for i, r in enumerate(records)]


def back(root, topic: str) -> list[tuple[int, int, dict]]:
    return [(p, o, r) for p, o, _, r in archive.read_records(root, topic)]


class Died(BaseException):
    """Stands for the process dying at a protocol point (the kill -9 test is in
    tests/integration/test_archive.py)."""


def test_records_read_back_are_the_records_written_decimal_text_and_all(tmp_path):
    trades = [trade(1, T0, "302.750", "0.00001"), trade(2, T0 + 1, "5", "10.000000",
                                                          symbol="BTCUSD"),
              trade(3, T0 + DAY, "0.1", "1e-5")]  # the next day; exponent text stays text
    books = [l2(0, T0 * 1000, [("BID", "302.75", "0.5"), ("ASK", "303.10", "0")], snapshot=True),
             l2(1, T0 * 1000 + 5, []),  # a frame with no changes is a record too
             l2(2, T0 * 1000 + 9, [("ASK", "303.1", "2.50")])]
    ArchiveWriter(tmp_path, "md.trades").write(0, 0, 2, rows("md.trades", trades))
    ArchiveWriter(tmp_path, "md.l2").write(3, 10, 12, rows("md.l2", books, 3, 10))
    assert back(tmp_path, "md.trades") == [(0, i, t) for i, t in enumerate(trades)]
    assert back(tmp_path, "md.l2") == [(3, 10 + i, b) for i, b in enumerate(books)]
    # One file per symbol and day, named by partition and offsets, under Hive partitions.
    names = sorted(str(p.relative_to(tmp_path)) for p in data_files(tmp_path, "md.trades"))
    assert names == [
        "md.trades/symbol=ALCXUSD/date=2021-06-24/p0-000000000000-000000000002.parquet",
        "md.trades/symbol=ALCXUSD/date=2021-06-25/p0-000000000000-000000000002.parquet",
        "md.trades/symbol=BTCUSD/date=2021-06-24/p0-000000000000-000000000002.parquet"]
    # Columns are exact decimals for readers, the text beside them.
    frame = archive.read("trades", root=tmp_path)
    assert list(frame["price"]) == [Decimal("302.75"), Decimal("5"), Decimal("0.1")]
    assert frame["price"].iloc[0] == Decimal("302.750")
    assert list(frame["trade_id"]) == [1, 2, 3]
    schema = pq.read_schema(data_files(tmp_path, "md.trades")[0])
    assert str(schema.field("price").type) == "decimal128(38, 18)"
    assert str(schema.field("exchange_ts_ms").type) == "timestamp[ms, tz=UTC]"


def test_a_decimal_that_does_not_fit_exactly_is_refused_by_name():
    with pytest.raises(ArchiveError, match=r"md.trades\[2\]@7.price: '0.1234567890123456789' has "
                                           "more than 18 decimal places"):
        to_row("md.trades", trade(1, T0, "0.1234567890123456789"), 2, 7, T0)
    with pytest.raises(ArchiveError, match=r"changes\[0\].quantity: 'abc' is not a decimal"):
        to_row("md.l2", l2(0, T0 * 1000, [("BID", "1", "abc")]), 0, 0, T0)


@pytest.mark.parametrize("point", store.CRASH_POINTS)
def test_a_flush_killed_at_any_point_recovers_to_each_record_once(tmp_path, point, monkeypatch):
    first = [trade(i, T0 + i) for i in range(5)]
    second = [trade(i, T0 + i, symbol="BTCUSD" if i % 2 else "ALCXUSD") for i in range(5, 12)]
    ArchiveWriter(tmp_path, "md.trades").write(0, 0, 4, rows("md.trades", first))

    def die(at: str) -> None:
        if at == point:
            raise Died(at)

    monkeypatch.setattr(store, "crash_hook", die)
    with pytest.raises(Died):
        ArchiveWriter(tmp_path, "md.trades").write(0, 5, 11, rows("md.trades", second, 0, 5))
    monkeypatch.setattr(store, "crash_hook", lambda at: None)
    writer = ArchiveWriter(tmp_path, "md.trades")
    resume = writer.recover(0)
    if point == "staged":  # the journal never named the flush: it is read again
        assert resume == 5
        assert [o for _, o, _ in back(tmp_path, "md.trades")] == list(range(5))
        writer.write(0, 5, 11, rows("md.trades", second, 0, 5))
    else:  # the journal is the commit point: its files are put in place
        assert resume == 12
    assert back(tmp_path, "md.trades") == [(0, i, t) for i, t in enumerate(first + second)]
    assert not list((tmp_path / ".staging").rglob("*.parquet"))  # nothing left behind
    assert writer.recover(0) == 12  # and recovering again changes nothing


def test_a_file_named_by_the_journal_that_vanished_is_an_error_not_a_silent_gap(tmp_path,
                                                                                monkeypatch):
    monkeypatch.setattr(store, "crash_hook", lambda at: (_ for _ in ()).throw(Died(at))
                        if at == "journaled" else None)
    with pytest.raises(Died):
        ArchiveWriter(tmp_path, "md.trades").write(0, 0, 1, rows("md.trades", [trade(1, T0)]))
    for staged in (tmp_path / ".staging").rglob("*.parquet"):
        staged.unlink()
    with pytest.raises(ArchiveError, match="missing and was never staged"):
        ArchiveWriter(tmp_path, "md.trades").recover(0)


def test_a_truncated_file_is_named_and_never_read_as_data(tmp_path):
    ArchiveWriter(tmp_path, "md.trades").write(0, 0, 2, rows("md.trades", [
        trade(i, T0 + i) for i in range(3)]))
    path = data_files(tmp_path, "md.trades")[0]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArchiveError, match=f"{path} is not a complete Parquet file"):
        archive.read("trades", root=tmp_path)
    with pytest.raises(ArchiveError, match="not a complete Parquet file"):
        list(archive.read_records(tmp_path, "md.trades"))


def test_two_files_with_the_same_offsets_are_refused_not_counted_twice(tmp_path):
    ArchiveWriter(tmp_path, "md.trades").write(0, 0, 1, rows("md.trades", [
        trade(1, T0), trade(2, T0 + 1)]))
    [path] = data_files(tmp_path, "md.trades")
    (path.parent / "copy.parquet").write_bytes(path.read_bytes())
    with pytest.raises(ArchiveError, match="partition 0 offset 0 is archived twice"):
        archive.read("trades", root=tmp_path)


def test_compaction_merges_closed_days_and_a_killed_one_shows_nothing_twice(tmp_path):
    writer = ArchiveWriter(tmp_path, "md.trades")
    records = [trade(i, T0 + i * 1000) for i in range(9)]
    for part, lo in ((0, 0), (1, 3), (0, 6)):  # three flushes, two partitions
        writer.write(part, lo, lo + 2, rows("md.trades", records[lo:lo + 3], part, lo))
    today = [trade(99, T0 + 3 * DAY)]
    writer.write(2, 0, 0, rows("md.trades", today, 2))
    before = back(tmp_path, "md.trades")
    closed = tmp_path / "md.trades/symbol=ALCXUSD/date=2021-06-24"
    originals = {p.name: p.read_bytes() for p in closed.iterdir()}
    report = compact(tmp_path, before_day="2021-06-27")
    assert (report.directories, report.files_merged, report.files_written, report.rows) == \
        (1, 3, 1, 9)
    [merged] = [p.name for p in closed.iterdir()]
    assert merged.startswith("compact-")
    assert sorted(store._sources(closed / merged)) == sorted(originals) == [
        "p0-000000000000-000000000002.parquet", "p0-000000000006-000000000008.parquet",
        "p1-000000000003-000000000005.parquet"]
    assert back(tmp_path, "md.trades") == before  # the same records, the same order
    # A compaction killed after its rename, before its deletes: the originals are still
    # beside the compacted file; readers skip them and the next compaction deletes them.
    for name, data in originals.items():
        (closed / name).write_bytes(data)
    assert back(tmp_path, "md.trades") == before
    assert compact(tmp_path, before_day="2021-06-27").files_merged == 0
    assert [p.name for p in closed.iterdir()] == [merged]
    # DuckDB sees the same: no row twice.
    counted = archive.query("SELECT count(*) AS n, count(DISTINCT kafka_offset || '-' || "
                            "kafka_partition) AS d FROM trades", root=tmp_path).to_pylist()
    assert counted == [{"n": 10, "d": 10}]


def test_queries_run_on_views_named_after_the_topics_and_errors_are_one_line(tmp_path):
    ArchiveWriter(tmp_path, "md.trades").write(0, 0, 3, rows("md.trades", [
        trade(1, T0, "100", "1"), trade(2, T0 + 1000, "102", "3"),
        trade(3, T0 + 2000, "50", "2", symbol="BTCUSD"), trade(4, T0 + 3000, "51", "2",
                                                               symbol="BTCUSD")]))
    ArchiveWriter(tmp_path, "md.l2").write(0, 0, 0, rows("md.l2", [
        l2(0, T0 * 1000, [("BID", "99.5", "1"), ("ASK", "100.5", "2")], snapshot=True)]))
    vwap = archive.query("SELECT symbol, sum(price::DOUBLE * quantity::DOUBLE) / "
                         "sum(quantity::DOUBLE) AS vwap FROM trades GROUP BY symbol "
                         "ORDER BY symbol", root=tmp_path).to_pylist()
    assert [(r["symbol"], Decimal(str(r["vwap"])).quantize(Decimal("0.0001"))) for r in vwap] == \
        [("ALCXUSD", Decimal("101.5000")), ("BTCUSD", Decimal("50.5000"))]
    levels = archive.query("SELECT side, price, quantity FROM l2_changes ORDER BY side",
                           root=tmp_path).to_pylist()
    assert [(r["side"], r["price"], r["quantity"]) for r in levels] == [
        ("ASK", Decimal("100.5"), Decimal("2")), ("BID", Decimal("99.5"), Decimal("1"))]
    with pytest.raises(PipelineError, match=r"^query failed: .*nope") as info:
        archive.query("SELECT * FROM nope", root=tmp_path)
    assert "\n" not in str(info.value)
