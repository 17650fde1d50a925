"""Reading the market-data archive: frames for research, SQL, and the backtest's source.

The archive group (``consumers/archive.py``) writes ``md.l2``, ``md.trades`` and ``bars``
(and optionally ``raw.frames``) of a namespace to Parquet under
``<run dir>/parquet/<namespace>/archive`` (layout and guarantees:
:mod:`pipeline.sinks.archive`). Here:

* :func:`read` returns one topic as a pandas (or polars) frame, decimals exact;
* :func:`connect` opens DuckDB with one view per topic (``l2``, ``l2_changes``,
  ``trades``, ``bars``, ``frames``), :func:`query` runs SQL on it;
* :class:`ArchiveSource` reads archived records in the order Kafka held them and hands
  them to the same :class:`~pipeline.backtest.engine.EventMerger` as the Kafka source, so a
  backtest over an archived range gives the same trades as over the topics.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.backtest.engine import Event, EventMerger, event_time_us
from pipeline.core.errors import PipelineError
from pipeline.kafka.catalog import Namespace, split_topic
from pipeline.replay.ranges import Offsets, TimeLike, to_ms, utc_text
from pipeline.replay.source import ReadStats, kind_of_topic
from pipeline.sinks.archive import (
    ARCHIVED,
    DECIMAL_FIELDS,
    TEXT_SUFFIX,
    ArchiveError,
    arrow_schema,
    check_ordered,
    data_files,
    read_table,
    record_fields,
    utc_day,
)

__all__ = ["ArchiveError", "ArchiveSource", "VIEWS", "archive_root", "connect", "query", "read",
           "read_records", "resolve_root"]

# DuckDB view -> archived topic
VIEWS = {"l2": "md.l2", "trades": "md.trades", "bars": "bars", "frames": "raw.frames"}


def archive_root(namespace: Namespace | str, run_dir: str | Path | None = None) -> Path:
    """``<run dir>/parquet/<namespace>/archive`` (the run dir from the settings)."""
    from pipeline.ops.settings import Settings

    return Settings.from_env(run_dir).run_dir / "parquet" / str(Namespace(str(namespace))) \
        / "archive"


def resolve_root(namespace: Namespace | str, run_dir: str | Path | None,
                 root: str | Path | None) -> Path:
    """``root`` when given, else the namespace's :func:`archive_root`."""
    return Path(root) if root is not None else archive_root(namespace, run_dir)


def _days(start_ms: int | None, end_ms: int | None) -> tuple[str | None, str | None]:
    """The UTC days whose files can hold records stamped in [start, end).

    Files are dated by the record's own time, which can trail its Kafka timestamp (a
    backfill, a late trade): a day of slack on each side, the exact filter is on rows."""
    day = 86_400_000
    return (None if start_ms is None else utc_day(start_ms - day),
            None if end_ms is None else utc_day(end_ms + day))


def _table(root: Path, topic: str, symbols: Sequence[str] | None = None,
           start_ms: int | None = None, end_ms: int | None = None) -> pa.Table:
    """Every archived row of ``topic`` (catalog name), in (partition, offset) order."""
    schema = arrow_schema(topic)
    first_day, last_day = _days(start_ms, end_ms)
    files = data_files(root, topic, symbols, first_day, last_day)
    tables = [read_table(f).cast(schema) for f in files]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    if start_ms is not None or end_ms is not None:
        stamps = table.column("kafka_timestamp").cast(pa.int64())
        keep = pa.array(np.ones(table.num_rows, dtype=bool))
        if start_ms is not None:
            keep = pc.and_(keep, pc.greater_equal(stamps, start_ms))
        if end_ms is not None:
            keep = pc.and_(keep, pc.less(stamps, end_ms))
        table = table.filter(keep)
    table = table.sort_by([("kafka_partition", "ascending"), ("kafka_offset", "ascending")])
    check_ordered(table, f"the archive of {topic} under {root}")
    return table.combine_chunks()


# --------------------------------------------------------------------------- frames


def read(topic: str, namespace: Namespace | str = "sim", *, symbols: Sequence[str] | None = None,
         start: TimeLike = None, end: TimeLike = None, run_dir: str | Path | None = None,
         root: str | Path | None = None, frame: str = "pandas", text: bool = False) -> Any:
    """One archived topic (``md.trades``, ``md.l2``, ``bars``, ``raw.frames``, or the view
    names ``trades``, ``l2``, ...) as a frame in Kafka order, records stamped in
    ``[start, end)``. Decimals are exact (``decimal.Decimal`` in pandas, ``Decimal(38, 18)``
    in polars); with ``text`` the ``<field>__text`` columns (the decimals as sent) stay."""
    name = VIEWS.get(topic, topic)
    if name not in ARCHIVED:
        raise PipelineError(f"{topic} is not archived: read one of "
                            f"{', '.join([*VIEWS, *ARCHIVED])}")
    table = _table(resolve_root(namespace, run_dir, root), name, symbols, to_ms(start, "start"),
                   to_ms(end, "end"))
    if not text:
        table = _drop_text(table)
    if frame == "polars":
        import polars as pl

        return pl.from_arrow(table)
    if frame != "pandas":
        raise PipelineError(f"frame {frame!r}: use pandas or polars")
    return table.to_pandas()


def _drop_text(table: pa.Table) -> pa.Table:
    keep = [n for n in table.column_names if not n.endswith(TEXT_SUFFIX)]
    table = table.select(keep)
    if "changes" in keep:  # L2: the nested levels too
        changes = table.column("changes").combine_chunks()
        inner = changes.type.value_type
        fields = [f for f in inner if not f.name.endswith(TEXT_SUFFIX)]
        values = changes.flatten()
        struct = pa.StructArray.from_arrays([values.field(f.name) for f in fields],
                                            fields=fields)
        offsets = pc.subtract(changes.offsets, changes.offsets[0])
        table = table.set_column(keep.index("changes"), "changes",
                                 pa.ListArray.from_arrays(offsets, struct))
    return table


# --------------------------------------------------------------------------- SQL


def connect(namespace: Namespace | str = "sim", *, run_dir: str | Path | None = None,
            root: str | Path | None = None):
    """A DuckDB connection with a view per archived topic that has files: ``l2`` (one row
    per frame), ``l2_changes`` (one row per level change), ``trades``, ``bars``,
    ``frames``; decimals are ``DECIMAL(38,18)``, times ``TIMESTAMP WITH TIME ZONE``.
    (A product of two such decimals can overflow 38 digits: cast to ``DOUBLE`` for
    arithmetic such as VWAP, or to a narrower ``DECIMAL`` to stay exact.)"""
    import duckdb

    base = resolve_root(namespace, run_dir, root)
    con = duckdb.connect()
    con.execute("SET TimeZone='UTC'")
    for view, topic in VIEWS.items():
        files = data_files(base, topic)
        if not files:
            continue
        listed = ", ".join("'" + str(f).replace("'", "''") + "'" for f in files)
        hidden = [n + TEXT_SUFFIX for n in (f["name"] for f in record_fields(topic))
                  if n in DECIMAL_FIELDS]
        exclude = f" EXCLUDE ({', '.join(hidden)})" if hidden else ""
        source = f"read_parquet([{listed}], hive_partitioning=false, union_by_name=true)"
        con.execute(f"CREATE VIEW {view} AS SELECT *{exclude} FROM {source}")
        if topic == "md.l2":
            con.execute(
                "CREATE VIEW l2_changes AS SELECT kafka_partition, kafka_offset, "
                "kafka_timestamp, symbol, snapshot, received_ts_us, exchange_ts_ms, "
                "c.side AS side, c.price AS price, c.quantity AS quantity FROM "
                f"(SELECT *, unnest(changes) AS c FROM {source})")
    return con


def query(sql: str, namespace: Namespace | str = "sim", *, run_dir: str | Path | None = None,
          root: str | Path | None = None):
    """Run ``sql`` over :func:`connect`'s views. DuckDB's errors become
    one-line :class:`PipelineError` messages. Returns an Arrow table (``.to_pandas()``)."""
    import duckdb

    con = connect(namespace, run_dir=run_dir, root=root)
    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as exc:
        message = " ".join(str(exc).split())
        raise PipelineError(f"query failed: {message}") from None
    finally:
        con.close()


# --------------------------------------------------------------------------- records


def _column(table: pa.Table | pa.StructArray, name: str, avro: Any) -> list:
    values = table.column(name) if isinstance(table, pa.Table) else table.field(name)
    kind = avro if not isinstance(avro, list) else next(t for t in avro if t != "null")
    if name in DECIMAL_FIELDS and kind == "string":
        values = table.column(name + TEXT_SUFFIX) if isinstance(table, pa.Table) \
            else table.field(name + TEXT_SUFFIX)
        return values.to_pylist()
    if isinstance(kind, dict) and kind.get("logicalType", "").startswith("timestamp"):
        return values.cast(pa.int64()).to_pylist()
    if isinstance(kind, dict) and kind.get("type") == "array":
        items = kind["items"]
        array = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        offsets = array.offsets.to_pylist()
        base = offsets[0]
        flat = array.flatten()
        inner = [(f["name"], _column(flat, f["name"], f["type"])) for f in items["fields"]]
        names = [n for n, _ in inner]
        entries = [dict(zip(names, row)) for row in zip(*(v for _, v in inner))]
        return [entries[a - base:b - base] for a, b in zip(offsets, offsets[1:])]
    return values.to_pylist()


def _record_rows(table: pa.Table, fields: list[dict]) -> list[dict]:
    """The archived rows as the records Kafka held (decimals as the text that was sent)."""
    if not table.num_rows:
        return []
    names = [f["name"] for f in fields]
    columns = [_column(table, f["name"], f["type"]) for f in fields]
    return [dict(zip(names, row)) for row in zip(*columns)]


def read_records(root: str | Path, topic: str, start_ms: int | None = None,
                 end_ms: int | None = None) -> Iterator[tuple[int, int, int, dict]]:
    """``(partition, offset, kafka timestamp ms, record)`` of an archived catalog topic, in
    partition and offset order, records as Kafka held them (a topology replay from the
    archive re-publishes these)."""
    table = _table(Path(root), topic, None, start_ms, end_ms)
    records = _record_rows(table, record_fields(topic))
    parts = table.column("kafka_partition").to_pylist()
    offs = table.column("kafka_offset").to_pylist()
    stamps = table.column("kafka_timestamp").cast(pa.int64()).to_pylist()
    yield from zip(parts, offs, stamps, records)


# --------------------------------------------------------------------------- backtests


@dataclass
class ArchivePlan:
    """One (topic, partition) of an archive read: ``first``/``end`` are offsets archived."""

    topic: str
    partition: int
    first: int
    end: int
    rows: int


class ArchiveSource:
    """The backtest's source over the archive, interchangeable with
    :class:`~pipeline.replay.source.ReplaySource`: the same events (topic, partition,
    offset, kind, record) through the same merge.

    A time range is on Kafka record timestamps, as from Kafka: per partition, records from
    the first one stamped at or after ``start`` up to the first one stamped at or after
    ``end``, stamped inside the range. ``offsets`` windows ``{(topic, partition): (first,
    end)}`` work as there too.
    """

    def __init__(self, root: str | Path, topics: Sequence[str], *, start_ms: int | None = None,
                 end_ms: int | None = None, offsets: Offsets | None = None,
                 batch_size: int = 20_000) -> None:
        if not topics:
            raise PipelineError("nothing to replay: no topics given")
        self.root = Path(root)
        self.topics = list(dict.fromkeys(topics))
        self.start_ms, self.end_ms, self.offsets = start_ms, end_ms, offsets or {}
        self.batch_size = batch_size
        self.kinds = {t: kind_of_topic(t) for t in self.topics}
        self.stats = ReadStats()
        self._tables: dict[str, pa.Table] = {}
        self.plan: list[ArchivePlan] = []
        for topic in self.topics:
            parsed = split_topic(topic)
            name = parsed[1].name if parsed else topic
            if name not in ARCHIVED:
                raise PipelineError(f"{topic} is not archived: the archive holds "
                                    f"{', '.join(ARCHIVED)}")
            table = self._window(topic, _table(self.root, name))
            self._tables[topic] = table
            parts = table.column("kafka_partition").to_numpy()
            offs = table.column("kafka_offset").to_numpy()
            for p in np.unique(parts):
                mine = offs[parts == p]
                self.plan.append(ArchivePlan(topic, int(p), int(mine[0]), int(mine[-1]) + 1,
                                             len(mine)))
        self.total = sum(p.rows for p in self.plan)

    def _window(self, topic: str, table: pa.Table) -> pa.Table:
        """Kafka's range semantics on one topic's rows (see the class doc)."""
        if not table.num_rows:
            return table
        parts = table.column("kafka_partition").to_numpy()
        offs = table.column("kafka_offset").to_numpy()
        stamps = table.column("kafka_timestamp").cast(pa.int64()).to_numpy()
        keep = np.ones(table.num_rows, dtype=bool)
        for p in np.unique(parts):
            mine = parts == p
            window = self.offsets.get((topic, int(p)))
            if window is not None:
                keep &= ~mine | ((offs >= window[0]) & (offs < window[1]))
            if self.start_ms is not None:
                started = np.maximum.accumulate(stamps[mine] >= self.start_ms)
                keep[mine] &= started & (stamps[mine] >= self.start_ms)
            if self.end_ms is not None:
                ended = np.maximum.accumulate(stamps[mine] >= self.end_ms)
                keep[mine] &= ~ended
        if self.start_ms is not None or self.end_ms is not None:
            self.stats.skipped_time += int((~keep).sum())
        return table.filter(pa.array(keep))

    def batches(self, should_stop: Callable[[], bool] = lambda: False,
                progress: Callable[[int], None] | None = None) -> Iterator[list[Event]]:
        """Ordered batches of events until the plan is read (or ``should_stop()``);
        ``progress`` gets the summed read positions, as from the Kafka source. Partitions
        are decoded a slice at a time, in turns, so memory holds about what the merge is
        waiting for, not the range."""
        merger = EventMerger((p.topic, p.partition) for p in self.plan)
        # per source: [rows of it, position in them, running max event time, kind, fields]
        sources = []
        for topic, table in self._tables.items():
            kind, fields = self.kinds[topic], record_fields(split_topic(topic)[1].name)
            parts = table.column("kafka_partition").to_numpy()
            for plan in (p for p in self.plan if p.topic == topic):
                rows = table.take(pa.array(np.flatnonzero(parts == plan.partition)))
                sources.append([plan, rows, 0, -(1 << 62), kind, fields])
        base = sum(p.first for p in self.plan)
        done = 0
        while sources:
            if should_stop():
                return
            for source in sources:
                plan, rows, at, key, kind, fields = source
                piece = rows.slice(at, self.batch_size)
                events = []
                append = events.append
                topic, partition = plan.topic, plan.partition
                for offset, record in zip(piece.column("kafka_offset").to_pylist(),
                                          _record_rows(piece, fields)):
                    t = event_time_us(kind, record)
                    if t > key:
                        key = t
                    append((key, topic, partition, offset, kind, record))
                source[2], source[3] = at + piece.num_rows, key
                merger.extend(topic, partition, events)
                if source[2] >= rows.num_rows:
                    merger.finish(topic, partition)
                self.stats.records += len(events)
                self.stats.per_topic[topic] = self.stats.per_topic.get(topic, 0) + len(events)
                done += len(events)
            sources = [s for s in sources if s[2] < s[1].num_rows]
            ready = merger.ready()
            if progress is not None:
                progress(base + done)
            if ready:
                yield ready

    def in_time_order(self, chunk: int = 20_000) -> Iterator[tuple[int, str, int, int, dict]]:
        """``(kafka timestamp ms, topic, partition, offset, record)`` of the plan in Kafka
        timestamp order across partitions (ties by topic, partition, offset), each partition
        in its own order: what a topology replay re-publishes. Decoded a slice at a time."""
        order = {topic: i for i, topic in enumerate(self.topics)}

        def rows(topic: str, table: pa.Table) -> Iterator[tuple[int, int, int, int, dict]]:
            fields = record_fields(split_topic(topic)[1].name)
            for at in range(0, table.num_rows, chunk):
                piece = table.slice(at, chunk)
                stamps = piece.column("kafka_timestamp").cast(pa.int64()).to_pylist()
                offsets = piece.column("kafka_offset").to_pylist()
                partition = piece.column("kafka_partition")[0].as_py()
                for stamp, offset, record in zip(stamps, offsets, _record_rows(piece, fields)):
                    yield stamp, order[topic], partition, offset, record

        streams = []
        for topic, table in self._tables.items():
            parts = table.column("kafka_partition").to_numpy()
            for plan in (p for p in self.plan if p.topic == topic):
                mine = table.take(pa.array(np.flatnonzero(parts == plan.partition)))
                streams.append(rows(topic, mine))
        for stamp, index, partition, offset, record in heapq.merge(*streams,
                                                                   key=lambda r: r[:4]):
            yield stamp, self.topics[index], partition, offset, record

    def describe_empty(self) -> str:
        spans = []
        for topic in self.topics:
            name = split_topic(topic)[1].name
            table = _table(self.root, name)
            if not table.num_rows:
                spans.append(f"the archive holds no {topic} under {self.root}")
                continue
            stamps = table.column("kafka_timestamp").cast(pa.int64())
            spans.append(f"the archive's {topic} holds records stamped "
                         f"{utc_text(pc.min(stamps).as_py())} to "
                         f"{utc_text(pc.max(stamps).as_py())}")
        return "; ".join(spans)

    def close(self) -> None:
        self._tables.clear()

    def __enter__(self) -> "ArchiveSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
