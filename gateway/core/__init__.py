"""The vocabulary every package shares: the typed request, read within its bounds and parsed once
(`request`), the one error type and its codes (`errors`), time parsing (`times`), the
Prometheus metrics (`metrics`) and client text made safe for the store and the log (`text`).

May import: `gateway.settings` only. Everything else in the gateway may import this.
"""
