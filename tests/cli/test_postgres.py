"""The shared-deployment instance (deploy/postgres/dagster.yaml) against a real PostgreSQL server.

A throw-away cluster is created (initdb into a temporary folder, as a non-root user when run as root) and
started on a free loopback port; the CLI then materializes the cheap data assets of a tiny sample with
DAGSTER_HOME holding that dagster.yaml and only DAGSTER_PG_* variables for credentials.  The runs,
materializations, check results and partitions must be rows in Postgres (not SQLite files), and a second
process must see that history.  Skipped, with the reason, where dagster-postgres is missing or no
server can be installed or started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from servers import Postgres

pytestmark = pytest.mark.extended  # multi-process: run by CI (make test-extended), not the default run

PROJECT = Path(__file__).resolve().parents[2]
CONFIG = PROJECT / "deploy" / "postgres" / "dagster.yaml"
PG_USER = "dagster"
PG_DB = "reverse_sd_dagster"


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL server on 127.0.0.1 with the database, as tests/servers.py starts it for the
    cluster test (installed with Debian's package when missing)."""
    pytest.importorskip("dagster_postgres", reason="dagster-postgres is not installed: pip install -e '.[deploy]'")
    root = Path(tempfile.mkdtemp(prefix="reverse-sd-pg-"))  # in /tmp: the server user must reach it
    os.chmod(root, 0o755)
    server = Postgres(root, ["127.0.0.1"])
    try:
        why = server.start()
        if why:
            pytest.skip(f"no PostgreSQL server could start here: {why}")
        yield server
    finally:
        server.stop()
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


def _rows(server: Postgres, sql: str) -> list[tuple]:
    import psycopg2

    conn = psycopg2.connect(
        host="127.0.0.1", port=server.port, user=server.user, password=server.password, dbname=server.db
    )
    with conn, conn.cursor() as cur:
        cur.execute(sql)
        rows = cur.fetchall()
    conn.close()
    return rows


def _materializations(cluster: Postgres) -> list[tuple]:
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
