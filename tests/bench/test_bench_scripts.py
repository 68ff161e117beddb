"""Every CPU benchmark in bench/ runs end to end on tiny sizes, so none of them can rot unnoticed.

The figures are not checked (tiny sizes say nothing about speed); each script must exit 0 and print its
table, and where a bench asserts a property (identical kept rows, predictions equal to the dense textbook's,
no good record lost) that property must hold.  bench/gpu.py has its own dry run (test_bench_gpu.py);
bench/scale.py runs with --quick.  The benches that time whole `materialize` commands against each other or an
earlier commit (materialize, ingest, backfill) take many minutes at any size and run in `make bench` only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_tiny_predict_home

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.extended


def run_bench(
    script: str, *args: str, env: dict[str, str] | None = None, timeout: int = 600, exit_status: int = 0
) -> subprocess.CompletedProcess:
    """bench/``script`` with ``args``, offline on the CPU, no REVERSE_SD_* setting or HF_TOKEN of the calling shell
    leaking in, then ``env`` on top; it must exit with ``exit_status``.  Returns the finished process (text)."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith("REVERSE_SD_") and k != "HF_TOKEN"}
    env = {**kept, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    command = [sys.executable, str(ROOT / "bench" / script), *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == exit_status, done.stderr[-3000:] + done.stdout[-3000:]
    return done


def test_filter_bench_keeps_the_same_rows_as_pandas():
    out = run_bench("filter.py", "--n", "20000", "--repeat", "1").stdout
    rows = [line for line in out.splitlines() if line.startswith(("polars", "pandas-str", "pandas-object"))]
    assert len(rows) == 3 and all(row.split()[-1] == "True" for row in rows), out


def test_kmeans_bench_compares_with_scikit_learn():
    out = run_bench("kmeans.py", "--n", "3000", "--k", "50", "--sub-n", "2000", "--sub-k", "20", "--skip-full").stdout
    assert "faiss spherical (ours" in out and "sklearn KMeans" in out and "sklearn MiniBatchKMeans" in out, out


def test_dakl_bench_matches_the_dense_textbook():
    out = run_bench("dakl.py", "--n", "200", "--m", "600", "--skip-paper").stdout
    assert "DAKLRegressor fit+predict" in out and "must be >= 0.9999) OK" in out, out


def test_image_store_bench_reads_both_contenders():
    out = run_bench("image_store.py", "--n", "500", "--parts", "2").stdout
    assert "mapped file (cached)" in out and "private memory per process after a pass" in out, out


def test_embed_bench_times_the_encoder_and_the_incremental_cache():
    out = run_bench("embed.py", "--n", "200", "--rounds", "1").stdout
    assert "PromptEncoder" in out and "cached rows identical: True" in out, out


def test_predict_bench_batched_agrees_with_one_by_one(tmp_path):
    home = write_tiny_predict_home(tmp_path / "home")
    out = run_bench(
        "predict.py", "--n", "20", "--batch-size", "8", "--model", "vit", env={"REVERSE_SD_HOME": str(home)}
    ).stdout
    assert "batching speed-up" in out, out
    cosine = float(out.rsplit("min row cosine batched vs single", 1)[1].split()[0])
    assert cosine > 0.999, out


def test_predict_bench_without_artifacts_names_what_to_run(tmp_path):
    done = run_bench("predict.py", "--n", "4", env={"REVERSE_SD_HOME": str(tmp_path / "empty")}, exit_status=1)
    assert "Traceback" not in done.stderr and "make run" in done.stderr, done.stderr


def test_bad_inputs_bench_loses_nothing_and_crashes_never():
    out = run_bench("bad_inputs.py", timeout=900).stdout
    assert "crashes (exceptions other than CorruptArchiveError): 0 (goal 0); unexpected outcomes: 0" in out, out
    assert "files written outside the storage root: 0 (goal 0)" in out and "good records lost: 0 of" in out, out


def test_scale_bench_measures_and_projects():
    out = run_bench("scale.py", "--quick", timeout=900).stdout
    assert "| ingest, 1 core " in out and "| event writes, SQLite " in out, out
    assert "| DiffusionDB 2M " in out and "| DiffusionDB 14M " in out and "whole run" in out, out


def test_pixel_cache_bench_checks_the_cached_pixels_equal_the_decoded_ones():
    out = run_bench("pixel_cache.py", "--n", "40", "--workers", "1", "--sizes", "32").stdout
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["32"]]
    assert len(rows) == 2 and all(row[-4].endswith("x") for row in rows), out  # bench asserts equal pixels itself
