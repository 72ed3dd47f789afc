"""The `adapters:` section: LoRA adapters served as public models (gateway/adapters/), and the
checks an adapter's name and weights location must pass, here and in `POST /admin/adapters`.

A local path must lie inside one of `directories` (after resolving `..` and symlinks); a URI must
start with one of `uris` (prefixes the engines can read, e.g. `s3://bucket/adapters/`). Anything
else is refused: the gateway never hands an engine a path or URL nobody allowed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from gateway.settings.reader import Reader

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@-]{0,99}")
MAX_PATH = 1024
MAX_ADAPTERS = 1000


@dataclass(frozen=True)
class AdapterSettings:
    name: str  # the public model name clients ask for
    base: str  # the public model whose engines serve it
    path: str  # where the engines read the weights: a path inside `directories`, or a URI under `uris`


@dataclass(frozen=True)
class AdaptersSettings:
    directories: tuple[str, ...] = ()  # local adapter paths must lie inside one of these
    uris: tuple[str, ...] = ()  # URI prefixes engines can read (e.g. s3://bucket/adapters/); none by default
    load_timeout: float = 120.0  # seconds a load (and the wait for room on an engine) may take
    models: tuple[AdapterSettings, ...] = ()  # adapters declared here: name, base, path


def check_name(name: Any) -> str | None:
    """None when `name` is a valid adapter name, else why not."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        return "must be 1 to 100 characters: letters, digits and . _ + @ -, starting with a letter or digit"
    return None


def check_path(path: Any, directories: tuple[str, ...], uris: tuple[str, ...]) -> str | None:
    """None when the engines may be sent `path`, else why not."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH or not path.isprintable():
        return f"must be a path or URI of 1 to {MAX_PATH} printable characters"
    if "://" in path:
        parts = urlsplit(path)
        if ".." in parts.path.split("/") or "\\" in path or parts.query or parts.fragment or "@" in parts.netloc:
            return "must be a plain URI (no .., no query, no credentials)"
        if not any(path.startswith(prefix) for prefix in uris):
            return "is a URI outside adapters.uris" if uris else "is a URI, and adapters.uris allows none"
        return None
    if not os.path.isabs(path):
        return "must be an absolute path"
    real = os.path.realpath(path)
    for d in directories:
        root = os.path.realpath(d)
        if real == root or real.startswith(root.rstrip("/") + "/"):
            return None
    return "lies outside adapters.directories" if directories else "is a path, and adapters.directories allows none"


def parse_adapters(r: Reader, data: Mapping[str, Any], models: set[str]) -> AdaptersSettings | None:
    """None when the config has no `adapters:` section (then LoRA stays off on managed engines)."""
    if data.get("adapters") is None:
        return None
    section = r.section(data, "adapters", "")
    p = "adapters."
    r.known(section, p, ("directories", "uris", "load_timeout", "models"))
    lists = {}
    for key in ("directories", "uris"):
        value = section.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise r.fail(f"{p}{key}", "must be a list of strings")
        lists[key] = tuple(value)
    if not all(os.path.isabs(d) for d in lists["directories"]):
        raise r.fail(f"{p}directories", "must be absolute paths")
    if not all("://" in u for u in lists["uris"]):
        raise r.fail(f"{p}uris", "must be URI prefixes such as s3://bucket/adapters/")
    raw = section.get("models") or []
    if not isinstance(raw, list) or len(raw) > MAX_ADAPTERS:
        raise r.fail(f"{p}models", f"must be a list of at most {MAX_ADAPTERS} adapters")
    adapters: list[AdapterSettings] = []
    for i, item in enumerate(raw):
        at = f"{p}models[{i}]."
        if not isinstance(item, Mapping):
            raise r.fail(at[:-1], "must be a mapping")
        r.known(item, at, ("name", "base", "path"))
        name, base, path = item.get("name"), item.get("base"), item.get("path")
        if (why := check_name(name)) is not None:
            raise r.fail(f"{at}name", why)
        if name in models or any(a.name == name for a in adapters):
            raise r.fail(f"{at}name", f"{name!r} is already a model or an adapter")
        if base not in models:
            raise r.fail(f"{at}base", f"must name a configured model, got {base!r}")
        if (why := check_path(path, lists["directories"], lists["uris"])) is not None:
            raise r.fail(f"{at}path", why)
        adapters.append(AdapterSettings(str(name), str(base), str(path)))
    return AdaptersSettings(
        directories=lists["directories"],
        uris=lists["uris"],
        load_timeout=r.get(section, "load_timeout", p, float, 120.0, 1),
        models=tuple(adapters),
    )
