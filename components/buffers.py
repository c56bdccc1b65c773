"""Tables that grow by rows in amortised constant time per row.

A serving replica adds items one ``PUT /v1/items`` at a time to tables of catalog size (item
vectors, LLM text vectors, popularity, category one-hots). Appending by concatenation copies the
whole table per item: at 10^6 items that is ~1 GB moved for one new item. ``append_rows`` keeps
spare rows behind the table instead: the table is a leading slice of a larger buffer, a new row
is written into the spare room, and only when the room runs out is the buffer reallocated with
``GROWTH`` times the rows (so n appends cost O(n) copies in all).

The returned table is a view: rows below the old length are shared with the old table (which
stays valid and unchanged for a reader holding it), the new rows are only in the new one. Only a
buffer this module allocated is written past a table's end: any other table (e.g. a leading
slice of an array whose later rows mean something) is copied into a new buffer first.
"""

from __future__ import annotations

import weakref
from typing import Union

import numpy as np
import torch

GROWTH = 1.25  # a full buffer is reallocated with this many times the rows it needs

Table = Union[np.ndarray, torch.Tensor]
_ARRAYS: "weakref.WeakValueDictionary[int, np.ndarray]" = weakref.WeakValueDictionary()  # buffers made here
_CAPACITY = "_append_rows_capacity"  # on a tensor made here: its buffer's rows


def _capacity(n: int, k: int) -> int:
    return max(n + k, int(n * GROWTH) + 16)


def append_rows(table: Table, rows: Table) -> Table:
    """``table`` [n, ...] with ``rows`` [k, ...] appended, as a numpy array or a tensor like
    ``table`` (``rows`` is converted to its dtype). Amortised O(k) (module doc)."""
    if isinstance(table, torch.Tensor):
        return _append_tensor(table, torch.as_tensor(rows, dtype=table.dtype))
    return _append_array(table, np.asarray(rows, dtype=table.dtype))


def _append_array(table: np.ndarray, rows: np.ndarray) -> np.ndarray:
    n, k = len(table), len(rows)
    base = table.base
    roomy = (base is not None and _ARRAYS.get(id(base)) is base and table.flags.c_contiguous
             and base.__array_interface__["data"][0] == table.__array_interface__["data"][0]
             and len(base) >= n + k)
    if not roomy:
        base = np.empty((_capacity(n, k),) + table.shape[1:], dtype=table.dtype)
        _ARRAYS[id(base)] = base
        base[:n] = table
    out = base[:n + k]
    out[n:] = rows.reshape((k,) + table.shape[1:])
    return out


def _append_tensor(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    n, k = table.shape[0], rows.shape[0]
    if getattr(table, _CAPACITY, 0) >= n + k and table.is_contiguous() and table.storage_offset() == 0:
        out = torch.empty(0, dtype=table.dtype).set_(table.untyped_storage(), 0, (n + k,) + tuple(table.shape[1:]))
        capacity = getattr(table, _CAPACITY)
    else:
        capacity = _capacity(n, k)
        out = torch.empty((capacity,) + tuple(table.shape[1:]), dtype=table.dtype)[:n + k]
        out[:n] = table
    out[n:] = rows.reshape((k,) + tuple(table.shape[1:]))
    setattr(out, _CAPACITY, capacity)
    return out
