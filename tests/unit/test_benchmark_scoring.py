"""The quality benchmark's scorer: the peer's files scored on the project's (user, target) pairs,
paired BCa intervals, and no run that can read the test split while choosing settings."""

import numpy as np
import pytest

from benchmarks.quality import metrics, paired_bootstrap, peer_ranks, ranks_from_predictions


def _peer_files(work, name, targets, lists):
    split = work / "splits" / name
    split.mkdir(parents=True)
    (split / "test.csv").write_text("user,item,timestamp\n" + "".join(f"{u},{i},0\n" for u, i in targets.items()))
    pred = work / "out" / "predictions" / name
    pred.mkdir(parents=True)
    rows = [f"{u},{r + 1},{i}\n" for u, items in lists.items() for r, i in enumerate(items)]
    (pred / "SASRec-CE.test.csv").write_text("user,rank,item\n" + "".join(reversed(rows)))  # any row order


def test_peer_lists_scored_with_the_project_scorer(tmp_path):
    targets = {"u1": "a", "u2": "b", "u3": "c"}
    _peer_files(tmp_path, "toy", targets, {"u1": ["x", "a"], "u2": ["b"], "u3": ["x", "y"]})
    ranks = peer_ranks(tmp_path, "toy", ["u3", "u1", "u2"], targets)
    assert ranks.tolist() == [100, 1, 0]  # in the order asked; absent = 100 (a miss)
    assert metrics(ranks)["recall@10"] == pytest.approx(2 / 3)
    assert ranks.tolist() == ranks_from_predictions(["u1", "u2", "u3"], [["x", "a"], ["b"], ["x", "y"]],
                                                    {"u3": "c", "u1": "a", "u2": "b"}).tolist()


def test_peer_on_other_pairs_stops_the_run(tmp_path):
    _peer_files(tmp_path, "toy", {"u1": "a", "u2": "z"}, {"u1": ["a"], "u2": ["z"]})
    with pytest.raises(SystemExit, match="test pairs differ: 1 only in the peer's"):
        peer_ranks(tmp_path, "toy", ["u1", "u2"], {"u1": "a", "u2": "b"})


def test_paired_bca_interval():
    rng = np.random.default_rng(0)
    a = rng.random(3000)
    better = paired_bootstrap(a + 0.05 + rng.normal(0, 0.05, 3000), a)
    assert better["method"] == "BCa" and 0 < better["ci95"][0] < better["diff"] < better["ci95"][1] < 0.06
    noise = paired_bootstrap(a + rng.normal(0, 0.05, 3000), a)
    assert noise["ci95"][0] < 0 < noise["ci95"][1]
    assert paired_bootstrap(a, a) == {"diff": 0.0, "ci95": [0.0, 0.0], "method": "BCa", "n": 3000}


def test_paired_bootstrap_batched_is_the_unbatched_result():
    """Bounded memory changes nothing: 7 resamples a call (2000 is no multiple of 7, so the
    last call is short) give the same interval as scipy's single call for the same seed."""
    from scipy.stats import bootstrap

    rng = np.random.default_rng(3)
    a, b = rng.random(1500), rng.random(1500)
    batched = paired_bootstrap(a, b, seed=5, max_cells=7 * 1500 + 10)
    whole = bootstrap((a - b,), np.mean, n_resamples=2000, confidence_level=0.95, method="BCa",
                      random_state=np.random.default_rng(5), vectorized=True).confidence_interval
    assert batched["diff"] == (a - b).mean()
    assert batched["ci95"] == [whole.low, whole.high]
    assert paired_bootstrap(a, b, max_cells=1)["ci95"] == paired_bootstrap(a, b)["ci95"]  # batch >= 1


def test_tuning_never_reads_the_test_split(tmp_path):
    from benchmarks.tune import load_without_test
    from components.storage import Storage
    from jobs.preprocess import run as preprocess
    from tests.unit.test_research_sources import _cfg

    data = tmp_path / "seq"
    data.mkdir()
    (data / "Toy.txt").write_text("1 10 11 12 10\n2 11 12 13\n")
    out = preprocess(_cfg("sequences", data, tmp_path / "st"), engine="local")

    class NoTest(Storage):
        def read_parquet(self, rel, *args, **kwargs):
            assert not rel.rstrip("/").endswith("/test"), f"tuning read {rel}"
            return super().read_parquet(rel, *args, **kwargs)

    h = load_without_test(NoTest(str(tmp_path / "st")), out["prefix"])["histories"]
    assert len(h.valid["user_idx"]) == 2 and len(h.test["user_idx"]) == 0
    from benchmarks.quality import user_half

    for half in (0, 1):  # one half's valid targets only
        h = load_without_test(NoTest(str(tmp_path / "st")), out["prefix"], half)["histories"]
        assert len(h.valid["user_idx"]) == sum(user_half(u) == half for u in ("1", "2"))
