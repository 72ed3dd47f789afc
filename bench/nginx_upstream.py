"""nginx as the benchmarks' upstream: canned OpenAI answers for a small fraction of a Python server's CPU.

One nginx (one worker process) listens on two ports: `json_port` answers every POST with the same chat
completion as testkit/fake_upstream.py, `sse_port` answers with an event stream of `chunks` chunks, `pace_ms`
apart (the echo module's `echo_sleep`, one write per chunk as `echo_flush` forces), then a usage chunk and
`[DONE]`. Both answer the gateway's health probes (`/health`, `/metrics`). The canned bodies are the fake
upstream's own, so the two upstreams are interchangeable; the cheaper one leaves more of the load
generator's core to the load generator.

Needs Debian's nginx and its echo module (bench/setup.sh installs them).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root, for bench/ and testkit/ (run as `python bench/x.py`)
from testkit.fake_upstream import FakeEngine
from testkit.procs import Proc, free_port

ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")


def available() -> str | None:
    """Why nginx cannot be used here, or None when it can."""
    if not shutil.which("nginx"):
        return "nginx is not installed (bench/setup.sh installs it)"
    if not ECHO_MODULE.exists():
        return f"{ECHO_MODULE} is missing (apt-get install libnginx-mod-http-echo)"
    return None


def _quoted(data: bytes) -> str:
    """An nginx single-quoted string: nginx turns \\n back into a newline and \\' into a quote."""
    text = data.decode()
    assert "\\" not in text, "canned bodies need no backslashes"
    return "'" + text.replace("'", "\\'").replace("\n", "\\n") + "'"


def config(tmp: Path, json_port: int, sse_port: int, model: str, chunks: int, pace_ms: float) -> str:
    engine = FakeEngine(model, chunks, pace_ms, 0)
    # echo_sleep takes seconds with at most 3 decimals.
    sleep = f"echo_sleep {pace_ms / 1000:.3f};" if pace_ms else ""
    events = "\n".join(f"echo -n {_quoted(chunk)}; echo_flush; {sleep}" for chunk in engine.stream_chunks)
    tail = _quoted(engine.usage + b"data: [DONE]\n\n")
    probes = f"""
        location = /health {{ default_type application/json; return 200 '{{"status":"ok"}}'; }}
        location = /metrics {{ default_type text/plain; return 200 'engine_num_requests_waiting 0\\n'; }}
        location = /v1/models {{ default_type application/json; return 200 {_quoted(engine.models)}; }}
    """
    return f"""
load_module {ECHO_MODULE};
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
# Open files: inherited from the bench, which raises its RLIMIT_NOFILE (20,000 on the dev machines).
events {{ worker_connections 16000; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    # As uvicorn (and vLLM) do: idle client connections are closed after 5 s.
    keepalive_timeout 5s;
    keepalive_requests 100000000;
    client_body_buffer_size 64k;
    server {{
        listen 127.0.0.1:{json_port} backlog=4096;
        {probes}
        location / {{ default_type application/json; return 200 {_quoted(engine.full)}; }}
    }}
    server {{
        listen 127.0.0.1:{sse_port} backlog=4096;
        {probes}
        location / {{
            default_type text/event-stream;
            add_header cache-control no-cache;
            echo_read_request_body;
            {events}
            echo -n {tail};
        }}
    }}
}}
"""


def nginx_upstream(
    tmp: Path, *, model: str, chunks: int, pace_ms: float, name: str = "nginx", cpus: str | None = None
) -> tuple[Proc, int]:
    """An unstarted nginx Proc serving canned JSON on its port and SSE on the returned second port."""
    json_port, sse_port = free_port(), free_port()
    path = tmp / f"{name}-{json_port}.conf"
    path.write_text(config(tmp, json_port, sse_port, model, chunks, pace_ms))
    args = ["nginx", "-e", str(tmp / f"{name}-error.log"), "-p", str(tmp), "-c", str(path)]
    if cpus is not None:
        args = ["taskset", "-c", cpus, *args]
    # Writable by nginx's worker, which runs as nobody when the bench runs as root.
    for sub in ("nginx-body", "nginx-proxy", "nginx-fastcgi", "nginx-uwsgi", "nginx-scgi"):
        (tmp / sub).mkdir(exist_ok=True)
    subprocess.run(["nginx", "-t", "-q", "-e", "/dev/null", "-p", str(tmp), "-c", str(path)], check=True)
    return Proc(name, args, json_port, tmp / f"{name}-{json_port}.log"), sse_port
