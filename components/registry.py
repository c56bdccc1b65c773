"""The model registry: ``registry/<model>/latest.json`` and the promotion decision.

The pointer names the promoted bundle (run id, prefix, sha256 of every file, metrics, lineage) and
is replaced atomically, by compare-and-swap when a decision was based on what it said. Whether a
run is promoted is ``decide_promotion``: a pure function of the run's evaluation and the pointer.
"""

from __future__ import annotations

import json
import time
from typing import Any, Dict, Optional, Tuple

from components import layout
from components.online.canary import CanaryConfig, rule_overrides, with_rule
from components.storage import PreconditionFailed, Storage

# The valid lists the ranker did not train on (it trains on the others).
HOLDOUT = "valid_ranker_holdout"


class PromotionConflict(RuntimeError):
    """Another run moved the registry pointer after this one read it; nothing was written."""


def read_pointer(storage: Storage, model: str = layout.MODEL) -> Optional[Dict[str, Any]]:
    rel = layout.pointer(model)
    return storage.read_json(rel) if storage.is_file(rel) else None


def read_pointer_versioned(storage: Storage, model: str = layout.MODEL) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """(pointer or None, token): pass the token to ``promote(expected=...)``."""
    data, token = storage.read_versioned(layout.pointer(model))
    return (json.loads(data) if data is not None else None), token


_UNSET = object()


def promote(storage: Storage, model: str, run_id: str, prefix: str, metrics: Dict[str, Any],
            manifest: Dict[str, str], lineage: Optional[Dict[str, Any]] = None, expected: Any = _UNSET) -> Dict[str, Any]:
    """Point ``registry/<model>/latest.json`` at a published bundle, atomically.

    ``expected``: the token from ``read_pointer_versioned`` the caller's decision was based on
    (None: there was no pointer). The write is then a compare-and-swap: if another run promoted
    in between, ``PromotionConflict`` is raised and the pointer is left as the other run set it,
    so two racing retrains can neither corrupt nor roll back the pointer. Without ``expected``
    the write is unconditional (an operator's manual promotion).
    """
    pointer = {"model": model, "run_id": run_id, "uri": storage.uri(prefix), "prefix": prefix,
               "sha256": manifest, "metrics": metrics, "lineage": lineage or {},
               "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    data = json.dumps(pointer, indent=2, sort_keys=True, default=str).encode()
    if expected is _UNSET:
        storage.write_bytes_atomic(layout.pointer(model), data)
        return pointer
    try:
        storage.compare_and_swap(layout.pointer(model), data, expected)
    except PreconditionFailed as exc:
        raise PromotionConflict(f"not promoting {run_id}: {exc}") from None
    return pointer


def selection_split(model: Dict[str, Any]) -> str:
    """Where a model is judged: the valid lists its ranker did not train on when it has a ranker
    (the ranker trains on the others, so the full valid figure is in-sample for it), else valid."""
    return HOLDOUT if HOLDOUT in model else "valid"


def decide_promotion(res: Dict[str, Any], current: Optional[Dict[str, Any]], floor: float,
                     tolerance: float) -> Dict[str, Any]:
    """Whether the evaluated run ``res`` (jobs.evaluate's results) should replace ``current``
    (the registry pointer, or None).

    A run is promoted when its NDCG@10 on the selection split clears ``floor``, is not below
    MostPopular and ItemKNN on the same lists, and is not worse than the promoted model's by more
    than ``tolerance``. Test is reported, never decided on, so the promoted model's test figure
    stays an unbiased estimate. The promoted model's stored figure is compared only when it was
    measured on the same dataset version and the same kind of split (otherwise it is ignored,
    with a note). Returns the decision: ``promoted``, ``reason`` and every figure it read.
    """
    main = res["models"][res["main_model"]]
    split = selection_split(main)
    test = main["test"]["ndcg@10"]
    score = main.get(split, {}).get("ndcg@10")
    same_split = (current or {}).get("lineage", {}).get("dataset_version") == res.get("dataset_version")
    cur_metrics = (current or {}).get("metrics", {})
    cur = cur_metrics.get("selection_ndcg@10") if same_split and cur_metrics.get("selection_split") == split else None
    bars = {b: res["models"][b][split]["ndcg@10"] for b in ("MostPopular", "ItemKNN")
            if split in res["models"].get(b, {})}
    decision = {"decided_on": split, "selection_ndcg@10": score, "valid_ndcg@10": main.get("valid", {}).get("ndcg@10"),
                "test_ndcg@10": test, "floor": floor, "current_selection_ndcg@10": cur,
                "current_test_ndcg@10": cur_metrics.get("test_ndcg@10") if same_split else None,
                "tolerance": tolerance, "baselines_selection_ndcg@10": bars}
    if current is not None and not same_split:
        decision["note"] = "the promoted model was measured on another dataset version: not compared"
    elif current is not None and cur is None:
        decision["note"] = f"the promoted model has no {split} NDCG@10 on this split: not compared"
    if score is None:
        decision.update(promoted=False, reason=f"no {split} NDCG@10 to decide on")
    elif score < floor:
        decision.update(promoted=False, reason=f"{split} NDCG@10 {score:.4f} below the floor {floor}")
    elif any(score < v for v in bars.values()):
        decision.update(promoted=False, reason=f"{split} NDCG@10 {score:.4f} below " +
                        ", ".join(f"{b} {v:.4f}" for b, v in bars.items() if score < v))
    elif cur is not None and score < cur - tolerance:
        decision.update(promoted=False, reason=f"{split} NDCG@10 {score:.4f} worse than the promoted {cur:.4f} "
                                               f"by more than {tolerance}")
    else:
        decision.update(promoted=True, reason=f"cleared the gate (decided on {split})")
    return decision


def pointer_metrics(model: Dict[str, Any]) -> Dict[str, Any]:
    """What the pointer records of a model's evaluation (one model's ``{split: metrics}``)."""
    split = selection_split(model)
    return {"test_ndcg@10": model["test"]["ndcg@10"], "test_recall@10": model["test"]["recall@10"],
            "valid_ndcg@10": model.get("valid", {}).get("ndcg@10"), "selection_split": split,
            "selection_ndcg@10": model.get(split, {}).get("ndcg@10")}


def gate_and_promote(storage: Storage, res: Dict[str, Any], trained: Dict[str, Any], floor: float,
                     tolerance: float, expected: Any = None, canary_share: Optional[float] = None,
                     canary_rule: Any = None) -> Dict[str, Any]:
    """``decide_promotion`` against the pointer, then a compare-and-swap promotion if it says so.

    ``trained``: the bundle (run_id, prefix, manifest, lineage). ``expected``: (pointer, token)
    the run started from (retraining: its metrics are the parent's on the new split); a run then
    never replaces a pointer that moved while it trained. Default: the pointer read here.
    ``canary_share``: instead of promoting, start a canary of that share against the promoted
    model (``start_canary``; the serving judge decides); ``promoted`` is then False and
    ``canary`` True, or neither when a canary runs already or the pointer moved; ``canary_rule``:
    its own thresholds (``start_canary``)."""
    current, token = expected if expected is not None else read_pointer_versioned(storage)
    decision = decide_promotion(res, current, floor, tolerance)
    if not decision["promoted"]:
        return decision
    if canary_share is not None and current is not None:
        decision["promoted"] = False
        if read_canary(storage) is not None:
            decision.update(canary=False, reason=decision["reason"] + "; passed the gate, but a canary is running: "
                                                                      "not started")
        elif read_pointer(storage) is None or read_pointer(storage)["run_id"] != current["run_id"]:
            decision.update(canary=False, reason=decision["reason"] + "; another run promoted meanwhile: no canary")
        else:
            start_canary(storage, trained["run_id"], canary_share, rule=canary_rule)
            decision.update(canary=True, reason=decision["reason"] + f"; canary started for {canary_share:.0%} "
                                                                     "of users (the serving judge decides)")
        return decision
    try:
        promote(storage, layout.MODEL, trained["run_id"], trained["prefix"],
                pointer_metrics(res["models"][res["main_model"]]), trained["manifest"],
                {k: v for k, v in trained["lineage"].items() if k != "config"}, expected=token)
    except PromotionConflict as exc:
        decision.update(promoted=False, reason=f"another run promoted meanwhile ({exc}); gate not re-run")
    return decision


# -- canary (serve/rollout.py runs it) ---------------------------------------------------------
def bundle_record(storage: Storage, run_id: str, model: str = layout.MODEL) -> Dict[str, Any]:
    """What a pointer needs of a published bundle (prefix, manifest, metrics, lineage), read from
    its files; raises ``LookupError`` naming the path when there is no such bundle."""
    prefix = layout.bundle(run_id, model)
    rel = layout.join(prefix, layout.MANIFEST)
    if not storage.is_file(rel):
        raise LookupError(f"run_id: no published bundle {run_id!r} (no {storage.uri(rel)})")
    out: Dict[str, Any] = {"run_id": run_id, "prefix": prefix, "manifest": storage.read_json(rel)}
    for key, name in (("metrics", "metrics.json"), ("lineage", layout.LINEAGE)):
        path = layout.join(prefix, name)
        out[key] = storage.read_json(path) if storage.is_file(path) else {}
    out["lineage"] = {k: v for k, v in out["lineage"].items() if k != "config"}
    return out


def read_canary(storage: Storage, model: str = layout.MODEL) -> Optional[Dict[str, Any]]:
    rel = layout.canary_pointer(model)
    return storage.read_json(rel) if storage.is_file(rel) else None


def start_canary(storage: Storage, run_id: str, share: float, model: str = layout.MODEL,
                 rule: Any = None) -> Dict[str, Any]:
    """Write ``registry/<model>/canary.json``: ``run_id`` serves ``share`` of the users (picked by
    a hash salted with the run id) beside the promoted version, the control. Every serving replica
    loads it from there, verified against its manifest like a promotion. ``rule``: this canary's
    own decision thresholds (``CanaryRule`` fields; the rest are the serving application's).
    Raises ``ValueError`` / ``LookupError`` (a bad rule field, no promoted model, the candidate is
    the promoted one, no such bundle)."""
    rule = rule_overrides(rule)
    with_rule(CanaryConfig(), rule)  # refuse a bad value before anything is written
    current = read_pointer(storage, model)
    if current is None:
        raise LookupError("no promoted model: a canary needs a control to compare with")
    if current["run_id"] == run_id:
        raise ValueError(f"run_id: {run_id!r} is the promoted version already")
    rec = bundle_record(storage, run_id, model)
    canary = {"model": model, "run_id": run_id, "uri": storage.uri(rec["prefix"]), "prefix": rec["prefix"],
              "sha256": rec["manifest"], "metrics": rec["metrics"], "lineage": rec["lineage"],
              "share": float(share), "salt": run_id, "control": current["run_id"], "rule": rule,
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_json_atomic(layout.canary_pointer(model), canary)
    log_canary(storage, {"action": "start", "candidate": run_id, "control": current["run_id"], "share": share,
                         "rule": rule}, model)
    return canary


def end_canary(storage: Storage, model: str = layout.MODEL, run_id: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Remove the canary pointer (every replica drops the candidate on its next poll); returns it.
    ``run_id``: only if the running canary is that run's (None otherwise: nothing removed)."""
    canary = read_canary(storage, model)
    if canary is None or (run_id is not None and canary["run_id"] != run_id):
        return None
    storage.delete(layout.canary_pointer(model))
    return canary


def promote_canary(storage: Storage, canary: Dict[str, Any], model: str = layout.MODEL) -> Dict[str, Any]:
    """Promote the canary's candidate for everyone, then end the canary. A compare-and-swap on the
    pointer: if it no longer names the canary's control (a retrain promoted meanwhile), nothing is
    promoted (``PromotionConflict``) and the canary is left for the caller to end."""
    running = read_canary(storage, model)
    if running is None or running["run_id"] != canary["run_id"]:
        raise PromotionConflict(f"the canary of {canary['run_id']!r} was ended meanwhile")
    current, token = read_pointer_versioned(storage, model)
    if current is None or current["run_id"] != canary["control"]:
        raise PromotionConflict(f"the promoted version is {current and current['run_id']!r}, not the canary's "
                                f"control {canary['control']!r}")
    pointer = promote(storage, model, canary["run_id"], canary["prefix"], canary.get("metrics") or {},
                      canary["sha256"], canary.get("lineage") or {}, expected=token)
    end_canary(storage, model, canary["run_id"])
    return pointer


def log_canary(storage: Storage, record: Dict[str, Any], model: str = layout.MODEL) -> str:
    """Append one decision record (``layout.canary_log``); returns its path."""
    ms = int(time.time() * 1000)
    rel = layout.join(layout.canary_log(model), f"{ms:013d}-{record.get('action', 'note')}.json")
    storage.write_json_atomic(rel, {"at_ms": ms, **record})
    return rel
