"""JSON numbers that keep their text, and an encoder that writes them back exactly.

Python reads a JSON number with a fraction or an exponent as a float, which
can change its text (`1E2` becomes `100.0`) or its value (`1e400` becomes
infinity, `0.1000000000000000000001` becomes `0.1`). `loads_exact` reads such
a number as a `JsonNumber`, a float that also keeps the text as written, and
`dumps_exact` writes that text back. Integers of any size are read exactly
by Python, and `dumps_exact` writes them in full, where orjson (3.13) raises
for an integer outside the 64-bit range.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

_INTEGER_MIN, _INTEGER_MAX = -(2**63), 2**64 - 1
"""Range of the integers that orjson writes: int64 and uint64."""
_CONSTANTS = ("NaN", "Infinity", "-Infinity")
"""Number texts that Python's `json` reads but that are not JSON."""


class JsonNumber(float):
    """A number read from JSON text, with `text` as written in the input.

    It compares and computes as the float nearest to the text.
    """

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> JsonNumber:
        number = super().__new__(cls, text)
        number.text = text
        return number


def loads_exact(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse JSON text with each number that is not an integer as a `JsonNumber`.

    `NaN`, `Infinity` and `-Infinity`, which Python's `json` accepts, become
    `JsonNumber`s too. So does `-0`, whose text an `int` would lose.

    Raises:
        ValueError: `data` is not JSON.
    """
    text = bytes(data) if isinstance(data, memoryview | bytearray) else data
    return json.loads(
        text, parse_float=JsonNumber, parse_int=_integer, parse_constant=JsonNumber
    )


def _integer(text: str) -> int | JsonNumber:
    return JsonNumber(text) if text == "-0" else int(text)


def dumps_exact(value: Any, *, option: int = 0) -> bytes:
    """Encode `value` as JSON with orjson, writing every number as it was read.

    A `JsonNumber` is written as its text, except `NaN`, `Infinity` and
    `-Infinity`, which are not JSON and are written as strings of that text.
    Integers outside the 64-bit range are written in full. Other values
    that orjson cannot encode are written as their `str()`.

    Raises:
        orjson.JSONEncodeError: `value` cannot be encoded for another reason,
            such as text with an unpaired surrogate.
    """
    try:
        return orjson.dumps(value, default=_encode_other, option=option)
    except orjson.JSONEncodeError:
        # The error does not tell which value failed, so look for big
        # integers only now, on this rare path.
        return orjson.dumps(
            _with_big_integers_as_text(value), default=_encode_other, option=option
        )


def _encode_other(value: Any) -> Any:
    if isinstance(value, JsonNumber):
        if value.text in _CONSTANTS:
            return value.text
        return orjson.Fragment(value.text)
    return str(value)


def _with_big_integers_as_text(value: Any) -> Any:
    """Return `value` with integers beyond 64 bits as JSON fragments of their digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        if _INTEGER_MIN <= value <= _INTEGER_MAX:
            return value
        return orjson.Fragment(str(value))
    if isinstance(value, dict):
        return {key: _with_big_integers_as_text(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_with_big_integers_as_text(item) for item in value]
    return value
