"""The shared-deployment instance (deploy/postgres/dagster.yaml) against a real PostgreSQL server.

A throw-away cluster is created (initdb into a temporary folder, as a non-root user when run as root) and
started on a free loopback port; the CLI then materializes the cheap data assets of a tiny sample with
DAGSTER_HOME holding that dagster.yaml and only DAGSTER_PG_* variables for credentials.  The runs,
materializations, check results and partitions must be rows in Postgres (not SQLite files), and a second
process must see that history.  Skipped, with the reason, where dagster-postgres is missing or no
server can be installed or started.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.extended  # multi-process: run by CI (make test-extended), not the default run

PROJECT = Path(__file__).resolve().parents[2]
CONFIG = PROJECT / "deploy" / "postgres" / "dagster.yaml"
PG_USER = "dagster"
PG_DB = "reverse_sd_dagster"


def _postgres_bin(name: str) -> str | None:
    """Debian keeps the server tools under /usr/lib/postgresql/<version>/bin, off PATH."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Cluster:
    def __init__(self, bindir: Path, root: Path, run_as: pwd.struct_passwd | None):
        self.bindir, self.root, self.run_as = bindir, root, run_as
        self.data, self.log = root / "data", root / "server.log"
        self.port, self.password = _free_port(), os.urandom(12).hex()

    def _run(self, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
        kwargs = {"user": self.run_as.pw_uid, "group": self.run_as.pw_gid} if self.run_as else {}
        return subprocess.run(
            [str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=self.root, **kwargs
        )

    def start(self) -> str | None:
        """None when the server is up; otherwise why not."""
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self.run_as:
            for path in (self.root, pwfile):
                os.chown(path, self.run_as.pw_uid, self.run_as.pw_gid)
        init = self._run(
            self.bindir / "initdb",
            "-D",
            self.data,
            "-U",
            PG_USER,
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "-E",
            "UTF8",
            "--locale=C",
        )
        if init.returncode != 0:
            return f"initdb failed: {(init.stderr or init.stdout)[-800:]}"
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        start = self._run(
            self.bindir / "pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "-o", options, "start"
        )
        if start.returncode != 0:
            log = self.log.read_text()[-800:] if self.log.exists() else ""
            return f"pg_ctl start failed: {(start.stderr or start.stdout)[-400:]} {log}"
        return None

    def stop(self) -> None:
        if self.data.exists():
            self._run(self.bindir / "pg_ctl", "-D", self.data, "-m", "immediate", "stop", timeout=60)

    def connect(self, dbname: str = PG_DB):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=PG_USER, password=self.password, dbname=dbname)


@pytest.fixture(scope="module")
def postgres():
    pytest.importorskip("dagster_postgres", reason="dagster-postgres is not installed: pip install -e '.[deploy]'")
    if _postgres_bin("initdb") is None:
        setup = subprocess.run(
            ["bash", str(PROJECT / "tests" / "postgres_setup.sh")], capture_output=True, text=True, timeout=600
        )
        if setup.returncode != 0:
            pytest.skip(f"no PostgreSQL server could be installed: {setup.stderr.strip()[-500:]}")
    initdb = _postgres_bin("initdb")
    if initdb is None:
        pytest.skip("no PostgreSQL server binaries (initdb) on this machine")
    run_as = None
    if os.geteuid() == 0:  # the server refuses to run as root
        for name in ("postgres", "nobody"):
            try:
                run_as = pwd.getpwnam(name)
                break
            except KeyError:
                continue
        else:
            pytest.skip("running as root and no 'postgres' or 'nobody' user to run the server as")
    root = Path(tempfile.mkdtemp(prefix="reverse-sd-pg-"))  # in /tmp: the server user must reach it
    cluster = _Cluster(Path(initdb).parent, root, run_as)
    try:
        why = cluster.start()
        if why:
            pytest.skip(f"no PostgreSQL server could start here: {why}")
        conn = cluster.connect("postgres")
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {PG_DB}")
        conn.close()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_run(postgres, tmp_path_factory):
    """`reverse-sd materialize` of the data assets on a 2 x 30 sample, history in Postgres."""
    root = tmp_path_factory.mktemp("pg_instance")
    dagster_home = root / "dagster_home"
    dagster_home.mkdir()
    shutil.copyfile(CONFIG, dagster_home / "dagster.yaml")
    env = {
        **os.environ,
        "REVERSE_SD_PROFILE": "sample",
        "REVERSE_SD_HOME": str(root / "data"),
        "REVERSE_SD_SAMPLE_PARTS": "2",
        "REVERSE_SD_SAMPLE_IMAGES_PER_PART": "30",
        "DAGSTER_HOME": str(dagster_home),
        "HF_HUB_OFFLINE": "1",
        "DAGSTER_PG_HOST": "127.0.0.1",
        "DAGSTER_PG_PORT": str(postgres.port),
        "DAGSTER_PG_USERNAME": PG_USER,
        "DAGSTER_PG_PASSWORD": postgres.password,
        "DAGSTER_PG_DB": PG_DB,
    }
    env.pop("REVERSE_SD_DIFFUSIONDB", None)
    result = _cli(["materialize", "--select", "diffusiondb_parts,filtered_pairs"], env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return env, result


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600
    )


def _rows(cluster: _Cluster, sql: str) -> list[tuple]:
    with cluster.connect() as conn, conn.cursor() as cur:
        cur.execute(sql)
        rows = cur.fetchall()
    conn.close()
    return rows


def _materializations(cluster: _Cluster) -> list[tuple]:
    return _rows(
        cluster,
        "SELECT asset_key, partition FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION' ORDER BY id",
    )


def test_runs_and_materializations_are_rows_in_postgres(postgres, shared_run):
    env, result = shared_run
    assert "materialized 3 runs" in result.stdout
    runs = _rows(postgres, "SELECT status FROM runs")
    # one run per part and one for filtered_pairs (plus any observation runs the CLI records)
    assert len(runs) >= 3 and {r[0] for r in runs} == {"SUCCESS"}
    assert sorted(_materializations(postgres), key=str) == sorted(
        [
            ('["diffusiondb_parts"]', "part-000001"),
            ('["diffusiondb_parts"]', "part-000002"),
            ('["filtered_pairs"]', None),
        ],
        key=str,
    )
    checks = _rows(postgres, "SELECT check_name, execution_status FROM asset_check_executions")
    assert ("no_prompt_in_two_splits", "SUCCEEDED") in checks
    partitions = _rows(
        postgres, "SELECT partition FROM dynamic_partitions WHERE partitions_def_name = 'diffusiondb_part'"
    )
    assert sorted(p[0] for p in partitions) == ["part-000001", "part-000002"]
    # nothing fell back to SQLite under DAGSTER_HOME
    home = Path(env["DAGSTER_HOME"])
    assert not list(home.rglob("*.db")), list(home.rglob("*.db"))


def test_instance_from_shared_config_reads_the_history(postgres, shared_run, monkeypatch):
    """Another process (here: this one) building the instance from the same file sees the same runs."""
    import dagster as dg

    env, _ = shared_run
    for name, value in env.items():
        if name.startswith("DAGSTER_PG_"):
            monkeypatch.setenv(name, value)
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        event = instance.get_latest_materialization_event(dg.AssetKey("filtered_pairs"))
        assert event is not None and event.asset_materialization.metadata["rows_kept"].value > 0
        runs = instance.get_runs()
        assert len(runs) == len(_rows(postgres, "SELECT run_id FROM runs")) >= 3
        assert sorted(instance.get_dynamic_partitions("diffusiondb_part")) == ["part-000001", "part-000002"]


def test_stale_rerun_uses_shared_history(postgres, shared_run):
    """A second CLI process finds everything up to date from the history in Postgres, and adds nothing."""
    env, _ = shared_run
    before = _materializations(postgres)
    again = _cli(["materialize", "--select", "diffusiondb_parts,filtered_pairs", "--stale"], env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to materialize" in again.stdout, again.stdout
    assert _materializations(postgres) == before


def test_wrong_password_fails_loudly(postgres, shared_run, monkeypatch, caplog):
    """Credentials come from the environment: a wrong one is refused by the server, not ignored."""
    import dagster as dg
    from dagster_postgres.utils import DagsterPostgresException

    env, _ = shared_run
    for name, value in env.items():
        if name.startswith("DAGSTER_PG_"):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "wrong")
    with pytest.raises(DagsterPostgresException, match="too many retries"):
        with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            instance.get_runs(limit=1)
    assert "password authentication failed" in caplog.text
