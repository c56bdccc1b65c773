import pytest
import torch

from components import checkpoints as ck
from components.storage import Storage


def test_save_publish_fetch_verify(tmp_path):
    folder = ck.save_local(tmp_path / "c", {"w": torch.arange(6.0).view(2, 3)}, {"kind": "x"}, {"ndcg": 0.1})
    st = Storage(str(tmp_path / "store"))
    prefix = ck.publish(st, folder, "m", "r1")
    got = ck.fetch(st, prefix, tmp_path / "dl")
    state, config, metrics = ck.load_local(got)
    assert torch.equal(state["w"], torch.arange(6.0).view(2, 3)) and config == {"kind": "x"} and metrics["ndcg"] == 0.1
    manifest = ck.verify_local(got)
    pointer = ck.promote(st, "m", "r1", prefix, {"ndcg": 0.1}, manifest)
    assert ck.read_pointer(st, "m")["run_id"] == "r1" == pointer["run_id"]


def test_corrupt_or_partial_checkpoints_are_refused(tmp_path):
    folder = ck.save_local(tmp_path / "c", {"w": torch.ones(3)}, {})
    (folder / ck.WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(ck.CheckpointError, match="sha256 of model.safetensors"):
        ck.load_local(folder)
    folder = ck.save_local(tmp_path / "d", {"w": torch.ones(3)}, {})
    (folder / "config.json").unlink()
    with pytest.raises(ck.CheckpointError, match="config.json listed in the manifest is missing"):
        ck.verify_local(folder)
