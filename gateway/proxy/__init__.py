"""One request through the gateway: the exchange that owns its life (`exchange`), the relay of the
engine's answer (`relay`), the graceful drain that may cut it (`drain`) and the context every
request of a process shares (`context`).

May import: `gateway.monitor`, `gateway.dispatch`, `gateway.access`, `gateway.engines`, `gateway.store`,
`gateway.core`, `gateway.settings`.
"""
