"""Helpers for tests of a gateway with API keys on: the admin key, admin calls, client calls."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import httpx

from testkit.procs import Proc, gateway, running

ADMIN_KEY = "admin-secret-for-tests"


def keyed_gateway(logs: Any, cfg: dict[str, Any], name: str) -> AbstractContextManager[Proc]:
    """`start_gateway` for a `with` block: stopped after it."""
    return running(gateway(logs, cfg, name=name, env={"GATEWAY_ADMIN_KEY": ADMIN_KEY}), "/ready", timeout=90)


def start_gateway(logs: Any, cfg: dict[str, Any], name: str) -> Proc:
    """A gateway with this admin key, started and ready."""
    return (
        gateway(logs, cfg, name=name, env={"GATEWAY_ADMIN_KEY": ADMIN_KEY}).start().wait_healthy("/ready", timeout=90)
    )


def admin(gw: Proc, method: str, path: str, body: Any = None, key: str = ADMIN_KEY, **kwargs: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"}
    if "content" in kwargs:
        headers["content-type"] = "application/json"
        return httpx.request(method, gw.url + path, headers=headers, timeout=30, **kwargs)
    return httpx.request(method, gw.url + path, json=body, headers=headers, timeout=30, **kwargs)


def create_key(gw: Proc, **fields: Any) -> tuple[str, str]:
    r = admin(gw, "POST", "/admin/keys", {"name": "test", **fields})
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["key"]


def usage(gw: Proc, key_id: str) -> dict[str, Any]:
    """A key's usage, as the admin API reports it."""
    r = admin(gw, "GET", f"/admin/keys/{key_id}/usage")
    assert r.status_code == 200, r.text
    return dict(r.json())


def chat(gw: Proc, secret: str | None, model: str = "fake", **extra: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {secret}"} if secret else {}
    body = {"model": model, "messages": [{"role": "user", "content": "hello there"}], **extra}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
