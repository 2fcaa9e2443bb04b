"""Journaled exceptions replay as themselves: same class, args and attributes.

The error payload goes through ``json.dumps`` and back here exactly as it
goes through the ``jsonb`` ``error`` column (which keeps no key order, so the
exact values ride in the ``exact`` text field). Replays through a real
worker and database are in ``test_fidelity.py``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

import pgjournal
from pgjournal._exceptions import MAX_MESSAGE_CHARS, describe_exception, rebuild_exception


class RateLimited(Exception):
    """Keyword-only constructor: ``cls(*args)`` cannot rebuild it."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ToolFailed(Exception):
    """Attributes set after construction; a computed message."""

    def __init__(self, tool: str) -> None:
        super().__init__(f"tool {tool} failed")
        self.tool = tool


class Usage(BaseModel):
    tokens: int


def through_jsonb(error: dict[str, Any]) -> dict[str, Any]:
    """What reading the error back from the database gives (jsonb: a plain JSON doc)."""
    text = json.dumps(error)
    text.encode()  # no lone surrogate left
    assert "\\u0000" not in text, "jsonb refuses NUL"
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def replayed(exc: BaseException) -> BaseException:
    return rebuild_exception(through_jsonb(describe_exception(exc)))


def test_keyword_only_exception_replays_with_its_attributes() -> None:
    again = replayed(RateLimited("slow down", retry_after=7))
    assert type(again) is RateLimited
    assert again.args == ("slow down",) and str(again) == "slow down"
    assert again.retry_after == 7 and type(again.retry_after) is int


def test_attributes_keep_key_order_floats_and_models() -> None:
    exc = ToolFailed("search")
    exc.detail = {"z": 1e20, "a": [-0.0, 2**70]}  # type: ignore[attr-defined]
    exc.usage = Usage(tokens=12)  # type: ignore[attr-defined]
    exc.add_note("while planning")
    again = replayed(exc)
    assert type(again) is ToolFailed and str(again) == "tool search failed"
    assert again.tool == "search"
    detail = again.detail  # type: ignore[attr-defined]
    assert list(detail) == ["z", "a"] and type(detail["z"]) is float
    assert str(detail["a"][0]) == "-0.0" and detail["a"][1] == 2**70
    assert again.usage == Usage(tokens=12)  # type: ignore[attr-defined]
    assert again.__notes__ == ["while planning"]


@pytest.mark.parametrize("exc", [
    KeyError("missing"), ValueError("bad", 3), FileNotFoundError(2, "No such file"),
    TimeoutError("slow"), pgjournal.TerminalError("stop"),
])
def test_builtin_exceptions_replay_as_themselves(exc: Exception) -> None:
    again = replayed(exc)
    assert type(again) is type(exc) and again.args == exc.args and repr(again) == repr(exc)
    if isinstance(exc, FileNotFoundError):
        assert isinstance(again, OSError) and again.errno == 2


def test_unfindable_class_falls_back_to_step_error_with_attributes() -> None:
    class Local(Exception):  # qualname has <locals>: not importable
        pass

    exc = Local("gone")
    exc.code = 42  # type: ignore[attr-defined]
    again = replayed(exc)
    assert isinstance(again, pgjournal.StepError)
    assert again.type_name.endswith("Local") and again.message == "gone"
    assert again.module == __name__ and again.attributes == {"code": 42}


def test_args_that_are_not_json_fall_back_to_step_error() -> None:
    again = replayed(ValueError(object()))
    assert isinstance(again, pgjournal.StepError) and again.type_name == "ValueError"


def test_attributes_that_are_not_json_are_dropped_and_listed() -> None:
    exc = RateLimited("x", retry_after=1)
    exc.response = object()  # type: ignore[attr-defined]
    error = through_jsonb(describe_exception(exc))
    assert error["dropped"] == ["response"]
    again = rebuild_exception(error)
    assert type(again) is RateLimited and again.retry_after == 1
    assert not hasattr(again, "response")


def test_nul_and_surrogates_are_journaled_lossy_never_crash() -> None:
    exc = ValueError("scraped\x00text \ud800")
    exc.page = "a\x00b"  # type: ignore[attr-defined]
    error = through_jsonb(describe_exception(exc))
    assert error["message"] == "scraped\ufffdtext \ufffd" and "lossy" in error
    again = rebuild_exception(error)
    assert type(again) is ValueError and again.args == ("scraped\ufffdtext \ufffd",)
    assert again.page == "a\ufffdb"  # type: ignore[attr-defined]


def test_error_payload_is_capped() -> None:
    exc = RuntimeError("x" * 100_000)
    exc.blob = "y" * 200_000  # type: ignore[attr-defined]
    error = through_jsonb(describe_exception(exc))
    assert len(error["message"]) <= MAX_MESSAGE_CHARS
    assert len(json.dumps(error)) < 100_000  # args too big for "exact": fallback
    assert isinstance(rebuild_exception(error), pgjournal.StepError)


def test_broken_str_is_still_journaled() -> None:
    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    error = through_jsonb(describe_exception(Broken()))
    assert "str() failed" in error["message"]


def test_rows_journaled_before_exact_existed_still_replay() -> None:
    old = {"type": "KeyError", "module": "builtins", "message": "'k'", "args": ["k"],
           "traceback": ""}
    again = rebuild_exception(old)
    assert type(again) is KeyError and again.args == ("k",)
