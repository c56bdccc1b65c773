"""How big an ``llm/`` bundle part is, full fine-tune vs LoRA adapter (peft), for the default
encoder (all-MiniLM-L6-v2, real weights) and a 0.5B decoder (Qwen2.5-0.5B's shapes, random
weights: the hub is not reachable here, and the size depends only on the shapes).

    python -m benchmarks.bundle_size [--rank 16] [--skip-decoder]

Writes ``results/bundle_size.json``: bytes of the part as the project saves it (weights file) and
of peft's own adapter file, per model and setting.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from components import bundle, layout
from components.models.text_encoder import TextEncoder, TextEncoderConfig

ROOT = Path(__file__).resolve().parents[1]
# Qwen2.5-0.5B's published config (its config.json), for a random-weight model of the same shape.
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  tie_word_embeddings=True)


def _decoder_dir(tmp: Path) -> str:
    from transformers import AutoTokenizer, Qwen2Config

    from components.models.text_encoder import default_model_path

    path = tmp / "qwen2.5-0.5b-shape"
    Qwen2Config(**QWEN25_05B).save_pretrained(path)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(path)  # any tokenizer: size only
    return str(path)


def measure(name: str, cfg: TextEncoderConfig, tmp: Path) -> dict:
    t0 = time.perf_counter()
    enc = TextEncoder(cfg)
    folder = tmp / name.replace(" ", "_")
    state = enc.export_state()
    bundle.save_weights(folder, layout.LLM, state, cfg)
    bundle.add_hf_files(folder / layout.LLM) if cfg.lora_r > 0 else None
    part = folder / layout.LLM
    out = {"model": name, "lora_r": cfg.lora_r, "dtype": cfg.dtype,
           "parameters": int(sum(p.numel() for p in enc.parameters())),
           "saved_tensors": int(sum(v.numel() for v in state.values())),
           "weights_bytes": (part / layout.WEIGHTS).stat().st_size,
           "part_bytes": sum(p.stat().st_size for p in part.rglob("*") if p.is_file()), "build_s": 0.0}
    if cfg.lora_r > 0:
        out["peft_adapter_bytes"] = (part / bundle.HF / "adapter_model.safetensors").stat().st_size
    out["build_s"] = round(time.perf_counter() - t0, 1)
    print(f"{name:<34} r={cfg.lora_r:<3} {cfg.dtype:<9} weights {out['weights_bytes'] / 2**20:9.1f} MiB"
          f"  part {out['part_bytes'] / 2**20:9.1f} MiB", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (the gpu-cluster preset's)")
    ap.add_argument("--skip-decoder", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bundle-size-") as t:
        tmp = Path(t)
        rows.append(measure("all-MiniLM-L6-v2 full", TextEncoderConfig(), tmp))
        rows.append(measure("all-MiniLM-L6-v2 LoRA", TextEncoderConfig(lora_r=args.rank), tmp))
        if not args.skip_decoder:
            path = _decoder_dir(tmp)
            for dtype in ("float32", "bfloat16"):
                rows.append(measure(f"Qwen2.5-0.5B shape full {dtype}",
                                    TextEncoderConfig(model=path, pooling="last", random_init=True, dtype=dtype), tmp))
            rows.append(measure("Qwen2.5-0.5B shape LoRA", TextEncoderConfig(
                model=path, pooling="last", random_init=True, lora_r=args.rank, dtype="bfloat16"), tmp))
    out = {"benchmark": "bundle_size", "rows": rows, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = ROOT / "results" / "bundle_size.json"
    path.write_text(json.dumps(out, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
