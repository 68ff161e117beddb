"""`reverse-sd`: materialize the graph in the configured Dagster instance, and predict prompts for images.

User errors (wrong settings, missing models, unreadable files) print one line and exit non-zero, with
no Python traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _materialize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from resources.profiles import profile_config
    from resources.settings import check_source, check_storage_root, ensure_dagster_home, load_settings

    settings = load_settings()
    profile_config(settings)  # sample sizes and other numbers from the environment, before any heavy import
    check_storage_root(settings)
    check_source(settings)
    ensure_dagster_home(settings)
    if settings.is_sample:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the sample profile never needs the hub

    import dagster as dg

    from assets.data import register_parts
    from assets.definitions import defs
    from assets.orchestration import observe_settings, plan_stages, run_stages

    if args.select:
        _check_selection(defs, args.select)
    instance = dg.DagsterInstance.get()
    resources = defs.resources
    new_parts = register_parts(instance, resources["diffusiondb"])
    observe_settings(defs, instance)
    print(f"profile={settings.profile} source={settings.diffusiondb} storage={settings.home}")
    if new_parts:
        print(f"registered {len(new_parts)} new DiffusionDB parts: {new_parts[0]} .. {new_parts[-1]}")
    stages = plan_stages(defs, instance, selection=args.select, stale_only=args.stale)
    total = sum(len(s.partition_keys) for s in stages)
    if total == 0:
        print("nothing to materialize: every selected asset is up to date")
        return 0
    if args.dry_run:
        print(f"would materialize {total} asset runs:")
        for stage in stages:
            names = ",".join(k.to_user_string() for k in stage.asset_keys)
            keys = [k for k in stage.partition_keys if k is not None]
            print(f"  {names} [{len(stage.partition_keys)}]" + (": " + " ".join(keys) if keys else ""))
        return 0
    started = time.perf_counter()
    bar = tqdm(total=total, unit="run", desc="materialize", file=sys.stderr)

    def on_run(stage, partition_key):
        names = ",".join(k.to_user_string() for k in stage.asset_keys)
        bar.set_postfix_str(f"{names}" + (f"[{partition_key}]" if partition_key else ""))

    results = run_stages(defs, instance, stages, on_run=on_run, on_done=lambda _: bar.update(1))
    bar.close()
    failed = [r for r in results if not r.success]
    if failed:
        run = failed[0]
        messages = [
            e.message for e in run.all_events if e.is_failure and e.message
        ] or ["see the run in the UI"]
        print(f"error: run {run.run_id} failed: {messages[-1]}", file=sys.stderr)
        return 1
    print(f"materialized {total} asset runs in {time.perf_counter() - started:.0f} s")
    print(f"artifacts under {settings.home}; Dagster instance in {settings.dagster_home} (make ui to browse)")
    report = os.path.join(settings.home, "reports", "evaluation.md")
    if os.path.exists(report):
        print(open(report, encoding="utf-8").read().split("\n## ", 2)[0])
        print(f"report: {os.path.join(settings.home, 'reports', 'evaluation.html')}")
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


def _predict(args: argparse.Namespace) -> int:
    import csv
    import json

    from tqdm import tqdm

    from pipeline.predictor import NotTrainedError, PromptPredictor, expand_inputs
    from resources.settings import load_settings

    settings = load_settings()
    _check_model(args.model)
    _check_captioner(args.captioner)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    files = expand_inputs(args.paths)
    if not files:
        print("error: no image files found in " + " ".join(args.paths), file=sys.stderr)
        return 2
    # a submission holds embeddings only
    generate = (args.generate or args.captioner is not None) and args.format != "kaggle"
    try:
        predictor = PromptPredictor(
            settings.home, model=args.model, device=args.device, batch_size=args.batch_size,
            captioner=(args.captioner or "auto") if generate else None,
        )
    except (NotTrainedError, ValueError, OSError) as exc:  # CheckpointError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    skipped = 0
    out = sys.stdout
    writer = csv.writer(out, lineterminator="\n") if args.format == "kaggle" else None
    if writer:
        writer.writerow(["imgId_eId", "val"])
    records = []
    for path, embedding, error, *written in tqdm(
        predictor.predict_files(files, generate=generate), total=len(files), unit="image", file=sys.stderr,
        disable=args.quiet,
    ):
        if error is not None:
            skipped += 1
            print(f"skipped {path}: {error}", file=sys.stderr)
            continue
        if args.format == "kaggle":
            for i, value in enumerate(embedding):
                writer.writerow([f"{path.stem}_{i}", f"{float(value):.6f}"])
            continue
        top = predictor.top_k(embedding[None, :], args.top_k)[0]
        if args.format == "json":
            records.append(
                {
                    "path": str(path),
                    "model": predictor.method,
                    "prompts": [{"prompt": p, "cosine": round(c, 6)} for p, c in top],
                    **({"generated": written[0]} if written else {}),
                    "embedding": [round(float(v), 7) for v in embedding],
                }
            )
        else:
            print(f"{path}  [{predictor.method}]")
            for rank, (prompt, score) in enumerate(top, 1):
                print(f"  {rank}. {score:.4f}  {prompt}")
            if written:
                print(f"  generated:  {written[0]}")
    if args.format == "json":
        json.dump(records, out, indent=2)
        out.write("\n")
    if skipped:
        print(f"{skipped} of {len(files)} files skipped (unreadable or not an image)", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reverse-sd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    mat = sub.add_parser("materialize", help="materialize an asset selection (default: everything)")
    mat.add_argument("--select", default=None, help="asset selection, as `dagster asset materialize --select`")
    mat.add_argument("--stale", action="store_true", help="only what is missing or stale")
    mat.add_argument(
        "--dry-run", action="store_true", help="print what would run (after registering parts and observing settings)"
    )
    mat.set_defaults(func=_materialize)
    pred = sub.add_parser("predict", help="images or folders in, prompts out")
    pred.add_argument("paths", nargs="+", help="image files, folders (recursive) or globs")
    pred.add_argument("--top-k", type=_positive_int, default=5)
    pred.add_argument("--format", choices=["table", "json", "kaggle"], default="table")
    pred.add_argument("--model", default="auto", help="auto | ensemble | vit | swin | clip | unet")
    pred.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    pred.add_argument("--batch-size", type=_positive_int, default=32)
    pred.add_argument("--quiet", action="store_true", help="no progress bar")
    pred.add_argument(
        "--generate", action="store_true", help="also print a prompt written by the trained captioner (not with kaggle)"
    )
    pred.add_argument(
        "--captioner", default=None,
        help="which trained captioner --generate uses: auto (the first trained: blip, then blip2) or a name; "
        "implies --generate",
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
