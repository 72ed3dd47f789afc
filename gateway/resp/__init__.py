"""Redis: the lean pipelined RESP client of the request path (`client`), its Redis Cluster
counterpart that follows MOVED/ASK (`cluster`), how a process connects to either (`connect`) and
the pub/sub subscriber that carries revocations and route changes (`subscriber`).

May import: `gateway.core`, `gateway.settings`. Only `gateway.access` and `gateway.dispatch.route_store`
talk to Redis through it.
"""
