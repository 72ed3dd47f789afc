"""LoRA adapters as public models: which exist (`registry`: the config's and those added through
`/admin/adapters`, kept in Redis so every replica sees them) and where they are loaded
(`placement`: load onto an engine of the base model when a request needs it, unload the least
recently used idle one at an engine's `max_loras`, one load per engine at a time across replicas).

Engines are driven through vLLM's adapter API (`POST /v1/load_lora_adapter {lora_name,
lora_path}`, `POST /v1/unload_lora_adapter {lora_name}`; a request selects an adapter by its
`model`), which the CPU engine speaks too. May import monitor and the packages below it.
"""
