"""`pipeline archive`: the Parquet market-data archive the archive group writes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pipeline.cli.common import RunDirOption, console

archive_app = typer.Typer(no_args_is_help=True,
                          help="The Parquet market-data archive written by the archive group.")
ArchiveRootOption = typer.Option(None, "--root", help="The archive \\[default: "
                                 "<run_dir>/parquet/<namespace>/archive].")


@archive_app.command("query")
def archive_query(
    sql: str = typer.Argument(..., help="SQL over the views l2, l2_changes, trades, bars, "
                                        "frames (DuckDB)."),
    namespace: str = typer.Option("sim", "--namespace", "-n"),
    run_dir: Optional[Path] = RunDirOption, root: Optional[Path] = ArchiveRootOption,
    csv: Optional[Path] = typer.Option(None, help="Write the result to this CSV file."),
    parquet: Optional[Path] = typer.Option(None, help="Write the result to this Parquet file."),
    limit: int = typer.Option(50, help="Rows printed (files get every row)."),
) -> None:
    """Run SQL on the archive with DuckDB; print a table or write CSV/Parquet."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from pipeline.replay.archive import query

    table = query(sql, namespace, run_dir=run_dir, root=root)
    if csv is not None:
        pacsv.write_csv(table, csv)
    if parquet is not None:
        pq.write_table(table, parquet)
    if csv is not None or parquet is not None:
        console.print(f"{table.num_rows:,} row(s) written to "
                      f"{', '.join(str(p) for p in (csv, parquet) if p)}", highlight=False)
        return
    view = Table(*table.column_names, box=None)
    for row in table.slice(0, limit).to_pylist():
        view.add_row(*("" if v is None else str(v) for v in row.values()))
    console.print(view)
    if table.num_rows > limit:
        console.print(f"({table.num_rows:,} rows; {limit} shown: --limit, --csv or --parquet "
                      "for more)", highlight=False)


@archive_app.command("compact")
def archive_compact(
    namespace: str = typer.Option("sim", "--namespace", "-n"),
    run_dir: Optional[Path] = RunDirOption, root: Optional[Path] = ArchiveRootOption,
    before: Optional[str] = typer.Option(None, help="Compact days before this one "
                                                    "(YYYY-MM-DD) \\[default: today, UTC]."),
) -> None:
    """Merge the small files of each closed day into one file per directory."""
    from pipeline.replay.archive import resolve_root
    from pipeline.sinks.archive import compact

    report = compact(resolve_root(namespace, run_dir, root), before_day=before)
    console.print(f"{report.files_merged} file(s) in {report.directories} director"
                  f"{'y' if report.directories == 1 else 'ies'} merged into "
                  f"{report.files_written} ({report.rows:,} rows)", highlight=False)


@archive_app.command("ls")
def archive_ls(namespace: str = typer.Option("sim", "--namespace", "-n"),
               run_dir: Optional[Path] = RunDirOption,
               root: Optional[Path] = ArchiveRootOption) -> None:
    """What the archive holds: files, records and days per topic."""
    from pipeline.replay.archive import resolve_root
    from pipeline.sinks.archive import ARCHIVED, data_files, file_metadata, period_value

    base = resolve_root(namespace, run_dir, root)
    view = Table("topic", "files", "records", "first day", "last day", box=None)
    for topic in ARCHIVED:
        files = data_files(base, topic)
        if not files:
            continue
        days = sorted(period_value(p.parent) for p in files)
        view.add_row(topic, f"{len(files):,}", f"{sum(file_metadata(f).num_rows for f in files):,}",
                     days[0], days[-1])
    console.print(view if view.row_count else f"nothing archived under {base}")
