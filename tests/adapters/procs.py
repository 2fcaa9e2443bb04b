"""Processes for the adapters' cross-process tests.

    python -m tests.adapters.procs session DSN SCHEMA SESSION_ID STEPS BLOCK_AFTER
    python -m tests.adapters.procs append DSN SCHEMA AGENT_ID COUNT

``session`` runs steps s1..sSTEPS of a PostgresRuntime session, each returning a
fresh uuid, and prints ``name value`` per step; after BLOCK_AFTER steps it
hangs (for kill -9). ``append`` initialises a DurableJournal, prints "ready",
waits for a line on stdin, then appends COUNT entries to the agent's journal
and prints the sequences it got.
"""

from __future__ import annotations

import asyncio
import sys
import uuid

from pgjournal.adapters import DurableJournal, PostgresJournalStorage, PostgresRuntime


async def session(dsn: str, schema: str, session_id: str, steps: int, block_after: int) -> None:
    runtime = await PostgresRuntime.connect(dsn, schema=schema)
    async with runtime.session(session_id):
        for i in range(1, steps + 1):
            value = await runtime.step(f"s{i}", lambda: str(uuid.uuid4()))
            print(f"s{i} {value}", flush=True)
            if i == block_after:
                await asyncio.sleep(3600)
    await runtime.aclose()


async def append(dsn: str, schema: str, agent_id: str, count: int) -> None:
    storage = await PostgresJournalStorage.connect(dsn, schema=schema, max_size=2)
    journal = DurableJournal(storage, agent_id)
    await journal.initialize()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    got = []
    for i in range(count):
        entry = await journal.append({"type": "tick", "i": i}, iteration=i)
        got.append(entry.sequence)
    print(" ".join(map(str, got)), flush=True)
    await storage.aclose()


def main() -> None:
    cmd, dsn, schema, ident, *rest = sys.argv[1:]
    if cmd == "session":
        asyncio.run(session(dsn, schema, ident, int(rest[0]), int(rest[1])))
    elif cmd == "append":
        asyncio.run(append(dsn, schema, ident, int(rest[0])))
    else:
        raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main()
