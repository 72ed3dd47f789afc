"""Hostile identifiers for the fuzz suite (tests/test_fuzz.py): every id, cursor and name the API
takes, in the path, the query, a JSON body or a multipart filename, holding control characters
(NUL, CR and LF with a forged log line after them, ESC, DEL, C1, U+2028). PostgreSQL refuses a
NUL in text and a log line must never break, so each must be a 400 that names the parameter.

`id_cases` draws one such request, always with the right key, so the answer it must get is
exact: `id_problem` says what is wrong with it."""

from __future__ import annotations

import json
import re
from urllib.parse import quote

import httpx
from hypothesis import strategies as st

from testkit.hostile_http import BATCH_LINE, Case, World, known
from testkit.hostile_json import pick

FORGED = "1999-01-01 00:00:00,000 CRITICAL gateway: forged by a client"
CONTROLS = ["\x00", "\n", "\r", "\r\n", "\t", "\x1b[31m", "\x7f", "\x85", "\x9b", "\u2028", "\x0b", "\x08"]
# Text around the control characters: no "/" (it would change the route), nothing else special
PLAIN = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF, exclude_characters="/"), max_size=8)

# A multipart header cannot carry a raw CR or LF, a quote or a backslash inside its filename
NAME_PLAIN = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF, exclude_characters='/"\\;'), max_size=8)
NAME_CONTROLS = [c for c in CONTROLS if "\r" not in c and "\n" not in c]
control_name = st.builds(lambda a, c, b: a + c + b, NAME_PLAIN, st.sampled_from(NAME_CONTROLS), NAME_PLAIN)
control_text = pick(
    st.builds(lambda a, c, b: a + c + b, PLAIN, st.sampled_from(CONTROLS), PLAIN),
    st.builds(lambda a, c: a + c + FORGED, PLAIN, st.sampled_from(["\n", "\r\n", "\r"])),
    st.sampled_from(["\x00", "\x00" * 3, "file-\x00", "batch_\x00abc", "\n" + FORGED]),
)

# (op, method, path template with {} for the hostile value, the parameter the 400 must name, admin)
TARGETS = [
    ("file_get", "GET", "/v1/files/{}", "file_id", False),
    ("file_content", "GET", "/v1/files/{}/content", "file_id", False),
    ("file_delete", "DELETE", "/v1/files/{}", "file_id", False),
    ("files_after", "GET", "/v1/files?after={}", "after", False),
    ("files_purpose", "GET", "/v1/files?purpose={}", "purpose", False),
    ("batch_get", "GET", "/v1/batches/{}", "batch_id", False),
    ("batch_cancel", "POST", "/v1/batches/{}/cancel", "batch_id", False),
    ("batches_after", "GET", "/v1/batches?after={}", "after", False),
    ("admin_batch", "GET", "/admin/batches/{}", "batch_id", True),
    ("admin_batch_cancel", "POST", "/admin/batches/{}/cancel", "batch_id", True),
    ("admin_batches_after", "GET", "/admin/batches?after={}", "after", True),
    ("admin_file", "GET", "/admin/files/{}/content", "file_id", True),
    ("key_get", "GET", "/admin/keys/{}", "key_id", True),
    ("key_usage", "GET", "/admin/keys/{}/usage", "key_id", True),
    ("key_delete", "DELETE", "/admin/keys/{}", "key_id", True),
    ("model_get", "GET", "/admin/models/{}", "model", True),
    ("model_report", "GET", "/admin/models/{}/report", "model", True),
    ("routes_reset", "DELETE", "/admin/models/{}/routes", "model", True),
    ("requests_key", "GET", "/admin/requests?key_id={}", "key_id", True),
    ("requests_model", "GET", "/admin/requests?model={}", "model", True),
    ("requests_route", "GET", "/admin/requests?route={}", "route", True),
    ("requests_after", "GET", "/admin/requests?after={}", "after", True),
]


@st.composite
def id_cases(draw: st.DrawFn, world: World) -> tuple[Case, str]:
    """One request with a hostile identifier, and the parameter its 400 must name."""
    kind = draw(st.sampled_from(["target"] * 6 + ["input_file_id", "filename"]))
    bad = draw(control_name if kind == "filename" else control_text)
    # Half the time the hostile text hangs on an id that exists (`{id}%00`), else it stands alone
    if draw(st.booleans()):
        bad = draw(known(world.file_ids, world.batch_ids, world.key_ids)) + bad
    body: bytes | None = None
    ctype = b"application/json"
    if kind == "target":
        op, method, template, param, admin = draw(st.sampled_from(TARGETS))
        path = template.format(quote(bad.encode("utf-8", errors="surrogatepass"), safe=""))
    elif kind == "input_file_id":
        op, method, path, param, admin = "batch_create", "POST", "/v1/batches", "input_file_id", False
        spec = {"input_file_id": bad, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        body = json.dumps(spec).encode()
    else:
        op, method, path, param, admin = "files_upload", "POST", "/v1/files", "file", False
        body, ctype = upload(bad.encode("utf-8", errors="surrogatepass"))
    secret = world.admin_key if admin else world.client_secrets[0]
    headers = [(b"authorization", b"Bearer " + secret.encode())]
    if body is not None:
        headers.append((b"content-type", ctype))
    replica = draw(st.integers(0, max(0, len(world.replicas) - 1)))
    return Case(replica, method, path, tuple(headers), body, op), param


def upload(filename: bytes) -> tuple[bytes, bytes]:
    """A good upload of a one-line batch file, but for its name."""
    boundary = b"idsboundary"
    fields = [(b'name="purpose"', b"batch"), (b'name="file"; filename="' + filename + b'"', _line())]
    body = b"".join(
        b"--" + boundary + b"\r\nContent-Disposition: form-data; " + head + b"\r\n\r\n" + data + b"\r\n"
        for head, data in fields
    )
    return body + b"--" + boundary + b"--\r\n", b"multipart/form-data; boundary=" + boundary


def _line() -> bytes:
    return json.dumps(BATCH_LINE).encode()


def id_problem(param: str, response: httpx.Response) -> str | None:
    """A hostile identifier must be a 400 in OpenAI's shape naming its parameter."""
    if response.status_code != 400:
        return f"status {response.status_code}, not 400: {response.text[:300]}"
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"a 400 not in OpenAI's shape: {response.text[:300]}"
    if error.get("param") != param:
        return f"the 400 names {error.get('param')!r}, not {param!r}: {error.get('message')}"
    return None


# Control characters a log line may not hold raw (LF ends a line; a tab is never written by us
# either, so none may appear), and a line that would be a forged record
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def log_problems(text: str) -> list[str]:
    """Lines of a gateway's log with a raw control character, or that a client forged."""
    problems = []
    for number, line in enumerate(text.split("\n"), 1):
        found = RAW_CONTROL.search(line)
        if found:
            problems.append(f"line {number} holds {found.group()!r}: {line[:200]!r}")
        if line.startswith(FORGED[:10]):
            problems.append(f"line {number} is forged: {line[:200]!r}")
    return problems
