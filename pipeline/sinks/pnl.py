"""Parquet copy of ``portfolio.pnl``, beside the bars, exactly once (the bars' mechanism).

**Layout.** ``<root>/strategy=<id>/date=<UTC date of event_ms>/<id>-<date>.parquet``, one
file per partition, replaced atomically (``bars_store``'s staging and rename), so a reader
sees the old file or the new one. Rows are keyed by ``seq`` (per strategy): a row whose
``seq`` is in the file already is skipped, so writing the same rows again (the restart
after a crash between commit and flush) changes nothing.

**Columns.** ``event_ms`` is ``timestamp[ms, UTC]``; money columns are ``decimal128(38,
18)`` like the bars' (exact for every price and amount; ``drawdown_pct`` and converted
figures, which come from a division, are rounded half-even to 18 places here, the topic
keeps every digit); a null figure (stale mark) is a null cell.
"""

from __future__ import annotations

from collections import OrderedDict
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.sinks.bars import DECIMAL, PLACES, TIME, WriteReport, _replace, staging_dir, utc_date

MONEY = ("capital", "realized_pnl", "unrealized_pnl", "fees", "equity", "peak_equity",
         "drawdown", "drawdown_pct", "daily_pnl", "exposure")
SCHEMA = pa.schema([("seq", pa.int64()), ("event_time", TIME), ("trigger", pa.string()),
                    ("currency", pa.string()), *[(m, DECIMAL) for m in MONEY],
                    ("fills", pa.int64()), ("stale", pa.bool_()), ("halted", pa.bool_())])
_QUANTUM = Decimal(1).scaleb(-PLACES)


def partition_file(root: Path, strategy_id: str, date: str) -> Path:
    return root / f"strategy={strategy_id}" / f"date={date}" / f"{strategy_id}-{date}.parquet"


def _money(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text).quantize(_QUANTUM, ROUND_HALF_EVEN)


def pnl_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    rows = list(rows)
    columns: dict[str, list[Any]] = {
        "seq": [r["seq"] for r in rows], "event_time": [r["event_ms"] for r in rows],
        "trigger": [r["trigger"] for r in rows], "currency": [r["currency"] for r in rows],
        "fills": [r["fills"] for r in rows], "stale": [r["stale"] for r in rows],
        "halted": [r["halted"] for r in rows]}
    for name in MONEY:
        columns[name] = [_money(r[name]) for r in rows]
    return pa.table({f.name: pa.array(columns[f.name], f.type) for f in SCHEMA}, schema=SCHEMA)


class PnlWriter:
    """Merges PnL rows into their partition files (see the module doc)."""

    def __init__(self, root: Path, *, fsync: bool = True, cache_files: int = 64) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self._cache: OrderedDict[Path, pa.Table] = OrderedDict()
        self._cache_files = cache_files

    def write(self, rows: Iterable[Mapping[str, Any]]) -> WriteReport:
        groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
        for row in rows:
            groups.setdefault((row["strategy_id"], utc_date(row["event_ms"])), []).append(row)
        added = skipped = files = 0
        for (strategy, date), part in sorted(groups.items()):
            path = partition_file(self.root, strategy, date)
            old = self._cache.get(path)
            if old is None and path.exists():
                old = pq.read_table(path, schema=SCHEMA)
            have = set() if old is None else set(old.column("seq").to_pylist())
            fresh = [r for r in part if r["seq"] not in have]
            skipped += len(part) - len(fresh)
            if not fresh:
                continue
            table = pnl_table(fresh) if old is None else pa.concat_tables([old, pnl_table(fresh)])
            table = table.sort_by("seq")
            _replace(path, lambda tmp: pq.write_table(table, tmp), staging_dir(self.root),  # noqa: B023 - _replace calls it at once
                     self.fsync)
            self._cache[path] = table
            self._cache.move_to_end(path)
            while len(self._cache) > self._cache_files:
                self._cache.popitem(last=False)
            added += len(fresh)
            files += 1
        return WriteReport(added, skipped, files)


def read_pnl(root: str | Path, strategy_id: str | None = None):
    """The PnL rows as a pandas DataFrame (one strategy's, or all), in seq order."""
    import pandas as pd

    root = Path(root)
    pattern = f"strategy={strategy_id}/*/*.parquet" if strategy_id else "*/*/*.parquet"
    files = sorted(root.glob(pattern))
    if not files:
        return pd.DataFrame(columns=["strategy", *SCHEMA.names])
    frames = []
    for path in files:
        frame = pq.read_table(path, schema=SCHEMA).to_pandas()
        frame.insert(0, "strategy", path.parent.parent.name.split("=", 1)[1])
        frames.append(frame)
    return pd.concat(frames, ignore_index=True).sort_values(["strategy", "seq"],
                                                            ignore_index=True)
