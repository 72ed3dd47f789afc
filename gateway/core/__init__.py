"""The vocabulary every package shares: the typed request (`request`), the one error type and its
codes (`errors`), request-body reading with its bounds (`bodies`), time parsing (`times`), the
Prometheus metrics (`metrics`) and client text made safe for the store and the log (`text`).

May import: `gateway.settings` only. Everything else in the gateway may import this.
"""
