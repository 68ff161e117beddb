"""bench/image_store: a training split's images as a Python list of bytes (how load_split held them before)
versus pipeline.data.image_store's memory-mapped Arrow file, on N synthetic images in P Parquet parts laid out
like diffusiondb_parts.

Each contender runs in a fresh child process and reports, from /proc/self/status: the private (anonymous)
memory it holds once the split is loaded and after one shuffled pass reading every image (RssAnon: what
each DataLoader worker and DDP rank would duplicate), its peak RSS growth while loading (VmHWM), the load
time, and the shuffled read rate.  The mapped file's pages are page cache (RssFile), shared by every
process and reclaimable, so they are printed apart.

    .venv/bin/python bench/image_store.py [--n 20000] [--parts 20] [--kb 32]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import polars as pl
from options import INTERNAL, add_options, bench_parser

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline.data.image_store import split_images  # noqa: E402


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_parts(directory: str, n: int, parts: int, kb: int) -> pl.DataFrame:
    """P Parquet parts (image_id, image: incompressible bytes of ~kb KiB); returns the (image_id, part) rows."""
    rng = np.random.default_rng(0)
    rows = []
    for p in range(parts):
        part = f"part-{p:06d}"
        ids = [f"{p:06d}-{i:07d}" for i in range(n // parts)]
        blobs = [rng.bytes(kb * 1024 + int(rng.integers(-512, 512))) for _ in ids]
        pl.DataFrame({"image_id": ids, "image": blobs}).write_parquet(os.path.join(directory, f"{part}.parquet"))
        rows += [(i, part) for i in ids]
    return pl.DataFrame(rows, schema=["image_id", "part"], orient="row").sort("image_id")


def _read_part(directory: str):
    def read(part: str, ids: list[str]) -> pl.DataFrame:
        return pl.read_parquet(os.path.join(directory, f"{part}.parquet")).filter(pl.col("image_id").is_in(ids))

    return read


def as_list(directory: str, rows: pl.DataFrame):
    """The previous load_split: every part read, joined, concatenated, image bytes to a Python list."""
    read = _read_part(directory)
    chunks = [
        group.join(read(part, group["image_id"].to_list()), on="image_id")
        for (part,), group in rows.group_by("part", maintain_order=True)
    ]
    return pl.concat(chunks).sort("image_id")["image"].to_list()


def as_mapped_file(directory: str, rows: pl.DataFrame):
    column, _ = split_images(rows, _read_part(directory), lambda part: "v1", os.path.join(directory, "cache"), "train")
    return column


CONTENDERS = {"python list": as_list, "mapped file": as_mapped_file}


def child(which: str, directory: str, out: str) -> None:
    rows = pl.read_parquet(os.path.join(directory, "rows.parquet"))
    anon_before = _status_mb("RssAnon")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM
    rss_before = _status_mb("VmRSS")
    started = time.perf_counter()
    images = CONTENDERS[which](directory, rows)
    load_s = time.perf_counter() - started
    peak_growth = _status_mb("VmHWM") - rss_before
    anon_loaded = _status_mb("RssAnon") - anon_before
    order = np.random.default_rng(1).permutation(len(images))
    started = time.perf_counter()
    total = sum(len(images[int(i)]) for i in order)
    read_s = time.perf_counter() - started
    result = {
        "load_s": load_s,
        "peak_growth_mb": peak_growth,
        "anon_loaded_mb": anon_loaded,
        "anon_after_pass_mb": _status_mb("RssAnon") - anon_before,
        "file_mb": _status_mb("RssFile"),
        "images_per_s": len(order) / read_s,
        "bytes": total,
    }
    with open(out, "w") as f:
        json.dump(result, f)


def main() -> None:
    parser = add_options(
        bench_parser(__doc__),
        n=(20_000, "images of the split"),
        parts=(20, "Parquet parts they are spread over"),
        kb=(32, "KiB per image"),
        child=(None, INTERNAL),
        dir=(None, INTERNAL),
        out=(None, INTERNAL),
    )
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dir, args.out)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows = make_parts(tmp, args.n, args.parts, args.kb)
        rows.write_parquet(os.path.join(tmp, "rows.parquet"))
        for which in ["python list", "mapped file", "mapped file"]:
            label = which if which not in results else which + " (cached)"
            out = os.path.join(tmp, "result.json")
            subprocess.run([sys.executable, __file__, "--child", which, "--dir", tmp, "--out", out], check=True)
            with open(out) as f:
                results[label] = json.load(f)
    size_mb = results["python list"]["bytes"] / 2**20
    print(f"{args.n:,} images of ~{args.kb} KiB ({size_mb:.0f} MiB) in {args.parts} parts; {os.cpu_count()} CPU cores")
    print(
        f"{'contender':<22}{'load s':>8}{'peak growth MB':>16}{'private MB':>12}{'private after pass':>20}"
        f"{'page cache MB':>15}{'images/s':>10}"
    )
    for label, r in results.items():
        print(
            f"{label:<22}{r['load_s']:>8.2f}{r['peak_growth_mb']:>16.0f}{r['anon_loaded_mb']:>12.0f}"
            f"{r['anon_after_pass_mb']:>20.0f}{r['file_mb']:>15.0f}{r['images_per_s']:>10.0f}"
        )
    ratio = results["python list"]["anon_after_pass_mb"] / max(
        results["mapped file (cached)"]["anon_after_pass_mb"], 1.0
    )
    print(
        f"private memory per process after a pass: {ratio:.0f}x less with the mapped file; "
        f"the list's grows with the split (~{size_mb / args.n * 730_000 / 1024:.0f} GiB for 730k such images), "
        "the mapped file's does not"
    )


if __name__ == "__main__":
    main()
