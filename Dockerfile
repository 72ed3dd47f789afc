# syntax=docker/dockerfile:1
# The gateway's own image: the HTTP front only (core dependencies; no torch, no CUDA, no vLLM).
# Engines run elsewhere (Dockerfile.gpu, or any OpenAI-compatible server) and are reached as
# `kind: openai` engines.
#
#   docker build -t llm-gateway:0.1.0 .
#   docker run -p 8080:8080 -e GATEWAY_ADMIN_KEY=... -e GATEWAY_REDIS_URL=redis://redis:6379/0 \
#     -v $PWD/my-config.yaml:/etc/llm-gateway/config.yaml:ro llm-gateway:0.1.0 --workers 2
# Extra arguments (--workers, --port, --log-level) are appended to `llm-gateway serve`.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: a virtual environment with the project and its core dependencies ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY engines ./engines
# `.` and not `.[engine]` or `.[all]`: the extras pull torch and transformers.
RUN /opt/venv/bin/pip install . \
 && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('torch', 'vllm')))"

# ---- runtime: the venv on a clean slim image, as a non-root user ----
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="llm-gateway" \
      org.opencontainers.image.description="OpenAI-compatible LLM serving gateway (no engines, no CUDA)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --home-dir /home/gateway --create-home --shell /usr/sbin/nologin gateway \
 && mkdir -p /etc/llm-gateway
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/gateway
EXPOSE 8080
# Liveness only (/health); /ready also needs a healthy engine. Slim has no curl: use urllib.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4).status != 200)"]
ENTRYPOINT ["llm-gateway", "serve", "--config", "/etc/llm-gateway/config.yaml", "--host", "0.0.0.0"]
