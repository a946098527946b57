"""A request's JSON body, read as strictly as OpenAI reads it: by the gateway and by both
engines' fronts, so that a body refused on one route is refused on every route.

Python's `json` accepts more than JSON: `NaN` and `Infinity`, numbers that overflow a
double (`1e999` is infinity), lone surrogates (`"\\ud800"`, which no UTF-8 text can hold)
and any depth of nesting until the interpreter's stack runs out. Each of these reached an
engine or the request log and ended as a 500 there; each is a 400 here.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NoReturn

from llamaserve.errors import InvalidRequest

# Arrays and objects inside one another. OpenAI's own bodies nest a few levels; JSON
# schemas of tools and response formats a few more. serde_json's default bound is 128.
MAX_DEPTH = 128
# Numbers are 64-bit in llama.cpp's JSON: a larger integer is not a value it can take.
_INT_BOUND = 2**63
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes) -> Any:
    """The body's value, or a 400 naming what is wrong with it."""
    try:
        text = raw.decode("utf-8")  # strict: refuses encoded surrogates too
    except UnicodeDecodeError:
        _refuse("it is not UTF-8 text")
    try:
        value = json.loads(
            text, parse_constant=_no_constant, parse_float=_finite, parse_int=_bounded
        )
    except RecursionError:
        _refuse(f"it nests arrays and objects deeper than {MAX_DEPTH} levels")
    except ValueError as exc:
        if isinstance(exc, _Refused):
            raise InvalidRequest(str(exc)) from None
        _refuse(_reason(exc))
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and depth(value) > MAX_DEPTH:
        _refuse(f"it nests arrays and objects deeper than {MAX_DEPTH} levels")
    if _SURROGATE_ESCAPE.search(raw):  # rare: paired escapes are one character, fine
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            _refuse("it holds a lone surrogate (a \\ud800-\\udfff escape without its pair)")
    return value


def parse_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, as every OpenAI POST route takes it."""
    value = parse_json(raw)
    if not isinstance(value, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return value


def depth(value: Any) -> int:
    """How many arrays and objects are nested at the deepest place (without recursion)."""
    if not isinstance(value, (dict, list)):
        return 0
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, at = pending.pop()
        deepest = max(deepest, at)
        children = item.values() if isinstance(item, dict) else item
        pending.extend((child, at + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


class _Refused(ValueError):
    """A value the parser read that JSON or llama.cpp cannot hold."""


def _no_constant(name: str) -> NoReturn:
    raise _Refused(f"The request body is not valid JSON: {name} is not a JSON value.")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise _Refused(f"The request body is not valid JSON: {text} is out of range.")
    return number


def _bounded(text: str) -> int:
    number = int(text)
    if not -_INT_BOUND <= number < _INT_BOUND:
        raise _Refused(f"The request body is not valid JSON: {text[:32]} is out of range.")
    return number


def _reason(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} (line {exc.lineno} column {exc.colno})"
    return str(exc)  # such as an integer of more digits than Python converts


def _refuse(reason: str) -> NoReturn:
    raise InvalidRequest(f"The request body is not valid JSON: {reason}.")
