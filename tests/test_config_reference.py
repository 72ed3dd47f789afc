"""The README's configuration reference is generated from the settings dataclasses
(gateway/settings/reference.py): it must be the current table, and name exactly the keys the
config parser accepts, section by section (so a new key cannot go undocumented)."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.settings import ConfigError, parse_settings
from gateway.settings.reference import in_readme, markdown, rows

README = Path(__file__).resolve().parent.parent / "README.md"

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
    "tracing.": lambda c: c.update(tracing={"zz_unknown": 1}),
    "logging.": lambda c: c.update(logging={"zz_unknown": 1}),
    "logging.access.": lambda c: c.update(logging={"access": {"zz_unknown": 1}}),
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


def test_the_readme_holds_the_current_reference() -> None:
    table = in_readme(README.read_text())
    assert table is not None, "README.md lacks the config-reference markers"
    assert table == markdown(), "stale: run `python -m gateway.settings.reference --write`"
