"""pgjournal: durable, journaled execution of long-running Python work on PostgreSQL.

Everything a user needs is importable from here.
"""

from .app import App, RunHandle, Workflow, exponential_backoff
from .children import ChildRun
from .connect import mask_dsn
from .embedded import EmbeddedServer, dev_server, throwaway_server
from .errors import (
    Cancelled,
    ChildFailed,
    ConfigurationError,
    DatabaseUnavailable,
    InvalidState,
    NonDeterminismError,
    PermissionDenied,
    PgJournalError,
    RunFailed,
    SchemaNotReady,
    SerializationError,
    StepError,
    TerminalError,
    TransactionConflict,
    UnknownRun,
    UnknownSchedule,
    UnknownWorkflow,
)
from .migrations import migrate, migration_script
from .run import Run
from .serializer import Serializer
from .store import Store
from .worker import Worker

__version__ = "0.1.0"

__all__ = [
    "App",
    "Cancelled",
    "ChildFailed",
    "ChildRun",
    "ConfigurationError",
    "DatabaseUnavailable",
    "EmbeddedServer",
    "InvalidState",
    "NonDeterminismError",
    "PermissionDenied",
    "PgJournalError",
    "Run",
    "RunFailed",
    "RunHandle",
    "SchemaNotReady",
    "SerializationError",
    "Serializer",
    "StepError",
    "Store",
    "TerminalError",
    "TransactionConflict",
    "UnknownRun",
    "UnknownSchedule",
    "UnknownWorkflow",
    "Worker",
    "Workflow",
    "__version__",
    "dev_server",
    "exponential_backoff",
    "mask_dsn",
    "migrate",
    "migration_script",
    "throwaway_server",
]
