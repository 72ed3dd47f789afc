"""The exact response cache: a deterministic request asked again is answered from Redis, not by
an engine.

`policy` decides whether a request is cacheable and computes its key (the normalised body, the
API, the model's route version, the key unless the model is shared); `store` keeps the entries in
Redis under a TTL, a maximum entry size and a total memory bound shared by every replica;
`shapes` turns a stored whole answer into what the client asked for (a JSON body or an SSE
stream) and a streamed answer into a whole one to store; `service` is what the request path
calls (gateway/proxy/exchange.py). May import monitor and the packages below it.
"""
