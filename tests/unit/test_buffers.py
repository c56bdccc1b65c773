"""components.buffers: tables that grow by rows without copying themselves per row."""

import numpy as np
import torch

from components.buffers import append_rows


def test_appended_rows_land_after_the_table_and_the_buffer_is_reused_not_copied():
    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    b = append_rows(a, [[6, 7]])
    assert b.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]] and a.shape == (3, 2)  # the old table unchanged
    ptr = b.__array_interface__["data"][0]
    for k in range(8, 30, 2):
        b = append_rows(b, np.array([[k, k + 1]]))
    assert b.__array_interface__["data"][0] == ptr  # grew into its spare rows
    assert b[:, 0].tolist() == list(range(0, 30, 2))
    # 1-d tables (popularity, timestamps) too
    c = append_rows(np.zeros(2, np.int64), [5])
    assert append_rows(c, [7]).tolist() == [0, 0, 5, 7]


def test_a_slice_of_an_array_it_did_not_make_is_never_written_past_its_end():
    """A leading slice of a larger array whose later rows mean something: appending to the slice
    must copy it, not overwrite those rows."""
    full = np.arange(10, dtype=np.float64)
    out = append_rows(full[:4], [-1.0])
    assert full.tolist() == list(range(10)) and out.tolist() == [0, 1, 2, 3, -1]
    t = torch.arange(10.0)
    assert append_rows(t[:4], torch.tensor([-1.0])).tolist() == [0, 1, 2, 3, -1] and t.tolist() == list(range(10))


def test_tensors_keep_their_dtype_and_grow_in_place():
    t = torch.zeros(3, 4, dtype=torch.float16)
    t = append_rows(t, torch.ones(1, 4))
    ptr = t.untyped_storage().data_ptr()
    for _ in range(10):
        t = append_rows(t, torch.full((1, 4), 2.0))
    assert t.dtype == torch.float16 and t.shape == (14, 4) and t.untyped_storage().data_ptr() == ptr
    assert t[3].tolist() == [1.0] * 4 and t[4:].eq(2).all() and t[:3].eq(0).all()
    t[0] = 9  # a table stays writable (an upserted item's new text)
    assert t[0, 0] == 9
