"""Hostile JSON for the fuzz suite (testkit/hostile.py): bodies written by hand (`dump`), so they can
hold what JSON cannot: NaN, Infinity, 1e999, integers of 400 digits, lone surrogates as escapes,
invalid UTF-8, nesting past any parser's limit, duplicate keys, truncated text; and the strategies
of hostile values and of endpoint bodies built from them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

# ---- raw JSON ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """A JSON token written as is, valid JSON or not."""

    text: bytes


@dataclass(frozen=True)
class Pairs:
    """A JSON object as written: keys in order, duplicates kept."""

    items: tuple[tuple[str, Any], ...]


def dump(value: Any) -> bytes:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Pairs | dict):
        items = value.items if isinstance(value, Pairs) else tuple(value.items())
        return b"{" + b",".join(dump(str(k)) + b":" + dump(v) for k, v in items) + b"}"
    if isinstance(value, list | tuple):
        return b"[" + b",".join(dump(v) for v in value) + b"]"
    # json.dumps escapes lone surrogates as \udXXX (ensure_ascii) and writes NaN as NaN
    return json.dumps(value).encode()


BOUNDARY_INTS = [
    0,
    -1,
    1,
    2,
    16,
    128,
    129,
    2048,
    2049,
    2**24,
    2**24 + 1,
    2**31 - 1,
    2**31,
    2**53 - 1,
    2**53,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    10**17,
    -(10**17),
    -(2**63) - 1,
]
NOT_JSON = [
    b"NaN",
    b"-NaN",
    b"Infinity",
    b"-Infinity",
    b"1e999",
    b"-1e999",
    b"1e-999",
    b"1" + b"0" * 400,
    b"-1" + b"0" * 400,
    b"1" + b"0" * 5000,
    b"0." + b"0" * 400 + b"1",
    b"1E400",
    b"01",
    b"-",
    b"+1",
    b".5",
    b"0x10",
    b"1_000",
    b"nul",
    b"True",
    b"undefined",
    b"'x'",
    b'"\\udfff"',
    b'"\\ud800"',
    b'"\\ud800\\u0041"',
    b'"a\\udc00b"',
    b'"\\u0000"',
    b'"\\x41"',
    b'"\\u12"',
    b'"\xff\xfe"',
    b'"\xc3"',
    b'"\xed\xa0\x80"',
    b'"\xf4\x90\x80\x80"',
    b'"tab\there"',
    b'"new\nline"',
    b"[1,]",
    b'{"a":1,}',
    b"[",
    b"{",
    b'{"a"}',
    b"",
]
DEPTHS = [100, 512, 1023, 1024, 1025, 5000, 100_000]
# string lengths at the limits: names (200, 256), the off-loop prompt count (16 KiB), the admin
# body (64 KiB), a model's max_prompt_bytes in the rig (100,000), the body (4 MiB)
LENGTHS = [0, 1, 63, 64, 65, 199, 200, 201, 255, 256, 257, 16_384, 16_385, 65_536, 99_900, 1 << 20, (4 << 20) - 100]


def deep(depth: int, kind: str) -> Raw:
    if kind == "array":
        return Raw(b"[" * depth + b"]" * depth)
    return Raw(b'{"a":' * depth + b"1" + b"}" * depth)


def pick(*options: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """One of the strategies, each as likely as the others (a repeated one counts twice).
    `st.one_of` flattens nested choices and merges repeats, so it cannot weight."""
    return st.sampled_from(options).flatmap(lambda chosen: chosen)


surrogate_text = st.text(pick(st.characters(), st.characters(categories=["Cs"])), max_size=12)
long_text = st.builds(
    lambda n, c: c * n, st.sampled_from(LENGTHS), st.sampled_from(["x", "é", "日", "\U0001f600", " "])
)
texts = pick(st.text(max_size=16), surrogate_text, long_text)
numbers = pick(
    st.integers(),
    st.sampled_from(BOUNDARY_INTS),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.5, -0.0, 1e308, -1e308, 5e-324, 1e-300]),
)
scalars = pick(st.none(), st.booleans(), numbers, texts, st.sampled_from(NOT_JSON).map(Raw))
deep_values = st.builds(deep, st.sampled_from(DEPTHS), st.sampled_from(["array", "object"]))
hostile = pick(
    scalars,
    deep_values,
    st.recursive(
        pick(scalars, scalars, scalars, deep_values),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=8,
    ),
)


def maybe(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value (three draws in four), else anything at all."""
    return pick(good, good, good, hostile)


@st.composite
def json_body(draw: st.DrawFn, fields: dict[str, st.SearchStrategy[Any]], required: tuple[str, ...] = ()) -> bytes:
    """An object of the endpoint's fields (required ones nearly always present, others often),
    with unknown fields and duplicate keys now and then; or something that is not such an object."""
    shape = draw(st.sampled_from(["object"] * 8 + ["other", "broken"]))
    if shape == "other":
        return dump(draw(hostile))
    if shape == "broken":
        return draw(broken_json)
    items: list[tuple[str, Any]] = []
    for name, strategy in fields.items():
        wanted = draw(st.integers(0, 9)) > 0 if name in required else draw(st.integers(0, 9)) > 5
        if wanted:
            items.append((name, draw(strategy)))
    if draw(st.integers(0, 9)) == 0:
        items.append((draw(st.text(max_size=12)), draw(hostile)))  # an unknown field
    if items and draw(st.integers(0, 19)) == 0:
        items.append((items[0][0], draw(hostile)))  # a duplicate key
    return dump(Pairs(tuple(items)))


broken_json = pick(
    st.binary(max_size=64),
    st.sampled_from(NOT_JSON),
    st.sampled_from([b"\xef\xbb\xbf{}", b"{} {}", b'{"model": "fake"} x', b"\x00", b"{\x00}", b"   ", b"null"]),
    st.builds(lambda d: d.text, deep_values),
)
