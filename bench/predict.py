"""bench/predict: images/s of `reverse-sd predict`'s Python API, batched versus one image at a time.

Uses the trained artifacts under REVERSE_SD_HOME (run `make run` first).  Prints both rates and their
ratio (goal: batching at least 3x faster on CPU with the tiny models).

    .venv/bin/python bench/predict.py [--n 1000] [--batch-size 64] [--device auto]
"""

from __future__ import annotations

import io
import os
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from options import bench_parser  # noqa: E402

from pipeline.predictor import NotTrainedError, PromptPredictor  # noqa: E402
from resources.settings import load_settings  # noqa: E402


def synthetic_images(n: int, size: int = 256, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        pixels = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--n", type=int, default=1000, help="synthetic 256-px PNGs to caption")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch of the batched contender")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    parser.add_argument("--model", default="auto", help="the predictor's model, as `reverse-sd predict --model`")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = load_settings()
    try:
        predictor = PromptPredictor(settings.home, model=args.model, device=args.device, batch_size=args.batch_size)
    except NotTrainedError as error:  # no artifacts under REVERSE_SD_HOME: say what to run, no traceback
        sys.exit(f"bench/predict.py: {error}")
    images = synthetic_images(args.n)
    predictor.embed(images[:4])  # warm-up

    started = time.perf_counter()
    batched = [predictor.embed(images[i : i + args.batch_size]) for i in range(0, len(images), args.batch_size)]
    batched_s = time.perf_counter() - started

    single_n = min(args.n, 200)
    started = time.perf_counter()
    single = [predictor.embed(images[i : i + 1]) for i in range(single_n)]
    single_s = time.perf_counter() - started

    a = np.concatenate(batched)[:single_n]
    b = np.concatenate(single)
    agreement = float((a * b).sum(axis=1).min())
    rate_batched, rate_single = args.n / batched_s, single_n / single_s
    print(f"model: {predictor.method} ({len(predictor.members)} backbone(s)), device {predictor.device}")
    print(f"{'mode':<14}{'images':>8}{'seconds':>10}{'images/s':>10}")
    print(f"{'batched':<14}{args.n:>8}{batched_s:>10.2f}{rate_batched:>10.1f}")
    print(f"{'one-by-one':<14}{single_n:>8}{single_s:>10.2f}{rate_single:>10.1f}")
    print(
        f"batching speed-up: {rate_batched / rate_single:.2f}x (goal >= 3x); min row cosine batched vs single {agreement:.6f}"
    )


if __name__ == "__main__":
    main()
