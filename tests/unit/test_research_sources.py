"""The research community's formats as sources: RecBole atomic files and sequence files.

A given split (RecBole train/valid/test files) must come back from preprocessing exactly as
given, repeats included; shared benchmark files are checked too when ../shared/data has them.
"""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from components.config import load_config, preset_for
from components.data.sources import prepare_source, recbole, sequences
from components.storage import Storage
from jobs.preprocess import run as preprocess

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def _cfg(source, path, root, *extra):
    overrides = [f"data.source={source}", f"data.path={path}", f"storage.root={root}", "preprocess.engine=local",
                 *extra]
    return load_config(overrides, preset_for(overrides))


def _write_split(folder: Path):
    """Users 0 and 1 as UniSRec ships them: every train prefix, one valid and one test row.
    User 1's test target (item 2) is a repeat of an item in their history."""
    head = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    (folder / "Toy.train.inter").write_text(head + "0\t0 1\t2\n0\t0\t1\n1\t3\t2\n")
    (folder / "Toy.valid.inter").write_text(head + "0\t0 1 2\t3\n1\t3 2\t4\n")
    (folder / "Toy.test.inter").write_text(head + "0\t0 1 2 3\t4\n1\t3 2 4\t2\n")
    (folder / "Toy.text").write_text("item_id:token\ttext:token_seq\n"
                                     + "".join(f"ASIN{k}\tThing {k}. Tools. Brand{k}.\n" for k in range(5)))
    (folder / "Toy.item2index").write_text("".join(f"ASIN{k}\t{k}\n" for k in range(5)))


def _split_pairs(root, prefix, part):
    t = pq.read_table(f"{root}/{prefix}/{part}").to_pydict()
    return sorted(zip(t["user_id"], t["item_id"]))


def test_recbole_given_split_comes_back_exactly_with_repeats(tmp_path):
    data = tmp_path / "toy"
    data.mkdir()
    _write_split(data)
    out = preprocess(_cfg("recbole", data, tmp_path / "st"), engine="local")
    root, prefix = tmp_path / "st", out["prefix"]
    assert _split_pairs(root, prefix, "valid") == [("0", "3"), ("1", "4")]
    assert _split_pairs(root, prefix, "test") == [("0", "4"), ("1", "2")]  # the repeat is kept
    assert _split_pairs(root, prefix, "train") == [("0", "0"), ("0", "1"), ("0", "2"), ("1", "2"), ("1", "3")]
    assert out["stats"]["dropped"]["duplicates"] == 0 and out["stats"]["source"]["given_split"] is True
    items = pq.read_table(f"{root}/{prefix}/items").to_pydict()
    text = dict(zip(items["item_id"], items["text"]))
    assert text["2"].startswith("Thing 2.")  # .text re-keyed through item2index


def test_recbole_refuses_settings_that_would_change_a_given_split(tmp_path):
    data = tmp_path / "toy"
    data.mkdir()
    _write_split(data)
    for bad, word in (("preprocess.kcore=5", "kcore=5"), ("preprocess.dedupe=true", "dedupe=True")):
        cfg = _cfg("recbole", data, tmp_path / "st", bad)
        with pytest.raises(ValueError, match=f"used as given.*{word}"):
            prepare_source(cfg, Storage(str(tmp_path / "st")))


def test_recbole_split_errors_name_the_file_and_user(tmp_path):
    data = tmp_path / "toy"
    data.mkdir()
    _write_split(data)
    head = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    (data / "Toy.test.inter").write_text(head + "0\t0 1 2 3\t4\n0\t0 1 2 3 4\t1\n1\t3 2 4\t2\n")
    with pytest.raises(recbole.RecBoleFormatError, match="Toy.test.inter: user 0 has more than one row"):
        recbole.load(Storage(str(data)))
    (data / "Toy.test.inter").write_text("user_id:token\titem_id:token\n0\t4\n")
    with pytest.raises(recbole.RecBoleFormatError, match="missing field.*item_id_list"):
        recbole.load(Storage(str(data)))
    (data / "Toy.valid.inter").unlink()
    (data / "Toy.test.inter").unlink()
    with pytest.raises(recbole.RecBoleFormatError, match="needs all of train, valid, test"):
        recbole.load(Storage(str(data)))


def test_recbole_plain_inter_with_timestamps_and_item_file(tmp_path):
    data = tmp_path / "ml"
    data.mkdir()
    (data / "ml.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                   "u\ta\t4\t300\nu\tb\t5\t100\nu\tc\t3\t200\nv\ta\t2\t50\n")
    (data / "ml.item").write_text("item_id:token\tmovie_title:token_seq\tgenre:token_seq\n"
                                  "a\tAlien\tHorror Sci-Fi\nb\tBambi\tAnimation\n")
    events, items, info = recbole.load(Storage(str(data)))
    assert info["given_split"] is False
    assert events["event"].to_pylist() == ["rate"] * 4 and events["value"].to_pylist()[0] == 4.0
    assert [t.timestamp() for t in events["ts"].to_pylist()[:3]] == [300, 100, 200]
    row = items.to_pylist()[0]
    assert row["title"] == "Alien" and row["categories"] == ["Horror", "Sci-Fi"] and "Alien" in row["text"]


def test_sequences_leave_one_out_and_attributes(tmp_path):
    data = tmp_path / "seq"
    data.mkdir()
    (data / "Toy.txt").write_text("1 10 11 12 10\n2 11 12 13\n")
    (data / "Toy_item2attributes.json").write_text(json.dumps({"10": [1, 2], "11": [2]}))
    out = preprocess(_cfg("sequences", data, tmp_path / "st"), engine="local")
    root, prefix = tmp_path / "st", out["prefix"]
    assert _split_pairs(root, prefix, "test") == [("1", "10"), ("2", "13")]
    assert _split_pairs(root, prefix, "valid") == [("1", "12"), ("2", "12")]
    items = {r["item_id"]: r for r in pq.read_table(f"{root}/{prefix}/items").to_pylist()}
    assert items["10"]["categories"] == ["attr1", "attr2"] and items["11"]["text"] == "attr2"
    assert items["13"]["text"] == ""  # no attributes: no text, still in the catalog
    (data / "Toy.txt").write_text("1 10 11\n2\n")
    with pytest.raises(sequences.SequenceFormatError, match="line 2: user 2 has no items"):
        sequences.load(Storage(str(data)))


@pytest.mark.parametrize("folder,source,users,items,rows", [
    ("amazon-2018-scientific-unisrec", "recbole", 8442, 4385, 59427),
    ("amazon-2014-beauty-s3rec", "sequences", 22363, 12101, 198502),
])
def test_shared_benchmarks_load_as_published(tmp_path, folder, source, users, items, rows):
    path = SHARED / folder
    if not path.is_dir():
        pytest.skip(f"{path} not found (the shared benchmark data is not on this machine)")
    out = preprocess(_cfg(source, path, tmp_path / "st"), engine="local")
    st = out["stats"]
    assert (st["users"], st["items"], st["interactions"]) == (users, items, rows)
    assert st["valid"] == st["test"] == users and st["items_without_metadata"] == 0
    if source == "recbole":  # the given split, pair for pair
        for part in ("valid", "test"):
            lines = (path / f"Scientific.{part}.inter").read_text().splitlines()[1:]
            given = sorted((u, t) for u, _h, t in (line.split("\t") for line in lines))
            assert _split_pairs(tmp_path / "st", out["prefix"], part) == given
