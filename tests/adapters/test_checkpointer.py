"""Conformance of the event + snapshot checkpointer (issue 5, interface 4), in memory
and on Postgres, with plain to_dict/from_dict classes and with pydantic models."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pytest
from pydantic import BaseModel

from pgjournal.adapters import (
    Checkpointer,
    CorruptEntry,
    DuplicateEntry,
    InMemoryCheckpointer,
    PostgresCheckpointer,
    run_uuid,
)

from .conftest import DBA


@dataclass
class Event:
    run_id: str
    seq: int
    ts: float
    kind: str
    lane_id: str = "main"
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Event:
        return cls(**d)


@dataclass
class State:
    run_id: str
    step: int
    memory: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> State:
        return cls(**d)


class PEvent(BaseModel):
    run_id: str
    seq: int
    ts: float
    kind: str
    lane_id: str = "main"


class PState(BaseModel):
    step: int


@pytest.fixture(params=["memory", "postgres"])
def cp(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "memory":
        c: Any = InMemoryCheckpointer(Event, State)
    else:
        c = PostgresCheckpointer(request.getfixturevalue("spool"), Event, State,
                                 schema=request.getfixturevalue("pgjournal_schema"))
    yield c
    c.close()


def ev(run: str, seq: int, kind: str = "tool_call", **kw: Any) -> Event:
    return Event(run_id=run, seq=seq, ts=1000.0 + seq, kind=kind, **kw)


def test_is_a_checkpointer(cp: Any) -> None:
    assert isinstance(cp, Checkpointer)


def test_events_append_and_list_since(cp: Any) -> None:
    events = [ev("r1", i, lane_id="main" if i % 2 else "side", data={"i": i})
              for i in range(1, 6)]
    for e in events:
        cp.save_event(e)
    cp.save_event(ev("r2", 1))
    assert cp.list_events("r1") == events
    assert cp.list_events("r1", since_seq=3) == events[3:]
    assert cp.list_events("r1", since_seq=5) == []
    assert cp.list_events("r2") == [ev("r2", 1)]
    assert cp.list_events("nobody") == []


def test_events_out_of_order_come_back_in_seq_order(cp: Any) -> None:
    for seq in (3, 1, 2):
        cp.save_event(ev("r1", seq, kind="k"))
    assert [e.seq for e in cp.list_events("r1")] == [1, 2, 3]


def test_an_event_is_never_overwritten(cp: Any) -> None:
    cp.save_event(ev("r1", 1, data={"v": 1}))
    with pytest.raises(DuplicateEntry, match="1"):
        cp.save_event(ev("r1", 1, data={"v": 2}))
    assert cp.list_events("r1")[0].data == {"v": 1}


def test_snapshot_overwrites_latest(cp: Any) -> None:
    assert cp.load_latest("r1") is None
    cp.save_snapshot("r1", State("r1", 1, ["a"]))
    cp.save_snapshot("r1", State("r1", 2, ["a", "b"]))
    assert cp.load_latest("r1") == State("r1", 2, ["a", "b"])


def test_list_runs_with_snapshots_newest_first(cp: Any) -> None:
    cp.save_event(ev("events-only", 1))
    cp.save_snapshot("a", State("a", 1))
    cp.save_snapshot("b", State("b", 1))
    cp.save_snapshot("c", State("c", 1))
    cp.save_snapshot("a", State("a", 2))
    assert cp.list_runs() == ["a", "c", "b"]


def test_delete_run(cp: Any) -> None:
    cp.save_event(ev("r1", 1))
    cp.save_snapshot("r1", State("r1", 1))
    cp.save_event(ev("r2", 1))
    cp.delete_run("r1")
    assert cp.load_latest("r1") is None
    assert cp.list_events("r1") == []
    assert cp.list_runs() == []
    assert len(cp.list_events("r2")) == 1


def test_pydantic_models(request: pytest.FixtureRequest) -> None:
    mem: Any = InMemoryCheckpointer(PEvent, PState)
    pg: Any = PostgresCheckpointer(request.getfixturevalue("spool"), PEvent, PState,
                                   schema=request.getfixturevalue("pgjournal_schema"))
    for c in (mem, pg):
        c.save_event(PEvent(run_id="p", seq=1, ts=1.5, kind="start"))
        c.save_snapshot("p", PState(step=3))
        assert c.list_events("p") == [PEvent(run_id="p", seq=1, ts=1.5, kind="start")]
        assert c.load_latest("p") == PState(step=3)
    pg.close()


# -- Postgres: visibility and corruption ----------------------------------------------


@pytest.fixture
def pg(spool: Any, pgjournal_schema: str) -> Iterator[PostgresCheckpointer[Event, State]]:
    c = PostgresCheckpointer(spool, Event, State, schema=pgjournal_schema)
    yield c
    c.close()


def test_events_and_snapshot_visible_to_a_dba(pg: PostgresCheckpointer[Event, State],
                                              dba: DBA) -> None:
    pg.save_event(ev("r1", 1, kind="llm"))
    pg.save_event(ev("r1", 2, kind="llm", lane_id="side"))
    pg.save_snapshot("r1", State("r1", 2))
    run_id = run_uuid("checkpoint", "r1")
    run = dba.rows("SELECT source, output, meta FROM runs WHERE id = %s", run_id)[0]
    assert (run["source"], run["output"]) == ("checkpointer", State("r1", 2).to_dict())
    assert run["meta"]["snapshot_after_seq"] == 2
    steps = dba.rows("SELECT position, name, occurrence, kind, meta FROM steps "
                     "WHERE run_id = %s ORDER BY position", run_id)
    assert [(s["position"], s["name"], s["occurrence"], s["kind"]) for s in steps] == [
        (1, "llm", 0, "entry"), (2, "llm", 1, "entry")]
    assert steps[1]["meta"] == {"seq": 2, "ts": 1002.0, "lane_id": "side"}


def test_a_corrupt_event_names_its_run_and_seq(pg: PostgresCheckpointer[Event, State],
                                               dba: DBA) -> None:
    for seq in (1, 2, 3):
        pg.save_event(ev("r-bad", seq))
    dba.rows("UPDATE steps SET output = '{\"run_id\": \"r-bad\"}' WHERE run_id = %s "
             "AND position = 2 RETURNING 1", run_uuid("checkpoint", "r-bad"))
    with pytest.raises(CorruptEntry, match=r"run 'r-bad' seq 2"):
        pg.list_events("r-bad")
    assert [e.seq for e in pg.list_events("r-bad", since_seq=2)] == [3]


def test_a_corrupt_snapshot_names_its_run(pg: PostgresCheckpointer[Event, State],
                                          dba: DBA) -> None:
    pg.save_event(ev("r-snap", 1))
    pg.save_snapshot("r-snap", State("r-snap", 1))
    dba.rows("UPDATE runs SET output = '[1, 2]' WHERE id = %s RETURNING 1",
             run_uuid("checkpoint", "r-snap"))
    with pytest.raises(CorruptEntry, match=r"run 'r-snap' \(snapshot after seq 1\)"):
        pg.load_latest("r-snap")


def test_in_memory_corruption_is_reported_too() -> None:
    c: Any = InMemoryCheckpointer(Event, State)
    c.save_event(ev("r", 7))
    c._events["r"][7] = {"nonsense": True}
    with pytest.raises(CorruptEntry, match=r"run 'r' seq 7"):
        c.list_events("r")


def test_bad_seq_is_refused(pg: PostgresCheckpointer[Event, State]) -> None:
    with pytest.raises(ValueError, match="seq"):
        pg.save_event(ev("r", -1))
