"""bench/pixel_cache: one epoch over a split decoded per item (PairDataset, what vit and swin read before)
against the same epoch from the decoded-pixel cache (pipeline.training.pixel_cache.PixelCache), at two sizes
of the split so that the cost per image, and how it grows, shows.

The images are synthetic 256-px JPEGs encoded as diffusiondb_parts stores them (quality 95, no chroma
subsampling); each is resized to the backbone's input size (64 px: the tiny twins; 224 px: vit and clip).  Per
contender: images/s of an epoch (in the main process, as the sample profile loads, and with --workers loader
processes, which decode items or gather and normalise cached batches), the cache's build time (decoded once with the same workers) and its size on disk.  The cached items
are checked equal, bit for bit, to the decoded ones.

    .venv/bin/python bench/pixel_cache.py [--n 2000] [--workers 2] [--sizes 64,224]
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time

import numpy as np
from options import add_options, bench_parser
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from pipeline.training.data import loader_for  # noqa: E402
from pipeline.training.datasets import PairDataset  # noqa: E402
from pipeline.training.pixel_cache import PixelCache, PixelDataset  # noqa: E402

BATCH = 64


def jpegs(n: int, seed: int = 0) -> list[bytes]:
    """n 256-px JPEGs of smooth colour fields with a few shapes (compress like the sample's images)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256] / 255.0
    out = []
    for _ in range(n):
        a, b, c = rng.random((3, 3))
        image = np.stack([a[i] * xx + b[i] * yy + c[i] * xx * yy for i in range(3)], axis=-1)
        for _ in range(3):
            y, x, r = rng.integers(20, 236, 2).tolist() + [int(rng.integers(8, 40))]
            image[max(0, y - r) : y + r, max(0, x - r) : x + r] = rng.random(3)
        buffer = io.BytesIO()
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(
            buffer, format="JPEG", quality=95, subsampling=0
        )
        out.append(buffer.getvalue())
    return out


def epoch_seconds(dataset, workers: int) -> float:
    loader = loader_for(dataset, BATCH, num_workers=workers, pin_memory=False)
    started = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - started


def measure(images: list[bytes], size: int, workers: int, directory: str) -> dict:
    targets = np.zeros((len(images), 384), np.float32)
    plain = PairDataset(images, targets, image_size=size)
    row = {"decode_s": epoch_seconds(plain, 0)}
    if workers:
        row["decode_workers_s"] = epoch_seconds(plain, workers)
    cache = PixelCache(directory, max_bytes=2**40, batch_size=BATCH, num_workers=workers)
    started = time.perf_counter()
    cached = cache.wrap(plain)
    row["build_s"] = time.perf_counter() - started
    assert isinstance(cached, PixelDataset), cache.summary()
    row["cached_s"] = epoch_seconds(cached, 0)
    if workers:
        row["cached_workers_s"] = epoch_seconds(cached, workers)
    row["mb"] = os.path.getsize(cached.path) / 2**20
    for i in np.random.default_rng(1).choice(len(images), 8, replace=False):
        assert torch.equal(plain[int(i)][0], cached[int(i)][0]), f"image {i}: cached pixels differ"
    return row


def main() -> None:
    parser = add_options(
        bench_parser(__doc__),
        n=(2000, "images of the larger split (the smaller has a quarter)"),
        workers=(2, "loader worker processes for the second decoded epoch and the build (0: none)"),
        sizes=("64,224", "input sizes, comma-separated"),
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = jpegs(args.n)
    sizes = [int(s) for s in str(args.sizes).split(",")]
    print(f"{args.n:,} synthetic 256-px JPEGs ({sum(map(len, images)) / 2**20:.0f} MiB); {os.cpu_count()} CPU cores")
    header = f"{'size':>5}{'images':>8}{'decode img/s':>14}"
    header += f"{f'{args.workers} workers':>12}" if args.workers else ""
    header += f"{'build s':>9}{'cached img/s':>14}"
    header += f"{f'{args.workers} workers':>12}" if args.workers else ""
    header += f"{'speed-up':>10}{'builds pay after':>18}{'cache MB':>10}"
    print(header)
    for size in sizes:
        for n in (args.n // 4, args.n):
            with tempfile.TemporaryDirectory() as tmp:
                r = measure(images[:n], size, args.workers, tmp)
            line = f"{size:>5}{n:>8,}{n / r['decode_s']:>14,.0f}"
            line += f"{n / r['decode_workers_s']:>12,.0f}" if args.workers else ""
            best_decode = min(r["decode_s"], r.get("decode_workers_s", r["decode_s"]))
            best_cached = min(r["cached_s"], r.get("cached_workers_s", r["cached_s"]))
            epochs = r["build_s"] / max(best_decode - best_cached, 1e-9)
            line += f"{r['build_s']:>9.2f}{n / r['cached_s']:>14,.0f}"
            line += f"{n / r['cached_workers_s']:>12,.0f}" if args.workers else ""
            line += f"{best_decode / best_cached:>9.1f}x"
            line += f"{epochs:>11.2f} epochs{r['mb']:>10.1f}"
            print(line)
    print("speed-up: the faster decoded epoch / the faster cached epoch; builds pay after: build s / (the faster")
    print("decoded epoch - the faster cached epoch), how many epochs the cache needs to pay for itself")


if __name__ == "__main__":
    main()
