import pytest
import torch

from components import checkpoints as ck
from components import registry
from components import layout
from components.storage import Storage


def test_save_publish_fetch_verify(tmp_path):
    folder = ck.save_local(tmp_path / "c", {"w": torch.arange(6.0).view(2, 3)}, {"kind": "x"}, {"ndcg": 0.1})
    st = Storage(str(tmp_path / "store"))
    prefix = ck.publish(st, folder, "m", "r1")
    got = ck.fetch(st, prefix, tmp_path / "dl")
    state, config, metrics = ck.load_local(got)
    assert torch.equal(state["w"], torch.arange(6.0).view(2, 3)) and config == {"kind": "x"} and metrics["ndcg"] == 0.1
    manifest = ck.verify_local(got)
    pointer = registry.promote(st, "m", "r1", prefix, {"ndcg": 0.1}, manifest)
    assert registry.read_pointer(st, "m")["run_id"] == "r1" == pointer["run_id"]


def test_corrupt_or_partial_checkpoints_are_refused(tmp_path):
    folder = ck.save_local(tmp_path / "c", {"w": torch.ones(3)}, {})
    (folder / layout.WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(ck.CheckpointError, match="sha256 of model.safetensors"):
        ck.load_local(folder)
    folder = ck.save_local(tmp_path / "d", {"w": torch.ones(3)}, {})
    (folder / "config.json").unlink()
    with pytest.raises(ck.CheckpointError, match="config.json listed in the manifest is missing"):
        ck.verify_local(folder)


def _ranks(tmp_path, key=None):
    """Two ranks' parts of a training checkpoint, merged into one folder as Ray Train does."""
    merged = tmp_path / "merged"
    for rank in (0, 1):
        part = tmp_path / f"rank{rank}"
        (part / "state").mkdir(parents=True)
        torch.save({"w": torch.ones(2) * rank}, part / "state" / f"zero_pp_rank_{rank}_optim_states.pt")
        if rank == 0:
            (part / "latest").write_text("state")
        ck.write_state_manifest(part, rank, key=key)
        for f in part.rglob("*"):
            if f.is_file():
                (merged / f.relative_to(part)).parent.mkdir(parents=True, exist_ok=True)
                (merged / f.relative_to(part)).write_bytes(f.read_bytes())
    return merged


def test_training_state_is_verified_before_anything_is_unpickled(tmp_path):
    merged = _ranks(tmp_path)
    assert ck.verify_state(merged, key="") == 3
    shard = merged / "state" / "zero_pp_rank_1_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:-8])  # half-uploaded
    with pytest.raises(ck.CheckpointError, match="zero_pp_rank_1_optim_states.pt does not match"):
        ck.verify_state(merged, key="")
    merged = _ranks(tmp_path / "b")
    (merged / "state" / "extra.pt").write_bytes(b"not listed anywhere")
    with pytest.raises(ck.CheckpointError, match="extra.pt is in no state manifest"):
        ck.verify_state(merged, key="")
    for m in (_ranks(tmp_path / "c")).glob("state-manifest-*"):
        m.unlink()
    with pytest.raises(ck.CheckpointError, match="no state manifest"):
        ck.verify_state(tmp_path / "c" / "merged", key="")


def test_keyed_state_manifest_cannot_be_forged_without_the_key(tmp_path):
    merged = _ranks(tmp_path, key="k" * 32)
    assert ck.verify_state(merged, key="k" * 32) == 3
    # someone with storage access rewrites a shard and its manifest, but without the key
    shard = merged / "state" / "zero_pp_rank_0_optim_states.pt"
    torch.save({"w": torch.zeros(2)}, shard)
    ck.write_state_manifest(merged, 0, key="guess" * 8)
    with pytest.raises(ck.CheckpointError, match="does not match"):
        ck.verify_state(merged, key="k" * 32)
    with pytest.raises(ck.CheckpointError, match="written with LLMREC_CHECKPOINT_KEY"):
        ck.verify_state(_ranks(tmp_path / "d", key="k" * 32), key="")


def test_a_bundles_text_embeddings_load_batch_by_batch_in_item_order(tmp_path):
    """A replica reads the LLM text table a batch at a time into one preallocated tensor (its
    load peak at 10^6 items was 4x the table) one row group at a time; rows come back in item_idx order whether or not
    the file is sorted, across row groups."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from components import bundle, layout

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(10, 4)).astype(np.float32)
    for k, order in enumerate((np.arange(10), rng.permutation(10))):
        folder = tmp_path / f"b{k}"
        (folder / layout.TEXT).mkdir(parents=True)
        col = pa.FixedSizeListArray.from_arrays(pa.array(emb[order].ravel()), 4)
        pq.write_table(pa.table({"item_idx": order, "embedding": col}), folder / layout.TEXT / layout.TEXT_EMBEDDINGS,
                       row_group_size=4)
        assert pq.ParquetFile(folder / layout.TEXT / layout.TEXT_EMBEDDINGS).num_row_groups == 3
        got = bundle.load_text_embeddings(folder)
        assert got.dtype == torch.float32 and torch.equal(got, torch.as_tensor(emb))
