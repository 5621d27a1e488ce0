"""SQL over a job's output with DuckDB: views ``segments``, ``videos``, ``failures`` of committed files.

``failures`` holds one row per video that is failed now: its latest recorded failure, and none for a
video that a later run (``--retry-failed``) finished.  ``failures_log`` keeps every failure ever
recorded, retries included.
"""

from __future__ import annotations

import base64
import csv
import decimal
import io
import json
import math
import re
import unicodedata
from pathlib import Path
from typing import Any, Literal

import duckdb
import pyarrow as pa

from jobs.output import STAGING, OutputDir, damaged_message, footer_damage, looks_damaged
from pipeline.errors import ConfigError
from pipeline.schema import FAILURES_SCHEMA, VIDEOS_SCHEMA, segments_schema

OutputFormat = Literal["table", "csv", "json"]
_EMPTY = {"segments": segments_schema(None), "videos": VIDEOS_SCHEMA, "failures": FAILURES_SCHEMA}


def open_output(out_dir: str | Path) -> OutputDir:
    """The OutputDir at ``out_dir``; a ConfigError when it cannot be read or is not a run's output."""
    try:
        out = OutputDir(out_dir)
        is_output = out.is_output()
    except OSError as exc:
        hint = "; check AWS credentials, region and AWS_ENDPOINT_URL" if str(out_dir).startswith("s3://") else ""
        raise ConfigError(f"cannot read {out_dir}: {exc}{hint}") from None
    if not is_output:
        if out.local and not Path(out.store.full("")).exists():
            raise ConfigError(f"{out_dir} does not exist; pass the --out directory of a 'vidpipe run'")
        if not out.local:
            from pipeline.s3 import bucket_missing

            bucket = out.store.root.split("/", 1)[0]
            if bucket_missing(out.store.fs, out.store.root):
                raise ConfigError(f"{out_dir}: there is no bucket {bucket!r}; check the name and AWS_ENDPOINT_URL")
        raise ConfigError(f"{out_dir} is not a vidpipe output directory (no _job/ inside); "
                          "pass the --out directory of a 'vidpipe run'")
    return out


_KEPT_FOOTERS = 500


def _table_dataset(out: OutputDir, rels: list[str], expected: pa.Schema) -> Any:
    """The committed files ``rels`` of one table as a pyarrow dataset that checks each page's CRC as it reads it.

    DuckDB's own Parquet reader checks none: a bit flipped inside a page read back as another value (exit 0).
    Every footer is read first, as 'run' reads them at its start: a file cut short, or another of OUT's copied
    over it, or a damaged column name, is named before any row is read; the scans reuse the footers (see
    _KEPT_FOOTERS).
    Files written before a column was added read it as nulls (the columns are the newer of the first file's and
    this version's)."""
    import pyarrow.dataset as pads

    options = pads.ParquetFragmentScanOptions(page_checksum_verification=True)
    fmt = pads.ParquetFileFormat(default_fragment_scan_options=options)
    # sizes from a listing: without them, opening a file on S3 costs a HEAD request (twice: footer, then scan).  Not
    # for a file in staging, which the running job may move meanwhile: its HEAD names the key (see _moved_meanwhile)
    sizes = {f"{folder}/{name}": size for folder in {r.rsplit("/", 1)[0] for r in rels} - {STAGING}
             for name, size in out.store.list_sizes(folder).items()}

    def fragment(rel: str) -> Any:
        return fmt.make_fragment(out.store.full(rel), filesystem=out.store.fs, file_size=sizes.get(rel))

    # A fragment keeps the footer it read, and the scan reuses it; in memory that is ~40 kB a file, so only up to
    # _KEPT_FOOTERS files a table: past that the scan reads each footer again
    kept: dict[str, Any] = {}

    def footer(rel: str) -> Exception | None:
        read = fragment(rel)
        try:
            read.ensure_complete_metadata()
        except (ValueError, OSError) as exc:  # ArrowInvalid, "Couldn't deserialize thrift", or S3 unreachable
            return exc
        if len(rels) <= _KEPT_FOOTERS:
            kept[rel] = read
        return footer_damage(rel, read.metadata, out.committed_rows(rel))

    if any(e is not None for e in out.map_files(footer, rels)):
        # named, and told from an unreachable store (raised), as 'run' does: the footers are read again
        if damaged := out.damaged_files(rels):
            raise _damaged_error(out, damaged)
    fragments = {r: kept.get(r) or fragment(r) for r in rels}
    first = fragments[rels[0]].physical_schema
    if "embedding" in first.names and "embedding" not in expected.names:
        kind = first.field("embedding").type
        expected = segments_schema(kind.list_size if pa.types.is_fixed_size_list(kind) else None)
    schema = pa.unify_schemas([expected.remove_metadata(), first.remove_metadata()])
    return pads.FileSystemDataset(list(fragments.values()), schema, fmt, out.store.fs)


def tables_read_by(sql: str) -> set[str]:
    """The output tables a query may read: those whose view it names (``failures`` reads ``videos`` too), found by
    the names as words, so that a name in a string or a comment counts too (reading a table too many costs its
    footers, one too few would give a wrong answer)."""
    named = {m.lower() for m in re.findall(r"\b(segments|videos|failures_log|failures)\b", sql, re.IGNORECASE)}
    tables = named & {"segments", "videos"}
    if named & {"failures", "failures_log"}:
        tables.add("failures")
    if "failures" in named:
        tables.add("videos")
    return tables


def connect(out_dir: str | Path, *, tables: set[str] | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with one view per output table (only committed data is visible).

    The committed files are read through pyarrow datasets registered in DuckDB (local disk or pyarrow's S3
    client, with the run's credentials; no DuckDB extension to download), which check each page's CRC where
    the file has them; column projection and filters are pushed down to the Parquet files.  ``tables``: only
    these are read (their footers checked), the others' views are empty; all by default.  A committed file that
    is gone is named whichever table it is of (a listing per table folder).
    """
    out = open_output(out_dir)
    con = duckdb.connect(":memory:")
    commits = out.commits()
    for table, schema in _EMPTY.items():
        view = "failures_log" if table == "failures" else table
        rels = out.committed_rel(table, commits)
        read = tables is None or table in tables
        data = _table_dataset(out, rels, schema) if rels and read else schema.empty_table()
        con.register(f"_arrow_{table}", data)
        con.execute(f"CREATE VIEW {view} AS SELECT * FROM _arrow_{table}")
    # By URI, as the done-set is: a rerun may name the same file through another input (another video_id).
    con.execute("CREATE VIEW failures AS SELECT * EXCLUDE (_latest) FROM ("
                "SELECT *, row_number() OVER (PARTITION BY uri ORDER BY failed_at DESC) AS _latest "
                "FROM failures_log WHERE uri NOT IN (SELECT uri FROM videos)) WHERE _latest = 1")
    return con


# errors in the user's SQL: they may quote a column named "checksum", and must not make vidpipe read all of OUT
_SQL_ERRORS = (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException, duckdb.ConversionException,
               duckdb.SyntaxException, duckdb.ConstraintException, duckdb.NotImplementedException)


def query_error(out_dir: str | Path, exc: Exception) -> ConfigError:
    """A usage error for a failed query; where the error names a committed file whose footer cannot be read,
    it says so: the file is damaged (not a user's SQL, nor a file a running job moved meanwhile)."""
    text = str(exc).strip()
    damaged: list[tuple[str, Exception]] = []
    pages = False  # the damage is in data pages (footers whole): only 'repair --verify' finds it
    try:
        out = OutputDir(out_dir)
        commits = out.commits()
        rels = [rel for table in _EMPTY for _, rel in out.locate(table, commits)[0]]
        named = [rel for rel in rels if out.store.full(rel) in text]
        damaged = [(rel, e) for rel in named if (e := out.footer_error(rel)) is not None]
        if not damaged and named and not isinstance(exc, _SQL_ERRORS):
            # a file named with a whole footer ("ZSTD Decompression failure"): its pages
            damaged = [(rel, e) for rel in named if (e := out.footer_error(rel, pages=True)) is not None]
            pages = bool(damaged)
        if not damaged and not named and not isinstance(exc, _SQL_ERRORS) and looks_damaged(text, (str(out_dir),)):
            # DuckDB names no file for a damaged page header ("don't know what type"): find it, footers first
            damaged = out.damaged_files(rels)
            if not damaged:
                damaged = out.damaged_files(rels, pages=True)
                pages = bool(damaged)
    except (ConfigError, OSError):
        damaged = []
    if damaged:
        return _damaged_error(out, damaged, pages=pages)
    return ConfigError(f"query failed: {text}")


def _damaged_error(out: OutputDir, damaged: list[tuple[str, Exception]], *, pages: bool = False) -> ConfigError:
    more = f" (and {len(damaged) - 1} more committed files)" if len(damaged) > 1 else ""
    return ConfigError(damaged_message(out, damaged[0][0], damaged[0][1], more=more, pages=pages))


def _moved_meanwhile(out_dir: str | Path, text: str) -> bool:
    """Whether ``text`` (a failed scan: pyarrow's error, through DuckDB) names a data file in staging that is gone
    from there: the running job moved it into its table folder after the views were made."""
    try:
        out = OutputDir(out_dir)
        # a path locally, a key on S3 ("When reading information for key '...' in bucket ...")
        named = set(re.findall(re.escape(STAGING + "/") + r"(part-[\w.-]+?\.parquet)", text))
        return bool(named - set(out.store.list_names(STAGING, ".parquet")))
    except (OSError, ValueError):
        return False


def run_query(out_dir: str | Path, sql: str, *, check_all: bool = False) -> pa.Table:
    """``sql`` over OUT's committed tables; the footers of the tables it reads are checked first, of every table
    with ``check_all`` (``status``: a look at OUT's health)."""
    if not sql.strip():
        raise ConfigError('the SQL is empty; pass a query, e.g. "SELECT label, count(*) FROM segments GROUP BY 1"')
    last: Exception | None = None
    for _ in range(3):
        con = None
        try:
            # the views of the tables it reads read each file's footer: a damaged file fails here
            con = connect(out_dir, tables=None if check_all else tables_read_by(sql))
            rel = con.sql(sql)
            if rel is None:  # ';', only comments, or a statement that is not a query: nothing to print
                raise ConfigError(f"the SQL {sql.strip()!r} returns no rows to print (no SELECT in it); pass a "
                                  'query, e.g. "SELECT label, count(*) FROM segments GROUP BY 1"')
            return rel.to_arrow_table()
        except (duckdb.IOException, FileNotFoundError) as exc:
            last = exc  # a running job moved a committed file out of staging after we listed it: list again
        except (duckdb.Error, pa.ArrowException, OSError) as exc:  # a damaged file, or the SQL
            if not _moved_meanwhile(out_dir, str(exc)):
                raise query_error(out_dir, exc) from None
            last = exc
        finally:
            if con is not None:
                con.close()
    assert last is not None
    raise query_error(out_dir, last)


def _interval_text(v: pa.MonthDayNano) -> str:
    """An INTERVAL as DuckDB prints it ("1 year 2 months 3 days 01:30:00.5"), not as Python's tuple repr."""
    parts = []
    years, months = divmod(abs(v.months), 12)
    sign = -1 if v.months < 0 else 1
    for n, unit in ((sign * years, "year"), (sign * months, "month"), (v.days, "day")):
        if n:
            parts.append(f"{n} {unit}{'s' if abs(n) != 1 else ''}")
    if v.nanoseconds or not parts:
        seconds, frac = divmod(abs(v.nanoseconds), 10**9)
        hours, rest = divmod(seconds, 3600)
        text = f"{'-' if v.nanoseconds < 0 else ''}{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
        parts.append(text + (f".{frac:09d}".rstrip("0") if frac else ""))
    return " ".join(parts)


def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, pa.MonthDayNano):
        return _interval_text(v)
    if isinstance(v, float):
        return "NaN" if math.isnan(v) else f"{v:.6g}"
    if isinstance(v, list):  # a label holding ', ' (or a bracket, a quote) quoted, so the list reads one way
        return "[" + ", ".join(repr(x) if isinstance(x, str) and (any(c in x for c in ",[]'\"") or x != x.strip())
                               else _cell(x) for x in v) + "]"
    return str(v)


def _csv_cell(v: Any) -> Any:
    # exact: floats at full precision (a terminal's table rounds them), lists as JSON (a label may hold a comma)
    if isinstance(v, bool):  # as DuckDB's and JSON's, not Python's True
        return "true" if v else "false"
    if isinstance(v, float):
        return "NaN" if math.isnan(v) else repr(v)
    if isinstance(v, (list, dict)):
        return json.dumps(_json_cell(v), default=str, allow_nan=False)
    if isinstance(v, (bytes, pa.MonthDayNano)):
        return _json_cell(v)
    return v


def _json_cell(v: Any) -> Any:
    if isinstance(v, decimal.Decimal):  # DuckDB's type of 0.1 or of sum(INTEGER): a JSON number, not a string
        exponent = v.as_tuple().exponent  # per the column's scale: DECIMAL(p, 0) gives exact integers
        return int(v) if isinstance(exponent, int) and exponent >= 0 else float(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, bytes):
        return base64.b64encode(v).decode("ascii")
    if isinstance(v, pa.MonthDayNano):  # a named tuple: it would print as a list of three integers
        return _interval_text(v)
    if isinstance(v, (list, tuple)):  # a MAP's entries come as (key, value) tuples
        return [_json_cell(x) for x in v]
    if isinstance(v, dict):
        return {k: _json_cell(x) for k, x in v.items()}
    return v


def _unique_names(names: list[str]) -> list[str]:
    """Column names made unique for JSON objects' keys: a repeated name gets ``_1``, ``_2``, ..., skipping names
    the result has already (the names the SQL chose stay as they are)."""
    taken = set(names)
    out: list[str] = []
    seen: set[str] = set()
    for name in names:
        if name in seen:
            n = 1
            while f"{name}_{n}" in taken:
                n += 1
            name = f"{name}_{n}"
            taken.add(name)
        seen.add(name)
        out.append(name)
    return out


def _text_width(text: str) -> int:
    """Terminal columns ``text`` takes: wide (CJK) characters two, marks and format characters none."""
    return sum(0 if unicodedata.category(c) in ("Mn", "Me", "Cf") else 2 if unicodedata.east_asian_width(c) in "WF"
               else 1 for c in text)


def _escaped(c: str) -> str:
    # line and paragraph breaks of any kind, control characters, bidi overrides (which reorder what a terminal
    # shows): written as escapes, so a file name holding one cannot break or disguise the table's rows
    if unicodedata.category(c) in ("Cc", "Zl", "Zp") or "\u202a" <= c <= "\u202e" or "\u2066" <= c <= "\u2069":
        return c.encode("unicode_escape").decode("ascii")
    return c


def _shown(text: str, max_width: int) -> str:
    if not text.isprintable():
        text = "".join(map(_escaped, text))
    return text if len(text) <= max_width else text[: max_width - 1] + "…"


def format_table(table: pa.Table, fmt: OutputFormat = "table", *, max_rows: int = 100, max_width: int = 48) -> str:
    """Render query results for a terminal (aligned table), or as CSV / JSON lines.

    Columns are taken by position: a result may name two alike (``SELECT a.start_s, b.start_s``)."""
    names = table.column_names
    columns = [table.column(i).to_pylist() for i in range(table.num_columns)]
    rows = list(zip(*columns, strict=True)) if columns else [() for _ in range(table.num_rows)]
    if fmt == "json":  # strict JSON: NaN and infinities as null, bytes as base64
        keys = _unique_names(names)
        return "".join(json.dumps({k: _json_cell(v) for k, v in zip(keys, r, strict=True)}, default=str,
                                  allow_nan=False) + "\n" for r in rows)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(names)
        for r in rows:
            w.writerow([_csv_cell(v) for v in r])
        return buf.getvalue()
    shown = rows[:max_rows]
    cells = [[_shown(_cell(v), max_width) for v in r] for r in shown]
    heads = [_shown(n, max_width) for n in names]
    widths = [max([_text_width(h)] + [_text_width(row[i]) for row in cells]) for i, h in enumerate(heads)]

    def line(row: list[str]) -> str:
        return " | ".join(c + " " * (widths[i] - _text_width(c)) for i, c in enumerate(row))

    lines = [line(heads), "-+-".join("-" * w for w in widths)] + [line(row) for row in cells]
    footer = f"({len(rows)} row{'s' if len(rows) != 1 else ''})"
    if len(rows) > max_rows:
        footer = f"({len(rows)} rows, first {max_rows} shown; use --format csv or --max-rows for all)"
    return "\n".join(lines + [footer]) + "\n"
