"""The exceptions pgjournal raises.

Every error a user can cause (bad DSN, missing schema, unknown run, a value
that cannot be stored) is one of these, with a message that says what to do,
instead of a traceback from deep inside psycopg.
"""

from __future__ import annotations


class PgJournalError(Exception):
    """Base class of every pgjournal error."""


class ConfigurationError(PgJournalError, ValueError):
    """Bad settings: an invalid schema or queue name, a bad size limit."""


class DatabaseUnavailable(PgJournalError):
    """The database cannot be reached or refuses the connection."""


class TransactionConflict(PgJournalError):
    """A statement lost a deadlock (40P01) or a serialization conflict (40001)
    with another transaction, and kept losing it after the store's bounded
    retries. Nothing it meant to write was written (the transaction rolled
    back) and the database is up: trying again later is safe. Not an outage,
    so it is not a ``DatabaseUnavailable``."""


class SchemaNotReady(PgJournalError):
    """The schema is missing or at another version than this code."""


class PermissionDenied(PgJournalError, PermissionError):
    """The database role may not do this: e.g. a dashboard, scrape or listing on the
    worker role of ``sql/roles.sql``, which reads no view (the reader role does)."""


class SerializationError(PgJournalError, TypeError):
    """A value cannot be stored in the journal (wrong type or too large)."""


class UnknownRun(PgJournalError, LookupError):
    """No run with that id exists."""


class UnknownWorkflow(PgJournalError, LookupError):
    """No workflow of that name is registered with the app."""


class UnknownSchedule(PgJournalError, LookupError):
    """No schedule of that name exists in the schema."""


class InvalidState(PgJournalError):
    """The run is not in a state that allows the operation (e.g. signal an ended run)."""


class TerminalError(PgJournalError):
    """Raise (or subclass) this in a workflow or step to fail the run at once, with no retry."""


class NonDeterminismError(TerminalError):
    """A replayed run asked for a different step than its journal holds at that position."""


class JournalTooLarge(TerminalError):
    """A run's journal grew past its budget (``App(max_journal_bytes=...)``)."""


class StepError(PgJournalError):
    """A journaled step failure replayed when the original exception cannot be rebuilt.

    That happens when its class is not importable from an already-imported
    module, is not an ``Exception``, or its ``args`` were not JSON values.
    ``type_name``, ``module`` and ``message`` name the original;
    ``attributes`` holds those of its attributes that were JSON values.
    """

    def __init__(self, type_name: str, message: str, *, module: str = "",
                 attributes: dict[str, object] | None = None) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.module = module
        self.attributes = dict(attributes or {})


class RunFailed(PgJournalError):
    """The run ended as failed (or dead); raised by ``RunHandle.result()``."""

    def __init__(self, run_id: str, error: dict[str, object] | None, status: str = "failed"):
        err = error or {}
        super().__init__(
            f"run {run_id} {status}: {err.get('type', 'Error')}: {err.get('message', '')}"
        )
        self.run_id = run_id
        self.status = status
        self.error = err


class ChildFailed(RunFailed):
    """A child run (``run.spawn``) ended failed, dead or cancelled; raised in its parent
    by ``child.result()``, ``run.wait_all`` and ``run.wait_first``. Catchable: the
    parent decides. ``run_id``, ``status``, ``error`` (the child's error as
    journaled: type, message ...) and ``workflow`` describe the child."""

    def __init__(self, run_id: str, error: dict[str, object] | None, status: str = "failed",
                 *, workflow: str = "") -> None:
        super().__init__(run_id, error, status)
        self.workflow = workflow
        err = error or {}
        what = f"child run {run_id}" + (f" ({workflow})" if workflow else "")
        self.args = (f"{what} {status}: {err.get('type', 'Error')}: {err.get('message', '')}",)


class Cancelled(PgJournalError):
    """The run was cancelled; raised by ``RunHandle.result()``."""
