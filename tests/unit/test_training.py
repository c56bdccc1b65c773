"""The one training loop per model (components.training) over the in-process AdamW stepper: the
same functions the Ray Train workers run over a DeepSpeed stepper (no Ray here)."""

import numpy as np
import pytest
import torch

from components.data.sequences import UserHistories
from components.evaluation.ranking import scored_lists
from components.models.ranker import RankerConfig, RankerMLP
from components.models.retriever import RetrieverConfig, SequenceRetriever
from components.training import ranker as ranker_loop
from components.training import retriever as retriever_loop
from components.training.stepper import LocalStepper

N_ITEMS = 30


def _histories(users=60, length=8):
    """Each user walks the catalog in steps of one from their own start: the next item is
    always the current one + 1, which a sequence model learns in a few epochs."""
    items, events, ts, valid, test = [], [], [], [], []
    for u in range(users):
        walk = [(u + k) % N_ITEMS for k in range(length + 2)]
        items.append(np.array(walk[:length], np.int64))
        events.append(np.zeros(length, np.int64))
        ts.append(np.arange(length, dtype=np.int64) * 1000)
        valid.append((u, walk[length], length * 1000))
        test.append((u, walk[length + 1], (length + 1) * 1000))

    def split(rows):
        return {"user_idx": np.array([r[0] for r in rows]), "item_idx": np.array([r[1] for r in rows]),
                "ts": np.array([r[2] for r in rows]), "event": ["click"] * len(rows)}
    return UserHistories(items, events, ts, split(valid), split(test), N_ITEMS)


RCFG = RetrieverConfig(dim=16, layers=1, heads=2, max_len=12, use_text=False)


def test_the_retriever_loop_keeps_the_best_evaluation_and_stops_early():
    h = _histories()
    tcfg = retriever_loop.RetrieverTrainConfig(epochs=12, eval_every=1, patience=2, batch_size=16, lr=3e-3,
                                               schedule="constant")
    model = retriever_loop.new_retriever(h, None, RCFG, tcfg.seed)
    x = retriever_loop.retriever_inputs(h, None, model.cfg)
    budget = retriever_loop.plan_budget(tcfg, x.windows)
    seen = []
    progress = retriever_loop.train_retriever(
        LocalStepper(model, tcfg.lr, tcfg.weight_decay), x, tcfg, budget,
        after_epoch=lambda metrics, progress, improved, last: seen.append((metrics, improved, last)))
    losses = [m["loss"] for m, _, _ in seen]
    assert losses[-1] < losses[0]  # it learns
    assert seen[-1][2] is True and all(not last for _, _, last in seen[:-1])  # the last report says so
    ndcgs = [m["valid_ndcg@10"] for m, _, _ in seen]
    assert progress["best"] == max(ndcgs) and ndcgs[progress["best_epoch"]] == progress["best"]
    if len(seen) < tcfg.epochs:  # stopped early: the last `patience` evaluations did not improve
        assert [imp for _, imp, _ in seen[-tcfg.patience:]] == [False] * tcfg.patience
    # The kept state reproduces the best evaluation, not the last one.
    model.load_state_dict(progress["_best_state"])
    assert retriever_loop.valid_metrics(model, x)["ndcg@10"] == pytest.approx(progress["best"], abs=1e-6)
    # Every epoch reports what it cost: the target tokens it trained on a second (all of this
    # one worker's windows' targets over the epoch's wall time) and the cores it kept busy.
    tokens = int((x.windows["targets"] > 0).sum())
    for m, _, _ in seen:
        rounding = m["tokens_per_s_per_worker"] * 0.006 + 1  # epoch_s is rounded to 10 ms
        assert m["tokens_per_s_per_worker"] * m["epoch_s"] == pytest.approx(tokens, abs=rounding)
        assert 0 < m["cpu_busy_per_worker"] <= torch.get_num_threads() + 0.5


@pytest.mark.parametrize("requested, workers, free, gpu, cpus", [
    (0, 2, [2], False, 1),             # the default layout on a 2-core machine: as before
    (0, 1, [2], False, 2),             # one worker gets both cores
    (0, 2, [8, 8], False, 8),          # one node's worth each, two nodes
    (0, 1, [8, 4], False, 8),          # never more than a node has free
    (0, 4, [8, 8, 8], False, 4),       # every worker placed: 6 each would fit only 3 of 4
    (0, 2, [16, 8], False, 8),         # 12 each would fit only one
    (0, 2, [1.8, 1.9], False, 1),      # Serve replicas hold part of each node: 2 each would never start
    (0, 3, [2], False, 1),             # at least one
    (0, 2, [], False, 1),              # free CPUs unknown: one each
    (3, 2, [2], False, 3),             # asked for: given
    (0, 4, [16], True, 0),             # GPU workers ask for no CPU unless told (Ray Train's default)
])
def test_a_stage_shares_the_node_cpus_among_its_workers(requested, workers, free, gpu, cpus):
    from jobs.train import share_cpus

    assert share_cpus(requested, workers, free, gpu) == cpus


def test_fit_retriever_local_is_the_same_loop_and_is_seeded():
    h = _histories()
    tcfg = retriever_loop.RetrieverTrainConfig(epochs=3, eval_every=1, batch_size=16, schedule="constant")
    a = retriever_loop.fit_retriever_local(h, None, RCFG, tcfg)
    b = retriever_loop.fit_retriever_local(h, None, RCFG, tcfg)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not a.training


def test_the_ranker_loop_never_returns_worse_than_the_untrained_residual_on_held_out_lists():
    h = _histories(users=120)
    retriever = retriever_loop.fit_retriever_local(
        h, None, RCFG, retriever_loop.RetrieverTrainConfig(epochs=4, eval_every=4, batch_size=16, schedule="constant"))
    kcfg = RankerConfig(dim=RCFG.dim, candidates=10, epochs=3, batch_size=16, holdout=0.3)
    lists = scored_lists(retriever, None, None, h, "valid", [[] for _ in range(N_ITEMS)], kcfg.candidates)
    fit, held = ranker_loop.split_lists(lists, kcfg)
    assert len(fit) and len(held) and not set(fit) & set(held)
    torch.manual_seed(0)
    model = RankerMLP(kcfg)
    reports = []
    progress = ranker_loop.train_ranker(LocalStepper(model, kcfg.lr, kcfg.weight_decay), lists, fit, held, kcfg,
                                        after_epoch=lambda m, p, improved, last: reports.append((m, last)))
    untrained = progress["retriever_order_holdout_ndcg"]
    assert len(reports) == kcfg.epochs and reports[-1][1] is True
    assert progress["best"] >= untrained
    assert progress["best"] == max([untrained] + [m["holdout_ndcg@10"] for m, _ in reports])
    model.load_state_dict(progress["_best_state"])
    assert ranker_loop.holdout_ndcg(model, lists, held) == pytest.approx(progress["best"], abs=1e-6)


def test_the_stepper_steps_only_trainable_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    before = model[1].weight.detach().clone()
    stepper = LocalStepper(model, lr=0.1, weight_decay=0.0)
    stepper.step((stepper(torch.randn(8, 4)) * 1e3).sum())
    assert torch.equal(model[0].weight, frozen)
    moved = (model[1].weight - before).abs().max().item()
    assert 0 < moved <= 0.1 + 1e-6  # AdamW's first step moves each weight by at most ~lr
    assert stepper.mean(2.5) == 2.5  # one process: nothing to average over


def test_lists_and_ranks_scored_in_chunks_are_those_scored_at_once():
    from components.evaluation.ranking import fit_rows, retriever_ranks
    from components.models.channels import Channels
    h = _histories(users=600)
    retriever = retriever_loop.fit_retriever_local(
        h, None, RCFG, retriever_loop.RetrieverTrainConfig(epochs=1, eval_every=1, batch_size=16, schedule="constant"))
    channels = Channels.fit_data(h.items, h.num_items, None)
    whole = scored_lists(retriever, channels, None, h, "valid", [[] for _ in range(N_ITEMS)], 10)
    # 256 users per chunk (the smallest: user_vectors' batch): three chunks, the last one short.
    chunked = scored_lists(retriever, channels, None, h, "valid", [[] for _ in range(N_ITEMS)], 10, chunk_cells=1)
    assert whole.keys() == chunked.keys() and len(whole["ranks"]) == 600
    for k in whole:
        a, b = whole[k], chunked[k]
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else np.array_equal(a, b)), k
    plain = scored_lists(retriever, None, None, h, "valid", [[] for _ in range(N_ITEMS)], 0)
    assert np.array_equal(retriever_ranks(retriever, None, h, "valid", chunk_cells=1), plain["ranks"])
    # The fusion fit's sample: everyone when it fits, else a fixed hash sample of the user ids.
    users = np.arange(1000, 1600)
    assert np.array_equal(fit_rows(users, N_ITEMS, cells=600 * N_ITEMS), np.arange(600))
    rows = fit_rows(users, N_ITEMS, cells=100 * N_ITEMS)
    assert len(rows) == 100 and len(set(rows)) == 100 and np.all(np.diff(rows) > 0)
    assert np.array_equal(rows, fit_rows(users, N_ITEMS, cells=100 * N_ITEMS))
    assert 0.3 < np.mean(rows < 300) < 0.7  # spread over the users, not the first 100


def test_a_stale_extension_build_lock_is_cleared_and_a_fresh_one_kept(tmp_path):
    """A build killed mid-way leaves <root>/<py>/<op>/lock: every later DeepSpeed run would wait on it."""
    import os
    import time

    from components.training.stepper import clear_stale_build_locks

    stale, fresh = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock", tmp_path / "py311_cpu" / "other_op" / "lock"
    for f in (stale, fresh):
        f.parent.mkdir(parents=True)
        f.touch()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert clear_stale_build_locks(600, tmp_path) == [stale]
    assert not stale.exists() and fresh.exists()  # a build in progress keeps its lock


def test_the_build_lock_watchdog_thread_imports_nothing_and_still_clears_stale_locks(tmp_path, monkeypatch):
    """An import from the watchdog thread while DeepSpeed initialised deadlocked a rank on
    Python's import locks (CI: the rank waited forever, no collective timeout applies): the
    watcher must do file-system work only, with everything imported by its caller."""
    import builtins
    import os
    import threading
    import time

    from components.training.stepper import stale_build_lock_watchdog

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir(parents=True)
    stale.touch()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    imports, real = [], builtins.__import__

    def spy(name, *args, **kwargs):
        imports.append((threading.current_thread().name, name))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", spy)
    with stale_build_lock_watchdog(max_age_s=600, every_s=0.01):
        deadline = time.time() + 10
        while stale.exists() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # a few more rounds of the watcher
    monkeypatch.setattr(builtins, "__import__", real)
    assert not stale.exists()  # the watcher ran
    assert [n for t, n in imports if t == "stale-build-lock-watchdog"] == []


def test_workers_split_the_valid_evaluation_and_get_everyone_s_figures():
    """Two data-parallel workers each rank half the valid users; an all-reduce mean (two threads
    exchanging values here, gloo in a Ray Train worker) gives both the figures of all users."""
    import threading

    h = _histories(users=61)  # odd: the shares differ in size
    tcfg = retriever_loop.RetrieverTrainConfig(epochs=2, eval_every=1, batch_size=16, schedule="constant")
    model = retriever_loop.fit_retriever_local(h, None, RCFG, tcfg)
    x = retriever_loop.retriever_inputs(h, None, model.cfg)
    whole = retriever_loop.valid_metrics(model, x)
    barrier, box, out = threading.Barrier(2), [[], []], [None, None]

    def worker(rank):
        def mean(v):  # an all-reduce average over the two workers
            box[rank].append(v)
            barrier.wait()
            r = (box[0][-1] + box[1][-1]) / 2
            barrier.wait()
            return r
        out[rank] = retriever_loop.valid_metrics(model, x, rank, 2, mean)

    threads = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert out[0] == out[1]
    assert out[0]["n"] == whole["n"] == 61
    assert all(out[0][k] == pytest.approx(whole[k], abs=1e-9) for k in whole)
    assert len(retriever_loop.retriever_ranks(model, None, h, "valid", shard=(1, 2))) == 30


@pytest.mark.parametrize("sampled_above,loss", [(200_000, "softmax"), (N_ITEMS - 1, "sampled")])
def test_loss_auto_is_softmax_up_to_the_threshold_and_trains_a_step_either_way(tmp_path, sampled_above, loss):
    """loss=auto (the default) becomes a concrete loss once the catalog size is known, and the
    bundle records that one: serving, evaluation and warm starts never see "auto"."""
    from dataclasses import asdict, replace

    from components import bundle, layout

    h = _histories()
    assert RCFG.loss == "auto"
    model = retriever_loop.new_retriever(h, None, replace(RCFG, sampled_above=sampled_above), seed=0)
    assert model.cfg.loss == loss and model.cfg.num_items == N_ITEMS
    x = retriever_loop.retriever_inputs(h, None, model.cfg)
    batch = next(retriever_loop.batches(x.windows, 16, np.random.default_rng(0)))
    stepper = LocalStepper(model, 1e-2, 0.0)
    before = {k: v.clone() for k, v in model.named_parameters()}
    stepper.train()
    loss_value = stepper(batch, x.text_emb, x.log_q)
    assert torch.isfinite(loss_value)
    stepper.step(loss_value)
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters())
    bundle.save_weights(tmp_path, layout.RETRIEVER, model.state_dict(), model.cfg)
    assert bundle.load_weights(tmp_path, layout.RETRIEVER)[1]["loss"] == loss
    assert bundle.load_retriever(tmp_path).cfg.loss == loss
    old = {k: v for k, v in asdict(model.cfg).items() if k != "sampled_above"}  # a bundle from before the setting
    assert SequenceRetriever(RetrieverConfig(**old)).cfg.loss == loss
