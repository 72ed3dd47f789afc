"""Seeing one request end to end: the access log, OpenTelemetry traces, Server-Timing.

`record` holds what one request's observation gathers (an `Observation`, reached through a
context variable, filled by the front middleware and the exchange); `access_log` writes one line
per request, JSON or logfmt, buffered; `tracing` sets up the OpenTelemetry SDK and its OTLP
exporter (never blocking a request: a bounded queue, drops counted); `spans` turns an
observation into the span tree; `client_address` reads X-Forwarded-For from trusted proxies only;
`observer` is the one object the request path talks to (`Gateway.observe`, None when the access
log and tracing are both off, so that an unobserved request pays one check).

May import: `gateway.core` and `gateway.settings` only.
"""
