"""`reverse-sd materialize` through the Dagster instance (this checkout) against the in-process executor it
replaced (a git worktree of an earlier commit), side by side on this machine:

- the sample graph, as `make run` builds it (wall time of the whole command, fresh root and instance each);
- ingest of many small parts in ranged runs: wall time per part, and what one more part costs (the slope
  between a quarter of the parts and all of them, so the command's fixed start is left out; each repetition
  gives its own slope, and the median is kept);
- planning with 2,000 registered parts (`plan_units`, a full plan and a --stale plan).

    python bench/materialize.py                         # sample 4 x 250, 400 tiny parts, baseline a9db728
    python bench/materialize.py --skip-graph --tiny-parts 100 --baseline <commit>   # ingest and planning only

A sample smaller than make run's (--parts, --images) fails the blocking check beats_mean_embedding_baseline
(tiny models do not beat the mean training embedding on a few dozen images) and the graph stops there.

Each contender runs alone (one after the other), with the same environment; the printed ratio is
this checkout / baseline.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

PROJECT = Path(__file__).resolve().parents[1]


sys.path.insert(0, str(PROJECT / "tests"))
from environments import sample_env  # noqa: E402  (the tests' subprocess environment, so both measure the same)


def _env(root: Path, **extra: str) -> dict[str, str]:
    """The tests' sample environment under ``root``, with Python's warnings kept out of the timed output."""
    return sample_env(root, PYTHONWARNINGS="ignore", **extra)


def _cli(checkout: Path, args: list[str], env: dict[str, str]) -> float:
    """Seconds of one `reverse-sd materialize` run of ``checkout``'s code (fails loudly)."""
    module = "cli.main" if (checkout / "cli" / "main.py").exists() else "assets.cli"  # before cli/ existed
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=checkout, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    print(f"  {checkout.name}: {' '.join(args)}: {seconds:.1f} s", file=sys.stderr, flush=True)
    if done.returncode != 0:
        raise SystemExit(f"{checkout}: {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return seconds


def baseline_checkout(commit: str) -> Path:
    where = Path(tempfile.gettempdir()) / f"reverse-sd-baseline-{commit[:12]}"
    if not where.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(where), commit], cwd=PROJECT, check=True)
    return where


def sample_graph(checkout: Path, parts: int, images: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        env = _env(Path(tmp), REVERSE_SD_SAMPLE_PARTS=str(parts), REVERSE_SD_SAMPLE_IMAGES_PER_PART=str(images))
        return _cli(checkout, ["materialize"], env)


def tiny_parts(checkout: Path, n: int) -> float:
    """Wall time to ingest ``n`` parts of 4 tiny images (the CLI's default ranges), the mirror made first."""
    sys.path.insert(0, str(PROJECT))
    from pipeline.data.sample_data import generate_sample_mirror

    with tempfile.TemporaryDirectory() as tmp:
        mirror = Path(tmp) / "mirror"
        generate_sample_mirror(mirror, n_parts=n, images_per_part=4, image_size=64)
        env = _env(Path(tmp), REVERSE_SD_DIFFUSIONDB=str(mirror))
        return _cli(checkout, ["materialize", "--select", "diffusiondb_parts"], env)


PLAN = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import dagster as dg
from resources.settings import ensure_dagster_home, load_settings
ensure_dagster_home(load_settings())
import os
if os.path.exists("cli/planning.py"):
    from cli.planning import plan_units
else:  # a checkout from before cli/ existed
    from assets.planning import plan_units
from assets.definitions import defs
instance = dg.DagsterInstance.get()
instance.add_dynamic_partitions("diffusiondb_part", [f"part-{i:06d}" for i in range(1, 2001)])
t0 = time.perf_counter(); plan = plan_units(defs, instance); t1 = time.perf_counter()
plan_units(defs, instance, stale_only=True); t2 = time.perf_counter()
print(json.dumps(dict(plan=t1 - t0, stale=t2 - t1, runs=len(plan.units))))
"""


def planning(checkout: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [sys.executable, "-c", PLAN], cwd=checkout, env=_env(Path(tmp)), capture_output=True, text=True
        )
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-tiny", action="store_true", help="leave out the tiny-parts ingest")
    parser.add_argument("--baseline", default="a9db728", help="the commit to compare with (default a9db728)")
    parser.add_argument("--parts", type=int, default=4, help="sample parts (default 4, as make run)")
    parser.add_argument("--images", type=int, default=250, help="images per sample part (default 250)")
    parser.add_argument(
        "--tiny-parts",
        type=int,
        default=400,
        help="tiny parts for the per-part cost, also run with a quarter of them for the slope; up to 400 parts, "
        "both sizes run in the same 8 ranges on 2 workers (default 400)",
    )
    parser.add_argument("--skip-graph", action="store_true", help="leave out the whole-graph run")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of each tiny-parts size per contender, the fastest kept: on 2 cores one run varies by a few "
        "seconds, as much as the slope it measures (default 3)",
    )
    args = parser.parse_args()
    base = baseline_checkout(args.baseline)
    contenders = {"queue (this checkout)": PROJECT, f"in-process ({args.baseline})": base}
    rows, tiny = [], {}
    if not args.skip_graph:
        graph = {name: sample_graph(where, args.parts, args.images) for name, where in contenders.items()}
        rows.append(("sample graph, whole command (s)", *graph.values()))
    small, large = args.tiny_parts // 4, args.tiny_parts
    # The contenders take turns in each repetition, so a slow spell of the machine does not hit one of them only.
    times: dict[str, list[list[float]]] = {name: [[], []] for name in contenders}
    for _ in range(0 if args.skip_tiny else args.repeat):
        for name, where in contenders.items():
            for size, seconds in zip((small, large), times[name]):
                seconds.append(tiny_parts(where, size))
    tiny = {name: (min(t[0]), min(t[1])) for name, t in times.items() if t[0]}
    if tiny:
        rows.append(
            (f"ingest, {large} tiny parts: s per part (best of {args.repeat})", *(t[1] / large for t in tiny.values()))
        )
        # What one more part costs, the command's fixed start (server, observation, planning) taken out: the
        # difference between two sizes, as the same ranges (four runs per worker) cover both.  Each repetition
        # gives one slope from its own pair of runs; the median of them is kept, and their spread printed, since
        # one run varies by seconds.
        slopes = {name: sorted((b - a) / (large - small) for a, b in zip(*t)) for name, t in times.items()}
        rows.append((f"one more part ({small} -> {large}): s, median", *(median(s) for s in slopes.values())))
        for name, s in slopes.items():
            print(f"  {name}: one more part, each repetition: {', '.join(f'{x:.4f}' for x in s)} s", file=sys.stderr)
    plans = {name: planning(where) for name, where in contenders.items()}
    rows.append(("plan 2,000 parts (s)", *(p["plan"] for p in plans.values())))
    rows.append(("plan --stale 2,000 parts (s)", *(p["stale"] for p in plans.values())))
    names = list(contenders)
    print(f"{'':40} {names[0]:>24} {names[1]:>24} {'ratio':>7}")
    for label, new, old in rows:
        print(f"{label:40} {new:24.3f} {old:24.3f} {new / old:7.2f}")


if __name__ == "__main__":
    main()
