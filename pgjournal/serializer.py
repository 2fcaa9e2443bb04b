"""How values become JSON text in the journal and come back.

One module owns it so that a step returns the same value the first time and
on every replay: a step's result is always passed through ``dumps``/``loads``
before the workflow sees it, and the value columns are Postgres ``json``
(text kept verbatim), so dict key order and float text (``1e+20`` stays a
float, ``-0.0`` stays negative zero) survive the database.

- JSON types are stored as they are, so a DBA can query them with ``->>``.
  The text is written with ``ensure_ascii=False``: readable in psql.
- Values Postgres cannot hold are refused here, before any SQL, with the path
  inside the value (``$.items[3].text``): a NUL character (``\\u0000``, which
  ``jsonb`` and text extraction reject) and lone surrogates (not valid UTF-8).
  Refusing early turns a database error that would be retried (and fail every
  other run sharing the statement) into one clear, terminal error.
- A pydantic model is stored as ``{"$pgjournal": "pydantic", "type": "mod:Name",
  "data": {...}}`` and comes back as that model. Its module must already be
  imported by the reading process: a database row never makes us import code.
- A user's own dict that happens to have a ``"$pgjournal"`` key is wrapped as
  ``{"$pgjournal": "dict", "data": {...}}``, so stored data can never pose as
  one of our envelopes.
- Anything else is refused with a clear error, unless pickle was switched on
  explicitly (``App(..., allow_pickle=True)``): unpickling what a database
  row holds runs code, so it is never the default.
"""

from __future__ import annotations

import base64
import json
import math
import pickle
import re
import sys
from typing import Any

from pydantic import BaseModel

from .errors import ConfigurationError, SerializationError

TAG = "$pgjournal"
DEFAULT_MAX_BYTES = 4 * 1024 * 1024

#: A lone UTF-16 surrogate: Python strings may hold one, UTF-8 (and Postgres) cannot.
_SURROGATE = re.compile("[\ud800-\udfff]")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _key_path(path: str, key: object) -> str:
    if isinstance(key, str) and _IDENTIFIER.fullmatch(key):
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key if isinstance(key, str) else str(key))}]"


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which PostgreSQL cannot store"
    m = _SURROGATE.search(text)
    if m is not None:
        return (f"contains a lone surrogate (\\u{ord(m.group()):04x}), which is not "
                "valid UTF-8 (a badly decoded string?)")
    return None


#: How a user opts in, named the same in every message and in the README.
PICKLE_OPT_IN = "App(..., allow_pickle=True)"


def find_problem(value: Any, path: str = "$", *, allow_pickle: bool = False,
                 _depth: int = 0) -> tuple[str, str] | None:
    """The first place in ``value`` that cannot be stored, as (path, why), or None.

    Only called once encoding failed or looked suspicious, so its cost is off
    the hot path; it exists to tell the author *where* the bad data sits.
    """
    if _depth > 200:
        return path, "is nested too deeply"
    if isinstance(value, str):
        problem = _text_problem(value)
        return (path, problem) if problem else None
    if value is None or isinstance(value, bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, f"is {value!r}, which JSON cannot hold")
    if isinstance(value, dict):
        for key, item in value.items():
            here = _key_path(path, key)
            if isinstance(key, str):
                problem = _text_problem(key)
                if problem:
                    return here, f"has a key that {problem}"
            elif not (key is None or isinstance(key, bool | int | float)):
                return here, f"has a key of type {type(key).__qualname__}, which JSON cannot hold"
            found = find_problem(item, here, allow_pickle=allow_pickle, _depth=_depth + 1)
            if found:
                return found
        return None
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = find_problem(item, f"{path}[{i}]", allow_pickle=allow_pickle,
                                 _depth=_depth + 1)
            if found:
                return found
        return None
    if isinstance(value, BaseModel):
        try:
            dumped = value.model_dump(mode="json")
        except Exception as exc:  # pydantic's own error says which field
            return path, f"is a {type(value).__qualname__} that cannot be dumped: {exc}"
        return find_problem(dumped, path, allow_pickle=allow_pickle, _depth=_depth + 1)
    if allow_pickle:
        return None
    return path, f"is of type {type(value).__qualname__}, which is not JSON serializable"


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _model_class(path: str) -> type[BaseModel]:
    module_name, _, qualname = path.partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None) if obj is not None else None
    if not (isinstance(obj, type) and issubclass(obj, BaseModel)):
        raise SerializationError(
            f"cannot load a stored {path} model: import {module_name!r} first "
            "(pgjournal never imports modules named by database rows)"
        )
    return obj


def _escape(value: Any) -> Any:
    """Wrap user dicts that carry our tag key, at any depth."""
    if isinstance(value, dict):
        inner = {k: _escape(v) for k, v in value.items()}
        return {TAG: "dict", "data": inner} if TAG in value else inner
    if isinstance(value, list | tuple):
        return [_escape(v) for v in value]
    return value


class Serializer:
    """Turns values into JSON text for the journal's ``json`` columns and back.

    ``max_bytes`` caps one value: a huge row would later stall every replay of
    its run, so it is refused when written instead.
    """

    def __init__(self, *, allow_pickle: bool = False, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes <= 0:
            raise ConfigurationError("max_bytes must be positive")
        self.allow_pickle = allow_pickle
        self.max_bytes = max_bytes

    def _default(self, value: Any) -> Any:
        if isinstance(value, BaseModel):
            return {
                TAG: "pydantic",
                "type": _class_path(type(value)),
                "data": _escape(value.model_dump(mode="json")),
            }
        if self.allow_pickle:
            return {TAG: "pickle", "data": base64.b64encode(pickle.dumps(value)).decode()}
        raise TypeError(f"type {type(value).__qualname__} is not JSON serializable")

    def _encode(self, value: Any) -> str:
        return json.dumps(value, default=self._default, allow_nan=False, ensure_ascii=False,
                          separators=(",", ":"))

    def _refuse(self, value: Any, what: str, fallback: str) -> SerializationError:
        found = find_problem(value, allow_pickle=self.allow_pickle)
        where = f"{found[0]} {found[1]}" if found else fallback
        hint = ""
        if found and "JSON serializable" in found[1] and not self.allow_pickle:
            # What the code returns (a step's result, a workflow's output) or passes.
            verb = "return" if what.startswith(("result", "output")) else "pass"
            hint = (f"; {verb} JSON data or a pydantic model, or opt in to pickle "
                    f"with {PICKLE_OPT_IN}")
        elif found and ("NUL" in found[1] or "surrogate" in found[1]):
            hint = "; clean the text before returning it (e.g. text.replace('\\x00', ''))"
        return SerializationError(f"cannot store the {what}: {where}{hint}")

    def dumps(self, value: Any, *, what: str = "value") -> str:
        """Encode ``value`` as JSON text; ``what`` names it in errors ("result of step 'x'").

        Raises ``SerializationError`` naming ``what`` and the path inside the
        value for anything that cannot be stored exactly.
        """
        try:
            text = self._encode(value)
            # A one-character memchr scan first: most texts hold no "$" at all.
            if "$" in text and f'"{TAG}"' in text:
                # Rare: the data itself may carry our tag key; encode it escaped.
                text = self._encode(_escape(value))
        except (TypeError, ValueError, RecursionError, AttributeError,
                pickle.PicklingError) as exc:
            raise self._refuse(value, what, str(exc)) from exc
        if "\\" in text and "\\u0000" in text:
            # json.dumps escapes NUL as \u0000 (the check may also hit an escaped
            # backslash followed by "u0000", which is fine: then nothing is found).
            found = find_problem(value, allow_pickle=self.allow_pickle)
            if found is not None:
                raise self._refuse(value, what, "")
        try:
            size = len(text.encode())
        except UnicodeEncodeError as exc:
            raise self._refuse(value, what, "contains a lone surrogate") from exc
        if size > self.max_bytes:
            raise SerializationError(
                f"the {what} is {size} bytes, over the limit of {self.max_bytes} bytes; "
                "store large data elsewhere and journal a reference, or raise max_bytes"
            )
        return text

    def loads(self, value: Any) -> Any:
        """Decode a value read from a ``json`` column (already parsed by psycopg, whose
        ``json.loads`` keeps key order and floats)."""
        if isinstance(value, dict):
            tag = value.get(TAG)
            if tag == "pydantic":
                cls = _model_class(value["type"])
                return cls.model_validate(self.loads(value["data"]))
            if tag == "dict":
                return {k: self.loads(v) for k, v in value["data"].items()}
            if tag == "pickle":
                if not self.allow_pickle:
                    raise SerializationError(
                        f"this value was stored with pickle; read it with {PICKLE_OPT_IN} "
                        "if you trust the database"
                    )
                return pickle.loads(base64.b64decode(value["data"]))
            return {k: self.loads(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.loads(v) for v in value]
        return value

    def roundtrip(self, value: Any, *, what: str = "value") -> tuple[str, Any]:
        """Encode ``value`` and return the text and the value as a replay would see it."""
        text = self.dumps(value, what=what)
        return text, self.loads(json.loads(text))
