"""cluster/ against Ray's own models: the RayService's Serve LLM app, the AWS network bootstrap, the secret
store reader (the launchers and manifests against the repository are in tests/unit/test_cluster.py)."""

import yaml

from tests.unit.test_cluster import CLUSTER, _job_config, _load


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


def test_the_secret_store_reader_gets_a_secret_from_aws_stand_in_for_aws(bucket, capsys):
    """What the cluster's start commands run, against a moto stand-in for AWS Secrets Manager."""
    import boto3

    from sasft_ray.secret_store import main

    boto3.client("secretsmanager").create_secret(Name="sasft-ray-token", SecretString="s3cr3t-token")
    assert main(["--cloud", "aws", "sasft-ray-token"]) == 0
    assert capsys.readouterr().out == "s3cr3t-token\n"
    assert main(["--cloud", "aws", "absent"]) == 1
    assert "secret 'absent' from the aws secret store: ResourceNotFoundException" in capsys.readouterr().err


def test_ray_bootstraps_the_aws_network_layout(bucket):
    """Ray's own AWS bootstrap steps for subnets and security groups, against a moto stand-in for EC2: the
    EFA interfaces' subnet in the one zone, every node type in the file's security group, none created."""
    import boto3
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.aws.utils import client_cache, resource_cache
    from ray.autoscaler._private.util import prepare_config

    provider = _load("aws.yaml")["provider"]
    ec2 = boto3.client("ec2", region_name=provider["region"])
    vpc = ec2.create_vpc(CidrBlock="10.7.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.7.1.0/24",
                               AvailabilityZone=provider["availability_zone"])["Subnet"]["SubnetId"]
    ec2.modify_subnet_attribute(SubnetId=subnet, MapPublicIpOnLaunch={"Value": True})  # Ray requires it
    group = ec2.create_security_group(GroupName="sasft-ray", Description="sasft", VpcId=vpc)["GroupId"]
    text = (CLUSTER / "aws.yaml").read_text().replace("subnet-YOUR-SUBNET", subnet).replace("sg-YOUR-GROUP", group)

    resource_cache.cache_clear(), client_cache.cache_clear()  # Ray's boto3 caches, on the moto endpoint
    try:
        config = aws_config._configure_from_network_interfaces(prepare_config(yaml.safe_load(text)))
        config = aws_config._configure_security_group(aws_config._configure_subnet(config))
    finally:
        resource_cache.cache_clear(), client_cache.cache_clear()
    for name, node_type in config["available_node_types"].items():
        assert set(node_type["node_config"]["SubnetIds"]) == {subnet}, name
        assert set(node_type["node_config"]["SecurityGroupIds"]) == {group}, name
    created = ec2.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["SecurityGroups"]
    assert {g["GroupId"] for g in created if g["GroupName"] != "default"} == {group}
