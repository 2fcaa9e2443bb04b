"""Hosts that lose the network (issue 14, part 3).

Topology (``tests/netns.py``; names unique per test, all removed at teardown):
a bridge in the root namespace (the test process reaches the database over
it) and three network namespaces joined to it by veth pairs: ``db`` runs the
embedded PostgreSQL (as the unprivileged service user), ``w1`` and ``w2`` run
worker processes (``tests/procs_netns.py``, lease 3 s). A cut sets the bridge
side of ``w1``'s veth down: its processes run on, their TCP connections stay
open, and what they sent during the cut arrives when the link is back.

The scenario: ``w1`` owns four runs, held at their fourth step (two inside it:
a step in flight; two before it: at the lease guard). ``w2`` starts; ``w1`` is
cut off for longer than its lease. Asserted, from the database (timestamps on
its clock):

- ``w2`` takes every run over within 1 s of the lease's expiry (``lease_until``
  last seen while ``w1`` owned it vs. the claim's ``run_events.at``), so within
  lease + 1 s of the cut;
- the link comes back while ``w2`` holds the runs before journaling that step:
  ``w1``'s two results of it reach the server (its ``journal_step`` call count,
  ``track_functions``) and are refused (no entry with ``w1``'s epoch after the
  takeover, none at all at that position); ``w1`` logs that it lost every lease,
  and the two runs held before the step never start it there;
- no step function (recorded by each host in a local file first, then in the
  database) started after its journal entry committed, ``w1`` started nothing
  after the takeover, each step ran at most once per host, the journal has no
  duplicate (run_id, name, occurrence) and holds exactly the expected entries;
- ``w1`` then holds four new runs at once (so none of the old ones is still in
  flight there) and completes them.

A second test: a worker cut off the network marks its runs lost by their
leases' expiry (a heartbeat stuck on a black-holed connection is left behind).

Skipped, with the reason, where namespaces cannot be made (not root, no
iproute2, no namespace support) or there are no PostgreSQL binaries.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgjournal.migrations import migrate

from . import netns
from .conftest import ROOT, Effects, wait_for
from .procs_netns import build_app

pytestmark = pytest.mark.own_server

SCHEMA = "netns"
LEASE = 3.0
#: The takeover bound past the lease's expiry: the other worker polls every
#: 0.2 s (``poll_interval``) and needs one claim round trip; the rest is slack
#: for a loaded 2-CPU machine.
TAKEOVER_BOUND = 1.0
#: Steps per run of the cut (the runs are held at tick3 on w1).
N = 8


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    out: Path          # stdout/stderr: the worker's log
    effects: Path      # its local record of step executions

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def notes(self) -> list[dict[str, Any]]:
        if not self.effects.exists():
            return []
        return [json.loads(line) for line in self.effects.read_text().splitlines() if line]


@dataclass
class Cluster:
    net: netns.Network
    hosts: dict[str, netns.Host]
    server: netns.NamespacedServer
    tmp: Path
    procs: list[Proc] = field(default_factory=list)

    @property
    def dsn(self) -> str:
        return self.server.dsn

    def spawn_worker(self, host: str, *, concurrency: int,
                     env: dict[str, str] | None = None) -> Proc:
        name = f"{host}-{len(self.procs)}"
        out, notes = self.tmp / f"{name}.log", self.tmp / f"{name}.effects"
        args = self.hosts[host].exec(
            sys.executable, "-m", "tests.procs_netns", self.dsn, SCHEMA, "--log", str(notes),
            "--concurrency", str(concurrency), "--lease", str(LEASE))
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.Popen(args, cwd=ROOT, env=full_env,
                                stdout=out.open("wb"), stderr=subprocess.STDOUT)
        p = Proc(name, proc, out, notes)
        self.procs.append(p)
        return p


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(f"cannot build hosts in network namespaces: {reason}")
    net = netns.Network()
    server: netns.NamespacedServer | None = None
    c: Cluster | None = None
    try:
        hosts = {name: net.add_host(name) for name in ("db", "w1", "w2")}
        # track_functions: the test counts the calls of journal_step (refused ones too)
        server = netns.NamespacedServer(hosts["db"], settings={"track_functions": "pl"})
        server.start()
        server.wait_reachable()
        c = Cluster(net, hosts, server, tmp_path)
        yield c
    finally:
        # Whatever happened: links up (a cut host's processes must be able to die
        # cleanly), workers killed, server stopped, namespaces and links deleted.
        for host in net.hosts.values():
            with contextlib.suppress(Exception):
                net.restore(host)
        for p in (c.procs if c is not None else []):
            if p.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.proc.wait(10)
        if server is not None:
            with contextlib.suppress(Exception):
                server.cleanup()
        net.close()


class Db:
    """The test's own connection (root namespace, over the bridge)."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)

    def rows(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        return self.conn.execute(query.replace("{s}", f'"{SCHEMA}"'), params).fetchall()

    def one(self, query: str, *params: Any) -> Any:
        rows = self.rows(query, *params)
        return rows[0][0] if rows else None

    def now(self) -> datetime:
        value: datetime = self.one("SELECT clock_timestamp()")
        return value


async def registered(db: Db, p: Proc) -> uuid.UUID:
    """The worker id of process ``p`` once it has registered."""
    async def check() -> Any:
        if p.proc.poll() is not None:
            raise AssertionError(f"worker {p.name} exited:\n{p.output()}")
        return db.one("SELECT id FROM {s}.workers WHERE pid = %s AND stopped_at IS NULL",
                      p.pid)
    found: uuid.UUID = await wait_for(check, 30, what=f"worker {p.name} to register")
    return found


async def test_host_cut_off_past_its_lease_is_fenced_and_comes_back(
        cluster: Cluster) -> None:
    migrate(cluster.dsn, schema=SCHEMA)
    Effects(cluster.dsn, SCHEMA)  # creates <schema>.test_effects
    db = Db(cluster.dsn)
    app = build_app(cluster.dsn, SCHEMA)
    try:
        await _scenario(cluster, db, app)
    finally:
        await app.close()
        db.conn.close()


def _noted(p: Proc, ev: str, run_id: Any, label: str) -> bool:
    return any(n["ev"] == ev and n["run"] == str(run_id) and n["label"] == label
               for n in p.notes())


async def _scenario(cluster: Cluster, db: Db, app: Any) -> None:
    net, w1_host = cluster.net, cluster.hosts["w1"]
    gates = {name: cluster.tmp / f"gates-{name}" for name in ("w1", "w2")}
    for d in gates.values():
        d.mkdir()

    # -- w1 owns four runs, three steps in, each held at tick3 -------------------------
    # Two are inside tick3 (a step in flight: its result will be written after the
    # link is back), two wait in workflow code before it (tick3 must then pass the
    # lease guard). Each worker has gates of its own (the same names in its dir).
    w1 = cluster.spawn_worker("w1", concurrency=4, env={"PGJ_NETNS_GATES": str(gates["w1"])})
    w1_id = await registered(db, w1)
    inside = [await app.start("ticker", N, 0.05, hold_at=3, hold="inside", gate="cut")
              for _ in range(2)]
    between = [await app.start("ticker", N, 0.05, hold_at=3, hold="between", gate="cut")
               for _ in range(2)]
    handles = inside + between
    ids = [h.run_id for h in handles]

    async def w1_holds_all() -> bool:
        rows = db.rows(
            "SELECT r.worker_id, r.lease_epoch, (SELECT count(*) FROM {s}.steps s "
            "WHERE s.run_id = r.id) FROM {s}.runs r WHERE r.id = ANY(%s) "
            "AND r.status = 'running'", ids)
        return (len(rows) == 4 and all(row == (w1_id, 1, 3) for row in rows)
                and all(_noted(w1, "start", h.run_id, "tick3") for h in inside)
                and all(_noted(w1, "held", h.run_id, "tick3") for h in between))

    await wait_for(w1_holds_all, 30, what="w1 to own all four runs, held at tick3")
    w2 = cluster.spawn_worker("w2", concurrency=8, env={"PGJ_NETNS_GATES": str(gates["w2"])})
    w2_id = await registered(db, w2)

    # -- cut w1 off; its processes keep running ----------------------------------------
    cut_at = db.now()
    net.cut(w1_host)
    expiry: dict[uuid.UUID, datetime] = {}   # w1's lease expiry, last seen before takeover

    async def taken_over() -> bool:
        rows = db.rows("SELECT id, lease_epoch, worker_id, lease_until FROM {s}.runs "
                       "WHERE id = ANY(%s)", ids)
        for run_id, epoch, worker, due_at in rows:
            if epoch == 1 and worker == w1_id:
                expiry[run_id] = due_at
        return all(epoch > 1 for _r, epoch, _w, _d in rows)

    await wait_for(taken_over, 30, what="w2 to take over w1's runs")
    takeover: dict[uuid.UUID, datetime] = {}
    for run_id in ids:
        (at, worker, epoch), = db.rows(
            "SELECT at, worker_id, lease_epoch FROM {s}.run_events WHERE run_id = %s "
            "AND to_status = 'running' AND lease_epoch > 1 ORDER BY id LIMIT 1", run_id)
        assert (worker, epoch) == (w2_id, 2), "a run was not taken over by w2 directly"
        takeover[run_id] = at
        late = (at - expiry[run_id]).total_seconds()
        assert 0 < late <= TAKEOVER_BOUND, \
            f"run {run_id} taken over {late:.3f}s after its lease expired"
        since_cut = (at - cut_at).total_seconds()
        assert since_cut <= LEASE + TAKEOVER_BOUND, \
            f"run {run_id} taken over {since_cut:.3f}s after the cut"

    # The cut lasts until w2 has replayed every run up to tick3 and holds it there
    # (inside tick3, or before it), and longer than the lease.
    async def w2_holds_all() -> bool:
        return (all(_noted(w2, "start", h.run_id, "tick3") for h in inside)
                and all(_noted(w2, "held", h.run_id, "tick3") for h in between))

    await wait_for(w2_holds_all, 30, what="w2 to hold every run at tick3")

    async def longer_than_the_lease() -> bool:  # on the database's clock
        return (db.now() - cut_at).total_seconds() > LEASE + 0.5

    await wait_for(longer_than_the_lease, 30, what="the cut to outlast the lease")
    assert w1.proc.poll() is None, f"the cut-off worker died:\n{w1.output()}"
    restore_at = db.now()
    net.restore(w1_host)
    assert (restore_at - cut_at).total_seconds() > LEASE, "the cut was not longer than the lease"
    lateness = sorted((takeover[r] - expiry[r]).total_seconds() for r in ids)
    print(f"takeover {lateness[0]:.3f}-{lateness[-1]:.3f}s after the lease expiry, "
          f"{max(takeover.values()) - cut_at}s after the cut; cut for {restore_at - cut_at}")

    # -- the link is back: w1's held runs go on and hit the fence ----------------------
    # w2 still holds every run before journaling tick3, so position 3 is free:
    # only the lease epoch can refuse w1's results of tick3.
    (gates["w1"] / "cut").touch()

    async def w1_gave_up() -> bool:
        out = w1.output()
        return all(f"lost the lease of run {r}" in out for r in ids)

    await wait_for(w1_gave_up, 30, what="w1 to say it lost the lease of every run")

    async def journal_calls(expected: int) -> int:
        # Backends report their function counts when idle (at most ~10 s later) or
        # when they exit.
        seen: int = db.one("SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions "
                           "WHERE schemaname = %s AND funcname = 'journal_step'", SCHEMA)
        assert seen <= expected, f"{seen} journal_step calls, {expected} expected"
        return seen if seen == expected else 0

    # w1's twelve entries (tick0-2) and its two results of tick3, sent after the
    # link came back: the database got them and refused them.
    refused = 4 * 3 + len(inside)
    await wait_for(lambda: journal_calls(refused), 30,
                   what="w1's results of tick3 to reach the database")
    assert db.rows("SELECT run_id, position, lease_epoch FROM {s}.steps "
                   "WHERE run_id = ANY(%s) AND position >= 3", ids) == []
    (gates["w2"] / "cut").touch()
    for h in handles:
        assert await h.result(timeout=60) == N

    # -- w1 then serves new runs, with all four of its slots --------------------------
    # Four new runs held at once on w1 (concurrency 4) mean that none of the old
    # runs is still in flight there: w1 stopped them all.
    w2.proc.send_signal(signal.SIGTERM)
    assert w2.proc.wait(30) == 0, w2.output()
    fresh = [await app.start("ticker", 2, 0.0, hold_at=0, hold="between", gate="fresh")
             for _ in range(4)]

    async def w1_holds_fresh() -> bool:
        return all(_noted(w1, "held", h.run_id, "tick0") for h in fresh)

    await wait_for(w1_holds_fresh, 30, what="w1 to claim four new runs at once")
    (gates["w1"] / "fresh").touch()
    for h in fresh:
        assert await h.result(timeout=60) == 2
        claims = db.rows("SELECT worker_id FROM {s}.run_events WHERE run_id = %s "
                         "AND to_status = 'running'", h.run_id)
        assert claims == [(w1_id,)]
        outputs = [o for (o,) in db.rows("SELECT output FROM {s}.steps WHERE run_id = %s "
                                         "ORDER BY position", h.run_id)]
        assert outputs == [f"tick0@{w1.pid}", f"tick1@{w1.pid}"]
    assert w1.proc.poll() is None

    # -- what the database and the hosts' own records say about the cut runs -----------
    assert db.rows("SELECT run_id, name, occurrence FROM {s}.steps GROUP BY 1, 2, 3 "
                   "HAVING count(*) > 1") == []
    starts = [(n, w1) for n in w1.notes() if n["ev"] == "start"] + \
             [(n, w2) for n in w2.notes() if n["ev"] == "start"]
    everything = [f"tick{i}" for i in range(N)]
    for h in handles:
        run_id = h.run_id
        assert db.one("SELECT status FROM {s}.runs WHERE id = %s", run_id) == "completed"
        steps = db.rows("SELECT position, name, occurrence, lease_epoch, output, created_at "
                        "FROM {s}.steps WHERE run_id = %s ORDER BY position", run_id)
        assert [(p, n, o) for p, n, o, *_ in steps] == [(i, "tick", i) for i in range(N)]
        # Fencing: w1's entries (tick0-2) all precede the takeover; everything after
        # it is w2's. w1's result of tick3, written after the link came back, is not
        # there: the fence refused it.
        for _p, _n, occ, epoch, output, created in steps:
            owner_epoch, owner = (1, w1) if occ < 3 else (2, w2)
            assert (epoch, output) == (owner_epoch, f"tick{occ}@{owner.pid}"), steps
            assert (created < takeover[run_id]) == (epoch == 1), steps
        journaled = {f"tick{occ}": created for _p, _n, occ, _e, _o, created in steps}
        tried = {p.name: [n["label"] for n, q in starts if q is p and n["run"] == str(run_id)]
                 for p in (w1, w2)}
        for note, p in starts:
            if note["run"] != str(run_id):
                continue
            started = datetime.fromtimestamp(note["t"], tz=takeover[run_id].tzinfo)
            # No step function started once its journal entry had committed.
            assert started < journaled[note["label"]], \
                f"{p.name} ran {note['label']} of {run_id} again after it was journaled"
            if p is w1:  # w1 starts nothing once the run is no longer its own
                assert started < takeover[run_id], \
                    f"w1 started {note['label']} of {run_id} after the takeover"
        if h in inside:  # w1 was inside tick3; w2 ran it again (never journaled by w1)
            assert tried == {w1.name: everything[:4], w2.name: everything[3:]}, tried
        else:  # w1 held before tick3 never started it: the lease guard stopped it
            assert tried == {w1.name: everything[:3], w2.name: everything[3:]}, tried
        # The database saw the same side effects (w1's tick3 arrived after the cut).
        effect_rows = db.rows("SELECT step, pid FROM {s}.test_effects WHERE run_id = %s",
                              str(run_id))
        assert sorted(effect_rows) == sorted(
            [(lb, w1.pid) for lb in tried[w1.name]] + [(lb, w2.pid) for lb in tried[w2.name]])

    # -- no journal write beyond those: 40 entries and the two refused ----------------
    w1.proc.send_signal(signal.SIGTERM)
    assert w1.proc.wait(30) == 0, w1.output()
    expected_calls = 4 * N + 4 * 2 + len(inside)
    await wait_for(lambda: journal_calls(expected_calls), 30,
                   what=f"{expected_calls} journal_step calls")
    assert db.one("SELECT count(*) FROM {s}.steps") == expected_calls - len(inside)


#: How late after its lease's expiry (database clock) a cut-off worker may mark
#: the run lost. The heartbeat loop checks the local deadlines once per beat
#: (a sleep of one heartbeat interval, then a beat given up after at most one
#: more), and the local deadline is never later than the expiry: so two
#: intervals (lease / 3 each), plus 0.25 s for a late event loop. Before the
#: stuck-beat fix the run was given up 5.2-5.3 s late (psycopg's cancel path).
#: No step starts in that window without a round trip that confirms the lease.
ABANDON_SLACK = 2 * LEASE / 3 + 0.25


async def test_cut_off_worker_gives_up_its_runs_by_its_lease_deadline(
        cluster: Cluster) -> None:
    """Worker._heartbeat_loop promises that a run whose lease could not be
    renewed is given up within one beat of its local deadline, even when the
    beat itself hangs on a black-holed connection. Here w1, alone, holds one
    run between two steps when it is cut off; its own log line saying it lost
    the lease (time from the record, the machine's one clock) is compared with
    the lease expiry in the database."""
    migrate(cluster.dsn, schema=SCHEMA)
    Effects(cluster.dsn, SCHEMA)
    db = Db(cluster.dsn)
    app = build_app(cluster.dsn, SCHEMA)
    gates = cluster.tmp / "gates"
    gates.mkdir()
    try:
        w1 = cluster.spawn_worker("w1", concurrency=1, env={"PGJ_NETNS_GATES": str(gates)})
        w1_id = await registered(db, w1)
        h = await app.start("ticker", 3, 0.0, hold_at=1, hold="between", gate="never")

        async def held() -> bool:
            owner = db.one("SELECT worker_id FROM {s}.runs WHERE id = %s "
                           "AND status = 'running'", h.run_id)
            return owner == w1_id and _noted(w1, "held", h.run_id, "tick1")

        await wait_for(held, 30, what="w1 to hold the run between tick0 and tick1")
        # Two more heartbeats: w1's heartbeat connection is open and in use, so the
        # cut catches its next beat on that connection (as on any long-lived worker).
        for _ in range(2):
            before = db.one("SELECT heartbeat_at FROM {s}.workers WHERE id = %s", w1_id)

            async def beat(before: datetime = before) -> bool:
                return bool(db.one("SELECT heartbeat_at > %s FROM {s}.workers "
                                   "WHERE id = %s", before, w1_id))

            await wait_for(beat, 30, what="a heartbeat of w1")
        cluster.net.cut(cluster.hosts["w1"])
        line = f"lost the lease of run {h.run_id}"

        async def gave_up() -> str | None:
            return next((ln for ln in w1.output().splitlines() if line in ln), None)

        found: str = await wait_for(gave_up, 30, what="w1 to give the run up")
        at = float(found.split()[0])  # the record's time (%(created))
        # Still cut: no heartbeat of w1 can have moved the expiry since.
        expiry: datetime = db.one("SELECT lease_until FROM {s}.runs WHERE id = %s",
                                  h.run_id)
        late = at - expiry.timestamp()
        assert late <= ABANDON_SLACK, \
            f"w1 gave the run up {late:.2f}s after its lease expired in the database"
    finally:
        await app.close()
        db.conn.close()


def test_hosts_reach_each_other_when_forward_policy_drops() -> None:
    """A Docker engine sets iptables' FORWARD policy to DROP; with br_netfilter
    (bridge-nf-call-iptables=1) that cut traffic between namespaces on our
    bridge, and these tests failed with "timed out waiting for worker to
    register" instead of running. The network lets its own bridge through."""
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(f"cannot build hosts in network namespaces: {reason}")
    nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    if netns.IPTABLES is None or not nf.exists() or nf.read_text().strip() != "1":
        pytest.skip("bridged traffic does not cross iptables here (no iptables, or "
                    "br_netfilter off): a FORWARD policy cannot cut it")
    before = netns._iptables("-S", "FORWARD")
    assert before is not None and before.returncode == 0, before
    policy = next(line.split()[2] for line in before.stdout.splitlines()
                  if line.startswith("-P FORWARD"))
    net = netns.Network()
    try:
        a, b = net.add_host("a"), net.add_host("b")
        netns._iptables("-P", "FORWARD", "DROP")
        server = subprocess.Popen(a.exec(sys.executable, "-c", (
            "import socket\n"
            f"s = socket.create_server(({a.addr!r}, 5555))\n"
            "print('listening', flush=True)\n"
            "c, _ = s.accept(); c.sendall(b'ok'); c.close()\n")),
            stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None and server.stdout.readline() == "listening\n"
            client = subprocess.run(b.exec(sys.executable, "-c", (
                "import socket\n"
                f"s = socket.create_connection(({a.addr!r}, 5555), timeout=5)\n"
                "print(s.recv(2).decode())\n")), capture_output=True, text=True, timeout=30,
                check=False)
            assert client.stdout.strip() == "ok", client.stderr
        finally:
            server.kill()
            server.wait(10)
    finally:
        netns._iptables("-P", "FORWARD", policy)
        net.close()
