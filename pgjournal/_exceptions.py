"""How an exception raised by a step is journaled, and rebuilt on replay."""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

from .errors import StepError


def describe_exception(exc: BaseException) -> dict[str, Any]:
    """The journaled form of an exception: type, module, message, args, traceback."""
    args: list[Any] | None
    try:
        json.dumps(exc.args)
        args = list(exc.args)
    except (TypeError, ValueError):
        args = None
    return {
        "type": type(exc).__qualname__,
        "module": type(exc).__module__,
        "message": str(exc),
        "args": args,
        "traceback": "".join(traceback.format_exception(exc))[-8000:],
    }


def rebuild_exception(error: dict[str, Any]) -> BaseException:
    """The exception a replay raises for a journaled failure.

    The original class is used when its module is already imported (nothing is
    imported because a row says so); otherwise a ``StepError`` names it.
    """
    type_name = str(error.get("type", "Exception"))
    message = str(error.get("message", ""))
    module = sys.modules.get(str(error.get("module", "")))
    cls: Any = module
    for part in type_name.split("."):
        cls = getattr(cls, part, None) if cls is not None else None
    if isinstance(cls, type) and issubclass(cls, Exception):
        args = error.get("args")
        try:
            return cls(*args) if isinstance(args, list) else cls(message)
        except Exception:
            pass
    return StepError(type_name, message)


