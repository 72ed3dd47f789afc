"""The floor: the thinnest pass-through proxy we can write with the gateway's own server and client pieces.

uvicorn (uvloop, httptools, the gateway's settings) + Starlette + one aiohttp session, and no features:
no parsing, no auth, no metrics, no routing. The request body goes upstream as bytes; a JSON answer comes
back whole, an event stream is relayed as the bytes arrive. bench/request_path.py reports the gateway's
costs as ratios to this process's, so "1.0x floor" means the gateway costs what uvicorn and aiohttp cost.

    python bench/floor_proxy.py --port 9001 --upstream http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

# What is worth passing on either way; everything else is hop-by-hop or the servers' own.
PASSED_HEADERS = ("content-type", "authorization")


def build_app(upstream: str) -> Starlette:
    session: aiohttp.ClientSession | None = None

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        nonlocal session
        # Idle upstream connections kept 3 s, as the gateway does: uvicorn upstreams close theirs at 5 s, and
        # a pooled connection taken just as the upstream drops it would fail.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=3)
        session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        yield
        await session.close()

    async def health(_request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def forward(request: Request) -> Response:
        assert session is not None
        headers = {k: v for k in PASSED_HEADERS if (v := request.headers.get(k))}
        body = await request.body()
        upstream_response = await session.post(upstream + request.url.path, data=body, headers=headers)
        content_type = upstream_response.headers.get("content-type", "application/json")
        if not content_type.startswith("text/event-stream"):
            try:
                data = await upstream_response.read()
            finally:
                upstream_response.release()
            return Response(data, upstream_response.status, headers={"content-type": content_type})

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for data in upstream_response.content.iter_any():
                    yield data
            finally:
                upstream_response.release()

        # The header as the upstream sent it (media_type= would append "; charset=utf-8" to text types).
        return StreamingResponse(relay(), upstream_response.status, headers={"content-type": content_type})

    routes = [Route("/health", health), Route("/v1/{path:path}", forward, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="the upstream's base URL, e.g. http://127.0.0.1:9000")
    args = p.parse_args()
    # The same server settings as `llm-gateway serve` (gateway/cli/main.py), with the loop and parser named.
    uvicorn.run(
        build_app(args.upstream.rstrip("/")),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        workers=1,
        log_level="warning",
        access_log=False,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
