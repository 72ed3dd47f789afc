from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.access.key_fields import validate_key_fields
from gateway.access.keys import ApiKey, KeyStore
from gateway.core.errors import GatewayError
from testkit.redis_server import RedisServer

Body = Callable[[KeyStore, aioredis.Redis], Awaitable[Any]]


def run(server: RedisServer, body: Body, **store_kw: Any) -> Any:
    async def main() -> Any:
        client = aioredis.Redis.from_url(server.url, socket_timeout=0.25, socket_connect_timeout=0.25)
        try:
            return await body(KeyStore(client, **store_kw), client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def fields(**payload: Any) -> dict[str, Any]:
    return validate_key_fields({"name": "test", **payload}, partial=False)


async def command_calls(client: aioredis.Redis, command: str) -> int:
    stats = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def test_create_get_list_update_revoke(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, client: aioredis.Redis) -> None:
        key, secret = await store.create(fields(models=["tiny"], rpm=10, tpm=1000, metadata={"team": "a"}))
        other, _ = await store.create(fields(name="other"))
        assert key.id.startswith("key_") and len(key.id) == 20
        assert secret.startswith("sk-gw-") and key.prefix == secret[:10]
        assert (key.models, key.rpm, key.tpm, key.max_concurrent) == (("tiny",), 10, 1000, None)
        assert key.metadata == {"team": "a"} and key.token_limited and not other.token_limited
        assert await store.record_for(key.id) == key
        assert [k.id for k in await store.list()] == [key.id, other.id]

        updated = await store.update(key.id, validate_key_fields({"rpm": 20, "tpm": None}, partial=True))
        assert updated is not None and (updated.rpm, updated.tpm, updated.name) == (20, None, "test")
        assert await store.record_for(key.id) == updated

        revoked = await store.revoke(key.id)
        assert revoked is not None and revoked.revoked_at is not None and not revoked.usable(time.time())
        again = await store.revoke(key.id)
        assert again is not None and again.revoked_at == revoked.revoked_at  # the first revocation stands
        assert {k.id for k in await store.list()} == {key.id, other.id}  # kept for audit

        for missing in ("key_0000000000000000", "nope", "key_{x}"):
            assert await store.record_for(missing) is None
            assert await store.update(missing, {"rpm": 1}) is None
            assert await store.revoke(missing) is None
        assert not await client.exists("gw:{key_0000000000000000}:rec")  # update did not create it

    run(redis_server, body)


def test_redis_layout(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, client: aioredis.Redis) -> None:
        key, secret = await store.create(fields())
        digest = hashlib.sha256(secret.encode()).hexdigest()
        assert await client.type(f"app:{{{key.id}}}:rec") == b"hash"
        assert await client.get(f"app:keyhash:{digest}") == key.id.encode()
        assert await client.smembers("app:keys") == {key.id.encode()}
        rec = await client.hgetall(f"app:{{{key.id}}}:rec")
        assert rec[b"rpm"] == b"" and rec[b"models"] == b"" and rec[b"hash"] == digest.encode()

    run(redis_server, body, prefix="app")


def test_secret_is_never_stored(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, client: aioredis.Redis) -> None:
        key, secret = await store.create(fields(metadata={"owner": "x"}))
        dump = []
        async for name in client.scan_iter():
            kind = await client.type(name)
            if kind == b"hash":
                dump.append(repr(await client.hgetall(name)))
            elif kind == b"string":
                dump.append(repr(await client.get(name)))
            else:
                dump.append(repr(await client.smembers(name)))
            dump.append(name.decode())
        stored = "\n".join(dump)
        assert secret not in stored and secret[6:] not in stored
        public = repr(key.public())
        assert secret not in public and hashlib.sha256(secret.encode()).hexdigest() not in public

    run(redis_server, body)


def test_resolve(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, client: aioredis.Redis) -> None:
        key, secret = await store.create(fields(expires_at=time.time() + 3600))
        assert await store.resolve(secret) == key
        assert await store.resolve(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
        assert await store.resolve("sk-gw-unknown") is None
        assert await store.resolve("not-ours") is None
        expired, expired_secret = await store.create(fields(expires_at=1_000_000))
        resolved = await store.resolve(expired_secret)
        assert resolved == expired and not resolved.usable(time.time())
        await store.revoke(key.id)
        resolved = await store.resolve(secret)  # revoked keys resolve; the caller decides
        assert resolved is not None and resolved.revoked_at is not None

    run(redis_server, body)


def test_resolve_costs_no_round_trip_for_a_known_key(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, client: aioredis.Redis) -> None:
        _, secret = await store.create(fields())
        await store.resolve(secret)
        gets, hgetalls = await command_calls(client, "get"), await command_calls(client, "hgetall")
        for _ in range(5):
            assert await store.resolve(secret) is not None
        assert (await command_calls(client, "get"), await command_calls(client, "hgetall")) == (gets, hgetalls)

    run(redis_server, body, record_ttl=60)


def test_resolve_snapshot_follows_another_replica(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, client: aioredis.Redis) -> None:
        replica = KeyStore(client, record_ttl=0.05)
        key, secret = await store.create(fields(models=["a"]))
        assert (await replica.resolve(secret)) == key
        await store.update(key.id, {"models": ("a", "b")})
        await store.revoke(key.id)
        await asyncio.sleep(0.06)
        resolved = await replica.resolve(secret)
        assert resolved is not None and resolved.models == ("a", "b") and resolved.revoked_at is not None

    run(redis_server, body)


def test_resolve_serves_a_stale_snapshot_while_redis_is_down(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, client: aioredis.Redis) -> None:
        key, secret = await store.create(fields())
        assert await store.resolve(secret) == key
        redis_server.kill()
        started = time.monotonic()
        assert await store.resolve(secret) == key
        with pytest.raises(GatewayError) as err:
            await store.resolve("sk-gw-never-seen")
        assert err.value.status == 503 and err.value.code == "quota_unavailable"
        assert time.monotonic() - started < 2

    run(redis_server, body, record_ttl=0, timeout=0.5)


def test_public_view() -> None:
    key_fields = validate_key_fields(
        {"name": "n", "models": ["a", "a", "b"], "expires_at": "2030-01-31T12:00:00Z"}, partial=False
    )
    assert key_fields["models"] == ("a", "b")
    key = ApiKey(id="key_0123456789abcdef", name="n", models=key_fields["models"], expires_at=1.9e9)
    public = key.public()
    assert public["expires_at"] == "2030-03-17T17:46:40Z" and public["expires_at_unix"] == 1.9e9
    assert public["models"] == ["a", "b"] and public["revoked"] is False and "hash" not in public


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2030-01-31T12:00:00Z", datetime(2030, 1, 31, 12, tzinfo=UTC).timestamp()),
        ("2030-01-31T12:00:00", datetime(2030, 1, 31, 12, tzinfo=UTC).timestamp()),  # naive = UTC
        ("2030-01-31T14:00:00+02:00", datetime(2030, 1, 31, 12, tzinfo=UTC).timestamp()),
        ("2030-01-31", datetime(2030, 1, 31, tzinfo=UTC).timestamp()),
        (1_900_000_000, 1_900_000_000.0),
        (1_900_000_000.5, 1_900_000_000.5),
        (None, None),
    ],
)
def test_expires_at_formats(value: Any, expected: float | None) -> None:
    assert validate_key_fields({"name": "n", "expires_at": value}, partial=False)["expires_at"] == expected


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": 5}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": "n", "rpm": -1}, "rpm"),
        ({"name": "n", "tpm": 0}, "tpm"),
        ({"name": "n", "max_concurrent": True}, "max_concurrent"),
        ({"name": "n", "daily_tokens": "5"}, "daily_tokens"),
        ({"name": "n", "monthly_tokens": 1.5}, "monthly_tokens"),
        ({"name": "n", "monthly_tokens": 2**60}, "monthly_tokens"),
        ({"name": "n", "models": "tiny"}, "models"),
        ({"name": "n", "models": [""]}, "models"),
        ({"name": "n", "models": [1]}, "models"),
        ({"name": "n", "models": []}, "models"),
        ({"name": "n", "expires_at": "tomorrow"}, "expires_at"),
        ({"name": "n", "expires_at": True}, "expires_at"),
        ({"name": "n", "expires_at": -5}, "expires_at"),
        ({"name": "n", "expires_at": float("inf")}, "expires_at"),
        ({"name": "n", "metadata": ["a"]}, "metadata"),
        ({"name": "n", "metadata": {f"k{i}": i for i in range(51)}}, "metadata"),
        ({"name": "n", "metadata": {"a": float("nan")}}, "metadata"),
        ({"name": "n", "metadata": {"a": object()}}, "metadata"),
        ({"name": "n", "metadata": {"a": nested(300)}}, "metadata"),  # json writes it, orjson cannot
        ({"name": "n", "colour": "red"}, "colour"),
    ],
)
def test_validation_names_the_field(payload: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as err:
        validate_key_fields(payload, partial=False)
    assert err.value.status == 400 and err.value.param == param
    assert param in err.value.message


@pytest.mark.parametrize("payload", [[], "x", None, 3])
def test_payload_must_be_an_object(payload: Any) -> None:
    with pytest.raises(GatewayError) as err:
        validate_key_fields(payload, partial=True)
    assert err.value.status == 400 and "object" in err.value.message


def test_partial_validation() -> None:
    assert validate_key_fields({}, partial=True) == {}
    assert validate_key_fields({"rpm": None, "models": None}, partial=True) == {"rpm": None, "models": None}
    with pytest.raises(GatewayError) as err:
        validate_key_fields({"name": None}, partial=True)
    assert err.value.param == "name"
    assert validate_key_fields({"metadata": {f"k{i}": i for i in range(50)}}, partial=True)["metadata"]["k49"] == 49
