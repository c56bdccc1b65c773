"""The canary: stable assignment, attribution of feedback, per-version metrics and the decision rule."""

import json
import threading

import numpy as np
import pytest

from components.online.canary import (CanaryConfig, CanaryMonitor, RecommendationLog, assign, decide,
                                      newcombe_interval, wilson_interval, z_value)

T0 = 1_700_000_000_000  # epoch ms
MIN = 60_000
Z95 = z_value(0.95)


# -- assignment --------------------------------------------------------------------------------

@pytest.mark.parametrize("users", [1_000, 10_000])
@pytest.mark.parametrize("share", [0.05, 0.1, 0.5])
def test_candidate_share_is_within_two_points_of_the_setting(users, share):
    arms = [assign(f"user-{k}", share, salt="run-20240101") for k in range(users)]
    measured = arms.count("candidate") / users
    assert abs(measured - share) <= 0.02, measured


def test_the_share_varies_across_salts_as_a_fair_coin_would():
    # Not a lucky salt: over 40 canaries of 1,000 users the measured shares spread like a binomial.
    shares = np.array([sum(assign(f"u{k}", 0.5, f"salt-{s}") == "candidate" for k in range(1_000)) / 1_000
                       for s in range(40)])
    sd = (0.25 / 1_000) ** 0.5
    assert abs(shares.mean() - 0.5) < 3 * sd / 40 ** 0.5
    assert 0.6 * sd < shares.std() < 1.5 * sd
    assert (np.abs(shares - 0.5) <= 0.02).mean() >= 0.6  # ~79% expected: 2 points are 1.26 sd at 1,000


def test_assignment_is_stable_monotone_in_share_and_reshuffled_by_a_new_salt():
    ids = [f"user-{k}" for k in range(5_000)]
    first = [assign(u, 0.3, "a") for u in ids]
    assert first == [assign(u, 0.3, "a") for u in ids]  # the same user, the same arm, every time
    at_10 = {u for u in ids if assign(u, 0.1, "a") == "candidate"}
    at_30 = {u for u, arm in zip(ids, first) if arm == "candidate"}
    assert at_10 < at_30  # ramping the share up keeps who was already in
    other = {u for u in ids if assign(u, 0.3, "b") == "candidate"}
    overlap = len(at_30 & other) / len(at_30)
    assert 0.2 < overlap < 0.4  # independent draws: ~30% of one set is in the other


def test_anonymous_users_and_edge_shares():
    assert assign(None, 0.9, "s") == assign("", 0.9, "s") == "control"
    assert {assign(f"u{k}", 0.0, "s") for k in range(200)} == {"control"}
    assert {assign(f"u{k}", 1.0, "s") for k in range(200)} == {"candidate"}
    with pytest.raises(ValueError, match="share"):
        assign("u", 1.5, "s")
    with pytest.raises(ValueError, match="control"):
        CanaryMonitor("v1", "v1", 0.1)
    with pytest.raises(ValueError, match="canary.min_requests"):
        CanaryMonitor("v1", "v2", 0.1, CanaryConfig(min_requests=0))


# -- intervals ---------------------------------------------------------------------------------

def test_intervals_match_known_values():
    # Newcombe (1998), Stat. Med. 17:857, table II: 56/70 - 48/80 -> 0.0524 to 0.3339 (method 10).
    lo, hi = newcombe_interval(56, 70, 48, 80, Z95)
    assert lo == pytest.approx(0.0524, abs=5e-4) and hi == pytest.approx(0.3339, abs=5e-4)
    # Wilson 81/263 (the example in Brown, Cai & DasGupta's review): 0.2553 to 0.3662.
    lo, hi = wilson_interval(81, 263, Z95)
    assert lo == pytest.approx(0.2553, abs=5e-4) and hi == pytest.approx(0.3662, abs=5e-4)
    assert wilson_interval(0, 0, Z95) == (0.0, 1.0)


# -- attribution -------------------------------------------------------------------------------

def _monitor(**kw):
    return CanaryMonitor("v1", "v2", share=0.5, cfg=CanaryConfig(**kw), clock=lambda: T0 / 1000)


def test_feedback_goes_to_the_version_of_the_latest_list_that_showed_the_item():
    m = _monitor(attribution_window_s=600)
    m.record_request("v1", "u", ["a", "b"], ts_ms=T0)
    m.record_request("v2", "u", ["b", "c"], ts_ms=T0 + MIN)
    assert m.record_feedback("u", "b", ts_ms=T0 + 2 * MIN) == "v2"  # the latest list with b
    assert m.record_feedback("u", "a", ts_ms=T0 + 2 * MIN) == "v1"
    assert m.record_feedback("u", "d", ts_ms=T0 + 2 * MIN) is None  # never recommended
    assert m.record_feedback("w", "a", ts_ms=T0 + 2 * MIN) is None  # recommended to someone else
    assert m.record_feedback("u", "a", ts_ms=T0 + 11 * MIN) is None  # past the 10-minute window
    assert m.record_feedback("u", "c", ts_ms=T0 - MIN) is None  # before the list existed
    assert m.record_feedback("u", "c", "skip", ts_ms=T0 + 2 * MIN) is None  # not acting on it
    assert m.record_feedback(None, "c", ts_ms=T0 + 2 * MIN) is None
    assert m.record_feedback("u", "c", "purchase", ts_ms=T0 + 2 * MIN) == "v2"
    assert m.record_feedback("u", "c", "click", ts_ms=T0 + 3 * MIN) == "v2"
    met = m.metrics()
    # c acted on twice: two events, one acted-on recommendation; b once.
    assert (met.candidate.events, met.candidate.acted_on, met.candidate.recommendations) == (3, 2, 2)
    assert (met.control.events, met.control.acted_on, met.control.recommendations) == (1, 1, 2)
    assert met.unattributed_events == 4
    assert met.candidate.events_per_user == 3.0 and met.candidate.users_served == 1


def test_anonymous_lists_and_errors_count_as_requests_only():
    m = _monitor()
    m.record_request("v1", None, ["a", "b"], latency_ms=3.0)
    m.record_request("v1", "u", latency_ms=9.0, error=True)
    m.record_request("v-old", "u", ["a"])
    c = m.metrics().control
    assert (c.requests, c.errors, c.recommendations, c.users_served) == (2, 1, 0, 0)
    assert c.error_rate == 0.5 and c.latency_p50_ms == pytest.approx(6.0)
    assert m.other_version_requests == 1
    json.dumps(m.metrics().to_dict())  # what GET /v1/version shows


def test_memory_bounds_hold():
    log = RecommendationLog(window_ms=10 * MIN, lists_per_user=3, users_max=50)
    for k in range(10):  # one user, ten lists: the oldest seven are gone
        log.add("u", "v1", [f"i{k}"], T0 + k)
    assert log.lists_held() == 3
    assert log.attribute("u", "i0", T0 + 20) is None and log.attribute("u", "i9", T0 + 20) == ("v1", True)
    for k in range(200):  # 200 users: the least recently served out first
        log.add(f"w{k}", "v1", ["x"], T0 + 100 + k)
    assert len(log) == 50 and log.evicted_users == 151
    assert log.attribute("w149", "x", T0 + 400) is None and log.attribute("w199", "x", T0 + 400) is not None
    log.add("late", "v1", ["x"], T0 + 11 * MIN)  # time moves past everyone else's window
    assert len(log) == 1

    m = _monitor(latency_samples=64, users_sample_max=1_000, lists_per_user=2, attribution_users_max=500)
    for k in range(20_000):
        m.record_request("v1", f"user-{k}", ["a", "b"], latency_ms=float(k), ts_ms=T0 + k)
    users, lists = m.attribution_held()
    assert users == 500 and lists == 500
    c = m.metrics().control
    assert c.latency_p50_ms > 19_900  # the most recent 64 samples only
    assert c.user_sample_rate < 1 and 500 <= c.users_sampled <= 1_000
    assert c.users_served == pytest.approx(20_000, rel=0.15)  # estimated from the hash sample


def test_concurrent_recording_loses_nothing():
    m = _monitor()

    def work(w):
        for k in range(500):
            user = f"t{w}-{k}"
            m.record_request("v1", user, ["a"], latency_ms=1.0, ts_ms=T0)
            m.record_feedback(user, "a", ts_ms=T0 + 1)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    c = m.metrics().control
    assert (c.requests, c.recommendations, c.acted_on, c.events, c.users_served) == (4000, 4000, 4000, 4000, 4000)


# -- the decision rule -------------------------------------------------------------------------

RULE = dict(min_requests=300, min_recommendations=3_000, noninferiority_recommendations=20_000,
            noninferiority_margin=0.15)


def _simulate(m, act, requests, errors=None, latency=None, seed=0, users=3_000, k=10):
    """``requests`` recommends by users drawn from a pool, each list's items acted on with the
    arm's probability ``act[arm]``; returns the decision after them."""
    rng = np.random.default_rng(seed)
    errors, latency = errors or {}, latency or {}
    for r in range(requests):
        user = f"u{rng.integers(users)}"
        version = m.version_for(user)
        arm = "candidate" if version == m.candidate else "control"
        ts = T0 + r * 50
        lat = latency.get(arm, 20.0) * rng.uniform(0.5, 1.5)
        if rng.random() < errors.get(arm, 0.0):
            m.record_request(version, user, latency_ms=lat, error=True, ts_ms=ts)
            continue
        items = [f"i{r}-{j}" for j in range(k)]
        m.record_request(version, user, items, latency_ms=lat, ts_ms=ts)
        for item in np.array(items)[rng.random(k) < act[arm]]:
            m.record_feedback(user, str(item), ts_ms=ts + 30_000)
    return m.decide()


def test_a_worse_candidate_is_rolled_back():
    m = CanaryMonitor("v1", "v2", 0.1, CanaryConfig(**RULE))
    d = _simulate(m, {"control": 0.10, "candidate": 0.05}, 8_000)
    assert d.action == "rollback" and d.reason.startswith("worse"), d.reason
    assert d.figures["acted_share_diff_ci"][1] < 0
    json.dumps(d.to_dict())  # logged with its figures


def test_a_better_candidate_is_promoted():
    m = CanaryMonitor("v1", "v2", 0.1, CanaryConfig(**RULE))
    d = _simulate(m, {"control": 0.10, "candidate": 0.15}, 8_000)
    assert d.action == "promote" and d.reason.startswith("better"), d.reason
    assert d.figures["acted_share_diff_ci"][0] > 0


def test_an_equal_candidate_is_promoted_only_after_the_minimum_sample():
    cfg = CanaryConfig(**RULE)
    m = CanaryMonitor("v1", "v2", 0.5, cfg)
    early = _simulate(m, {"control": 0.10, "candidate": 0.10}, 2_000, seed=1)
    assert early.action == "continue", early.reason  # ~10k candidate recommendations: not yet
    m = CanaryMonitor("v1", "v2", 0.5, cfg)
    late = _simulate(m, {"control": 0.10, "candidate": 0.10}, 6_000, seed=1)
    assert late.action == "promote" and late.reason.startswith("not worse"), late.reason
    lo, hi = late.figures["acted_share_diff_ci"]
    assert lo < 0 < hi and lo > -late.figures["noninferiority_margin_abs"]


def test_a_candidate_whose_errors_rise_is_rolled_back():
    m = CanaryMonitor("v1", "v2", 0.1, CanaryConfig(**RULE))
    d = _simulate(m, {"control": 0.10, "candidate": 0.15}, 8_000, errors={"candidate": 0.05})
    assert d.action == "rollback" and d.reason.startswith("error rate"), d.reason
    # Below the minimum number of candidate requests the same error rate is not judged yet.
    m = CanaryMonitor("v1", "v2", 0.1, CanaryConfig(**RULE))
    assert _simulate(m, {"control": 0.1, "candidate": 0.1}, 1_000, errors={"candidate": 0.05}).action == "continue"


def test_a_slow_candidate_is_rolled_back():
    m = CanaryMonitor("v1", "v2", 0.5, CanaryConfig(**RULE))
    d = _simulate(m, {"control": 0.10, "candidate": 0.10}, 1_500, latency={"candidate": 80.0})
    assert d.action == "rollback" and d.reason.startswith("p99 latency"), d.reason


def test_decide_is_pure_over_a_snapshot():
    m = CanaryMonitor("v1", "v2", 0.1, CanaryConfig(**RULE))
    _simulate(m, {"control": 0.10, "candidate": 0.05}, 8_000)
    snap = m.metrics()
    assert decide(snap, m.cfg) == decide(snap, m.cfg)
    assert decide(snap, CanaryConfig(**{**RULE, "min_recommendations": 10**9})).action == "continue"


# -- the judge in serving (serve/rollout.py), on local storage, without Ray ----------------------

def _published(storage, run_id):
    from components import layout

    storage.write_json(layout.join(layout.bundle(run_id), layout.MANIFEST), {"retriever/x": "0"})


def _arm_traffic(canary, control_acts, candidate_acts, users=200, now=1_800_000_000_000):
    """Lists of 5 items to ``users`` users split between the arms; a user acts on its list's first
    item when its arm's flag says so."""
    served, acted = [], []
    for k in range(users):
        version = canary["run_id"] if k % 2 else canary["control"]
        user = f"{canary['run_id']}-u{k}"
        served.append({"canary": canary["run_id"], "version": version, "user_id": user,
                       "items": [f"i{j}" for j in range(5)], "latency_ms": 5.0, "error": False, "ts_ms": now})
        if (candidate_acts if k % 2 else control_acts):
            acted.append({"canary": canary["run_id"], "user_id": user, "item_id": "i0", "event": "click",
                          "ts_ms": now + 1})
    return served, acted


def test_the_judge_rolls_back_a_worse_candidate_promotes_a_better_one_and_logs_each_decision(tmp_path):
    """Issue 25 item 1 in serving: the judge keeps the metrics the ingress replicas send it and
    applies the rule: a candidate whose lists nobody acts on is rolled back (the canary file is
    removed, the promoted version stays), a better one is promoted through the registry pointer,
    and every start and decision is logged with its figures."""
    import asyncio

    from components import layout, registry
    from components.storage import Storage
    from serve.rollout import CanaryJudge

    st = Storage(str(tmp_path))
    for rid in ("a", "b", "c"):
        _published(st, rid)
    registry.promote(st, layout.MODEL, "a", layout.bundle("a"), {}, {"retriever/x": "0"})
    judge = CanaryJudge.func_or_class({"storage_root": str(tmp_path), "canary": {
        "min_requests": 50, "min_recommendations": 200, "latency_p99_ratio_max": 0}})
    assert asyncio.run(judge.status()) is None
    assert asyncio.run(judge.start("nope", 0.1))["status"] == 404
    assert asyncio.run(judge.start("a", 0.1))["status"] == 409  # the promoted version itself
    canary = asyncio.run(judge.start("b", 0.5))["canary"]
    assert canary["control"] == "a" and canary["share"] == 0.5 and registry.read_canary(st)["run_id"] == "b"
    assert "running" in asyncio.run(judge.start("c", 0.5))["error"]  # one canary at a time

    asyncio.run(judge.record(*_arm_traffic(canary, control_acts=True, candidate_acts=False, users=20)))
    assert asyncio.run(judge.judge())["action"] == "continue"  # 10 candidate requests of the 50 needed
    asyncio.run(judge.record(*_arm_traffic(canary, control_acts=True, candidate_acts=False)))
    status = asyncio.run(judge.status())
    assert status["running"] and status["metrics"]["candidate"]["requests"] == 110
    assert status["metrics"]["control"]["acted_on"] == 110 and status["metrics"]["candidate"]["acted_on"] == 0
    d = asyncio.run(judge.judge())
    assert d["action"] == "rollback" and "worse" in d["reason"]
    assert registry.read_canary(st) is None and registry.read_pointer(st)["run_id"] == "a"

    canary = asyncio.run(judge.start("c", 0.5))["canary"]
    asyncio.run(judge.record(*_arm_traffic(canary, control_acts=False, candidate_acts=True)))
    d = asyncio.run(judge.judge())
    assert d["action"] == "promote" and "better" in d["reason"]
    assert registry.read_pointer(st)["run_id"] == "c" and registry.read_canary(st) is None
    log = [st.read_json(f) for f in st.list_files(layout.canary_log(layout.MODEL))]
    assert [(r["action"], r.get("candidate")) for r in log] == [
        ("start", "b"), ("rollback", "b"), ("start", "c"), ("promote", "c")]
    assert log[1]["figures"]["candidate"]["acted_share"] == 0.0 and log[3]["figures"]["acted_share_diff_ci"][0] > 0

    # an operator's end: rolled back with its figures; a record for an ended canary is ignored
    _published(st, "d")
    canary = asyncio.run(judge.start("d", 0.2))["canary"]
    assert canary["control"] == "c"
    out = asyncio.run(judge.end("by hand"))
    assert out["ended"] == "d" and out["metrics"]["candidate"]["requests"] == 0
    asyncio.run(judge.record(*_arm_traffic(canary, True, True, users=4)))
    assert asyncio.run(judge.end("again")) is None and registry.read_pointer(st)["run_id"] == "c"


def test_a_canary_that_lost_its_control_to_a_retrain_is_abandoned_not_promoted(tmp_path):
    import asyncio

    from components import layout, registry
    from components.storage import Storage
    from serve.rollout import CanaryJudge

    st = Storage(str(tmp_path))
    for rid in ("a", "b", "r"):
        _published(st, rid)
    registry.promote(st, layout.MODEL, "a", layout.bundle("a"), {}, {})
    judge = CanaryJudge.func_or_class({"storage_root": str(tmp_path), "canary": {
        "min_requests": 50, "min_recommendations": 200, "latency_p99_ratio_max": 0}})
    canary = asyncio.run(judge.start("b", 0.5))["canary"]
    asyncio.run(judge.record(*_arm_traffic(canary, control_acts=False, candidate_acts=True)))
    registry.promote(st, layout.MODEL, "r", layout.bundle("r"), {}, {})  # a retrain promoted meanwhile
    d = asyncio.run(judge.judge())
    assert d["action"] == "abandon" and "now 'r'" in d["reason"] and registry.read_pointer(st)["run_id"] == "r"
    assert registry.read_canary(st) is None
    log = [st.read_json(f) for f in st.list_files(layout.canary_log(layout.MODEL))]
    assert [x["action"] for x in log] == ["start", "abandon"]
    # end_canary and promote_canary act only on the canary they were given
    _published(st, "e")
    canary = registry.start_canary(st, "e", 0.1)
    assert registry.end_canary(st, layout.MODEL, "other") is None and registry.read_canary(st)["run_id"] == "e"
    with pytest.raises(registry.PromotionConflict, match="ended meanwhile"):
        registry.promote_canary(st, {**canary, "run_id": "b"})
    assert registry.read_pointer(st)["run_id"] == "r"


def test_a_canary_carries_its_own_rule_over_the_apps_thresholds(tmp_path):
    """A canary's ``rule`` (retrain.canary_rule, POST /v1/admin/canary's "rule") replaces the
    serving app's thresholds for that canary only: the same traffic that the app's rule leaves
    undecided promotes under a rule asking for a smaller sample; the next canary, started without
    one, is judged by the app's rule again. A bad field or value is refused before anything is written."""
    import asyncio

    from components import layout, registry
    from components.online.canary import CanaryConfig, CanaryRule, with_rule
    from components.storage import Storage
    from serve.rollout import CanaryJudge

    st = Storage(str(tmp_path))
    for rid in ("a", "b", "c"):
        _published(st, rid)
    registry.promote(st, layout.MODEL, "a", layout.bundle("a"), {}, {})
    app = {"min_requests": 50, "min_recommendations": 5000, "latency_p99_ratio_max": 0}
    judge = CanaryJudge.func_or_class({"storage_root": str(tmp_path), "canary": app})

    assert asyncio.run(judge.start("b", 0.5, {"min_recommendations": 0}))["status"] == 422
    assert asyncio.run(judge.start("b", 0.5, {"min_recomendations": 200}))["status"] == 422  # a typo
    assert registry.read_canary(st) is None
    with pytest.raises(ValueError, match="unknown field"):
        registry.start_canary(st, "b", 0.5, rule={"patience": 3})
    assert registry.read_canary(st) is None

    canary = asyncio.run(judge.start("b", 0.5, {"min_recommendations": 200}))["canary"]
    assert canary["rule"] == {"min_recommendations": 200}
    assert asyncio.run(judge.status())["rule"] == {"min_recommendations": 200}
    asyncio.run(judge.record(*_arm_traffic(canary, control_acts=False, candidate_acts=True)))
    d = asyncio.run(judge.judge())  # 500 recommendations per arm: enough for this canary's rule
    assert d["action"] == "promote" and d["figures"]["thresholds"]["min_recommendations"] == 200
    assert d["figures"]["thresholds"]["min_requests"] == 50  # not in the rule: the app's
    log = [st.read_json(f) for f in st.list_files(layout.canary_log(layout.MODEL))]
    assert log[0]["action"] == "start" and log[0]["rule"] == {"min_recommendations": 200}

    canary = asyncio.run(judge.start("c", 0.5))["canary"]  # no rule: the app's 5000
    asyncio.run(judge.record(*_arm_traffic(canary, control_acts=False, candidate_acts=True)))
    d = asyncio.run(judge.judge())
    assert d["action"] == "continue" and "of 5000 recommendations" in d["reason"]

    assert with_rule(CanaryConfig(), CanaryRule(noninferiority_margin=0.1)).noninferiority_margin == 0.1
    assert with_rule(CanaryConfig(), None) == CanaryConfig()


def test_the_demo_reads_the_judges_decision_of_its_own_canary_only(tmp_path):
    """serve/demo.py waits for the judge's record of the canary it started: a start alone, or a
    decision about an earlier canary, is not its decision."""
    import time

    from components import registry
    from components.storage import Storage
    from serve.demo import _decision

    st = Storage(str(tmp_path))
    assert _decision(st, "r2") is None  # no log yet

    def log(record):  # records are named by their millisecond: one a millisecond, in order
        time.sleep(0.002)
        registry.log_canary(st, record)

    log({"action": "start", "candidate": "r1"})
    log({"action": "rollback", "candidate": "r1", "figures": {}})
    log({"action": "start", "candidate": "r2"})
    assert _decision(st, "r2") is None and _decision(st, "r1")["action"] == "rollback"
    log({"action": "promote", "candidate": "r2", "figures": {"share": 0.5}})
    assert _decision(st, "r2")["action"] == "promote"
