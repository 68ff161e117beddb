"""`reverse-sd`: materialize the graph in the configured Dagster instance, and predict prompts for images.

User errors (wrong settings, missing models, unreadable files) print one line and exit non-zero, with
no Python traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _materialize(args: argparse.Namespace) -> int:
    import signal

    from pipeline.storage import RootBusy, RootLock
    from resources.settings import (
        available_cores,
        check_source,
        check_storage_root,
        ensure_dagster_home,
        load_settings,
    )

    settings = load_settings()  # every setting validated here, before any heavy import
    check_storage_root(settings)
    check_source(settings)
    ensure_dagster_home(settings)
    if settings.is_sample:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the sample profile never needs the hub
    workers = args.workers or available_cores()
    # SIGTERM stops like Ctrl-C: workers stopped, their runs marked canceled, pool slots freed.
    signal.signal(signal.SIGTERM, _interrupt)
    # One invocation per storage root, decided before the slow imports.
    lock_dir = settings.home if "://" not in settings.home else settings.dagster_home
    lock = RootLock(lock_dir)
    try:
        lock.acquire(
            wait=args.wait,
            on_wait=lambda holder: print(
                f"waiting: another reverse-sd materialize ({holder}) holds {lock_dir}", file=sys.stderr, flush=True
            ),
        )
    except RootBusy as busy:
        print(
            f"error: another reverse-sd materialize ({busy}) holds the storage root {lock_dir}; "
            "wait for it, or pass --wait to queue behind it",
            file=sys.stderr,
        )
        return 3
    try:
        return _materialize_locked(args, settings, workers)
    finally:
        lock.release()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _materialize_locked(args, settings, workers: int) -> int:
    import warnings

    import dagster as dg

    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)

    from assets import orchestration as orch
    from assets.data import parts_partitions, register_parts
    from assets.definitions import defs

    if args.select:
        _check_selection(defs, args.select)

    instance = dg.DagsterInstance.get()
    resources = defs.resources
    print(f"profile={settings.profile} source={settings.diffusiondb} storage={settings.home}")
    if args.dry_run:  # nothing is written to the instance: new parts are planned, not registered
        listed = sorted(resources["diffusiondb"].source().list_parts())
        new_parts = [p for p in listed if not instance.has_dynamic_partition(parts_partitions.name, p)]
        extra = {parts_partitions.name: new_parts}
        from assets.data import diffusiondb_source
        from assets.training import training_settings, training_settings_versions

        observed_now = {
            training_settings.key: training_settings_versions(),
            diffusiondb_source.key: resources["diffusiondb"].source().list_parts(),
        }
    else:
        released = orch.release_dead_runs(instance)
        if released:
            print(f"released {len(released)} run(s) whose process was killed: {', '.join(r[:8] for r in released)}")
        new_parts = register_parts(instance, resources["diffusiondb"])
        orch.observe_sources(defs, instance)
        extra = observed_now = None
    if new_parts:
        verb = "would register" if args.dry_run else "registered"
        print(f"{verb} {len(new_parts)} new DiffusionDB parts: {new_parts[0]} .. {new_parts[-1]}")
    started = time.perf_counter()
    plan = orch.plan_units(
        defs,
        instance,
        selection=args.select,
        stale_only=args.stale,
        extra_partitions=extra,
        observed_now=observed_now,
        workers=workers,
        partitions_per_run=args.partitions_per_run,
    )
    planned_in = time.perf_counter() - started
    if not plan.units:
        print("nothing to materialize: every selected asset is up to date")
        return 0
    if args.dry_run:
        print(f"would materialize {len(plan.units)} runs (planned in {planned_in:.1f} s):")
        for stage in plan.stages:
            names = ",".join(k.to_user_string() for k in stage.asset_keys)
            keys = [k for k in stage.partition_keys if k is not None]
            print(f"  {names} [{len(stage.partition_keys)}]" + (": " + " ".join(keys) if keys else ""))
        return 0
    gpus = orch.gpu_count()
    gpu_slots = max(1, gpus)
    orch.ensure_pool_limit(instance, gpu_slots)
    tags = orch.new_invocation_tags()
    invocation = tags[orch.INVOCATION_TAG]
    print(
        f"{len(plan.units)} runs, {min(workers, len(plan.units))} at a time, {gpu_slots} in the gpu pool "
        f"({gpus} GPU{'s' if gpus != 1 else ''}); invocation {invocation} (UI: Runs, filter by tag "
        f"{orch.INVOCATION_TAG}={invocation})"
    )
    log_path = Path(settings.dagster_home) / "logs" / f"materialize-{invocation}.log"
    from tqdm import tqdm

    bar = tqdm(
        total=len(plan.units),
        unit="run",
        desc="materialize",
        file=sys.stderr,
        disable=not sys.stderr.isatty() or args.verbose,
    )

    def on_start(unit):
        if args.verbose:
            print(f"start {unit.label}", file=sys.stderr)

    def on_done(outcome):
        bar.update(1)
        if outcome.split_into:
            bar.total += outcome.split_into
            tqdm.write(
                f"{outcome.unit.label} failed as one run: running its {outcome.split_into} partitions one by one",
                file=sys.stderr,
            )
        elif args.verbose or not outcome.success:
            state = "done" if outcome.success else "FAILED"
            tqdm.write(f"{state} {outcome.unit.label} in {outcome.seconds:.1f} s", file=sys.stderr)
        if outcome.detail:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(f"==== {outcome.unit.label} (run {outcome.run_id})\n{outcome.detail}\n\n")
            if args.verbose:
                print(outcome.detail, file=sys.stderr)

    try:
        progress = orch.run_units(
            plan,
            workers=workers,
            gpu_slots=gpu_slots,
            gpu_devices=gpus > 0,
            tags=tags,
            log_level="ERROR" if args.verbose else "CRITICAL",
            on_start=on_start,
            on_done=on_done,
        )
    except KeyboardInterrupt:
        bar.close()
        canceled = orch.cancel_runs(instance, invocation)
        print(f"stopped: {len(canceled)} run(s) marked canceled, their pool slots freed", file=sys.stderr)
        return 130
    bar.close()
    failed = [o for o in progress.outcomes if not o.success and not o.split_into]
    runs = len(progress.outcomes)
    elapsed = time.perf_counter() - started
    if failed or progress.not_run:
        for outcome in failed:
            for line in outcome.failures or ["failed"]:
                step = outcome.unit.asset_keys[0].to_python_identifier() + ": "
                if len(outcome.unit.asset_keys) == 1 and line.startswith(step):
                    line = line[len(step) :]
                print(
                    f"failed: {outcome.unit.label}: {line}" + (f" (run {outcome.run_id})" if outcome.run_id else ""),
                    file=sys.stderr,
                )
        if progress.not_run:
            names = ", ".join(u.label for u in progress.not_run[:10])
            more = f" and {len(progress.not_run) - 10} more" if len(progress.not_run) > 10 else ""
            print(f"not run (upstream failed): {names}{more}", file=sys.stderr)
        done = sum(o.success for o in progress.outcomes)
        print(
            f"error: {len(failed)} of {runs} runs failed, {done} succeeded in {elapsed:.0f} s; "
            + (f"full errors in {log_path}; " if log_path.exists() else "")
            + "every run is in the UI (make ui)",
            file=sys.stderr,
        )
        return 1
    print(f"materialized {runs} asset runs in {elapsed:.0f} s ({min(workers, len(plan.units))} at a time)")
    print(f"artifacts under {settings.home}; Dagster instance in {settings.dagster_home} (make ui to browse)")
    report = os.path.join(settings.home, "reports", "evaluation.md")
    if os.path.exists(report):
        print(open(report, encoding="utf-8").read().split("\n## ", 2)[0])
        print(f"report: {Path(settings.home, 'reports', 'evaluation.html').as_uri()}")
    return 0


def _check_selection(defs, selection: str) -> None:
    """Fail at start, naming --select, when a selection is malformed or names no materializable asset."""
    import dagster as dg

    from resources.settings import SettingsError

    graph = defs.resolve_asset_graph()
    materializable = set(graph.materializable_asset_keys)
    names = ", ".join(sorted(k.to_user_string() for k in materializable))
    for part in (p.strip() for p in selection.split(",")):
        if not part:
            continue
        try:
            keys = set(dg.AssetSelection.from_string(part).resolve(graph))
        except dg.DagsterError as exc:
            first = str(exc).split(". ")[0].splitlines()[0] if str(exc) else type(exc).__name__
            raise SettingsError(f"--select {part!r} is not a valid selection ({first}); assets: {names}") from None
        if not keys & materializable:
            raise SettingsError(f"--select {part!r} selects no asset to materialize; assets: {names}")


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


def _predict(args: argparse.Namespace) -> int:
    import csv
    import io
    import json
    import uuid
    from pathlib import Path

    from tqdm import tqdm

    from pipeline.predictor import NotTrainedError, PromptPredictor, duplicate_stems, scan_inputs
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

settings (environment): REVERSE_SD_PROFILE (sample | diffusiondb), REVERSE_SD_HOME (storage root),
REVERSE_SD_DIFFUSIONDB (hub dataset id or local mirror), DAGSTER_HOME (Dagster instance).
more on a command: reverse-sd predict --help, reverse-sd materialize --help
"""

PREDICT_EPILOG = """\
output formats:
  jsonl   one JSON object per image and line: path, model, prompts (prompt + cosine, best first),
          words (the vocabulary head's most probable words, when the models have one), generated
          (with --generate), embedding (with --embeddings)
  json    the same objects as one JSON array
  table   the same, for reading
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
        type=_positive_int,
        default=None,
        help="runs at once (default: the cores available); the gpu pool admits one run per GPU",
    )
    mat.add_argument(
        "--partitions-per-run",
        type=_positive_int,
        default=None,
        metavar="N",
        help="DiffusionDB parts per run (default: enough runs for four per worker, at most 50 parts each); "
        "1 gives one run per part",
    )
    mat.add_argument(
        "--wait",
        action="store_true",
        help="when another materialize holds the storage root, wait for it instead of exiting",
    )
    mat.add_argument("--verbose", action="store_true", help="print each run and full error traces")
    mat.set_defaults(func=_materialize)
    pred = sub.add_parser(
        "predict",
        help="images or folders in, prompts out",
        description="Predict the prompt of each image: the trained models' embedding, the nearest prompts of\n"
        "the prompt bank, and the vocabulary head's most probable words. Uses the ensemble (+ DAKL when\n"
        "fitted) trained under REVERSE_SD_HOME by default.",
        epilog=PREDICT_EPILOG,
        formatter_class=_HelpFormatter,
    )
    pred.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or globs")
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
        help="write the output to FILE (atomically: complete or not at all) instead of standard output",
    )
    pred.add_argument("--embeddings", action="store_true", help="include the 384-d embedding in jsonl / json")
    pred.add_argument(
        "--model",
        default="auto",
        help="auto (the ensemble when trained, + DAKL when fitted), ensemble, or one backbone: vit, swin, clip, unet",
    )
    pred.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the models run")
    pred.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="images per forward pass")
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
    pred.set_defaults(func=_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    from resources.settings import SettingsError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
