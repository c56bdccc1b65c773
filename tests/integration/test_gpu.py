"""GPU checks: run only where CUDA is present (the device machines), skipped elsewhere."""

import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_zero3_bf16_decoder_finetune_runs(tmp_path):
    p = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--steps", "3", "--warmup", "1",
                        "--batch", "4", "--seq", "64"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**__import__("os").environ, "OUT": str(tmp_path)})
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "gpu_check.json").is_file()
