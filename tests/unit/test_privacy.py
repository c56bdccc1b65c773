"""Forgetting a user (components/privacy.py, jobs.forget_user) on real stored data: dataset
versions, quarantined raw records and feedback shards lose the user; later versions built from
the same raw logs never see them again; the audit record carries only a digest. No Ray."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from components.data import privacy
from components.config import load_config
from components.data.datasets import load_training_data
from components.storage import Storage
from jobs import preprocess
from components.online.feedback_log import events_table, shard_path, table_bytes
from tests.conftest import ROOT


def _raw_logs(root):
    """u2 has good events, a bad-timestamp row and a row without ts (both quarantined)."""
    root.mkdir(parents=True)
    good = pa.table({"user_id": [f"u{k % 7}" for k in range(70)], "item_id": [f"i{k % 10}" for k in range(70)],
                     "ts": [1_600_000_000_000 + k for k in range(70)], "event": ["click"] * 70})
    pq.write_table(good, root / "a-good.parquet")
    (root / "b.csv").write_text("user_id,item_id,ts,event\nu2,i2,not-a-time,view\nu3,i3,also-bad,view\n")
    (root / "c.jsonl").write_text('{"user_id": "u2", "item_id": "i1"}\n')


def test_forget_removes_the_user_everywhere_and_from_later_versions(tmp_path):
    _raw_logs(tmp_path / "in")
    cfg = load_config([f"storage.root={tmp_path / 'store'}", "data.source=files", f"data.path={tmp_path / 'in'}",
                       "preprocess.kcore=2"])
    first = preprocess.run(cfg, engine="local")
    st = Storage(str(tmp_path / "store"))
    rows = [{"user_id": u, "item_id": "i1", "event": "click", "ts": 1_700_000_000_000} for u in ("u2", "u3", "u2")]
    st.write_bytes(shard_path(1_700_000_000_000), table_bytes(events_table(rows)))
    users_before = st.read_parquet(f"{first['prefix']}/vocab/users.parquet").num_rows
    data = load_training_data(st, first["prefix"], None).histories
    u2 = st.read_parquet(f"{first['prefix']}/vocab/users.parquet").to_pydict()["user_id"].index("u2")
    assert {"u2"} <= set(st.read_parquet(f"{first['prefix']}/train")["user_id"].to_pylist())
    assert privacy.mentions(st, "u2")  # dataset splits, vocabulary, quarantine, feedback

    record = privacy.forget_user(st, "u2")
    assert privacy.mentions(st, "u2") == []
    assert record["rows_removed"] >= 10 + 2 + 2 and {"datasets", "feedback"} <= set(record["areas"])
    assert "u2" not in json.dumps(record) and record["user_digest"] == privacy.user_digest("u2")
    # everyone else is untouched; the vocabulary keeps its row order (row = user index)
    assert st.read_parquet("feedback")["user_id"].to_pylist() == ["u3"]
    assert "u3" in set(st.read_parquet(f"{first['prefix']}/train")["user_id"].to_pylist())
    assert st.read_parquet(f"{first['prefix']}/vocab/users.parquet").num_rows == users_before
    after = load_training_data(st, first["prefix"], None).histories  # still loads, indices intact
    assert len(after.items[u2]) == 0 and u2 not in after.valid["user_idx"] and u2 not in after.test["user_idx"]
    for k in set(range(data.num_users)) - {u2}:
        assert (after.items[k] == data.items[k]).all()
    assert len(after.valid["user_idx"]) == len(data.valid["user_idx"]) - 1
    assert privacy.forget_user(st, "u2")["rows_removed"] == 0  # idempotent

    # The raw logs outside storage still hold u2: the next version drops their events and records.
    second = preprocess.run(cfg, engine="local")
    assert second["version"] != first["version"]
    s = second["stats"]
    assert s["forgotten_users"] == 1 and s["forgotten_events_dropped"] == 10 + 2
    assert s["valid_events"] + s["quarantined"] == s["raw_rows"]
    assert privacy.mentions(st, "u2", [second["prefix"]]) == []
    assert s["users"] == 6


def test_events_after_the_forget_are_a_new_start():
    t = pa.table({"user_id": ["a", "a", "b"], "ts": pa.array([1000, 3000, 1000], pa.timestamp("ms"))})
    kept, n = privacy.drop_forgotten(t, {privacy.user_digest("a"): 2000})
    assert n == 1 and kept["user_id"].to_pylist() == ["a", "b"]


def test_the_job_refuses_without_a_user_and_keyed_digests_differ(tmp_path):
    p = subprocess.run([sys.executable, "-m", "jobs.forget_user", f"storage.root={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "forget.user_id" in p.stderr
    p = subprocess.run([sys.executable, "-m", "jobs.forget_user", f"storage.root={tmp_path}", "forget.user_id=zz"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and json.loads(p.stdout)["rows_removed"] == 0, p.stderr
    assert privacy.user_digest("zz", {"LLMREC_PRIVACY_KEY": "k" * 32}) != privacy.user_digest("zz", {})


KEY = "k" * 24


def test_pseudonyms_are_keyed_stable_and_refuse_a_missing_or_short_key():
    p, q = privacy.Pseudonymizer(KEY), privacy.Pseudonymizer("another-key-0123456789")
    assert p("u1") == p("u1") != p("u2") and p("u1") != q("u1")
    assert privacy.PSEUDONYM.match(p("u1")) and p(p("u1")) == p("u1")  # a pseudonym passes through
    t = p.table(pa.table({"user_id": ["a", "b", "a", None], "x": [1, 2, 3, 4]}))
    assert t["user_id"].to_pylist() == [p("a"), p("b"), p("a"), None] and t["x"].to_pylist() == [1, 2, 3, 4]
    for env in ({}, {privacy.KEY_ENV: "short"}):
        try:
            privacy.Pseudonymizer.from_env(env)
            raise AssertionError("a missing or short key must be refused")
        except ValueError as exc:
            assert privacy.KEY_ENV in str(exc)


def test_a_pseudonymized_dataset_stores_no_user_id_and_forget_still_finds_the_user(tmp_path, monkeypatch):
    import asyncio

    from serve.app import EventStore

    monkeypatch.setenv(privacy.KEY_ENV, KEY)
    p = privacy.Pseudonymizer(KEY)
    _raw_logs(tmp_path / "in")
    args = [f"storage.root={tmp_path / 'store'}", "data.source=files", f"data.path={tmp_path / 'in'}",
            "preprocess.kcore=2"]
    plain = preprocess.run(load_config(args), engine="local")
    out = preprocess.run(load_config(args + ["preprocess.pseudonymize_users=true"]), engine="local")
    assert out["version"] != plain["version"] and out["stats"]["pseudonymized_users"]
    st = Storage(str(tmp_path / "store"))
    for table in ("train", "valid", "test", "sequences", "vocab/users.parquet"):
        ids = st.read_parquet(f"{out['prefix']}/{table}")["user_id"].to_pylist()
        assert ids and all(privacy.PSEUDONYM.match(u) for u in ids), table
    assert p("u2") in st.read_parquet(f"{out['prefix']}/train")["user_id"].to_pylist()
    assert set(st.read_parquet(f"{out['prefix']}/quarantine")["record"].to_pylist()) == {None}  # raw rows name users
    assert privacy.mentions(st, "u2", [out["prefix"]]) == []
    monkeypatch.setenv(privacy.KEY_ENV, "another-key-0123456789")  # a new key: a new dataset version
    assert preprocess.run(load_config(args + ["preprocess.pseudonymize_users=true"]), engine="local")["version"] \
        != out["version"]
    monkeypatch.setenv(privacy.KEY_ENV, KEY)

    # The live-state holder maps ids itself: feedback is stored under the pseudonym, looked up by the raw id.
    store_cls = getattr(EventStore, "func_or_class", EventStore)
    holder = store_cls({"storage_root": str(tmp_path / "store"), "pseudonymize_users": True})
    asyncio.run(holder.append([{"user_id": "u2", "item_id": "i9", "event": "click", "ts": 1_700_000_000_000}]))
    assert st.read_parquet("feedback")["user_id"].to_pylist() == [p("u2")]
    assert [h[0] for h in asyncio.run(holder.history("u2"))] == ["i9"]
    record = asyncio.run(holder.forget("u2"))
    assert record["rows_removed"] >= 10 + 1 and asyncio.run(holder.history("u2")) == []
    assert p("u2") not in st.read_parquet(f"{out['prefix']}/train")["user_id"].to_pylist()
    assert st.read_parquet("feedback").num_rows == 0 or p("u2") not in st.read_parquet("feedback")["user_id"].to_pylist()
