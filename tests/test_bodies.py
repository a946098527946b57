"""A request's JSON body is read as OpenAI reads it: what Python's json takes beyond JSON
(NaN, Infinity, lone surrogates, any nesting) is a 400 naming why, never a 500."""

from __future__ import annotations

import json

import pytest

from llamaserve.bodies import MAX_DEPTH, depth, parse_json, parse_object
from llamaserve.errors import InvalidRequest


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"min_p": NaN}', "NaN is not a JSON value"),
        (b'{"repeat_penalty": Infinity}', "Infinity is not a JSON value"),
        (b'{"top_p": -Infinity}', "-Infinity is not a JSON value"),
        (b'{"temperature": 1e999}', "1e999 is out of range"),
        (b'{"seed": 99999999999999999999}', "out of range"),
        (b'{"content": "\\ud800"}', "lone surrogate"),
        (b'{"content": "a\\udfffb"}', "lone surrogate"),
        (b'{"content": "\xed\xa0\x80"}', "not UTF-8"),  # a surrogate encoded as UTF-8
        (b'{"content": "\xff"}', "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, f"deeper than {MAX_DEPTH}"),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, f"deeper than {MAX_DEPTH}"),
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), f"deeper than {MAX_DEPTH}"),
        (b'{"model": "m",', "Expecting property name"),
        (b'{"n": 1' + b"1" * 5000 + b"}", "digits"),
    ],
)
def test_what_json_does_not_hold_is_a_400_naming_why(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_json(raw)
    assert refused.value.status == 400
    assert refused.value.message.startswith("The request body is not valid JSON: ")
    assert reason in refused.value.message


def test_json_within_the_bounds_is_read_as_it_is() -> None:
    nested = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert depth(parse_json(nested.encode())) == MAX_DEPTH
    pair = '{"content": "\\ud83e\\udd99 llama", "p": 0.5, "n": -3, "big": 9223372036854775807}'
    assert parse_json(pair.encode()) == json.loads(pair)
    assert parse_json('{"content": "é ☃"}'.encode()) == {"content": "é ☃"}
    # Many brackets but shallow: the depth is counted only when the brackets could reach it.
    many = {"messages": [{"role": "user", "content": [{"type": "text"}]} for _ in range(300)]}
    assert parse_json(json.dumps(many).encode()) == many


def test_a_post_body_is_an_object() -> None:
    with pytest.raises(InvalidRequest, match="must be a JSON object"):
        parse_object(b"[1, 2]")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 0), ([], 1), ({"a": [1, {"b": []}]}, 4), ([[[]], []], 3)],
)
def test_depth_counts_the_deepest_place(value: object, expected: int) -> None:
    assert depth(value) == expected
