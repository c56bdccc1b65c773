"""Ray Train + DeepSpeed on CPU (2 gloo workers): checkpoints to S3, resume after a killed worker."""

import json

import pytest
import torch

from components import bundle
from components import checkpoints as ck
from components.config import load_config
from components.data.datasets import load_training_data, resolve_dataset
from components.storage import Storage
from jobs import preprocess, train

pytestmark = [pytest.mark.ray, pytest.mark.s3]

SMALL = ["data.synthetic.num_events=6000", "data.synthetic.num_items=300", "data.synthetic.num_shards=2",
         "retriever.dim=32", "retriever.layers=1", "retriever.max_len=30", "train.retriever.batch_size=64",
         "train.retriever.eval_every=1", "train.retriever.patience=0",
         # 3 epochs: a constant lr, so the quality bar below does not depend on a schedule's tail.
         "train.retriever.schedule=constant"]


def test_two_worker_deepspeed_resumes_after_killed_worker_and_checkpoints_to_s3(ray_local, s3_bucket, tmp_path):
    cfg = load_config([f"storage.root={s3_bucket}/rec", *SMALL, "retriever.use_text=false",
                       "train.retriever.epochs=3", "train.fail_at_epoch=1", "train.stages=[retriever]",
                       "train.zero_stage=2", "train.run_id=t-resume"])
    storage = Storage.from_config(cfg.storage)
    preprocess.run(cfg, engine="local")
    ds = resolve_dataset(storage, cfg)
    out = train.train(cfg, storage, ds, "t-resume")
    local = ck.fetch(storage, out["prefix"], tmp_path / "bundle")

    # The worker died once at epoch 1 (marker written), the group restarted from the epoch-0
    # checkpoint and finished: the final metrics say where it resumed from.
    assert storage.exists("runs/t-resume/_fault_injected")
    progress = json.loads((local / "retriever" / "train_progress.json").read_text())
    assert progress["last_metrics"]["resumed_from"] == 0
    assert progress["epoch"] == 2

    # The published bundle on S3 reloads, verifies, and reproduces the recorded valid NDCG.
    data = load_training_data(storage, ds.prefix, None)
    model = bundle.load_retriever(local)
    from components.evaluation.metrics import rank_and_topk, ranking_metrics
    from components.evaluation.ranking import retriever_scores

    s, t, h = retriever_scores(model, None, data.histories, "valid")
    ndcg = ranking_metrics(rank_and_topk(s, t, h)[0])["ndcg@10"]
    recorded = json.loads((local / "retriever" / "metrics.json").read_text())["valid_ndcg@10"]
    assert abs(ndcg - recorded) < 1e-6
    assert ndcg > 0.02  # well above random (10/300 * 1/log2 ... ~0.015 for hit@10 of random)


def test_zero3_trains_and_exports_full_weights(ray_local, tmp_path):
    cfg = load_config([f"storage.root={tmp_path / 'store'}", *SMALL, "retriever.use_text=false",
                       "train.retriever.epochs=1", "train.stages=[retriever]", "train.zero_stage=3"])
    storage = Storage.from_config(cfg.storage)
    preprocess.run(cfg, engine="local")
    ds = resolve_dataset(storage, cfg)
    out = train.train(cfg, storage, ds, "t-z3")
    local = ck.fetch(storage, out["prefix"], tmp_path / "bundle")
    state, config, metrics = ck.load_local(local / "retriever")
    # Gathered from the ZeRO-3 partitions: every tensor has its full shape.
    assert state["id_emb.weight"].shape[1] == 32
    assert state["id_emb.weight"].shape[0] == config["retriever"]["num_items"] + 1
    assert all(v.numel() > 0 for v in state.values())
    assert torch.isfinite(torch.tensor(metrics["valid_ndcg@10"]))


def test_a_rank_stuck_before_a_collective_fails_the_stage_instead_of_hanging(ray_local, tmp_path):
    """train.collective_timeout_s reaches the process group: rank 1 sleeps past it before an
    all-reduce, so rank 0's all-reduce times out and the stage fails with that error. Without the
    timeout (torch's default: 30 min) the all-reduce would wait and the stage would succeed."""
    cfg = load_config([f"storage.root={tmp_path / 'store'}", "train.collective_timeout_s=5", "train.max_failures=0",
                       "train.num_workers=2", "train.cpus_per_worker=1"])
    storage = Storage.from_config(cfg.storage)

    def stuck(config):
        import time

        import ray.train
        import torch.distributed as dist

        if ray.train.get_context().get_world_rank() == 1:
            time.sleep(60)
        dist.all_reduce(torch.ones(1))

    with pytest.raises(Exception, match="(?i)timed out|timeout"):
        train.run_stage("stuck", stuck, {}, cfg, storage, "t-stuck")
