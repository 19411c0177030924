"""The vLLM engines' settings and the GPU objects built from them, without a GPU and without Ray running:
`engine.vllm` checked against vLLM's own argument classes, the Ray Data / Ray Serve / Ray Train resource
requests of every GPU config in sasft_ray/configs/cluster/ against `sasft plan`'s figures, readiness as health."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sasft_ray.config import ConfigError, load_config
from tests.conftest import make_config

CONFIGS = sorted((Path(__file__).parents[2] / "sasft_ray" / "configs" / "cluster").glob("*.yaml"))


def _engine(tmp_path, **engine):
    return make_config(tmp_path, selftalk={"engine": engine}).selftalk.engine


def test_vllm_arguments_pass_through_checked_against_vllms_own_classes(tmp_path):
    from sasft_ray.engines import engine_kwargs

    cfg = make_config(tmp_path, selftalk={"engine": {"vllm": {"gpu_memory_utilization": 0.85,
                                                              "max_num_batched_tokens": 4096}}},
                      serve={"engine": {"vllm": {"tool_call_parser": "llama3_json", "enable_auto_tool_choice": True,
                                                 "enable_prefix_caching": False}}})
    selftalk = engine_kwargs(cfg, cfg.selftalk.engine, enable_prefix_caching=True)
    assert selftalk["gpu_memory_utilization"] == 0.85 and selftalk["max_num_batched_tokens"] == 4096
    served = engine_kwargs(cfg, cfg.serve.engine, serving=True)
    assert served["tool_call_parser"] == "llama3_json" and served["enable_prefix_caching"] is False
    # the OpenAI server's own arguments reach only the server, never the offline self-talk engine
    assert "tool_call_parser" not in engine_kwargs(cfg, cfg.serve.engine)


@pytest.mark.parametrize("vllm, message", [
    ({"gpu_memory_utilisation": 0.9}, r"vllm.gpu_memory_utilisation: not an argument .*'gpu_memory_utilization'"),
    ({"max_num_batched_tokens": "lots"}, r"vllm.max_num_batched_tokens: 'lots' is not what vLLM takes"),
    ({"kv_cache_dtype": "fp9"}, r"vllm.kv_cache_dtype: 'fp9' is not what vLLM takes"),
    ({"max_model_len": 8192}, r"vllm.max_model_len: set engine.max_model_len instead"),
    ({"tensor_parallel_size": 2}, r"set engine.tensor_parallel_size instead"),
])
def test_a_wrong_vllm_argument_is_a_config_error_naming_it(tmp_path, vllm, message):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"run_dir": str(tmp_path / "run"), "model": {"path": "m"}, "data": {"path": "d"},
                                "serve": {"engine": {"vllm": vllm}}}))
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


def test_the_suite_runs_the_vllm_release_of_rays_llm_stack_and_refuses_a_key_of_a_later_one(tmp_path):
    """The `gpu` extra (ray[llm]) installs the vLLM release Ray's LLM stack pins, the `cpu` extra that release's
    CPU build: `engine.vllm` is checked here against what a GPU runs, so a key added later (in 0.32) is refused."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from vllm import __version__ as release

    pinned = [r for r in map(Requirement, requires("ray")) if r.name == "vllm" and r.marker.evaluate({"extra": "llm"})]
    assert pinned and pinned[0].specifier.contains(release), (release, str(pinned))
    with pytest.raises(ConfigError, match=rf"vllm.max_num_active_seqs: not an argument of vLLM {release}'s engine"):
        make_config(tmp_path, selftalk={"engine": {"vllm": {"max_num_active_seqs": 64}}})


def test_the_log_config_file_reaches_every_engine_through_its_environment_on_any_vllm_release(tmp_path):
    """`log_config_file` is an OpenAI-server argument in vLLM 0.29 and an engine argument from 0.32: it goes to
    the engine process's VLLM_LOGGING_CONFIG_PATH, which both read, never to the arguments of either class."""
    from sasft_ray.engines import engine_env, engine_kwargs

    vllm = {"vllm": {"log_config_file": str(tmp_path / "logging.json")}}
    cfg = make_config(tmp_path, selftalk={"engine": vllm}, serve={"engine": vllm})
    for eng, serving in ((cfg.selftalk.engine, False), (cfg.serve.engine, True)):
        assert engine_env(cfg, eng)["VLLM_LOGGING_CONFIG_PATH"] == str(tmp_path / "logging.json")
        assert "log_config_file" not in engine_kwargs(cfg, eng, serving=serving)


def test_cpu_engines_get_a_cpu_bundle_and_gpu_engines_one_node_of_their_type(tmp_path):
    from sasft_ray.engines import engine_placement, engine_resources

    cpu = make_config(tmp_path, selftalk={"engine": {"cpus_per_engine": 2}}, serve={"engine": {"cpus_per_engine": 3}})
    assert engine_resources(cpu, cpu.selftalk.engine) == {"num_cpus": 2}
    assert engine_placement(cpu, cpu.serve.engine) == {"placement_group_config": {"bundles": [{"CPU": 3}]}}
    gpu = make_config(tmp_path, resources={"use_gpu": True, "accelerator_type": "H100"},
                      selftalk={"engine": {"tensor_parallel_size": 4}},
                      serve={"engine": {"accelerator_type": "L40S"}})
    assert engine_resources(gpu, gpu.selftalk.engine) == {"num_gpus": 4, "accelerator_type": "H100"}
    assert engine_placement(gpu, gpu.serve.engine) == {
        "placement_group_config": {"bundle_per_worker": {"GPU": 1}, "strategy": "STRICT_PACK"},
        "accelerator_type": "L40S"}


def test_cpu_engines_share_the_machines_cores_unless_told_or_on_a_cluster(tmp_path, monkeypatch):
    """A self-talk engine alone on 16 cores decodes on 16 threads, not 1; three served models share them."""
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = make_config(tmp_path, compare=["sft"], selftalk={"engine": {"concurrency": 2}})
    assert (cfg.engine_cpus(serving=False), cfg.engine_cpus(serving=True)) == (8, 5)  # 2 engines; 3 models
    assert make_config(tmp_path, selftalk={"engine": {"cpus_per_engine": 1.5}}).engine_cpus(serving=False) == 1.5
    # WiSE-FT's models are served too: 2 fine-tunes x (themselves and 2 αs) and the base model, 7 engines
    interpolated = make_config(tmp_path, compare=["sft"], export={"interpolate": [0.25, 0.5]})
    assert (interpolated.served_engines, interpolated.engine_cpus(serving=True)) == (7, 2)
    # an endpoint of fewer models (an evaluation wave of eval.models_at_once) gives each a larger share
    from sasft_ray.serve import Models, app_args

    wave = app_args(interpolated, Models({"finetuned": "/m/ft", "base": "/m/base"}))["llm_configs"]
    assert [c["placement_group_config"]["bundles"] for c in wave] == [[{"CPU": 8}], [{"CPU": 8}]]
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert cfg.engine_cpus(serving=True) == 1  # never below one
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # a cluster: its nodes, not this machine, have the cores
    assert cfg.engine_cpus(serving=False) == 1


@pytest.mark.parametrize("path", [p for p in CONFIGS if load_config(str(p)).resources.use_gpu], ids=lambda p: p.stem)
def test_the_gpu_objects_of_each_cluster_config_ask_for_what_the_plan_counts(path):
    """What the GPU path hands Ray and vLLM, built on CPU: the self-talk actors' request, Serve LLM's engine
    config (bundles, STRICT_PACK, accelerator type), vLLM's EngineArgs, Ray Train's ScalingConfig."""
    from ray.serve.llm import LLMConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    from sasft_ray.engines import accelerator, engine_kwargs, engine_resources
    from sasft_ray.plan import Cluster, load_arch, plan_text
    from sasft_ray.serve import llm_config
    from sasft_ray.train import scaling_config

    cfg = load_config(str(path))
    text, _ = plan_text(cfg, *load_arch(cfg.model.path), Cluster(), task_rows=20000)
    st, sv = cfg.selftalk.engine, cfg.serve.engine

    actor = engine_resources(cfg, st)
    assert actor == {"num_gpus": st.tensor_parallel_size, "accelerator_type": accelerator(cfg, st)}
    assert f"{st.concurrency} engines x TP {st.tensor_parallel_size} = {st.concurrency * st.tensor_parallel_size} " \
           "GPUs" in text
    # the export's bucket URI: vLLM resolves no hub id for it (offline here) at construction
    args = AsyncEngineArgs(model=f"{cfg.run_dir}/model", **engine_kwargs(cfg, st, seed=0, enable_prefix_caching=True))
    assert (args.tensor_parallel_size, args.max_model_len, args.enforce_eager) == (
        st.tensor_parallel_size, st.max_model_len, False)

    served = LLMConfig.model_validate(llm_config(cfg, cfg.serve.model_id, f"{cfg.run_dir}/model")).get_engine_config()
    kind = accelerator(cfg, sv)
    assert kind and served.accelerator_type == kind
    assert served.placement_strategy == "STRICT_PACK"
    assert served.placement_bundles == [{"GPU": 1.0, f"accelerator_type:{kind}": 0.001}] * sv.tensor_parallel_size
    assert served.engine_kwargs["tensor_parallel_size"] == sv.tensor_parallel_size

    # vLLM's engine core in a process of its own on GPUs (in-process, scheduling would stall the GPU)
    runtime_env = llm_config(cfg, cfg.serve.model_id, f"{cfg.run_dir}/model")["runtime_env"]["env_vars"]
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in runtime_env and "VLLM_BATCH_INVARIANT" not in runtime_env
    assert "RAYLLM_VLLM_ENGINE_CLS" not in runtime_env  # Ray's own engine: the Serve config needs only Ray's image

    sc = scaling_config(cfg)
    assert sc.use_gpu and sc.accelerator_type == cfg.resources.accelerator_type
    assert f"train  {sc.num_workers} workers x 1 GPU: {sc.num_workers} GPUs" in text


def test_a_local_model_on_cpu_starts_without_rays_download_task(tmp_path):
    import asyncio

    from ray.llm._internal.common.utils.import_utils import load_class
    from ray.serve.llm import LLMConfig

    from sasft_ray.serve import llm_config

    cfg = make_config(tmp_path)
    local = LLMConfig.model_validate(llm_config(cfg, "m", str(tmp_path / "model")))
    callback = load_class(local.callback_config.callback_class)(llm_config=local)
    assert callback.ctx.run_init_node
    asyncio.run(callback.on_before_node_init())
    assert not callback.ctx.run_init_node  # what Ray's engine start reads before it runs the download tasks
    # a bucket's model is downloaded on every node, and a GPU cluster's Serve config needs only Ray's image
    assert "callback_config" not in llm_config(cfg, "m", "s3://bucket/model")
    gpu = make_config(tmp_path, resources={"use_gpu": True})
    assert "callback_config" not in llm_config(gpu, "m", str(tmp_path / "model"))


def test_a_cpu_engine_of_one_rank_runs_its_model_in_its_own_process_stand_in_for_vllms_start(tmp_path, monkeypatch):
    """On CPU Ray Serve LLM sets vLLM's executor to `mp`: one more process for the one worker. The replica's
    engine class (named by the variable Ray reads in the replica) makes it vLLM's `uni`; several ranks keep
    theirs. vLLM's engine start is the stand-in (test_serve.py starts the real one)."""
    from types import SimpleNamespace

    from ray._common.utils import import_attr
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine

    from sasft_ray.serve import llm_config

    engine_cls = import_attr(llm_config(make_config(tmp_path), "m", str(tmp_path / "model"))[
        "runtime_env"]["env_vars"]["RAYLLM_VLLM_ENGINE_CLS"])
    assert issubclass(engine_cls, VLLMEngine)
    started = []
    monkeypatch.setattr(VLLMEngine, "_start_async_llm_engine", lambda self, args, config, pg: started.append(
        config.parallel_config.distributed_executor_backend))
    for world_size in (1, 2):
        parallel = SimpleNamespace(world_size=world_size, distributed_executor_backend="mp")
        engine_cls._start_async_llm_engine(object.__new__(engine_cls), None, SimpleNamespace(parallel_config=parallel),
                                           None)
    assert started == ["uni", "mp"]


# --- readiness: every model answers, not just its card ------------------------------------------

class _Router(BaseHTTPRequestHandler):
    """A stand-in for Serve's router: it lists both models from the start, but model `late`'s engine
    answers only from the `up_after`-th completion request on (503 before, as while an engine starts)."""

    up_after = 3
    asked: dict[str, int] = {}

    def do_GET(self):
        self._send(200, {"data": [{"id": "early"}, {"id": "late"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = _Router.asked[body["model"]] = _Router.asked.get(body["model"], 0) + 1
        if body["model"] == "late" and n < _Router.up_after:
            return self._send(503, {"error": {"message": "engine starting"}})
        self._send(200, {"choices": [{"index": 0, "text": "x", "finish_reason": "length"}]})

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_ready_only_when_every_model_answers_a_request_stand_in_router(monkeypatch):
    from sasft_ray import serve

    monkeypatch.setattr(serve.time, "sleep", lambda s: None)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Router)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        _Router.asked, _Router.up_after = {}, 3
        serve.wait_until_ready(url, ["early", "late"], None, timeout_s=60)
        assert _Router.asked == {"early": 1, "late": 3}  # listed from the start, but waited for
        _Router.asked, _Router.up_after = {}, 10**9
        with pytest.raises(serve.ServeError, match="late did not answer a request"):
            serve.wait_until_ready(url, ["early", "late"], None, timeout_s=0)
    finally:
        server.shutdown()


def test_eval_concurrency_follows_the_served_engines_and_the_base_cache_sits_beside_the_run_dir(tmp_path):
    from sasft_ray.evaluate import base_cache

    cfg = make_config(tmp_path, serve={"engine": {"max_num_seqs": 48, "concurrency": 2}})
    assert cfg.eval_concurrency == 96
    assert make_config(tmp_path, eval={"concurrency": 5}).eval_concurrency == 5
    assert base_cache(cfg)[0] == str(tmp_path / "base-eval-cache")
    remote = cfg.model_copy(update={"run_dir": "s3://bucket/grid/cell-1"})
    assert base_cache(remote)[0] == "s3://bucket/grid/base-eval-cache"
    assert base_cache(remote)[1] == base_cache(cfg)[1]  # the key: the base model and benchmarks, not where


def test_the_engine_core_runs_in_process_on_cpu_only_and_batch_invariance_on_gpus_only(tmp_path):
    """VLLM_ENABLE_V1_MULTIPROCESSING=0 saves ~25 s of a CPU engine's start, and on a GPU would make the
    engine's own scheduling and detokenisation stall the GPU; `selftalk.batch_invariant` selects vLLM's
    batch-invariant GPU kernels for the self-talk engines alone, and a CPU config refuses it."""
    from sasft_ray.config import validate_config
    from sasft_ray.engines import engine_env

    cpu = make_config(tmp_path)
    assert engine_env(cpu, cpu.selftalk.engine)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "VLLM_BATCH_INVARIANT" not in engine_env(cpu, cpu.selftalk.engine)
    gpu = make_config(tmp_path, resources={"use_gpu": True}, selftalk={"batch_invariant": True})
    for eng in (gpu.selftalk.engine, gpu.serve.engine):
        assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in engine_env(gpu, eng)
        assert "VLLM_CPU_KVCACHE_SPACE" not in engine_env(gpu, eng)
    assert engine_env(gpu, gpu.selftalk.engine, gpu.selftalk.batch_invariant)["VLLM_BATCH_INVARIANT"] == "1"
    with pytest.raises(ConfigError, match="selftalk.batch_invariant selects vLLM's GPU kernels: it needs "
                                          "resources.use_gpu"):
        validate_config({"run_dir": str(tmp_path / "r"), "model": {"path": "m"}, "data": {"path": "d"},
                         "selftalk": {"batch_invariant": True}})


def test_the_embedded_ray_holds_the_largest_endpoint_of_any_eval_wave_stand_in_for_ray_init(tmp_path, monkeypatch):
    """A wave of `eval.models_at_once` models shares the cores among fewer engines, so each asks for more: the
    local Ray's logical CPUs hold every endpoint size's bundles, replicas and router (stand-in for `ray.init`)."""
    import ray

    from sasft_ray import session

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(session.VERBOSE, "1")  # leaves Ray Data's settings and the loggers alone
    started = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: started.update(kwargs))
    cfg = make_config(tmp_path, compare=["sft", "freeze", "external-mix"], export={"interpolate": [0.5]})
    assert cfg.served_engines == 9
    session.connect(cfg)
    for n in range(1, 10):
        assert started["num_cpus"] >= n * (1 + cfg.engine_cpus(serving=True, engines=n)) + 1, n
