"""The configuration reference (docs/reference/configuration.md) is generated from the settings
dataclasses (gateway/settings/reference.py): it must be the current page, name exactly the keys
the config parser accepts, section by section, and every environment variable gateway/settings
reads (so a new key or variable cannot go undocumented)."""

from __future__ import annotations

import ast
import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import gateway.settings
from gateway.settings import ConfigError, parse_settings
from gateway.settings.reference import ENVIRONMENT, PAGE, page, rows

SETTINGS_DIR = Path(gateway.settings.__file__).parent

BASE: dict[str, Any] = {
    "server": {},
    "health": {},
    "routing": {},
    "redis": {},
    "auth": {"enabled": False},
    "engines": [
        {"name": "cpu", "kind": "cpu", "model": "m", "port": 9001},
        {"name": "vllm", "kind": "vllm", "model": "m", "port": 9002, "vllm": {}},
    ],
    "models": [{"name": "m", "routes": [{"engine": "cpu"}]}],
}

PROBES: dict[str, Callable[[dict[str, Any]], None]] = {
    "": lambda c: c.update(zz_unknown=1),
    "server.": lambda c: c["server"].update(zz_unknown=1),
    "server.tls.": lambda c: c["server"].update(tls={"zz_unknown": 1}),
    "health.": lambda c: c["health"].update(zz_unknown=1),
    "routing.": lambda c: c["routing"].update(zz_unknown=1),
    "redis.": lambda c: c["redis"].update(zz_unknown=1),
    "auth.": lambda c: c["auth"].update(zz_unknown=1),
    "engines[].": lambda c: c["engines"][0].update(zz_unknown=1),
    "engines[].vllm.": lambda c: c["engines"][1]["vllm"].update(zz_unknown=1),
    "models[].": lambda c: c["models"][0].update(zz_unknown=1),
    "models[].routes[].": lambda c: c["models"][0]["routes"][0].update(zz_unknown=1),
    "models[].log_payloads.": lambda c: c["models"][0].update(log_payloads={"sample": 0.1, "zz_unknown": 1}),
    "scheduler.": lambda c: c.update(scheduler={"zz_unknown": 1}),
    "store.": lambda c: c.update(store={"zz_unknown": 1}),
    "inference_log.": lambda c: c.update(inference_log={"zz_unknown": 1}),
    "files.": lambda c: c.update(files={"zz_unknown": 1}),
    "batch.": lambda c: c.update(batch={"zz_unknown": 1}),
    "pricing.": lambda c: c.update(pricing={"zz_unknown": 1}),
    "pricing.alerts.": lambda c: c.update(pricing={"alerts": {"url": "http://x", "zz_unknown": 1}}),
    "auth.oidc.": lambda c: c["auth"].update(oidc={"issuer": "http://x", "client_id": "c", "zz_unknown": 1}),
    "tracing.": lambda c: c.update(tracing={"zz_unknown": 1}),
    "logging.": lambda c: c.update(logging={"zz_unknown": 1}),
    "logging.access.": lambda c: c.update(logging={"access": {"zz_unknown": 1}}),
    "cache.": lambda c: c.update(cache={"zz_unknown": 1}),
    "adapters.": lambda c: c.update(adapters={"zz_unknown": 1}),
    "adapters.models[].": lambda c: c.update(adapters={"models": [{"zz_unknown": 1}]}),
}


def accepted(prefix: str) -> set[str]:
    """The keys the parser allows where `prefix` points, from its "unknown key" error."""
    config = copy.deepcopy(BASE)
    PROBES[prefix](config)
    with pytest.raises(ConfigError) as caught:
        parse_settings(config, "probe", env={})
    match = re.search(r"zz_unknown: unknown key \(allowed: ([^)]*)\)", str(caught.value))
    assert match, str(caught.value)
    return set(match[1].split(", "))


def documented(prefix: str) -> set[str]:
    keys = [key for key, _, _ in rows()]
    if not prefix:
        return {re.split(r"[.\[]", key)[0] for key in keys}
    return {
        key[len(prefix) :] for key in keys if key.startswith(prefix) and not re.search(r"[.\[]", key[len(prefix) :])
    }


def test_the_base_config_parses() -> None:
    parse_settings(copy.deepcopy(BASE), "probe", env={})


@pytest.mark.parametrize("prefix", list(PROBES), ids=lambda p: p or "top level")
def test_the_reference_names_exactly_the_accepted_keys(prefix: str) -> None:
    assert documented(prefix) == accepted(prefix)


def test_every_key_has_a_meaning() -> None:
    assert [key for key, _, meaning in rows() if not meaning] == []


def test_the_docs_hold_the_current_reference() -> None:
    assert PAGE.read_text() == page(), "stale: run `python -m gateway.settings.reference --write`"


def test_every_environment_variable_is_documented() -> None:
    """Every string in gateway/settings that names an environment variable (SHOUTING_CASE, not a
    name the package itself defines) is in the reference's table."""
    named = set()
    for path in SETTINGS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            value = node.value if isinstance(node, ast.Constant) else None
            shouting = isinstance(value, str) and re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)+", value)
            if shouting and not hasattr(gateway.settings, str(value)):  # CONFIG_ENV and the like are names
                named.add(str(value))
    assert {"GATEWAY_ADMIN_KEY", "GATEWAY_STORE_URL", "GATEWAY_URL", "GATEWAY_API_KEY"} <= named
    assert named == {name for name, _, _ in ENVIRONMENT}
