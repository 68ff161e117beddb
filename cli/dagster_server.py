"""The Dagster webserver that `reverse-sd materialize` submits its runs to (GraphQL), found or started.

Every run goes through the instance's run coordinator (the queue in dagster.yaml) and its run launcher, so
the same command drives a cluster when dagster.yaml says so.  Which server:

1. REVERSE_SD_DAGSTER_URL (e.g. http://dagster.internal:3000): an operator's deployment; used as it is.
2. a webserver already serving this DAGSTER_HOME on 127.0.0.1:$PORT (3000 by default): `make ui`, so the
   runs appear live in the open UI;
3. otherwise `dagster dev` (webserver, daemon, code server), started for this invocation in its own process
   group and stopped with it: no orphan survives, even a kill -9 of the CLI (the kernel's parent-death
   signal).
"""

from __future__ import annotations

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

from cli.processes import parent_death_signal, stop_process_group

PROJECT_DIR = Path(__file__).resolve().parents[1]
LOCATION_NAME = "reverse-sd"  # workspace.yaml's location_name
REPOSITORY_NAME = "__repository__"  # the repository a Definitions object is loaded as
URL_SETTING = "REVERSE_SD_DAGSTER_URL"


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
        self.started = False  # True when this invocation started `dagster dev`

    def __enter__(self) -> DagsterServer:
        """Find the webserver, or start `dagster dev` (not waiting: call ready() before the first query, so the
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

    # ---- embedded `dagster dev` ------------------------------------------------------------------------

    def _start(self) -> str:
        port = _free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "DAGSTER_HOME": str(Path(self.dagster_home).resolve()), "PYTHONWARNINGS": "ignore"}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dagster", "dev", "-w", str(PROJECT_DIR / "workspace.yaml")]
                + ["-h", "127.0.0.1", "-p", str(port)],
                cwd=PROJECT_DIR,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # its own process group: stopped as one, never by the terminal's Ctrl-C
                preexec_fn=parent_death_signal(signal.SIGTERM),  # `dagster dev` stops with the CLI
            )
        self.started = True
        return f"http://127.0.0.1:{port}"

    def stop(self, grace: float = 10) -> None:
        """Stop the embedded `dagster dev` and everything it started (the whole process group)."""
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

    def _wait_for_location(self) -> None:
        """Wait until the code location is loaded (a load error is one line naming it)."""
        deadline = time.monotonic() + self.start_timeout
        last = "not answering"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(
                    f"`dagster dev` exited with code {self.process.returncode} before serving; see {self.log_path}"
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
