"""Where the bars group keeps things on disk: Parquet files of closed bars, and checkpoints.

**Parquet layout.** Hive-style partitions, one file each::

    <root>/symbol=BTCUSD/interval=1m/date=2021-06-24/BTCUSD-1m-2021-06-24.parquet

``date`` is the UTC date of the bar's start. pandas (``pd.read_parquet(root)``), polars
(``pl.scan_parquet(root)`` or ``root/**/*.parquet``) and DuckDB
(``read_parquet('root/**/*.parquet', hive_partitioning=true)``) read it as it is, with
``symbol``, ``interval`` and ``date`` as columns from the paths.

**One file per partition, replaced atomically.** New bars are merged into the partition's
file by writing a complete new file to a staging directory beside the root (same file
system), fsyncing it and renaming it over the old one. A reader sees the old file or the
new one, never half of one and never both, so there is nothing to compact and no window
in which a bar is visible twice. Rows whose ``start_time`` is already in the file are
skipped, so writing the same bars again changes nothing: that is what makes a re-flush
after a crash harmless. (A partition holds at most 1,440 rows: 1m bars of one day.)

**Columns.** ``start_time``/``end_time`` are ``timestamp[ms, UTC]``. Prices and volumes are
``decimal128(38, 18)``: exact (a decimal type, not a float), numeric for every reader
(SQL ``sum``, comparisons and sorting work; strings would sort "10" before "9"), and one
type for every symbol. 18 places cover every Gemini tick and lot size (and the 12-place
VWAP) with 20 integer digits to spare; the group rejects trades with more places (they go
to the dead-letter topic) instead of rounding them. pandas gives ``decimal.Decimal``
objects, polars ``Decimal(38, 18)``, DuckDB ``DECIMAL(38,18)``.

**Checkpoints** (:class:`Checkpoints`) are small JSON files written the same atomic way.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.market.bars import INTERVALS_MS, Bar

PLACES = 18
DIGITS = 15  # integer digits of one trade's price or quantity; sums get 5 more
DECIMAL = pa.decimal128(38, PLACES)
TIME = pa.timestamp("ms", tz="UTC")
SCHEMA = pa.schema([
    ("start_time", TIME), ("end_time", TIME),
    ("open", DECIMAL), ("high", DECIMAL), ("low", DECIMAL), ("close", DECIMAL),
    ("volume", DECIMAL), ("trade_count", pa.int64()), ("vwap", DECIMAL),
    ("buy_volume", DECIMAL), ("sell_volume", DECIMAL), ("filled", pa.bool_()),
])
COLUMNS = [f.name for f in SCHEMA]
_DECIMALS = ("open", "high", "low", "close", "volume", "vwap", "buy_volume", "sell_volume")
_CKPT = re.compile(r"^ckpt-(\d{12})\.json$")


def staging_dir(root: Path) -> Path:
    """Temporary files of ``root``'s writes: a hidden sibling, so on the same file system
    (a rename is atomic only there) and never inside the dataset readers scan."""
    return root.parent / f".{root.name}.staging"


def utc_date(start_ms: int) -> str:
    """The UTC date of an epoch-ms time, as the partition paths spell it."""
    return datetime.fromtimestamp(start_ms / 1000, timezone.utc).strftime("%Y-%m-%d")


def partition_file(root: Path, symbol: str, interval: str, date: str) -> Path:
    return (root / f"symbol={symbol}" / f"interval={interval}" / f"date={date}"
            / f"{symbol}-{interval}-{date}.parquet")


def bars_table(bars: Iterable[Bar]) -> pa.Table:
    """Bars as an Arrow table of :data:`SCHEMA` (raises if a value does not fit exactly)."""
    rows = list(bars)
    columns: dict[str, list[Any]] = {
        "start_time": [b.start_ms for b in rows], "end_time": [b.end_ms for b in rows],
        "trade_count": [b.trade_count for b in rows], "filled": [b.filled for b in rows]}
    for name in _DECIMALS:
        columns[name] = [getattr(b, name) for b in rows]
    return pa.table({name: pa.array(columns[name], SCHEMA.field(name).type) for name in COLUMNS},
                    schema=SCHEMA)


@dataclass(frozen=True)
class WriteReport:
    added: int  # rows new to their file
    skipped: int  # rows already there (a repeated write)
    files: int  # partition files replaced


class BarWriter:
    """Merges bars into their partition files, each replaced atomically (see module doc).

    It remembers the tables of the files it wrote last, so a merge into a file it wrote
    does not read it back; a file changed by anyone else (its inode, size or mtime differ)
    is read again.
    """

    def __init__(self, root: Path, *, fsync: bool = True, cache_files: int = 256) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self._cache: OrderedDict[Path, tuple[tuple[int, int, int], pa.Table]] = OrderedDict()
        self._cache_files = cache_files
        _clear_stale(staging_dir(self.root))

    def write(self, bars: Iterable[Bar]) -> WriteReport:
        groups: dict[tuple[str, str, str], list[Bar]] = {}
        for bar in bars:
            groups.setdefault((bar.symbol, bar.interval, utc_date(bar.start_ms)), []).append(bar)
        added = skipped = files = 0
        for (symbol, interval, date), rows in sorted(groups.items()):
            path = partition_file(self.root, symbol, interval, date)
            old = self._read(path)
            if old is not None:
                have = set(old.column("start_time").cast(pa.int64()).to_pylist())
                fresh = [b for b in rows if b.start_ms not in have]
                skipped += len(rows) - len(fresh)
                if not fresh:
                    continue
                table = pa.concat_tables([old, bars_table(fresh)])
            else:
                fresh, table = rows, bars_table(rows)
            table = table.sort_by("start_time")
            added += len(fresh)
            _replace(path, lambda tmp: pq.write_table(table, tmp), staging_dir(self.root),  # noqa: B023 - _replace calls it at once
                     self.fsync)
            self._remember(path, table)
            files += 1
        return WriteReport(added, skipped, files)

    def _read(self, path: Path) -> pa.Table | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        cached = self._cache.get(path)
        if cached is not None and cached[0] == (st.st_ino, st.st_size, st.st_mtime_ns):
            self._cache.move_to_end(path)
            return cached[1]
        return pq.read_table(path, schema=SCHEMA)

    def _remember(self, path: Path, table: pa.Table) -> None:
        st = path.stat()
        self._cache[path] = ((st.st_ino, st.st_size, st.st_mtime_ns), table)
        self._cache.move_to_end(path)
        while len(self._cache) > self._cache_files:
            self._cache.popitem(last=False)


def _clear_stale(staging: Path, older_than_s: float = 3600) -> None:
    """Temporary files a killed writer left (other writers may share the directory: only
    files no live write could still own)."""
    if not staging.is_dir():
        return
    cutoff = time.time() - older_than_s
    for leftover in staging.iterdir():
        try:
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()
        except FileNotFoundError:
            pass


def write_bars(root: Path, bars: Iterable[Bar], *, fsync: bool = True) -> WriteReport:
    """Merge ``bars`` into their partition files (a one-off :class:`BarWriter`)."""
    return BarWriter(root, fsync=fsync).write(bars)


def _replace(path: Path, write, staging: Path, fsync: bool) -> None:
    """Write a file through ``write(tmp_path)`` and rename it over ``path`` atomically."""
    staging.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging / f"{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        write(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _utc_ms(when: Any) -> int:
    if isinstance(when, int):
        return when
    stamp = pd.Timestamp(when)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return int(stamp.value // 1_000_000)


def read_bars(root: str | Path, symbol: str, interval: str = "1m", start: Any = None,
              end: Any = None) -> pd.DataFrame:
    """Bars of one symbol and interval with ``start <= start_time < end``, oldest first.

    Indexed by ``start_time`` (UTC). Prices and volumes are exact ``decimal.Decimal``
    (scale 18: ``Decimal('302.750000000000000000') == Decimal('302.75')``); ``vwap`` is
    None for bars without volume. ``start``/``end``: anything ``pd.Timestamp`` takes (naive
    means UTC) or epoch milliseconds.
    """
    if interval not in INTERVALS_MS:
        raise ValueError(f"unknown interval {interval!r}: use one of {', '.join(INTERVALS_MS)}")
    lo = None if start is None else _utc_ms(start)
    hi = None if end is None else _utc_ms(end)
    base = Path(root) / f"symbol={symbol.upper()}" / f"interval={interval}"
    tables = []
    for folder in sorted(base.glob("date=*")):
        day = folder.name[len("date="):]
        if (lo is not None and day < utc_date(lo)) or (hi is not None and day > utc_date(hi)):
            continue
        tables += [pq.read_table(f, schema=SCHEMA) for f in sorted(folder.glob("*.parquet"))]
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    starts = table.column("start_time").cast(pa.int64())
    keep = pa.array([True] * table.num_rows, pa.bool_())
    if lo is not None:
        keep = pc.and_(keep, pc.greater_equal(starts, lo))
    if hi is not None:
        keep = pc.and_(keep, pc.less(starts, hi))
    return table.filter(keep).to_pandas().set_index("start_time").sort_index()


def read_all_bars(root: str | Path) -> list[Bar]:
    """Every bar under ``root`` (tests, tools), ordered by symbol, interval and start."""
    found = []
    for path in sorted(Path(root).glob("symbol=*/interval=*/date=*/*.parquet")):
        symbol = path.parts[-4][len("symbol="):]
        interval = path.parts[-3][len("interval="):]
        for row in pq.read_table(path, schema=SCHEMA).to_pylist():
            found.append(Bar(symbol, interval, _ms(row["start_time"]), _ms(row["end_time"]),
                             row["open"], row["high"], row["low"], row["close"], row["volume"],
                             row["trade_count"], row["vwap"], row["buy_volume"],
                             row["sell_volume"], row["filled"]))
    return sorted(found, key=lambda b: (b.symbol, INTERVALS_MS[b.interval], b.start_ms))


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)




# --------------------------------------------------------------------------- checkpoints


class Checkpoints:
    """Numbered JSON checkpoints of one partition of one group: ``ckpt-<seq>.json``.

    Writing one removes all but it and the one before: the newest may belong to a
    transaction whose outcome a restart has to find out, the one before never does.
    """

    def __init__(self, directory: Path, *, fsync: bool = True) -> None:
        self.directory = directory
        self.fsync = fsync

    def _path(self, seq: int) -> Path:
        return self.directory / f"ckpt-{seq:012d}.json"

    def seqs(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.directory.iterdir()
                      if (m := _CKPT.match(p.name)))

    def latest(self, n: int = 2) -> list[dict]:
        """Up to ``n`` newest checkpoints, oldest first."""
        return [json.loads(self._path(seq).read_text()) for seq in self.seqs()[-n:]]

    def write(self, checkpoint: dict) -> None:
        seq = checkpoint["seq"]
        data = json.dumps(checkpoint, separators=(",", ":")).encode()
        self.directory.mkdir(parents=True, exist_ok=True)
        _replace(self._path(seq), lambda tmp: tmp.write_bytes(data), self.directory / ".tmp",
                 self.fsync)
        for old in self.seqs():
            if old < seq - 1:
                self._path(old).unlink(missing_ok=True)

    def remove(self, seq: int) -> None:
        self._path(seq).unlink(missing_ok=True)

    def clear_staging(self) -> None:
        """Remove temporary files of writes that never finished (call while owning it)."""
        staging = self.directory / ".tmp"
        if staging.is_dir():
            for leftover in staging.iterdir():
                leftover.unlink(missing_ok=True)
