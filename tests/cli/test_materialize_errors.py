"""Failures of `reverse-sd materialize` itself (not of a run) are one line (issue 27 item 11)."""

from __future__ import annotations

import errno
import sqlite3

from cli.materialize import one_line


def test_a_read_only_or_full_dagster_home_is_one_line_naming_it():
    read_only = OSError(errno.EROFS, "Read-only file system", "/srv/dh/logs/x.log")
    assert one_line(read_only, "/srv/dh") == (
        "DAGSTER_HOME=/srv/dh cannot be written: Read-only file system (/srv/dh/logs/x.log)"
    )

    class OperationalError(Exception):  # what SQLAlchemy raises, the driver's error in .orig
        def __init__(self, orig):
            super().__init__("(sqlite3.OperationalError) database or disk is full\n[SQL: INSERT INTO event_logs ...]")
            self.orig = orig

    full = OperationalError(sqlite3.OperationalError("database or disk is full"))
    line = one_line(full, "/srv/dh")
    assert line == "the Dagster instance in DAGSTER_HOME=/srv/dh cannot be used: database or disk is full"
    assert "\n" not in line and "SQL" not in line


def test_any_other_failure_is_its_innermost_cause_in_one_line():
    try:
        try:
            raise ValueError("the real reason\nsecond line")
        except ValueError as inner:
            raise RuntimeError("wrapper") from inner
    except RuntimeError as exc:
        assert one_line(exc, "/dh") == "ValueError: the real reason (--verbose shows the trace)"


def test_a_dry_run_on_a_fresh_root_writes_nothing_there(tmp_path):
    """Its help says it writes nothing: no sample mirror, no lock file, not even the root (issue 27 item 14)."""
    from conftest import run_cli
    from environments import sample_env

    env = sample_env(tmp_path, REVERSE_SD_SAMPLE_PARTS="2", REVERSE_SD_SAMPLE_IMAGES_PER_PART="10")
    result = run_cli(["materialize", "--dry-run"], env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "would register 2 new DiffusionDB parts" in result.stdout
    assert "diffusiondb_parts [2]: part-000001 part-000002" in result.stdout
    assert not (tmp_path / "data").exists()


def test_progress_is_a_live_line_per_stage_on_a_terminal_and_heartbeats_elsewhere(tmp_path, capsys):
    import dagster as dg

    from cli.materialize import _ProgressView
    from cli.plan import Plan, Unit
    from cli.runs import Outcome, Progress

    units = [Unit("j", (dg.AssetKey("trained_models"),), f"p{i}", True) for i in range(4)]
    plan = Plan(units, {i: set() for i in range(4)})
    active = Progress(active={"r": 3})
    live = _ProgressView(plan, verbose=False, log_path=tmp_path / "log")
    live.live = True
    live.submitted(units[3], "r")
    live.done(Outcome(units[0], "run-a", True, seconds=2.0))
    live.done(Outcome(units[1], "run-b", False, ["boom"], "trace", seconds=2.0))
    live.tick(active)
    err = capsys.readouterr().err
    assert "FAILED trained_models[p1]" in err and "1/4 done, 1 failed, 1 in flight" in err
    assert "trace" in (tmp_path / "log").read_text()  # the full error goes to the log file

    quiet = _ProgressView(plan, verbose=False, log_path=tmp_path / "log2")
    quiet.live = False
    quiet.done(Outcome(units[0], "run-c", True, seconds=1.0))
    assert capsys.readouterr().err.startswith("done trained_models[p0] in 1.0 s")  # a line per finished run
    quiet.tick(active)
    assert capsys.readouterr().err == ""  # nothing new within the heartbeat
    quiet.last_line -= quiet.HEARTBEAT
    quiet.tick(active)
    assert capsys.readouterr().err.startswith("... 1 run(s) queued or running, 1 partitions done")
