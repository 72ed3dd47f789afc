"""Offline checks of the deployment files: each Kustomize overlay rendered with `kubectl kustomize`
and every document checked against the Kubernetes API schemas (custom resources: KEDA's and LWS's
CRD schemas, vendored under tests/schemas), what each overlay promises, the Grafana dashboard
against the gateway's metrics, the Dockerfiles and the GPU example configs."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway.settings import Settings, load_settings, parse_settings
from testkit.ci import require

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("single-node", "production", "gpu", "multi-node")
BUILDS = ("base", *OVERLAYS)
DASHBOARD = ROOT / "deploy" / "grafana" / "llm-gateway.json"
METRICS_PY = ROOT / "gateway" / "core" / "metrics.py"
KUBERNETES_VERSION = "1.30"
SCHEMAS = ROOT / "tests" / "schemas"
# Custom resources are checked against their CRD's schema, vendored (no network in tests).
CRDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCHEMAS / "keda.sh_scaledobjects.yaml",
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): SCHEMAS / "leaderworkerset.x-k8s.io_leaderworkersets.yaml",
}


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


@functools.cache
def rendered(build: str) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize` of the base or an overlay: what `kubectl apply -k` would send."""
    kubectl = shutil.which("kubectl")
    require(kubectl is not None, "kubectl is needed to render the Kustomize overlays")
    assert kubectl is not None
    path = K8S / build if build == "base" else K8S / "overlays" / build
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {path}: {out.stderr}"
    return tuple(documents(out.stdout))


def find(build: str, kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in rendered(build) if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{build}: expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def has(build: str, kind: str, name: str) -> bool:
    return any(d["kind"] == kind and d["metadata"]["name"] == name for d in rendered(build))


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def config_map(build: str) -> dict[str, Any]:
    """The gateway's ConfigMap (generated: its name has a hash suffix), the one the Deployment mounts."""
    deployment = find(build, "Deployment", "llm-gateway")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    name = volumes["config"]["configMap"]["name"]
    assert name.startswith("llm-gateway-config-"), name
    return find(build, "ConfigMap", name)


def raw_config(build: str) -> dict[str, Any]:
    return dict(yaml.safe_load(config_map(build)["data"]["config.yaml"]))


def settings(build: str) -> Settings:
    """The overlay's config as the gateway parses it. Two things are set aside: the TLS files
    (mounted from a Secret in the cluster; checked against the mount by the production test),
    and `auth.oidc`, the sign-in section, which the parser learns with sign-in itself."""
    config = raw_config(build)
    config.get("server", {}).pop("tls", None)
    config.get("auth", {}).pop("oidc", None)
    return parse_settings(config, f"{build}/config.yaml", env={})


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


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    crd = documents(CRDS[(api_version, kind)].read_text())[0]
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


def test_every_overlay_has_a_kustomization() -> None:
    found = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
    assert found == sorted(OVERLAYS)
    # The base and every overlay list only files that exist, and every manifest file is listed.
    for build in BUILDS:
        folder = K8S / build if build == "base" else K8S / "overlays" / build
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        listed = {r for r in kustomization.get("resources", []) if not r.startswith("..")}
        generated = {f for g in kustomization.get("configMapGenerator", []) for f in g.get("files", [])}
        patches = {p["path"] for p in kustomization.get("patches", []) if "path" in p}
        files = {p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml"}
        assert files == listed | generated | patches, f"{build}: unlisted or missing files"


@pytest.mark.parametrize("build", BUILDS)
def test_rendered_documents_match_their_schemas(build: str) -> None:
    docs = rendered(build)
    assert docs, f"{build} renders nothing"
    failures = {f"{d['kind']} {d['metadata'].get('name')}": schema_errors(d) for d in docs}
    failures = {k: v for k, v in failures.items() if v}
    assert not failures, f"{build}: {failures}"
    assert any(d["apiVersion"] == "keda.sh/v1alpha1" for d in docs) == (build != "single-node")


def test_crd_validation_catches_mistakes() -> None:
    scaled = find("base", "ScaledObject", "vllm")
    typo = {**scaled, "spec": {**scaled["spec"], "maxReplicas": 8}}  # HPA's name, not KEDA's
    assert any("maxReplicas" in e for e in schema_errors(typo))
    wrong_type = {**scaled, "spec": {**scaled["spec"], "minReplicaCount": "one"}}
    assert any("minReplicaCount" in e for e in schema_errors(wrong_type))
    no_trigger = {**scaled, "spec": {k: v for k, v in scaled["spec"].items() if k != "triggers"}}
    assert any("triggers" in e for e in schema_errors(no_trigger))
    lws = find("multi-node", "LeaderWorkerSet", "vllm")
    template = lws["spec"]["leaderWorkerTemplate"]
    typo = {**lws, "spec": {**lws["spec"], "leaderWorkerTemplate": {**template, "groupSize": 2}}}
    assert any("groupSize" in e for e in schema_errors(typo))
    wrong_type = {**lws, "spec": {**lws["spec"], "leaderWorkerTemplate": {**template, "size": "two"}}}
    assert any("size" in e for e in schema_errors(wrong_type))
    worker = template["workerTemplate"]
    bad_pod = {**worker, "spec": {**worker["spec"], "containers": [{"name": "x", "imagee": "y"}]}}
    broken = {**lws, "spec": {**lws["spec"], "leaderWorkerTemplate": {**template, "workerTemplate": bad_pod}}}
    assert any("imagee" in e for e in schema_errors(broken)), "the pod templates inside are checked too"


@pytest.mark.parametrize("build", BUILDS)
def test_everything_in_namespace_llm(build: str) -> None:
    for doc in rendered(build):
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == "llm"
        else:
            assert doc["metadata"].get("namespace") == "llm", f"{build}: {doc['kind']} {doc['metadata']['name']}"


@pytest.mark.parametrize("build", BUILDS)
def test_gateway_deployment(build: str) -> None:
    deployment = find(build, "Deployment", "llm-gateway")
    gateway = container(deployment, "gateway")
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/health"
    assert "--workers" in gateway["args"]
    assert gateway["args"][gateway["args"].index("--workers") + 1] == str(settings(build).server.workers)
    env = {e["name"]: e for e in gateway["env"]}
    assert "secretKeyRef" in env["GATEWAY_ADMIN_KEY"]["valueFrom"]
    assert "value" not in env["GATEWAY_ADMIN_KEY"]
    secret_name = env["GATEWAY_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["name"]
    secret = find(build, "Secret", secret_name)["stringData"]
    assert "GATEWAY_ADMIN_KEY" in secret
    for ref in (e["valueFrom"]["secretKeyRef"] for e in env.values() if "valueFrom" in e):
        assert ref["key"] in find(build, "Secret", ref["name"])["stringData"], ref
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert gateway["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in gateway["volumeMounts"]}
    assert "/tmp" in mounts
    # The SQLite store and the files' directory lie on a mounted volume (the root is read-only).
    store = settings(build).store
    if store.url.startswith("sqlite:"):
        assert any(store.url.removeprefix("sqlite:///").startswith(m) for m in mounts), store.url
    assert any(str(store.data_dir).startswith(m) for m in mounts), store.data_dir


def test_single_node_is_one_replica_with_sqlite_and_one_redis() -> None:
    deployment = find("single-node", "Deployment", "llm-gateway")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert settings("single-node").store.url.startswith("sqlite:////var/lib/llm-gateway/")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    claim = volumes["data"]["persistentVolumeClaim"]["claimName"]
    assert find("single-node", "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert find("single-node", "StatefulSet", "redis")["spec"]["replicas"] == 1
    assert find("single-node", "StatefulSet", "vllm")["spec"]["replicas"] == 1
    assert not has("single-node", "StatefulSet", "postgres")
    assert not has("single-node", "HorizontalPodAutoscaler", "llm-gateway")


def test_production_gateway_is_spread_guarded_and_serves_https() -> None:
    deployment = find("production", "Deployment", "llm-gateway")
    assert deployment["spec"]["replicas"] >= 3
    pod = deployment["spec"]["template"]["spec"]
    terms = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    keys = {t["podAffinityTerm"]["topologyKey"] for t in terms}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert all(
        t["podAffinityTerm"]["labelSelector"]["matchLabels"] == {"app.kubernetes.io/name": "llm-gateway"} for t in terms
    )
    pdb = find("production", "PodDisruptionBudget", "llm-gateway")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1
    hpa = find("production", "HorizontalPodAutoscaler", "llm-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "llm-gateway" and hpa["spec"]["minReplicas"] >= 3
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and 0 < metric["resource"]["target"]["averageUtilization"] <= 80
    # TLS: the config's files are the Secret's keys where the Deployment mounts it; probes speak HTTPS.
    tls = raw_config("production")["server"]["tls"]
    gateway = container(deployment, "gateway")
    mount = next(m for m in gateway["volumeMounts"] if m["name"] == "tls")
    volume = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert volume["secret"]["secretName"] == "llm-gateway-tls"
    assert tls == {"cert": f"{mount['mountPath']}/tls.crt", "key": f"{mount['mountPath']}/tls.key"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert gateway[probe]["httpGet"]["scheme"] == "HTTPS", probe
    assert [p["port"] for p in find("production", "Service", "llm-gateway")["spec"]["ports"]] == [443]
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scheme"] == "https"


def test_production_uses_postgresql_a_redis_cluster_and_oidc() -> None:
    gateway = container(find("production", "Deployment", "llm-gateway"), "gateway")
    env = {e["name"]: e for e in gateway["env"]}
    store_ref = env["GATEWAY_STORE_URL"]["valueFrom"]["secretKeyRef"]
    assert find("production", "Secret", store_ref["name"])["stringData"][store_ref["key"]].startswith("postgresql://")
    assert find("production", "StatefulSet", "postgres")["spec"]["volumeClaimTemplates"]
    redis_url = env["GATEWAY_REDIS_URL"]["value"]
    assert redis_url.startswith("redis+cluster://")
    assert settings("production").redis.url == redis_url
    cluster = find("production", "StatefulSet", "redis-cluster")
    assert cluster["spec"]["replicas"] == 6
    args = container(cluster, "redis")["args"]
    assert args[args.index("--cluster-enabled") + 1] == "yes" and args[args.index("--appendonly") + 1] == "yes"
    seeds = [h.split(":")[0] for h in redis_url.removeprefix("redis+cluster://").split(",")]
    assert all(re.fullmatch(r"redis-cluster-[0-5]\.redis-cluster\.llm\.svc\.cluster\.local", s) for s in seeds)
    assert find("production", "Job", "redis-cluster-create")
    assert not has("production", "StatefulSet", "redis")
    oidc = raw_config("production")["auth"]["oidc"]
    assert oidc["issuer"].startswith("https://") and oidc["client_id"]
    assert oidc["client_secret_env"] in env and "valueFrom" in env[oidc["client_secret_env"]]


def test_gateway_drain_fits_the_termination_grace_period() -> None:
    for build in BUILDS:
        deployment = find(build, "Deployment", "llm-gateway")
        server = settings(build).server
        pre_stop = container(deployment, "gateway")["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        # preStop, then SIGTERM: the drain (in-flight work up to drain_timeout), the requests cut at
        # its end (gateway/process/worker.py CUT_WAIT) and the engines stopped, before the SIGKILL.
        needed = float(pre_stop[1]) + server.drain_timeout + 10
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= needed, build
        assert 0 < server.drain_grace <= server.drain_timeout


@pytest.mark.parametrize("build", BUILDS)
def test_admin_port_is_not_in_the_public_service(build: str) -> None:
    deployment = find(build, "Deployment", "llm-gateway")
    server = settings(build).server
    ports = {p["name"]: p["containerPort"] for p in container(deployment, "gateway")["ports"]}
    assert ports == {"http": server.port, "admin": server.admin_port}
    public = find(build, "Service", "llm-gateway")["spec"]["ports"]
    assert [p["targetPort"] for p in public] == ["http"]
    assert [p["targetPort"] for p in find(build, "Service", "llm-gateway-admin")["spec"]["ports"]] == ["admin"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(server.admin_port)


def engine_workload(build: str) -> dict[str, Any]:
    if build == "multi-node":
        return find(build, "LeaderWorkerSet", "vllm")
    return find(build, "StatefulSet", "vllm")


def engine_pod(build: str) -> dict[str, Any]:
    """The pod template the gateway sends requests to (a LeaderWorkerSet's leader)."""
    workload = engine_workload(build)
    if workload["kind"] == "LeaderWorkerSet":
        return dict(workload["spec"]["leaderWorkerTemplate"]["leaderTemplate"])
    return dict(workload["spec"]["template"])


@pytest.mark.parametrize("build", BUILDS)
def test_gateway_config_finds_the_engines(build: str) -> None:
    config = settings(build)
    assert config.auth.enabled
    # The engines are found by DNS over the vLLM headless Service (gateway/engines/discovery.py).
    found = [e.discovery for e in config.engines]
    assert found and all(found), "every engine is a discover: dns entry"
    service = find(build, "Service", "vllm")
    assert service["spec"]["clusterIP"] == "None"
    # The Service selects the pods that serve (a LeaderWorkerSet's leaders, not its workers).
    labels = engine_pod(build)["metadata"]["labels"]
    selector = service["spec"]["selector"]
    if build == "multi-node":
        assert selector["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
        assert (
            find(build, "LeaderWorkerSet", "vllm")["spec"]["leaderWorkerTemplate"]["workerTemplate"]["metadata"][
                "labels"
            ]["app.kubernetes.io/name"]
            != selector["app.kubernetes.io/name"]
        )
        selector = {k: v for k, v in selector.items() if not k.startswith("leaderworkerset.sigs.k8s.io/")}
    assert selector.items() <= labels.items()
    for discovery in found:
        assert discovery is not None
        assert discovery.host == f"{service['metadata']['name']}.llm.svc.cluster.local"
        assert discovery.port == service["spec"]["ports"][0]["port"] and discovery.interval <= 30
    assert {e.name for e in config.engines} == {r for m in config.models for route in m.routes for r in route.engines}
    # Engines that scale from zero need a cold start the config waits for (pod start + model load).
    assert all(e.wake_timeout >= 300 for e in config.engines)


@pytest.mark.parametrize("build", BUILDS)
def test_vllm_engines_request_gpus(build: str) -> None:
    pod = engine_pod(build)
    spec = pod["spec"]
    vllm = spec["containers"][0]
    assert int(vllm["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    command = " ".join(vllm.get("command", []) + vllm.get("args", []))
    assert "vllm.entrypoints.openai.api_server" in command and "--enable-prefix-caching" in command
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "startupProbe" in vllm
    assert spec["enableServiceLinks"] is False
    assert "replicas" not in engine_workload(build)["spec"] or build == "single-node", "KEDA owns the number"


def test_gpu_overlay_serves_lora_adapters() -> None:
    vllm = container(find("gpu", "StatefulSet", "vllm"), "vllm")
    args = vllm["args"]
    assert "--enable-lora" in args and int(args[args.index("--max-loras") + 1]) >= 1
    name, path = args[args.index("--lora-modules") + 1].split("=")
    mount = next(m for m in vllm["volumeMounts"] if m["name"] == "adapters")
    assert path.startswith(mount["mountPath"] + "/") and mount["readOnly"] is True
    volumes = find("gpu", "StatefulSet", "vllm")["spec"]["template"]["spec"]["volumes"]
    claim = next(v for v in volumes if v["name"] == "adapters")["persistentVolumeClaim"]["claimName"]
    assert find("gpu", "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadOnlyMany"]
    # The adapter is a public model, routed to the engines under the name vLLM serves it as.
    routes = {m.name: m.routes for m in settings("gpu").models}
    assert [(r.engines, r.model) for r in routes[name]] == [(("vllm",), name)]
    assert "--enable-lora" not in container(find("base", "StatefulSet", "vllm"), "vllm")["args"], "an overlay's choice"


def test_multi_node_is_tensor_and_pipeline_parallel_on_ray() -> None:
    lws = find("multi-node", "LeaderWorkerSet", "vllm")
    template = lws["spec"]["leaderWorkerTemplate"]
    size = template["size"]
    assert size >= 2 and template["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader = template["leaderTemplate"]["spec"]["containers"][0]
    worker = template["workerTemplate"]["spec"]["containers"][0]
    script = " ".join(leader["command"])
    tp = int(re.search(r"--tensor-parallel-size (\d+)", script).group(1))  # type: ignore[union-attr]
    pp = int(re.search(r"--pipeline-parallel-size (\d+)", script).group(1))  # type: ignore[union-attr]
    assert "--distributed-executor-backend ray" in script and "ray start --head" in script
    # One pipeline stage per node, one tensor-parallel rank per GPU of a node.
    assert pp == size
    for pod in (leader, worker):
        assert int(pod["resources"]["limits"]["nvidia.com/gpu"]) == tp
    assert 'ray start --address="$LWS_LEADER_ADDRESS:6379"' in " ".join(worker["command"])
    assert not has("multi-node", "StatefulSet", "vllm")


@pytest.mark.parametrize("build", [b for b in BUILDS if b != "single-node"])
def test_engines_scale_from_zero_on_the_gateways_queue(build: str) -> None:
    scaled = find(build, "ScaledObject", "vllm")
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    workload = engine_workload(build)
    assert (target["kind"], target["name"]) == (workload["kind"], workload["metadata"]["name"])
    assert target.get("apiVersion", "apps/v1") == workload["apiVersion"]
    assert spec["minReplicaCount"] == 0 < spec["maxReplicaCount"]
    assert spec["cooldownPeriod"] >= 300, "a scale-down delay: an engine costs minutes to start"
    triggers = {t["name"]: t for t in spec["triggers"]}
    assert set(triggers) == {"backlog", "traffic"} and all(t["type"] == "prometheus" for t in triggers.values())
    # KEDA activates when the value is *above* activationThreshold: one waiting request starts an engine.
    assert all(float(t["metadata"]["activationThreshold"]) < 1 for t in triggers.values())
    backlog = " ".join(triggers["backlog"]["metadata"]["query"].split())
    names = set(re.findall(r"\bgateway_[a-z_]+", backlog))
    assert names == {"gateway_cold_waiting_requests", "gateway_queued_requests", "gateway_engine_waiting_requests"}
    for name in names | {"gateway_requests"}:
        assert re.search(rf"[\"']{name}[\"']", METRICS_PY.read_text()), name
    # Every public model the engines serve (a LoRA adapter is one) starts them and keeps them up.
    config = settings(build)
    models = sorted(m.name for m in config.models)
    for trigger in triggers.values():
        (listed,) = re.findall(r'model=~"([^"]+)"', trigger["metadata"]["query"])
        assert sorted(listed.split("|")) == models, (trigger["name"], listed)
    assert "gateway_requests_total" in triggers["traffic"]["metadata"]["query"]
    (entry,) = config.engines
    assert f'engine=~"{entry.name}@.*"' in backlog
    assert float(triggers["traffic"]["metadata"]["threshold"]) >= 1000, "traffic only keeps engines up"


def test_redis_is_persistent() -> None:
    for build in ("base", "single-node", "gpu", "multi-node"):
        statefulset = find(build, "StatefulSet", "redis")
        args = container(statefulset, "redis")["args"]
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
