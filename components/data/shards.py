"""Reading raw shards (Parquet, JSON Lines, CSV/TSV, optionally gzip) without trusting them.

A shard that cannot be read at all, or lines that do not parse, become quarantine rows with a
reason instead of exceptions: one corrupt file must not stop a job over thousands of good ones.
CSV is read with every column as text so that a wrong type in one row is a validation failure
of that row, not a crash of the whole file.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from components.data.schemas import QUARANTINE_SCHEMA
from components.storage import Storage
from components.data.validation import make_rejects

SHARD_SUFFIXES = (".parquet", ".jsonl", ".json", ".ndjson", ".csv", ".tsv",
                  ".jsonl.gz", ".json.gz", ".ndjson.gz", ".csv.gz", ".tsv.gz")


@dataclass
class RawChunk:
    """Raw rows of one shard (columns renamed to schema fields) and rows that failed to parse."""

    table: pa.Table
    rejects: pa.Table
    shard: str = ""


@dataclass
class ShardReader:
    """Reads shards below a Storage and renames columns with ``mapping`` (schema field -> source column)."""

    storage: Storage
    mapping: Mapping[str, str] = field(default_factory=dict)
    batch_rows: int = 200_000

    def read(self, rel: str) -> Iterator[RawChunk]:
        fmt = shard_format(rel)
        try:
            if fmt == "parquet":
                yield from self._parquet(rel)
            else:
                data = self.storage.read_bytes(rel)
                if rel.lower().endswith(".gz"):
                    data = gzip.decompress(data)
                if fmt == "json":
                    yield from self._json(rel, data)
                else:
                    yield self._csv(rel, data, "\t" if fmt == "tsv" else ",")
        except Exception as exc:  # noqa: BLE001 - any failure of a shard is quarantined, not fatal
            msg = f"unreadable_shard: {type(exc).__name__}: {str(exc)[:300]}"
            yield RawChunk(pa.table({}), make_rejects(pa.table({"shard": [rel]}), [msg], rel), rel)

    def _rename(self, table: pa.Table) -> pa.Table:
        if not self.mapping:
            return table
        reverse: Dict[str, str] = {src: dst for dst, src in self.mapping.items() if src and src != dst}
        names = [reverse.get(c, c) for c in table.column_names]
        return table.rename_columns(names)

    def _parquet(self, rel: str) -> Iterator[RawChunk]:
        with self.storage.open_input(rel) as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=self.batch_rows):
                yield RawChunk(self._rename(pa.Table.from_batches([batch])), _no_rejects(), rel)

    def _csv(self, rel: str, data: bytes, delimiter: str) -> RawChunk:
        header = data.split(b"\n", 1)[0].decode("utf-8-sig", errors="replace").rstrip("\r")
        cols = next(csv.reader([header], delimiter=delimiter), []) if header else []
        bad_rows: List[str] = []

        def on_invalid(row) -> str:
            bad_rows.append(row.text or "")
            return "skip"

        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(encoding="utf8"),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True,
                                             invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in cols},
                                                 strings_can_be_null=True),
        )
        rejects = (make_rejects(pa.table({"line": bad_rows}), ["malformed_row"] * len(bad_rows), rel)
                   if bad_rows else _no_rejects())
        return RawChunk(self._rename(table), rejects, rel)

    def _json(self, rel: str, data: bytes) -> Iterator[RawChunk]:
        try:
            table = pajson.read_json(io.BytesIO(data))
            yield RawChunk(self._rename(table), _no_rejects(), rel)
            return
        except pa.ArrowException:
            pass  # mixed types or a bad line somewhere: parse line by line to isolate it
        records, bad = [], []
        for line in data.splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
                records.append({k: _scalar_to_text(v) for k, v in rec.items()})
            except ValueError:
                bad.append(line.decode("utf-8", errors="replace")[:2000])
        table = pa.Table.from_pylist(records) if records else pa.table({})
        rejects = make_rejects(pa.table({"line": bad}), ["malformed_row"] * len(bad), rel) if bad else _no_rejects()
        yield RawChunk(self._rename(table), rejects, rel)


def _scalar_to_text(v):
    """Mixed-type JSON values -> text (lists of text stay lists), so columns have one type."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, list):
        return [None if x is None else (x if isinstance(x, str) else json.dumps(x)) for x in v]
    if isinstance(v, dict):
        return json.dumps(v)
    return json.dumps(v) if isinstance(v, bool) else str(v)


def _no_rejects() -> pa.Table:
    return QUARANTINE_SCHEMA.empty_table()


def shard_format(rel: str) -> str:
    name = rel.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "json"
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith(".csv"):
        return "csv"
    raise ValueError(f"unknown shard format: {rel}")


def list_shards(storage: Storage, rel: str = "") -> List[str]:
    """Readable shard files below ``rel``, sorted (deterministic row order)."""
    return storage.list_files(rel, SHARD_SUFFIXES)


def describe_missing(storage: Storage, rel: str, what: str) -> str:
    return (f"no {what} shards found at {storage.uri(rel)} (expected files ending in "
            f"{', '.join(SHARD_SUFFIXES[:6])}, optionally .gz)")
