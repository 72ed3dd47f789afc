from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.settings import ConfigError, load_settings, parse_settings

ROOT = Path(__file__).resolve().parent.parent


def base(**over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "engines": [{"name": "a", "kind": "openai", "url": "http://127.0.0.1:9"}],
        "models": [{"name": "m", "routes": [{"engine": "a"}]}],
        "auth": {"enabled": False},
    }
    cfg.update(over)
    return cfg


def test_bundled_configs_are_valid() -> None:
    for path in (ROOT / "configs").glob("*.yaml"):
        settings = load_settings(path, env={})
        assert settings.engines and settings.models, path


def test_env_overrides_redis_and_admin_key() -> None:
    s = parse_settings(base(), env={"GATEWAY_REDIS_URL": "redis://h:1/0", "GATEWAY_ADMIN_KEY": "k"})
    assert s.redis.url == "redis://h:1/0" and s.auth.admin_key == "k"


@pytest.mark.parametrize(
    ("cfg", "where"),
    [
        (base(engines=[]), "engines"),
        (base(engines=[{"name": "a", "kind": "gpu"}]), "engines[0].kind"),
        (base(engines=[{"name": "a", "kind": "openai", "url": "ftp://x"}]), "engines[0].url"),
        (base(engines=[{"name": "a", "kind": "cpu", "model": "x"}]), "engines[0].port"),
        (base(engines=[{"name": "a", "kind": "openai", "url": "http://x", "colour": 1}]), "engines[0].colour"),
        (base(models=[{"name": "m", "routes": [{"engine": "zz"}]}]), "models[0].routes[0].engines"),
        (base(models=[{"name": "m", "routes": [{"engine": "a", "weight": "ten"}]}]), "models[0].routes[0].weight"),
        (base(models=[{"name": "m", "routes": [{"engine": "a", "weight": -1}]}]), "models[0].routes[0].weight"),
        (base(models=[{"name": "m", "routes": [{"engine": "a", "weight": 0}]}]), "models[0].routes"),
        (base(server={"port": "eighty"}), "server.port"),
        (base(server={"workers": 0}), "server.workers"),
        (base(redis={"failure_mode": "maybe"}), "redis.failure_mode"),
        (base(auth={"enabled": True}), "auth.enabled"),
        (base(leases={"share": 1}), "leases.share"),
        (base(leases={"idle": 0}), "leases.idle"),
        (base(leases={"enabled": "yes"}), "leases.enabled"),
        (base(surprise=1), "surprise"),
    ],
)
def test_errors_name_file_key_and_problem(cfg: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(cfg, "my.yaml", env={})
    assert str(info.value).startswith(f"my.yaml: {where}:"), str(info.value)


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("engines: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)
