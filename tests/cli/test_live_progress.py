"""`reverse-sd materialize` on a real terminal (a pseudo-terminal): the live view redraws one line per stage in
place, and the non-terminal format (a line per run, heartbeats) stays out of it."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import sample_env

PROJECT = Path(__file__).resolve().parents[2]


def _run_on_a_terminal(args: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run the CLI with stdout and stderr on a pseudo-terminal; (exit code, everything it wrote)."""
    parent, child = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.main", *args], cwd=PROJECT, env=env, stdout=child, stderr=child, close_fds=True
    )
    os.close(child)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([parent], [], [], 0.5)
            if ready:
                try:
                    data = os.read(parent, 65536)
                except OSError:  # the terminal closed: the CLI and its children are gone
                    break
                if not data:
                    break
                chunks.append(data)
            elif process.poll() is not None:
                break
        return process.wait(timeout=30), b"".join(chunks).decode("utf-8", "replace")
    finally:
        if process.poll() is None:
            process.kill()
        os.close(parent)


@pytest.mark.extended  # the Dagster services and four runs
def test_on_a_terminal_each_stage_is_one_live_line_redrawn_in_place(tmp_path):
    env = sample_env(tmp_path, REVERSE_SD_SAMPLE_PARTS="2", REVERSE_SD_SAMPLE_IMAGES_PER_PART="8")
    code, out = _run_on_a_terminal(["materialize", "--select", "diffusiondb_parts"], env, timeout=600)
    assert code == 0, out[-3000:]
    assert "\x1b[" in out  # cursor movement: the view redraws itself in place
    assert re.search(r"diffusiondb_parts\s+\d/2 done", out), out[-3000:]  # a line per stage: done/total
    assert re.search(r"run\(s\) queued or running, \d+ s elapsed", out)
    assert not re.search(r"^done diffusiondb_parts\[", out, re.M)  # the per-run lines are for pipes and logs
    assert not re.search(r"^\.\.\. \d+ run", out, re.M)  # and so are the heartbeats
    assert "materialized" in out  # the end summary
