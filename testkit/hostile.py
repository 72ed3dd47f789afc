"""Hostile HTTP requests to the gateway as Hypothesis strategies, and what every answer must be.

Shared by the property-based fuzz suite (tests/test_fuzz.py, a few thousand cases in CI) and the
soak (bench/soak.py, 10,000). A `Case` (testkit/hostile_http.py) is one raw request: method,
request target (sent as is, not normalised), headers and body bytes (testkit/hostile_json.py).
`cases` draws one for an area of the API; `problem` says what is wrong with its answer; `learn`
remembers what a request created, so later cases aim at it.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit

import httpx
import orjson
from hypothesis import strategies as st

from testkit.hostile_http import (
    MAX_LEARNED,
    Case,
    World,
    auth_headers,
    batch_line,
    bodies_of,
    content_types,
    extra_headers,
    known,
    multipart,
    query,
    request_ids,
    segment,
)
from testkit.hostile_json import dump, hostile, pick

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
    "api": "text",
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
        *["team_create", "team_patch", "team_get", "org_create", "spend", "audit"],
        *["adapters_post", "adapters_post", "adapters_get", "adapters_delete", "cache_admin"],
    ],
    "odd": ["odd_path", "odd_path", "health"],
    "agent": [
        *["responses"] * 4,
        *["messages"] * 4,
        "count_tokens",
        "response_get",
        "response_delete",
        "response_items",
    ],
}


SPEND = {"group_by": "text", "since": "time", "until": "time", "format": "text", "team": "text", "key": "text"}


@st.composite
def cases(draw: st.DrawFn, world: World, area: str | None = None) -> Case:
    """One hostile request to one of the replicas, in one area of the API (None: any)."""
    bodies = bodies_of(world)
    models = st.sampled_from([*world.models, "nope"])
    keys = segment(known(world.key_ids, world.victim_ids))
    victims = segment(known(world.victim_ids))
    files = segment(known(world.file_ids))
    batches = segment(known(world.batch_ids))
    op = draw(st.sampled_from(AREAS[area] if area else [op for ops in AREAS.values() for op in ops]))
    admin = op.startswith(("key", "routes", "admin", "team", "org", "spend", "audit", "adapters", "cache"))
    method, path, body = "GET", "/", None
    ctype: bytes | None = b"application/json"
    if op in ("chat", "completions", "embeddings"):
        method = "POST"
        path = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings"}[op]
        body = draw(bodies[op]())
    elif op in ("responses", "messages", "count_tokens"):
        method = "POST"
        path = {"responses": "/v1/responses", "messages": "/v1/messages", "count_tokens": "/v1/messages/count_tokens"}[
            op
        ]
        body = draw(bodies["messages" if op == "count_tokens" else op]())
    elif op == "passthrough":
        method = "POST"
        path = draw(st.sampled_from(["/tokenize", "/detokenize", "/v1/rerank", "/rerank", "/v2/rerank", "/v1/score"]))
        body = draw(bodies["completions"]())
    elif op == "audio":
        method, path = "POST", draw(st.sampled_from(["/v1/audio/transcriptions", "/v1/audio/translations"]))
        body, ctype = draw(multipart(batch_line(bodies["chat"]())))
    elif op in ("response_get", "response_delete", "response_items"):
        method = "DELETE" if op == "response_delete" else "GET"
        path = f"/v1/responses/{draw(segment(known(world.response_ids)))}"
        if op == "response_items":
            path += "/input_items" + draw(query({"limit": "int", "after": "text", "order": "text"}))
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
    elif op == "team_create":
        method, path, body = "POST", draw(st.sampled_from(["/admin/teams", "/admin/orgs"])), draw(bodies["team"]())
    elif op == "team_patch":
        where = draw(segment(st.sampled_from(["team_0123456789abcdef", "org_0123456789abcdef", "x"])))
        method, path, body = (
            "PATCH",
            f"/admin/{draw(st.sampled_from(['teams', 'orgs']))}/{where}",
            draw(bodies["team"]()),
        )
    elif op == "team_get":
        where = draw(segment(st.sampled_from(["team_0123456789abcdef", "org_0123456789abcdef", "%00", ".."])))
        path = f"/admin/{draw(st.sampled_from(['teams', 'orgs']))}/{where}" + draw(
            st.sampled_from(["", "/usage", "/keys"])
        )
    elif op == "org_create":
        method, path, body = "POST", "/admin/orgs", draw(bodies["team"]())
    elif op == "spend":
        path = "/admin/spend" + draw(query(SPEND))
    elif op == "audit":
        path = "/admin/audit" + draw(query({"limit": "int", "after": "text", "action": "text", "team": "text"}))
    elif op == "adapters_post":
        method, path, body = "POST", "/admin/adapters", draw(bodies["adapter"]())
    elif op == "adapters_get":
        path = draw(
            pick(
                st.just("/admin/adapters"),
                segment(st.sampled_from(["lora-a", "lora-b"])).map("/admin/adapters/{}".format),
            )
        )
    elif op == "adapters_delete":
        method, path = "DELETE", f"/admin/adapters/{draw(segment(st.sampled_from(['lora-a', 'lora-b'])))}"
    elif op == "cache_admin":
        method = draw(st.sampled_from(["GET", "POST"]))
        path, body = "/admin/cache", draw(bodies["cache"]()) if method == "POST" else None
    elif op == "health":
        path = draw(st.sampled_from(["/health", "/ready", "/metrics"])) + draw(query({"model": "text"}))
    else:
        method, path, body = draw(odd_request())
    if draw(st.integers(0, 19)) == 0:
        method = draw(st.sampled_from(METHODS))  # a method the route may not take
        # ...or one it does: a read of a key or file the world keeps must not become its DELETE or
        # PATCH, so the odd method is aimed at one the fuzz may destroy
        if op == "key_get":
            path = f"/admin/keys/{draw(victims)}"
        elif op == "file_get":
            path = f"/v1/files/{draw(segment(known(world.victim_file_ids)))}"
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
            st.sampled_from(["/ui/.", "/ui/%2e", "/ui/app.js/..", "/ui/%00", "/ui/pages/..", "/ui/%0d%0aX:%20y"]),
            st.sampled_from(["/%00", "/%ff", "/" + "a" * 8000, "/v1/" + "%C3%A9" * 50, "/admin", "/admin/"]),
            st.text(max_size=30).map(lambda t: "/" + quote(t)),
        )
    )
    method = draw(st.sampled_from(METHODS))
    body = draw(pick(st.none(), st.binary(max_size=40), st.builds(dump, hostile)))
    return method, path, body


def learn(world: World, case: Case, response: httpx.Response) -> None:
    """Remembers what a successful request created (a file, a batch, a key), so later cases can
    aim at it: a batch from a hostile file, a patch of a key made with odd fields."""
    if case.method != "POST" or response.status_code not in (200, 201):
        return
    made = {
        "/v1/files": world.file_ids,
        "/v1/batches": world.batch_ids,
        "/admin/keys": world.victim_ids,
        "/v1/responses": world.response_ids,
    }
    known = made.get(case.target)
    if (
        known is not None
        and len(known) < MAX_LEARNED
        and "application/json" in response.headers.get("content-type", "")
    ):
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


JSON_POSTS = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/batches",
    "/admin/keys",
    "/admin/adapters",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/tokenize",
    "/detokenize",
    "/v1/rerank",
    "/rerank",
    "/v2/rerank",
    "/v1/score",
}
# Anthropic's statuses on /v1/messages*: no 502 or 503 (an engine's failure is a 500 api_error,
# no engine to take the request a 529 overloaded_error), and its error shape.
ANTHROPIC_5XX = {500: {"api_error"}, 504: {"timeout_error"}, 529: {"overloaded_error"}}
ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")


def anthropic_problem(status: int, body: object) -> str | None:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(body, dict) or body.get("type") != "error" or not isinstance(error, dict):
        return f"status {status} not in Anthropic's error shape: {body!r:.300}"
    if set(error) != {"type", "message"} or not error["message"] or not isinstance(error["message"], str):
        return f"status {status} not in Anthropic's error shape: {body!r:.300}"
    if status >= 500 and error["type"] not in ANTHROPIC_5XX.get(status, set()):
        return f"status {status} ({error['type']}): {error['message']}"
    return None


def _strict_object(body: bytes | None) -> bool:
    """orjson is strict: no NaN or Infinity, no lone surrogates, no invalid UTF-8."""
    try:
        return isinstance(orjson.loads(body or b""), dict)
    except orjson.JSONDecodeError:
        return False


def openai_problem(status: int, body: object) -> str | None:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"status {status} not in OpenAI's error shape: {body!r:.300}"
    if not isinstance(error["message"], str) or not error["message"] or not isinstance(error["type"], str):
        return f"status {status} with an empty message or type: {body!r:.300}"
    if status >= 500 and error["code"] not in ALLOWED_5XX.get(status, set()):
        return f"status {status} ({error['code']}): {error['message']}"
    return None


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
        trouble = (
            anthropic_problem(status, body)
            if case.target in ANTHROPIC_PATHS and status not in (408, 431)  # 408, 431: the connection's own
            else openai_problem(status, body)
        )
        if trouble is not None:
            return trouble
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
    if 300 <= status < 400 and (urlsplit(location).scheme or urlsplit(location).netloc or "\\" in location):
        return f"status {status} redirects to {location!r}, a URL the client's Host header may have made"
    if "x-request-id" not in response.headers:
        return f"status {status} without x-request-id"
    sent = dict(case.headers).get(b"x-request-id")
    sane = sent is not None and 0 < len(sent) <= 200 and all(32 < c < 127 for c in sent)
    if sane and sent is not None and response.headers["x-request-id"].encode() != sent:
        return f"status {status}: x-request-id {response.headers['x-request-id']!r} is not the client's {sent!r}"
    return None
