"""cli.processes: a child started in its own session is stopped with everything it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from cli.processes import (
    parent_death_signal,
    process_started_at,
    stop_process_group,
)


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
    assert process.returncode == -signal.SIGKILL and not live_processes_in(group)  # zombies have ended
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


def test_the_leader_is_asked_first_and_stops_its_children_itself_and_leftovers_are_killed(tmp_path):
    """`dagster dev` stops its children in its own order, so only the leader gets the first SIGTERM (a child
    signalled directly may be restarted by its parent); a child left behind is SIGTERMed, then SIGKILLed."""
    record = tmp_path / "child.txt"
    child = (
        "import signal, sys, time; "
        f"out = lambda s: (open({str(record)!r}, 'a').write(s), sys.exit(0)); "
        "signal.signal(signal.SIGTERM, lambda *a: out('TERM')); signal.signal(signal.SIGUSR1, lambda *a: out('USR1')); "
        "time.sleep(60)"
    )
    polite = (  # on SIGTERM it tells its child to stop (SIGUSR1), waits for it, and exits
        "import signal, subprocess, sys, time; "
        f"child = subprocess.Popen([sys.executable, '-c', {child!r}]); "
        "signal.signal(signal.SIGTERM, lambda *a: (child.send_signal(signal.SIGUSR1), child.wait(), sys.exit(0))); "
        "print('up', flush=True); time.sleep(60)"
    )
    rude = (  # it exits on SIGTERM and leaves a child that ignores SIGTERM
        "import signal, subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "time.sleep(60)']); time.sleep(0.5); print('up', flush=True); time.sleep(60)"
    )
    for script in (polite, rude):
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, start_new_session=True)
        assert process.stdout.readline().strip() == b"up"
        time.sleep(0.3)  # the polite child's handlers are set
        group = os.getpgid(process.pid)
        started = time.monotonic()
        stop_process_group(process, grace=10, leader_first=True, linger=1)
        took = time.monotonic() - started
        assert process.returncode is not None and not live_processes_in(group)
        if script is polite:
            assert record.read_text() == "USR1" and took < 3, (record.read_text(), took)
        else:
            assert took >= 2  # the leftover outlived the linger and the SIGTERM: killed
        process.stdout.close()


def live_processes_in(group: int) -> bool:
    """Whether ``group`` holds a process that has not ended (a zombie has: only init still has to reap it)."""
    out = subprocess.run(["ps", "-o", "stat=", "-g", str(group)], capture_output=True, text=True).stdout.split()
    return any(not state.startswith("Z") for state in out)
