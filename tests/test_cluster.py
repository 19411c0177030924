"""cluster/: launcher YAMLs against the schema inside the installed Ray, KubeRay manifests against the
repository (entrypoints, configs, versions) and Ray's own Serve / Serve LLM models."""

import json
import re
import shlex
from importlib.metadata import requires
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from sasft_ray.config import load_config

ROOT = Path(__file__).parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
# Ray's LLM image for the installed Ray: rayproject/ray-llm:<ray version>-py3XX-cuXXX
IMAGE = re.compile(rf"rayproject/ray-llm:{re.escape(ray.__version__)}-py3\d+-cu\d+")


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _images(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k in ("image", "head_image", "worker_image")] + [
            i for v in node.values() for i in _images(v)]
    return [i for v in node for i in _images(v)] if isinstance(node, list) else []


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_matches_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = _load(name)
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # what `ray up` runs: provider defaults merged, then checked


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_keeps_work_off_the_head_and_scales_gpu_nodes(name):
    config = _load(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    assert "--num-cpus=0" in " ".join(config["head_start_ray_commands"])
    gpu = {k: v for k, v in types.items() if v["resources"].get("GPU")}
    assert {v["resources"]["GPU"] for v in gpu.values()} >= {1, 8}  # 8-GPU training nodes, 1-GPU serving
    for t in gpu.values():
        assert 0 == t["min_workers"] < t["max_workers"]  # scale from zero
    assert sum(t["max_workers"] for t in gpu.values()) <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0
    assert IMAGE.fullmatch(config["docker"]["image"])
    assert any("pip install" in c and "sasft-ray" in c for c in config["setup_commands"])


def test_no_secret_is_written_in_cluster_files():
    for path in CLUSTER.rglob("*.yaml"):
        text = path.read_text()
        assert not re.search(r"hf_[A-Za-z0-9]{20,}", text), path
        for doc in yaml.safe_load_all(text):
            for env in _env_entries(doc):
                if env["name"] in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], path


def _env_entries(node):
    if isinstance(node, dict):
        yield from (e for e in node.get("env", []) if isinstance(e, dict))
        for v in node.values():
            yield from _env_entries(v)
    elif isinstance(node, list):
        for v in node:
            yield from _env_entries(v)


@pytest.mark.parametrize("name, kind", [("kuberay/rayjob.yaml", "RayJob"), ("kuberay/rayservice.yaml", "RayService")])
def test_kuberay_manifest_matches_installed_ray(name, kind):
    doc = _load(name)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", kind)
    assert doc["metadata"]["name"]
    cluster = doc["spec"]["rayClusterSpec" if kind == "RayJob" else "rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    images = _images(doc)
    assert images and all(IMAGE.fullmatch(i) for i in images), images
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1


def _job_config(job: dict):
    argv = shlex.split(job["spec"]["entrypoint"])
    return load_config(str(ROOT / argv[argv.index("--config") + 1]))


def _job_gpus(doc) -> int:
    return sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               * g["maxReplicas"] for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"])


def test_rayjob_runs_the_pipeline_from_files_in_the_repo():
    doc = _load("kuberay/rayjob.yaml")
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/run.py"]
    assert (ROOT / argv[1]).is_file(), f"{argv[1]} is missing"  # fails until jobs/run.py is written, on purpose
    cfg = _job_config(job=doc)
    assert cfg.resources.use_gpu and cfg.resources.address == "auto"

    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["working_dir"].startswith(("https://", "s3://", "gs://"))  # a pod has no local checkout
    for requirement in env["pip"]["packages"]:
        assert requirement in requires("sasft-ray"), f"{requirement} is not pinned like pyproject.toml"

    # The cluster holds what the config asks for: the training workers, and all self-talk engines at once.
    engines = cfg.selftalk.engine.concurrency * cfg.selftalk.engine.tensor_parallel_size
    assert _job_gpus(doc) >= max(cfg.train.num_workers * cfg.train.gpus_per_worker, engines)


def test_rayservice_is_a_valid_ray_serve_llm_app_over_the_jobs_export():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.llm import LLMServingArgs
    from ray.serve.schema import ServeDeploySchema

    doc = _load("kuberay/rayservice.yaml")
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve)
    (app,) = serve["applications"]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    args = LLMServingArgs.model_validate(app["args"])
    assert doc["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True

    # The models and engines of the RayJob's config: the base model and the run's export, <run_dir>/model,
    # under the model ids the evaluation asks for.
    cfg = _job_config(_load("kuberay/rayjob.yaml"))
    source = {c.model_loading_config.model_id: c.model_loading_config.model_source for c in args.llm_configs}
    assert source.keys() == {cfg.serve.model_id, cfg.serve.base_model_id}
    assert source[cfg.serve.base_model_id] == cfg.model.path
    assert source[cfg.serve.model_id].bucket_uri == f"{cfg.run_dir}/model"
    eng = cfg.serve.engine
    for c in args.llm_configs:
        AutoscalingConfig(**c.deployment_config["autoscaling_config"])
        kw = c.engine_kwargs
        assert (kw["max_model_len"], kw["max_num_seqs"], kw["tensor_parallel_size"]) == (
            eng.max_model_len, eng.max_num_seqs, eng.tensor_parallel_size)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_nodes_authenticate_and_keep_the_dashboard_private(name):
    """Ray's token authentication on every node, the token and HF_TOKEN from the cloud's secret store (none
    written in the file), the dashboard bound to the head's loopback (reached through `ray dashboard`)."""
    config = _load(name)
    cloud = name.removesuffix(".yaml")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(config[key])
        assert "RAY_AUTH_MODE=token" in start, key
        for secret in ("sasft-ray-token", "sasft-hf-token"):
            assert f"python -m sasft_ray.secret_store --cloud {cloud} {secret}" in start, key
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert "0.0.0.0" not in (CLUSTER / name).read_text()
    assert "hf_" not in (CLUSTER / name).read_text()  # no token pasted in


def test_the_secret_store_reader_gets_a_secret_from_aws_stand_in_for_aws(bucket, capsys):
    """What the cluster's start commands run, against a moto stand-in for AWS Secrets Manager."""
    import boto3

    from sasft_ray.secret_store import main

    boto3.client("secretsmanager").create_secret(Name="sasft-ray-token", SecretString="s3cr3t-token")
    assert main(["--cloud", "aws", "sasft-ray-token"]) == 0
    assert capsys.readouterr().out == "s3cr3t-token\n"
    assert main(["--cloud", "aws", "absent"]) == 1
    assert "secret 'absent' from the aws secret store: ResourceNotFoundException" in capsys.readouterr().err


@pytest.mark.parametrize("name, spec", [("kuberay/rayjob.yaml", "rayClusterSpec"),
                                        ("kuberay/rayservice.yaml", "rayClusterConfig")])
def test_kuberay_clusters_use_token_auth_and_secrets(name, spec):
    manifest = _load(name)
    assert manifest["spec"][spec]["authOptions"] == {"mode": "token"}
    text = (CLUSTER / name).read_text()
    assert "hf_" not in text.replace("hf_token", "").replace("hf-token", "")  # HF_TOKEN only from the Secret
