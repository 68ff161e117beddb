"""bench/gpu.py --dry-run runs the GPU benchmark's code paths on the tiny twins on the CPU, so it cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _dry_run(*args: str, timeout: int) -> str:
    """The output of bench/gpu.py --dry-run ``args`` on the CPU, offline; it must exit 0."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    return done.stdout


@pytest.mark.extended
def test_gpu_bench_dry_run_prints_the_table():
    out = _dry_run("--peak-tflops", "1", timeout=600)
    assert out.startswith("device: cpu") and "DRY RUN" in out
    # Encoder contenders, each with a rate; the PromptEncoder modes with their cosine to fp32 ST encode.
    for name in (
        "SentenceTransformer.encode fp32",
        "PromptEncoder float32",
        "PromptEncoder float16",
        "PromptEncoder bfloat16",
        "tokenizer alone",
    ):
        line = next((line for line in out.splitlines() if line.startswith(name)), None)
        assert line is not None and "failed" not in line, (name, out)
        assert re.search(r"\s\d+\s+\d+\.\d+x", line), line
    fp32 = next(line for line in out.splitlines() if line.startswith("PromptEncoder float32"))
    assert float(fp32.split()[4]) >= 0.9999, fp32
    # One training row per backbone with images/s, data wait, FLOPs and MFU (peak given on the command line).
    for backbone in ("vit", "swin", "clip", "unet"):
        row = next((line for line in out.splitlines() if line.startswith(f"{backbone} ") and " tiny " in line), None)
        assert row is not None, (backbone, out)
        fields = row.split()
        assert float(fields[5]) > 0 and fields[6].endswith("%") and fields[7] == "-", row  # no GPU memory on CPU
        assert float(fields[8]) > 0 and fields[9].endswith("%"), row
        assert re.search(rf"^{backbone}\s+\d+\.\d+ h$", out, re.MULTILINE), out
    assert "GPU-hours" in out and re.search(r"^total\s+\d+\.\d+ h$", out, re.MULTILINE)


def test_gpu_bench_says_when_the_sbert_model_is_missing():
    """Without the SBERT model (a machine that lacks the package, --sbert-model not a directory) section 1 is
    skipped and the output says so, rather than failing the whole run or printing target figures."""
    out = _dry_run("--skip-training", "--sbert-model", str(ROOT / "no-such-model-directory"), timeout=300)
    assert "SBERT targets: SKIPPED (--sbert-model" in out and "is no directory" in out, out
    assert "PromptEncoder" not in out and re.search(r"^targets\s+-\s+\(SBERT targets not measured", out, re.M), out
