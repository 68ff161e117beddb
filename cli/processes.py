"""Child processes in a session of their own (start_new_session=True): stopped as a whole group, and told
by the kernel when their parent dies.  The CLI's Dagster services and the tests' throw-away servers both
start children of their own, which a signal to the leader alone would leave running.  And whether a run
worker recorded by Dagster is still the live process it was (``process_started_at``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def parent_death_signal(sig: int) -> Callable[[], None]:
    """A preexec_fn: the kernel sends ``sig`` to the child when its parent dies, even by kill -9."""

    def preexec() -> None:
        import ctypes

        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG

    return preexec


def stop_process_group(
    process: subprocess.Popen | None, grace: float = 10, leader_first: bool = False, linger: float = 3
) -> None:
    """SIGTERM the process's group, SIGKILL it after ``grace`` seconds or when the leader's children
    linger ``linger`` s after it; safe on a process that is gone or None.

    ``leader_first``: the SIGTERM goes to the leader alone, which stops its children in its own order, and what
    is left of the group after it gets a SIGTERM of its own before the SIGKILL.  The CLI's services
    (cli.dagster_services) stop the webserver and daemon before the code server.  For `dagster dev`: a SIGTERM
    to its whole group also reaches the code server's gRPC subprocess, which the code server then starts again,
    only to stop it (measured from a no-op command's last line to its exit: 4 of 13 took 8-11.5 s that way,
    median 4.2 s; 2.7-4.6 s, median 3.1 s, leader first)."""
    if process is None:
        return
    try:
        group = os.getpgid(process.pid)
    except ProcessLookupError:
        process.poll()
        return
    with contextlib.suppress(ProcessLookupError):
        if leader_first:
            os.kill(process.pid, signal.SIGTERM)
        else:
            os.killpg(group, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
        leader_gone = True
    except subprocess.TimeoutExpired:
        leader_gone = False
    if leader_gone and leader_first and not _group_ends_within(group, linger):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)  # what the leader left behind
    if not (leader_gone and _group_ends_within(group, linger)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        _group_ends_within(group, 5)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def group_alive(group: int) -> bool:
    """Whether any process of ``group`` is left (one we may not signal counts as alive)."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_started_at(pid: int) -> float | None:
    """When the process ``pid`` started (seconds since the epoch), or None when there is no such process (or
    only its zombie).

    Linux only reads a start time (/proc): elsewhere a live pid gives 0.0, "alive, start unknown".  The start
    time tells a process from a later one that was given the same pid (after a restart, say)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # it exists, and belongs to another user
    fields = _stat_fields(pid)
    if fields is None:
        return None if Path("/proc/self/stat").exists() else 0.0  # it ended in between / no /proc here
    if fields[0] in ("Z", "X"):  # a zombie no one reaped: the process itself has ended
        return None
    try:
        ticks = int(fields[19])  # field 22, starttime: clock ticks after boot
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (the state) on, past the command name (which may hold spaces and
    parentheses); None when it cannot be read (the process ended, or no /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _group_ends_within(group: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for every process of ``group`` to end (a zombie has ended: only its parent or
    init still has to reap it)."""
    deadline = time.monotonic() + timeout
    while True:
        live = _live_members(group)
        if not (live if live is not None else group_alive(group)):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _live_members(group: int) -> list[int] | None:
    """The pids of ``group`` that have not ended, from /proc (None where there is no /proc)."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    members = []
    for entry in proc.iterdir():
        fields = _stat_fields(int(entry.name)) if entry.name.isdigit() else None  # None: it ended meanwhile
        if fields is not None and int(fields[2]) == group and fields[0] not in ("Z", "X"):  # field 5: its group
            members.append(int(entry.name))
    return members
