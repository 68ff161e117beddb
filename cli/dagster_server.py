"""The Dagster webserver that `reverse-sd materialize` submits its runs to (GraphQL), found or started.

Every run goes through the instance's run coordinator (the queue in dagster.yaml) and its run launcher, so
the same command drives a cluster when dagster.yaml says so.  Which server:

1. REVERSE_SD_DAGSTER_URL (e.g. http://dagster.internal:3000): an operator's deployment; used as it is.
2. a webserver already serving this DAGSTER_HOME on 127.0.0.1:$PORT (3000 by default): `make ui`, so the
   runs appear live in the open UI;
3. otherwise this invocation's own services (cli.dagster_services: a code server, then the webserver and the
   daemon; what `dagster dev` starts, 2 s sooner), in their own process group and stopped with the command:
   no orphan survives, even a kill -9 of the CLI (the kernel's parent-death signal).

Their log, and the command's own, go to ``logs_dir(DAGSTER_HOME)``, never to DAGSTER_HOME/logs: Dagster's
webserver and daemon treat that folder as telemetry (dagster/_core/telemetry_upload.py, whatever
``telemetry.enabled`` says): they move it to .logs_queue, POST each file to Dagster's telemetry server, and
empty .logs_queue the next time, so a log there is gone by the next invocation, or sent away.  The services
also run with DAGSTER_DISABLE_TELEMETRY=1, which stops that thread (as `make ui` does).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from cli.dagster_services import LOCATION_NAME, PROJECT_DIR
from cli.processes import parent_death_signal, stop_process_group

LOGS_DIR_NAME = "reverse-sd-logs"  # not "logs": Dagster's telemetry folder (the module docstring)
REPOSITORY_NAME = "__repository__"  # the repository a Definitions object is loaded as
URL_SETTING = "REVERSE_SD_DAGSTER_URL"


def logs_dir(dagster_home: str | Path) -> Path:
    """Where `reverse-sd materialize` keeps its logs (one per invocation) and its services' logs."""
    return Path(dagster_home) / LOGS_DIR_NAME


class ServerError(RuntimeError):
    """The webserver could not be found, started or reached (one line for the user)."""


def graphql(url: str, query: str, variables: dict | None = None, timeout: float = 30) -> dict:
    """POST one GraphQL query to ``url`` and return its "data" (a GraphQL error raises ServerError)."""
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(url.rstrip("/") + "/graphql", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ServerError(f"the Dagster webserver at {url} did not answer: {exc}") from None
    if payload.get("errors"):
        raise ServerError(f"the Dagster webserver at {url} refused a query: {payload['errors'][0].get('message')}")
    return payload["data"]


_INSTANCE_QUERY = "{ instance { info } }"
_LOCATION_QUERY = """{ workspaceOrError { __typename ... on Workspace { locationEntries {
  name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def _serves_this_instance(url: str, dagster_home: str) -> bool:
    """Whether the webserver at ``url`` answers and serves the instance in ``dagster_home`` (its instance info
    names the storage folders, which live under DAGSTER_HOME for the SQLite instance)."""
    try:
        info = graphql(url, _INSTANCE_QUERY, timeout=2)["instance"]["info"] or ""
    except ServerError:
        return False
    return f"base_dir: {Path(dagster_home).resolve()}\n" in info + "\n"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class DagsterServer:
    """Context manager: ``url`` of a webserver serving this instance, started (and stopped) when none runs."""

    def __init__(self, dagster_home: str, log_path: Path, start_timeout: float = 300):
        self.dagster_home, self.log_path, self.start_timeout = dagster_home, log_path, start_timeout
        self.url: str | None = None
        self.process: subprocess.Popen | None = None
        self.started = False  # True when this invocation started its own services

    def __enter__(self) -> DagsterServer:
        """Find the webserver, or start this invocation's services (not waiting: call ready() before the first query, so the
        server's start overlaps the caller's own imports and planning)."""
        configured = os.environ.get(URL_SETTING)
        if configured:
            self.url = configured.rstrip("/")
        else:
            local = f"http://127.0.0.1:{os.environ.get('PORT', '3000')}"
            self.url = local if _serves_this_instance(local, self.dagster_home) else self._start()
        return self

    @property
    def on_this_machine(self) -> bool:
        """Whether the webserver (and so, under the DefaultRunLauncher, every run worker) is on this machine."""
        return urllib.parse.urlsplit(self.url or "").hostname in ("127.0.0.1", "localhost", "::1")

    def ready(self) -> DagsterServer:
        """Wait until the webserver serves the loaded code location."""
        self._wait_for_location()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def settings_mismatch(self, expected: dict[str, dict[str, object]]) -> str | None:
        """A webserver found running (`make ui`) runs the code with its own environment: name the first resource
        setting in ``expected`` (resource -> field -> value) that differs, so no run writes to another root."""
        if self.started:
            return None
        query = """query($repo: String!, $location: String!) {
          repositoryOrError(repositorySelector: {repositoryName: $repo, repositoryLocationName: $location}) {
            ... on Repository { allTopLevelResourceDetails { name configuredValues { key value } } } } }"""
        variables = {"repo": REPOSITORY_NAME, "location": LOCATION_NAME}
        details = graphql(self.url, query, variables)["repositoryOrError"].get("allTopLevelResourceDetails") or []
        served = {d["name"]: {v["key"]: json.loads(v["value"]) for v in d["configuredValues"]} for d in details}
        for resource, fields in expected.items():
            for name, value in fields.items():
                theirs = served.get(resource, {}).get(name)
                if theirs != value:
                    return f"{resource}.{name} is {theirs!r} there and {value!r} here"
        return None

    # ---- this invocation's own services -------------------------------------------------------------------

    def _start(self) -> str:
        port = _free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "DAGSTER_HOME": str(Path(self.dagster_home).resolve()),
            "PYTHONWARNINGS": "ignore",
            # dagster.yaml's `telemetry: enabled: false` does not stop the webserver's and the daemon's upload
            # thread (the module docstring); this does.  Offline, its POST retries also held up each stop by 2 s.
            "DAGSTER_DISABLE_TELEMETRY": "1",
        }
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cli.dagster_services", "--grpc-port", str(_free_port())]
                + ["--port", str(port), "--workspace", str(self.log_path.with_suffix(".workspace.yaml"))],
                cwd=PROJECT_DIR,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # its own process group: stopped as one, never by the terminal's Ctrl-C
                preexec_fn=parent_death_signal(signal.SIGTERM),  # the services stop with the CLI
            )
        self.started = True
        return f"http://127.0.0.1:{port}"

    def stop(self, grace: float = 10) -> None:
        """Stop this invocation's services and everything they started (the whole process group)."""
        if self.process is None or self.process.poll() is not None:
            return
        try:  # a second Ctrl-C must not interrupt the clean-up (and print a traceback)
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread
            previous = None
        try:
            stop_process_group(self.process, grace, leader_first=True)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            with contextlib.suppress(OSError):
                self.log_path.with_suffix(".workspace.yaml").unlink()

    def _wait_for_location(self) -> None:
        """Wait until the code location is loaded (a load error is one line naming it)."""
        deadline = time.monotonic() + self.start_timeout
        last = "not answering"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(
                    f"the Dagster services exited before serving ({_last_error(self.log_path)}); see {self.log_path}"
                )
            try:
                workspace = graphql(self.url, _LOCATION_QUERY, timeout=5)["workspaceOrError"]
            except ServerError as exc:
                last = str(exc)
                time.sleep(0.5)
                continue
            entries = {e["name"]: e for e in workspace.get("locationEntries", [])}
            entry = entries.get(LOCATION_NAME)
            if entry and entry["loadStatus"] == "LOADED":
                error = entry.get("locationOrLoadError") or {}
                if error.get("__typename") == "PythonError":
                    first = (error.get("message") or "").strip().splitlines()
                    raise ServerError(f"code location {LOCATION_NAME} failed to load: {first[-1] if first else '?'}")
                return
            last = f"code location {LOCATION_NAME} is {entry['loadStatus'] if entry else 'not in the workspace'}"
            time.sleep(0.5)
        raise ServerError(f"the Dagster webserver at {self.url} was not ready in {self.start_timeout:.0f} s ({last})")


def _last_error(log_path: Path) -> str:
    """The last exception line of the services' log (a code server that failed to load names its error)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    errors = [
        line.strip() for line in lines if line.strip() and line.strip().split(":")[0].endswith(("Error", "Exception"))
    ]
    return errors[-1] if errors else (lines[-1].strip() if lines else "no output")
