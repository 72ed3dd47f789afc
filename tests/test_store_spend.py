"""Spend rollups and the audit log in the store, on SQLite and PostgreSQL: upserts that sum what
several replicas add (concurrently), grouped reads over a window, and the audit log paged newest
first."""

from __future__ import annotations

import asyncio

from gateway.store import AuditEntry, SpendQuery, SpendRow
from testkit.stores import StoreEnv

H = 1_800_000_000 // 3600 * 3600  # an hour's start
DAY = H // 86400 * 86400


def row(hour: int, key: str, team: str, model: str, requests: int, spend: int, org: str = "") -> SpendRow:
    return SpendRow(hour, key, team, org, model, "v1", requests, 10 * requests, 5 * requests, 0, spend)


def test_spend_rollups_sum_and_group(store_env: StoreEnv) -> None:
    async def main() -> None:
        async with store_env.open() as a, store_env.open() as b:
            batches = [
                [row(H, "k1", "t1", "m", 1, 100), row(H, "k2", "t1", "m", 2, 250, org="o1")],
                [row(H, "k1", "t1", "m", 3, 300), row(H + 3600, "k1", "t1", "n", 1, 7)],
                [row(H - 86400, "k3", "", "m", 5, 5000)],
            ]
            # two replicas adding to the same rows at once: nothing lost, nothing doubled
            await asyncio.gather(*(s.add_spend(rows) for s in (a, b) for rows in batches))
            everything = await a.query_spend(SpendQuery((), H - 2 * 86400, H + 86400))
            assert everything == [
                {"requests": 24, "prompt_tokens": 240, "completion_tokens": 120, "cached_tokens": 0, "spend": 2 * 5657}
            ]
            by_team_model = await b.query_spend(SpendQuery(("team", "model"), H, H + 86400))
            assert [(r["team"], r["model"], r["requests"], r["spend"]) for r in by_team_model] == [
                ("t1", "m", 12, 1300),
                ("t1", "n", 2, 14),
            ]
            days = await a.query_spend(SpendQuery(("day",), H - 2 * 86400, H + 86400))
            assert [(r["day"], r["requests"]) for r in days] == [(DAY - 86400, 10), (DAY, 14)]
            only = await a.query_spend(SpendQuery(("key",), H, H + 86400, teams=("t1",), org_id="o1"))
            assert [(r["key"], r["spend"]) for r in only] == [("k2", 500)]
            assert await a.query_spend(SpendQuery(("key",), H, H + 86400, teams=())) == []
            hostile = await a.query_spend(SpendQuery(("team",), H, H + 86400, team_id="t1' OR '1'='1"))
            assert hostile == []

    asyncio.run(main())


def test_audit_log_pages_newest_first(store_env: StoreEnv) -> None:
    async def main() -> None:
        async with store_env.open() as store:
            for i in range(5):
                await store.append_audit(
                    AuditEntry(
                        float(H + i),
                        "admin-key",
                        "admin",
                        "admin_key",
                        "127.0.0.1",
                        "team.update" if i % 2 else "key.create",
                        f"target{i}",
                        "t1" if i < 3 else None,
                        '{"rpm": 1}',
                        '{"rpm": 2}',
                    )
                )
            first = await store.query_audit(limit=2)
            assert [e.target for e in first.items] == ["target4", "target3"] and first.has_more
            rest = await store.query_audit(limit=10, after=first.items[-1].id)
            assert [e.target for e in rest.items] == ["target2", "target1", "target0"] and not rest.has_more
            updates = await store.query_audit(action="team.update")
            assert [e.target for e in updates.items] == ["target3", "target1"]
            team = await store.query_audit(team="t1", since=H + 1)
            assert [e.target for e in team.items] == ["target2", "target1"]
            assert team.items[0].before == '{"rpm": 1}' and team.items[0].role == "admin"

    asyncio.run(main())
