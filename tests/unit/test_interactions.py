import numpy as np
import pyarrow as pa

from components.data import interactions as ix
from components.data.validation import normalize_events


def _log(rows):
    """rows: (user, item, ts) tuples in input order."""
    u, i, t = zip(*rows)
    table = normalize_events(pa.table({"user_id": list(u), "item_id": list(i), "ts": list(t)}),
                             now_ms=10**13, ts_unit="ms").valid
    log = ix.InteractionLog()
    log.add(table.slice(0, len(rows) // 2))  # two batches: codes must be global
    log.add(table.slice(len(rows) // 2))
    return log.finish()


def _named(x):
    return [(x.user_ids[a], x.item_ids[b], int(t)) for a, b, t in zip(x.user, x.item, x.ts)]


def test_dedupe_keeps_earliest_then_first_row():
    x = _log([("u", "a", 5), ("u", "a", 3), ("u", "b", 3), ("u", "b", 3), ("v", "a", 1)])
    kept, dropped = ix.dedupe_earliest(x)
    assert dropped == 2
    assert _named(kept) == [("u", "a", 3), ("u", "b", 3), ("v", "a", 1)]
    # ties on ts keep input order: ("u","a",3) was row 1, ("u","b",3) row 2
    assert list(kept.row) == [1, 2, 4]


def test_kcore_is_iterative():
    # With k=2: item c has 1 user -> dropped; then user w has 1 item -> dropped; then item b has 1
    # user -> dropped... leaving the dense core {u, v} x {a, d}.
    rows = [("u", "a", 1), ("u", "d", 2), ("v", "a", 1), ("v", "d", 2), ("w", "c", 1), ("w", "b", 2), ("z", "b", 3)]
    x, iters = ix.kcore(_log(rows), 2)
    assert sorted(set(_named(x))) == [("u", "a", 1), ("u", "d", 2), ("v", "a", 1), ("v", "d", 2)]
    assert iters >= 2
    uc = np.bincount(x.user)
    assert uc[uc > 0].min() >= 2


def test_vocab_is_sorted_and_independent_of_input_order():
    rows = [("u2", "b", 1), ("u1", "a", 2), ("u1", "c", 3), ("u2", "a", 4)]
    a = ix.reindex(_log(rows))
    b = ix.reindex(_log(rows[::-1]))
    assert list(a.user_ids) == ["u1", "u2"] == list(b.user_ids)
    assert list(a.item_ids) == ["a", "b", "c"] == list(b.item_ids)


def test_loo_split_last_is_test_second_last_is_valid():
    rows = [("u", "a", 1), ("u", "b", 3), ("u", "c", 2), ("u", "d", 3), ("v", "a", 1), ("v", "b", 2)]
    x = ix.sort_by_user_time(ix.reindex(_log(rows)))
    split = ix.split_loo(x)
    named = _named(x)
    # u: a(1), c(2), b(3, row 1), d(3, row 3): ties broken by input row -> d is last
    assert [n[1] for n in named[:4]] == ["a", "c", "b", "d"]
    assert list(split[:4]) == [0, 0, ix.SPLIT_VALID, ix.SPLIT_TEST]
    assert list(split[4:]) == [0, 0]  # v has < 3 interactions: all train


def test_temporal_split_uses_global_cutoffs():
    rows = [("u", str(k), k) for k in range(1, 11)]
    x = ix.sort_by_user_time(ix.reindex(_log(rows)))
    split, cut = ix.split_temporal(x, 0.2, 0.2)
    assert list(split) == [0] * 6 + [1] * 2 + [2] * 2
    assert cut["test_after_ms"] == 8


def test_sequences_hold_train_items_in_time_order():
    rows = [("u", "a", 1), ("u", "b", 2), ("u", "c", 3), ("u", "d", 4), ("v", "d", 1)]
    x = ix.sort_by_user_time(ix.reindex(_log(rows)))
    split = ix.split_loo(x)
    seq = ix.user_sequences(x, split).to_pylist()
    assert [x.item_ids[i] for i in seq[0]["items"]] == ["a", "b"]
    assert seq[0]["ts"] == [1, 2]
    assert [x.item_ids[i] for i in seq[1]["items"]] == ["d"]


def test_bots_dropped():
    rows = [("bot", str(k), k + 1) for k in range(20)] + [("u", "a", 1)]
    x, users, events = ix.drop_bots(_log(rows), 10)
    assert (users, events) == (1, 20)
    assert _named(x) == [("u", "a", 1)]


def test_each_target_sees_everything_of_its_user_before_it():
    """Temporal split: several valid and test targets per user. Each sees the train part, (for
    test) every valid event, and its own split's earlier events; under loo this is the old rule."""
    import numpy as np

    from components.data.sequences import UserHistories, history_for

    def t(users, items, ts):
        return {"user_idx": np.array(users), "item_idx": np.array(items), "ts": np.array(ts),
                "event": ["click"] * len(users)}

    h = UserHistories(items=[np.array([1, 2]), np.array([7])], events=[np.zeros(2, np.int64), np.zeros(1, np.int64)],
                      ts=[np.array([1, 2]), np.array([1])], valid=t([0, 0, 1], [3, 4, 8], [3, 4, 2]),
                      test=t([0, 0], [5, 6], [5, 6]), num_items=10)
    users, items, _, ts, targets = history_for(h, "valid")
    assert [x.tolist() for x in items] == [[1, 2], [1, 2, 3], [7]] and targets.tolist() == [3, 4, 8]
    users, items, _, ts, targets = history_for(h, "test")
    assert [x.tolist() for x in items] == [[1, 2, 3, 4], [1, 2, 3, 4, 5]] and targets.tolist() == [5, 6]
    assert ts[1].tolist() == [1, 2, 3, 4, 5]


def test_an_evaluation_user_sample_keeps_whole_users_in_both_splits_and_every_training_history():
    """evaluate.max_users: the valid and test targets of a fixed hash-chosen set of users (the same
    set every call, in both splits), every user's training history kept (models and baselines are
    unchanged), and the kept valid rows' positions (the ranker's held-out rows are keyed by them)."""
    import numpy as np

    from components.data.sequences import UserHistories, sample_targets

    def t(users):
        return {"user_idx": np.array(users), "item_idx": np.arange(len(users)), "ts": np.arange(len(users)),
                "event": [f"e{k}" for k in range(len(users))]}

    valid_users = [0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9]  # user 1 has two valid targets (temporal split)
    h = UserHistories(items=[np.array([k]) for k in range(10)], events=[np.zeros(1, np.int64)] * 10,
                      ts=[np.zeros(1, np.int64)] * 10, valid=t(valid_users), test=t(list(range(10))), num_items=20)
    s, rows = sample_targets(h, 4)
    kept = set(s.valid["user_idx"].tolist())
    assert len(kept) == 4 and kept == set(s.test["user_idx"].tolist())
    assert s.items is h.items  # training histories untouched
    assert np.array_equal(np.asarray(valid_users)[rows], s.valid["user_idx"])
    assert s.valid["event"] == [f"e{r}" for r in rows] and np.array_equal(s.valid["item_idx"], rows)
    again, rows_again = sample_targets(h, 4)
    assert np.array_equal(rows, rows_again) and set(again.test["user_idx"].tolist()) == kept
    assert set(sample_targets(h, 5)[0].test["user_idx"].tolist()) > kept  # a larger sample contains the smaller
    full, every = sample_targets(h, None)
    assert full is h and np.array_equal(every, np.arange(len(valid_users)))
    assert sample_targets(h, 10)[0] is h
