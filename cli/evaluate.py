"""`reverse-sd evaluate`: how well the trained models do on images whose prompts are known (the user's own).

For each image with a prompt in its metadata (pipeline.image_metadata: generators' metadata, sidecars), the
cosine between each model's predicted embedding (pipeline.predictor, the models trained under REVERSE_SD_HOME)
and the SBERT embedding of the real prompt; then a summary (mean, n, per model, per generator).  Arguments are
checked before torch is imported; table output escapes control characters, JSON Lines stay exact.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from cli.parsing import add_paths_command
from pipeline.text_safety import printable

EVALUATE_HELP = "score the trained models on images whose prompts are known"
EVALUATE_DESCRIPTION = (
    "Score the trained models on your own images: the cosine between the predicted embedding and\n"
    "the SBERT embedding of the prompt written in each image's metadata, per image and model, and the mean."
)
EVALUATE_EPILOG = """\
output formats (default: table on a terminal, jsonl otherwise):
  jsonl   one JSON object per image: path, generator, prompt, model (the default model), cosine (its
          cosine), cosines (model -> cosine, each model evaluated); an image without a prompt, or that
          cannot be read, has cosine null and its reason in skipped. Then one summary object:
          {"summary": true, "model", "n", "mean", "models": {model: mean}, "generators": {name: {n, mean}},
          "skipped"}
  table   the same for reading (control characters escaped), the summary last

Models: --model auto evaluates the ensemble (+ DAKL when fitted) as the default and each of its backbones
beside it; --model vit (a backbone) evaluates that one. Prompts are read as `reverse-sd scan` reads them
(generators' metadata, or a sidecar NAME.txt / NAME.json, which wins) and embedded with the profile's
SBERT model (all-MiniLM-L6-v2): the cosine is the Kaggle metric of "Stable Diffusion - Image to Prompts".

exit status: 0 every image was scored; 1 some were skipped (no prompt, unreadable); 2 a usage error or
nothing to score.

examples:
  reverse-sd evaluate my_generations/
  reverse-sd evaluate my_generations/ --format jsonl > scores.jsonl
  reverse-sd evaluate "outputs/**/*.png" --model vit
"""


class _UsageError(Exception):
    pass


def add_evaluate_parser(sub, formatter_class) -> None:
    ev = add_paths_command(
        sub, "evaluate", formatter_class, help=EVALUATE_HELP, description=EVALUATE_DESCRIPTION, epilog=EVALUATE_EPILOG
    )
    ev.add_argument("--format", choices=["table", "jsonl"], default=None, help="output format (default: see below)")
    ev.add_argument(
        "--model", default="auto", help="auto (the ensemble and its backbones), ensemble, or one backbone: vit, ..."
    )
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the models run")
    ev.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per forward pass (1 to 256)")
    ev.set_defaults(func=evaluate_command)


def evaluate_command(args: argparse.Namespace) -> int:
    try:
        return _evaluate(args)
    except _UsageError as exc:
        print(f"error: {printable(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _evaluate(args: argparse.Namespace) -> int:
    from cli.predict import _check_bank, _check_model

    try:
        _check_model(args.model)
    except Exception as exc:  # predict's _UsageError: the same one-line message
        raise _UsageError(str(exc)) from None
    if not 1 <= args.batch_size <= 256:
        raise _UsageError(f"--batch-size {args.batch_size} is outside 1..256")
    from resources.settings import load_settings

    settings = load_settings()
    try:
        _check_bank(settings.home, zero_shot=False)
    except Exception as exc:
        raise _UsageError(str(exc)) from None
    from pipeline.image_metadata import read_image_metadata
    from pipeline.inputs import scan_inputs

    scan = scan_inputs(args.paths)
    skipped = [(str(path), reason) for path, reason in scan.skipped]
    known = []
    for path in scan.files:
        record = read_image_metadata(path)
        if record.skipped:
            skipped.append((str(path), record.skipped))
        else:
            known.append(record)
    if not known:
        for path, reason in skipped:
            print(f"skipped {printable(path)}: {printable(reason)}", file=sys.stderr)
        raise _UsageError(f"no image with a known prompt in {' '.join(args.paths)}")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pipeline.data.embedding import PromptEncoder
    from pipeline.evaluation.own_images import image_cosines, summarise
    from pipeline.predictor import NotTrainedError, PredictOptions, PromptPredictor
    from resources import profile_config

    try:
        default = PromptPredictor(settings.home, model=args.model, device=args.device, batch_size=args.batch_size)
        predictors = {default.method: default}
        if len(default.members) > 1:
            for member in default.members:
                predictors[member.backbone] = PromptPredictor(
                    settings.home, model=member.backbone, device=args.device, batch_size=args.batch_size
                )
    except (NotTrainedError, ValueError, OSError, RuntimeError) as exc:
        raise _UsageError(str(exc)) from None
    if default.toy_models:
        from cli.predict import TOY_MODELS_NOTE

        print(TOY_MODELS_NOTE, file=sys.stderr)
    encoder = PromptEncoder(profile_config(settings).encoder_model, device=args.device)
    targets = encoder.encode([r.prompt for r in known])
    cosines: dict[str, dict[int, float]] = {}
    for name, predictor in predictors.items():
        scored = {}
        for i, result in enumerate(predictor.predict([r.path for r in known], PredictOptions(top_k=0))):
            if result.error is None:
                scored[i] = float(image_cosines(result.embedding[None, :], targets[i][None, :])[0])
            elif name == default.method:
                skipped.append((str(result.path), result.error))
        cosines[name] = scored
    models = list(predictors)
    rows = [
        {
            "path": r.path,
            "generator": r.generator,
            "prompt": r.prompt,
            "model": default.method,
            "cosine": round(cosines[default.method][i], 6),
            "cosines": {m: round(cosines[m][i], 6) for m in models if i in cosines[m]},
        }
        for i, r in enumerate(known)
        if i in cosines[default.method]
    ]
    summary = summarise(rows, models, skipped=len(skipped))
    table = args.format == "table" or (args.format is None and sys.stdout.isatty())
    out = sys.stdout
    if table:
        for row in rows:
            others = "  ".join(f"{printable(m)} {c:.4f}" for m, c in row["cosines"].items() if m != default.method)
            out.write(
                f"{row['cosine']:.4f}  [{printable(row['generator'])}]  {printable(row['path'])}"
                + (f"  ({others})" if others else "")
                + f"\n        prompt: {printable(row['prompt'])}\n"
            )
        for path, reason in skipped:
            out.write(f"skipped {printable(path)}: {printable(reason)}\n")
        out.write(
            f"mean cosine {summary['mean']:.4f} over {summary['n']} images ({printable(default.method)}); "
            + ", ".join(f"{printable(m)} {v:.4f}" for m, v in summary["models"].items())
            + "\n"
        )
        for name, group in summary["generators"].items():
            out.write(f"  {printable(name)}: {group['mean']:.4f} over {group['n']}\n")
    else:
        for row in rows:
            out.write(json.dumps(row) + "\n")
        for path, reason in skipped:
            out.write(json.dumps({"path": path, "cosine": None, "skipped": reason}) + "\n")
        out.write(json.dumps(summary) + "\n")
    out.flush()
    return 1 if skipped else 0
