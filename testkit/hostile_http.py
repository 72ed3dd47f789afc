"""The pieces of a hostile request for the fuzz suite (testkit/hostile.py): the world under test
(`World`: what exists on the gateways, so most cases reach deep into the handlers), the raw
request (`Case`), and strategies for headers, path segments, query strings, the bodies of each
endpoint and Files API uploads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from hypothesis import strategies as st

from testkit.hostile_json import BOUNDARY_INTS, Raw, dump, hostile, json_body, long_text, maybe, pick, texts

MAX_LEARNED = 64  # ids remembered per kind (testkit/hostile.py, learn)

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
    response_ids: list[str] = field(default_factory=list)  # stored Responses API answers


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


JWTS = [
    b"eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4IiwiZ3JvdXBzIjpbImFkbWluIl19.",  # alg none
    b"eyJhbGciOiJSUzI1NiIsImtpZCI6IngifQ.eyJzdWIiOiJ4In0.c2ln",  # an unknown key id
    b"eyJ.eyJ.sig",
    b"a.b.c",
    b"..",
    b"eyJhbGciOiJIUzI1NiJ9." + b"e" * 5000 + b".x",
]


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
        st.sampled_from(JWTS).map(lambda t: b"Bearer " + t),  # tokens shaped like a provider's
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
        st.sampled_from(
            [
                b"x-forwarded-for",
                b"accept",
                b"accept-encoding",
                b"cookie",
                b"expect",
                b"x-custom",
                b"te",
                b"x-gateway-cache",
            ]
        ),
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
        st.sampled_from(["%0A1999-01-01%2000:00:00%20CRITICAL%20x", "a%0Db", "%1B%5B2J", "%7F", "%C2%85", "%E2%80%A8"]),
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
    controls = st.sampled_from(["\x00", "a\x00", "\n1999-01-01 00:00:00 CRITICAL x", "\r", "\x1b[0m", "\u2028"])
    return pick(st.text(max_size=12), texts, digits, huge, controls)


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


HOSTILE_NAMES = [
    "<script>alert(1)</script>",
    "'; DROP TABLE spend_hourly; --",
    '=HYPERLINK("http://x")',
    "\u202eevil",
    "a" * 201,
    "\x00",
    "{team_0123456789abcdef}",
    "gw:{x}:rec",
]


def bodies_of(world: World) -> dict[str, Callable[[], st.SearchStrategy[bytes]]]:
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
    money = pick(
        st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**12), st.sampled_from(BOUNDARY_INTS)
    )
    key = {
        "name": maybe(st.text(min_size=1, max_size=30)),
        "models": maybe(pick(st.none(), st.lists(st.sampled_from([*world.models, "nope"]), max_size=3))),
        **{name: maybe(pick(st.none(), limit)) for name in ("rpm", "tpm", "max_concurrent")},
        **{name: maybe(pick(st.none(), limit)) for name in ("daily_tokens", "monthly_tokens")},
        "expires_at": maybe(pick(st.none(), st.integers(0, 2**35), st.sampled_from(["2099-01-01T00:00:00Z"]))),
        "metadata": maybe(st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=4)),
        "priority": maybe(st.sampled_from(["high", "normal", "low", None])),
        "weight": maybe(pick(st.none(), st.floats(0, 2e6, allow_nan=False), st.integers(-1, 10))),
        "team": maybe(
            pick(st.none(), st.sampled_from(["team_0123456789abcdef", "team_x", "", "org_0123456789abcdef"]))
        ),
        **{name: maybe(pick(st.none(), money)) for name in ("daily_budget", "monthly_budget")},
    }
    # teams and organizations: hostile names, prices and budgets (NaN, infinities, negative, huge)
    team = {
        "name": maybe(pick(st.text(min_size=0, max_size=30), st.sampled_from(HOSTILE_NAMES))),
        "models": key["models"],
        **{name: maybe(pick(st.none(), limit)) for name in ("rpm", "tpm", "max_concurrent", "daily_tokens")},
        **{name: maybe(pick(st.none(), money)) for name in ("daily_budget", "monthly_budget")},
        "org": maybe(pick(st.none(), st.sampled_from(["org_0123456789abcdef", "org_", "../../etc"]))),
        "metadata": key["metadata"],
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
    text_part = st.fixed_dictionaries(
        {
            "type": maybe(st.sampled_from(["input_text", "output_text", "input_image", "text"])),
            "text": maybe(st.text(max_size=20)),
        }
    )
    item = pick(
        st.fixed_dictionaries(
            {"role": maybe(st.sampled_from(["user", "assistant", "system", "developer", "tool"]))},
            optional={
                "type": st.just("message"),
                "content": maybe(pick(st.text(max_size=20), st.lists(text_part, max_size=3))),
            },
        ),
        st.fixed_dictionaries(
            {
                "type": st.just("function_call"),
                "call_id": maybe(st.text(max_size=8)),
                "name": maybe(st.text(max_size=8)),
            },
            optional={"arguments": maybe(st.text(max_size=20))},
        ),
        st.fixed_dictionaries(
            {"type": st.just("function_call_output"), "call_id": maybe(st.text(max_size=8))},
            optional={"output": maybe(st.text(max_size=20))},
        ),
        st.fixed_dictionaries({"type": maybe(st.sampled_from(["reasoning", "web_search_call", "item_reference"]))}),
    )
    function_tool = st.fixed_dictionaries(
        {"type": maybe(st.just("function")), "name": maybe(st.text(max_size=12))},
        optional={"parameters": maybe(st.just({"type": "object"})), "description": maybe(st.text(max_size=10))},
    )
    responses = {
        "model": models,
        "input": maybe(pick(st.text(max_size=40), long_text, st.lists(maybe(item), max_size=4))),
        "instructions": maybe(st.text(max_size=20)),
        "max_output_tokens": counts,
        "temperature": sampling,
        "top_p": sampling,
        "tools": maybe(st.lists(maybe(function_tool), max_size=3)),
        "tool_choice": maybe(
            pick(st.sampled_from(["auto", "none", "required", "any"]), st.just({"type": "function", "name": "f"}))
        ),
        "stream": stream,
        "store": maybe(st.booleans()),
        "previous_response_id": maybe(pick(known(world.response_ids), st.just("resp_nope"))),
        "metadata": maybe(st.dictionaries(st.text(max_size=70), st.text(max_size=20), max_size=17)),
        "user": maybe(st.text(max_size=20)),
        "parallel_tool_calls": maybe(st.booleans()),
    }
    block = pick(
        st.fixed_dictionaries({"type": maybe(st.just("text")), "text": maybe(st.text(max_size=20))}),
        st.fixed_dictionaries(
            {
                "type": st.just("image"),
                "source": maybe(
                    st.fixed_dictionaries(
                        {"type": st.just("base64"), "media_type": st.just("image/png"), "data": st.text(max_size=8)}
                    )
                ),
            }
        ),
        st.fixed_dictionaries(
            {
                "type": st.just("tool_use"),
                "id": maybe(st.text(max_size=8)),
                "name": maybe(st.text(max_size=8)),
                "input": maybe(st.just({"q": 1})),
            }
        ),
        st.fixed_dictionaries(
            {
                "type": st.just("tool_result"),
                "tool_use_id": maybe(st.text(max_size=8)),
                "content": maybe(st.text(max_size=8)),
            }
        ),
    )
    turn = st.fixed_dictionaries(
        {
            "role": maybe(st.sampled_from(["user", "assistant", "system"])),
            "content": maybe(pick(st.text(max_size=30), st.lists(maybe(block), max_size=3))),
        }
    )
    messages_body = {
        "model": models,
        "max_tokens": counts,
        "messages": maybe(st.lists(maybe(turn), min_size=1, max_size=4)),
        "system": maybe(pick(st.text(max_size=20), st.lists(block, max_size=2))),
        "temperature": sampling,
        "top_p": sampling,
        "top_k": counts,
        "stop_sequences": maybe(st.lists(st.text(max_size=5), max_size=5)),
        "stream": stream,
        "tools": maybe(
            st.lists(
                maybe(
                    st.fixed_dictionaries(
                        {"name": maybe(st.text(max_size=12)), "input_schema": maybe(st.just({"type": "object"}))}
                    )
                ),
                max_size=3,
            )
        ),
        "tool_choice": maybe(
            st.fixed_dictionaries(
                {"type": maybe(st.sampled_from(["auto", "any", "tool", "none"]))},
                optional={"name": maybe(st.text(max_size=5))},
            )
        ),
        "metadata": maybe(st.fixed_dictionaries({"user_id": maybe(st.text(max_size=20))})),
    }
    adapter_paths = [
        "/etc/passwd",
        "../../etc",
        "relative",
        "s3://fuzz/ok",
        "s3://fuzz/../x",
        "s3://u:p@fuzz/x",
        "http://127.0.0.1:6379/",
        "file:///etc/passwd",
        "/tmp/../etc",
        "\x00",
        "s3://other/x",
        "C:\\x",
    ]
    adapter = {
        "name": maybe(st.sampled_from(["lora-b", "lora-a", "fake", "../x", "a/b", "", "x" * 300, "ok.1"])),
        "base": maybe(st.sampled_from(["fake", "nope", "lora-a"])),
        "path": maybe(pick(st.sampled_from(adapter_paths), st.text(max_size=30))),
    }
    cache = {"model": maybe(st.sampled_from([*world.models, "nope", "lora-a"]))}
    return {
        "responses": lambda: json_body(responses, ("model", "input")),
        "messages": lambda: json_body(messages_body, ("model", "max_tokens", "messages")),
        "adapter": lambda: json_body(adapter, ("name", "base", "path")),
        "cache": lambda: json_body(cache, ()),
        "chat": lambda: json_body(chat, ("model", "messages")),
        "completions": lambda: json_body(completion, ("model", "prompt")),
        "embeddings": lambda: json_body(embedding, ("model", "input")),
        "key": lambda: json_body(key, ("name",)),
        "team": lambda: json_body(team, ("name",)),
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
    items: dict[str, Any] = {**BATCH_LINE, "custom_id": str(draw(st.integers(0, 3)))}
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
            st.sampled_from([b"in\x00.jsonl", b"\x00", b"\x1b[2J.jsonl", b"a\tb", b"\x7f", "\u2028".encode()]),
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
