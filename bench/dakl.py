"""Benchmark: DAKLRegressor (blocked, shifted float32 features) vs the dense textbook implementation.

    .venv/bin/python bench/dakl.py [--n 2000] [--m 6000] [--paper-n 10000] [--paper-m 30000] [--skip-paper]

Each contender runs in its own subprocess so that its peak resident memory (ru_maxrss) is its own.
Data: unit-norm 384-d "ensemble predictions" with cluster structure for centroids (n) and the target
split (m), labels = a noisy linear map of them, renormalised (384-d, like SBERT embeddings).
Part 1, at a size both fit (default n = 2,000 centroids + m = 6,000 targets, the paper's gamma = 0.001):
  dense  the textbook: the full (n+m) x (n+m) cosine kernel, phi of it, the full (n+m)^2 Gram
         phi phi^T, all float64 numpy, then solve and predict the target rows;
  dakl   DAKLRegressor().fit(X, Y, X_target).predict(X_target).
Prints both times, the speed-up (goal >= 5x), peak RSS of each, and the smallest row cosine between the
two predictions (must be >= 0.9999; the script exits non-zero otherwise).
Part 2: the paper's scale (10,000 centroids + 30,000 targets) for DAKL alone: fit and predict time, peak RSS
(goal: minutes on 2 cores, < 8 GB). Timings on a shared machine are noisy.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from options import INTERNAL, add_options, bench_parser  # noqa: E402


def make_data(n: int, m: int, d: int = 384, p: int = 384, seed: int = 0):
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((200, d)).astype(np.float32)

    def points(k):
        x = topics[rng.integers(200, size=k)] + 1.5 * rng.standard_normal((k, d), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    X, X_target = points(n), points(m)
    Y = X @ (rng.standard_normal((d, p), dtype=np.float32) / np.sqrt(d)) + 0.3 / np.sqrt(p) * rng.standard_normal(
        (n, p), dtype=np.float32
    )
    return X, (Y / np.linalg.norm(Y, axis=1, keepdims=True)).astype(np.float32), X_target


def dense_textbook(X, Y, X_target, gamma, alpha):
    """The formula as written, materialising the full (n+m) x (n+m) kernel and Gram, float64."""
    import scipy.linalg

    n = len(X)
    U = np.vstack([X, X_target]).astype(np.float64)
    K = U @ U.T
    diag = np.sqrt(np.diag(K))
    K /= np.outer(diag, diag)  # normalised linear kernel K^
    Phi = np.exp(-gamma * (1.0 - K))  # one feature per element of U, for every element of U
    del K
    Gram = Phi @ Phi.T  # linear kernel on phi, (n+m) x (n+m)
    A = scipy.linalg.solve(Gram[:n, :n] + alpha * np.eye(n), Y.astype(np.float64), assume_a="pos")
    return Gram[n:, :n] @ A


def child(args) -> None:
    """One contender in this process: prints a JSON line with times and peak RSS, saves predictions."""
    import scipy.linalg  # noqa: F401  (imports outside the timed region)

    from pipeline.ensemble.dakl import DAKLRegressor

    X, Y, X_target = make_data(args.n, args.m)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if args.child == "dense":
        pred = dense_textbook(X, Y, X_target, args.gamma, args.alpha)
        t_fit = time.perf_counter() - t0
        t_pred = 0.0
    else:
        dtype = "float64" if args.child == "dakl64" else "float32"
        model = DAKLRegressor(gamma=args.gamma, alpha=args.alpha, dtype=dtype).fit(X, Y, X_target)
        t_fit = time.perf_counter() - t0
        t1 = time.perf_counter()
        pred = model.predict(X_target)
        t_pred = time.perf_counter() - t1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if args.out:
        np.save(args.out, pred)
    print(
        json.dumps(
            {
                "fit_s": t_fit,
                "predict_s": t_pred,
                "total_s": t_fit + t_pred,
                "peak_rss_gb": peak / 2**20,
                "data_rss_gb": rss0 / 2**20,
            }
        )
    )


def run_child(kind: str, n: int, m: int, args, out: str | None) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--n",
        str(n),
        "--m",
        str(m),
        "--gamma",
        str(args.gamma),
        "--alpha",
        str(args.alpha),
    ] + (["--out", out] if out else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if res.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def row_cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main() -> None:
    ap = bench_parser(__doc__)
    add_options(
        ap,
        n=(2000, "centroids of the comparison with the dense textbook"),
        m=(6000, "target rows of the comparison with the dense textbook"),
        paper_n=(10_000, "centroids at the paper's scale (DAKL alone)"),
        paper_m=(30_000, "target rows at the paper's scale (DAKL alone)"),
        gamma=(0.001, "kernel width (the paper's)"),
        alpha=(1.0, "ridge regularisation"),
        skip_paper=(False, "leave out the paper's scale"),
        skip_compare=(False, "leave out the comparison with the dense textbook"),
        check_paper=(False, "also run the paper scale with float64 features and compare (about 2x the time)"),
    )
    ap.add_argument("--child", choices=["dense", "dakl", "dakl64"], help=INTERNAL)
    ap.add_argument("--out", help=INTERNAL)
    args = ap.parse_args()
    if args.child:
        return child(args)

    ok = True
    if not args.skip_compare:
        with tempfile.TemporaryDirectory() as tmp:
            res = {k: run_child(k, args.n, args.m, args, f"{tmp}/{k}.npy") for k in ("dense", "dakl")}
            preds = {k: np.load(f"{tmp}/{k}.npy") for k in res}
        cos = row_cosine(preds["dakl"], preds["dense"]).min()
        ok = cos >= 0.9999
        print(f"== n={args.n:,} centroids + m={args.m:,} targets, d=p=384, gamma={args.gamma}, alpha={args.alpha}")
        print(f"{'':34s} {'time s':>8s} {'peak RSS GB':>12s} {'above data GB':>14s}")
        for name, key in (("dense textbook (float64, (n+m)^2)", "dense"), ("DAKLRegressor fit+predict", "dakl")):
            r = res[key]
            extra = f"   (fit {r['fit_s']:.2f} + predict {r['predict_s']:.2f})" if key == "dakl" else ""
            print(
                f"{name:34s} {r['total_s']:8.2f} {r['peak_rss_gb']:12.2f} {r['peak_rss_gb'] - r['data_rss_gb']:14.2f}{extra}"
            )
        print(
            f"speed-up {res['dense']['total_s'] / res['dakl']['total_s']:.1f}x (goal >= 5x); "
            f"peak memory {res['dense']['peak_rss_gb'] / res['dakl']['peak_rss_gb']:.1f}x less; "
            f"min row cosine vs dense {cos:.12f} (1 - cos = {1 - cos:.1e}; must be >= 0.9999) "
            f"{'OK' if ok else 'FAIL'}"
        )
        print(f"(data alone: {res['dakl']['data_rss_gb']:.2f} GB RSS)")
    if not args.skip_paper:
        tmp = tempfile.TemporaryDirectory()
        r = run_child("dakl", args.paper_n, args.paper_m, args, f"{tmp.name}/dakl.npy")
        print(f"\n== paper scale: n={args.paper_n:,} centroids + m={args.paper_m:,} targets, d=p=384")
        print(
            f"DAKLRegressor fit {r['fit_s']:.1f} s + predict {r['predict_s']:.1f} s = {r['total_s']:.1f} s; "
            f"peak RSS {r['peak_rss_gb']:.2f} GB (data alone {r['data_rss_gb']:.2f} GB; goal < 8 GB)"
        )
        dense_gb = 3 * (args.paper_n + args.paper_m) ** 2 * 8 / 1e9
        print(f"(the dense textbook would hold ~{dense_gb:.0f} GB: kernel, phi and Gram, (n+m)^2 float64 each)")
        if args.check_paper:
            r64 = run_child("dakl64", args.paper_n, args.paper_m, args, f"{tmp.name}/dakl64.npy")
            cos = row_cosine(np.load(f"{tmp.name}/dakl.npy"), np.load(f"{tmp.name}/dakl64.npy")).min()
            ok = ok and cos >= 0.9999
            print(
                f"float64 features: {r64['total_s']:.1f} s, peak RSS {r64['peak_rss_gb']:.2f} GB; min row cosine "
                f"float32 vs float64 {cos:.12f} (1 - cos = {1 - cos:.1e}) {'OK' if cos >= 0.9999 else 'FAIL'}"
            )
        tmp.cleanup()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
