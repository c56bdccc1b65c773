"""Models with tiny configs: shapes, masking, and that training changes parameters and lowers loss."""

import numpy as np
import pytest
import torch

from components.models.ranker import NUM_CONTEXT, RankerConfig, RankerMLP, listwise_loss
from components.models.retriever import RetrieverConfig, SequenceRetriever, gap_buckets
from components.models.text_encoder import TextEncoder, TextEncoderConfig, contrastive_loss, item_text


@pytest.fixture(scope="module")
def tiny_encoder():
    """A random-init 2-layer BERT with the bundled tokenizer (no weights loaded)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from components.models.text_encoder import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)
    return lambda pooling="mean": TextEncoder(TextEncoderConfig(pooling=pooling, max_length=32), model, tok)


def test_text_encoder_pooling_and_padding(tiny_encoder):
    for pooling in ("mean", "cls", "last"):
        enc = tiny_encoder(pooling)
        alone = enc.encode(["a red tent"])
        padded = enc.encode(["a red tent", "a much longer sentence about cooking pasta with garlic"])
        assert alone.shape == (1, 32)
        assert torch.allclose(alone[0], padded[0], atol=1e-5)  # padding never leaks into a text's vector
        assert torch.allclose(padded.norm(dim=1), torch.ones(2), atol=1e-5)


def test_contrastive_finetuning_moves_pairs_together(tiny_encoder):
    enc = tiny_encoder()
    enc.train()
    a = ["tent for hiking", "jazz vinyl record", "chef knife", "yoga mat"]
    b = ["sleeping bag for camping", "saxophone album", "cast iron skillet", "kettlebell workout"]
    before = {k: v.clone() for k, v in enc.named_parameters()}
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        tok = enc.tokenize(a + b)
        emb = enc(tok["input_ids"], tok["attention_mask"])
        loss = contrastive_loss(emb[:4], emb[4:], 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5
    assert any(not torch.equal(before[k], v) for k, v in enc.named_parameters())


def test_item_text():
    assert item_text("Tent", "Light. ", ["Outdoors"]) == "Tent Categories: Outdoors. Light."
    assert item_text("", "", []) == "(no text)"


def _toy_batch(num_items=20, B=8, L=6, seed=0):
    """Next item = (current + 1) mod num_items: learnable from the sequence."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(1, num_items + 1, (B, 1), generator=g)
    seq = (start - 1 + torch.arange(L + 1)) % num_items + 1
    return {"items": seq[:, :-1], "events": torch.ones(B, L, dtype=torch.long),
            "gaps": torch.zeros(B, L, dtype=torch.long), "targets": seq[:, 1:]}


@pytest.mark.parametrize("use_id,use_text", [(True, False), (False, True), (True, True)])
def test_retriever_learns_and_changes_params(use_id, use_text):
    torch.manual_seed(0)
    cfg = RetrieverConfig(num_items=20, text_dim=8 if use_text else 0, use_id=use_id, use_text=use_text, dim=16,
                          layers=1, heads=2, max_len=6, dropout=0.0)
    model = SequenceRetriever(cfg)
    text = torch.randn(21, 8) if use_text else None
    before = {k: v.clone() for k, v in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for step in range(80):
        loss = model(_toy_batch(seed=step), text)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first * 0.5
    changed = [k for k, v in model.named_parameters() if not torch.equal(before[k], v)]
    assert changed
    if use_id:
        assert any(k.startswith("id_emb") for k in changed)


def test_retriever_is_causal_and_padding_is_inert():
    torch.manual_seed(0)
    model = SequenceRetriever(RetrieverConfig(num_items=20, use_text=False, dim=16, layers=2, heads=2, max_len=6))
    model.eval()
    b = _toy_batch()
    h1 = model.encode(b["items"], b["events"], b["gaps"])
    items2 = b["items"].clone()
    items2[:, -1] = 3  # change only the last event
    h2 = model.encode(items2, b["events"], b["gaps"])
    assert torch.allclose(h1[:, :-1], h2[:, :-1], atol=1e-5)  # earlier positions cannot see it
    assert not torch.allclose(h1[:, -1], h2[:, -1])
    assert torch.all(model.item_vectors(None, torch.tensor([0])) == 0)


def test_sampled_softmax_and_item_mask():
    torch.manual_seed(0)
    cfg = RetrieverConfig(num_items=20, use_text=False, dim=16, layers=1, heads=2, max_len=6, loss="sampled",
                          num_negatives=10)
    model = SequenceRetriever(cfg)
    log_q = torch.log(torch.full((21,), 1 / 20.0))
    assert torch.isfinite(model(_toy_batch(), None, log_q))
    with pytest.raises(ValueError, match="log_q"):
        model(_toy_batch(), None, None)
    full = SequenceRetriever(RetrieverConfig(num_items=20, use_text=False, dim=16, layers=1, heads=2, max_len=6))
    mask = torch.ones(20, dtype=torch.bool)
    mask[15:] = False  # items 16..20 did not exist yet
    b = _toy_batch()
    b["targets"] = b["targets"].clamp(max=15)
    assert full(b, None, None, mask) < full(b, None, None, None)  # fewer competitors


def test_logits_are_scaled_by_temperature_default_sqrt_dim():
    torch.manual_seed(0)
    kw = dict(num_items=20, use_text=False, dim=16, layers=1, heads=2, max_len=6, dropout=0.0)
    auto = SequenceRetriever(RetrieverConfig(**kw))
    assert auto.logit_scale == pytest.approx(1 / 4.0)
    explicit = SequenceRetriever(RetrieverConfig(**kw, temperature=2.0))
    explicit.load_state_dict(auto.state_dict())
    auto.eval(), explicit.eval()
    b = _toy_batch()
    h = auto.encode(b["items"], b["events"], b["gaps"])[b["targets"] > 0]
    table = auto.item_vectors(None)[1:]
    for model, scale in ((auto, 0.25), (explicit, 0.5)):
        expected = torch.nn.functional.cross_entropy(h @ table.T * scale, b["targets"][b["targets"] > 0] - 1)
        assert model(b, None).item() == pytest.approx(expected.item(), rel=1e-5)


def test_sampled_softmax_corrects_scaled_logits_by_log_q():
    """The loss is softmax(s / T - log q) over the positive and the same sampled negatives,
    computed here by hand (the correction must not be divided by T)."""
    torch.manual_seed(0)
    cfg = RetrieverConfig(num_items=5, use_text=False, dim=16, layers=1, heads=2, max_len=6, dropout=0.0,
                          loss="sampled", num_negatives=3, temperature=2.0)
    model = SequenceRetriever(cfg).eval()
    log_q = torch.log(torch.tensor([0.0, 0.1, 0.2, 0.3, 0.2, 0.2]))
    b = _toy_batch(num_items=5, B=2, L=3)
    torch.manual_seed(1)
    loss = model(b, None, log_q)
    torch.manual_seed(1)
    neg = torch.multinomial(log_q[1:].exp(), 3, replacement=True) + 1
    h = model.encode(b["items"], b["events"], b["gaps"])[b["targets"] > 0]
    t = b["targets"][b["targets"] > 0]
    pos = (h * model.item_vectors(None, t)).sum(-1, keepdim=True) / 2.0 - log_q[t].unsqueeze(-1)
    negl = (h @ model.item_vectors(None, neg).T) / 2.0 - log_q[neg][None]
    negl = negl.masked_fill(neg[None] == t[:, None], float("-inf"))
    expected = torch.nn.functional.cross_entropy(torch.cat([pos, negl], 1), torch.zeros(len(t), dtype=torch.long))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_one_cycle_schedule_warms_up_then_decays():
    from components.training.retriever import RetrieverTrainConfig, lr_schedule, steps_per_epoch

    windows = {"items": np.zeros((100, 4))}
    assert steps_per_epoch(windows, 32) == 4 and steps_per_epoch(windows, 32, world=2) == 2
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lr_schedule(opt, RetrieverTrainConfig(lr=0.01, warmup=0.1, schedule="onecycle"), 100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    peak = int(np.argmax(lrs))
    assert 5 <= peak <= 15 and lrs[peak] == pytest.approx(0.01)
    assert lrs[0] < 0.002 and lrs[-1] < 1e-4 and all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    assert lr_schedule(opt, RetrieverTrainConfig(schedule="constant"), 100) is None
    with pytest.raises(ValueError, match="schedule"):
        lr_schedule(opt, RetrieverTrainConfig(schedule="linear"), 100)


def test_untrained_ranker_keeps_the_retrieval_order():
    torch.manual_seed(0)
    model = RankerMLP(RankerConfig(dim=8, candidates=5)).eval()
    ctx = torch.zeros(3, 5, NUM_CONTEXT)
    ctx[..., 0] = torch.randn(3, 5)
    ctx[..., 2:] = torch.rand(3, 5, NUM_CONTEXT - 2)  # other features must not move it yet
    s = model(torch.randn(3, 8), torch.randn(3, 5, 8), ctx)
    assert torch.equal(torch.argsort(s, 1), torch.argsort(ctx[..., 0], 1))


def test_gap_buckets():
    assert gap_buckets(np.array([0, 1000, 1000, 3_601_000])).tolist() == [0, 1, 0, 11]


def test_ranker_learns_to_pick_the_feature_marked_item():
    torch.manual_seed(0)
    cfg = RankerConfig(dim=8, hidden=32, dropout=0.0)
    model = RankerMLP(cfg)
    B, C = 32, 10
    pos = torch.randint(0, C, (B,))
    ctx = torch.zeros(B, C, NUM_CONTEXT)
    ctx[torch.arange(B), pos, 4] = 1.0  # category overlap marks the positive
    u, i = torch.randn(B, 8), torch.randn(B, C, 8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = listwise_loss(model(u, i, ctx), pos)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (model(u, i, ctx).argmax(1) == pos).float().mean() > 0.95


def test_lora_trains_only_adapters(tiny_encoder):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from components.models.text_encoder import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    base = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)
    enc = TextEncoder(TextEncoderConfig(lora_r=4, max_length=16), base, tok)
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen_before = {n: p.clone() for n, p in enc.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=1e-2)
    tok_in = enc.tokenize(["a", "b c", "d e f", "g"])
    emb = enc(tok_in["input_ids"], tok_in["attention_mask"])
    contrastive_loss(emb[:2], emb[2:]).backward()
    opt.step()
    assert all(torch.equal(frozen_before[n], p) for n, p in enc.named_parameters() if not p.requires_grad)


def test_user_vector_does_not_depend_on_batch_padding():
    """Issue 14.1: a user's vector is the same alone and in any left-padded batch."""
    torch.manual_seed(0)
    model = SequenceRetriever(RetrieverConfig(num_items=30, use_text=False, dim=16, heads=2, max_len=12)).eval()
    short = torch.tensor([[3, 7, 9]])
    ev = torch.ones_like(short)
    gaps = torch.zeros_like(short)
    alone = model.user_vector(short, ev, gaps)
    for pad in (1, 5, 9):
        batch = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1),
                           torch.randint(1, 30, (1, 3 + pad))])
        v = model.user_vector(batch, (batch > 0).long(), torch.zeros_like(batch))
        assert torch.allclose(v[0], alone[0], atol=1e-5), pad


def test_budget_is_derived_from_the_data_size():
    from components.training.retriever import RetrieverTrainConfig, plan_budget

    small = {"items": np.zeros((450, 5)), "targets": np.ones((450, 5))}
    b = plan_budget(RetrieverTrainConfig(batch_size=64, min_steps_per_epoch=16, epochs=300, max_tokens=10**6), small, 2)
    assert b.batch_size == 15 and b.steps_per_epoch >= 15 and b.epochs == 300  # tiny data: many small steps
    big = {"items": np.zeros((4000, 200)), "targets": np.ones((4000, 200))}
    b = plan_budget(RetrieverTrainConfig(batch_size=32, epochs=300, max_tokens=4_000_000), big, 2)
    assert b.batch_size == 32 and b.epochs == 5 and b.tokens_per_epoch == 800_000  # token budget caps epochs


def test_ranker_holdout_rows_are_a_fixed_share_the_trainer_and_the_evaluation_agree_on():
    from components.models.ranker import holdout_rows

    rows = np.arange(5000)
    held = holdout_rows(rows, 0.2)
    assert 0.17 < len(held) / len(rows) < 0.23
    assert np.array_equal(held, holdout_rows(rows, 0.2))  # no randomness: same rows every call
    kept = rows[rows % 3 != 0]  # the trainer passes only rows whose target is a candidate
    assert set(holdout_rows(kept, 0.2)) == set(held) & set(kept)


def test_text_whitening_decorrelates_the_catalog_and_travels_with_the_weights():
    torch.manual_seed(0)
    # anisotropic "sentence embeddings": a shared offset and a few dominant directions
    text = torch.randn(200, 16) @ torch.diag(torch.tensor([8.0, 4.0] + [0.5] * 14)) + 3.0
    cfg = RetrieverConfig(num_items=200, text_dim=16, text_whiten=True, dim=8)
    model = SequenceRetriever(cfg)
    z0 = model.text_vectors(text)  # before fitting: identity whitening
    model.fit_text_whitening(text)
    white = (text - model.text_mean) @ model.text_white
    assert white.mean(0).abs().max() < 1e-4
    before, after = torch.linalg.eigvalsh(torch.cov(text.T)), torch.linalg.eigvalsh(torch.cov(white.T))
    assert before.max() / before.min() > 100
    assert after.max() <= 1.0 + 1e-4 and after.min() > 0.5  # isotropic (shrinkage keeps it just below 1)
    assert not torch.allclose(model.text_vectors(text), z0)
    # saved and loaded with the state dict, so serving (and new items) use the same transform
    other = SequenceRetriever(cfg)
    other.load_state_dict(model.state_dict())
    table = torch.cat([torch.zeros(1, 16), text])
    assert torch.allclose(other.item_vectors(table), model.item_vectors(table))
    plain = SequenceRetriever(RetrieverConfig(num_items=200, text_dim=16, dim=8))
    assert "text_white" not in plain.state_dict()


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny random BERT saved the Hugging Face way (a local 'base model' path)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from components.models.text_encoder import default_model_path

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64), add_pooling_layer=False).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_a_lora_bundle_keeps_the_adapter_only_loads_strictly_and_is_peft_native(tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    from components import bundle, layout
    from components import checkpoints as ck

    cfg = TextEncoderConfig(model=tiny_base, lora_r=4, max_length=16)
    enc = TextEncoder(cfg)
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=5e-2)
    tok = enc.tokenize(["red shoes", "blue shoes", "a novel", "a poem"])
    contrastive_loss(*enc(tok["input_ids"], tok["attention_mask"]).split(2)).backward()
    opt.step()
    kept = enc.export_state()
    assert kept and all("lora_" in k for k in kept)
    full = sum(v.numel() for v in enc.state_dict().values())
    assert sum(v.numel() for v in kept.values()) < 0.1 * full
    folder = tmp_path / "bundle"
    bundle.save_weights(folder, layout.LLM, kept, cfg)
    bundle.add_hf_files(folder / layout.LLM)
    ck.verify_local(folder / layout.LLM)  # the manifest covers the Hugging Face files too
    texts = ["red shoes", "a poem about shoes"]
    loaded = bundle.load_text_encoder(folder)
    assert torch.allclose(loaded.encode(texts), enc.encode(texts), atol=1e-5)
    # the Hugging Face way: base model + peft adapter from <part>/hf
    hf = folder / layout.LLM / bundle.HF
    assert (hf / "adapter_config.json").is_file() and (hf / "tokenizer.json").is_file()
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_base), str(hf)).eval()
    enc.eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(**tok).last_hidden_state, enc.model(**tok).last_hidden_state, atol=1e-5)
    # strict: an adapter of another rank is refused with a message, not half-loaded
    with pytest.raises(ValueError, match="does not fit"):
        TextEncoder(TextEncoderConfig(model=tiny_base, lora_r=2, max_length=16)).load_exported(kept)


def test_text_encoder_honours_the_dtype(tiny_base):
    enc = TextEncoder(TextEncoderConfig(model=tiny_base, dtype="bfloat16", max_length=16))
    assert {p.dtype for p in enc.parameters()} == {torch.bfloat16}
    assert enc.encode(["a", "b"]).dtype == torch.float32
    with pytest.raises(ValueError, match="text.dtype"):
        TextEncoder(TextEncoderConfig(model=tiny_base, dtype="int3"))


def test_text_model_from_s3_is_fetched_through_storage_and_cached(tiny_base, s3_bucket, tmp_path, monkeypatch):
    """text.model=s3://... (a real S3-compatible server on loopback): the same encoder as the local folder."""
    from components.storage import Storage

    Storage(f"{s3_bucket}/models").upload_dir(tiny_base, "tiny-bert")
    monkeypatch.setenv("LLMREC_MODEL_CACHE", str(tmp_path / "cache"))
    remote = TextEncoder(TextEncoderConfig(model=f"{s3_bucket}/models/tiny-bert", max_length=16))
    local = TextEncoder(TextEncoderConfig(model=tiny_base, max_length=16))
    assert torch.allclose(remote.encode(["red shoes"]), local.encode(["red shoes"]), atol=1e-6)
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_the_llm_loop_steps_exports_and_reports_its_cost(tiny_encoder):
    """components.training.llm over the in-process stepper: every step reported, the last one
    with the mean loss, tokens a second and cores busy (what the Ray Train stage logs), and the
    exported state."""
    from components.training.llm import train_llm
    from components.training.stepper import LocalStepper

    enc = tiny_encoder()
    texts = [f"item {k} about {'tents' if k % 2 else 'pasta'} number {k}" for k in range(20)]
    pairs = (np.arange(19), np.arange(1, 20))
    seen = []
    progress = train_llm(LocalStepper(enc, 1e-3, 0.0), enc, texts, pairs, steps=3, batch_size=4, temperature=0.1,
                         after_step=lambda metrics, progress, last: seen.append((metrics, last)))
    assert [m["step"] for m, _ in seen] == [0, 1, 2] and [last for _, last in seen] == [False, False, True]
    final = seen[-1][0]
    assert final["tokens_per_s_per_worker"] > 0 and 0 < final["cpu_busy_per_worker"] <= torch.get_num_threads() + 0.5
    assert progress["epoch"] == 2 and progress["_best_state"]


def test_inference_dtype_follows_the_setting_and_the_hardware(monkeypatch):
    from components.models import text_encoder as te

    assert te.inference_dtype("fp32") == torch.float32 and te.inference_dtype("bf16") == torch.bfloat16
    monkeypatch.setattr(te, "native_bf16", lambda device="cpu": False)
    assert te.inference_dtype("auto") == torch.float32
    monkeypatch.setattr(te, "native_bf16", lambda device="cpu": True)
    assert te.inference_dtype("auto") == torch.bfloat16
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        te.inference_dtype("fp16")


def test_the_catalog_pass_in_bf16_gives_float32_vectors_next_to_fp32s():
    """The real default encoder (all-MiniLM-L6-v2): the Ray Data actor's bf16 weights move each
    item's vector by less than 0.001 of cosine, and the stored vectors stay float32."""
    import pyarrow as pa

    from components.config import load_config, to_dict
    from jobs.embed_items import ItemEmbedder

    items = pa.table({"item_idx": [0, 1, 2, 3], "item_id": ["a", "b", "c", "d"],
                      "title": ["Ultralight tent", "Cast iron skillet", "Bebop anthology", "Yoga mat"],
                      "text": ["A waterproof tent for alpine nights.", "Seasoned, for searing steaks.",
                               "Recorded live in a smoky club.", "Non-slip, for daily workouts."],
                      "categories": [["Hiking"], ["Cooking"], ["Jazz Music"], ["Fitness"]]})
    text_cfg = to_dict(load_config([]).text)
    fp32, bf16 = ItemEmbedder(text_cfg, precision="fp32"), ItemEmbedder(text_cfg, precision="bf16")
    assert {p.dtype for p in bf16.encoder.parameters()} == {torch.bfloat16}
    a, b = (torch.as_tensor(np.stack(e(items)["embedding"].to_numpy(zero_copy_only=False))) for e in (fp32, bf16))
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (4, 384)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.999
    assert not torch.equal(a, b)  # it did run in bf16


def test_embed_precision_is_checked_by_the_config():
    from components.config import ConfigError, load_config

    assert load_config([]).embed.precision == "fp32"
    assert load_config(["embed.precision=auto"]).embed.precision == "auto"
    with pytest.raises(ConfigError, match="embed.precision"):
        load_config(["embed.precision=int8"])
