"""How values become ``jsonb`` and come back.

One module owns it so that a step returns the same value the first time and
on every replay: a step's result is always passed through ``dumps``/``loads``
before the workflow sees it.

- JSON types are stored as they are, so a DBA can query them with ``->>``.
- A pydantic model is stored as ``{"$pgjournal": "pydantic", "type": "mod:Name",
  "data": {...}}`` and comes back as that model. Its module must already be
  imported by the reading process: a database row never makes us import code.
- A user's own dict that happens to have a ``"$pgjournal"`` key is wrapped as
  ``{"$pgjournal": "dict", "data": {...}}``, so stored data can never pose as
  one of our envelopes.
- Anything else is refused with a clear error, unless pickle was switched on
  explicitly (``Serializer(allow_pickle=True)``): unpickling what a database
  row holds runs code, so it is never the default.
"""

from __future__ import annotations

import base64
import json
import pickle
import sys
from typing import Any

from pydantic import BaseModel

from .errors import ConfigurationError, SerializationError

TAG = "$pgjournal"
DEFAULT_MAX_BYTES = 4 * 1024 * 1024


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
    """Turns values into JSON text for ``jsonb`` columns and back.

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

    def dumps(self, value: Any, *, what: str = "value") -> str:
        """Encode ``value`` as JSON text; ``what`` names it in errors ("result of step 'x'")."""
        try:
            text = json.dumps(value, default=self._default, allow_nan=False,
                              separators=(",", ":"))
            if f'"{TAG}"' in text:
                # Rare: the data itself may carry our tag key; encode it escaped.
                text = json.dumps(_escape(value), default=self._default, allow_nan=False,
                                  separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            hint = "" if self.allow_pickle else (
                "; return JSON data or a pydantic model, or opt in to pickle "
                "with Serializer(allow_pickle=True)"
            )
            raise SerializationError(f"cannot store the {what}: {exc}{hint}") from exc
        size = len(text.encode())
        if size > self.max_bytes:
            raise SerializationError(
                f"the {what} is {size} bytes, over the limit of {self.max_bytes} bytes; "
                "store large data elsewhere and journal a reference, or raise max_bytes"
            )
        return text

    def loads(self, value: Any) -> Any:
        """Decode a value read from a ``jsonb`` column (already parsed by psycopg)."""
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
                        "this value was stored with pickle; load it with "
                        "Serializer(allow_pickle=True) if you trust the database"
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
