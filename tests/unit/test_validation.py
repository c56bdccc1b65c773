import json

import pyarrow as pa

from components.data.validation import clean_text, normalize_events, normalize_items, parse_categories, to_epoch_ms

NOW = 1_800_000_000_000


def _reasons(res):
    return res.rejects["reason"].to_pylist()


def test_good_rows_are_normalised():
    raw = pa.table({
        "user_id": [1, 2, 3], "item_id": ["a", " b ", "c"],
        "ts": ["1600000000", "2020-01-01T00:00:00Z", "2020-01-01 10:00:00"],
        "event": ["Click", None, "PURCHASE"], "value": ["4.5", "", None],
        "context": ["caf&eacute; &amp; <b>bar</b>", None, None],
    })
    res = normalize_events(raw, now_ms=NOW)
    assert res.rejects.num_rows == 0
    v = res.valid.to_pydict()
    assert v["user_id"] == ["1", "2", "3"]
    assert v["item_id"] == ["a", "b", "c"]
    ms = [int(t.timestamp() * 1000) for t in v["ts"]]
    assert ms == [1_600_000_000_000, 1_577_836_800_000, 1_577_872_800_000]
    assert v["event"] == ["click", "view", "purchase"]
    assert v["value"] == [4.5, None, None]
    assert v["context"] == ["café & bar", None, None]


def test_each_rule_quarantines_with_reason_and_raw_record():
    raw = pa.table({
        "user_id": ["u", "", "u", "u", "u", "u", "u"],
        "item_id": ["i", "i", None, "i", "i", "i", "i"],
        "ts": ["1600000000000", "1600000000000", "1600000000000", "yesterday", "-5", "1600000000000", "1600000000000"],
        "event": ["view", "view", "view", "view", "view", "teleport", "rate"],
        "value": [None, None, None, None, None, None, "five"],
    })
    res = normalize_events(raw, now_ms=NOW, shard="s.csv")
    assert res.valid.num_rows == 1
    assert _reasons(res) == ["missing_user_id", "missing_item_id", "bad_ts", "ts_out_of_range",
                             "bad_event", "bad_value"]
    rec = json.loads(res.rejects["record"][2].as_py())
    assert rec["ts"] == "yesterday"
    assert set(res.rejects["shard"].to_pylist()) == {"s.csv"}
    assert res.valid.num_rows + res.rejects.num_rows == raw.num_rows  # nothing silently dropped


def test_missing_required_column_rejects_every_row():
    res = normalize_events(pa.table({"user_id": ["a", "b"], "item_id": ["x", "y"]}), now_ms=NOW)
    assert res.valid.num_rows == 0
    assert _reasons(res) == ["missing_column:ts"] * 2


def test_wrong_column_type_is_reported_not_raised():
    raw = pa.table({"user_id": [[1], [2]], "item_id": ["x", "y"], "ts": [1, 2]})
    res = normalize_events(raw, now_ms=NOW)
    assert _reasons(res) == ["bad_type:user_id"] * 2


def test_future_timestamps_are_out_of_range():
    res = normalize_events(pa.table({"user_id": ["u"], "item_id": ["i"], "ts": [NOW + 2 * 86_400_000]}), now_ms=NOW)
    assert _reasons(res) == ["ts_out_of_range"]


def test_integer_timestamp_units():
    ms, bad = to_epoch_ms(pa.array([1_600_000_000, 1_600_000_000_000, 1_600_000_000_000_000, 1_600_000_000_000_000_000]))
    assert ms.to_pylist() == [1_600_000_000_000] * 4
    assert not any(bad.to_pylist())
    ms, _ = to_epoch_ms(pa.array([1_600_000_000]), unit="ms")
    assert ms.to_pylist() == [1_600_000_000]


def test_arrow_timestamps_naive_are_utc():
    ms, _ = to_epoch_ms(pa.array([0, 1000], pa.timestamp("s")))
    assert ms.to_pylist() == [0, 1_000_000]


def test_text_cleanup():
    assert clean_text("Tom &amp;amp; Jerry<br/>  &quot;live&quot;") == 'Tom & Jerry "live"'
    assert clean_text(None) == ""


def test_items_validation_and_categories():
    raw = pa.table({"item_id": ["1", None, "3"], "title": ["A &amp; B", "x", None],
                    "categories": ["Drama|Comedy|Drama", "x", None]})
    res = normalize_items(raw)
    assert res.valid["item_id"].to_pylist() == ["1", "3"]
    assert res.valid["title"].to_pylist() == ["A & B", ""]
    assert res.valid["categories"].to_pylist() == [["Drama", "Comedy"], []]
    assert _reasons(res) == ["missing_item_id"]
    assert parse_categories(["a", "a", " b "]) == ["a", "b"]
