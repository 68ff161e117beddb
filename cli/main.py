"""`reverse-sd`: materialize the graph in the configured Dagster instance, and predict prompts for images.

User errors (wrong settings, missing models, unreadable files) print one line and exit non-zero, with
no Python traceback.
"""

from __future__ import annotations

import argparse
import sys

from cli.evaluate import add_evaluate_parser
from cli.materialize import materialize_command
from cli.parsing import add_paths_command
from cli.predict import predict_command
from cli.scan import add_scan_parser
from pipeline.inputs import DEFAULT_BATCH_SIZE, MAX_BATCH_SIZE


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


MAX_WORKERS = 1024  # materialize --workers: runs at once; more only queues in the instance


def _workers(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_WORKERS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is more than the runs one machine can follow: at most {MAX_WORKERS}"
        )
    return value


def _predict_batch_size(text: str) -> int:
    """predict --batch-size: 1 .. MAX_BATCH_SIZE; a larger value is refused (not clamped), naming the cap."""
    value = _positive_int(text)
    if value > MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(f"{value} is above the cap of {MAX_BATCH_SIZE} images per forward pass")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option's help (not the empty ones of flags and unset options), descriptions
    and examples printed as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False):
            return action.help or ""
        return super()._get_help_string(action)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reverse-sd")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


MAIN_EPILOG = """\
examples:
  reverse-sd materialize                      build everything (the sample profile by default)
  reverse-sd materialize --stale              rebuild only what is missing or stale
  reverse-sd predict photo.png shots/         prompts for images, one JSON object per line
  reverse-sd predict shots/ --format table    the same as a readable table
  reverse-sd scan outputs/                    the prompts your generator wrote into your images
  reverse-sd evaluate outputs/                how well the trained models do on them (mean cosine)

settings (environment): REVERSE_SD_PROFILE (sample | diffusiondb), REVERSE_SD_HOME (storage root),
REVERSE_SD_DIFFUSIONDB (hub dataset id or local mirror), DAGSTER_HOME (Dagster instance).
more on a command: reverse-sd predict --help, reverse-sd materialize --help, reverse-sd scan --help
"""

PREDICT_EPILOG = """\
output formats:
  jsonl   one JSON object per image and line: path, model, prompts (prompt + cosine, best first),
          words (the vocabulary head's most probable words, when the models have one), generated
          (with --generate), embedding (with --embeddings)
  json    the same objects as one JSON array
  table   the same, for reading (control characters of prompts and file names escaped, as \\x1b)
  kaggle  the competition's submission CSV (imgId_eId,val; 384 rows per image, the id is the file's
          stem, so file names must not repeat)

zero-shot (before any training; needs only reverse-sd materialize --select '*prompt_bank'):
  --zero-shot ranks the prompt bank by a CLIP model's image-text cosine, as clip-interrogator does;
  model reads "zero-shot CLIP (MODEL)", cosine is CLIP's, embedding is the top-1 prompt's.
  --clip default: openai/clip-vit-large-patch14 (from the hub: HF_HUB_OFFLINE=0 the first time);
  on the sample profile the tiny random-init CLIP twin saved under REVERSE_SD_HOME/zero_shot/tiny_clip.
  The bank's CLIP text embeddings are computed once per model and bank, cached under
  REVERSE_SD_HOME/zero_shot/cache.

Only regular files are read: FIFOs, devices, sockets, symlinks to them and files over 100 MB are
skipped with their reason, as are unreadable images; any skip makes the exit status 1.
An existing path is taken as it is, before any globbing (a[1].png is that file). Folders and ** globs
follow symlinked folders but read each real file once, at most 32 folders deep and 1,000,000 files;
an argument that matches nothing is named, and counts as a skip. An animated GIF is its first frame.

examples:
  reverse-sd predict image.png some/folder "shots/*.jpg" --top-k 3
  reverse-sd predict some/folder --output predictions.jsonl
  reverse-sd predict some/folder --format json --embeddings --output predictions.json
  reverse-sd predict test_images/ --format kaggle --output submission.csv
  reverse-sd predict image.png --format table --model vit --generate
  reverse-sd predict some/folder --zero-shot --format table       before training: CLIP ranks the bank
  reverse-sd predict some/folder --zero-shot --clip openai/clip-vit-base-patch32
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reverse-sd",
        description="Reverse Stable Diffusion: materialize the Dagster pipeline that learns which prompt made\n"
        "an image, and predict prompts for your own images.",
        epilog=MAIN_EPILOG,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    mat = sub.add_parser(
        "materialize",
        help="materialize an asset selection (default: everything)",
        description="Materialize assets in the configured Dagster instance: one run of a named job per stage and "
        "partition, independent runs in parallel, each in the UI under Runs.",
        epilog="examples:\n"
        "  reverse-sd materialize                          everything\n"
        "  reverse-sd materialize --stale                  only what is missing or stale\n"
        "  reverse-sd materialize --select 'filtered_pairs+' --workers 4\n"
        "  reverse-sd materialize --stale --dry-run        print the plan; write nothing",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mat.add_argument(
        "--select",
        default=None,
        help="asset selection, as 'dagster asset materialize --select' takes it (default: everything)",
    )
    mat.add_argument(
        "--stale",
        action="store_true",
        help="only what is missing or stale: new parts, changed code or settings, missing artifacts",
    )
    mat.add_argument(
        "--dry-run", action="store_true", help="print the runs that would run, and write nothing to the instance"
    )
    mat.add_argument(
        "--workers",
        type=_workers,
        default=None,
        help=f"runs at once, at most {MAX_WORKERS} (default: the cores available); the gpu pool admits one run per GPU",
    )
    mat.add_argument(
        "--partitions-per-run",
        type=_positive_int,
        default=None,
        metavar="N",
        help="DiffusionDB parts per run (default: four runs per worker, at least four and at most 50 parts "
        "each, or one run per worker when there are fewer parts); 1 gives one run per part",
    )
    mat.add_argument(
        "--wait",
        action="store_true",
        help="when another materialize holds the storage root, wait for it instead of exiting",
    )
    mat.add_argument("--verbose", action="store_true", help="print each run and full error traces")
    mat.set_defaults(func=materialize_command)
    pred = add_paths_command(
        sub,
        "predict",
        _HelpFormatter,
        help="images or folders in, prompts out",
        description="Predict the prompt of each image: the trained models' embedding, the nearest prompts of\n"
        "the prompt bank, and the vocabulary head's most probable words. Uses the ensemble (+ DAKL when\n"
        "fitted) trained under REVERSE_SD_HOME by default.",
        epilog=PREDICT_EPILOG,
    )
    pred.add_argument("--top-k", type=_positive_int, default=5, metavar="K", help="nearest bank prompts per image")
    pred.add_argument(
        "--words",
        type=_non_negative_int,
        default=8,
        metavar="N",
        help="most probable vocabulary words per image, from the models' vocabulary head (0: none)",
    )
    pred.add_argument(
        "--format", choices=["jsonl", "json", "table", "kaggle"], default="jsonl", help="output format (see below)"
    )
    pred.add_argument(
        "--output",
        default=None,
        metavar="FILE",
        help="write the output to FILE instead of standard output: a regular file is replaced atomically "
        "(complete or not at all, its permissions kept); a device, a FIFO or - (standard output) is written "
        "in place; a symlink writes its target",
    )
    pred.add_argument("--embeddings", action="store_true", help="include the 384-d embedding in jsonl / json")
    pred.add_argument(
        "--model",
        default="auto",
        help="auto (the ensemble when trained, + DAKL when fitted), ensemble, or one backbone: vit, swin, clip, unet",
    )
    pred.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the models run")
    pred.add_argument(
        "--batch-size",
        type=_predict_batch_size,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"images per forward pass, at most {MAX_BATCH_SIZE} (memory grows with it; a larger N is refused)",
    )
    pred.add_argument(
        "--quiet", action="store_true", help="no progress bar (there is none anyway when stderr is not a terminal)"
    )
    pred.add_argument(
        "--generate", action="store_true", help="also give a prompt written by the trained captioner (not with kaggle)"
    )
    pred.add_argument(
        "--captioner",
        default=None,
        help="which trained captioner --generate uses: auto (the first trained: blip, then blip2) or a name; "
        "implies --generate",
    )
    pred.add_argument(
        "--zero-shot",
        action="store_true",
        help="no trained model: rank the prompt bank by a CLIP model's image-text similarity, as "
        "clip-interrogator does (needs only the data stages: reverse-sd materialize --select '*prompt_bank')",
    )
    pred.add_argument(
        "--clip",
        default=None,
        metavar="MODEL",
        help="the CLIP model of --zero-shot: a hub id or a local save_pretrained directory (default: the "
        "profile's, see zero-shot below)",
    )
    pred.set_defaults(func=predict_command)
    add_scan_parser(sub, _HelpFormatter)
    add_evaluate_parser(sub, _HelpFormatter)
    return parser


def _settings_error() -> type[Exception]:
    """SettingsError, imported only when an exception is being matched (resources/ imports Dagster)."""
    from resources.settings import SettingsError

    return SettingsError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _settings_error() as exc:  # evaluated only when something was raised: a usage error answers at once
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
