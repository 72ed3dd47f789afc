"""The `store:` section of the config file: where batches, files and the inference log live.

```yaml
store:
  url: sqlite:///gateway.db        # default; a relative path lies under data_dir
  # url: sqlite:////var/lib/gateway/gateway.db          (four slashes: an absolute path)
  # url: postgresql://gateway@db.internal:5432/gateway  (several replicas share it)
  data_dir: ./data                 # default; relative to the project root
  responses_retention_days: 30     # stored Responses API answers are deleted after this; 0 keeps them
```

`GATEWAY_STORE_URL` in the environment overrides `store.url` (a PostgreSQL URL may carry a
password); the caller passes the environment in, so this module reads none itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

DEFAULT_URL = "sqlite:///gateway.db"
DEFAULT_DATA_DIR = "./data"
URL_ENV = "GATEWAY_STORE_URL"
SQLITE_PREFIX = "sqlite:///"
POSTGRES_SCHEMES = ("postgresql", "postgres")


class StoreConfigError(ValueError):
    """A bad `store` setting; `key` is the dotted path of the offending key (e.g. `store.url`)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class StoreSettings:
    url: str = DEFAULT_URL
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    responses_retention_days: float = 30.0  # stored responses (`store: true`) are deleted after this; 0 keeps them

    @property
    def backend(self) -> str:
        """`sqlite` or `postgresql`."""
        return "sqlite" if self.url.startswith(SQLITE_PREFIX) else "postgresql"

    @property
    def sqlite_path(self) -> Path:
        """The database file of a `sqlite:///` URL: a relative path lies under `data_dir`."""
        return sqlite_path(self.url, self.data_dir)


def parse_store_settings(
    raw: Any, *, base_dir: Path | None = None, env: Mapping[str, str] | None = None, key: str = "store"
) -> StoreSettings:
    """Validate the raw `store` mapping (None when the section is absent) into StoreSettings.

    `base_dir` anchors a relative `data_dir` (the project root, as for model paths; default the
    current directory). Raises StoreConfigError naming the key and the problem.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise StoreConfigError(key, "must be a mapping")
    for name in raw:
        if name not in ("url", "data_dir", "responses_retention_days"):
            raise StoreConfigError(f"{key}.{name}", "unknown key (allowed: url, data_dir, responses_retention_days)")
    url = (env or {}).get(URL_ENV) or raw.get("url", DEFAULT_URL)
    url_key = URL_ENV if (env or {}).get(URL_ENV) else f"{key}.url"
    if not isinstance(url, str) or not url:
        raise StoreConfigError(url_key, f"must be a non-empty string, got {url!r}")
    check_store_url(url, url_key)
    data_dir = raw.get("data_dir", DEFAULT_DATA_DIR)
    if not isinstance(data_dir, str) or not data_dir:
        raise StoreConfigError(f"{key}.data_dir", f"must be a non-empty string (a directory), got {data_dir!r}")
    path = Path(data_dir).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    retention = raw.get("responses_retention_days", 30.0)
    if isinstance(retention, bool) or not isinstance(retention, int | float) or retention < 0:
        raise StoreConfigError(f"{key}.responses_retention_days", f"must be a number of days >= 0, got {retention!r}")
    return StoreSettings(url=url, data_dir=path, responses_retention_days=float(retention))


def check_store_url(url: str, key: str = "store.url") -> None:
    if url.startswith(SQLITE_PREFIX):
        if not url[len(SQLITE_PREFIX) :].strip("/"):
            raise StoreConfigError(key, "a sqlite:/// URL needs a file path, e.g. sqlite:///gateway.db")
        return
    parts = urlsplit(url)
    if parts.scheme not in POSTGRES_SCHEMES:
        raise StoreConfigError(
            key,
            f"must start with sqlite:/// or postgresql://, got {redact_url(url)!r}",
        )
    if not parts.hostname and not parts.path.strip("/"):
        raise StoreConfigError(key, "a postgresql:// URL needs a host or a database, e.g. postgresql://user@host/db")


def sqlite_path(url: str, data_dir: Path) -> Path:
    """`sqlite:///a/b.db` is data_dir/a/b.db; `sqlite:////abs/b.db` is /abs/b.db."""
    rest = url[len(SQLITE_PREFIX) :]
    path = Path(rest).expanduser()
    return path if path.is_absolute() else data_dir / path


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
