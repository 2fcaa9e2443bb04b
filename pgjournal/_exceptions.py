"""How a step's exception is journaled and how a replay raises it again.

A workflow that caught ``RateLimited`` when the step failed for real must
catch ``RateLimited`` again when the failure is replayed, with the same
``args`` and attributes (``retry_after``), or the replay takes another path
than the first execution did. So the journaled error holds, next to the
readable fields a DBA groups by (``type``, ``module``, ``message``,
``traceback``), an ``exact`` field: the JSON *text* of the exception's
``args`` and ``__dict__`` attributes, kept as a string because the ``error``
column is ``jsonb`` (which would reorder keys and turn ``1e20`` into an int).

Rebuilding never calls the class's ``__init__`` when it is written in Python:
a keyword-only or computing constructor cannot be called with the stored
``args``. It uses ``cls.__new__(cls, *args)``, sets ``args`` and restores the
attributes. Built-in exception types (``KeyError``, ``OSError`` ...) keep
state in C fields that only their own ``__init__`` fills, so theirs is called.

The class is found only among modules already imported (a database row never
makes us import code). When it cannot be found, is not an ``Exception``, or
its ``args`` are not JSON values, the replay raises ``StepError`` carrying
the original type name, module, message and the attributes that could be
kept: a documented fallback, never a crash. Attributes that are not JSON
values are dropped (listed in the payload's ``dropped`` field).

Error payloads are capped (message, traceback, the exact text) and every
string in them is sanitized (NUL and lone surrogates replaced), so that a
failure is always journaled, lossy where it must be.
"""

from __future__ import annotations

import json
import re
import sys
import traceback
from types import FunctionType
from typing import Any

from .errors import SerializationError, StepError
from .serializer import Serializer

MAX_MESSAGE_CHARS = 2000
MAX_TRACEBACK_CHARS = 8000
#: The cap on the ``exact`` text (args and attributes) of one error.
MAX_EXACT_BYTES = 64 * 1024

#: Exact values of errors use JSON and pydantic models only, never pickle,
#: whatever the app allows: an error payload is read by every replay.
_SER = Serializer(max_bytes=MAX_EXACT_BYTES)
_UNSAFE = re.compile("[\x00\ud800-\udfff]")


def sanitize(text: str, limit: int) -> str:
    """``text`` as something ``jsonb`` accepts: NUL and lone surrogates become U+FFFD,
    and at most ``limit`` characters (the end is kept for tracebacks, see ``tail``)."""
    text = _UNSAFE.sub("\ufffd", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _scrub(value: Any) -> Any:
    """``value`` with NUL and lone surrogates replaced in every string (and key)."""
    if isinstance(value, str):
        return _UNSAFE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def _exact_text(value: Any) -> tuple[str, bool]:
    """JSON text of ``value`` and whether it had to be scrubbed (lossy) to be storable."""
    try:
        return _SER.dumps(value, what="exception value"), False
    except SerializationError:
        scrubbed = _scrub(value)
        if scrubbed == value:
            raise
        return _SER.dumps(scrubbed, what="exception value"), True


def _tail(text: str, limit: int) -> str:
    text = _UNSAFE.sub("\ufffd", text)
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not stop the failure being journaled
        return f"<{type(exc).__qualname__}: str() failed>"


def _safe_traceback(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(exc))
    except Exception:
        return ""


def describe_exception(exc: BaseException) -> dict[str, Any]:
    """The journaled form of an exception.

    Readable fields: ``type``, ``module``, ``message``, ``traceback`` (capped,
    sanitized). ``exact``: JSON text of ``{"args": [...], "attrs": {...}}``
    when the args are storable JSON values, else absent; ``dropped``: the
    attributes left out (not JSON values, or over the cap).
    """
    cls = type(exc)
    error: dict[str, Any] = {
        "type": sanitize(cls.__qualname__, 200),
        "module": sanitize(cls.__module__, 200),
        "message": sanitize(_safe_str(exc), MAX_MESSAGE_CHARS),
        "traceback": _tail(_safe_traceback(exc), MAX_TRACEBACK_CHARS),
    }
    try:
        args_text, lossy = _exact_text(list(exc.args))
    except Exception:
        error["lossy"] = "args are not storable JSON values: replays as StepError"
        return error
    attrs: list[str] = []
    dropped: list[str] = []
    budget = MAX_EXACT_BYTES - len(args_text.encode()) - 32
    for name, value in vars(exc).items() if hasattr(exc, "__dict__") else ():
        if not isinstance(name, str) or _UNSAFE.search(name):
            dropped.append(str(name))
            continue
        try:
            value_text, scrubbed = _exact_text(value)
        except Exception:
            dropped.append(name)
            continue
        item = f"{json.dumps(name, ensure_ascii=False)}:{value_text}"
        size = len(item.encode()) + 1
        if size > budget:
            dropped.append(name)
            continue
        lossy = lossy or scrubbed
        budget -= size
        attrs.append(item)
    if lossy:
        error["lossy"] = "NUL or lone surrogates in args or attributes replaced by U+FFFD"
    error["exact"] = f'{{"args":{args_text},"attrs":{{{",".join(attrs)}}}}}'
    if dropped:
        error["dropped"] = [sanitize(n, 200) for n in dropped]
    return error


def _find_class(module_name: str, qualname: str) -> type[Exception] | None:
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None) if obj is not None else None
    return obj if isinstance(obj, type) and issubclass(obj, Exception) else None


def _python_init(cls: type) -> bool:
    """Whether ``cls`` (or a base below ``BaseException``) defines ``__init__`` in Python."""
    init: Any = None
    for base in cls.__mro__:
        init = base.__dict__.get("__init__")
        if init is not None:
            break
    return isinstance(init, FunctionType)  # C slots are wrapper descriptors


def _build(cls: type[Exception], args: list[Any], attrs: dict[str, Any]) -> Exception:
    exc = cls.__new__(cls, *args)
    if not _python_init(cls):
        # Built-in __init__ fills C-level fields (OSError.errno, KeyError's repr ...).
        builtin_init: Any = cls.__init__
        builtin_init(exc, *args)
    exc.args = tuple(args)
    exc.__dict__.update(attrs)  # restore, not set: a read-only property must not stop us
    return exc


def rebuild_exception(error: dict[str, Any]) -> BaseException:
    """The exception a replay raises for a journaled failure (see the module doc)."""
    type_name = str(error.get("type", "Exception"))
    module = str(error.get("module", ""))
    message = str(error.get("message", ""))
    args: list[Any] | None = None
    attrs: dict[str, Any] = {}
    exact = error.get("exact")
    if isinstance(exact, str):
        try:
            data = _SER.loads(json.loads(exact))
            args, attrs = list(data["args"]), dict(data["attrs"])
        except Exception:
            args, attrs = None, {}
    elif isinstance(error.get("args"), list):  # rows journaled before "exact" existed
        args = list(error["args"])
    cls = _find_class(module, type_name)
    if cls is not None and args is not None:
        try:
            return _build(cls, args, attrs)
        except Exception:
            pass
    return StepError(type_name, message, module=module, attributes=attrs)
