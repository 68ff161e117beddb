"""The Dagster services one `reverse-sd materialize` needs when no webserver serves its instance: a code server
(``dagster api grpc``), then the webserver and the daemon, connected to it; stopped together.

What `dagster dev` starts, minus what it costs here: `dagster dev` imports Dagster itself (1.2 s) and puts a
proxy code server in front of the real one (another process, another Dagster import), all before the webserver
and the daemon start.  This supervisor imports no Dagster: the code server starts at once, the webserver and
the daemon as soon as it listens (measured on the 2-core dev box: served 3.8-4.3 s after the start, against
5.8-6.8 s for `dagster dev`).  `make ui` keeps `dagster dev`, whose proxy reloads edited code.

    python -m cli.dagster_services --grpc-port 4001 --port 3001 --workspace ws.yaml

Run by cli.dagster_server.DagsterServer as the leader of its own process group.  SIGTERM or SIGINT stops the
webserver and the daemon first, then the code server (so no run is launched against a stopped one); a service
that exits by itself stops the others, and this process exits 1.  Every child gets SIGTERM when this process
dies, even by kill -9 (the kernel's parent-death signal).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cli.processes import parent_death_signal

LOCATION_NAME = "reverse-sd"  # workspace.yaml's location_name
CODE_MODULE = "assets.definitions"
PROJECT_DIR = Path(__file__).resolve().parents[1]
POLL_SECONDS = 0.05


def workspace_yaml(grpc_port: int) -> str:
    """A workspace whose one location is the code server on ``grpc_port`` (what the webserver and daemon load)."""
    return (
        "load_from:\n"
        "  - grpc_server:\n"
        "      host: 127.0.0.1\n"
        f"      port: {grpc_port}\n"
        f"      location_name: {LOCATION_NAME}\n"
    )


def _script(name: str) -> str:
    """A console script of this environment (``dagster-daemon`` has no public ``python -m`` module)."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


class Services:
    def __init__(self, grpc_port: int, web_port: int, workspace: Path):
        self.grpc_port, self.web_port, self.workspace = grpc_port, web_port, workspace
        self.code: subprocess.Popen | None = None
        self.front: list[subprocess.Popen] = []  # the webserver and the daemon
        self.stopping = False

    def _spawn(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            list(args),
            cwd=PROJECT_DIR,
            stdin=subprocess.DEVNULL,
            preexec_fn=parent_death_signal(signal.SIGTERM),
        )

    def start(self) -> None:
        self.code = self._spawn(
            sys.executable, "-m", "dagster", "api", "grpc", "-m", CODE_MODULE, "-d", str(PROJECT_DIR),
            "-h", "127.0.0.1", "-p", str(self.grpc_port), "--location-name", LOCATION_NAME,
        )  # fmt: skip
        while not _listening(self.grpc_port):  # it listens once the code is loaded
            if self.stopping or self.code.poll() is not None:
                return
            time.sleep(POLL_SECONDS)
        ws = str(self.workspace)
        self.front = [
            self._spawn(
                sys.executable, "-m", "dagster_webserver", "-w", ws, "-h", "127.0.0.1", "-p", str(self.web_port)
            ),
            self._spawn(_script("dagster-daemon"), "run", "-w", ws),
        ]

    def name(self, process: subprocess.Popen) -> str:
        if process is self.code:
            return "the code server"
        return "the webserver" if self.front and process is self.front[0] else "the daemon"

    def first_exit(self) -> subprocess.Popen | None:
        """A service that has exited, if any."""
        return next((p for p in [self.code, *self.front] if p is not None and p.poll() is not None), None)

    def stop(self, grace: float = 10) -> None:
        """The webserver and the daemon first, then the code server; SIGKILL for any that outlives ``grace``."""
        for group in (self.front, [self.code] if self.code else []):
            for process in group:
                if process.poll() is None:
                    process.terminate()
            deadline = time.monotonic() + grace
            for process in group:
                try:
                    process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cli.dagster_services", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grpc-port", type=int, required=True, help="the code server's port on 127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="the webserver's port on 127.0.0.1")
    parser.add_argument("--workspace", type=Path, required=True, help="where to write the services' workspace file")
    args = parser.parse_args(argv)
    args.workspace.write_text(workspace_yaml(args.grpc_port))
    services = Services(args.grpc_port, args.port, args.workspace)

    def _stop(signum, frame):  # a flag, not an exception: never raised half-way through starting a child
        services.stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        services.start()
        while not services.stopping:
            ended = services.first_exit()
            if ended is not None:
                print(f"dagster_services: {services.name(ended)} exited with code {ended.returncode}", flush=True)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        services.stop()


if __name__ == "__main__":
    sys.exit(main())
