"""Seeing one request end to end: the access log, OpenTelemetry traces, Server-Timing.

`observer` is the one object the request path talks to (`Gateway.observe`, None when the access
log and tracing are both off, so that an unobserved request pays one check); it holds what one
request's observation gathers (an `Observation`, reached through a context variable, filled by
the front middleware and the exchange) and reads X-Forwarded-For from trusted proxies only.
`access_log` writes one line per request, JSON or logfmt, buffered; `tracing` sets up sampling, ids
and context propagation once per process; `spans` turns an observation into its span tree; `otlp`
writes OTLP's protobuf directly and `export` sends it from a thread of its own (never blocking a
request: a bounded queue, drops counted).

May import: `gateway.core` and `gateway.settings` only.
"""
