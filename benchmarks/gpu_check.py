"""GPU readiness check: a short DeepSpeed ZeRO-3 bf16 fine-tune of a 0.5B-class decoder on one GPU.

    python -m benchmarks.gpu_check [--steps 30] [--batch 16] [--seq 256]

No model hub is reachable on the device machines, so the model is random-init from a
Qwen2-0.5B-shaped config (throughput does not depend on the weights). Prints samples/s,
tokens/s, model FLOPs utilisation (MFU, against the card's bf16 dense peak) and peak memory, and
writes results/gpu_check.json. Exits early with a message on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

import torch

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check runs on a GPU machine only")
    import deepspeed
    import torch.distributed as dist
    from transformers import Qwen2Config, Qwen2Model

    from components.models.text_encoder import contrastive_loss

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl", rank=0, world_size=1)
    cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936, max_position_embeddings=args.seq)
    model = Qwen2Model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    ds_cfg = {"train_micro_batch_size_per_gpu": 2 * args.batch, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 3}, "gradient_clipping": 1.0, "steps_per_print": 10**9,
              "zero_allow_untested_optimizer": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    dev = engine.device
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, cfg.vocab_size, (2 * args.batch, args.seq), device=dev)
        mask = torch.ones_like(ids)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        h = engine(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1].float()
        h = torch.nn.functional.normalize(h, dim=-1)
        loss = contrastive_loss(h[:args.batch], h[args.batch:])
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = sum(times) / len(times)
    samples_s = 2 * args.batch / step_s
    tokens_s = samples_s * args.seq
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    achieved = 6 * n_params * tokens_s / 1e12  # forward + backward dense FLOPs per token
    result = {"device": name, "params": n_params, "zero_stage": 3, "precision": "bf16", "batch": 2 * args.batch,
              "seq": args.seq, "step_s": round(step_s, 4), "samples_per_s": round(samples_s, 1),
              "tokens_per_s": round(tokens_s), "achieved_tflops": round(achieved, 1),
              "mfu": round(achieved / peak, 3) if peak else None,
              "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2), "final_loss": float(loss)}
    print(json.dumps(result, indent=2))
    out = Path(os.environ.get("OUT", Path(__file__).resolve().parents[1] / "results")) / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
