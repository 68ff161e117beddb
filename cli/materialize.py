"""`reverse-sd materialize`: lock the storage root, observe the sources, plan, hand the runs to the Dagster
instance as they become ready, follow them, report in one line per failure."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path


def materialize_command(args: argparse.Namespace) -> int:
    from pipeline.storage import RootBusy, RootLock
    from resources.settings import (
        SettingsError,
        available_cores,
        check_source,
        check_storage_root,
        ensure_dagster_home,
        load_settings,
    )

    settings = load_settings()  # every setting validated here, before any heavy import
    check_storage_root(settings, create=not args.dry_run)  # a dry run writes nothing under the root
    check_source(settings)
    ensure_dagster_home(settings)
    from pipeline.data.diffusiondb import is_local_location

    if settings.is_sample and is_local_location(settings.diffusiondb):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the sample profile on a local mirror never needs the hub
    workers = args.workers or available_cores()
    # SIGTERM stops like Ctrl-C: the invocation's queued and running runs are terminated through the instance.
    signal.signal(signal.SIGTERM, _interrupt)
    if args.dry_run:  # reads only: no lock, nothing written under the storage root
        return _materialize_locked(args, settings, workers)
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
    except (KeyboardInterrupt, SettingsError):
        raise  # a settings error is main()'s one line, exit 2
    except Exception as exc:  # noqa: BLE001 - one line for the user; the instance keeps the details
        if args.verbose:
            raise
        print(f"error: {one_line(exc, settings.dagster_home)}", file=sys.stderr)
        return 1
    finally:
        lock.release()


def one_line(exc: BaseException, dagster_home: str) -> str:
    """An unexpected failure of the command itself (not of a run) as one line: the innermost cause's first
    line; an instance-storage error (read-only or full DAGSTER_HOME) names DAGSTER_HOME."""
    cause = exc
    while cause.__cause__ is not None or getattr(cause, "orig", None) is not None:
        cause = getattr(cause, "orig", None) or cause.__cause__
    text = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]
    if isinstance(cause, OSError) and str(cause.filename or "").startswith(str(dagster_home)):
        return f"DAGSTER_HOME={dagster_home} cannot be written: {cause.strerror} ({cause.filename})"
    if type(cause).__module__.startswith("sqlite3") or "database" in text:
        return f"the Dagster instance in DAGSTER_HOME={dagster_home} cannot be used: {text}"
    from cli.dagster_server import ServerError

    if isinstance(exc, ServerError):
        return str(exc)
    return f"{type(cause).__name__}: {text} (--verbose shows the trace)"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _dagster():
    """``import dagster``, without its Beta and Preview warnings (about its own APIs, not for our users)."""
    import warnings

    import dagster as dg

    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    return dg


def _materialize_locked(args, settings, workers: int) -> int:
    from cli.dagster_server import DagsterServer, logs_dir

    print(f"profile={settings.profile} source={settings.diffusiondb} storage={settings.home}")
    if args.dry_run:  # nothing is written to the instance: new parts are planned, not registered
        _dagster()
        return _dry_run(args, settings, workers)
    invocation = uuid.uuid4().hex[:12]
    logs = logs_dir(settings.dagster_home)
    server = DagsterServer(settings.dagster_home, logs / f"dagster-{invocation}.log")
    with contextlib.ExitStack() as stack:
        # The webserver (found, or this invocation's services started now) loads the code while this process
        # imports and plans.  On a fresh DAGSTER_HOME this process creates the instance's storage first:
        # the services creating it at the same moment race it ("table alembic_version already exists").
        fresh = not (Path(settings.dagster_home) / "storage").is_dir()
        if not fresh:  # started before this process's own imports: served 0.6-0.8 s sooner here
            stack.enter_context(server)
        dg = _dagster()
        from cli import runs as orch

        tags = orch.new_invocation_tags(settings.home, invocation)
        instance = dg.DagsterInstance.get()
        orch.apply_default_pool_limits(instance)  # the "gpu" limit holds from the first queued run (its docstring)
        if fresh:
            stack.enter_context(server)
        from assets.data import sync_parts
        from assets.definitions import defs
        from assets.own_images import sync_folders

        if args.select:
            _check_selection(defs, args.select)
        listed = defs.resources["diffusiondb"].source().list_parts()
        folders = defs.resources["images"].list_folders()  # subfolder -> content version (REVERSE_SD_IMAGES)
        runs = orch.InstanceRuns(server.ready().url, instance)
        mismatch = server.settings_mismatch(
            {
                "storage": {"root": defs.resources["storage"].root},
                "diffusiondb": {"location": defs.resources["diffusiondb"].location},
                "images": {"location": defs.resources["images"].location},
            }
        )
        if mismatch:
            print(
                f"error: the Dagster webserver at {server.url} serves this DAGSTER_HOME with other settings "
                f"({mismatch}); run with the settings it was started with, or stop it",
                file=sys.stderr,
            )
            return 2
        new_parts, gone = sync_parts(instance, listed)  # only once the server is known to run these settings
        if new_parts:
            print(f"registered {_count(len(new_parts), 'new DiffusionDB part')}: {new_parts[0]} .. {new_parts[-1]}")
        if gone:
            print(f"unregistered {_count(len(gone), 'part')} the source no longer lists: {', '.join(gone[:10])}")
        new_folders, gone_folders = sync_folders(instance, folders)
        if new_folders:
            print(f"registered {_count(len(new_folders), 'new image folder')}: {', '.join(new_folders[:10])}")
        if gone_folders:
            print(
                f"unregistered {_count(len(gone_folders), 'image folder')} no longer there: {', '.join(gone_folders[:10])}"
            )
        orphans = orch.orphaned_queued_runs(instance, settings.home)
        if orphans:
            orch.stop_runs(runs, orphans)
            print(f"canceled {_count(len(orphans), 'queued run')} of an earlier materialize that was killed")
        lost = orch.runs_whose_worker_is_gone(instance) if server.on_this_machine else []
        if lost:
            runs.force_cancel([r.run_id for r in lost])
            print(
                f"marked {_count(len(lost), 'run')} canceled whose worker process is gone (killed, or the machine "
                f"restarted), so no pool stays held by it: "
                + ", ".join(f"{r.label} (run {r.run_id[:8]}, pid {r.pid})" for r in lost[:10])
            )
        try:
            orch.observe_sources(runs, tags, orch.sources_to_observe(instance, listed, folders))
        except KeyboardInterrupt:  # stop the observation runs too: no run is left behind as STARTED
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            orch.stop_runs(runs, orch.active_runs(instance, invocation))
            raise
        started = time.perf_counter()
        plan = _plan(defs, instance, args, workers)
        _print_blocked(plan)
        if not plan.units:
            print(
                "nothing to materialize: "
                + (
                    "the rest is stopped by failed checks (above)"
                    if plan.blocked
                    else "every selected asset is up to date"
                )
            )
            return 1 if plan.blocked else 0
        where = "this invocation's Dagster services" if server.started else server.url
        print(
            f"{_count(len(plan.units), 'run')} submitted to the Dagster instance as they become ready "
            f"({where}); UI: Runs, tag {orch.INVOCATION_TAG}={invocation}"
        )
        view = _ProgressView(plan, verbose=args.verbose, log_path=logs / f"materialize-{invocation}.log")
        graph = defs.resolve_asset_graph()
        gpu_assets = {k for k in graph.materializable_asset_keys if orch.GPU_POOL in (graph.get(k).pools or ())}
        view.pool_note = lambda: _pool_note(instance, invocation, gpu_assets)
        progress = orch.Progress()
        try:
            orch.run_plan(
                plan,
                runs,
                tags,
                max_active=workers,
                on_submit=view.submitted,
                on_done=view.done,
                on_tick=view.tick,
                progress=progress,
            )
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            view.close()
            active = sorted(set(progress.active) | set(orch.active_runs(instance, invocation)))
            left = orch.stop_runs(runs, active)
            print(
                f"stopped: {_count(len(active) - len(left), 'run')} canceled"
                + (f", {len(left)} still stopping (the instance finishes them)" if left else "")
                + "; `reverse-sd materialize --stale` continues from here",
                file=sys.stderr,
            )
            return 130
        view.close()
    return _summary(args, settings, plan, progress, view, time.perf_counter() - started)


def _pool_note(instance, invocation: str, gpu_assets) -> str:
    """'; the gpu pool is held by ...' when runs of others hold it (this invocation's GPU runs wait for them)."""
    from cli import runs as orch

    holders = orch.pool_holders(instance, invocation, gpu_assets)
    if not holders:
        return ""
    return f"; the {orch.GPU_POOL} pool is held by {', '.join(holders[:3])}, not this command's"


def _plan(defs, instance, args, workers: int, **what_is_new):
    """plan_units for this invocation: its --select, --stale, --partitions-per-run and ``workers``;
    ``what_is_new`` (a dry run's partitions and observations not yet registered) on top."""
    from cli.planning import plan_units

    return plan_units(
        defs,
        instance,
        selection=args.select,
        stale_only=args.stale,
        workers=workers,
        partitions_per_run=args.partitions_per_run,
        **what_is_new,
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _print_blocked(plan) -> None:
    if not plan.blocked:
        return
    by_check: dict[str, list[str]] = {}
    for (key, partition), check in plan.blocked.items():
        by_check.setdefault(check, []).append(key.to_user_string() + (f"[{partition}]" if partition else ""))
    for check, pairs in by_check.items():
        more = f" and {len(pairs) - 6} more" if len(pairs) > 6 else ""
        print(
            f"stopped by a failed blocking check: {check}; not rebuilt: {', '.join(pairs[:6])}{more} "
            "(fix the cause and rebuild the checked asset, e.g. --select with its name)",
            file=sys.stderr,
        )


def _dry_run(args, settings, workers: int) -> int:
    import dagster as dg

    from assets.data import diffusiondb_source, part_changes, parts_partitions
    from assets.definitions import defs
    from assets.own_images import folder_changes, folders_partitions, images_source
    from assets.training import training_settings, training_settings_versions

    if args.select:
        _check_selection(defs, args.select)
    instance = dg.DagsterInstance.get()
    listed = defs.resources["diffusiondb"].list_parts(create=False)  # part -> version, listed once; no sample made
    new_parts, gone = part_changes(instance, listed)
    if new_parts:
        print(f"would register {_count(len(new_parts), 'new DiffusionDB part')}: {new_parts[0]} .. {new_parts[-1]}")
    if gone:
        print(f"would unregister {_count(len(gone), 'part')} the source no longer lists: {', '.join(gone[:10])}")
    folders = defs.resources["images"].list_folders()
    new_folders, gone_folders = folder_changes(instance, folders)
    if new_folders:
        print(f"would register {_count(len(new_folders), 'new image folder')}: {', '.join(new_folders[:10])}")
    started = time.perf_counter()
    plan = _plan(
        defs,
        instance,
        args,
        workers,
        extra_partitions={parts_partitions.name: new_parts, folders_partitions.name: new_folders},
        gone_partitions=[*gone, *gone_folders],
        observed_now={
            training_settings.key: training_settings_versions(),
            diffusiondb_source.key: listed,
            images_source.key: folders,
        },
    )
    planned_in = time.perf_counter() - started
    _print_blocked(plan)
    if not plan.units:
        print("nothing to materialize: every selected asset is up to date")
        return 0
    print(f"would materialize {_count(len(plan.units), 'run')} (planned in {planned_in:.1f} s):")
    for stage in plan.stages:
        names = ",".join(k.to_user_string() for k in stage.asset_keys)
        keys = [k for k in stage.partition_keys if k is not None]
        print(f"  {names} [{len(stage.partition_keys)}]" + (": " + " ".join(keys) if keys else ""))
    return 0


class _ProgressView:
    """On a terminal: a live line per stage (partitions done/total, running, failed, elapsed, ETA).  Elsewhere:
    one line per finished run, and a line at least every 15 s while runs are going."""

    HEARTBEAT = 15.0
    pool_note: Callable[[], str] = staticmethod(lambda: "")  # why queued runs wait, asked once a heartbeat

    def __init__(self, plan, verbose: bool, log_path: Path):
        self.live = sys.stderr.isatty() and not verbose
        self.verbose, self.log_path = verbose, log_path
        self.started = self.last_line = time.monotonic()
        self.drawn = 0
        self.note, self.last_note = "", float("-inf")
        self.totals: dict[str, int] = {}
        self.done_count: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.stage_of_run: dict[str, str] = {}  # run id -> its stage, for the running count per stage
        for unit in plan.units:
            name = self._stage(unit)
            self.totals[name] = self.totals.get(name, 0) + len(unit.partition_keys)

    @staticmethod
    def _stage(unit) -> str:
        return ",".join(k.to_user_string() for k in unit.asset_keys)

    def submitted(self, unit, run_id: str) -> None:
        self.stage_of_run[run_id] = self._stage(unit)

    def done(self, outcome) -> None:
        name = self._stage(outcome.unit)
        if outcome.split_into:
            line = f"{outcome.unit.label} failed as one run: running its {outcome.split_into} partitions one by one"
        else:
            bucket = self.done_count if outcome.success else self.failed
            bucket[name] = bucket.get(name, 0) + len(outcome.unit.partition_keys)
            state = "done" if outcome.success else "FAILED"
            line = f"{state} {outcome.unit.label} in {outcome.seconds:.1f} s (run {outcome.run_id[:8]})"
        if outcome.detail:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as log:
                log.write(f"==== {outcome.unit.label} (run {outcome.run_id})\n{outcome.detail}\n\n")
            if self.verbose:
                line += "\n" + outcome.detail
        if self.live:
            if not outcome.success:
                self._clear()
                print(line, file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)
            self.last_line = time.monotonic()

    def tick(self, progress) -> None:
        now = time.monotonic()
        if self.live:
            self._clear()
            lines = []
            running = [self.stage_of_run.get(run_id) for run_id in progress.active]
            for name, total in self.totals.items():
                done, failed = self.done_count.get(name, 0), self.failed.get(name, 0)
                elapsed = now - self.started
                eta = (elapsed / done * (total - done - failed)) if done and done + failed < total else 0
                state = f"{done}/{total} done" + (f", {failed} failed" if failed else "")
                if running.count(name):
                    state += f", {running.count(name)} in flight"
                lines.append(f"  {name[:48]:<48} {state:<34}" + (f" ETA {eta:4.0f} s" if eta else ""))
            if now - self.last_note >= self.HEARTBEAT:
                self.note, self.last_note = self.pool_note(), now
            lines.append(
                f"  {len(progress.active)} run(s) queued or running, {now - self.started:.0f} s elapsed{self.note}"
            )
            sys.stderr.write("\n".join(lines) + "\n")
            sys.stderr.flush()
            self.drawn = len(lines)
        elif now - self.last_line >= self.HEARTBEAT:
            print(
                f"... {len(progress.active)} run(s) queued or running, {sum(self.done_count.values())} partitions "
                f"done, {now - self.started:.0f} s elapsed{self.pool_note()}",
                file=sys.stderr,
                flush=True,
            )
            self.last_line = now

    def _clear(self) -> None:
        if self.drawn:
            sys.stderr.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def close(self) -> None:
        if self.live:
            self._clear()
            sys.stderr.flush()


def _summary(args, settings, plan, progress, view, elapsed: float) -> int:
    failed = [o for o in progress.outcomes if not o.success and not o.split_into]
    runs = len(progress.outcomes)
    if failed or progress.not_run or plan.blocked:
        for outcome in failed:
            for line in outcome.failures or ["failed"]:
                step = outcome.unit.asset_keys[0].to_python_identifier() + ": "
                if len(outcome.unit.asset_keys) == 1 and line.startswith(step):
                    line = line[len(step) :]
                print(f"failed: {outcome.unit.label}: {line} (run {outcome.run_id})", file=sys.stderr)
        if progress.not_run:
            names = ", ".join(u.label for u in progress.not_run[:10])
            more = f" and {len(progress.not_run) - 10} more" if len(progress.not_run) > 10 else ""
            print(f"not run (upstream failed): {names}{more}", file=sys.stderr)
        done = sum(o.success for o in progress.outcomes)
        print(
            f"error: {len(failed)} of {_count(runs, 'run')} failed, {done} succeeded in {elapsed:.0f} s"
            + (f", {len(plan.blocked)} left out by failed checks" if plan.blocked else "")
            + "; "
            + (f"full errors in {view.log_path}; " if view.log_path.exists() else "")
            + "every run is in the UI (make ui)",
            file=sys.stderr,
        )
        return 1
    print(f"materialized {_count(runs, 'run')} in {elapsed:.0f} s")
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
