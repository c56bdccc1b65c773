"""Group commit of feedback and the live per-user state."""

import asyncio

import pyarrow as pa
import pytest

from components.storage import Storage
from serve.feedback import GroupCommitLog, SessionState, list_feedback_shards, read_feedback


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
