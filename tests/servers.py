"""Throw-away servers and hosts for the loopback cluster test: PostgreSQL, Redis, moto's S3 server, and network
namespaces that stand in for separate machines.  Each start() returns None when up, else why not; stop() is
safe to call twice and after a failed start.  Nothing here is shared with the running system: every server
listens on a free port of its own and keeps its files in a temporary folder.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cli.processes import parent_death_signal, stop_process_group

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(c) for c in cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,  # its own process group: stop_process_group takes its children too
            preexec_fn=parent_death_signal(signal.SIGKILL),  # gone with the test process, even on kill -9
        )


# ---- PostgreSQL ----------------------------------------------------------------------------------------------


def postgres_bin(name: str) -> str | None:
    """Debian keeps the server tools under /usr/lib/postgresql/<version>/bin, off PATH."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return found[-1] if found else shutil.which(name)


class Postgres:
    """initdb into ``root`` (as 'postgres' or 'nobody' when run as root), pg_ctl start on ``listen``."""

    user, db = "dagster", "reverse_sd_dagster"

    def __init__(self, root: Path, listen: list[str], allow_subnet: str | None = None):
        self.root, self.listen, self.allow_subnet = root, listen, allow_subnet
        self.data, self.log = root / "data", root / "server.log"
        self.port, self.password = free_port(), os.urandom(12).hex()
        self.bindir: Path | None = None
        self.run_as = None

    def _run(self, *args, timeout: int = 120) -> subprocess.CompletedProcess:
        kwargs = {"user": self.run_as.pw_uid, "group": self.run_as.pw_gid} if self.run_as else {}
        return subprocess.run(
            [str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=self.root, **kwargs
        )

    def start(self) -> str | None:
        if postgres_bin("initdb") is None:
            setup = subprocess.run(
                ["bash", str(PROJECT / "tests" / "postgres_setup.sh")], capture_output=True, text=True, timeout=600
            )
            if setup.returncode != 0:
                return f"no PostgreSQL server could be installed: {setup.stderr.strip()[-500:]}"
        self.bindir = Path(postgres_bin("initdb")).parent
        if os.geteuid() == 0:  # the server refuses to run as root
            for name in ("postgres", "nobody"):
                try:
                    self.run_as = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            else:
                return "running as root and no 'postgres' or 'nobody' user to run the server as"
        self.root.mkdir(parents=True, exist_ok=True)
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self.run_as:
            for path in (self.root, pwfile):
                os.chown(path, self.run_as.pw_uid, self.run_as.pw_gid)
        init = self._run(
            self.bindir / "initdb", "-D", self.data, "-U", self.user, f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--locale=C",
        )  # fmt: skip
        if init.returncode != 0:
            return f"initdb failed: {(init.stderr or init.stdout)[-800:]}"
        if self.allow_subnet:
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {self.allow_subnet} scram-sha-256\n")
        options = (
            f"-p {self.port} -c listen_addresses={','.join(self.listen)} -k {self.root} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        start = self._run(
            self.bindir / "pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "-o", options, "start"
        )
        if start.returncode != 0:
            log = self.log.read_text()[-800:] if self.log.exists() else ""
            return f"pg_ctl start failed: {(start.stderr or start.stdout)[-400:]} {log}"
        made = self._run(self.bindir / "createdb", "-h", self.root, "-p", self.port, "-U", self.user, self.db)
        if made.returncode != 0:
            return f"createdb failed: {made.stderr[-400:]}"
        return None

    def stop(self) -> None:
        if self.bindir is not None and self.data.exists():
            self._run(self.bindir / "pg_ctl", "-D", self.data, "-m", "immediate", "stop", timeout=60)

    def env(self, host: str) -> dict[str, str]:
        return {
            "DAGSTER_PG_HOST": host,
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USERNAME": self.user,
            "DAGSTER_PG_PASSWORD": self.password,
            "DAGSTER_PG_DB": self.db,
        }


# ---- Redis ---------------------------------------------------------------------------------------------------


class Redis:
    """Debian's redis-server (installed by tests/apt_install.sh when missing), no persistence."""

    def __init__(self, root: Path, listen: list[str]):
        self.root, self.listen = root, listen
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> str | None:
        if shutil.which("redis-server") is None:
            setup = subprocess.run(
                ["bash", str(PROJECT / "tests" / "apt_install.sh"), "no redis-server", "redis-server"],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if setup.returncode != 0 or shutil.which("redis-server") is None:
                return f"no redis-server could be installed: {setup.stderr.strip()[-500:]}"
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = ["redis-server", "--port", str(self.port), "--bind", *self.listen, "--save", "", "--appendonly", "no"]
        cmd += ["--protected-mode", "no", "--dir", str(self.root)]
        self.proc = spawn(cmd, self.root / "redis.log")
        if not wait_for_port(self.listen[0], self.port, 30, self.proc):
            return f"redis-server did not start: {(self.root / 'redis.log').read_text()[-500:]}"
        return None

    def stop(self) -> None:
        stop_process_group(self.proc)

    def url(self, host: str, db: int) -> str:
        return f"redis://{host}:{self.port}/{db}"


# ---- moto's S3 server ----------------------------------------------------------------------------------------


class MotoS3:
    """moto[server] as its own process (workers in other namespaces reach it over the bridge)."""

    credentials = {
        "AWS_ACCESS_KEY_ID": "reverse-sd-test",
        "AWS_SECRET_ACCESS_KEY": "reverse-sd-test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }

    def __init__(self, root: Path, host: str):
        self.root, self.host = root, host
        self.port = free_port(host)
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> str | None:
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]
        self.proc = spawn(cmd, self.root / "moto.log", env={**os.environ, **self.credentials})
        if not wait_for_port(self.host, self.port, 60, self.proc):
            return f"moto_server did not start: {(self.root / 'moto.log').read_text()[-500:]}"
        return None

    def stop(self) -> None:
        stop_process_group(self.proc)

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.credentials["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.credentials["AWS_SECRET_ACCESS_KEY"],
            region_name=self.credentials["AWS_DEFAULT_REGION"],
        )

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


# ---- network namespaces: a "machine" per worker ----------------------------------------------------------------


class Hosts:
    """A bridge on this machine (10.213.N.1/24) and one network namespace per extra host (10.213.N.2, .3, ...),
    each joined to the bridge by a veth pair: a namespace's 127.0.0.1 is its own, so its processes reach the
    servers only through the bridge address, as another machine would.  ``start()`` returns why not when the
    kernel or the user refuses (not root, no `ip`): the caller then runs the workers as plain processes."""

    def __init__(self, count: int):
        tag = f"{os.getpid() % 100000:05d}"
        self.subnet_id = 100 + os.getpid() % 150
        self.bridge = f"rsdbr{tag}"
        self.namespaces = [f"rsd-{tag}-w{i}" for i in range(count)]
        self.links = [f"rsdv{tag}{i}" for i in range(count)]
        self.created: list[tuple[str, str]] = []

    @property
    def host_address(self) -> str:
        return f"10.213.{self.subnet_id}.1"

    @property
    def subnet(self) -> str:
        return f"10.213.{self.subnet_id}.0/24"

    def _ip(self, *args: str, ns: str | None = None) -> None:
        cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise OSError(f"{' '.join(cmd)}: {done.stderr.strip()}")

    def start(self) -> str | None:
        if shutil.which("ip") is None:
            return "no `ip` command"
        try:
            self._ip("link", "add", self.bridge, "type", "bridge")
            self.created.append(("link", self.bridge))
            self._ip("addr", "add", f"{self.host_address}/24", "dev", self.bridge)
            self._ip("link", "set", self.bridge, "up")
            for i, (ns, link) in enumerate(zip(self.namespaces, self.links)):
                self._ip("netns", "add", ns)
                self.created.append(("netns", ns))
                self._ip("link", "add", link, "type", "veth", "peer", "name", f"{link}p")
                self.created.append(("link", link))
                self._ip("link", "set", f"{link}p", "netns", ns)
                self._ip("link", "set", link, "master", self.bridge)
                self._ip("link", "set", link, "up")
                self._ip("addr", "add", f"10.213.{self.subnet_id}.{i + 2}/24", "dev", f"{link}p", ns=ns)
                self._ip("link", "set", f"{link}p", "up", ns=ns)
                self._ip("link", "set", "lo", "up", ns=ns)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.stop()
            return str(exc)
        return None

    def prefix(self, i: int) -> list[str]:
        """The command prefix that runs a program on host ``i``."""
        return ["ip", "netns", "exec", self.namespaces[i]]

    def stop(self) -> None:
        for kind, name in reversed(self.created):
            subprocess.run(["ip", kind, "del", name], capture_output=True, timeout=30)
        self.created.clear()


def http_ok(url: str, timeout: float = 2) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False
