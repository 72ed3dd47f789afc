"""Offline checks of the deployment files: Kubernetes manifests against the API schemas, the
Grafana dashboard against the gateway's metrics, the Dockerfiles and the GPU example configs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway.settings import load_settings, parse_settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "llm-gateway.json"
METRICS_PY = ROOT / "gateway" / "core" / "metrics.py"
KUBERNETES_VERSION = "1.30"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
# Custom resources are checked against their CRD's schema, vendored (no network in tests).
CRDS = {("keda.sh/v1alpha1", "ScaledObject"): ROOT / "tests" / "schemas" / "keda.sh_scaledobjects.yaml"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def all_documents() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in documents(path)]


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in all_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def test_manifests_exist() -> None:
    assert MANIFESTS, f"no manifests under {K8S}"


def strict_schema(schema: Any) -> Any:
    """A CRD's openAPIV3Schema as JSON Schema, strict like `kubectl apply --validate=strict`:
    unknown fields are errors, int-or-string fields take either."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    crd = documents(CRDS[(api_version, kind)])[0]
    version = api_version.split("/")[1]
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = strict_schema(served["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is checked by kubernetes_validate's rules
    return jsonschema.Draft7Validator(schema)


def schema_errors(doc: dict[str, Any]) -> list[str]:
    key = (doc["apiVersion"], doc["kind"])
    if key in CRDS:
        return [
            f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in crd_validator(*key).iter_errors(doc)
        ]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(str(p) for p in exc.path)}: {exc.message}"]
    return []


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_kubernetes_schema(path: Path) -> None:
    docs = documents(path)
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        errors = schema_errors(doc)
        assert not errors, f"{path.name}: {doc.get('kind')} {doc['metadata'].get('name')}: {errors}"


def test_crd_validation_catches_mistakes() -> None:
    scaled = find("ScaledObject", "vllm")
    typo = {**scaled, "spec": {**scaled["spec"], "maxReplicas": 8}}  # HPA's name, not KEDA's
    assert any("maxReplicas" in e for e in schema_errors(typo))
    wrong_type = {**scaled, "spec": {**scaled["spec"], "minReplicaCount": "one"}}
    assert any("minReplicaCount" in e for e in schema_errors(wrong_type))
    no_trigger = {**scaled, "spec": {k: v for k, v in scaled["spec"].items() if k != "triggers"}}
    assert any("triggers" in e for e in schema_errors(no_trigger))


def test_everything_in_namespace_llm() -> None:
    for doc in all_documents():
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == "llm"
        else:
            assert doc["metadata"].get("namespace") == "llm", f"{doc['kind']} {doc['metadata']['name']}"


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in MANIFESTS)


def test_gateway_deployment() -> None:
    deployment = find("Deployment", "llm-gateway")
    assert deployment["spec"]["replicas"] == 3
    gateway = container(deployment, "gateway")
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/health"
    assert "--workers" in gateway["args"]
    env = {e["name"]: e for e in gateway["env"]}
    assert "secretKeyRef" in env["GATEWAY_ADMIN_KEY"]["valueFrom"]
    assert "value" not in env["GATEWAY_ADMIN_KEY"]
    secret_name = env["GATEWAY_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["name"]
    assert "GATEWAY_ADMIN_KEY" in find("Secret", secret_name)["stringData"]
    assert env["GATEWAY_REDIS_URL"]["value"].startswith("redis://redis.")
    # The store every replica shares: PostgreSQL, its URL (with the password) from the Secret.
    store_ref = env["GATEWAY_STORE_URL"]["valueFrom"]["secretKeyRef"]
    assert find("Secret", store_ref["name"])["stringData"][store_ref["key"]].startswith("postgresql://")
    assert find("Service", "postgres")["spec"]["ports"][0]["port"] == 5432
    assert find("StatefulSet", "postgres")["spec"]["volumeClaimTemplates"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert gateway["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/tmp" for m in gateway["volumeMounts"])


def test_gateway_drain_fits_the_termination_grace_period() -> None:
    deployment = find("Deployment", "llm-gateway")
    config_map = find("ConfigMap", "llm-gateway-config")
    server = parse_settings(yaml.safe_load(config_map["data"]["config.yaml"]), "gateway-config.yaml", env={}).server
    pre_stop = container(deployment, "gateway")["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # preStop, then SIGTERM: the drain (in-flight work up to drain_timeout), the requests cut at
    # its end (gateway/process/worker.py CUT_WAIT) and the engines stopped, before the SIGKILL.
    needed = float(pre_stop[1]) + server.drain_timeout + 10
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= needed
    assert 0 < server.drain_grace <= server.drain_timeout


def test_admin_port_is_not_in_the_public_service() -> None:
    deployment = find("Deployment", "llm-gateway")
    config_map = find("ConfigMap", "llm-gateway-config")
    server = parse_settings(yaml.safe_load(config_map["data"]["config.yaml"]), "gateway-config.yaml", env={}).server
    ports = {p["name"]: p["containerPort"] for p in container(deployment, "gateway")["ports"]}
    assert ports == {"http": server.port, "admin": server.admin_port}
    public = find("Service", "llm-gateway")["spec"]["ports"]
    assert [p["targetPort"] for p in public] == ["http"]
    assert [p["targetPort"] for p in find("Service", "llm-gateway-admin")["spec"]["ports"]] == ["admin"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(server.admin_port)


def test_gateway_config_map_is_a_valid_config() -> None:
    config_map = find("ConfigMap", "llm-gateway-config")
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    settings = parse_settings(config, "gateway-config.yaml", env={})
    assert settings.auth.enabled
    # The engines are found by DNS over the vLLM headless Service (gateway/engines/discovery.py).
    found = [e.discovery for e in settings.engines]
    assert found and all(found), "every engine is a discover: dns entry"
    service, statefulset = find("Service", "vllm"), find("StatefulSet", "vllm")
    for discovery in found:
        assert discovery is not None
        assert discovery.host == f"{statefulset['spec']['serviceName']}.llm.svc.cluster.local"
        assert discovery.port == service["spec"]["ports"][0]["port"] and discovery.interval <= 30
    assert {e.name for e in settings.engines} == {
        r for m in settings.models for route in m.routes for r in route.engines
    }


def test_vllm_statefulset_requests_a_gpu() -> None:
    statefulset = find("StatefulSet", "vllm")
    assert statefulset["spec"]["serviceName"] == "vllm"
    assert find("Service", "vllm")["spec"]["clusterIP"] == "None"
    vllm = container(statefulset, "vllm")
    assert int(vllm["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert "--enable-prefix-caching" in vllm["args"]
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "startupProbe" in vllm
    assert statefulset["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_engines_scale_on_the_gateways_backlog() -> None:
    scaled = find("ScaledObject", "vllm")
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", find("StatefulSet", "vllm")["metadata"]["name"])
    assert "replicas" not in find("StatefulSet", "vllm")["spec"], "KEDA owns the number of engines"
    assert 1 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and float(trigger["metadata"]["threshold"]) > 0
    query = trigger["metadata"]["query"]
    names = set(re.findall(r"\bgateway_[a-z_]+", query))
    assert names == {"gateway_queued_requests", "gateway_engine_waiting_requests"}
    # gateway_queued_requests comes with fair-share scheduling; until then the query counts it as 0
    assert "(sum(gateway_queued_requests) or vector(0))" in " ".join(query.split())
    assert re.search(r"[\"']gateway_engine_waiting_requests[\"']", METRICS_PY.read_text())


def test_gateway_scales_on_cpu() -> None:
    hpa = find("HorizontalPodAutoscaler", "llm-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == find("Deployment", "llm-gateway")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and 0 < metric["resource"]["target"]["averageUtilization"] <= 80
    assert hpa["spec"]["minReplicas"] >= 2


def test_redis_is_persistent() -> None:
    statefulset = find("StatefulSet", "redis")
    redis = container(statefulset, "redis")
    args = redis["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert statefulset["spec"]["volumeClaimTemplates"]


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    exprs.extend(v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict))
    assert exprs, "the dashboard has no queries"
    return {m for e in exprs for m in re.findall(r"\b(gateway_[a-z0-9_]+|vllm:[a-z0-9_:]+)", e)}


def test_dashboard_uses_only_existing_metrics() -> None:
    source = METRICS_PY.read_text()
    names = dashboard_metric_names()
    assert any(n.startswith("vllm:") for n in names)
    missing = []
    for name in sorted(names):
        if name.startswith("vllm:"):
            continue
        base = re.sub(r"_(total|bucket|sum|count)$", "", name)
        if not re.search(rf"[\"']{re.escape(base)}[\"']", source):
            missing.append(name)
    assert not missing, f"metrics used by the dashboard but not defined in gateway/core/metrics.py: {missing}"


def test_dashboard_has_a_prometheus_input() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def dockerfile_instructions(name: str) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / name).read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for parts in (line.split(None, 1) for line in lines if line and not line.startswith("#"))
    ]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_runs_as_non_root_with_a_healthcheck(name: str) -> None:
    instructions = dockerfile_instructions(name)
    users = [arg.split(":")[0] for op, arg in instructions if op == "USER"]
    assert users, f"{name} has no USER"
    assert users[-1] not in ("root", "0"), f"{name} ends as {users[-1]}"
    healthchecks = [arg for op, arg in instructions if op == "HEALTHCHECK"]
    assert healthchecks and "/health" in healthchecks[-1]


def test_gateway_image_has_no_torch_or_cuda() -> None:
    instructions = dockerfile_instructions("Dockerfile")
    froms = [arg for op, arg in instructions if op == "FROM"]
    assert all("cuda" not in f.lower() for f in froms)
    assert any(op == "ARG" and "python:3.11-slim" in arg for op, arg in instructions)
    for op, arg in instructions:
        if op == "RUN" and "pip install" in arg:
            assert not re.search(r"torch|vllm|cuda|\.\[", arg.split("&&")[0]), arg
    assert ("EXPOSE", "8080") in instructions


def test_gpu_image_has_cuda_vllm() -> None:
    instructions = dockerfile_instructions("Dockerfile.gpu")
    text = " ".join(arg for _, arg in instructions)
    assert "nvidia/cuda" in text
    assert "VLLM_VERSION=0.33.0" in text
    assert "vllm.entrypoints.openai.api_server" in text


@pytest.mark.parametrize("name", ["gpu-single.yaml", "gpu-multi.yaml"])
def test_gpu_config_loads(name: str) -> None:
    settings = load_settings(ROOT / "configs" / name, env={})
    assert any(e.kind == "vllm" for e in settings.engines)
    assert settings.auth.enabled and settings.redis.url


def test_gpu_multi_has_a_canary_and_tensor_parallel() -> None:
    settings = load_settings(ROOT / "configs" / "gpu-multi.yaml", env={})
    weights = sorted(r.weight for m in settings.models for r in m.routes if len(m.routes) == 2)
    assert weights == [10, 90]
    assert any(e.vllm.tensor_parallel_size == 2 for e in settings.engines)
    devices = [e.env.get("CUDA_VISIBLE_DEVICES") for e in settings.engines]
    assert None not in devices
    gpus = [gpu for d in devices if d for gpu in d.split(",")]
    assert len(gpus) == len(set(gpus)), "two engines share a GPU"
