"""Who may call, and how much: the seam between the request path and keys/quotas (`base`), API keys
in Redis (`keys`, `key_fields`), the admission and reconcile scripts (`quota`, `quota_retry`), the
arithmetic of windows and rate-limit headers (`quota_windows`), the fail-open limiter
(`local_limiter`), prompt counting (`tokens`) and the keyed access of the request path (`auth`).

May import: `gateway.resp`, `gateway.core`, `gateway.settings`.
"""
