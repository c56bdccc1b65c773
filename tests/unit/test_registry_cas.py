"""Compare-and-swap on registry/<model>/latest.json: racing promotions cannot corrupt or roll back
the pointer (local storage here; the S3 path runs against the S3 server in tests/integration)."""

import json
import multiprocessing as mp

import pytest

from components import registry
from components.storage import PreconditionFailed, Storage


def _race(root, k, barrier, out):
    storage = Storage(root)
    _, token = registry.read_pointer_versioned(storage, "m")
    barrier.wait()  # everyone has read the same pointer before anyone writes
    try:
        registry.promote(storage, "m", f"run-{k}", f"checkpoints/m/run-{k}", {"k": k}, {}, expected=token)
        out.put(("won", k))
    except registry.PromotionConflict:
        out.put(("lost", k))


def test_racing_promotions_have_exactly_one_winner_and_a_whole_pointer(tmp_path):
    root = str(tmp_path)
    registry.promote(Storage(root), "m", "run-base", "checkpoints/m/run-base", {}, {})
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(root, k, barrier, out)) for k in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = [out.get(timeout=5) for _ in procs]
    winners = [k for r, k in results if r == "won"]
    assert len(winners) == 1
    pointer = json.loads((tmp_path / "registry/m/latest.json").read_text())
    assert pointer["run_id"] == f"run-{winners[0]}"


def test_a_stale_promotion_is_refused_and_changes_nothing(tmp_path):
    storage = Storage(str(tmp_path))
    pointer, token = registry.read_pointer_versioned(storage, "m")
    assert pointer is None and token is None
    registry.promote(storage, "m", "a", "checkpoints/m/a", {}, {}, expected=None)
    with pytest.raises(registry.PromotionConflict):  # "there was no pointer" is stale now
        registry.promote(storage, "m", "b", "checkpoints/m/b", {}, {}, expected=None)
    _, token_a = registry.read_pointer_versioned(storage, "m")
    registry.promote(storage, "m", "c", "checkpoints/m/c", {}, {}, expected=token_a)
    with pytest.raises(registry.PromotionConflict):  # a late run holding a's token cannot roll back to its view
        registry.promote(storage, "m", "d", "checkpoints/m/d", {}, {}, expected=token_a)
    assert registry.read_pointer(storage, "m")["run_id"] == "c"
    with pytest.raises(PreconditionFailed):
        storage.compare_and_swap("registry/m/latest.json", b"{}", "not-a-token")


def test_a_retrain_with_rollout_canary_starts_a_canary_instead_of_swapping(tmp_path):
    """retrain.rollout=canary: a model that passes the gate is served to a share of users beside
    the promoted one (the serving judge decides); the pointer does not move, and a second run
    does not start a canary over a running one."""
    from components import layout, registry
    from components.config import ConfigError, load_config
    from components.storage import Storage

    st = Storage(str(tmp_path))
    for rid in ("parent", "child", "child2"):
        st.write_json(layout.join(layout.bundle(rid), layout.MANIFEST), {"f": "0"})
    registry.promote(st, layout.MODEL, "parent", layout.bundle("parent"), {"selection_split": "valid",
                                                                          "selection_ndcg@10": 0.1}, {"f": "0"})
    res = {"main_model": "m", "models": {"m": {"valid": {"ndcg@10": 0.2}, "test": {"ndcg@10": 0.2, "recall@10": 0.3}}}}

    def trained(rid):
        return {"run_id": rid, "prefix": layout.bundle(rid), "manifest": {"f": "0"}, "lineage": {}}

    d = registry.gate_and_promote(st, res, trained("child"), 0.0, 0.0, canary_share=0.2)
    assert not d["promoted"] and d["canary"] and "canary started for 20%" in d["reason"]
    assert registry.read_pointer(st)["run_id"] == "parent"
    assert registry.read_canary(st)["run_id"] == "child" and registry.read_canary(st)["share"] == 0.2
    d = registry.gate_and_promote(st, res, trained("child2"), 0.0, 0.0, canary_share=0.2)
    assert not d["promoted"] and not d["canary"] and "a canary is running" in d["reason"]
    assert registry.read_canary(st)["run_id"] == "child"
    with pytest.raises(ConfigError, match="retrain.rollout must be swap or canary"):
        load_config(["retrain.rollout=gradual"])


def test_retrain_canary_rule_reaches_the_canary_file_and_bad_values_fail_the_config(tmp_path):
    from components import layout, registry
    from components.config import ConfigError, load_config
    from components.storage import Storage

    cfg = load_config(["retrain.rollout=canary", "retrain.canary_rule.min_recommendations=300"])
    st = Storage(str(tmp_path))
    for rid in ("parent", "child"):
        st.write_json(layout.join(layout.bundle(rid), layout.MANIFEST), {"f": "0"})
    registry.promote(st, layout.MODEL, "parent", layout.bundle("parent"), {"selection_split": "valid",
                                                                          "selection_ndcg@10": 0.1}, {"f": "0"})
    res = {"main_model": "m", "models": {"m": {"valid": {"ndcg@10": 0.2}, "test": {"ndcg@10": 0.2, "recall@10": 0.3}}}}
    trained = {"run_id": "child", "prefix": layout.bundle("child"), "manifest": {"f": "0"}, "lineage": {}}
    d = registry.gate_and_promote(st, res, trained, 0.0, 0.0, canary_share=0.2, canary_rule=cfg.retrain.canary_rule)
    assert d["canary"] and registry.read_canary(st)["rule"] == {"min_recommendations": 300}
    with pytest.raises(ConfigError, match="retrain.canary_rule: canary.min_recommendations must be > 0"):
        load_config(["retrain.canary_rule.min_recommendations=0"])
    with pytest.raises(ConfigError, match="canary_rule"):
        load_config(["retrain.canary_rule.patience=3"])
