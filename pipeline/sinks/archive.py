"""The market-data archive on disk: topics' records as Parquet, exactly once, beyond retention.

**Layout.** One directory per archived catalog topic of a namespace, Hive-style partitions::

    <root>/md.trades/symbol=BTCUSD/date=2021-06-24/p3-000000000120-000000000499.parquet
    <root>/raw.frames/date=2021-06-24/p0-000000000000-000000000911.parquet
    <root>/bars/symbol=BTCUSD/month=2021-06/p0-000000000000-000000000719.parquet

(``<root>`` is ``<run dir>/parquet/<namespace>/archive``.) A file holds the records of one
Kafka partition over one offset range (the name says which), of one symbol and one UTC day
(the record's own time: a trade's exchange time, a frame's receive time), or for bars one
UTC month of bar starts.

**Columns.** ``kafka_partition``, ``kafka_offset`` and ``kafka_timestamp`` say where the
record was in the topic; then the record's fields as the Avro schema has them (times as
UTC timestamps). Prices and quantities are ``decimal128(38, 18)``, exact and numeric for
every reader, as the bars store has them, and the text Gemini sent is kept beside each as
``<field>__text`` (``"302.750"`` and ``"302.75"`` are one decimal but not one text), so a
record read back is the record that was written, byte for byte, and a backtest from the
archive equals one from Kafka.

**Exactly once, without transactions.** The archive is a pure function of its records, so
its own journal is the truth, not the group's committed offsets. A flush of one Kafka
partition's buffered records:

1. writes each file into ``<root>/.staging/`` and fsyncs it;
2. replaces ``<root>/_journal/<topic>/p<N>.json`` (atomically: the commit point) with the
   offset range and the files' staged and final paths;
3. renames each staged file into place;
4. marks the journal entry done.

A restart (:meth:`ArchiveWriter.recover`) finishes the renames of an entry not done,
removes staged files no journal names, and resumes reading at the entry's last offset + 1.
So a kill at any point loses nothing and writes nothing twice. A file that is not a whole
Parquet file (written outside this protocol, or damaged) is named by every reader, never
read as data.

**Compaction** (:func:`compact`) merges the small files of closed days (months) into one per
directory, which lists the files it replaces in its metadata; readers skip files a
compacted file lists, so a crash between its rename and the deletes shows nothing twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.avro import schemas
from pipeline.core.decimals import finite
from pipeline.core.errors import ArchiveError, PipelineError
from pipeline.kafka.catalog import spec
from pipeline.sinks.bars import DECIMAL, PLACES, _replace

# Fields of the archived records that hold exact decimal text.
DECIMAL_FIELDS = frozenset({"price", "quantity", "open", "high", "low", "close", "volume",
                            "vwap", "buy_volume", "sell_volume"})
TEXT_SUFFIX = "__text"
INTEGER_DIGITS = 38 - PLACES
KAFKA_FIELDS = [pa.field("kafka_partition", pa.int32(), nullable=False),
                pa.field("kafka_offset", pa.int64(), nullable=False),
                pa.field("kafka_timestamp", pa.timestamp("ms", tz="UTC"), nullable=False)]
SOURCES_KEY = b"archive.sources"  # a compacted file's metadata: the files it replaces
JOURNAL = "_journal"
STAGING = ".staging"


@dataclass(frozen=True)
class ArchivedTopic:
    """How one catalog topic is archived: its record type, whether files are split by
    symbol, which field dates a record (epoch ms, or µs when ``micros``), and the period a
    directory holds: ``date`` (a UTC day) for market data, ``month`` for bars (an hourly
    bar file per day would be 24 rows: years of them are thousands of tiny files)."""

    name: str
    by_symbol: bool
    time_field: str
    micros: bool = False
    period: str = "date"

    def period_of(self, ms: int) -> str:
        """The directory value of a record stamped ``ms``: ``YYYY-MM-DD`` or ``YYYY-MM``."""
        day = utc_day(ms)
        return day if self.period == "date" else day[:7]

    @property
    def record_type(self) -> str:
        return spec(self.name).value_schema or ""


ARCHIVED: dict[str, ArchivedTopic] = {t.name: t for t in (
    ArchivedTopic("md.l2", True, "received_ts_us", micros=True),
    ArchivedTopic("md.trades", True, "exchange_ts_ms"),
    ArchivedTopic("bars", True, "start_ms", period="month"),
    ArchivedTopic("raw.frames", False, "received_ts_us", micros=True),
)}


def archived(name: str) -> ArchivedTopic:
    """The archive's description of catalog topic ``name`` (e.g. ``md.trades``)."""
    try:
        return ARCHIVED[name]
    except KeyError:
        raise PipelineError(f"{name} is not archived: the archive holds "
                            f"{', '.join(ARCHIVED)}") from None


# --------------------------------------------------------------------------- the schema


def _arrow_type(avro: Any, name: str) -> tuple[pa.DataType, bool]:
    """The Arrow type of an Avro type (and whether it is nullable)."""
    if isinstance(avro, list):  # a union: ["null", X]
        others = [t for t in avro if t != "null"]
        if len(others) != 1:
            raise ArchiveError(f"field {name}: unions other than [null, X] are not archived")
        return _arrow_type(others[0], name)[0], True
    if isinstance(avro, dict):
        kind = avro["type"]
        if kind == "long" and avro.get("logicalType") == "timestamp-millis":
            return pa.timestamp("ms", tz="UTC"), False
        if kind == "long" and avro.get("logicalType") == "timestamp-micros":
            return pa.timestamp("us", tz="UTC"), False
        if kind == "enum":
            return pa.string(), False
        if kind == "array":
            return pa.list_(_arrow_type(avro["items"], name)[0]), False
        if kind == "record":
            return pa.struct(_fields(avro)), False
        return _arrow_type(kind, name)
    primitive = {"string": pa.string(), "long": pa.int64(), "int": pa.int32(),
                 "boolean": pa.bool_(), "double": pa.float64(), "float": pa.float32(),
                 "bytes": pa.binary()}
    if avro not in primitive:
        raise ArchiveError(f"field {name}: Avro type {avro!r} is not archived")
    return primitive[avro], False


def _fields(record: dict) -> list[pa.Field]:
    out = []
    for field in record["fields"]:
        arrow, nullable = _arrow_type(field["type"], field["name"])
        if field["name"] in DECIMAL_FIELDS and arrow == pa.string():
            out += [pa.field(field["name"], DECIMAL, nullable),
                    pa.field(field["name"] + TEXT_SUFFIX, pa.string(), nullable)]
        else:
            out.append(pa.field(field["name"], arrow, nullable))
    return out


def arrow_schema(topic: str) -> pa.Schema:
    """The Parquet schema of archived catalog topic ``topic``."""
    return pa.schema(KAFKA_FIELDS + _fields(schemas.load(archived(topic).record_type)))


def record_fields(topic: str) -> list[dict]:
    """The Avro fields of ``topic``'s records (what a record read back has)."""
    return schemas.load(archived(topic).record_type)["fields"]


def _exact(text: Any, where: str) -> Decimal | None:
    if text is None:
        return None
    number = finite(text)
    if number is None:
        raise ArchiveError(f"{where}: {text!r} is not a decimal")
    exponent = number.as_tuple().exponent
    if isinstance(exponent, int) and -exponent > PLACES:
        raise ArchiveError(f"{where}: {text!r} has more than {PLACES} decimal places")
    if number.adjusted() >= INTEGER_DIGITS:
        raise ArchiveError(f"{where}: {text!r} has more than {INTEGER_DIGITS} integer digits")
    return number


def _row_part(value: dict, fields: Sequence[dict], where: str) -> dict:
    row = {}
    for field in fields:
        name, avro = field["name"], field["type"]
        item = value.get(name)
        if name in DECIMAL_FIELDS and (avro == "string" or avro == ["null", "string"]):
            row[name] = _exact(item, f"{where}.{name}")
            row[name + TEXT_SUFFIX] = item
        elif isinstance(avro, dict) and avro.get("type") == "array" and \
                isinstance(avro["items"], dict) and avro["items"].get("type") == "record":
            inner = avro["items"]["fields"]
            row[name] = [_row_part(x, inner, f"{where}.{name}[{i}]")
                         for i, x in enumerate(item or ())]
        else:
            row[name] = item
    return row


def to_row(topic: str, record: Mapping[str, Any], partition: int, offset: int,
           timestamp_ms: int) -> dict:
    """One decoded record as an archive row (raises :class:`ArchiveError` on a decimal
    that does not fit exactly: such a record goes to the dead-letter topic)."""
    row = {"kafka_partition": partition, "kafka_offset": offset, "kafka_timestamp": timestamp_ms}
    row.update(_row_part(dict(record), record_fields(topic), f"{topic}[{partition}]@{offset}"))
    return row


# --------------------------------------------------------------------------- file placement


def utc_day(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d")


def _safe(value: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in value) or "_"


def placement(topic: ArchivedTopic, row: Mapping[str, Any]) -> tuple[str, ...]:
    """The partition directories of a row: (symbol=..., date=...) or (date=...) (``month=``
    for bars)."""
    stamp = row[topic.time_field]
    period = f"{topic.period}={topic.period_of(stamp // 1000 if topic.micros else stamp)}"
    if topic.by_symbol:
        return (f"symbol={_safe(str(row['symbol']))}", period)
    return (period,)


def file_name(partition: int, first: int, last: int) -> str:
    return f"p{partition}-{first:012d}-{last:012d}.parquet"


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class FlushReport:
    partition: int
    first: int
    last: int
    rows: int
    files: int


def _fsync(path: Path) -> None:
    """Make a file's (or a directory's entries') writes durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The protocol's points, in order; tests/support/archive_crash.py sets the hook to kill
# the process at one of them.
CRASH_POINTS = ("staged", "journaled", "renamed", "done")
crash_hook: Callable[[str], None] = lambda point: None  # noqa: E731


class ArchiveWriter:
    """Writes one archived topic's flushes with the journal protocol (see module doc).

    One writer owns a Kafka partition at a time (the group's assignment says which); its
    journal entry is that partition's resume point.
    """

    def __init__(self, root: Path, topic: str, *, fsync: bool = True,
                 compression: str = "zstd") -> None:
        self.root = Path(root)
        self.topic = archived(topic)
        self.schema = arrow_schema(topic)
        self.fsync = fsync
        self.compression = compression
        self.directory = self.root / topic
        self.journal_dir = self.root / JOURNAL / topic
        self.staging = self.root / STAGING / topic

    def _journal(self, partition: int) -> Path:
        return self.journal_dir / f"p{partition}.json"

    def _write_journal(self, partition: int, entry: dict) -> None:
        data = json.dumps(entry, separators=(",", ":")).encode()
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        _replace(self._journal(partition), lambda tmp: tmp.write_bytes(data),
                 self.journal_dir / ".tmp", self.fsync)

    def recover(self, partition: int) -> int | None:
        """Finish what a killed writer of ``partition`` left and return where reading
        resumes (None: nothing of it archived yet)."""
        path = self._journal(partition)
        entry = json.loads(path.read_text()) if path.exists() else None
        if entry is not None and not entry.get("done"):
            for staged, target in entry["files"]:
                self._move_in(self.root / staged, self.root / target)
            entry["done"] = True
            self._write_journal(partition, entry)
        if self.staging.is_dir():  # staged files of flushes that never reached the journal
            for leftover in self.staging.glob(f"p{partition}-*"):
                leftover.unlink(missing_ok=True)
        return None if entry is None else entry["last"] + 1

    def _move_in(self, staged: Path, target: Path) -> None:
        if staged.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
            if self.fsync:
                _fsync(target.parent)
        elif not target.exists() and not _covered(target):
            raise ArchiveError(f"the archive journal names {target}, which is missing and was "
                               f"never staged ({staged}): was the archive edited by hand?")

    def write(self, partition: int, first: int, last: int, rows: Sequence[dict]) -> FlushReport:
        """Archive ``rows`` (:func:`to_row` rows of Kafka partition ``partition``, offsets
        ``first``..``last``; records in between the group skipped, e.g. dead letters)."""
        groups: dict[tuple[str, ...], list[dict]] = {}
        for row in rows:
            groups.setdefault(placement(self.topic, row), []).append(row)
        self.staging.mkdir(parents=True, exist_ok=True)
        moves = []
        for dirs in sorted(groups):
            table = pa.Table.from_pylist(groups[dirs], schema=self.schema)
            staged = self.staging / f"p{partition}-{uuid.uuid4().hex}.parquet"
            pq.write_table(table, staged, compression=self.compression)
            if self.fsync:
                _fsync(staged)
            target = self.directory.joinpath(*dirs, file_name(partition, first, last))
            moves.append((staged, target))
        crash_hook("staged")
        entry = {"first": first, "last": last, "rows": len(rows), "done": False,
                 "files": [[str(s.relative_to(self.root)), str(t.relative_to(self.root))]
                           for s, t in moves]}
        self._write_journal(partition, entry)
        crash_hook("journaled")
        for staged, target in moves:
            self._move_in(staged, target)
            crash_hook("renamed")
        entry["done"] = True
        self._write_journal(partition, entry)
        crash_hook("done")
        return FlushReport(partition, first, last, len(rows), len(moves))


# --------------------------------------------------------------------------- reading


def _sources(path: Path) -> list[str]:
    """The files a compacted file replaces (empty for a flushed file)."""
    meta = file_metadata(path).metadata or {}
    return json.loads(meta[SOURCES_KEY]) if SOURCES_KEY in meta else []


def file_metadata(path: Path) -> pq.FileMetaData:
    try:
        return pq.read_metadata(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ArchiveError(f"{path} is not a complete Parquet file ({exc}): it was not "
                           "written by the archive (a crash mid-write outside its protocol, "
                           "or a damaged disk); move it out of the archive") from None


def _covered(target: Path) -> bool:
    if not target.parent.is_dir():
        return False
    return any(target.name in _sources(p) for p in target.parent.glob("compact-*.parquet"))


def live_files(directory: Path) -> list[Path]:
    """The data files of one partition directory: every file but those a compacted file
    in it replaces (a compaction killed before its deletes)."""
    files = sorted(directory.glob("*.parquet"))
    replaced: set[str] = set()
    for path in files:
        if path.name.startswith("compact-"):
            replaced.update(_sources(path))
    return [p for p in files if p.name not in replaced]


def _dir_matches(folder: Path, key: str, wanted: set[str] | None) -> bool:
    return wanted is None or folder.name[len(key) + 1:] in wanted


def data_files(root: Path, topic: str, symbols: Iterable[str] | None = None,
               start_day: str | None = None, end_day: str | None = None) -> list[Path]:
    """The live data files of ``topic`` under ``root``, optionally of ``symbols`` and of
    the UTC days ``start_day``..``end_day`` (inclusive, ``YYYY-MM-DD``)."""
    spec_ = archived(topic)
    base = Path(root) / topic
    wanted = None if symbols is None else {_safe(s.upper()) for s in symbols}
    folders = [base] if base.is_dir() else []
    if spec_.by_symbol:
        folders = [f for f in sorted(base.glob("symbol=*")) if _dir_matches(f, "symbol", wanted)]
    days = []
    for folder in folders:
        for day in sorted(folder.glob(f"{spec_.period}=*")):
            if not in_days(period_value(day), start_day, end_day):
                continue
            days.append(day)
    return [f for day in days for f in live_files(day)]


def period_value(directory: Path) -> str:
    """``2021-06-24`` of ``date=2021-06-24``, ``2021-06`` of ``month=2021-06``."""
    return directory.name.partition("=")[2]


def in_days(period: str, start_day: str | None, end_day: str | None) -> bool:
    """Whether a directory's period (a day, or a month: a prefix of its days) meets the
    days ``start_day``..``end_day`` (inclusive)."""
    cut = len(period)
    return not ((start_day and period < start_day[:cut]) or (end_day and period > end_day[:cut]))


def read_table(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """One archive file, naming it when it is not a whole Parquet file."""
    file_metadata(path)
    try:
        return pq.read_table(path, columns=list(columns) if columns else None)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ArchiveError(f"{path} cannot be read ({exc}): a damaged archive file; move it "
                           "out of the archive") from None


# --------------------------------------------------------------------------- compaction


@dataclass(frozen=True)
class CompactReport:
    directories: int
    files_merged: int
    files_written: int
    rows: int


def compact(root: Path, topics: Iterable[str] | None = None, *, before_day: str | None = None,
            fsync: bool = True) -> CompactReport:
    """Merge the files of each closed day (before ``before_day``, default today UTC; for
    bars each closed month) into one per directory, rows in (partition, offset) order. One
    compaction at a time per archive (a lock file); the group may keep writing meanwhile."""
    root = Path(root)
    before = before_day or datetime.now(timezone.utc).strftime("%Y-%m-%d")
    root.mkdir(parents=True, exist_ok=True)
    dirs = merged = written = rows = 0
    with open(root / ".compact.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArchiveError(f"another compaction of {root} is running") from None
        for topic in topics or ARCHIVED:
            schema = arrow_schema(topic)
            for day in sorted((root / topic).glob(f"**/{archived(topic).period}=*")):
                period = period_value(day)
                if period >= before[:len(period)]:
                    continue  # still open: today, or this month for bars
                files = live_files(day)
                stale = [p for p in day.glob("*.parquet") if p not in files]
                for old in stale:  # replaced by a compacted file, left by a killed compaction
                    old.unlink(missing_ok=True)
                if len(files) < 2:
                    continue
                table = pa.concat_tables([read_table(f).cast(schema) for f in files])
                table = table.sort_by([("kafka_partition", "ascending"),
                                       ("kafka_offset", "ascending")])
                sources = json.dumps([f.name for f in files]).encode()
                table = table.replace_schema_metadata({SOURCES_KEY: sources})
                target = day / f"compact-{uuid.uuid4().hex[:12]}.parquet"
                _replace(target, lambda tmp: pq.write_table(table, tmp, compression="zstd"),  # noqa: B023 - _replace calls it at once
                         root / STAGING / "compact", fsync)
                for old in files:
                    old.unlink()
                dirs, merged, written, rows = (dirs + 1, merged + len(files), written + 1,
                                               rows + table.num_rows)
    return CompactReport(dirs, merged, written, rows)


def check_ordered(table: pa.Table, where: str) -> None:
    """Refuse rows that repeat an offset of their partition (two writers of one partition,
    or files copied in by hand): the archive would otherwise count them twice."""
    if table.num_rows < 2:
        return
    parts = table.column("kafka_partition")
    offs = table.column("kafka_offset")
    same = pc.equal(parts.slice(1), parts.slice(0, table.num_rows - 1))
    repeat = pc.and_(same, pc.less_equal(offs.slice(1), offs.slice(0, table.num_rows - 1)))
    if pc.any(repeat).as_py():
        index = pc.index(repeat, True).as_py() + 1
        raise ArchiveError(f"{where}: partition {parts[index].as_py()} offset "
                           f"{offs[index].as_py()} is archived twice")

