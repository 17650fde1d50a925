"""Load historical OHLCV bars from a CSV file into the ``<namespace>.bars`` topic.

Two layouts are read:

* ``seed``: header ``Date,Symbol,Open,High,Low,Close,Volume``, dates like
  ``2019-07-08 00:00:00`` in UTC, newest first (``../shared/data/BTCUSD_GEMINI_1h.csv``);
* ``cryptodatadownload``: a banner line (``https://www.CryptoDataDownload.com``), then a
  header like ``Unix Timestamp,Date,Symbol,Open,High,Low,Close,Volume BTC,Volume USD``.
  Times come from the unix column (seconds or milliseconds, told apart per row by
  magnitude), because its ``Date`` column has changed format over the years.

Prices and volumes are published as the exact text in the file (only surrounding
whitespace trimmed). A value that is not a plain decimal (``[-]digits[.digits]``, see
schemas/README.md) rejects its row instead of being rewritten: rewriting would mean
guessing what the file meant. Every rejected row is reported with its line number and a
reason and never published; the rows around it still are.
"""

from __future__ import annotations

import csv
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Encoder
from pipeline.core.decimals import PLAIN, fixed
from pipeline.core.errors import PipelineError
from pipeline.kafka.catalog import Namespace, ensure_topics
from pipeline.kafka.clients import ReliableProducer
from pipeline.market.bars import INTERVALS_MS
from pipeline.ops.progress import progress_bar
from pipeline.replay.ranges import utc_text

SEED, CRYPTODATADOWNLOAD = "seed", "cryptodatadownload"
SEED_HEADER = "Date,Symbol,Open,High,Low,Close,Volume"
CDD_HEADER = "Unix Timestamp,Date,Symbol,Open,High,Low,Close,Volume <BASE>,Volume <QUOTE>"

# ASCII digits only (``\d`` also takes other scripts' digits, which Decimal reads).
_PLAIN_DECIMAL = PLAIN
_EXPONENT = re.compile(r"-?([0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+")
# An exponent beyond this is no price or volume (the bars store holds 38 digits); written
# out plain, ``1e999999999`` would be a string of a billion digits.
_MAX_EXPONENT = 38
_UNIX_COLUMNS = ("unix timestamp", "unix")
_PRICES = ("open", "high", "low", "close")
_FIELDS = _PRICES + ("volume",)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)
# Unix times below 1e11 are seconds (1e11 s is the year 5138, 1e11 ms is 1973).
_SECONDS_BELOW = 10**11
_MILLIS_BELOW = 10**14


@dataclass(frozen=True)
class RowProblem:
    """A row that was not loaded: its line in the file (1-based) and why."""

    line: int
    reason: str


@dataclass
class ParsedCsv:
    """A parsed file: the valid bars in ascending ``start_ms`` order, and every rejected row."""

    path: Path
    format: str  # SEED or CRYPTODATADOWNLOAD
    symbol: str
    interval: str
    rows: int  # data rows read (banner, header and blank lines not counted)
    bars: list[dict] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)


@dataclass(frozen=True)
class LoadReport:
    """What a load did; ``published`` counts records the brokers acknowledged."""

    path: Path
    topic: str
    format: str
    symbol: str
    interval: str
    rows_read: int
    published: int
    already: int  # valid bars that were in the topic already, so not published again
    problems: tuple[RowProblem, ...]
    first_start_ms: int | None
    last_start_ms: int | None
    parse_seconds: float
    publish_seconds: float

    @property
    def skipped(self) -> int:
        return len(self.problems)


@dataclass(frozen=True)
class _Columns:
    """Where each field sits in a row, and how to read its time."""

    format: str
    count: int
    time: int
    time_is_unix: bool
    symbol: int
    prices: tuple[int, int, int, int]
    volumes: tuple[tuple[str, int], ...]  # (currency or "", index) of each volume column


class _RowError(Exception):
    """One row's first problem; becomes a :class:`RowProblem`."""


# --------------------------------------------------------------------------- parsing


def parse_ohlcv_csv(path: str | Path, symbol: str | None = None,
                    interval: str | None = None) -> ParsedCsv:
    """Read and validate an OHLCV file; no Kafka involved.

    ``symbol`` is the symbol every row must carry (default: the one most rows carry).
    ``interval`` is the bar length (default: the most common gap between consecutive
    valid rows); rows not aligned to it in UTC are rejected, so bars never overlap.
    """
    path = Path(path)
    if interval is not None and interval not in INTERVALS_MS:
        raise PipelineError(f"unknown interval {interval!r}: use one of {', '.join(INTERVALS_MS)}")
    rows = _read_rows(path)
    columns, data = _header(path, rows)
    if not data:
        raise PipelineError(f"{path}: no data rows after the header")
    expected = _file_symbol(columns, data, symbol)
    volume = _volume_column(path, columns, expected)

    problems: list[RowProblem] = []
    candidates: list[tuple[int, int, tuple[str, ...]]] = []  # (line, start_ms, ohlcv)
    seen: dict[int, int] = {}  # start_ms -> line of the row kept
    for line, cells in data:
        try:
            start_ms, ohlcv = _row(columns, cells, expected, volume)
        except _RowError as exc:
            problems.append(RowProblem(line, str(exc)))
            continue
        if start_ms in seen:
            problems.append(RowProblem(line, f"duplicate timestamp {utc_text(start_ms)}: "
                                             f"line {seen[start_ms]} has the same time"))
            continue
        seen[start_ms] = line
        candidates.append((line, start_ms, ohlcv))

    name = interval or _infer_interval(path, candidates, problems)
    step = INTERVALS_MS[name]
    bars = []
    for line, start_ms, (o, h, low, c, v) in sorted(candidates, key=lambda cand: cand[1]):
        if start_ms % step:
            problems.append(RowProblem(line, f"time {utc_text(start_ms)} is not aligned to the "
                                             f"{name} interval"))
            continue
        bars.append({"symbol": expected, "interval": name, "start_ms": start_ms,
                     "end_ms": start_ms + step, "open": o, "high": h, "low": low, "close": c,
                     "volume": v, "trade_count": None, "vwap": None, "buy_volume": None,
                     "sell_volume": None, "filled": False, "source": path.name})
    problems.sort(key=lambda p: p.line)
    return ParsedCsv(path, columns.format, expected, name, len(data), bars, problems)


def _read_rows(path: Path) -> list[tuple[int, list[str]]]:
    """Every non-blank row with the file line it ends on."""
    if not path.exists():
        raise PipelineError(f"{path}: no such file")
    if not path.is_file():
        raise PipelineError(f"{path}: not a file")
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark.
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not a UTF-8 text file ({exc.reason} at byte "
                            f"{exc.start})") from None
    except csv.Error as exc:
        raise PipelineError(f"{path}: not a readable CSV file ({exc})") from None
    if not rows:
        raise PipelineError(f"{path}: the file is empty")
    return rows


def _header(path: Path, rows: list[tuple[int, list[str]]]
            ) -> tuple[_Columns, list[tuple[int, list[str]]]]:
    """The column layout and the data rows; the first line may be a one-cell banner."""
    columns = _columns(rows[0][1])
    start = 1
    if columns is None and len(rows) > 1 and sum(1 for c in rows[0][1] if c.strip()) == 1:
        columns, start = _columns(rows[1][1], banner=True), 2
    if columns is None:
        line, cells = rows[start - 1]
        raise PipelineError(
            f"{path}: unknown header on line {line} ({','.join(cells)[:120]!r}): expected "
            f"{SEED_HEADER!r} or a banner line then {CDD_HEADER!r}")
    return columns, rows[start:]


def _columns(cells: list[str], banner: bool = False) -> _Columns | None:
    names = [c.strip().lower() for c in cells]
    index = {name: i for i, name in enumerate(names)}
    unix = next((index[n] for n in _UNIX_COLUMNS if n in index), None)
    volumes = tuple((n[len("volume"):].strip().upper(), i) for i, n in enumerate(names)
                    if n == "volume" or n.startswith("volume "))
    needed = ("symbol",) + _PRICES + (() if unix is not None else ("date",))
    if not volumes or any(n not in index for n in needed):
        return None
    fmt = CRYPTODATADOWNLOAD if banner or unix is not None else SEED
    return _Columns(fmt, len(cells), unix if unix is not None else index["date"],
                    unix is not None, index["symbol"],
                    tuple(index[n] for n in _PRICES), volumes)  # type: ignore[arg-type]


def _normal_symbol(text: str) -> str:
    """Gemini writes symbols upper-case with no separator (``BTCUSD``), also in keys."""
    return text.strip().upper().replace("/", "").replace("-", "")


def _file_symbol(columns: _Columns, data: list[tuple[int, list[str]]],
                 symbol: str | None) -> str:
    if symbol:
        return _normal_symbol(symbol)
    counts = Counter(_normal_symbol(cells[columns.symbol]) for _, cells in data
                     if len(cells) > columns.symbol)
    return counts.most_common(1)[0][0] if counts else ""


def _volume_column(path: Path, columns: _Columns, symbol: str) -> int:
    """The base-currency volume: ``Volume BTC`` for BTCUSD, not ``Volume USD``."""
    if len(columns.volumes) == 1:
        return columns.volumes[0][1]
    base = [i for cur, i in columns.volumes if cur and symbol.startswith(cur)]
    if len(base) != 1:
        not_quote = [i for cur, i in columns.volumes if cur and not symbol.endswith(cur)]
        base = not_quote if len(not_quote) == 1 else []
    if not base:
        names = ", ".join(f"Volume {cur}".strip() for cur, _ in columns.volumes)
        raise PipelineError(f"{path}: cannot tell which of {names} is the base-currency "
                            f"volume of {symbol or 'the symbol'}")
    return base[0]


def _row(columns: _Columns, cells: list[str], symbol: str,
         volume: int) -> tuple[int, tuple[str, ...]]:
    """(start_ms, (open, high, low, close, volume)) of a valid row, else :class:`_RowError`."""
    if len(cells) != columns.count:
        raise _RowError(f"expected {columns.count} fields, got {len(cells)}")
    start_ms = (_unix_ms(cells[columns.time]) if columns.time_is_unix
                else _date_ms(cells[columns.time]))
    row_symbol = _normal_symbol(cells[columns.symbol])
    if row_symbol != symbol:
        raise _RowError(f"symbol {row_symbol!r} is not the file's symbol {symbol!r}")
    raw = tuple(cells[i].strip() for i in columns.prices + (volume,))
    texts = tuple(_plain(name, text) for name, text in zip(_FIELDS, raw))
    o, h, low, c, v = (Decimal(text) for text in texts)
    for name, text, value in zip(_FIELDS, texts, (o, h, low, c)):
        if value <= 0:
            raise _RowError(f"{name} {text} is not positive")
    if v < 0:
        raise _RowError(f"volume {texts[4]} is negative")
    if h < low:
        raise _RowError(f"high {texts[1]} is below low {texts[2]}")
    for name, text, value in (("open", texts[0], o), ("close", texts[3], c)):
        if not low <= value <= h:
            raise _RowError(f"{name} {text} is outside [low {texts[2]}, high {texts[1]}]")
    return start_ms, texts


def _plain(name: str, text: str) -> str:
    """The value as a plain decimal string: unchanged when it is one already; exponent
    notation (``8e-05``, as some exports write tiny volumes) rewritten exactly through
    ``Decimal`` (``0.00008``), never through a float."""
    if _PLAIN_DECIMAL.fullmatch(text):
        return text
    if "," in text:
        raise _RowError(f"{name} {text!r} has a thousands separator")
    if _EXPONENT.fullmatch(text):
        number = Decimal(text)
        if abs(number.adjusted()) > _MAX_EXPONENT:
            raise _RowError(f"{name} {text!r} is out of range")
        return fixed(number)
    raise _RowError(f"{name} {text!r} is not a decimal number")


def _unix_ms(text: str) -> int:
    text = text.strip()
    if not (text.isascii() and text.isdigit()):  # "²".isdigit(), but int("²") fails
        raise _RowError(f"unix timestamp {text!r} is not an integer")
    if len(text.lstrip("0")) > len(str(_MILLIS_BELOW)):  # int() refuses 4300+ digits
        raise _RowError(f"unix timestamp {text[:20]}... is neither seconds nor milliseconds")
    value = int(text)
    if value < _SECONDS_BELOW:
        return value * 1000
    if value < _MILLIS_BELOW:
        return value
    raise _RowError(f"unix timestamp {text} is neither seconds nor milliseconds")


def _date_ms(text: str) -> int:
    """Epoch ms of an ISO date-time; one without a UTC offset is taken as UTC."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise _RowError(f"date {text.strip()!r} is not a date-time like "
                        "2019-07-08 00:00:00") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (when - _EPOCH) // _MS


def _infer_interval(path: Path, candidates: list[tuple[int, int, tuple[str, ...]]],
                    problems: list[RowProblem]) -> str:
    """The most common gap between consecutive valid rows, which must be a known interval."""
    starts = sorted(start for _, start, _ in candidates)
    gaps = Counter(b - a for a, b in zip(starts, starts[1:]))
    if not gaps:
        why = (f"; {len(problems)} row(s) rejected, first: line {problems[0].line}: "
               f"{problems[0].reason}") if problems else ""
        raise PipelineError(f"{path}: fewer than two valid rows, cannot infer the bar interval "
                            f"(give it explicitly){why}")
    gap = gaps.most_common(1)[0][0]
    for name, ms in INTERVALS_MS.items():
        if ms == gap:
            return name
    raise PipelineError(f"{path}: rows are mostly {gap / 1000:g} s apart, which is not one of "
                        f"{', '.join(INTERVALS_MS)}; give the interval explicitly")



# --------------------------------------------------------------------------- publishing


def load_csv_bars(path: str | Path, bootstrap: str, registry_url: str, namespace: Namespace,
                  interval: str | None = None, progress: bool | None = None,
                  symbol: str | None = None) -> LoadReport:
    """Parse ``path`` and publish its valid bars to ``<namespace>.bars``, oldest first.

    Records are keyed by symbol (so one symbol's bars stay ordered in one partition),
    carry ``start_ms`` as their Kafka timestamp, and are flushed before returning: any
    record the brokers did not acknowledge raises :class:`~pipeline.core.errors.DeliveryFailed`.

    Loading is idempotent: bars of the symbol and interval already in the topic are not
    published again (``already`` counts them), so a second load of the same file
    publishes nothing. A file that disagrees with a bar already there (other prices or
    volume for the same hour), or whose new bars are older than the newest one there
    (they would land out of time order), is refused before anything is published.
    """
    began = time.monotonic()
    parsed = parse_ohlcv_csv(path, symbol=symbol, interval=interval)
    parsed_at = time.monotonic()

    topic, published, already = publish_bars(parsed.bars, bootstrap, registry_url, namespace,
                                             parsed.symbol, parsed.interval, parsed.path.name,
                                             progress)
    bars = parsed.bars
    return LoadReport(
        path=parsed.path, topic=topic, format=parsed.format, symbol=parsed.symbol,
        interval=parsed.interval, rows_read=parsed.rows, published=published,
        already=already, problems=tuple(parsed.problems),
        first_start_ms=bars[0]["start_ms"] if bars else None,
        last_start_ms=bars[-1]["start_ms"] if bars else None,
        parse_seconds=parsed_at - began, publish_seconds=time.monotonic() - parsed_at)


def publish_bars(bars: list[dict], bootstrap: str, registry_url: str, namespace: Namespace,
                 symbol: str, interval: str, source: str,
                 progress: bool | None = None) -> tuple[str, int, int]:
    """Publish those of ``bars`` (one symbol and interval, oldest first) that are not in
    ``<namespace>.bars`` yet; (topic, published, already there). Every historical loader
    (this file's, the Gemini candles backfill) publishes bars this one way."""
    ensure_topics(bootstrap, namespace, ["bars"])
    topic = namespace.topic("bars")
    fresh = _not_yet_published(bars, source, symbol, interval, topic, _published_bars(
        bootstrap, registry_url, topic, symbol, interval))
    encode = Encoder(SchemaRegistry(registry_url), topic)
    producer = ReliableProducer(bootstrap)
    with progress_bar(bool(progress), len(fresh), f"{source} → {topic}", "bars") as update:
        for i, bar in enumerate(fresh, 1):
            producer.produce(topic, encode(bar), key=bar["symbol"], timestamp=bar["start_ms"])
            if i % 1000 == 0:
                producer.poll(0)
                update(i)
        producer.flush()
        update(len(fresh))
    return topic, producer.tracker.delivered, len(bars) - len(fresh)


_OHLCV = ("end_ms", "open", "high", "low", "close", "volume")


def _published_bars(bootstrap: str, registry_url: str, topic: str, symbol: str,
                    interval: str) -> dict[int, dict]:
    """start_ms -> bar of ``symbol``/``interval`` already in ``topic``."""
    from pipeline.replay.source import ReplaySource

    found: dict[int, dict] = {}
    with ReplaySource(bootstrap, registry_url, [topic]) as source:
        if source.total:
            for batch in source.batches():
                for *_, bar in batch:
                    if bar["symbol"] == symbol and bar["interval"] == interval:
                        found[bar["start_ms"]] = bar
    return found


def _not_yet_published(bars: list[dict], source: str, symbol: str, interval: str, topic: str,
                       published: dict[int, dict]) -> list[dict]:
    if not published:
        return bars
    fresh = []
    for bar in bars:
        there = published.get(bar["start_ms"])
        if there is None:
            fresh.append(bar)
        elif any(there[k] != bar[k] for k in _OHLCV):
            field = next(k for k in _OHLCV if there[k] != bar[k])
            raise PipelineError(
                f"{source}: {topic} already holds a different {interval} "
                f"{symbol} bar at {utc_text(bar['start_ms'])} ({field} {there[field]} "
                f"there, {bar[field]} in {source}): load it into another namespace")
    newest = max(published)
    if fresh and fresh[0]["start_ms"] < newest:
        raise PipelineError(
            f"{source}: {len(fresh)} of its bars are not in {topic} yet, the first "
            f"at {utc_text(fresh[0]['start_ms'])}, before the newest bar there "
            f"({utc_text(newest)}): they would be out of time order; load them into another "
            "namespace")
    return fresh
