"""The kubernetes profile renders offline: ``argo-workflows create --only-json`` against a local S3
server (it uploads the code package there) — GPU requests, node counts, shared memory, retries and
the image of every step come from ``params/<backbone>.yaml``."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from rtdmd.config import load_params
from rtdmd.testing.s3server import create_bucket, local_s3_server, s3_env

from .helpers import ROOT, assert_ok, flow_env, run_flow

BUCKET = "rtdmd-argo"


@pytest.fixture(scope="module")
def s3():
    with local_s3_server() as endpoint:
        create_bucket(endpoint, BUCKET)
        yield endpoint


def _render(tmp_path, s3, deploy: dict) -> dict:
    env = flow_env(tmp_path, **s3_env(s3),
                   METAFLOW_DEFAULT_DATASTORE="s3",
                   METAFLOW_DATASTORE_SYSROOT_S3=f"s3://{BUCKET}/metaflow",
                   METAFLOW_KUBERNETES_NAMESPACE="rtdmd",
                   MLFLOW_TRACKING_URI="http://mlflow.rtdmd.svc:5000",
                   RTDMD_ARTIFACT_ROOT=f"s3://{BUCKET}/artifacts")
    res = run_flow(["argo-workflows", "create", "--only-json"], env, timeout=300,
                   top=["--config-value", "deploy", json.dumps(deploy)], log=tmp_path / "argo.log")
    assert_ok(res, "argo-workflows create --only-json")
    text = res.stdout[res.stdout.index("{"):]
    return json.loads(text)


def _jobset(template: dict) -> dict:
    manifest = template["resource"]["manifest"]
    # Argo expressions such as `replicas: {{=asInt(...)}}` are not YAML scalars: quote them
    manifest = re.sub(r"(:\s*)(\{\{[^\n]*?\}\})\s*$", lambda m: m.group(1) + json.dumps(m.group(2)), manifest, flags=re.M)
    return yaml.safe_load(manifest)


def _steps(wf: dict) -> dict[str, dict]:
    """step name -> {"kind": container|jobset, "pods": [pod specs], "retry": limit, "replicas": {...}}"""
    out = {}
    for t in wf["spec"]["templates"]:
        if "container" in t:
            spec = {"containers": [t["container"]], "volumes": t.get("volumes", [])}
            out[t["name"]] = {"kind": "container", "pods": [spec], "retry": (t.get("retryStrategy") or {}).get("limit"),
                              "replicas": {}}
        elif "resource" in t:
            js = _jobset(t)
            pods, replicas = [], {}
            for rj in js["spec"]["replicatedJobs"]:
                pods.append(rj["template"]["spec"]["template"]["spec"])
                replicas[rj["name"]] = rj["replicas"]
            out[t["name"]] = {"kind": "jobset", "pods": pods, "retry": (t.get("retryStrategy") or {}).get("limit"),
                              "replicas": replicas}
    return out


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _shm_mib(pod: dict) -> int | None:
    for v in pod.get("volumes") or []:
        ed = v.get("emptyDir") or {}
        if ed.get("medium") == "Memory":
            return int(str(ed["sizeLimit"]).rstrip("Mi"))
    return None


def _check_stage(step: dict, res, image: str, nodes: int) -> None:
    for pod in step["pods"]:
        c = pod["containers"][0]
        assert c["image"] == image
        gpus = (c["resources"].get("limits") or {}).get("nvidia.com/gpu")
        assert int(gpus) == res.gpus_per_node, f"GPU limit {gpus} != {res.gpus_per_node}"
        req = c["resources"]["requests"]
        assert int(req["cpu"]) == res.cpu
        assert req["memory"] == f"{res.memory_gb * 1024}M"
        assert _shm_mib(pod) == res.shared_memory_gb * 1024, "/dev/shm must be a memory emptyDir of the params size"
        assert any(m["mountPath"] == "/dev/shm" for m in c.get("volumeMounts", []))
        env = _env(c)
        assert env["RTDMD_STAGE_NODES"] == str(nodes)
        assert env["RTDMD_NPROC_PER_NODE"] == str(res.gpus_per_node)
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.rtdmd.svc:5000"
        assert env["RTDMD_ARTIFACT_ROOT"] == f"s3://{BUCKET}/artifacts"
    assert step["retry"] is not None and int(step["retry"]) == res.retries


@pytest.mark.parametrize("backbone,deploy_overrides", [("flux2_4b", []), ("sd35m", ["compute.rl.nodes=4"])])
def test_kubernetes_profile_renders_resources_from_params(tmp_path, s3, backbone, deploy_overrides):
    deploy = {"profile": "kubernetes", "backbone": backbone, "overrides": deploy_overrides}
    wf = _render(tmp_path, s3, deploy)
    params = load_params(backbone, deploy_overrides)
    image = params.compute.image
    steps = _steps(wf)
    assert {"start", "prep", "cold-start", "rl", "eval-variant", "register", "end"} <= set(steps), sorted(steps)

    # training steps: JobSets (one control + nodes-1 workers) running torchrun, GPUs from params
    for step_name, stage in (("cold-start", "cold_start"), ("rl", "rl")):
        res = getattr(params.compute, stage)
        st = steps[step_name]
        assert st["kind"] == "jobset", f"{step_name} must be a multi-node JobSet (@torchrun)"
        assert st["replicas"]["control"] == 1
        assert "workerCount" in str(st["replicas"]["worker"])  # nodes - 1, from num_parallel at run time
        _check_stage(st, res, image, res.nodes)
        for pod in st["pods"]:
            env = _env(pod["containers"][0])
            assert env.get("MF_MASTER_PORT") == "3339"  # @kubernetes(port=...) matches @torchrun's master_port

    # evaluation: one pod per variant with the eval resources
    ev = steps["eval-variant"]
    assert ev["kind"] == "container"
    _check_stage(ev, params.compute.eval, image, 1)

    # light steps: same image, no GPU
    for name in ("start", "prep", "register", "end"):
        c = steps[name]["pods"][0]["containers"][0]
        assert c["image"] == image
        assert "nvidia.com/gpu" not in (c["resources"].get("limits") or {})

    # the node counts the flow passes as num_parallel at run time come from the same plan
    from rtdmd.pipeline.profiles import parse_deploy_config, stage_plans

    plans = stage_plans(parse_deploy_config(deploy))
    assert plans["rl"].nodes == params.compute.rl.nodes
    assert plans["cold_start"].nodes == params.compute.cold_start.nodes
    if backbone == "flux2_4b":  # spec §10: stage 2 on 2 nodes x 8 GPUs, stage 1 on 1 x 8
        assert (plans["rl"].nodes, plans["rl"].nproc_per_node) == (2, 8)
        assert (plans["cold_start"].nodes, plans["cold_start"].nproc_per_node) == (1, 8)
    else:
        assert plans["rl"].nodes == 4


def test_local_profile_has_no_kubernetes_decorators(tmp_path):
    """The embedded default: @parallel training steps (one node), @retry from params, nothing remote."""
    env = flow_env(tmp_path)
    res = run_flow(["show"], env, timeout=120)
    assert_ok(res, "show")
    text = res.stdout + res.stderr
    assert "@kubernetes" not in text and "@torchrun" not in text
    assert text.count("@parallel") == 2
