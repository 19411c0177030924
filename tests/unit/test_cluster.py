"""cluster/: launcher YAMLs against the schema inside the installed Ray, KubeRay manifests against the
repository (entrypoints, configs, versions) and Ray's own Serve / Serve LLM models."""

import json
import re
import shlex
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from sasft_ray.config import load_config

ROOT = Path(__file__).parents[2]
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
    return load_config(argv[argv.index("--config") + 1])


def _job_gpus(doc) -> int:
    return sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               * g["maxReplicas"] for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"])


def test_rayjob_runs_the_pipeline_from_files_in_the_repo():
    doc = _load("kuberay/rayjob.yaml")
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "jobs/job.py", "run"] and (ROOT / argv[1]).is_file()
    cfg = _job_config(job=doc)
    assert cfg.resources.use_gpu and cfg.resources.address == "auto"

    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["working_dir"].startswith(("https://", "s3://", "gs://"))  # a pod has no local checkout

    # The cluster holds what the config asks for: the training workers, and all self-talk engines at once.
    engines = cfg.selftalk.engine.concurrency * cfg.selftalk.engine.tensor_parallel_size
    assert _job_gpus(doc) >= max(cfg.train.num_workers * cfg.train.gpus_per_worker, engines)


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


@pytest.mark.parametrize("name, spec", [("kuberay/rayjob.yaml", "rayClusterSpec"),
                                        ("kuberay/rayservice.yaml", "rayClusterConfig")])
def test_kuberay_clusters_use_token_auth_and_secrets(name, spec):
    manifest = _load(name)
    assert manifest["spec"][spec]["authOptions"] == {"mode": "token"}
    text = (CLUSTER / name).read_text()
    assert "hf_" not in text.replace("hf_token", "").replace("hf-token", "")  # HF_TOKEN only from the Secret


# --- Identity, placement and the network of multi-node NCCL on each cloud --------------------------------

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
EFA_NICS = {"p5.48xlarge": 32}  # EFA interfaces (one per network card) of the training instance types


def _training_type(config: dict) -> tuple[str, dict]:
    """The node type of 8-GPU training nodes (exactly one)."""
    (pair,) = [(k, v) for k, v in config["available_node_types"].items() if v["resources"].get("GPU") == 8]
    return pair


def _docker_run_options(config: dict, node_type: str) -> list[str]:
    """The `docker run` options a worker of this type starts with: Ray's node-specific docker config over the
    global one, then run_options + worker_run_options (ray.autoscaler: _get_node_specific_docker_config and
    DockerCommandRunner.run_init)."""
    docker = {**config["docker"], **config["available_node_types"][node_type].get("docker", {})}
    return docker.get("run_options", []) + docker.get("worker_run_options", [])


def _docker_env(options: list[str]) -> dict[str, str]:
    words = shlex.split(" ".join(options))
    pairs = [words[i + 1] for i, w in enumerate(words) if w in ("--env", "-e")]
    pairs += [w.split("=", 1)[1] for w in words if w.startswith("--env=")]
    return dict(p.split("=", 1) for p in pairs)


def _nccl_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(("FI_", "NCCL_"))}


def test_gcp_every_node_type_has_a_service_account_with_the_cloud_platform_scope():
    """Ray's GCP launcher attaches an account to the head only: a worker without one cannot write the gs://
    run_dir or read its secrets. The head keeps Ray's autoscaler account, the workers share their own."""
    # Ray's default account id, read from its source (importing it needs Google's client libraries).
    source = (Path(ray.autoscaler.__file__).parent / "_private" / "gcp" / "config.py").read_text()
    assert {'RAY = "ray-autoscaler"', 'VERSION = "v1"', 'DEFAULT_SERVICE_ACCOUNT_ID = RAY + "-sa-" + VERSION'} <= {
        line.strip() for line in source.splitlines()}
    ray_account = "ray-autoscaler-sa-v1"
    config = _load("gcp.yaml")
    project = config["provider"]["project_id"]
    emails = {}
    for name, node_type in config["available_node_types"].items():
        (account,) = node_type["node_config"]["serviceAccounts"]
        assert account["scopes"] == [CLOUD_PLATFORM], name
        assert re.fullmatch(rf"[a-z][a-z0-9-]{{4,28}}[a-z0-9]@{re.escape(project)}\.iam\.gserviceaccount\.com",
                            account["email"]), (name, account["email"])
        emails[name] = account["email"]
    head = emails.pop(config["head_node_type"])
    assert head.split("@")[0] == ray_account  # the account `ray up` grants compute rights
    assert len(set(emails.values())) == 1 and head not in emails.values()  # workers: one account, not the head's


def test_aws_every_node_type_has_an_instance_profile():
    """The head's profile carries the autoscaler's rights (so Ray makes no ray-head-v1 role of its own); every
    worker type carries the bucket's and the secrets' profile, which is not the head's."""
    from ray.autoscaler._private.aws.config import _configure_iam_role
    from ray.autoscaler._private.util import prepare_config

    config = _load("aws.yaml")
    arn = re.compile(r"arn:aws:iam::(ACCOUNT|\d{12}):instance-profile/[\w+=,.@-]+")
    profiles = {}
    for name, node_type in config["available_node_types"].items():
        profiles[name] = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        assert arn.fullmatch(profiles[name]), (name, profiles[name])
    head = profiles.pop(config["head_node_type"])
    assert len(set(profiles.values())) == 1 and head not in profiles.values()
    # What `ray up` does with a head profile in the file: keeps it, creates and attaches nothing (no AWS call).
    bootstrapped = _configure_iam_role(prepare_config(config) | {"head_node": {}})
    assert bootstrapped["head_node"] == {}


def test_aws_lists_exactly_one_availability_zone():
    """p5 capacity is zonal and a cluster placement group cannot span zones."""
    provider = _load("aws.yaml")["provider"]
    zones = [z.strip() for z in provider["availability_zone"].split(",")]
    assert len(zones) == 1 and re.fullmatch(rf"{re.escape(provider['region'])}[a-z]", zones[0]), zones


def test_aws_training_nodes_sit_in_a_cluster_placement_group_on_every_efa_interface():
    from ray.autoscaler._private.aws.config import _configure_node_type_from_network_interface

    config = _load("aws.yaml")
    name, node_type = _training_type(config)
    node = node_type["node_config"]
    group = node["Placement"]["GroupName"]
    assert f"create-placement-group --group-name {group} --strategy cluster" in (CLUSTER / "aws.yaml").read_text()

    interfaces = node["NetworkInterfaces"]
    assert len(interfaces) == EFA_NICS[node["InstanceType"]]
    assert sorted(i["NetworkCardIndex"] for i in interfaces) == list(range(len(interfaces)))  # one per card
    primary, *others = sorted(interfaces, key=lambda i: i["NetworkCardIndex"])
    assert (primary["DeviceIndex"], primary["InterfaceType"]) == (0, "efa")  # EFA with ENA: the node's IP
    assert all((i["DeviceIndex"], i["InterfaceType"]) == (1, "efa-only") for i in others)
    # The subnet and security groups go in each interface, never beside them; Ray copies them up.
    assert all(i["SubnetId"].startswith("subnet-") and i["Groups"] for i in interfaces)
    assert not {"SubnetId", "SubnetIds", "SecurityGroupIds"} & node.keys()
    lifted = _configure_node_type_from_network_interface(node_type)["node_config"]
    assert set(lifted["SubnetIds"]) == {primary["SubnetId"]}
    # Every node type in the interfaces' security group: Ray's own group would admit only itself, and the
    # EFA nodes could not reach the head.
    for other, t in config["available_node_types"].items():
        if other != name:
            assert set(t["node_config"]["SecurityGroupIds"]) == set(lifted["SecurityGroupIds"]), other


def test_aws_only_the_efa_nodes_start_their_container_with_the_efa_devices():
    """What reaches `docker run` (Ray's own command builder): the EFA devices, memory pinning and a large
    /dev/shm on the training nodes; no /dev/infiniband elsewhere (docker fails on a host without it)."""
    from ray.autoscaler._private.docker import docker_start_cmds

    config = _load("aws.yaml")
    training, _ = _training_type(config)
    for name in config["available_node_types"]:
        if name == config["head_node_type"]:
            continue
        options = _docker_run_options(config, name)
        command = docker_start_cmds("ubuntu", config["docker"]["image"], {}, "ray_container", options,
                                    config["cluster_name"], "/home/ray", "docker")
        words = shlex.split(command)
        flags = {f"{w} {words[i + 1]}" for i, w in enumerate(words[:-1])} | set(words)
        if name != training:
            assert "/dev/infiniband" not in command, name
            continue
        assert "--device /dev/infiniband" in flags
        # checkpoint shards are staged in TMPDIR: on the instance NVMe, not the root volume
        assert "--env TMPDIR=/mnt/nvme/tmp" in flags and "-v /opt/dlami/nvme:/mnt/nvme" in flags
        assert "--cap-add IPC_LOCK" in flags
        assert "--ulimit memlock=-1:-1" in flags or "--ulimit memlock=-1" in flags
        shm = [w for w in words if w.startswith("--shm-size=")]
        assert len(shm) == 1 and re.fullmatch(r"--shm-size=(\d+)g", shm[0]) and int(shm[0][11:-1]) >= 64
        assert "--net=host" in words  # Ray's default: EFA and NCCL's bootstrap see the host's interfaces


def _kuberay_training_container(doc: dict) -> dict:
    (group,) = [g for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                if int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == 8]
    return group


def test_the_nccl_efa_environment_reaches_the_containers():
    """The same libfabric / NCCL variables in the p5 containers of the launcher and in the KubeRay training
    pods, with the values that select EFA."""
    config = _load("aws.yaml")
    training, _ = _training_type(config)
    aws = _nccl_env(_docker_env(_docker_run_options(config, training)))
    assert aws["FI_PROVIDER"] == "efa"
    assert aws["FI_EFA_USE_DEVICE_RDMA"] == "1"
    excluded = aws["NCCL_SOCKET_IFNAME"]
    assert excluded.startswith("^") and {"lo", "docker"} <= set(excluded[1:].split(","))
    for name in config["available_node_types"]:  # nodes without EFA get none of it
        if name != training:
            assert "FI_PROVIDER" not in _docker_env(_docker_run_options(config, name)), name

    pod = _kuberay_training_container(_load("kuberay/rayjob.yaml"))["template"]["spec"]["containers"][0]
    kuberay = _nccl_env({e["name"]: e["value"] for e in pod["env"] if "value" in e})
    assert kuberay == aws


def test_gcp_training_nodes_have_a_compact_placement_policy():
    config = _load("gcp.yaml")
    provider = config["provider"]
    _, node_type = _training_type(config)
    node = node_type["node_config"]
    (policy,) = node["resourcePolicies"]
    link = re.fullmatch(rf"(https://www\.googleapis\.com/compute/v1/)?projects/{re.escape(provider['project_id'])}"
                        rf"/regions/(?P<region>[a-z0-9-]+)/resourcePolicies/(?P<name>[a-z][a-z0-9-]*)", policy)
    assert link and link["region"] == provider["region"], policy
    assert provider["availability_zone"].startswith(f"{provider['region']}-")
    text = (CLUSTER / "gcp.yaml").read_text()
    command = rf"group-placement {link['name']} \\\s*#?\s*--collocation=collocated --region={provider['region']}"
    assert re.search(command, text), "the one-time command that creates the compact policy"
    # The API's Scheduling object (a mapping): GPU VMs, and compact placement, want no live migration.
    for name, t in config["available_node_types"].items():
        if t["resources"].get("GPU"):
            assert t["node_config"]["scheduling"] == {"onHostMaintenance": "TERMINATE"}, name


def test_kuberay_training_workers_request_efa_and_may_pin_memory():
    group = _kuberay_training_container(_load("kuberay/rayjob.yaml"))
    spec = group["template"]["spec"]
    container = spec["containers"][0]
    resources = container["resources"]
    # An extended resource: requests must equal limits; 32 is every EFA of a p5.48xlarge.
    assert resources["requests"]["vpc.amazonaws.com/efa"] == resources["limits"]["vpc.amazonaws.com/efa"]
    assert int(resources["limits"]["vpc.amazonaws.com/efa"]) == EFA_NICS["p5.48xlarge"]
    assert "IPC_LOCK" in container["securityContext"]["capabilities"]["add"]
    shm = {v["name"]: v for v in spec["volumes"]}[
        {m["mountPath"]: m["name"] for m in container["volumeMounts"]}["/dev/shm"]]
    assert shm["emptyDir"]["medium"] == "Memory"
    # The 1-GPU serving replicas need no NCCL between nodes: they do not tie themselves to EFA nodes.
    for g in _load("kuberay/rayservice.yaml")["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        assert "vpc.amazonaws.com/efa" not in g["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_gcp_training_nodes_put_scratch_on_their_local_ssds():
    """TMPDIR (and with it Ray's temp dir, where ranks stage checkpoint shards) on the a3 nodes' local NVMe
    SSDs, assembled into one volume at /mnt/nvme before Docker starts, not on the boot disk."""
    config = _load("gcp.yaml")
    training, node = _training_type(config)
    options = _docker_run_options(config, training)
    assert _docker_env(options)["TMPDIR"] == "/mnt/nvme/tmp" and "-v /mnt/nvme:/mnt/nvme" in options
    init = " ".join(node["initialization_commands"])
    assert "/dev/disk/by-id/google-local-nvme-ssd-" in init and "mount /dev/md0 /mnt/nvme" in init
    assert "mkdir -p /mnt/nvme/tmp" in init


@pytest.mark.parametrize("name", ["kuberay/rayjob.yaml", "kuberay/rayservice.yaml"])
def test_kuberay_gpu_pods_put_scratch_on_a_sized_volume_they_request(name):
    """TMPDIR on an emptyDir of a set size (not the container's writable layer), which the pod requests as
    ephemeral storage, so that it lands on a node that has the room."""
    spec = _load(name)["spec"]
    for group in (spec.get("rayClusterSpec") or spec["rayClusterConfig"])["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        tmpdir = {e["name"]: e.get("value") for e in container["env"]}["TMPDIR"]
        volume = {v["name"]: v for v in pod["volumes"]}[
            {m["mountPath"]: m["name"] for m in container["volumeMounts"]}[tmpdir]]
        assert volume["emptyDir"]["sizeLimit"] == container["resources"]["requests"]["ephemeral-storage"]


# Imported by features a run turns on, and installed with them: the tracking extra (train.report_to), the
# cloud clients of the secret store (aws.yaml's setup installs boto3)
OPTIONAL_IMPORTS = {"mlflow", "wandb", "tensorboardX", "boto3"}


def _imports(package: Path) -> set[str]:
    """The top-level third-party modules a package's files import."""
    import ast

    found = set()
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"__future__", package.name}


def _installed_with(requirements: list[str]) -> set[str]:
    """Every distribution (canonical names) these requirements install, walked through the metadata of
    what is installed here (a distribution missing here, vLLM's GPU build, ends its branch)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import requires as requires_of

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    names, seen, todo = set(), set(), list(requirements)
    while todo:
        req = Requirement(todo.pop())
        name, extras = canonicalize_name(req.name), frozenset(req.extras)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        names.add(name)
        try:
            deps = requires_of(name) or []
        except PackageNotFoundError:
            continue
        for dep in map(Requirement, deps):
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append(str(dep))
    return names


def test_the_rayjob_installs_every_library_the_stages_import():
    """The RayJob's runtime env installs this repository with its GPU extra over Ray's LLM image, so every
    module the library imports is there: the evaluation's rouge_score and lm-eval, the report's matplotlib,
    training's DeepSpeed and peft (it used to install DeepSpeed alone)."""
    from importlib.metadata import packages_distributions

    from packaging.utils import canonicalize_name

    env = yaml.safe_load(_load("kuberay/rayjob.yaml")["spec"]["runtimeEnvYAML"])
    # the working dir, unpacked on the node, is this repository: sasft-ray's own requirements
    packages = [r.replace("${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}", "sasft-ray") for r in env["pip"]["packages"]]
    image = ["ray[llm]==2.60.0"]  # rayproject/ray-llm:2.60.0 (ray[llm] brings vLLM's GPU build)
    there = _installed_with(packages + image)
    dists = packages_distributions()
    missing = {m for m in _imports(ROOT / "sasft_ray") - OPTIONAL_IMPORTS
               if canonicalize_name(m) not in there and not {canonicalize_name(d) for d in dists.get(m, [])} & there}
    assert not missing, f"the RayJob's image and runtime env lack {sorted(missing)}"
