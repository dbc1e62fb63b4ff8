"""A real PostgreSQL server for the tests: its own cluster in a temporary folder, on a free
loopback port, started from the machine's PostgreSQL binaries and stopped by its PID.

Where the binaries are: ``$HEARTLINE_PG_BINDIR``, else ``pg_config --bindir``, else the
newest ``/usr/lib/postgresql/*/bin`` (Debian's ``postgresql`` package, which ``.ci/run``
installs when the machine has none), else ``initdb`` on ``PATH``. PostgreSQL refuses to run
as root; as root the cluster runs as the ``postgres`` user that package creates.

``cluster_or_skip()`` is what fixtures call: with no binaries it skips, naming why, except
under ``CI=true``, where it fails (CI must run the PostgreSQL tests, never skip them).
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import free_port

__all__ = ["PgCluster", "cluster_or_skip", "find_bindir"]

USER = "heartline"
"""The cluster's superuser, trusted on loopback (no password)."""
_START_TIMEOUT = 60


def find_bindir() -> Path | None:
    """The folder of ``initdb``/``pg_ctl``/``postgres``, or None."""
    env = os.environ.get("HEARTLINE_PG_BINDIR")
    if env:
        return Path(env)
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], check=False, capture_output=True, text=True)
        found = Path(out.stdout.strip())
        if out.returncode == 0 and (found / "initdb").exists():
            return found
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


@dataclass
class PgCluster:
    """A running cluster; ``database()`` makes a fresh empty database and returns its URL."""

    bindir: Path
    folder: Path
    port: int
    run_as: str | None
    pid: int | None = None
    _names = itertools.count(1)

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.run_as, "--", *args] if self.run_as else list(args)

    def start(self) -> None:
        if self.run_as:
            shutil.chown(self.folder, user=self.run_as)
        subprocess.run(
            self._cmd(
                str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", USER,
                "-E", "UTF8", "--no-sync", "--locale=C",
            ),
            check=True, capture_output=True, timeout=_START_TIMEOUT,
        )  # fmt: skip
        # fsync off: the tests kill heartline servers, never PostgreSQL itself.
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder}"
            " -c fsync=off -c full_page_writes=off -c max_connections=200"
        )
        subprocess.run(
            self._cmd(
                str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-t",
                str(_START_TIMEOUT), "-o", options, "-l", str(self.folder / "log"), "start",
            ),
            check=True, capture_output=True, timeout=_START_TIMEOUT + 10,
        )  # fmt: skip
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def database(self, prefix: str = "t") -> str:
        """A new empty database; its URL."""
        name = f"{prefix}{next(self._names)}_{os.getpid()}"
        subprocess.run(
            [str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER,
             name],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        return self.url(name)

    def log(self) -> str:
        try:
            return (self.folder / "log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the postmaster by its PID (SIGQUIT: immediate shutdown), then drop the files."""
        if self.pid is not None:
            try:
                os.kill(self.pid, 3)
            except ProcessLookupError:
                pass
            else:
                for _ in range(200):
                    try:
                        os.kill(self.pid, 0)
                    except ProcessLookupError:
                        break
                    time.sleep(0.05)  # polling a PID that is not our child
            self.pid = None
        shutil.rmtree(self.folder, ignore_errors=True)


def _why_not() -> tuple[Path | None, str | None, str]:
    bindir = find_bindir()
    if bindir is None:
        return None, None, "no PostgreSQL binaries (initdb) on this machine"
    run_as = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return None, None, "running as root, and there is no 'postgres' user to run PostgreSQL"
        if shutil.which("runuser") is None:
            return None, None, "running as root without runuser to start PostgreSQL as 'postgres'"
        run_as = "postgres"
    return bindir, run_as, ""


def cluster_or_skip() -> PgCluster:
    """Start a cluster, or skip (fail under CI) saying why none can start."""
    bindir, run_as, why = _why_not()
    if bindir is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"PostgreSQL tests cannot run under CI: {why}")
        pytest.skip(f"PostgreSQL: {why}")
    # Not under pytest's tmp folders: those are root's and closed to the postgres user.
    folder = Path(tempfile.mkdtemp(prefix="heartline-pg-"))
    os.chmod(folder, 0o755)
    for attempt in range(3):
        cluster = PgCluster(bindir, folder, free_port(), run_as)
        try:
            cluster.start()
            return cluster
        except subprocess.CalledProcessError as err:
            detail = (err.stderr or b"").decode(errors="replace") + cluster.log()
            cluster.stop()
            folder = Path(tempfile.mkdtemp(prefix="heartline-pg-"))
            os.chmod(folder, 0o755)
            if attempt == 2:
                pytest.fail(f"PostgreSQL did not start: {detail}")
    raise AssertionError("unreachable")
