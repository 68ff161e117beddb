"""Ingest at scale: diffusiondb_parts through the real Dagster runs, 1 worker against all cores, and the
per-run overhead and planning time at DiffusionDB-2M's 2,000 parts.

    python bench/ingest.py                      # 4 parts x 250 PNGs of 512 px (about 400 KB each)
    python bench/ingest.py --parts 8 --images-per-part 1000 --workers 16
    python bench/ingest.py --tiny-parts 2000    # planning and run overhead at DiffusionDB-2M's part count

What it builds: a mirror in DiffusionDB's layout whose PNGs are 512 x 512 with grain added so that each
weighs about what DiffusionDB's do (~400 KB; the script prints the measured mean), then materializes
diffusiondb_parts with `reverse-sd materialize` (its runs through the instance's queue and run launcher),
on a fresh storage root and Dagster instance per contender; the clock covers the runs (first enqueued to
last finished), and the command's own start (webserver, observations) is printed separately.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def add_grain(root: Path, sigma: float, seed: int = 0) -> float:
    """Re-encode every PNG of the mirror with Gaussian grain; return the mean PNG size in KB."""
    rng = np.random.default_rng(seed)
    sizes = []
    for archive in sorted((root / "images").glob("part-*.zip")):
        rewritten = archive.with_suffix(".tmp")
        with zipfile.ZipFile(archive) as src, zipfile.ZipFile(rewritten, "w", zipfile.ZIP_STORED) as dst:
            for info in src.infolist():
                data = src.read(info)
                if info.filename.endswith(".png"):
                    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
                    pixels += rng.normal(0.0, sigma, pixels.shape)
                    buffer = io.BytesIO()
                    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "PNG", compress_level=1)
                    data = buffer.getvalue()
                    sizes.append(len(data))
                dst.writestr(info.filename, data)
        os.replace(rewritten, archive)
    return float(np.mean(sizes)) / 1024 if sizes else 0.0


def _environment(workdir: Path, mirror: Path) -> None:
    os.environ.update(
        REVERSE_SD_PROFILE="sample",
        REVERSE_SD_HOME=str(workdir / "data"),
        REVERSE_SD_DIFFUSIONDB=str(mirror),
        DAGSTER_HOME=str(workdir / "dagster_home"),
        HF_HUB_OFFLINE="1",
    )


def materialize_parts(workdir: Path, mirror: Path, workers: int, per_run: int | None = 1) -> dict:
    """Materialize every part of ``mirror`` with `reverse-sd materialize` (runs through the instance's queue and
    launcher, at most ``workers`` at once), ``per_run`` parts per run (None: the CLI's default ranges); seconds
    (the runs, from the first enqueued to the last finished; ``setup``: the command's start, server and
    observations before them) and counts from the instance's records."""
    import json
    import subprocess

    args = ["materialize", "--select", "diffusiondb_parts", "--workers", str(workers)]
    if per_run is not None:
        args += ["--partitions-per-run", str(per_run)]
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ},
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    code = """
import json, warnings
warnings.filterwarnings("ignore")
import dagster as dg
instance = dg.DagsterInstance.get()
runs = [r for r in instance.get_run_records() if r.dagster_run.job_name.startswith("materialize_diffusiondb")]
records, cursor = [], None
while True:  # Dagster hands out at most 10,000 event records per call
    page = instance.fetch_materializations(dg.AssetKey("diffusiondb_parts"), limit=10000, cursor=cursor)
    records += page.records
    if not page.has_more:
        break
    cursor = page.cursor
print(json.dumps(dict(
    runs=len(runs), parts=len(records), ok=len(records),
    work=sum(r.asset_materialization.metadata["seconds"].value for r in records),
    first=min(r.create_timestamp.timestamp() for r in runs), last=max(r.end_time for r in runs),
    run_seconds=sum(r.end_time - r.start_time for r in runs))))
"""
    stats = subprocess.run([sys.executable, "-c", code], env={**os.environ}, capture_output=True, text=True)
    if stats.returncode != 0:
        raise SystemExit(stats.stderr[-3000:])
    result = json.loads(stats.stdout.strip().splitlines()[-1])
    result["seconds"] = result["last"] - result["first"]
    result["worker_start"] = wall - result["seconds"]  # the command's own start, server and observations
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, default=4, help="parts of the realistic mirror (default 4)")
    parser.add_argument(
        "--images-per-part", type=int, default=250, help="PNGs per part (default 250; DiffusionDB: 1000)"
    )
    parser.add_argument(
        "--sigma", type=float, default=10.0, help="grain that brings PNGs to DiffusionDB's size (default 10)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="the parallel contender's workers (default: the cores)"
    )
    parser.add_argument(
        "--tiny-parts", type=int, default=2000, help="parts of four 64-px images for the overhead part (default 2000)"
    )
    parser.add_argument(
        "--tiny-runs", type=int, default=200, help="of those, how many to run (default 200; all are planned)"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from pipeline.data.sample_data import generate_sample_mirror
    from resources.settings import available_cores

    workers = args.workers or available_cores()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        tmp = Path(tmp)
        mirror = tmp / "mirror"
        t0 = time.perf_counter()
        generate_sample_mirror(mirror, n_parts=args.parts, images_per_part=args.images_per_part, image_size=512)
        kb = add_grain(mirror, args.sigma)
        print(
            f"mirror: {args.parts} parts x {args.images_per_part} PNGs of 512 px, mean PNG {kb:.0f} KB "
            f"(built in {time.perf_counter() - t0:.0f} s)"
        )
        images = args.parts * args.images_per_part
        rows = []
        for n in sorted({1, workers}):
            work = tmp / f"w{n}"
            work.mkdir()
            _environment(work, mirror)
            result = materialize_parts(work, mirror, n)
            assert result["ok"] == result["runs"] == args.parts, result
            rows.append((n, result))
        print(f"\n{'workers':>8} {'images/s':>10} {'seconds':>8} {'vs 1 worker':>12} {'start (s)':>17}")
        base = images / rows[0][1]["seconds"]
        for n, r in rows:
            rate = images / r["seconds"]
            print(f"{n:>8} {rate:>10.1f} {r['seconds']:>8.1f} {rate / base:>11.2f}x {r['worker_start']:>17.1f}")

        # Planning and per-run overhead at DiffusionDB-2M's part count: parts of four small images each.
        tiny = tmp / "tiny_mirror"
        generate_sample_mirror(tiny, n_parts=args.tiny_parts, images_per_part=4, image_size=64)
        work = tmp / "tiny"
        work.mkdir()
        _environment(work, tiny)
        subset = tmp / "tiny_subset"
        (subset / "images").mkdir(parents=True)
        for archive in sorted((tiny / "images").glob("part-*.zip"))[: args.tiny_runs]:
            os.link(archive, subset / "images" / archive.name)
        os.link(tiny / "metadata.parquet", subset / "metadata.parquet")
        _environment(work, subset)
        print(f"\nrun overhead: {args.tiny_runs} parts of four 64-px images, {workers} workers")
        print(
            f"{'runs of':>18} {'runs':>6} {'seconds':>8} {'s per part (wall)':>18} {'s inside each run':>18} "
            f"{'overhead per part':>18}"
        )
        for label, per_run in (("one part each", 1), ("ranges (default)", None)):
            work = tmp / f"tiny-{per_run}"
            work.mkdir()
            _environment(work, subset)
            result = materialize_parts(work, subset, workers, per_run)
            assert result["parts"] == args.tiny_runs, result
            per_part = result["seconds"] / result["parts"]
            print(
                f"{label:>18} {result['runs']:>6} {result['seconds']:>8.1f} {per_part:>18.3f} "
                f"{result['run_seconds'] / result['runs']:>18.3f} "
                f"{(result['run_seconds'] - result['work']) / result['parts']:>18.3f}"
            )
            print(
                f"{'':>18} -> {args.tiny_parts} parts: about {per_part * args.tiny_parts / 60:.1f} min at {workers} workers"
            )
        plan_work = tmp / "plan"
        plan_work.mkdir()
        _environment(plan_work, tiny)
        result = materialize_parts_plan_only(plan_work)
        print(
            f"planning {args.tiny_parts} registered parts (whole graph): {result['plan']:.2f} s; "
            f"--stale planning: {result['stale']:.2f} s ({result['units']} runs)"
        )


def materialize_parts_plan_only(workdir: Path) -> dict:
    import json
    import subprocess

    code = f"""
import json, sys, time, warnings
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
warnings.filterwarnings("ignore")
import dagster as dg
from resources.settings import ensure_dagster_home, load_settings
ensure_dagster_home(load_settings())
from cli.planning import plan_units
from assets.data import register_parts
from assets.definitions import defs
instance = dg.DagsterInstance.get()
register_parts(instance, defs.resources["diffusiondb"])
t0 = time.perf_counter(); plan = plan_units(defs, instance); t1 = time.perf_counter()
plan_units(defs, instance, stale_only=True); t2 = time.perf_counter()
print(json.dumps(dict(plan=t1 - t0, stale=t2 - t1, units=len(plan.units))))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ}, capture_output=True, text=True, cwd=workdir
    )
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
