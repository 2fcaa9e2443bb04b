"""Property tests: whatever JSON-able value a step returns comes back equal,
and the value the workflow sees the first time is the value a replay sees."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

import pgjournal

#: Text Postgres can hold (no NUL, no lone surrogate: those are refused, see below).
clean_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False) | clean_text,
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(clean_text | st.just("$pgjournal"), inner, max_size=5),
    max_leaves=30,
)


class Reply(BaseModel):
    text: str
    score: float
    tags: list[str]


@given(json_values)
def test_json_values_round_trip(value: object) -> None:
    ser = pgjournal.Serializer()
    text, seen_first = ser.roundtrip(value)
    seen_on_replay = ser.loads(json.loads(text))
    assert seen_first == value == seen_on_replay


@given(st.builds(Reply, text=clean_text,
                 score=st.floats(allow_nan=False, allow_infinity=False),
                 tags=st.lists(clean_text, max_size=3)))
def test_pydantic_models_round_trip_by_type(reply: Reply) -> None:
    ser = pgjournal.Serializer()
    text, seen = ser.roundtrip({"reply": reply})
    assert seen == {"reply": reply} and isinstance(seen["reply"], Reply)
    assert json.loads(text)["reply"]["data"]["text"] == reply.text  # queryable as jsonb


def test_user_data_cannot_pose_as_an_envelope() -> None:
    ser = pgjournal.Serializer()
    hostile = {"$pgjournal": "pydantic", "type": "os:system", "data": {"x": 1}}
    _text, seen = ser.roundtrip({"llm_output": hostile})
    assert seen == {"llm_output": hostile}
    # A row forged directly in the database is refused, not imported.
    forged = {"$pgjournal": "pydantic", "type": "some_unimported_module:Thing", "data": {}}
    import pytest

    with pytest.raises(pgjournal.SerializationError, match="import 'some_unimported_module'"):
        ser.loads(forged)


# -- exactness: what the first execution sees is what a replay sees ----------------------

def same(a: object, b: object) -> bool:
    """Equal, same types, same dict key order, same float bits (``-0.0`` is not ``0.0``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        assert isinstance(b, dict)
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        assert isinstance(b, list)
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        assert isinstance(b, float)
        return a.hex() == b.hex()
    if isinstance(a, BaseModel):
        assert isinstance(b, BaseModel)
        return same(a.model_dump(), b.model_dump())
    return a == b


exact_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**200), 2**200)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([1e20, 1e308, -0.0, 5e-324, 1.0, 2**53 + 1]) | clean_text,
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(clean_text | st.just("$pgjournal"), inner, max_size=5),
    max_leaves=30,
)


@given(exact_values)
def test_values_round_trip_exactly_through_json_text(value: object) -> None:
    ser = pgjournal.Serializer()
    text, seen_first = ser.roundtrip(value)
    assert same(seen_first, value)
    assert same(ser.loads(json.loads(text)), value)  # what a ``json`` column gives back


def test_key_order_and_float_text_are_kept() -> None:
    ser = pgjournal.Serializer()
    value = {"z": 1e20, "a": -0.0, "m": 2**70, "é": "naïve ☃"}
    text, seen = ser.roundtrip(value)
    assert text == '{"z":1e+20,"a":-0.0,"m":1180591620717411303424,"é":"naïve ☃"}'
    assert same(seen, value)


@pytest.mark.parametrize(("value", "path", "why"), [
    ({"items": [{}, {}, {}, {"text": "scraped\x00page"}]}, "$.items[3].text", "NUL"),
    ({"ok": "x", "bad key\x00": 1}, '$["bad key\\u0000"]', "NUL"),
    (["fine", "half \ud83d of an emoji"], "$[1]", "lone surrogate"),
    ({"reply": Reply(text="a\x00b", score=1.0, tags=[])}, "$.reply.text", "NUL"),
    ({"x": [1.0, float("nan")]}, "$.x[1]", "nan"),
    ({"when": object()}, "$.when", "type object"),
])
def test_poison_values_are_refused_with_their_path(value: object, path: str, why: str) -> None:
    ser = pgjournal.Serializer()
    with pytest.raises(pgjournal.SerializationError) as info:
        ser.dumps(value, what="result of step 'scrape' of run R1")
    msg = str(info.value)
    assert "result of step 'scrape' of run R1" in msg
    assert f": {path} " in msg and why in msg


def test_literal_backslash_u0000_is_not_a_nul() -> None:
    ser = pgjournal.Serializer()
    _text, seen = ser.roundtrip({"code": "print('\\u0000')"})
    assert seen == {"code": "print('\\u0000')"}
