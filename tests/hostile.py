"""Hostile HTTP requests to the gateway as Hypothesis strategies, and what every answer must be.

Shared by the property-based fuzz suite (tests/test_fuzz.py, a few thousand cases in CI) and the
soak (bench/soak.py, 10,000). A `Case` is one raw request: method, request target (sent as is,
not normalised), headers and body bytes. The bodies are written by hand (`dump`), so they can
hold what JSON cannot: NaN, Infinity, 1e999, integers of 400 digits, lone surrogates as escapes,
invalid UTF-8, nesting past any parser's limit, duplicate keys, truncated text.

`World` names what exists on the gateways under test (keys, files, batches, models), so most
cases reach deep into the handlers rather than stopping at a 401 or a 404.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import orjson
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

# ---- the world under test ---------------------------------------------------------------------


@dataclass
class World:
    """What exists on the gateways: the fuzz picks these most of the time, anything else otherwise."""

    admin_key: str
    client_secrets: list[str]  # usable client keys (never revoked or patched by the fuzz)
    other_secrets: list[str]  # a revoked key's
    key_ids: list[str]  # the client keys' ids: read, never changed
    victim_ids: list[str]  # keys the fuzz may patch and revoke
    file_ids: list[str]  # files of the first client key
    victim_file_ids: list[str]  # files the fuzz may delete
    batch_ids: list[str]
    models: list[str]
    replicas: list[str] = field(default_factory=list)  # base URLs


@dataclass(frozen=True)
class Case:
    replica: int
    method: str
    target: str  # path and query, sent as is
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes | None
    op: str = ""  # the operation it was drawn for (AREAS)

    def describe(self) -> str:
        body = b"" if self.body is None else self.body[:300]
        return f"{self.method} {self.target[:300]} headers={[(k, v[:80]) for k, v in self.headers]} body={body!r}"


# ---- pieces of a request ----------------------------------------------------------------------

header_text = st.binary(max_size=24).map(lambda b: bytes(c for c in b if c > 32 and c != 127))


def auth_headers(world: World, admin: bool) -> st.SearchStrategy[bytes | None]:
    """An Authorization value: mostly the right one for the API, else every shape a key can take."""
    right = world.admin_key if admin else None
    secrets = [*world.client_secrets, *world.other_secrets, world.admin_key]
    good = st.sampled_from([right]) if right else st.sampled_from(world.client_secrets)
    bearer = st.builds(lambda s: b"Bearer " + s.encode(), good)
    odd = pick(
        st.none(),
        st.sampled_from(secrets).map(lambda s: b"Bearer " + s.encode()),
        st.sampled_from(secrets).map(lambda s: b"bearer  " + s.encode() + b"  "),
        st.sampled_from(secrets).map(str.encode),
        st.sampled_from(secrets).map(lambda s: b"Bearer " + s[:-1].encode()),
        st.sampled_from(secrets).map(lambda s: b"Bearer " + s.encode() + b"x"),
        st.sampled_from(secrets).map(lambda s: b"Basic " + s.encode()),
        st.sampled_from([b"Bearer", b"Bearer ", b"Bearer sk-gw-", b"Bearer a b c", b"Token x", b"", b"\xff\xfe"]),
        header_text.map(lambda b: b"Bearer " + b),
        st.sampled_from([1000, 60_000, 70_000]).map(lambda n: b"Bearer " + b"k" * n),
    )
    return pick(bearer, bearer, bearer, odd)


content_types = pick(
    st.just(b"application/json"),
    st.just(b"application/json"),
    st.sampled_from(
        [
            None,
            b"text/plain",
            b"application/x-www-form-urlencoded",
            b"multipart/form-data",
            b"multipart/form-data; boundary=",
            b"application/json; charset=latin-1",
            b"application/json; charset=\xff",
        ]
    ),
    header_text,
)
request_ids = pick(
    st.none(),
    st.none(),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40).map(str.encode),
    st.sampled_from([b"", b"a b", b"x" * 200, b"x" * 201, b"x" * 5000, b"\xff\xfe", b"id\x80"]),
    header_text,
)
extra_headers = st.lists(
    st.tuples(
        st.sampled_from([b"x-forwarded-for", b"accept", b"accept-encoding", b"cookie", b"expect", b"x-custom", b"te"]),
        header_text,
    ),
    max_size=2,
)


def known(*lists: list[str]) -> st.SearchStrategy[str]:
    """One of the ids in these lists, which grow as the run goes on (`learn`). Drawn as an index
    in a fixed range, so every draw has the same shape whatever the lists hold then (Hypothesis
    replays choices and insists on that)."""

    def at(index: int) -> str:
        items = [item for ids in lists for item in ids]
        return items[index % len(items)]

    return st.integers(0, 4 * MAX_LEARNED).map(at)


def segment(ids: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A path segment: a known id, or an odd one (percent-encoded as a client would send it)."""
    odd = pick(
        st.text(max_size=20).map(lambda t: quote(t, safe="")),
        st.sampled_from(["", ".", "..", "%2F", "%2e%2e", "%00", "%ff", "%", "%zz", "a%2Fb", "x" * 10_000]),
        st.sampled_from(["key_0000000000000000", "file-nope", "batch_nope", "KEY_X"]),
    )
    return pick(ids, ids, odd)


def query_value(kind: str) -> st.SearchStrategy[str]:
    """A value for a query parameter of a kind (int, time or text): a good one, or one of the
    odd classes that kind invites."""
    digits = st.sampled_from(["²", "1²", "٣", "\U0001d7d7", "१०"])  # str.isdigit(), but int() refuses some
    huge = st.sampled_from(["9" * 5000, "9" * 30, "253402300800", "1e308", "nan"])  # 5000: past int()
    signs = st.sampled_from(["", "-1", "-0", "+1", " 5", "5 ", "1e3", "0x10", "1_0"])
    dates = st.sampled_from(["2030-13-45T99:00:00Z", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00"])
    if kind == "int":
        return pick(st.integers(-5, 2000).map(str), digits, huge, signs)
    if kind == "time":
        good = st.sampled_from(["2030-01-31T12:00:00Z", "1700000000", "0", "2020-01-01", "1700000000.5"])
        return pick(good, huge, signs, dates, digits)
    return pick(st.text(max_size=12), texts, digits, huge)


@st.composite
def query(draw: st.DrawFn, params: dict[str, str]) -> str:
    """A query string of the endpoint's parameters (kind: int, time or text), with unknown,
    repeated, empty and undecodable ones now and then."""
    pairs: list[str] = []
    for name, kind in params.items():
        if draw(st.integers(0, 9)) > 6:
            value = draw(query_value(kind))
            pairs.append(f"{name}={_q(value)}")
            if draw(st.integers(0, 19)) == 0:
                pairs.append(f"{name}={_q(draw(query_value(kind)))}")
    if draw(st.integers(0, 9)) == 0:
        pairs.append(draw(st.sampled_from(["=x", "&", "%ff=%fe", "a=%", "a=%zz", "x=1", "a" * 3000 + "=1", "&&&"])))
    return "?" + "&".join(pairs) if pairs else ""


def _q(value: str) -> str:
    return quote(value.encode("utf-8", errors="surrogatepass"), safe="")


# ---- request bodies of each endpoint ----------------------------------------------------------


def _bodies(world: World) -> dict[str, Callable[[], st.SearchStrategy[bytes]]]:
    models = maybe(st.sampled_from([*world.models, "nope"]))
    small_int = st.integers(-3, 40)
    content = pick(
        st.text(max_size=40),
        long_text,
        st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": maybe(st.text(max_size=20))}), max_size=3),
    )
    message = st.fixed_dictionaries(
        {"role": maybe(st.sampled_from(["system", "user", "assistant", "tool"])), "content": maybe(content)}
    )
    messages = maybe(st.lists(maybe(message), min_size=1, max_size=4))
    token_ids = st.lists(pick(st.integers(0, 500), st.sampled_from(BOUNDARY_INTS)), min_size=1, max_size=8)
    prompt = maybe(
        pick(
            st.text(max_size=40),
            long_text,
            st.lists(st.text(max_size=10), min_size=1, max_size=4),
            token_ids,
            st.lists(token_ids, min_size=1, max_size=3),
        )
    )
    counts = maybe(pick(small_int, st.sampled_from(BOUNDARY_INTS)))
    stream = maybe(st.booleans())
    options = maybe(st.fixed_dictionaries({"include_usage": maybe(st.booleans())}))
    sampling = maybe(st.floats(-1, 3, allow_nan=False))
    common = {"model": models, "stream": stream, "stream_options": options, "user": maybe(st.text(max_size=20))}
    chat = {
        **common,
        "messages": messages,
        "max_tokens": counts,
        "max_completion_tokens": counts,
        "n": counts,
        "temperature": sampling,
        "top_p": sampling,
        "stop": maybe(st.lists(st.text(max_size=5), max_size=5)),
        "seed": maybe(st.integers()),
        "response_format": maybe(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])})),
    }
    completion = {**common, "prompt": prompt, "max_tokens": counts, "n": counts, "echo": maybe(st.booleans())}
    embedding = {
        "model": models,
        "input": prompt,
        "encoding_format": maybe(st.sampled_from(["float", "base64"])),
        "user": maybe(st.text(max_size=20)),
        "max_tokens": counts,
    }
    limit = maybe(pick(st.integers(1, 10**6), st.sampled_from(BOUNDARY_INTS)))
    key = {
        "name": maybe(st.text(min_size=1, max_size=30)),
        "models": maybe(pick(st.none(), st.lists(st.sampled_from([*world.models, "nope"]), max_size=3))),
        **{name: maybe(pick(st.none(), limit)) for name in ("rpm", "tpm", "max_concurrent")},
        **{name: maybe(pick(st.none(), limit)) for name in ("daily_tokens", "monthly_tokens")},
        "expires_at": maybe(pick(st.none(), st.integers(0, 2**35), st.sampled_from(["2099-01-01T00:00:00Z"]))),
        "metadata": maybe(st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=4)),
        "priority": maybe(st.sampled_from(["high", "normal", "low", None])),
        "weight": maybe(pick(st.none(), st.floats(0, 2e6, allow_nan=False), st.integers(-1, 10))),
    }
    route = st.fixed_dictionaries(
        {},
        optional={
            "engine": maybe(st.sampled_from(["fake", "fake-b", "nope"])),
            "engines": maybe(st.lists(st.sampled_from(["fake", "fake-b", "nope"]), max_size=3)),
            "model": maybe(st.text(max_size=20)),
            "weight": maybe(pick(st.integers(0, 100), st.floats(0, 1e9), st.sampled_from(BOUNDARY_INTS))),
            "name": maybe(st.text(min_size=1, max_size=10)),
        },
    )
    routes = {"routes": maybe(st.lists(maybe(route), max_size=4))}
    batch = {
        "input_file_id": maybe(pick(known(world.file_ids), st.just("file-nope"))),
        "endpoint": maybe(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/x"])),
        "completion_window": maybe(st.sampled_from(["24h", "60s", "1m", "30d", "31d", "0h", "99999999d", "24H"])),
        "metadata": maybe(st.dictionaries(st.text(max_size=70), st.text(max_size=20), max_size=17)),
    }
    return {
        "chat": lambda: json_body(chat, ("model", "messages")),
        "completions": lambda: json_body(completion, ("model", "prompt")),
        "embeddings": lambda: json_body(embedding, ("model", "input")),
        "key": lambda: json_body(key, ("name",)),
        "routes": lambda: json_body(routes, ("routes",)),
        "batch": lambda: json_body(batch, ("input_file_id", "endpoint", "completion_window")),
    }


BATCH_LINE = {
    "custom_id": "a",
    "method": "POST",
    "url": "/v1/chat/completions",
    "body": {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
}


@st.composite
def batch_line(draw: st.DrawFn, chat_body: st.SearchStrategy[bytes]) -> bytes:
    """A line of a batch input file: a good one, one with a field gone bad (a hostile body among
    them), or no such line at all."""
    kind = draw(st.sampled_from(["good", "good", "field", "body", "other"]))
    if kind == "other":
        return draw(pick(st.builds(dump, hostile), st.binary(max_size=30)))
    items = {**BATCH_LINE, "custom_id": str(draw(st.integers(0, 3)))}
    if kind == "field":
        items[draw(st.sampled_from(list(items)))] = draw(hostile)
    elif kind == "body":
        items["body"] = Raw(draw(chat_body))
    return dump(items)


@st.composite
def multipart(draw: st.DrawFn, lines: st.SearchStrategy[bytes]) -> tuple[bytes, bytes | None]:
    """A Files API upload (content type, body): fields in either order, odd purposes, filenames
    and contents, and now and then a broken or truncated body."""
    boundary = draw(st.sampled_from([b"fuzzboundary", b"x" * 70, b"-", b"a b"]))
    content = draw(st.lists(lines, max_size=4).map(b"\n".join))
    purpose = draw(pick(st.sampled_from([b"batch", b"batch", b"user_data", b"nope", b""]), st.binary(max_size=10)))
    filename = draw(
        pick(
            st.just(b"in.jsonl"),
            st.sampled_from([b"../../etc/passwd", b"", b"a\\b.jsonl", "日本.jsonl".encode(), b"x" * 600, b'q"uote']),
            header_text,
        )
    )
    parts = [(b"purpose", None, purpose), (b"file", filename, content)]
    if draw(st.booleans()):
        parts.reverse()
    if draw(st.integers(0, 9)) == 0:
        parts.pop(draw(st.integers(0, 1)))
    body = b""
    for name, fname, data in parts:
        disposition = (
            b'form-data; name="' + name + b'"' + (b'; filename="' + fname + b'"' if fname is not None else b"")
        )
        body += b"--" + boundary + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + data + b"\r\n"
    body += b"--" + boundary + b"--\r\n"
    if draw(st.integers(0, 9)) == 0:
        body = body[: draw(st.integers(0, len(body)))]
    ctype = draw(
        pick(
            st.just(b"multipart/form-data; boundary=" + boundary),
            st.just(b"multipart/form-data; boundary=" + boundary),
            content_types,
        )
    )
    return body, ctype


# ---- the operations ---------------------------------------------------------------------------

ADMIN_REQUESTS = {
    "key_id": "text",
    "model": "text",
    "route": "text",
    "status": "int",
    "since": "time",
    "until": "time",
    "limit": "int",
    "after": "int",
}
REPORT = {"since": "time", "until": "time", "baseline_since": "time", "baseline_until": "time"}
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "PROPFIND", "get"]


# The operations of each area of the API; repeated ones are drawn more often.
AREAS = {
    "public": [*["chat"] * 4, *["completions"] * 3, "embeddings", "embeddings", "models"],
    "files": [
        *["files_upload"] * 2,
        *["file_get", "file_content", "file_delete", "files_list"],
        *["batch_create"] * 2,
        *["batches_list", "batch_get", "batch_cancel"],
    ],
    "admin": [
        *["key_create", "key_create", "key_patch", "key_patch", "key_get", "key_delete", "key_usage", "keys_list"],
        *["routes_put", "routes_put", "routes_delete", "admin_models", "admin_requests", "admin_report"],
        *["admin_batches", "admin_engines"],
    ],
    "odd": ["odd_path", "odd_path", "health"],
}


@st.composite
def cases(draw: st.DrawFn, world: World, area: str | None = None) -> Case:
    """One hostile request to one of the replicas, in one area of the API (None: any)."""
    bodies = _bodies(world)
    models = st.sampled_from([*world.models, "nope"])
    keys = segment(known(world.key_ids, world.victim_ids))
    victims = segment(known(world.victim_ids))
    files = segment(known(world.file_ids))
    batches = segment(known(world.batch_ids))
    op = draw(st.sampled_from(AREAS[area] if area else [op for ops in AREAS.values() for op in ops]))
    admin = op.startswith(("key", "routes", "admin"))
    method, path, body, ctype = "GET", "/", None, b"application/json"
    if op in ("chat", "completions", "embeddings"):
        method = "POST"
        path = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings"}[op]
        body = draw(bodies[op]())
    elif op == "models":
        path = "/v1/models"
    elif op == "files_upload":
        method, path = "POST", "/v1/files"
        body, ctype = draw(multipart(batch_line(bodies["chat"]())))
    elif op == "files_list":
        path = "/v1/files" + draw(query({"purpose": "text", "limit": "int", "after": "text", "order": "text"}))
    elif op == "file_get":
        path = f"/v1/files/{draw(files)}"
    elif op == "file_content":
        path = f"/v1/files/{draw(files)}/content"
    elif op == "file_delete":
        method, path = "DELETE", f"/v1/files/{draw(segment(known(world.victim_file_ids)))}"
    elif op == "batch_create":
        method, path, body = "POST", "/v1/batches", draw(bodies["batch"]())
    elif op == "batches_list":
        path = "/v1/batches" + draw(query({"limit": "int", "after": "text"}))
    elif op == "batch_get":
        path = f"/v1/batches/{draw(batches)}"
    elif op == "batch_cancel":
        method, path = "POST", f"/v1/batches/{draw(batches)}/cancel"
    elif op == "key_create":
        method, path, body = "POST", "/admin/keys", draw(bodies["key"]())
    elif op == "key_patch":
        method, path, body = "PATCH", f"/admin/keys/{draw(victims)}", draw(bodies["key"]())
    elif op == "key_get":
        path = f"/admin/keys/{draw(keys)}"
    elif op == "key_delete":
        method, path = "DELETE", f"/admin/keys/{draw(victims)}"
    elif op == "key_usage":
        path = f"/admin/keys/{draw(keys)}/usage" + draw(query({"days": "int"}))
    elif op == "keys_list":
        path = "/admin/keys"
    elif op == "routes_put":
        method, path = "PUT", f"/admin/models/{draw(segment(models))}/routes"
        body = draw(bodies["routes"]())
    elif op == "routes_delete":
        method, path = "DELETE", f"/admin/models/{draw(models)}/routes"
    elif op == "admin_models":
        path = draw(pick(st.sampled_from(["/admin/models", "/admin/models/"]), models.map("/admin/models/{}".format)))
    elif op == "admin_requests":
        path = "/admin/requests" + draw(query(ADMIN_REQUESTS))
    elif op == "admin_report":
        path = f"/admin/models/{draw(segment(models))}/report" + draw(query(REPORT))
    elif op == "admin_batches":
        path = draw(
            st.sampled_from(
                ["/admin/batches", "/admin/batches/{}", "/admin/batches/{}/cancel", "/admin/files/{}/content"]
            )
        )
        path = path.format(draw(batches) if "batches/" in path else draw(files))
        path += draw(query({"limit": "int", "after": "text"}))
        method = "POST" if path.endswith("/cancel") else "GET"
    elif op == "admin_engines":
        path = "/admin/engines"
    elif op == "health":
        path = draw(st.sampled_from(["/health", "/ready", "/metrics"])) + draw(query({"model": "text"}))
    else:
        method, path, body = draw(odd_request())
    if draw(st.integers(0, 19)) == 0:
        method = draw(st.sampled_from(METHODS))  # a method the route may not take
    headers: list[tuple[bytes, bytes]] = []
    auth = draw(auth_headers(world, admin))
    if auth is not None:
        headers.append((b"authorization", auth))
    ctype = draw(pick(st.just(ctype), st.just(ctype), st.just(ctype), content_types))
    if ctype is not None and body is not None:
        headers.append((b"content-type", ctype))
    rid = draw(request_ids)
    if rid is not None:
        headers.append((b"x-request-id", rid))
    headers += draw(extra_headers)
    replica = draw(st.integers(0, max(0, len(world.replicas) - 1)))
    # An HTTP client cannot send a value with whitespace around it (the server would not see it)
    return Case(replica, method, path, tuple((k, v.strip()) for k, v in headers), body, op)


@st.composite
def odd_request(draw: st.DrawFn) -> tuple[str, str, bytes | None]:
    """Paths no route has, or known ones spelled oddly, with any method."""
    known = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/files", "/admin/keys"]
    path = draw(
        pick(
            st.sampled_from(known).map(lambda p: p + "/"),
            st.sampled_from(known).map(lambda p: "/" + p),
            st.sampled_from(known).map(lambda p: p.upper()),
            st.sampled_from(known).map(lambda p: p.replace("/v1/", "/v1/../v1/")),
            st.sampled_from(known).map(lambda p: p.replace("/", "/%2F", 1)),
            st.sampled_from(["/", "*", "/ui", "/ui/", "/ui/../../etc/passwd", "/ui/%2e%2e/x", "/v2/models"]),
            st.sampled_from(["/%00", "/%ff", "/" + "a" * 8000, "/v1/" + "%C3%A9" * 50, "/admin", "/admin/"]),
            st.text(max_size=30).map(lambda t: "/" + quote(t)),
        )
    )
    method = draw(st.sampled_from(METHODS))
    body = draw(pick(st.none(), st.binary(max_size=40), st.builds(dump, hostile)))
    return method, path, body


MAX_LEARNED = 64


def learn(world: World, case: Case, response: httpx.Response) -> None:
    """Remembers what a successful request created (a file, a batch, a key), so later cases can
    aim at it: a batch from a hostile file, a patch of a key made with odd fields."""
    if case.method != "POST" or response.status_code not in (200, 201):
        return
    made = {"/v1/files": world.file_ids, "/v1/batches": world.batch_ids, "/admin/keys": world.victim_ids}
    known = made.get(case.target)
    if known is not None and len(known) < MAX_LEARNED:
        known.append(str(response.json()["id"]))


# ---- sending and judging ------------------------------------------------------------------------

# The only statuses >= 500 the gateway may answer, each with its documented codes.
ALLOWED_5XX = {
    503: {
        "quota_unavailable",
        "no_healthy_engine",
        "store_unavailable",
        "shutting_down",
        "engine_starting",
        "too_many_connections",
    },
    504: {"upstream_timeout"},
}


JSON_POSTS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/batches", "/admin/keys"}


def _strict_object(body: bytes | None) -> bool:
    """orjson is strict: no NaN or Infinity, no lone surrogates, no invalid UTF-8."""
    try:
        return isinstance(orjson.loads(body or b""), dict)
    except orjson.JSONDecodeError:
        return False


def send(client: httpx.Client, world: World, case: Case) -> httpx.Response:
    """Sends the case byte for byte: the request target is not normalised."""
    base = world.replicas[case.replica]
    request = client.build_request(
        case.method,
        base + "/",
        headers=list(case.headers),
        content=case.body,
        extensions={"target": case.target.encode("latin-1", errors="replace")},
    )
    return client.send(request)


def problem(case: Case, response: httpx.Response) -> str | None:
    """What is wrong with this answer, or None: an error is OpenAI-shaped JSON, never a 500, and
    a status >= 500 is only 503 or 504 with its documented code."""
    status = response.status_code
    content_type = response.headers.get("content-type", "")
    if status >= 400:
        if case.method.upper() == "HEAD":
            return None if status < 500 or status in ALLOWED_5XX else f"status {status}"
        try:
            body = response.json()
        except ValueError:
            return f"status {status} with a body that is not JSON: {response.content[:200]!r}"
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
            return f"status {status} not in OpenAI's error shape: {body!r:.300}"
        if not isinstance(error["message"], str) or not error["message"] or not isinstance(error["type"], str):
            return f"status {status} with an empty message or type: {body!r:.300}"
        if status >= 500 and error["code"] not in ALLOWED_5XX.get(status, set()):
            return f"status {status} ({error['code']}): {error['message']}"
        if "application/json" not in content_type:
            return f"status {status} with content-type {content_type!r}"
    elif case.method == "POST" and case.target in JSON_POSTS and not _strict_object(case.body):
        return f"status {status} for a body that is not a strict JSON object"
    elif "application/json" in content_type and case.method.upper() != "HEAD":
        try:
            response.json()
        except ValueError:
            return f"status {status}: a JSON content type with a body that is not JSON: {response.content[:200]!r}"
    # Refusals written by the connection itself (431, 408, a malformed request) come before an id
    connection_level = status in (408, 431) or (status == 400 and b"Invalid HTTP request." in response.content)
    if connection_level:
        return None
    location = response.headers.get("location", "")
    if 300 <= status < 400 and not location.startswith(("ui/", "/")):
        return f"status {status} redirects to {location!r}, a URL the client's Host header may have made"
    if "x-request-id" not in response.headers:
        return f"status {status} without x-request-id"
    sent = dict(case.headers).get(b"x-request-id")
    sane = sent is not None and 0 < len(sent) <= 200 and all(32 < c < 127 for c in sent)
    if sane and sent is not None and response.headers["x-request-id"].encode() != sent:
        return f"status {status}: x-request-id {response.headers['x-request-id']!r} is not the client's {sent!r}"
    return None
