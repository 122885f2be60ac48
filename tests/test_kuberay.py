"""deploy/kuberay against KubeRay's CRD schema (strictly: an unknown field is an error, as kubeconform's
strict mode), and configs/r1v3_38b.yaml against the GPUs and memory the manifest gives it."""
from __future__ import annotations

import copy
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from services.checks import load_config

ROOT = Path(__file__).resolve().parent.parent
RAYJOB_CRD = ROOT / "tests" / "fixtures" / "ray.io_rayjobs.yaml"  # KubeRay's, see tests/fixtures/README.md
MANIFEST = ROOT / "deploy" / "kuberay" / "rayjob-r1v3-38b.yaml"
GiB = 1024**3

# InternVL3-38B (InternViT-6B + Qwen2.5-32B) and the GPUs the manifest's nodes carry.
PARAMS = 38.4e9
LLM_LAYERS, KV_HEADS, HEAD_DIM = 64, 8, 128
GPU_BYTES = 80e9
BF16 = 2
ZERO3_BYTES_PER_PARAM = 16  # bf16 weights + bf16 grads + fp32 master weights + two fp32 Adam moments
ACTIVATION_BYTES = 8e9      # learner activations at micro batch 2 (with gradient checkpointing off)
ENGINE_WORKSPACE = 4e9      # vLLM's activations, CUDA graphs and the vision encoder's peak
MIN_CONCURRENT_SEQUENCES = 8
PROMPT_TOKENS = 4096        # the prompt's share of the context (text + image tokens)
FP32 = 4
VOCAB, HIDDEN = 151674, 5120  # Qwen2.5-32B's embedding (and lm_head): the largest tensor a checkpoint gathers
RANK_HOST_BYTES = 8e9       # a learner rank's host memory outside checkpoints (CUDA context, libraries, batch)


def strict(schema):
    """additionalProperties: false on every object that declares properties (unless the CRD keeps unknown
    fields on purpose)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def rayjob_schema():
    crd = yaml.safe_load(RAYJOB_CRD.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(v1["schema"]["openAPIV3Schema"])


@pytest.fixture(scope="module")
def manifest():
    return yaml.safe_load(MANIFEST.read_text())


def test_rayjob_manifest_validates_strictly(rayjob_schema, manifest):
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    jsonschema.validate(manifest, rayjob_schema)
    typo = copy.deepcopy(manifest)
    typo["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 1
    with pytest.raises(jsonschema.ValidationError, match="'replica' was unexpected"):
        jsonschema.validate(typo, rayjob_schema)


def _gpus(group) -> int:
    (container,) = group["template"]["spec"]["containers"]
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def _resources(group) -> dict:
    (container,) = group["template"]["spec"]["containers"]
    return container["resources"]["limits"]


def _memory(quantity: str) -> float:
    assert quantity.endswith("Gi")
    return float(quantity[:-2]) * GiB


def test_r1v3_38b_adds_up_on_the_manifests_cluster(manifest):
    cfg = load_config(str(ROOT / "configs" / "r1v3_38b.yaml"))
    engine, rollout, learner = cfg.rollout.engine, cfg.rollout, cfg.learner
    groups = {g["groupName"]: g for g in manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]}

    # GPUs: an engine's tensor-parallel GPUs are its actor's, on one node; every GPU is used.
    assert rollout.num_gpus_per_actor == engine.tensor_parallel_size == 2
    assert all(_gpus(g) % engine.tensor_parallel_size == 0 for g in groups.values())
    needed = rollout.num_actors * engine.tensor_parallel_size + learner.num_ranks * learner.num_gpus_per_rank
    assert needed == sum(g["replicas"] * _gpus(g) for g in groups.values()) == 24
    assert groups["rollout"]["replicas"] * _gpus(groups["rollout"]) == rollout.num_actors * engine.tensor_parallel_size
    assert groups["learner"]["replicas"] * _gpus(groups["learner"]) == learner.num_ranks * learner.num_gpus_per_rank

    # Rollout GPU: its share of the bf16 weights + KV cache for MIN_CONCURRENT_SEQUENCES full contexts.
    assert engine.dtype == "bfloat16"
    kv_per_token = 2 * LLM_LAYERS * KV_HEADS * HEAD_DIM * BF16 / engine.tensor_parallel_size
    weights = PARAMS * BF16 / engine.tensor_parallel_size
    kv = MIN_CONCURRENT_SEQUENCES * engine.max_model_len * kv_per_token
    assert weights + kv + ENGINE_WORKSPACE <= engine.gpu_memory_utilization * GPU_BYTES
    budgets = [cfg.evaluation.max_tokens] + [max([s.sampling.max_tokens, *s.sampling.max_tokens_schedule.values()])
                                             for s in cfg.stages if s.kind == "grpo"]
    assert engine.max_model_len >= max(budgets) + PROMPT_TOKENS

    # Learner GPU: ZeRO-3 shards weights, gradients and optimiser states over the ranks.
    assert (learner.optim.zero_stage, learner.optim.dtype) == (3, "bfloat16")
    assert ZERO3_BYTES_PER_PARAM * PARAMS / learner.num_ranks + ACTIVATION_BYTES <= 0.9 * GPU_BYTES

    # CPUs and host memory per node.
    ranks_per_node = _gpus(groups["learner"]) // learner.num_gpus_per_rank
    engines_per_node = _gpus(groups["rollout"]) // engine.tensor_parallel_size
    assert float(_resources(groups["learner"])["cpu"]) >= ranks_per_node * learner.num_cpus_per_rank
    assert float(_resources(groups["rollout"])["cpu"]) >= engines_per_node * rollout.num_cpus_per_actor
    node_memory = _memory(_resources(groups["learner"])["memory"])
    # Loading: under ZeRO-3 the model is built partitioned (on the GPUs), rank 0 reading one bf16 tensor at a
    # time; a whole copy per rank, as before, would take most of the node.
    assert VOCAB * HIDDEN * BF16 + ranks_per_node * RANK_HOST_BYTES <= node_memory

    # Host memory per learner node while a checkpoint is saved and resumed (learner/checkpoint_files.py):
    # rank 0 holds one shard and one gathered tensor (an fp32 moment at most), the others only join the
    # gathers; a resuming rank reads one moment at a time (under ZeRO-3 only its partition's slice).
    largest = VOCAB * HIDDEN * FP32
    shard = learner.optim.checkpoint_shard_mb * 2**20
    assert shard + largest + ranks_per_node * RANK_HOST_BYTES <= node_memory
    assert ranks_per_node * (largest + RANK_HOST_BYTES) <= node_memory
    # what it replaces: every rank copying the full bf16 weights and fp32 moments did not fit
    assert ranks_per_node * PARAMS * (BF16 + 2 * FP32) > node_memory
    assert _memory(_resources(groups["rollout"])["memory"]) >= engines_per_node * PARAMS * BF16


def test_manifest_runs_the_config_with_the_deploy_runtime_env_and_is_scraped(manifest):
    spec = manifest["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:5] == ["python", "-m", "services.cli", "train", "configs/r1v3_38b.yaml"]
    assert f"tracking.run_id={spec['metadata']['run_id']}" in argv
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    deploy_env = yaml.safe_load((ROOT / "deploy" / "runtime_env.yaml").read_text())
    assert {k: v for k, v in runtime_env.items() if k != "working_dir"} == deploy_env

    cfg = load_config(str(ROOT / "configs" / "r1v3_38b.yaml"))
    assert "prometheus" in cfg.tracking.backends and cfg.tracking.prometheus.host == "0.0.0.0"
    (head,) = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    head_ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert head_ports["vireo-metrics"] == cfg.tracking.prometheus.port
    monitor = yaml.safe_load((ROOT / "deploy" / "kuberay" / "podmonitor.yaml").read_text())
    assert monitor["kind"] == "PodMonitor"
    pods = [spec["rayClusterSpec"]["headGroupSpec"]] + spec["rayClusterSpec"]["workerGroupSpecs"]
    for group in pods:  # every pod is selected and exposes Ray's metrics port
        labels = group["template"]["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (container,) = group["template"]["spec"]["containers"]
        assert {"name": "metrics", "containerPort": int(group["rayStartParams"]["metrics-export-port"])} \
            in container["ports"]
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == {"metrics", "vireo-metrics"}


# ---- the files beside the RayJob: durable runs, token auth, network policy ----------------------------
DEPLOY = ROOT / "deploy" / "kuberay"
NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}  # a DNS-1123 label
METADATA = {"type": "object", "required": ["name"], "properties": {
    "name": NAME, "labels": {"type": "object", "additionalProperties": {"type": "string"}}}}
SELECTOR = {"type": "object", "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
# The fields these manifests use, as Kubernetes' own OpenAPI schemas define them (core/v1
# PersistentVolumeClaim and Secret, networking.k8s.io/v1 NetworkPolicy), required fields included.
K8S_SCHEMAS = {
    ("v1", "PersistentVolumeClaim"): {"spec": {"type": "object", "required": ["accessModes", "resources"],
        "properties": {"accessModes": {"type": "array", "minItems": 1, "items": {
            "enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]}},
            "storageClassName": {"type": "string"},
            "resources": {"type": "object", "required": ["requests"], "properties": {"requests": {
                "type": "object", "required": ["storage"], "properties": {
                    "storage": {"type": "string", "pattern": r"^[0-9]+(Ki|Mi|Gi|Ti|Pi)$"}}}}}}}},
    ("v1", "Secret"): {"type": {"enum": ["Opaque"]},
                       "stringData": {"type": "object", "additionalProperties": {"type": "string"}}},
    ("networking.k8s.io/v1", "NetworkPolicy"): {"spec": {"type": "object", "required": ["podSelector"],
        "properties": {"podSelector": SELECTOR, "policyTypes": {"type": "array", "items": {
            "enum": ["Ingress", "Egress"]}}, "ingress": {"type": "array", "items": {"type": "object",
                "properties": {"from": {"type": "array", "items": {"type": "object", "properties": {
                    "podSelector": SELECTOR, "namespaceSelector": SELECTOR}}},
                    "ports": {"type": "array", "items": {"type": "object", "required": ["port"], "properties": {
                        "protocol": {"enum": ["TCP", "UDP", "SCTP"]}, "port": PORT, "endPort": PORT}}}}}}}}},
}


def _k8s(path: Path) -> dict:
    """A manifest checked strictly against K8S_SCHEMAS (unknown fields are errors, as for the RayJob)."""
    doc = yaml.safe_load(path.read_text())
    schema = strict({"type": "object", "required": ["apiVersion", "kind", "metadata"], "properties": {
        "apiVersion": {"const": doc["apiVersion"]}, "kind": {"const": doc["kind"]}, "metadata": METADATA,
        **K8S_SCHEMAS[doc["apiVersion"], doc["kind"]]}})
    jsonschema.validate(doc, schema)
    return doc


def _pods(manifest) -> list[dict]:
    spec = manifest["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def test_companion_manifests_validate_and_a_typo_is_refused(tmp_path):
    pvc, secret, policy = (_k8s(DEPLOY / f) for f in ("runs-pvc.yaml", "ray-auth-secret.yaml", "networkpolicy.yaml"))
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert set(secret["stringData"]) == {"auth_token"}  # KubeRay's key (RAY_AUTH_TOKEN_SECRET_KEY)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    typo = yaml.safe_load((DEPLOY / "networkpolicy.yaml").read_text())
    typo["spec"]["ingress"][0]["ports"][0]["prot"] = "TCP"
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(typo))
    with pytest.raises(jsonschema.ValidationError, match="'prot' was unexpected"):
        _k8s(tmp_path / "typo.yaml")


def test_every_pod_mounts_the_shared_runs_volume_and_a_retry_resumes_the_run(manifest):
    pvc = yaml.safe_load((DEPLOY / "runs-pvc.yaml").read_text())
    for group in _pods(manifest):
        spec = group["template"]["spec"]
        (runs,) = [v for v in spec["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") ==
                   pvc["metadata"]["name"]]
        (container,) = spec["containers"]
        assert {"name": runs["name"], "mountPath": "/runs"} in container["volumeMounts"]  # read-write
    spec = manifest["spec"]
    run_id = spec["metadata"]["run_id"]
    argv = shlex.split(spec["entrypoint"])
    assert "out_dir=/runs" in argv and f"run_dir=/runs/{run_id}" in argv  # the same run_dir on every attempt
    assert spec["backoffLimit"] > 0
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert int(env["RAY_JOB_STOP_WAIT_TIME_S"]) >= 600  # `ray job stop`: SIGTERM, a step and a save, SIGKILL


def _admits(rule: dict, port: int) -> bool:
    return any(p["port"] <= port <= p.get("endPort", p["port"]) for p in rule["ports"])


def test_token_auth_private_dashboard_and_the_network_policy_admit_what_ray_uses(manifest):
    secret = yaml.safe_load((DEPLOY / "ray-auth-secret.yaml").read_text())
    policy = yaml.safe_load((DEPLOY / "networkpolicy.yaml").read_text())
    cluster = manifest["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": secret["metadata"]["name"]}
    assert tuple(int(x) for x in cluster["rayVersion"].split(".")[:2]) >= (2, 52)  # Ray's token auth

    head = cluster["headGroupSpec"]
    (container,) = head["template"]["spec"]["containers"]
    assert head["rayStartParams"]["dashboard-host"] == "$(POD_IP)"  # not 0.0.0.0 (KubeRay's default)
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in container["env"]
    for probe in ("readinessProbe", "livenessProbe"):  # not KubeRay's default, which asks localhost:8265
        assert container[probe]["httpGet"] == {"path": "/api/healthz",
                                               "port": int(head["rayStartParams"]["dashboard-agent-listen-port"])}

    own, job_api, metrics = policy["spec"]["ingress"]
    for group in _pods(manifest):
        labels = group["template"]["metadata"]["labels"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        assert [p["podSelector"]["matchLabels"] for p in own["from"]] == [policy["spec"]["podSelector"]["matchLabels"]]
        params = group["rayStartParams"]
        ray_ports = [int(v) for k, v in params.items() if k.endswith("-port") and k != "metrics-export-port"]
        ray_ports += [6379, 8265, 10001, 10002, 19999]  # GCS, dashboard, client, worker ports (Ray's defaults)
        assert not [port for port in ray_ports if not _admits(own, port)]
        metrics_port = int(params["metrics-export-port"])
        assert _admits(metrics, metrics_port) and not _admits(own, metrics_port)
        (container,) = group["template"]["spec"]["containers"]
        for port in container["ports"]:
            assert _admits(metrics if "metrics" in port["name"] else own, port["containerPort"]), port
    assert _admits(own, 32768) and _admits(own, 60999)  # torch.distributed's ephemeral ports
    assert [p["port"] for p in job_api["ports"]] == [8265]
    submitter = [p["podSelector"]["matchLabels"] for p in job_api["from"] if "namespaceSelector" not in p]
    assert submitter == [{"batch.kubernetes.io/job-name": manifest["metadata"]["name"]}]
    assert [p["podSelector"]["matchLabels"] for p in metrics["from"]] == [{"app.kubernetes.io/name": "prometheus"}]
