"""cli.processes: a child started in its own session is stopped with everything it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from cli.processes import group_alive, parent_death_signal, process_started_at, stop_process_group


def test_the_whole_group_stops_and_a_gone_process_is_fine():
    # the leader ignores SIGTERM and its child outlives it: only the group SIGKILL ends both
    script = "import signal, subprocess, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    script += "subprocess.Popen(['sleep', '60']); print('up', flush=True); time.sleep(60)"
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=parent_death_signal(signal.SIGKILL),
    )
    assert process.stdout.readline().strip() == b"up"
    group = os.getpgid(process.pid)
    stop_process_group(process, grace=0.5)
    assert process.returncode == -signal.SIGKILL and not group_alive(group)
    stop_process_group(process)  # twice, and with nothing, is harmless
    stop_process_group(None)
    process.stdout.close()


def test_a_process_start_time_tells_a_live_process_from_a_gone_or_zombie_one():
    started = process_started_at(os.getpid())
    assert started is not None and 0 < started <= time.time()
    child = subprocess.Popen(["sleep", "30"])
    try:
        born = process_started_at(child.pid)
        assert born is not None and born >= started - 1
        child.kill()
        time.sleep(0.2)  # killed, not yet reaped: only a zombie is left
        assert process_started_at(child.pid) is None
    finally:
        child.kill()
        child.wait()
    assert process_started_at(child.pid) is None  # reaped
