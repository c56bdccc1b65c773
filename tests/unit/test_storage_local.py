import json
import threading

import pyarrow as pa
import pytest

from components.storage import Storage, StorageError, normalize_root


def test_roots_are_normalised(tmp_path):
    assert normalize_root(str(tmp_path)) == f"file://{tmp_path}"
    assert normalize_root(f"file://{tmp_path}/") == f"file://{tmp_path}"
    assert normalize_root("s3://b/p/") == "s3://b/p"
    with pytest.raises(StorageError, match="gs://"):
        normalize_root("gs://b")


def test_parquet_json_bytes_and_listing(tmp_path):
    st = Storage(str(tmp_path))
    t = pa.table({"a": [1, 2, 3]})
    st.write_parquet("x/part-1.parquet", t)
    st.write_parquet("x/sub/part-0.parquet", t)
    st.write_bytes("x/_SUCCESS", b"")
    st.write_json("m.json", {"k": 1})
    assert st.list_files("x") == ["x/part-1.parquet", "x/sub/part-0.parquet"]  # sorted, hidden skipped
    assert st.read_parquet("x").num_rows == 6
    assert st.read_json("m.json") == {"k": 1}
    assert st.exists("m.json") and not st.exists("nope")
    st.delete("x")
    assert st.list_files("x") == []


def test_paths_cannot_escape_root(tmp_path):
    with pytest.raises(StorageError, match="escapes"):
        Storage(str(tmp_path)).path("../etc/passwd")


def test_read_missing_names_uri(tmp_path):
    with pytest.raises(StorageError, match="nope.json"):
        Storage(str(tmp_path)).read_bytes("nope.json")


def test_upload_download_dir(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "w.bin").write_bytes(b"\x00\x01")
    (src / "c.json").write_text("{}")
    st = Storage(str(tmp_path / "store"))
    assert st.upload_dir(src, "ckpt/r1") == ["ckpt/r1/a/w.bin", "ckpt/r1/c.json"]
    out = st.download_dir("ckpt/r1", tmp_path / "dl")
    assert sorted(p.relative_to(tmp_path / "dl").as_posix() for p in out) == ["a/w.bin", "c.json"]
    assert (tmp_path / "dl" / "a" / "w.bin").read_bytes() == b"\x00\x01"


def test_atomic_pointer_never_seen_half_written(tmp_path):
    st = Storage(str(tmp_path))
    big = {"files": ["x" * 100] * 2000}
    st.write_json_atomic("registry/m/latest.json", {"v": 0, **big})
    stop = threading.Event()
    errors = []

    def reader():
        while not stop.is_set():
            try:
                json.loads((tmp_path / "registry/m/latest.json").read_bytes())
            except ValueError as exc:  # a torn read
                errors.append(exc)

    th = threading.Thread(target=reader)
    th.start()
    for v in range(1, 200):
        st.write_json_atomic("registry/m/latest.json", {"v": v, **big})
    stop.set()
    th.join()
    assert errors == []
    assert st.read_json("registry/m/latest.json")["v"] == 199
    assert [p.name for p in (tmp_path / "registry/m").iterdir()] == ["latest.json"]  # no temp files left


def test_listing_does_not_need_the_working_directory(tmp_path, monkeypatch):
    # A Ray job's working directory can vanish under it (a runtime-env agent collecting unused
    # packages): listing names files by their storage path alone, never through os.getcwd().
    st = Storage(str(tmp_path / "store"))
    st.write_bytes("a/b/part-0.parquet", b"x")
    gone = tmp_path / "cwd"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert st.list_files("a") == ["a/b/part-0.parquet"]
    assert [p.name for p in st.download_dir("a", tmp_path / "out")] == ["part-0.parquet"]


def test_fetch_cached_copies_a_folder_once_and_again_when_it_changes(tmp_path, monkeypatch):
    from components.storage import StorageError, fetch_cached

    src = tmp_path / "models" / "enc"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"x" * 10)
    monkeypatch.setenv("LLMREC_MODEL_CACHE", str(tmp_path / "cache"))
    first = fetch_cached(f"file://{src}")
    assert (first / "sub" / "w.bin").read_bytes() == b"x" * 10
    (first / "marker").write_text("kept")  # a second call reuses the copy, it does not fetch again
    assert fetch_cached(f"file://{src}") == first and (first / "marker").is_file()
    (src / "sub" / "w.bin").write_bytes(b"y" * 20)  # a new upload: another copy
    second = fetch_cached(f"file://{src}")
    assert second != first and (second / "sub" / "w.bin").read_bytes() == b"y" * 20
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no half copies left
    with pytest.raises(StorageError, match="no files"):
        fetch_cached(f"file://{tmp_path / 'nothing-here'}")
