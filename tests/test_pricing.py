"""The `pricing` section: hostile prices refused at start with the key that is wrong; what a
request costs and reserves, in nano-units."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from gateway.settings import ConfigError, Price, parse_settings

BASE: dict[str, Any] = {
    "auth": {"enabled": False},
    "engines": [{"name": "e", "kind": "openai", "url": "http://127.0.0.1:9"}],
    "models": [{"name": "m", "routes": [{"engine": "e"}]}],
}


def parse(pricing: Any) -> Any:
    return parse_settings({**BASE, "pricing": pricing}, "cfg.yaml", env={}).pricing


def test_prices_parse_and_default() -> None:
    p = parse({"currency": "eur", "models": {"m": {"input": 0.5, "output": 1.5}}})
    assert p.currency == "EUR" and p.price("m") == Price(0.5, 1.5, 0.5) and p.price("other") is None
    assert parse_settings(BASE, "cfg.yaml", env={}).pricing.currency == "USD"


@pytest.mark.parametrize(
    ("pricing", "where"),
    [
        ({"models": {"m": {"input": -1, "output": 1}}}, "pricing.models.m.input"),
        ({"models": {"m": {"input": float("nan"), "output": 1}}}, "pricing.models.m.input"),
        ({"models": {"m": {"input": 1, "output": float("inf")}}}, "pricing.models.m.output"),
        ({"models": {"m": {"input": 1, "output": 10**400}}}, "pricing.models.m.output"),
        ({"models": {"m": {"input": 1, "output": 1e7}}}, "pricing.models.m.output"),
        ({"models": {"m": {"input": "1", "output": 1}}}, "pricing.models.m.input"),
        ({"models": {"m": {"input": True, "output": 1}}}, "pricing.models.m.input"),
        ({"models": {"m": {"input": 1}}}, "pricing.models.m"),
        ({"models": {"m": {"input": 1, "output": 1, "extra": 1}}}, "pricing.models.m.extra"),
        ({"models": {"ghost": {"input": 1, "output": 1}}}, "pricing.models.ghost"),
        ({"models": {"m": [1, 2]}}, "pricing.models.m"),
        ({"currency": "US Dollars"}, "pricing.currency"),
        ({"currency": 5}, "pricing.currency"),
        ({"zz": 1}, "pricing.zz"),
        ([1], "pricing"),
    ],
)
def test_hostile_prices_are_refused_naming_the_key(pricing: Any, where: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(pricing)
    assert f"cfg.yaml: {where}" in str(err.value)


def test_yaml_nan_is_refused() -> None:
    with pytest.raises(ConfigError, match="finite"):
        parse(yaml.safe_load("models: {m: {input: .nan, output: 1}}"))


def test_cost_and_ceiling_in_nano_units() -> None:
    price = Price(input=0.5, output=1.5, cached_input=0.25)
    # 1000 prompt tokens at 0.5/M = 0.0005; 200 completion at 1.5/M = 0.0003
    assert price.cost(1000, 200) == 800_000
    assert price.cost(1000, 200, cached=400) == 600 * 500 + 400 * 250 + 200 * 1500
    assert price.cost(10, 0, cached=99) == 10 * 250  # cached never exceeds the prompt
    assert price.ceiling(1000, 200) == 800_000 and price.ceiling(1, 0) == 500
    assert Price(0.0001, 0.0001, 0.0001).ceiling(1, 0) == 1  # rounded up: a reservation never undershoots


OIDC = {"issuer": "https://login.example.com", "client_id": "gw"}


@pytest.mark.parametrize(
    ("oidc", "where"),
    [
        ({**OIDC, "algorithms": ["none"]}, "auth.oidc.algorithms"),
        ({**OIDC, "algorithms": ["HS256"]}, "auth.oidc.algorithms"),
        ({**OIDC, "issuer": "ftp://x"}, "auth.oidc.issuer"),
        ({**OIDC, "client_id": ""}, "auth.oidc.client_id"),
        ({**OIDC, "admin": "platform"}, "auth.oidc.admin"),
        ({**OIDC, "team_admin": {"leads": "team_x"}}, "auth.oidc.team_admin.leads"),
        ({**OIDC, "session_ttl": float("nan")}, "auth.oidc.session_ttl"),
        ({**OIDC, "client_secret": "in the file"}, "auth.oidc.client_secret"),
        ("yes", "auth.oidc"),
    ],
)
def test_hostile_sign_in_config_is_refused(oidc: Any, where: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_settings({**BASE, "auth": {"enabled": False, "oidc": oidc}}, "cfg.yaml", env={})
    assert f"cfg.yaml: {where}" in str(err.value)


def test_sign_in_secrets_come_from_the_environment() -> None:
    env = {"GATEWAY_OIDC_CLIENT_SECRET": "s3cret", "GATEWAY_ALERT_SECRET": "hook"}
    cfg = {**BASE, "auth": {"enabled": False, "oidc": OIDC}, "pricing": {"alerts": {"url": "https://h"}}}
    s = parse_settings(cfg, "cfg.yaml", env=env)
    assert s.auth.oidc is not None and s.auth.oidc.client_secret == "s3cret"
    assert s.pricing.alerts is not None and s.pricing.alerts.secret == "hook" and s.pricing.alerts.threshold == 0.8
