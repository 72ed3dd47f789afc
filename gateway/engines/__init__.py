"""The engines, seen from the gateway: the HTTP client to them (`client`), their health and load
(`pool`), DNS discovery (`discovery`), TLS towards them (`tls`), the managed engine processes
(`supervisor`, `vllm_launch`) and the engine states carried on the control channel (`control`).

May import: `gateway.core`, `gateway.settings`. Never imports torch or vLLM: an engine is another process.
"""
