"""Starting and stopping a Gateway's services: all of them at the process's start and end, and at
a reload only what a configuration does not share (gateway/proxy/context.py says what is shared;
a service is shared when it is the same object). A configuration replaced by a reload is stopped
once no request uses it any more; what it shares with another configuration still alive stays."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from gateway.proxy.context import Gateway
from gateway.store.service import StoreUser


def store_users(gw: Gateway) -> list[StoreUser]:
    """The Gateway's own users of the store (the batch runner and the retention are the process's)."""
    users: list[StoreUser] = [u for u in (gw.audit, gw.spend) if u is not None]
    if gw.inference_log is not None:
        users.append(gw.inference_log)
    return users


class _Others:
    """The other configurations alive: a service of `gw` that one of them also has is theirs too."""

    def __init__(self, others: Sequence[Gateway]) -> None:
        self._others = others

    def share(self, service: Any, of: Callable[[Gateway], Any]) -> bool:
        return any(of(o) is service for o in self._others)

    def own(self, service: Any, of: Callable[[Gateway], Any]) -> bool:
        return service is not None and not self.share(service, of)

    def own_user(self, user: StoreUser) -> bool:
        return not any(u is user for g in self._others for u in store_users(g))


async def start(
    gw: Gateway, before: Gateway | None = None, users: Sequence[StoreUser] = (), greeting: dict[str, Any] | None = None
) -> None:
    """Without `before`: everything, the store with the process's `users` too, and the control
    channel with `greeting`. With it (a reload): what `gw` does not share with it."""
    b = _Others([before] if before is not None else [])
    r = gw.redis
    if b.own(gw.upstream, lambda g: g.upstream):
        await gw.upstream.start()
    if before is None:
        gw.pool.start()
    if b.own(gw.access, lambda g: g.access):
        await gw.access.start()
    if r is not None:
        if b.own(r.routes, lambda g: g.redis and g.redis.routes):
            r.routes.start()  # follows route changes made on any replica
        if r.alerts is not None and b.own(r.alerts, lambda g: g.redis and g.redis.alerts):
            r.alerts.start()
    if gw.adapters is not None:
        gw.adapters.start()
    if gw.cache is not None:
        gw.cache.start()
    if before is None:
        await gw.store.start([*users, *store_users(gw)])  # files, batches and the inference log
        await gw.control.start(greeting)
        await gw.metrics.start()  # with several workers: the link to the main process's sum
        return
    for user in store_users(gw):
        if b.own_user(user):
            gw.store.add(user)


async def stop(gw: Gateway, others: Sequence[Gateway] = ()) -> None:
    """Without `others`: everything (the process ends). With them (the configurations still alive,
    once no request uses `gw`): what `gw` does not share with any of them."""
    o = _Others(others)
    last = not others
    r = gw.redis
    if last:
        await gw.control.stop()
        await gw.store.stop()  # the runner hands back its lines, the log writes its last rows
    else:
        for user in store_users(gw):
            if o.own_user(user):
                await gw.store.remove(user)
    if gw.adapters is not None:
        await gw.adapters.stop()
    if gw.cache is not None:
        await gw.cache.stop()
    if r is not None:
        if r.sign_in is not None and o.own(r.sign_in, lambda g: g.redis and g.redis.sign_in):
            await r.sign_in.provider.close()
        if r.alerts is not None and o.own(r.alerts, lambda g: g.redis and g.redis.alerts):
            await r.alerts.stop()
        await r.routes.stop()
        if last:
            await r.clients.aclose()
    if o.own(gw.counter, lambda g: g.counter):
        gw.counter.close()
    if o.own(gw.access, lambda g: g.access):
        await gw.access.stop()
    if last:
        await gw.pool.stop()
    if o.own(gw.upstream, lambda g: g.upstream):
        await gw.upstream.close()
    if gw.observe is not None and o.own(gw.observe, lambda g: g.observe):
        await gw.observe.stop()  # the last access log lines, the spans still queued
    if last:
        await gw.metrics.stop()  # with several workers: the last counts, to the main process
