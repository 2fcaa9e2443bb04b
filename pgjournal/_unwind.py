"""The two ways a workflow is unwound without failing: suspended, or abandoned.

Both are ``BaseException`` so that a workflow's ``except Exception`` cannot
swallow them. They live apart from ``run`` so that modules ``run`` uses (such
as ``tracing``) can recognise them without importing ``run``.
"""

from __future__ import annotations

from datetime import datetime

__all__ = ["Abandoned", "Suspended"]


class Suspended(BaseException):
    """Unwinds a workflow whose run was suspended (signal wait, durable sleep).

    A ``BaseException`` so that a workflow's ``except Exception`` cannot swallow it.
    """

    def __init__(self, until: datetime | None) -> None:
        super().__init__(until)
        self.until = until


class Abandoned(BaseException):
    """Unwinds a workflow whose worker lost the run (lease moved on, cancelled, DB gone)."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status
