"""Property tests: whatever JSON-able value a step returns comes back equal,
and the value the workflow sees the first time is the value a replay sees."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

import pgjournal

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text() | st.just("$pgjournal"), inner, max_size=5),
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


@given(st.builds(Reply, text=st.text(), score=st.floats(allow_nan=False, allow_infinity=False),
                 tags=st.lists(st.text(), max_size=3)))
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
