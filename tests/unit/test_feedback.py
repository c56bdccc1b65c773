"""Group commit of feedback and the live per-user state."""

import asyncio

import pyarrow as pa
import pytest

from components.storage import Storage
from components.data.schemas import EVENT_SCHEMA
from components.online.feedback_log import GroupCommitLog, RecentIds, list_feedback_shards, read_feedback, shard_path, table_bytes
from components.online.live_state import SessionState


def _ev(user, item, ts, event="click"):
    return {"user_id": user, "item_id": item, "ts": ts, "event": event}


def test_concurrent_appends_share_shards_and_every_event_is_stored(tmp_path):
    storage = Storage(str(tmp_path))

    async def run():
        log = GroupCommitLog(storage, max_events=1000)
        paths = await asyncio.gather(*[log.append([_ev(f"u{k}", f"i{k}", 1_700_000_000_000 + k)]) for k in range(50)])
        return log, paths

    log, paths = asyncio.run(run())
    shards = list_feedback_shards(storage)
    assert set(paths) == set(shards)
    assert len(shards) < 50  # grouped: the first write goes alone, the rest queue behind it
    table = read_feedback(storage, shards)
    assert sorted(table["user_id"].to_pylist()) == sorted(f"u{k}" for k in range(50))
    assert log.events_written == 50 and all(s.startswith("feedback/dt=") for s in shards)


def test_max_events_bounds_a_shard_without_splitting_a_request(tmp_path):
    storage = Storage(str(tmp_path))

    async def run():
        log = GroupCommitLog(storage, max_events=4, linger_s=0.05)
        return await asyncio.gather(*[log.append([_ev("u", f"i{k}{j}", 1_700_000_000_000) for j in range(3)])
                                      for k in range(4)])

    paths = asyncio.run(run())
    assert len(set(paths)) == 4  # 3 + 3 > 4: every request in its own shard
    for p in set(paths):
        assert storage.read_parquet(p).num_rows == 3


def test_a_failed_write_acknowledges_nothing(tmp_path):
    storage = Storage(str(tmp_path))

    def broken(*_):
        raise OSError("disk full")

    storage.write_bytes_atomic = broken

    async def run():
        log = GroupCommitLog(storage)
        return await asyncio.gather(log.append([_ev("u", "i", 1_700_000_000_000)]),
                                    log.append([_ev("v", "j", 1_700_000_000_000)]), return_exceptions=True)

    results = asyncio.run(run())
    assert all(isinstance(r, RuntimeError) and "disk full" in str(r) for r in results)
    assert list_feedback_shards(Storage(str(tmp_path))) == []


def test_a_retried_event_id_counts_once_and_old_shards_without_ids_still_read(tmp_path):
    storage = Storage(str(tmp_path))
    # a shard from before event ids existed: the plain event schema
    old = pa.table({"user_id": ["o"], "item_id": ["x"], "ts": pa.array([1], pa.int64()).cast(EVENT_SCHEMA.field("ts").type),
                    "event": ["click"], "value": [None], "session_id": [None], "context": [None]}, schema=EVENT_SCHEMA)
    storage.write_bytes(shard_path(1_700_000_000_000), table_bytes(old))

    async def run():
        log = GroupCommitLog(storage)
        first = await log.append([{**_ev("u", "i1", 1_700_000_000_001), "event_id": "e1"},
                                  {**_ev("u", "i2", 1_700_000_000_002), "event_id": "e2"}, _ev("u", "i3", 1_700_000_000_003)])
        # the client did not get the 202 (a timeout) and retries the same batch: stored a second time
        await asyncio.sleep(0.002)
        again = await log.append([{**_ev("u", "i1", 1_700_000_000_001), "event_id": "e1"},
                                  {**_ev("u", "i2", 1_700_000_000_002), "event_id": "e2"}, _ev("u", "i3", 1_700_000_000_003)])
        return first, again

    first, again = asyncio.run(run())
    assert first != again and storage.read_parquet(again).column("event_id").to_pylist() == ["e1", "e2", None]
    table = read_feedback(storage, list_feedback_shards(storage))
    # e1 and e2 once; the id-less event twice (nothing says it is a retry); the old shard's event kept
    assert sorted(table["item_id"].to_pylist()) == ["i1", "i2", "i3", "i3", "x"]
    assert table.column_names == ["user_id", "item_id", "ts", "event"]


def test_recent_ids_remember_a_bounded_number():
    ids = RecentIds(cap=2)
    assert [ids.seen(x) for x in ("a", "b", "a", "c", "b", "a")] == [False, False, True, False, False, False]


def test_session_state_keeps_recent_events_in_time_order():
    s = SessionState(max_len=3)
    for k, ts in enumerate([10, 20, 30, 40]):
        s.add("u", f"i{k}", "click", ts)
    assert [e[0] for e in s.history("u")] == ["i1", "i2", "i3"]
    s.add("u", "late", "view", 25)  # arrives late: placed by time
    assert [e[0] for e in s.history("u")] == ["late", "i2", "i3"]  # i1 (ts 20) falls out
    assert s.history("nobody") == []


def test_session_state_bulk_load_sorts_per_user():
    s = SessionState(max_len=10)
    t = pa.table({"user_id": pa.array(["b", "a", "a"]).dictionary_encode(), "item_id": ["x", "y", "z"],
                  "ts": pa.array([3, 2, 1], pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
                  "event": ["click", "view", "purchase"]})
    assert s.add_table(t) == 3
    assert [(e[0], e[2]) for e in s.history("a")] == [("z", 1), ("y", 2)]
    assert s.users(1) == ["a"]


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError):
        GroupCommitLog(Storage(str(tmp_path)), max_events=0)


def test_live_state_is_bounded_in_memory_and_loses_no_history(tmp_path):
    s = SessionState(max_len=5, max_users=3, spill_dir=str(tmp_path))
    for u in range(10):
        for k in range(7):
            s.add(f"u{u}", f"i{u}-{k}", "click", 1000 * u + k)
    assert len(s._users) == 3 and len(s) == 10 and s.spilled >= 7
    # a spilled user comes back whole (last max_len events, in order) and becomes recent again
    assert [e[0] for e in s.history("u0")] == [f"i0-{k}" for k in range(2, 7)]
    assert "u0" in s._users and len(s._users) == 3 and s.reloaded == 1
    s.add("u1", "late", "view", 1500)  # a spilled user's new event joins its stored history
    assert [e[0] for e in s.history("u1")][-1] == "late" and len(s.history("u1")) == 5
    assert s.forget("u2") == 5 and s.history("u2") == [] and len(s) == 9
    table = pa.table({"user_id": [f"v{k % 6}" for k in range(30)], "item_id": [f"j{k}" for k in range(30)],
                      "ts": pa.array(range(30), pa.int64()), "event": ["click"] * 30})
    assert s.add_table(table) == 30 and len(s._users) == 3 and len(s) == 15
    assert [e[0] for e in s.history("v0")] == ["j0", "j6", "j12", "j18", "j24"]


def test_live_events_count_co_visits_once_per_user_and_pair():
    s = SessionState(max_len=10)
    s.add("u", "a", "click", 1)
    s.add("u", "b", "click", 2)
    s.add("u", "b", "click", 3)  # a repeat: this user already counts for b and its pairs
    s.add("v", "b", "click", 4)
    s.add("v", "c", "click", 5)
    s.add("w", "x", "click", 6, covisit=False)  # a dataset event: in the trained channel already
    cv = s.covisit
    assert cv.pairs == {"a": {"b": 1}, "b": {"a": 1, "c": 1}, "c": {"b": 1}} and cv.users == {"a": 1, "b": 2, "c": 1}
    ctx = s.context("u", ["c"])  # stored history + the request's recent items
    assert [e[0] for e in ctx["history"]] == ["a", "b", "b"]
    assert sorted(ctx["covisit"]["pairs"]) == [("a", "b", 1), ("b", "a", 1), ("b", "c", 1), ("c", "b", 1)]
    assert ctx["covisit"]["users"] == {"a": 1, "b": 2, "c": 1}
    assert s.context(None, ["zz"]) == {"history": [], "covisit": {"pairs": [], "users": {}}}


def test_live_co_visits_are_bounded_and_replayed_from_the_log_in_time_order():
    from components.models.channels.covisit import LiveCovisitation

    cv = LiveCovisitation(window=2, neighbours=2)
    cv.observe(["a", "b", "c"], "d")  # only the last 2 distinct items pair with d
    assert cv.pairs["d"] == {"c": 1, "b": 1} and "a" not in cv.pairs
    for k in range(5):
        cv.observe([f"n{k}"], "d")
    assert len(cv.pairs["d"]) <= 4  # amortised cap: 2 x neighbours
    # the feedback log read back at a rebuild gives the same counts as the live events did
    live = SessionState()
    rows = [("u", "a", 3), ("v", "a", 1), ("u", "b", 4), ("v", "c", 2), ("u", "c", 5)]
    for u, i, ts in sorted(rows, key=lambda r: r[2]):
        live.add(u, i, "click", ts)
    table = pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                      "ts": pa.array([r[2] for r in rows], pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
                      "event": ["click"] * 5})  # as read_feedback returns it
    rebuilt = SessionState()
    assert rebuilt.add_table(table, covisit=True) == 5
    assert rebuilt.covisit.pairs == live.covisit.pairs and rebuilt.covisit.users == live.covisit.users
    assert [e[0] for e in rebuilt.history("u")] == ["a", "b", "c"]


def test_user_shards_split_the_state_and_their_co_visits_add_up_to_one_holder():
    """Live state sharded by user (issue 11.3): a stable owner per user, a rebuild keeps only the
    shard's users, and co-visits summed over the shards equal one holder's."""
    from components.models.channels.covisit import merge_covisit
    from components.online.live_state import shard_rows, user_shard

    users = [f"u{k:03d}" for k in range(40)]
    owners = {u: user_shard(u, 2) for u in users}
    assert set(owners.values()) == {0, 1} and all(user_shard(u, 1) == 0 for u in users)
    assert owners == {u: user_shard(u, 2) for u in users}  # crc32: the same in every process
    rows = [_ev(u, f"i{(k + j) % 7}", 10 * j + k) for k, u in enumerate(users) for j in range(4)]
    table = pa.table({c: [r[c] for r in rows] for c in ("user_id", "item_id", "ts", "event")})
    parts = [shard_rows(table, k, 2) for k in (0, 1)]
    assert parts[0].num_rows + parts[1].num_rows == table.num_rows
    assert all(owners[u] == k for k in (0, 1) for u in parts[k]["user_id"].to_pylist())
    assert shard_rows(table, 0, 1) is table

    one, shards = SessionState(), [SessionState(), SessionState()]
    for r in sorted(rows, key=lambda r: r["ts"]):
        one.add(r["user_id"], r["item_id"], r["event"], r["ts"])
        shards[owners[r["user_id"]]].add(r["user_id"], r["item_id"], r["event"], r["ts"])
    items = ["i0", "i3", "i5"]
    merged = merge_covisit([s.covisit_rows(items) for s in shards])
    want = one.covisit_rows(items)
    assert sorted(merged["pairs"]) == sorted(want["pairs"]) and merged["users"] == want["users"]
    assert merge_covisit([want]) is want
    assert shards[owners["u007"]].history("u007") == one.history("u007")
    assert shards[1 - owners["u007"]].history("u007") == []


def test_what_one_request_reads_of_the_live_co_visits_is_bounded_to_the_strongest_pairs():
    """The per-request payload stays small however many live events there are: the last
    query_items distinct items, each with its query_neighbours most co-visited partners."""
    from components.models.channels.covisit import LiveCovisitation

    cv = LiveCovisitation(query_items=3, query_neighbours=4)
    for k in range(40):  # 40 users pair "a" with a partner each; p0..p3 again and again
        cv.observe(["a"], f"n{k}")
    for rep in range(5):
        for j in range(4):
            cv.observe([f"x{rep}", "a"], f"p{j}") if rep == 0 else cv._bump("a", f"p{j}")
    out = cv.rows(["old1", "old2", "a"])
    assert sorted(b for a, b, _ in out["pairs"] if a == "a") == ["p0", "p1", "p2", "p3"]
    assert len(cv.pairs["a"]) > 40  # all kept; only the read is bounded
    cv.observe(["q"], "z")
    assert cv.rows(["q", "b1", "b2", "b3"])["pairs"] == []  # q is 4th from the end: not read
    assert [p[:2] for p in cv.rows(["q", "b1", "b2"])["pairs"]] == [("q", "z")]


def test_live_co_visits_count_only_catalog_items_and_hold_at_most_max_pairs():
    """Issue 23 item 1: ids outside the served catalog never become live co-visits (nor partners
    of catalog items) though they stay in the user's history; an item added to the catalog
    counts from then on; all items together hold at most max_pairs pairs, the strongest kept
    and, among equal counts, the newest."""
    from components.models.channels.covisit import LiveCovisitation

    s = SessionState(covisit=LiveCovisitation(catalog={"a", "b"}))
    for ts, (user, item) in enumerate([("u", "a"), ("u", "junk-1"), ("u", "b"), ("v", "junk-2"), ("v", "a")]):
        s.add(user, item, "click", ts)
    assert [e[0] for e in s.history("u")] == ["a", "junk-1", "b"]
    cv = s.covisit
    assert cv.pairs == {"a": {"b": 1}, "b": {"a": 1}} and cv.users == {"a": 2, "b": 1} and cv.skipped == 2
    s.add_catalog(["c"])  # upserted through PUT /v1/items
    s.add("u", "c", "click", 9)
    assert cv.pairs["c"] == {"a": 1, "b": 1} and "junk-1" not in cv.pairs["c"]

    cv = LiveCovisitation(max_pairs=40)
    for _ in range(5):  # five users take "pair" after "hot"
        cv.observe(["hot"], "pair")
    for k in range(200):  # 400 one-off pairs
        cv.observe([f"x{k}"], f"y{k}")
    assert cv.size == sum(len(row) for row in cv.pairs.values()) <= 40
    assert cv.pairs["hot"] == {"pair": 5} and cv.pairs["pair"] == {"hot": 5}
    assert cv.pairs["y199"] == {"x199": 1} and "x0" not in cv.pairs and "y0" not in cv.pairs


def test_the_event_store_stores_events_on_unknown_items_but_counts_only_the_catalog(tmp_path):
    """Issue 23 item 1, in the live-state holder: every event is stored durably, the live
    co-visits count only the served catalog (the promoted bundle's items and the upserts, known
    to the store itself: by the ingress's notice of a PUT /v1/items or by its poll of storage), the
    store reports the ids outside it, and a restart rebuilds the same counts from the log."""
    from components import layout, registry
    from serve.events import EventStore

    st = Storage(str(tmp_path))
    st.write_parquet(layout.join(layout.bundle("m1"), layout.ITEMS, "part-0.parquet"), pa.table({"item_id": ["a"]}))
    registry.promote(st, layout.MODEL, "m1", layout.bundle("m1"), {}, {})  # no lineage: no dataset to read
    st.write_parquet(layout.join(layout.UPSERTS, "part-0000000000001-aaaaaaaa.parquet"), pa.table({"item_id": ["b"]}))
    store_cls = getattr(EventStore, "func_or_class", EventStore)
    store = store_cls({"storage_root": str(tmp_path), "watch_interval_s": 3600})  # no poll during the test
    ts = 1_700_000_000_000
    out = asyncio.run(store.append([_ev("u", "a", ts), _ev("u", "junk", ts + 1), _ev("u", "b", ts + 2)]))
    assert out["unknown"] == ["junk"] and out["shard"].startswith(layout.FEEDBACK)
    # PUT /v1/items: the retriever stores the upsert, then the ingress tells the store
    st.write_parquet(layout.join(layout.UPSERTS, "part-0000000000002-cccccccc.parquet"), pa.table({"item_id": ["c"]}))
    asyncio.run(store.add_catalog(["c"]))
    st.write_parquet(layout.join(layout.UPSERTS, "part-0000000000003-dddddddd.parquet"), pa.table({"item_id": ["d"]}))
    # the poll reads only the shards it has not read (c's too: the notice did not read storage)
    assert store._load_catalog(registry.read_pointer(st, layout.MODEL)) == 2
    out = asyncio.run(store.append([_ev("u", "c", ts + 3), _ev("v", "junk", ts + 4), _ev("v", "d", ts + 5)]))
    assert out["unknown"] == ["junk"]
    assert sorted(read_feedback(st, list_feedback_shards(st))["item_id"].to_pylist()) == \
        ["a", "b", "c", "d", "junk", "junk"]
    assert [e[0] for e in asyncio.run(store.history("u"))] == ["a", "junk", "b", "c"]
    cv = store.state.covisit
    assert "junk" not in cv.pairs and not any("junk" in row for row in cv.pairs.values())
    assert cv.pairs["c"] == {"a": 1, "b": 1} and cv.users == {"a": 1, "b": 1, "c": 1, "d": 1}
    status = asyncio.run(store.status())
    assert status["live_covisit_skipped"] == 2 and status["live_covisit_pairs"] == 6
    # a restart: catalog and counts from storage
    again = store_cls({"storage_root": str(tmp_path), "watch_interval_s": 3600})
    assert again.state.covisit.pairs == cv.pairs and again.state.covisit.users == cv.users
    assert again.rebuilt["catalog_items"] == 4 and again.rebuilt["feedback_events"] == 6


def test_the_spill_file_holds_at_most_spill_users_max_users_and_goes_with_the_state(tmp_path):
    """Issue 23 item 2: past spill_users_max spilled users the least recently spilled are dropped
    (their events stay in the feedback log), so the SQLite file stops growing; it is removed
    with the state instead of one file per rebuild being left behind."""
    import gc

    s = SessionState(max_len=20, max_users=2, spill_dir=str(tmp_path), spill_users_max=10)

    def fill(state, users):
        for u in users:
            for k in range(20):
                state.add(u, f"{u}-item-{k}", "click", 1_700_000_000_000 + k)

    fill(s, [f"u{k}" for k in range(12)])  # 2 in memory, 10 spilled: at the cap
    (folder,) = tmp_path.glob("live-state-*")
    at_cap = (folder / "users.sqlite").stat().st_size
    assert len(s) == 12 and s.dropped == 0
    fill(s, [f"v{k}" for k in range(300)])
    assert len(s) == 12 and s.dropped == 300 and s.spilled == 310
    assert s._spill.execute("SELECT COUNT(*) FROM users").fetchone()[0] == 10
    assert (folder / "users.sqlite").stat().st_size <= 2 * at_cap  # uncapped: 13x
    assert s.history("u0") == [] and s.history("v287") == []  # spilled longest ago: dropped
    assert [e[0] for e in s.history("v297")] == [f"v297-item-{k}" for k in range(20)]  # spilled lately: whole
    del s
    gc.collect()
    assert not folder.exists()
