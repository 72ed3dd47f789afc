"""Helpers for tests of a gateway with API keys on: the admin key, admin calls, client calls."""

from __future__ import annotations

from typing import Any

import httpx

from testkit.procs import Proc, gateway

ADMIN_KEY = "admin-secret-for-tests"


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


def chat(gw: Proc, secret: str | None, model: str = "fake", **extra: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {secret}"} if secret else {}
    body = {"model": model, "messages": [{"role": "user", "content": "hello there"}], **extra}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
