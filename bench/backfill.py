"""The two public ways to hand the sample graph to Dagster, side by side on this machine, each from a fresh
storage root and instance:

- **runs** (what `reverse-sd materialize` does): one run per (stage, partition or range), submitted with
  GraphQL ``launchMultipleRuns`` as soon as everything it reads has succeeded;
- **one backfill**: the whole graph (every materializable asset, all partitions) as one GraphQL
  ``launchPartitionBackfill`` (``assetSelection`` + ``allPartitions``), which the daemon's backfill loop
  walks stage by stage, each asset's BackfillPolicy applied.

Both start the same way (the Dagster services for the invocation, new parts registered, the three observation
runs), so the difference is the submission. Printed: whole-command seconds, seconds from submission to the
last run's end, runs, and the ratio backfill / runs.

    python bench/backfill.py                      # sample 4 parts x 250 images, as make run
    python bench/backfill.py --parts 8            # a larger sample

On a smaller sample than make run's (2 x 60, say), the tiny models do not beat the mean training embedding, the
blocking check beats_mean_embedding_baseline stops the graph, and the bench says so and exits 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "tests"))
from environments import sample_env  # noqa: E402  (the tests' subprocess environment, as bench/materialize.py)

_LAUNCH_BACKFILL = """mutation($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
_BACKFILL_STATUS = """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
  __typename ... on PartitionBackfill { status } ... on PythonError { message } } }"""
_DONE = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}


def as_one_backfill() -> dict:
    """In the child process: start as `materialize` does, then submit the graph as one backfill and wait."""
    import warnings

    warnings.filterwarnings("ignore")
    import dagster as dg

    from assets.data import sync_parts
    from assets.definitions import defs
    from assets.own_images import sync_folders
    from cli import runs as orch
    from cli.dagster_server import DagsterServer, graphql, logs_dir
    from resources.settings import ensure_dagster_home, load_settings

    settings = load_settings()
    ensure_dagster_home(settings)
    instance = dg.DagsterInstance.get()
    tags = orch.new_invocation_tags(settings.home)
    with DagsterServer(settings.dagster_home, logs_dir(settings.dagster_home) / "dagster-bench.log") as server:
        runs = orch.InstanceRuns(server.ready().url, instance)
        sync_parts(instance, defs.resources["diffusiondb"].source().list_parts())
        sync_folders(instance, defs.resources["images"].list_folders())
        orch.observe_sources(runs, tags)
        graph = defs.resolve_asset_graph()
        keys = sorted(graph.materializable_asset_keys)
        submitted = time.time()
        params = {
            "assetSelection": [{"path": key.path} for key in keys],
            "allPartitions": True,
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
            "title": "bench: sample graph as one backfill",
        }
        result = graphql(server.url, _LAUNCH_BACKFILL, {"params": params}, timeout=120)["launchPartitionBackfill"]
        if result["__typename"] != "LaunchBackfillSuccess":
            raise SystemExit(f"launchPartitionBackfill: {result}")
        backfill_id = result["backfillId"]
        while True:
            status = graphql(server.url, _BACKFILL_STATUS, {"id": backfill_id})["partitionBackfillOrError"]
            if status.get("status") in _DONE:
                break
            time.sleep(1)
        noticed = time.time()
        backfill_runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
        failed = [r.run_id for r in backfill_runs if r.status != dg.DagsterRunStatus.SUCCESS]
        ends = [r.end_time for r in instance.get_run_records(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))]
        return {
            "status": status["status"],
            "runs": len(backfill_runs),
            "failed": failed,
            # the last run's end, not when the daemon marks the backfill done (its next loop)
            "submit_to_done": max((e for e in ends if e), default=noticed) - submitted,
            "marked_done_after": noticed - submitted,
        }


def _child(kind: str, root: Path, parts: int, images: int) -> dict:
    env = sample_env(
        root,
        PYTHONWARNINGS="ignore",
        REVERSE_SD_SAMPLE_PARTS=str(parts),
        REVERSE_SD_SAMPLE_IMAGES_PER_PART=str(images),
    )
    command = (
        [sys.executable, "-m", "cli.main", "materialize"] if kind == "runs" else [sys.executable, __file__, "--child"]
    )
    started = time.perf_counter()
    done = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    print(f"  {kind}: {seconds:.1f} s", file=sys.stderr, flush=True)
    result = json.loads(done.stdout.strip().splitlines()[-1]) if kind == "backfill" else {}
    if result.get("failed"):
        raise SystemExit(f"backfill runs failed: {result['failed']}")
    return {"whole": seconds, **result, **({} if kind == "backfill" else _runs_of(root))}


def _runs_of(root: Path) -> dict:
    """Runs and submission-to-last-end of the `materialize` invocation in ``root``'s instance (the observation
    runs left out, as in the backfill's figure)."""
    code = (
        "import json, dagster as dg\n"
        "i = dg.DagsterInstance.get()\n"
        "rs = [r for r in i.get_run_records() if not r.dagster_run.job_name.startswith('observe_')]\n"
        "print(json.dumps(dict(runs=len(rs), submit_to_done=max(r.end_time for r in rs) - min(r.create_timestamp.timestamp() for r in rs))))"
    )
    env = sample_env(root, PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, default=4, help="sample parts (default 4, as make run; fewer: see above)")
    parser.add_argument("--images", type=int, default=250, help="images per sample part (default 250)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(as_one_backfill()))
        return
    figures = {}
    for kind in ("runs", "backfill"):
        with tempfile.TemporaryDirectory() as tmp:
            figures[kind] = _child(kind, Path(tmp), args.parts, args.images)
    runs, backfill = figures["runs"], figures["backfill"]
    print(f"sample graph, {args.parts} parts x {args.images} images; ratio = one backfill / runs")
    print(f"{'':36} {'runs (materialize)':>20} {'one backfill':>14} {'ratio':>7}")
    for label, key in (("whole command (s)", "whole"), ("submission to last run end (s)", "submit_to_done")):
        print(f"{label:36} {runs[key]:20.1f} {backfill[key]:14.1f} {backfill[key] / runs[key]:7.2f}")
    print(f"{'runs':36} {runs['runs']:20d} {backfill['runs']:14d}")


if __name__ == "__main__":
    main()
