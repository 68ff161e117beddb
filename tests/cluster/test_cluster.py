"""The Celery deployment (deploy/celery/) on one machine, as it would run on several: `make test-cluster`.

Started here, each on a free port, and stopped in a ``finally`` whatever happens:
- PostgreSQL (the Dagster instance), Redis (Celery's broker and result backend), moto's S3 server (the storage
  root, ``REVERSE_SD_HOME=s3://...``);
- the control host: a code server, the webserver and the daemon (the run queue, run monitoring), with
  deploy/celery/dagster.yaml (CeleryRunLauncher);
- two Celery workers (``dagster-celery worker start``, ``--pool=solo``), each in its own network namespace
  (a veth pair to a bridge: a namespace's 127.0.0.1 is its own, so they reach the servers only as another
  machine would) with its own HOME, TMPDIR, cache, DAGSTER_HOME and working directory.  Where namespaces are
  refused (not root) they run as plain processes, still with nothing local in common.

Then ``reverse-sd materialize`` of the whole graph on a small sample into the bucket, through the operator's
webserver (REVERSE_SD_DAGSTER_URL).  While a training run executes, its worker is killed with kill -9: run
monitoring fails the run (the worker's heartbeat stops, resources/celery_launcher.py), the command reports
it and exits 1; the worker is restarted and ``materialize --stale`` finishes what is left.  Asserted: runs
landed on both workers; every artifact of the single-machine run is an object in the bucket, and none is on
any local disk; the figures equal those of a single-machine ``reverse-sd materialize`` of the same sample
(local storage root) to float tolerance: every model's predictions, difficulty scores and prompt embeddings,
each blocking check's verdict and figures, and the report's figures (reports/evaluation.json).

The sample is 2 parts x 16 images, 1 epoch: the cluster's mechanics, not the method, are under test.  On a
sample this small the tiny models do not all beat the mean-embedding baseline, so the test sets
REVERSE_SD_BASELINE_CHECK=warn: the check still runs and its verdicts are compared, but it stops nothing, and
the ensemble, DAKL and the report are built and compared too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from servers import BIN, PROJECT, Hosts, MotoS3, Postgres, Redis, free_port, http_ok, spawn

from cli.processes import stop_process_group

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

SAMPLE = {
    "REVERSE_SD_PROFILE": "sample",
    "REVERSE_SD_SAMPLE_PARTS": "2",
    "REVERSE_SD_SAMPLE_IMAGES_PER_PART": "16",
    "REVERSE_SD_TRAIN_EPOCHS": "1",
    "REVERSE_SD_BASELINE_CHECK": "warn",  # flag, not stop: the whole graph down to the report
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # one thread everywhere: the same float reductions in the workers as in the single-machine run
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
WORKERS = ("worker-a", "worker-b")
WORKER_TAG = "reverse-sd/celery-worker"
KILL_JOB = "materialize_trained_models"  # a gpu-pool training run, killed mid-run
COMPARED = ("model_predictions/", "difficulty_scores/", "prompt_embeddings.parquet", "ensemble_predictions", "dakl")
TOLERANCE = 1e-4


def _base_env() -> dict[str, str]:
    """This environment without any reverse-sd, Dagster, AWS or Celery setting of the calling shell."""
    prefixes = ("REVERSE_SD_", "DAGSTER_", "AWS_", "CELERY")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes) and k != "HF_TOKEN"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(PROJECT)
    return {**env, **SAMPLE}


def _machine(root: Path, name: str) -> dict[str, str]:
    """A "machine": its own HOME, TMPDIR, cache and DAGSTER_HOME (deploy/celery/dagster.yaml) under root/name."""
    base = root / name
    dirs = {key: base / sub for key, sub in (("HOME", "home"), ("TMPDIR", "tmp"), ("XDG_CACHE_HOME", "cache"))}
    dirs["DAGSTER_HOME"] = base / "dagster_home"
    for path in (*dirs.values(), base / "cwd"):
        path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PROJECT / "deploy" / "celery" / "dagster.yaml", dirs["DAGSTER_HOME"] / "dagster.yaml")
    return {k: str(v) for k, v in dirs.items()}


def _graphql(url: str, query: str, variables: dict | None = None) -> dict:
    sys.path.insert(0, str(PROJECT))
    from cli.dagster_server import graphql

    return graphql(url, query, variables)


_RUNS = """query($filter: RunsFilter) { runsOrError(filter: $filter) { ... on Runs { results {
  runId jobName status tags { key value } } } } }"""


def _runs(url: str, **filter_) -> list[dict]:
    results = _graphql(url, _RUNS, {"filter": filter_})["runsOrError"]["results"]
    for run in results:
        run["tags"] = {t["key"]: t["value"] for t in run["tags"]}
    return results


def _wait(what: str, timeout: float, probe, every: float = 1.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = probe()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _materialize(args: list[str], env: dict[str, str], cwd: str, log: Path, timeout: int = 600):
    started = time.monotonic()
    with open(log, "w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "cli.main", "materialize", *args],
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    return done.returncode, log.read_text(), time.monotonic() - started


def _check_verdicts(output: str) -> dict[str, str]:
    """unit label -> 'check NAME failed: figures' for each failed blocking check the command reported."""
    verdicts = {}
    for match in re.finditer(r"^failed: (\S+): (check \S+ failed: .*?) \(run [0-9a-f-]+\)$", output, re.M):
        verdicts[match.group(1)] = match.group(2)
    return verdicts


CACHES = ("zero_shot/cache/",)  # keyed by the model's location under the root: named differently per root


def _artifacts(files: dict[str, bytes]) -> set[str]:
    """Relative paths of artifacts: files written through pipeline.storage carry a .sha256 sidecar.  A cache
    file stands as its folder plus a count ("zero_shot/cache/ x1"): its name depends on the root."""
    found = {k for k in files if not k.endswith(".sha256") and f"{k}.sha256" in files}
    caches = {c: sum(1 for k in found if k.startswith(c)) for c in CACHES}
    return {k for k in found if not k.startswith(CACHES)} | {f"{c} x{n}" for c, n in caches.items() if n}


def _assert_same_tables(cluster: bytes, single: bytes, name: str) -> None:
    import io

    import numpy as np
    import polars as pl

    a, b = pl.read_parquet(io.BytesIO(cluster)), pl.read_parquet(io.BytesIO(single))
    assert a.columns == b.columns and a.height == b.height, (name, a.columns, b.columns, a.height, b.height)
    for column in a.columns:
        x, y = a[column], b[column]
        if x.dtype.is_numeric() or isinstance(x.dtype, (pl.List, pl.Array)) and x.dtype.inner.is_numeric():
            xs = np.asarray(x.to_list(), dtype=np.float64)
            ys = np.asarray(y.to_list(), dtype=np.float64)
            assert np.allclose(xs, ys, rtol=TOLERANCE, atol=TOLERANCE), (
                f"{name}.{column}: max |diff| {np.abs(xs - ys).max()}"
            )
        else:
            assert x.to_list() == y.to_list(), f"{name}.{column} differs"


def test_celery_workers_postgres_and_s3_on_loopback():
    timings: dict[str, float] = {}
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="reverse-sd-cluster-"))
    os.chmod(root, 0o755)  # the Postgres server user must reach its folder below
    hosts = Hosts(len(WORKERS))
    servers: list = []
    procs: dict[str, subprocess.Popen] = {}
    # SIGTERM or SIGINT (even where a background shell ignores it) end the test through its clean-up below
    previous = {sig: signal.signal(sig, _stop_test) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # ---- 0. the single-machine reference: plain `reverse-sd materialize`, local storage root ----------
        single = _machine(root, "single")
        single_env = {**_base_env(), **single, "REVERSE_SD_HOME": str(root / "single" / "data")}
        Path(single["DAGSTER_HOME"], "dagster.yaml").unlink()  # the project's own instance (SQLite, local runs)
        single_code, single_out, timings["single machine"] = _materialize(
            [], single_env, str(root / "single" / "cwd"), root / "single.log"
        )
        assert single_code == 0 and "Traceback" not in single_out, single_out[-4000:]
        failures = [line for line in single_out.splitlines() if line.startswith("failed: ")]
        assert all(" check " in line for line in failures), failures  # only blocking checks, never a run
        single_files = {
            str(p.relative_to(root / "single" / "data")): p.read_bytes()
            for p in (root / "single" / "data").rglob("*")
            if p.is_file()
        }

        # ---- 1. the shared servers, and a namespace per worker ------------------------------------------------
        t0 = time.monotonic()
        why_no_netns = hosts.start()
        address = "127.0.0.1" if why_no_netns else hosts.host_address
        listen = ["127.0.0.1"] + ([] if why_no_netns else [address])
        postgres = Postgres(root / "postgres", listen, allow_subnet=None if why_no_netns else hosts.subnet)
        redis = Redis(root / "redis", listen)
        s3 = MotoS3(root / "moto", address)
        for server in (postgres, redis, s3):
            servers.append(server)
            why = server.start()
            assert why is None, why
        bucket = "reverse-sd-cluster"
        s3.client().create_bucket(Bucket=bucket)
        storage_root = f"s3://{bucket}/home"
        shared = {
            **postgres.env(address),
            "DAGSTER_CELERY_BROKER_URL": redis.url(address, 0),
            "DAGSTER_CELERY_BACKEND_URL": redis.url(address, 1),
            "AWS_ENDPOINT_URL_S3": s3.endpoint,
            **MotoS3.credentials,
            "REVERSE_SD_HOME": storage_root,
        }

        # ---- 2. the control host: code server, webserver, daemon ----------------------------------------------
        control = _machine(root, "control")
        control_env = {**_base_env(), **control, **shared}
        cwd = root / "control" / "cwd"
        code_port, web_port = free_port(), free_port()
        workspace = root / "control" / "workspace.yaml"
        workspace.write_text(
            f"load_from:\n  - grpc_server:\n      host: 127.0.0.1\n      port: {code_port}\n"
            "      location_name: reverse-sd\n"
        )
        logs = root / "logs"
        procs["code-server"] = spawn(
            [BIN / "dagster", "code-server", "start", "-m", "assets.definitions", "-h", "127.0.0.1"]
            + ["-p", str(code_port), "--location-name", "reverse-sd"],
            logs / "code-server.log",
            control_env,
            cwd,
        )
        procs["webserver"] = spawn(
            [BIN / "dagster-webserver", "-w", workspace, "-h", "127.0.0.1", "-p", str(web_port)],
            logs / "webserver.log",
            control_env,
            cwd,
        )
        procs["daemon"] = spawn([BIN / "dagster-daemon", "run", "-w", workspace], logs / "daemon.log", control_env, cwd)
        url = f"http://127.0.0.1:{web_port}"

        # ---- 3. two Celery workers, each on its own "machine" -------------------------------------------------
        worker_envs: dict[str, dict[str, str]] = {}

        def start_worker(i: int, name: str) -> None:
            if name not in worker_envs:
                worker_envs[name] = {**_base_env(), **_machine(root, name), **shared}
            prefix = [] if why_no_netns else hosts.prefix(i)
            cmd = [*prefix, BIN / "dagster-celery", "worker", "start", "-A", "dagster_celery.app"]
            cmd += ["-y", PROJECT / "deploy" / "celery" / "worker.yaml", "-n", name, "-q", "dagster"]
            cmd += ["-i", "resources.celery_launcher", "-l", "INFO", "--", "--pool=solo"]
            procs[name] = spawn(cmd, logs / f"{name}.log", worker_envs[name], root / name / "cwd")

        for i, name in enumerate(WORKERS):
            start_worker(i, name)
        _wait("the webserver and its code location", 240, lambda: _location_loaded(url), every=2)
        _wait("both workers", 120, lambda: all(_worker_ready(logs / f"{n}.log") for n in WORKERS), every=2)
        for name, proc in procs.items():
            assert proc.poll() is None, f"{name} exited: {(logs / f'{name}.log').read_text()[-3000:]}"
        timings["cluster start"] = time.monotonic() - t0

        # ---- 4. materialize into the bucket; kill -9 a worker while it runs a gpu-pool run --------------------
        cli_env = {**control_env, "REVERSE_SD_DAGSTER_URL": url}
        t0 = time.monotonic()
        cli = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "materialize"],
            env=cli_env,
            cwd=cwd,
            stdout=open(root / "materialize-1.log", "w"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
        )
        procs["materialize"] = cli
        victim = _wait(
            f"a {KILL_JOB} run on a worker",
            480,
            lambda: next(
                (r for r in _runs(url, statuses=["STARTED"]) if r["jobName"] == KILL_JOB and r["tags"].get(WORKER_TAG)),
                None,
            ),
        )
        node = victim["tags"][WORKER_TAG]
        name = node.split("@")[0]
        killed = _celery_pid(procs[name])
        os.kill(killed, signal.SIGKILL)
        first = cli.wait(timeout=300)
        out = (root / "materialize-1.log").read_text()
        timings["materialize with a worker killed"] = time.monotonic() - t0
        assert first == 1, out[-4000:]
        failed = [line for line in out.splitlines() if line.startswith("failed: ")]
        assert any("trained_models" in line and " check " not in line for line in failed), out[-3000:]
        first_out = out
        dead = _runs(url, runIds=[victim["runId"]])[0]
        assert dead["status"] == "FAILURE", dead
        daemon_log = (logs / "daemon.log").read_text()
        assert "stopped sending heartbeats" in daemon_log, daemon_log[-3000:]
        keys = s3.keys(bucket)
        assert keys and not [k for k in keys if ".tmp" in k], keys  # no half-written object from the dead run

        # the worker comes back (as a service manager would restart it); --stale finishes the graph
        stop_process_group(procs[name], grace=2)
        start_worker(WORKERS.index(name), name)
        _wait(f"{name} to restart", 120, lambda: _worker_ready(logs / f"{name}.log", restarts=1), every=2)
        t0 = time.monotonic()
        code, out, timings["materialize --stale"] = _materialize(
            ["--stale"], cli_env, str(cwd), root / "materialize-2.log"
        )
        assert code == single_code, out[-4000:]
        assert "Traceback" not in out
        failures = [line for line in out.splitlines() if line.startswith("failed: ")]
        assert all(" check " in line for line in failures), failures  # nothing but the same blocking checks
        verdicts = {**_check_verdicts(first_out), **_check_verdicts(out)}
        assert verdicts == _check_verdicts(single_out), (verdicts, _check_verdicts(single_out))
        rerun = _runs(url, statuses=["SUCCESS"])
        assert any(r["jobName"] == KILL_JOB for r in rerun if r["runId"] != victim["runId"])

        # ---- 5. what ran where, what is where --------------------------------------------------------------
        every_run = _runs(url)
        by_worker: dict[str, int] = {}
        for run in every_run:
            worker = run["tags"].get(WORKER_TAG, "")
            by_worker[worker.split("@")[0]] = by_worker.get(worker.split("@")[0], 0) + 1
        assert all(by_worker.get(n) for n in WORKERS), by_worker
        assert not by_worker.get(""), f"runs that no worker executed: {by_worker}"

        client = s3.client()
        keys = s3.keys(bucket)
        assert all(k.startswith("home/") and ".tmp" not in k for k in keys), keys
        bucket_files = {k.removeprefix("home/"): b"" for k in keys}
        artifacts = _artifacts(single_files)
        assert artifacts and artifacts == _artifacts(bucket_files), sorted(artifacts ^ _artifacts(bucket_files))
        for expected in (
            "diffusiondb_parts/part-000001.parquet",
            "diffusiondb_parts/part-000002.parquet",
            "prompt_bank.parquet",
        ):
            assert expected in artifacts, sorted(artifacts)
        assert any(k.startswith("trained_models/") and k.endswith(".safetensors") for k in artifacts), sorted(artifacts)
        local = [
            str(p)
            for p in root.rglob("*")
            if p.is_file()
            and not p.is_relative_to(root / "single")  # the single-machine reference's own storage root
            and any(str(p).endswith("/" + a) for a in artifacts)
        ]
        assert not local, f"artifacts on local disk: {local[:10]}"

        compared = sorted(a for a in artifacts if a.startswith(COMPARED) and a.endswith(".parquet"))
        assert any(a.startswith("model_predictions/") for a in compared), compared
        for name in compared:
            body = client.get_object(Bucket=bucket, Key=f"home/{name}")["Body"].read()
            _assert_same_tables(body, single_files[name], name)
        assert "reports/evaluation.json" in artifacts, sorted(artifacts)  # the whole graph, down to the report
        body = client.get_object(Bucket=bucket, Key="home/reports/evaluation.json")["Body"].read()
        ours, theirs = json.loads(body)["cosine"], json.loads(single_files["reports/evaluation.json"])["cosine"]
        assert ours and ours.keys() == theirs.keys()
        for k in ours:
            assert (ours[k] is None) == (theirs[k] is None), k
            assert ours[k] is None or abs(ours[k] - theirs[k]) <= TOLERANCE, (k, ours[k], theirs[k])
        timings["whole test"] = time.monotonic() - started
        print(
            "cluster test: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
            + f"; runs per worker {by_worker}; {len(compared)} tables equal; namespaces: {why_no_netns or 'yes'}"
        )
    finally:
        for name in ("materialize", *WORKERS, "daemon", "webserver", "code-server"):
            stop_process_group(procs.get(name), grace=5)
        for server in reversed(servers):
            server.stop()
        hosts.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if os.environ.get("REVERSE_SD_KEEP_CLUSTER_LOGS"):
            print(f"cluster logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _stop_test(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _location_loaded(url: str) -> bool:
    if not http_ok(f"{url}/server_info"):
        return False
    query = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus locationOrLoadError { __typename } } } } }"
    try:
        entries = _graphql(url, query)["workspaceOrError"]["locationEntries"]
    except Exception:  # noqa: BLE001 - not up yet
        return False
    return any(
        e["name"] == "reverse-sd" and e["locationOrLoadError"]["__typename"] == "RepositoryLocation" for e in entries
    )


def _worker_ready(log: Path, restarts: int = 0) -> bool:
    """Celery prints 'ready.' once the worker consumes; a restarted worker appends to the same log."""
    return log.exists() and log.read_text(errors="replace").count(" ready.") > restarts


def _celery_pid(worker: subprocess.Popen) -> int:
    """The `celery worker` process that `dagster-celery worker start` (inside `ip netns exec`) started: the one
    that executes the runs (solo pool), so the one to kill."""
    pattern = "bin/celery -A dagster_celery.app worker"
    found = subprocess.run(["pgrep", "-g", str(os.getpgid(worker.pid)), "-f", pattern], capture_output=True, text=True)
    pids = [int(p) for p in found.stdout.split()]
    assert len(pids) == 1, f"celery worker processes: {pids}"
    return pids[0]
