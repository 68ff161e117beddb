"""`reverse-sd materialize`: lock the storage root, observe the sources, plan, run in parallel, report in one line per failure."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def materialize_command(args: argparse.Namespace) -> int:
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
        from assets.data import diffusiondb_source
        from assets.training import training_settings, training_settings_versions

        listed = resources["diffusiondb"].source().list_parts()  # part -> version, listed once
        known = set(instance.get_dynamic_partitions(parts_partitions.name))
        new_parts = sorted(p for p in listed if p not in known)
        extra = {parts_partitions.name: new_parts}
        observed_now = {training_settings.key: training_settings_versions(), diffusiondb_source.key: listed}
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
