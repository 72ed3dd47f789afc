"""The vocabulary every package shares: the typed request (`request`), the one error type and its
codes (`errors`), request-body reading with its bounds (`bodies`), time parsing (`times`) and the
Prometheus metrics (`metrics`).

May import: `gateway.settings` only. Everything else in the gateway may import this.
"""
