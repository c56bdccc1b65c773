import gzip

import pyarrow as pa
import pyarrow.parquet as pq

from components.data.shards import ShardReader, list_shards
from components.storage import Storage


def _read_all(reader, rel):
    chunks = list(reader.read(rel))
    tables = [c.table for c in chunks if c.table.num_rows]
    rejects = [r for c in chunks for r in c.rejects["reason"].to_pylist()]
    return (pa.concat_tables(tables) if tables else None), rejects


def test_csv_reads_every_column_as_text_and_quarantines_broken_lines(tmp_path):
    (tmp_path / "a.csv").write_text("user,item,when\n1,x,100\n2,y,oops\n3,z\n4,w,400\n")
    reader = ShardReader(Storage(str(tmp_path)), {"user_id": "user", "item_id": "item", "ts": "when"})
    table, rejects = _read_all(reader, "a.csv")
    assert table.column_names == ["user_id", "item_id", "ts"]
    assert table["ts"].to_pylist() == ["100", "oops", "400"]  # type errors left to validation
    assert rejects == ["malformed_row"]  # the short line


def test_jsonl_with_mixed_types_and_bad_line(tmp_path):
    lines = ['{"user_id": 1, "item_id": "a", "ts": 5}', "{not json", '{"user_id": "u2", "item_id": "b", "ts": "6"}']
    (tmp_path / "e.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    table, rejects = _read_all(ShardReader(Storage(str(tmp_path))), "e.jsonl.gz")
    assert table["user_id"].to_pylist() == ["1", "u2"]
    assert rejects == ["malformed_row"]


def test_corrupt_parquet_becomes_one_quarantine_row(tmp_path):
    pq.write_table(pa.table({"a": [1]}), tmp_path / "good.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    reader = ShardReader(Storage(str(tmp_path)))
    _, rejects = _read_all(reader, "bad.parquet")
    assert len(rejects) == 1 and rejects[0].startswith("unreadable_shard")
    table, rejects = _read_all(reader, "good.parquet")
    assert table.num_rows == 1 and rejects == []


def test_listing_only_known_formats(tmp_path):
    for name in ("b.parquet", "a.csv", "notes.txt", "c.jsonl.gz", ".hidden.csv"):
        (tmp_path / name).write_bytes(b"")
    assert list_shards(Storage(str(tmp_path))) == ["a.csv", "b.parquet", "c.jsonl.gz"]
