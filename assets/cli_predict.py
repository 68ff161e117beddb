"""`reverse-sd predict`: images in, prompts (and vocabulary words, captions, embeddings) out; zero-shot from a CLIP."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _check_model(name: str) -> None:
    """--model is auto, ensemble or a registered backbone; anything else (a typo, a path) fails at start."""
    from pipeline.models.registry import available_backbones
    from resources.settings import SettingsError

    valid = ["auto", "ensemble", *available_backbones()]
    if name not in valid:
        raise SettingsError(f"--model {name!r} is not a model; use one of: {', '.join(valid)}")


def _check_captioner(name: str | None) -> None:
    """--captioner is auto or a registered captioner."""
    if name is None:
        return
    from pipeline.captioning.captioner import available_captioners
    from resources.settings import SettingsError

    valid = ["auto", *available_captioners()]
    if name not in valid:
        raise SettingsError(f"--captioner {name!r} is not a captioner; use one of: {', '.join(valid)}")


TOY_MODELS_NOTE = (
    "note: these are toy models trained on synthetic images (sample profile: tiny random-init backbones); "
    "their prompts say little about real Stable Diffusion images. REVERSE_SD_PROFILE=diffusiondb trains the real ones."
)


ZERO_SHOT_TWIN_NOTE = (
    "note: zero-shot with the sample profile's tiny random-init CLIP twin: its ranking exercises the code path "
    "and means nothing. --clip openai/clip-vit-large-patch14 (with HF_HUB_OFFLINE=0) ranks with the real CLIP."
)


def _zero_shot_clip(args: argparse.Namespace, settings) -> str | None:
    """The CLIP model --zero-shot ranks with (None without --zero-shot): --clip, else the profile's default
    (sample: the tiny CLIP twin saved under the storage root; otherwise openai/clip-vit-large-patch14)."""
    from resources.settings import SettingsError

    if not args.zero_shot:
        if args.clip is not None:
            raise SettingsError("--clip chooses the model of --zero-shot; add --zero-shot")
        return None
    if args.model != "auto":
        raise SettingsError("--model chooses a trained model; --zero-shot ranks with --clip instead")
    if args.generate or args.captioner is not None:
        raise SettingsError("--generate needs a trained captioner; not with --zero-shot")
    if args.clip is not None:
        return args.clip
    from pipeline.zero_shot import DEFAULT_CLIP, twin_directory
    from resources.settings import local_dir

    return twin_directory(local_dir(settings.home, "")) if settings.is_sample else DEFAULT_CLIP


def _zero_shot_predictor(settings, clip: str, args: argparse.Namespace):
    """A ZeroShotRetriever over the storage root's prompt bank; the sample's CLIP twin is saved on first use."""
    from tqdm import tqdm

    from pipeline.zero_shot import ZeroShotRetriever, ensure_tiny_clip, load_bank, twin_directory
    from resources.settings import local_dir

    load_bank(settings.home)  # no bank: say so before building or loading any model
    if settings.is_sample and args.clip is None:
        ensure_tiny_clip(twin_directory(local_dir(settings.home, "")))
    bars = []

    def progress(total: int):
        bar = tqdm(
            total=total,
            unit="prompt",
            desc="encoding the prompt bank (once; cached)",
            file=sys.stderr,
            disable=args.quiet or not sys.stderr.isatty(),
        )
        bars.append(bar)
        return bar.update

    try:
        return ZeroShotRetriever(settings.home, clip, device=args.device, batch_size=args.batch_size, progress=progress)
    finally:
        for bar in bars:
            bar.close()


def _prediction_record(predictor, result, args, generate: bool) -> dict:
    """One image's JSON object (a line of jsonl, an element of json)."""
    record = {
        "path": str(result.path),
        "model": predictor.method,
        "prompts": [{"prompt": p, "cosine": round(c, 6)} for p, c in result.prompts],
    }
    if predictor.vocabulary is not None and args.words > 0:
        record["words"] = [{"word": w, "probability": round(q, 4)} for w, q in result.words]
    if generate:
        record["generated"] = result.generated
    if args.embeddings:
        record["embedding"] = [round(float(v), 7) for v in result.embedding]
    return record


def predict_command(args: argparse.Namespace) -> int:
    import csv
    import io
    import json
    import uuid

    from tqdm import tqdm

    from pipeline.inputs import duplicate_stems, scan_inputs
    from pipeline.predictor import NotTrainedError, PromptPredictor
    from resources.settings import SettingsError, load_settings

    settings = load_settings()
    _check_model(args.model)
    _check_captioner(args.captioner)
    if args.output is not None and os.path.isdir(args.output):
        raise SettingsError(f"--output {args.output} is a directory, not a file")
    clip = _zero_shot_clip(args, settings)
    if clip is None or (args.clip is None and settings.is_sample) or os.path.isdir(clip):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # trained models and local CLIP directories need no hub
    scan = scan_inputs(args.paths)  # only regular files within the size cap; the rest skipped with a reason
    files = scan.files
    if not files:
        for path, reason in scan.skipped:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        refused = f" ({len(scan.skipped)} skipped)" if scan.skipped else ""
        print("error: no image files found in " + " ".join(args.paths) + refused, file=sys.stderr)
        return 2
    if args.format == "kaggle":
        shared = duplicate_stems(files)
        if shared:  # image ids are file stems: two files with one stem would write one id twice
            listed = "; ".join(f"{stem}: {', '.join(map(str, group))}" for stem, group in shared.items())
            print(
                f"error: --format kaggle takes image ids from file names, and these repeat: {listed}", file=sys.stderr
            )
            return 2
    # a submission holds embeddings only
    generate = (args.generate or args.captioner is not None) and args.format != "kaggle"
    try:
        if clip is not None:
            predictor = _zero_shot_predictor(settings, clip, args)
        else:
            predictor = PromptPredictor(
                settings.home,
                model=args.model,
                device=args.device,
                batch_size=args.batch_size,
                captioner=(args.captioner or "auto") if generate else None,
            )
    except (NotTrainedError, ValueError, OSError, RuntimeError) as exc:  # CheckpointError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if predictor.toy_models:  # the first line, before anything about the inputs
        print(ZERO_SHOT_TWIN_NOTE if clip is not None else TOY_MODELS_NOTE, file=sys.stderr)
    for path, reason in scan.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    skipped = len(scan.skipped)
    total = len(files) + skipped
    words = args.words if args.format != "kaggle" else 0
    top_k = args.top_k if args.format != "kaggle" else 0

    def write(out) -> int:
        """Stream the predictions to ``out``; the number written."""
        nonlocal skipped
        written = 0
        records = []
        # the bar only on a terminal; what goes to the same terminal is written around it, never through it
        bar = tqdm(total=len(files), unit="image", file=sys.stderr, disable=args.quiet or not sys.stderr.isatty())

        def emit(text: str) -> None:
            if not bar.disable and out is sys.stdout and sys.stdout.isatty():
                bar.write(text, file=out, end="")
            else:
                out.write(text)
                if out is sys.stdout:
                    out.flush()  # a reader of a pipe sees each image as it is done

        if args.format == "kaggle":
            emit("imgId_eId,val\n")
        for result in predictor.predict(files, top_k=top_k, words=words, generate=generate):
            bar.update(1)
            if result.error is not None:
                skipped += 1
                bar.write(f"skipped {result.path}: {result.error}", file=sys.stderr)
                continue
            written += 1
            if args.format == "kaggle":
                rows = io.StringIO()
                csv.writer(rows, lineterminator="\n").writerows(
                    [f"{result.path.stem}_{i}", f"{float(v):.6f}"] for i, v in enumerate(result.embedding)
                )
                emit(rows.getvalue())
            elif args.format == "table":
                lines = [f"{result.path}  [{predictor.method}]"]
                lines += [f"  {rank}. {score:.4f}  {prompt}" for rank, (prompt, score) in enumerate(result.prompts, 1)]
                if result.words:
                    lines.append("  words:  " + ", ".join(f"{w} {q:.2f}" for w, q in result.words))
                if generate:
                    lines.append(f"  generated:  {result.generated}")
                emit("\n".join(lines) + "\n")
            elif args.format == "json":
                records.append(_prediction_record(predictor, result, args, generate))
            else:
                emit(json.dumps(_prediction_record(predictor, result, args, generate)) + "\n")
        bar.close()
        if args.format == "json":
            out.write(json.dumps(records, indent=2) + "\n")
        return written

    if args.output is None:
        written = write(sys.stdout)
    else:
        # atomic: a temporary file beside the target, renamed over it once complete (a user's file, so no
        # integrity sidecar as the pipeline's artifacts have)
        target = Path(args.output)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8", newline="") as out:
                written = write(out)
            os.replace(tmp, target)
        except OSError as exc:
            print(f"error: cannot write --output {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        finally:
            tmp.unlink(missing_ok=True)
        print(f"wrote {written} predictions to {args.output}", file=sys.stderr)
    if skipped:
        print(
            f"{skipped} of {total} files skipped (not a regular file, too large, unreadable or not an image)",
            file=sys.stderr,
        )
        return 1
    return 0
