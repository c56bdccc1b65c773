"""Serving logic without Ray: bundle verification, hot swap, encoder parity, retrieval, upserts."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from components import checkpoints as ck
from components import registry
from components.layout import ENCODER_PARTS, RANKER_PARTS, RETRIEVER_PARTS
from components.models.retriever import gap_buckets
from serve.ann import PAD
from serve.models import RankerModel, UserEncoderModel
from serve.retrieval import RetrievalModel
from serve.watcher import ModelWatcher, fetch_parts
from jobs.quick_train import build_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("store"), epochs=4, force_promote=True)


@pytest.fixture(scope="module")
def loaded(bundle, tmp_path_factory):
    d = fetch_parts(bundle["storage"], bundle["pointer"], RETRIEVER_PARTS + RANKER_PARTS,
                    tmp_path_factory.mktemp("fetched"))
    return {"dir": d, "retrieval": RetrievalModel(d, "v1"), "encoder": UserEncoderModel(d, "v1"),
            "ranker": RankerModel(d, "v1")}


def _category_items(r: RetrievalModel, category: str, n: int):
    return [iid for iid, cats in zip(r.ids, r.categories) if cats == [category]][:n]


def test_fetch_refuses_a_file_that_does_not_match_the_manifest(bundle, tmp_path):
    storage, pointer = bundle["storage"], bundle["pointer"]
    bad = dict(pointer, sha256={**pointer["sha256"], "retriever/model.safetensors": "0" * 64})
    with pytest.raises(ck.CheckpointError, match="sha256 of retriever/model.safetensors"):
        fetch_parts(storage, bad, RETRIEVER_PARTS, tmp_path / "a")
    partial = dict(pointer, sha256={k: v for k, v in pointer["sha256"].items() if not k.startswith("retriever/")})
    with pytest.raises(ck.CheckpointError, match="no retriever/"):
        fetch_parts(storage, partial, RETRIEVER_PARTS, tmp_path / "b")


def test_popularity_and_recency_come_from_the_bundle_alone(loaded, bundle):
    """A bundle is self-contained: the ranker's popularity and recency features come from its
    interactions/ part, identical to what the training dataset gives (which serving never reads)."""
    from components.data.sequences import histories_from_tables
    from components.models.ranker import item_stats

    r = RetrievalModel(loaded["dir"], "fresh")  # the module's model takes upserts in other tests
    prefix, storage = bundle["dataset"].prefix, bundle["storage"]
    h = histories_from_tables(*[storage.read_parquet(f"{prefix}/{t}") for t in ("sequences", "valid", "test")],
                              r.size)
    expected = item_stats(h.items, h.ts, r.categories)
    assert len(expected.keys) > 0 and r.log_pop.max() > 0
    np.testing.assert_array_equal(r.stats.keys, expected.keys)
    np.testing.assert_array_equal(r.log_pop, expected.log_pop)


def test_encoder_from_item_vectors_matches_the_offline_user_vector(loaded, bundle):
    r, enc = loaded["retrieval"], loaded["encoder"]
    items = r.ids[:7]
    rows, _ = r.lookup(items)
    ts = np.array([1_700_000_000_000 + 3_600_000 * k for k in range(7)])
    ev = np.array([1, 0, 1, 2, 1, 3, 1])
    served = enc.encode([{"vectors": r.history_vectors(rows), "events": ev, "ts": ts}])[0]
    text = torch.as_tensor(np.vstack([np.zeros((1, r.text.shape[1]), np.float32), r.text.numpy()]))
    with torch.no_grad():
        offline = enc.model.user_vector(torch.as_tensor([rows]), torch.as_tensor(np.array([ev + 1])),
                                        torch.as_tensor(np.array([gap_buckets(ts)])), text)[0].numpy()
    np.testing.assert_allclose(served, offline, atol=1e-4)


def test_batched_encoding_equals_one_at_a_time(loaded):
    r, enc = loaded["retrieval"], loaded["encoder"]
    hs = []
    for n in (1, 4, 9):
        rows, _ = r.lookup(r.ids[10:10 + n])
        hs.append({"vectors": r.history_vectors(rows), "events": [1] * n,
                   "ts": [1_700_000_000_000 + k for k in range(n)]})
    batched = enc.encode(hs)
    for k, h in enumerate(hs):
        np.testing.assert_allclose(batched[k], enc.encode([h])[0], atol=1e-4)


def test_search_respects_exclusions_filters_and_gives_reasons_from_history(loaded):
    r, enc = loaded["retrieval"], loaded["encoder"]
    cat = r.categories[0][0]
    hist = _category_items(r, cat, 6)
    rows, _ = r.lookup(hist)
    u = enc.encode([{"vectors": r.history_vectors(rows), "events": [1] * 6,
                     "ts": [1_700_000_000_000 + k for k in range(6)]}])[0]
    cand, scores = r.search(u, 20, exclude_rows=rows)
    assert len(cand) == 20 and not set(cand) & set(rows)
    assert np.all(np.diff(scores) <= 1e-6)
    assert set(r.reasons(cand, rows)) <= set(hist)
    other = sorted({c for cats in r.categories for c in cats} - {cat})[0]
    filt, _ = r.search(u, 10, categories=[other])
    assert all(other in r.categories[c - 1] for c in filt)
    ctx = r.context(cand, scores, rows, [1_700_000_000_000] * 6, [1] * 6)
    scored = loaded["ranker"].score([{"u": u, "i": r.vectors[cand], "ctx": ctx, "retrieval": scores}])[0]
    assert scored.shape == (20,) and np.isfinite(scored).all()


def test_an_upserted_item_is_retrievable_at_once_from_its_text(loaded):
    r, enc = loaded["retrieval"], loaded["encoder"]
    cat = "Cycling"
    hist = _category_items(r, cat, 8)
    rows, _ = r.lookup(hist)
    u = enc.encode([{"vectors": r.history_vectors(rows), "events": [1] * 8,
                     "ts": [1_700_000_000_000 + k for k in range(8)]}])[0]
    # the text of an existing cycling item under a new id: close in meaning to the user's history
    src = r.row[hist[0]] - 1
    text = loaded["retrieval"].text[src].numpy()[None]
    new = r.upsert([{"item_id": "brand-new-helmet", "title": "Brand-new helmet", "categories": [cat]}], text)
    assert new == 1 and r.item("brand-new-helmet")["new"] is True
    cand, _ = r.search(u, 50, exclude_rows=rows)
    assert r.row["brand-new-helmet"] in set(cand.tolist())
    # The fused channels (what /v1/recommend uses): a new item whose LLM text is that of the
    # user's best pick is in the top-10 at once (it inherits its nearest catalog items' score).
    ts = [1_700_000_000_000 + k for k in range(8)]
    best = r.candidates(u, rows, ts, [1] * 8, [], None, 10)["items"][0]
    twin = r.text[r.row[best["item_id"]] - 1].numpy()[None]
    assert r.upsert([{"item_id": "twin-of-best", "title": "Twin", "categories": [cat]}], twin) == 1
    assert r.channels is not None and r.channels.num_items == r.size
    top = r.candidates(u, rows, ts, [1] * 8, [], None, 10)
    assert "twin-of-best" in [x["item_id"] for x in top["items"]]
    fresh, _ = r.cold_start(3)
    assert r.row["twin-of-best"] in set(fresh.tolist())  # the freshest item is mixed into cold start
    assert r.upsert([{"item_id": "brand-new-helmet", "title": "Renamed", "categories": [cat]}], text) == 0
    assert r.item("brand-new-helmet")["title"] == "Renamed"
    # A trained catalog item upserted (e.g. retitled), once or again, keeps its trained vectors;
    # an upserted one takes its new text.
    trained = hist[1]
    vec, txt = r.vectors[r.row[trained]].copy(), r.text[r.row[trained] - 1].clone()
    other = r.text[r.row[hist[2]] - 1].numpy()[None]
    for title in ("Retitled", "Retitled again"):
        assert r.upsert([{"item_id": trained, "title": title, "categories": [cat]}], other) == 0
        np.testing.assert_array_equal(r.vectors[r.row[trained]], vec)
        assert torch.equal(r.text[r.row[trained] - 1], txt) and r.item(trained)["title"] == title
    assert r.upsert([{"item_id": "brand-new-helmet", "title": "Renamed", "categories": [cat]}], other) == 0
    assert torch.allclose(r.text[r.row["brand-new-helmet"] - 1], torch.as_tensor(other[0]), atol=1e-6)


def test_live_co_visits_bring_a_new_item_to_the_users_whose_items_it_was_seen_with(loaded):
    """The co-visitation channel updated by live events (SessionState -> RetrievalModel): a new
    item whose text is unlike a cycling user's history climbs into their top-10 once live users
    take it after cycling items. Fusion weights as fitted where ItemKNN wins (small catalogs)."""
    from components.online.live_state import SessionState

    r, enc = loaded["retrieval"], loaded["encoder"]
    hist = _category_items(r, "Cycling", 9)[1:]
    rows, _ = r.lookup(hist)
    ts = [1_700_000_000_000 + k for k in range(8)]
    u = enc.encode([{"vectors": r.history_vectors(rows), "events": [1] * 8, "ts": ts}])[0]
    other = next(k for k, c in enumerate(r.categories) if "Cycling" not in c)
    r.upsert([{"item_id": "live-covisit-x", "title": "X", "categories": ["Other"]}], r.text[other].numpy()[None])
    saved = dict(r.channels.cfg.weights)
    r.channels.cfg.weights = {"retriever": 0.0, "covisit": 1.0, "text": 0.0, "popularity": 0.0}
    try:
        state = SessionState()

        def position():
            ids = [x["item_id"] for x in r.candidates(u, rows, ts, [1] * 8, [], None, 100,
                                                      state.context(None, hist)["covisit"])["items"]]
            return ids.index("live-covisit-x") if "live-covisit-x" in ids else 100

        start = position()
        for n in range(12):
            for k, item in enumerate(hist[-4:] + ["live-covisit-x"]):
                state.add(f"live-{n}", item, "click", k)
        assert start >= 20 and position() < 10, (start, position())
    finally:
        r.channels.cfg.weights = saved


def test_watcher_swaps_to_a_new_version_and_refuses_a_corrupt_one(bundle, tmp_path):
    storage = bundle["storage"]
    loads = []
    w = ModelWatcher(storage, "recommender", ENCODER_PARTS, lambda f, v: loads.append(v) or v, interval_s=0.1)
    assert w.check_once() and w.current == bundle["run_id"] and w.swaps == 0

    # a second version: same files, new run id
    src = Path(storage.path(bundle["prefix"]))
    prefix2 = f"checkpoints/recommender/{bundle['run_id']}-b"
    storage.upload_dir(src, prefix2)
    registry.promote(storage, "recommender", bundle["run_id"] + "-b", prefix2, {}, bundle["manifest"])
    assert w.check_once() and w.current == bundle["run_id"] + "-b" and w.swaps == 1

    # a corrupt third version: one weight file altered after the manifest was written
    prefix3 = f"checkpoints/recommender/{bundle['run_id']}-c"
    storage.upload_dir(src, prefix3)
    weights = Path(storage.path(f"{prefix3}/retriever/model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    registry.promote(storage, "recommender", bundle["run_id"] + "-c", prefix3, {}, bundle["manifest"])
    assert not w.check_once()
    assert w.current == bundle["run_id"] + "-b"  # the old version keeps serving
    assert "sha256" in w.refused[bundle["run_id"] + "-c"]
    assert not w.check_once() and loads.count(bundle["run_id"] + "-c") == 0  # not retried
    status = w.status()
    assert status["version"] == bundle["run_id"] + "-b" and status["swaps"] == 1
    json.dumps(status)  # served by /v1/version
    # put the good pointer back for the other tests of this module
    registry.promote(storage, "recommender", bundle["run_id"], bundle["prefix"], {}, bundle["manifest"])


def test_a_replica_never_answers_a_request_pinned_to_a_version_it_does_not_hold():
    """A request is pinned to one model version for all its hops; a replica that does not hold it
    (it started after the swap, or dropped the version) refuses with StaleVersion instead of
    answering with another model (issue 14.6). The models here are stand-ins carrying a version:
    the logic under test is the version bookkeeping, not the models."""
    from types import SimpleNamespace

    from serve.deployments import StaleVersion, _Versioned

    replica = _Versioned()
    replica._init_versions()
    replica.watcher = SimpleNamespace(current=SimpleNamespace(version="v2"), candidate=None)
    assert replica.model_for("v2").version == "v2" and replica.model_for(None).version == "v2"
    with pytest.raises(StaleVersion, match="v1 is not loaded here"):  # a replica started on v2
        replica.model_for("v1")
    replica._remember(SimpleNamespace(version="v1"))  # a replica that swapped v1 -> v2 keeps v1
    assert replica.model_for("v1").version == "v1"
    out = replica.per_version([{"version": "v1"}, {"version": "v2"}, {"version": "v1"}],
                              lambda model, batch: [model.version] * len(batch))
    assert out == ["v1", "v2", "v1"]  # one dynamic batch, one sub-batch per pinned version
    with pytest.raises(StaleVersion):
        replica.per_version([{"version": "v2"}, {"version": "v0"}], lambda model, batch: [0] * len(batch))
    with pytest.raises(StaleVersion):  # a canary's candidate not loaded here yet
        replica.model_for("v3")
    replica.watcher.candidate = SimpleNamespace(version="v3")  # loaded beside v2
    assert replica.model_for("v3").version == "v3" and replica.model_for("v2").version == "v2"


def test_the_watcher_loads_a_canary_beside_the_promoted_version_and_promotes_it_without_reloading(bundle):
    """Issue 25: a canary's candidate is fetched and verified like a promotion, held beside the
    promoted version, taken as is when the canary is promoted (no second download) and dropped
    when a canary ends."""
    storage, rid = bundle["storage"], bundle["run_id"]
    loads = []
    w = ModelWatcher(storage, "recommender", ENCODER_PARTS, lambda f, v: loads.append(v) or v, interval_s=0.1)
    assert w.check_once() and w.current == rid and w.candidate is None
    with pytest.raises(LookupError, match="no published bundle"):
        registry.start_canary(storage, "never-trained", 0.1)
    with pytest.raises(ValueError, match="promoted version already"):
        registry.start_canary(storage, rid, 0.1)
    storage.upload_dir(Path(storage.path(bundle["prefix"])), f"checkpoints/recommender/{rid}-canary")
    canary = registry.start_canary(storage, rid + "-canary", 0.1)
    assert canary["control"] == rid and canary["sha256"] == bundle["manifest"]
    assert not w.check_once() and w.current == rid and w.candidate == rid + "-canary"
    assert w.status()["candidate"] == rid + "-canary" and not w.check_once()  # loaded once
    registry.promote_canary(storage, canary)
    assert registry.read_canary(storage) is None
    assert w.check_once() and w.current == rid + "-canary" and w.candidate is None and w.swaps == 1
    assert loads.count(rid + "-canary") == 1
    # a canary of the first version again, ended: the replica drops it
    registry.start_canary(storage, rid, 0.5)
    assert not w.check_once() and w.candidate == rid
    registry.end_canary(storage)
    assert not w.check_once() and w.candidate is None and w.current == rid + "-canary"
    # put the good pointer back for the other tests of this module
    registry.promote(storage, "recommender", rid, bundle["prefix"], {}, bundle["manifest"])


def test_the_health_check_fails_without_a_model_or_a_live_watch_thread(bundle):
    """What Ray Serve's check_health reads (serve.deployments._Versioned.check_health)."""
    import threading

    w = ModelWatcher(bundle["storage"], "recommender", ENCODER_PARTS, lambda f, v: v, interval_s=0.1)
    assert "no version loaded" in w.problem()
    assert w.check_once() and w.problem() is None
    w._thread = threading.Thread(target=lambda: None)  # a watch thread that died (not stopped)
    w._thread.start()
    w._thread.join()
    assert "watch thread died" in w.problem()
    w.stop()
    assert w.problem() is None  # stopped on purpose: healthy


def test_the_ann_pool_path_gives_the_exact_answer_when_its_pool_covers_the_catalog(loaded):
    """Issue 24: above ``ann_above`` items candidates come from an ANN pool whose scores are
    standardised by the catalog's exact moments (serve/ann.py). On a catalog smaller than the
    pool that covers every item, so the answer must be the exact path's, scores included; a new
    item joins the ANN index and the moments. The recall of the pool on large catalogs is
    measured by benchmarks/catalog_scale.py."""
    exact = RetrievalModel(loaded["dir"], "v1")  # fresh: other tests upsert into loaded["retrieval"]
    pooled = RetrievalModel(loaded["dir"], "v1", ann_above=0)
    assert exact.pool is None and pooled.pool is not None and pooled.pool.n == exact.size
    assert pooled.pool.index.d % PAD == 0  # zero-padded: faiss scans SQ8 codes with SIMD only then
    enc = loaded["encoder"]
    ts = [1_700_000_000_000 + k for k in range(6)]
    for cat in sorted({c for cats in exact.categories for c in cats})[:3]:
        hist = _category_items(exact, cat, 6)
        rows, _ = exact.lookup(hist)
        u = enc.encode([{"vectors": exact.history_vectors(rows), "events": [1] * 6, "ts": ts}])[0]
        a = exact.candidates(u, rows, ts, [1] * 6, rows[:1], None, 50)
        b = pooled.candidates(u, rows, ts, [1] * 6, rows[:1], None, 50)
        assert [x["item_id"] for x in a["items"]] == [x["item_id"] for x in b["items"]]
        assert np.allclose(a["retrieval"], b["retrieval"], atol=1e-4) and np.allclose(a["ctx"], b["ctx"], atol=1e-4)
        other = sorted({c for cats in exact.categories for c in cats} - {cat})[0]
        f = pooled.candidates(u, rows, ts, [1] * 6, [], [other], 10)
        assert f["items"] and all(other in x["categories"] for x in f["items"])
    before = pooled.pool.n
    text = pooled.text[0].numpy()[None]
    assert pooled.upsert([{"item_id": "pooled-new", "title": "New", "categories": ["Cycling"]}], text) == 1
    assert pooled.pool.n == before + 1 and pooled.pool.index.ntotal == before + 1
    assert pooled.vector_moments.n == before + 1
    mean, sd = pooled.vector_moments.of(torch.ones(1, pooled.dim))
    x = torch.as_tensor(pooled.vectors[1:]).double().sum(1)
    assert abs(mean.item() - x.mean().item()) < 1e-3 and abs(sd.item() - x.std().item()) < 1e-3


def test_a_bundle_ships_its_ann_index_and_a_replica_loads_it_instead_of_building(loaded, tmp_path, caplog):
    """Issue 24: the ANN index of a large catalog is built at training time into the bundle's ann/
    part (jobs.train, past train.ann_index_above) so that a replica's hot swap loads it; it must be
    the index the replica would have built (same answers), and one built over another catalog is
    refused with a warning (the replica builds its own)."""
    import shutil

    from components import layout
    from serve.retrieval import ship_ann_index

    folder = tmp_path / "bundle"
    shutil.copytree(loaded["dir"], folder)
    meta = ship_ann_index(folder)
    built = RetrievalModel(loaded["dir"], "v1", ann_above=0)  # fresh: other tests upsert into loaded["retrieval"]
    assert (folder / layout.ANN / "index.faiss").is_file() and meta["items"] == built.size
    shipped = RetrievalModel(folder, "v1", ann_above=0)
    assert shipped.pool.loaded and not built.pool.loaded
    enc, ts = loaded["encoder"], [1_700_000_000_000 + k for k in range(4)]
    for cat in sorted({c for cats in built.categories for c in cats})[:3]:
        rows, _ = built.lookup(_category_items(built, cat, 4))
        u = enc.encode([{"vectors": built.history_vectors(rows), "events": [1] * 4, "ts": ts}])[0]
        a, b = (m.candidates(u, rows, ts, [1] * 4, rows[:1], None, 50) for m in (built, shipped))
        assert [x["item_id"] for x in a["items"]] == [x["item_id"] for x in b["items"]]
    # An index of another catalog (one item fewer) is not used.
    from serve.ann import CandidatePool

    other = CandidatePool(built.vectors[2:], None if built.channels.text is None else built.channels.text.numpy()[1:],
                          built.channels.log_pop[1:], built.channels.cfg.weights)
    other.save(folder / layout.ANN)
    with caplog.at_level("WARNING", logger="serve.ann"):
        rebuilt = RetrievalModel(folder, "v1", ann_above=0)
    assert not rebuilt.pool.loaded and rebuilt.pool.index.ntotal == built.size
    assert "does not fit this catalog" in caplog.text


def test_fp16_precision_halves_the_text_table_and_keeps_the_answers(loaded):
    """Issue 25 item 4: Serve precision fp16 keeps the LLM text vectors in float16 (half the
    bytes every request's text scores read); scores stay float32 and match fp32's to float16's
    rounding, on the exact and the pooled path; upserts keep the table's dtype."""
    full = RetrievalModel(loaded["dir"], "v1")  # fresh: other tests upsert into loaded["retrieval"]
    half = RetrievalModel(loaded["dir"], "v1", precision="fp16")
    pooled = RetrievalModel(loaded["dir"], "v1", ann_above=0, precision="fp16")
    assert full.channels.text.dtype == torch.float32
    assert half.channels.text.dtype == pooled.channels.text.dtype == torch.float16
    enc, ts = loaded["encoder"], [1_700_000_000_000 + k for k in range(6)]
    for cat in sorted({c for cats in full.categories for c in cats})[:3]:
        rows, _ = full.lookup(_category_items(full, cat, 6))
        u = enc.encode([{"vectors": full.history_vectors(rows), "events": [1] * 6, "ts": ts}])[0]
        raw = torch.as_tensor(full.vectors[1:] @ u)[None]
        (fa, za), (fb, zb) = (m.channels.scores(raw, [np.asarray(rows) - 1], None) for m in (full, half))
        assert fb.dtype == torch.float32 and zb["text"].dtype == torch.float32
        assert 0 < (za["text"] - zb["text"]).abs().max() < 0.05  # rounded, not recomputed in float32
        np.testing.assert_allclose(fb.numpy(), fa.numpy(), atol=0.05)
        a, b, c = (m.candidates(u, rows, ts, [1] * 6, rows[:1], None, 10) for m in (full, half, pooled))
        ids = [{x["item_id"] for x in r["items"]} for r in (a, b, c)]
        assert len(ids[0] & ids[1]) >= 8 and ids[1] == ids[2]
    text = full.channels.text[0].numpy()[None]
    for m in (half, pooled):
        assert m.upsert([{"item_id": "half-new", "title": "New", "categories": ["Cycling"]}], text) == 1
        assert m.channels.text.dtype == torch.float16 and len(m.channels.text) == full.size + 1
        assert m.text is m.channels.text  # no reference keeps the table from before the upsert alive
        np.testing.assert_allclose(m.channels.text[-1].float().numpy(), text[0], atol=1e-3)
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16"):
        RetrievalModel(loaded["dir"], "v1", precision="int4")
