"""A real PgBouncer in transaction pooling mode in front of the test server.

``pgbouncer`` (the fixture; import ``pgbouncer_fixture`` to use it) starts
``pgbouncer`` from ``PATH`` (or ``/usr/sbin``) with a generated config and
userlist in a temporary directory, listening on a free port on 127.0.0.1 and pointing at the
session's PostgreSQL (whatever ``pgjournal_dsn`` is). Tests that use it skip,
saying why, where the binary is missing (Debian: ``apt-get install pgbouncer``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from pgjournal.pytest_plugin import TestPostgres


def find_pgbouncer() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    for candidate in ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _quote(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


@dataclass
class Bouncer:
    #: Clients connect here: PgBouncer, transaction mode.
    dsn: str
    #: The server itself, bypassing PgBouncer (for LISTEN).
    direct_dsn: str
    port: int
    log: Path

    def show(self, what: str) -> list[dict[str, object]]:
        """``SHOW <what>`` on PgBouncer's admin console (``pgbouncer`` database)."""
        info = conninfo_to_dict(self.dsn)
        info["dbname"] = "pgbouncer"
        with psycopg.connect(make_conninfo(**info), autocommit=True,
                             prepare_threshold=None, row_factory=dict_row) as conn:
            return list(conn.execute(f"SHOW {what}").fetchall())


def start_bouncer(direct_dsn: str, workdir: Path, *, pool_size: int = 20,
                  ) -> tuple[subprocess.Popen[bytes], Bouncer]:
    """Start PgBouncer (transaction mode, ``pool_size`` server connections) in
    front of ``direct_dsn``, its files in ``workdir``; returns when it answers."""
    binary = find_pgbouncer()
    if binary is None:
        pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    info = conninfo_to_dict(direct_dsn)
    host = str(info.get("host") or "127.0.0.1")
    server_port = str(info.get("port") or "5432")
    user = str(info.get("user") or os.environ.get("PGUSER") or "postgres")
    dbname = str(info.get("dbname") or user)
    password = str(info.get("password") or "")
    port = _free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    userlist = workdir / "userlist.txt"
    userlist.write_text(f"{_quote(user)} {_quote(password)}\n")
    log = workdir / "pgbouncer.log"
    ini = workdir / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"{dbname} = host={host} port={server_port} dbname={dbname}\n"
        "\n[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {userlist}\n"
        "pool_mode = transaction\n"
        "max_client_conn = 500\n"
        f"default_pool_size = {pool_size}\n"
        f"admin_users = {user}\n"
        f"logfile = {log}\n"
        f"pidfile = {workdir / 'pgbouncer.pid'}\n"
        "ignore_startup_parameters = extra_float_digits\n"
        "server_check_delay = 0\n"
    )
    args = [binary, str(ini)]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        workdir.chmod(0o777)
        for path in (userlist, ini):
            path.chmod(0o644)
        args[1:1] = ["-u", "nobody"]
    with (workdir / "stderr.log").open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    bouncer_dsn = make_conninfo(host="127.0.0.1", port=port, user=user, dbname=dbname,
                                **({"password": password} if password else {}))
    deadline = time.monotonic() + 15
    while True:
        try:
            with psycopg.connect(bouncer_dsn, connect_timeout=2, autocommit=True,
                                 prepare_threshold=None) as conn:
                conn.execute("SELECT 1")
            break
        except psycopg.Error as exc:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                text = "".join(p.read_text(errors="replace") for p in
                               (log, workdir / "stderr.log") if p.exists())
                pytest.fail(f"pgbouncer did not start ({exc}); its log:\n{text}")
            time.sleep(0.1)
    return proc, Bouncer(bouncer_dsn, direct_dsn, port, log)


@contextlib.contextmanager
def running_bouncer(direct_dsn: str, *, keep_log: Path | None = None,
                    pool_size: int = 20) -> Iterator[Bouncer]:
    """PgBouncer in front of ``direct_dsn`` for the body of the block; stopped
    after, its log copied to ``keep_log`` when given."""
    # Not under pytest's tmp_path: as root PgBouncer runs as nobody, who cannot
    # enter pytest's private temporary directories.
    workdir = Path(tempfile.mkdtemp(prefix="pgjournal-pgbouncer-"))
    proc, bouncer = start_bouncer(direct_dsn, workdir, pool_size=pool_size)
    try:
        yield bouncer
    finally:
        if keep_log is not None and bouncer.log.exists():
            shutil.copy(bouncer.log, keep_log)
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(name="pgbouncer")
def pgbouncer_fixture(pgjournal_postgres: TestPostgres, tmp_path: Path) -> Iterator[Bouncer]:
    """PgBouncer in transaction mode in front of the test's server (always the
    server itself, also in the PgBouncer pass); stopped after."""
    with running_bouncer(pgjournal_postgres.dsn, keep_log=tmp_path / "pgbouncer.log") as b:
        yield b
