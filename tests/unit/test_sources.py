import gzip
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from components.config import load_config
from components.data.sources import movielens, mind, amazon, prepare_source, synthetic
from components.storage import Storage


def _synthetic(n=20_000, seed=1):
    cfg = load_config([f"data.synthetic.num_events={n}", f"data.seed={seed}", "data.synthetic.num_shards=3"])
    world = synthetic.build_world(cfg.data.synthetic, seed)
    events = pa.concat_tables(synthetic.generate_shards(world, cfg.data.synthetic, seed))
    return world, events


def test_synthetic_is_deterministic_and_sized():
    w1, e1 = _synthetic(seed=3)
    w2, e2 = _synthetic(seed=3)
    _, e3 = _synthetic(seed=4)
    assert e1.num_rows == 20_000
    assert e1.equals(e2) and w1.items.equals(w2.items)
    assert not e1.equals(e3)
    assert set(e1["event"].to_pylist()) == {"view", "click", "cart", "purchase", "rate"}
    rated = e1.filter(pc.equal(e1["event"], "rate"))
    assert pc.min(rated["value"]).as_py() >= 1 and pc.max(rated["value"]).as_py() <= 5


def test_synthetic_text_predicts_category():
    """Nearest-centroid on bag-of-words recovers the item's category: the text carries signal."""
    world, _ = _synthetic()
    texts = [f"{t} {x}".lower() for t, x in zip(world.items["title"].to_pylist(), world.items["text"].to_pylist())]
    vocab = {w: k for k, w in enumerate(sorted({w for t in texts for w in t.split()}))}
    X = np.zeros((len(texts), len(vocab)))
    for r, t in enumerate(texts):
        for w in t.split():
            X[r, vocab[w]] += 1
    y = world.item_cat
    train = np.arange(len(y)) % 2 == 0
    cents = np.stack([X[train & (y == c)].mean(0) for c in range(y.max() + 1)])
    pred = np.argmax(X[~train] @ cents.T / np.linalg.norm(cents, axis=1), axis=1)
    assert (pred == y[~train]).mean() > 0.9


def test_synthetic_users_have_concentrated_tastes():
    world, events = _synthetic()
    cat_of = dict(zip(world.items["item_id"].to_pylist(), world.item_cat))
    per_user = {}
    for u, i in zip(events["user_id"].to_pylist(), events["item_id"].to_pylist()):
        per_user.setdefault(u, Counter())[cat_of[i]] += 1
    share = np.mean([sum(v for _, v in c.most_common(3)) / sum(c.values()) for c in per_user.values()])
    assert share > 0.7  # uniform over 16 categories would give ~0.19


def test_movielens_formats_detected(tmp_path):
    a = tmp_path / "latest"
    a.mkdir()
    (a / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,4.0,964982703\n")
    (a / "movies.csv").write_text('movieId,title,genres\n10,"Heat, The (1995)",Action|Crime\n')
    b = tmp_path / "100k"
    b.mkdir()
    (b / "u.data").write_text("1\t10\t3\t881250949\n")
    (b / "u.item").write_bytes("10|Caf\xe9 (1995)|01-Jan-1995||http://x|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n".encode("latin-1"))
    c = tmp_path / "1m"
    c.mkdir()
    (c / "ratings.dat").write_text("1::10::5::978300760\n")
    (c / "movies.dat").write_text("10::Toy Story (1995)::Animation|Children's\n")
    for d, title, cats in ((a, "Heat, The (1995)", ["Action", "Crime"]), (b, "Café (1995)", ["Action"]),
                           (c, "Toy Story (1995)", ["Animation", "Children's"])):
        events, items = movielens.load(Storage(str(d)))
        assert events.to_pylist()[0]["user_id"] == "1" and events.to_pylist()[0]["item_id"] == "10"
        assert events["event"].to_pylist() == ["rate"]
        assert items.to_pylist()[0]["title"] == title and items.to_pylist()[0]["categories"] == cats
    with pytest.raises(FileNotFoundError, match="ratings.csv"):
        movielens.load(Storage(str(tmp_path)))


def test_amazon_and_mind_adapters(tmp_path):
    (tmp_path / "Toys_5.json.gz").write_bytes(gzip.compress(
        b'{"reviewerID": "A1", "asin": "B1", "overall": 5.0, "unixReviewTime": 1529193600}\n'))
    meta = {"asin": "B1", "title": "Robot &amp; Kit", "description": ["<b>Build</b> it"], "category": ["Toys", "Toys"]}
    (tmp_path / "meta_Toys.json.gz").write_bytes(gzip.compress(json.dumps(meta).encode()))
    events, items = amazon.load(Storage(str(tmp_path)))
    assert events.to_pylist()[0]["value"] == 5.0
    assert items.to_pylist()[0]["categories"] == ["Toys"]
    assert "<b>Build</b>" in items.to_pylist()[0]["text"]  # cleaned later, in validation

    m = tmp_path / "mind"
    m.mkdir()
    (m / "behaviors.tsv").write_text("1\tU1\t11/11/2019 9:05:58 AM\tN1 N2\tN3-1 N4-0\n")
    (m / "news.tsv").write_text("N3\tsports\tfootball\tA title\tAn abstract\thttp://x\t[]\t[]\n")
    events, items = mind.load(Storage(str(m)))
    assert events["item_id"].to_pylist() == ["N1", "N2", "N3"]  # history then the click; N4 skipped
    ts = events["ts"].cast(pa.int64()).to_pylist()
    assert ts[0] < ts[1] < ts[2]
    assert items.to_pylist()[0]["categories"] == ["sports", "football"]
    assert mind.load(Storage(str(m)), include_skips=True)[0]["event"].to_pylist()[-1] == "skip"


def test_prepare_source_reuses_raw_shards(tmp_path):
    cfg = load_config(["data.synthetic.num_events=2000", f"storage.root={tmp_path}"])
    st = Storage(str(tmp_path))
    first = prepare_source(cfg, st)
    mtime = (tmp_path / "raw/events/synthetic/part-00000.parquet").stat().st_mtime_ns
    again = prepare_source(cfg, st)
    assert (tmp_path / "raw/events/synthetic/part-00000.parquet").stat().st_mtime_ns == mtime
    assert first.info["events"] == again.info["events"] == 2000


def test_files_source_says_what_it_expected(tmp_path):
    cfg = load_config(["data.source=files", f"data.path={tmp_path}", f"storage.root={tmp_path}/st"])
    with pytest.raises(FileNotFoundError, match="no event shards"):
        prepare_source(cfg, Storage(str(tmp_path / "st")))
