"""The Dagster services a `reverse-sd materialize` starts for itself (cli.dagster_services via DagsterServer):
they serve the code location, stop as a whole, name a code server that fails to load, and leave the command's
logs where Dagster's telemetry upload does not take them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cli.dagster_server import LOCATION_NAME, DagsterServer, ServerError, graphql, logs_dir
from cli.processes import group_alive

PROJECT = Path(__file__).resolve().parents[2]

_LOCATION = """{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename } } } } }"""


@pytest.fixture
def dagster_home(tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("REVERSE_SD_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("PORT", "9")  # no `make ui` webserver is looked for on 3000
    monkeypatch.delenv("REVERSE_SD_DAGSTER_URL", raising=False)
    return home


def test_the_services_serve_the_code_location_and_stop_as_a_whole_keeping_the_logs(dagster_home):
    """Served, then stopped with nothing left.  Logs stay where they are: the command's own (not in
    DAGSTER_HOME/logs), and even DAGSTER_HOME/logs, which Dagster's webserver and daemon move away to upload
    to its telemetry server unless DAGSTER_DISABLE_TELEMETRY is set (the services are given it)."""
    logs = logs_dir(dagster_home)
    logs.mkdir()
    (logs / "materialize-earlier.log").write_text("full errors of an earlier invocation\n")
    (dagster_home / "logs").mkdir()
    (dagster_home / "logs" / "someone-elses.log").write_text("kept\n")
    server = DagsterServer(str(dagster_home), logs / "dagster-test.log")
    with server:
        server.ready()
        assert server.started
        entries = graphql(server.url, _LOCATION)["workspaceOrError"]["locationEntries"]
        assert [(e["name"], e["loadStatus"], e["locationOrLoadError"]["__typename"]) for e in entries] == [
            (LOCATION_NAME, "LOADED", "RepositoryLocation")
        ]
        group = os.getpgid(server.process.pid)
        names = _commands(group)
        assert any("dagster_webserver" in c for c in names), names
        assert any("dagster-daemon" in c for c in names), names
        assert any("api grpc" in c for c in names), names
    assert not group_alive(group)
    assert (logs / "materialize-earlier.log").read_text() == "full errors of an earlier invocation\n"
    assert (dagster_home / "logs" / "someone-elses.log").read_text() == "kept\n"
    assert not (dagster_home / ".logs_queue").exists()
    assert not list(logs.glob("*.workspace.yaml"))


def test_a_code_location_that_fails_to_load_is_one_line_naming_its_error(dagster_home, tmp_path, monkeypatch):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import sys
            if "grpc" in sys.argv:  # the code server only
                class Refuse:
                    def find_spec(self, name, path=None, target=None):
                        if name == "assets.definitions":
                            raise ImportError("the definitions are broken on purpose")
                sys.meta_path.insert(0, Refuse())
            """
        )
    )
    monkeypatch.setenv("PYTHONPATH", f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    server = DagsterServer(str(dagster_home), logs_dir(dagster_home) / "dagster-test.log", start_timeout=120)
    with server, pytest.raises(ServerError) as error:
        server.ready()
    message = str(error.value)
    assert "exited before serving" in message and "the definitions are broken on purpose" in message, message
    assert "\n" not in message
    assert server.process.poll() is not None  # the supervisor stopped the rest and exited


def test_the_supervisor_explains_itself():
    result = subprocess.run(
        [sys.executable, "-m", "cli.dagster_services", "--help"], cwd=PROJECT, capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "--grpc-port" in result.stdout and "--workspace" in result.stdout


def _commands(group: int) -> list[str]:
    """The command lines of the live processes of ``group``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[2]) == group and stat[0] not in ("Z", "X"):
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, IndexError, ValueError):
            continue
    return found
