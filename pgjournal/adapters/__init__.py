"""The seed projects' interfaces as drop-in adapters over pgjournal's own tables.

Each interface has an in-memory implementation (for unit tests) and a Postgres
one that stores in ``runs``/``steps``/``stream_chunks``/``signals`` (with
``runs.source`` naming the adapter), so its runs show up in the DBA views next
to native runs. See docs/adapters.md for the one-line switch per interface.
"""

from ._core import CorruptEntry, DuplicateEntry, run_uuid, schema_script
from .checkpointer import Checkpointer, InMemoryCheckpointer, PostgresCheckpointer
from .journal_store import (
    InMemoryJournalStore,
    JournalEntry,
    JournalStore,
    PostgresJournalStore,
)
from .run_store import (
    InMemoryRunStore,
    PostgresRunStore,
    RunRecord,
    RunStatus,
    RunStore,
    StepRecord,
    StepStatus,
)
from .runtime import InProcRuntime, JournaledRuntime, PostgresRuntime, Session
from .seq_journal import (
    DurableJournal,
    InMemoryJournalStorage,
    JournalStorage,
    PostgresJournalStorage,
    SeqEntry,
)

__all__ = [
    "Checkpointer",
    "CorruptEntry",
    "DuplicateEntry",
    "DurableJournal",
    "InMemoryCheckpointer",
    "InMemoryJournalStorage",
    "InMemoryJournalStore",
    "InMemoryRunStore",
    "InProcRuntime",
    "JournalEntry",
    "JournalStorage",
    "JournalStore",
    "JournaledRuntime",
    "PostgresCheckpointer",
    "PostgresJournalStorage",
    "PostgresJournalStore",
    "PostgresRunStore",
    "PostgresRuntime",
    "RunRecord",
    "RunStatus",
    "RunStore",
    "SeqEntry",
    "Session",
    "StepRecord",
    "StepStatus",
    "run_uuid",
    "schema_script",
]
