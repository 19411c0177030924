"""`sasft serve`: the fine-tuned model and the base model behind one OpenAI-compatible endpoint.

Ray Serve LLM (`ray.serve.llm.build_openai_app`) runs one vLLM engine deployment per
model and an OpenAI router in front; `/v1/models` lists both, and a request picks
its model by id. The same application is written out as a Serve config file, so
`serve deploy` or a KubeRay RayService (its `serveConfigV2`) runs exactly what was
tested here. On CPU every engine gets a CPU bundle, as the self-talk engines do.
"""

from __future__ import annotations

import hmac
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sasft_ray.config import Config
from sasft_ray.engines import engine_env, engine_kwargs, engine_placement
from sasft_ray.layout import is_uri
from sasft_ray.session import quiet_loggers, verbose

APP_NAME = "sasft"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the adapter ranks vLLM's engine takes


class ServeError(RuntimeError):
    pass


@dataclass(frozen=True)
class Models:
    """What one endpoint serves. `engines`: model id -> model folder, each a vLLM deployment of its own.
    `adapters`: model id -> LoRA adapter folder, all in one bucket folder and named by their id, served on
    the engine of model `base` (the base model's id; Ray Serve LLM's multi-LoRA): a request names one as
    `<base>:<id>`."""

    engines: dict[str, str]
    adapters: dict[str, str] = field(default_factory=dict)
    base: str = ""

    def __post_init__(self):
        folders = {uri.rsplit("/", 1)[0] for uri in self.adapters.values()}
        if self.adapters and (self.base not in self.engines or len(folders) > 1 or any(
                not uri.endswith(f"/{model_id}") for model_id, uri in self.adapters.items())):
            raise ServeError(f"adapters {self.adapters} must lie in one folder, named by their ids, and be "
                             f"served on one of {list(self.engines)}")

    def api_ids(self) -> dict[str, str]:
        """Model id -> the id requests name it by."""
        return {**{m: m for m in self.engines}, **{a: f"{self.base}:{a}" for a in self.adapters}}


def llm_config(cfg: Config, model_id: str, path: str, adapters: dict[str, str] | None = None,
               engines: int | None = None) -> dict:
    """One vLLM deployment; with `adapters`, it also serves those LoRA adapters of its model. `engines`: how many
    its endpoint starts (replicas included), which share a CPU machine's cores."""
    eng = cfg.serve.engine
    # A model in s3:// or gs:// is a mirror: each replica downloads it to its own node first.
    bucket = path.startswith(("s3://", "gs://"))
    source = {"bucket_uri": path} if bucket else path
    lora: dict = {}
    extra: dict = {}
    if adapters:
        rank = cfg.train.lora.r if cfg.train.lora else 16
        lora = {"lora_config": {"dynamic_lora_loading_path": next(iter(adapters.values())).rsplit("/", 1)[0],
                                "max_num_adapters_per_replica": len(adapters)}}
        # vLLM takes ranks from a fixed list: the smallest that holds the adapters' (smaller ones are padded)
        extra = {"enable_lora": True, "max_loras": len(adapters),
                 "max_lora_rank": min(r for r in VLLM_LORA_RANKS if r >= rank)}
    # On CPU, an engine of one rank runs its model in its own process, not one more (sasft_ray/serve_cpu.py):
    # Ray Serve LLM reads its engine class from this variable in the replica (its escape hatch for patching).
    cpu_engine = {} if cfg.resources.use_gpu else {"RAYLLM_VLLM_ENGINE_CLS": "sasft_ray.serve_cpu:OneProcessEngine"}
    return {
        "model_loading_config": {"model_id": model_id, "model_source": source},
        "engine_kwargs": engine_kwargs(cfg, eng, serving=True, **extra),
        "deployment_config": {"num_replicas": eng.concurrency},
        "runtime_env": {"env_vars": {**engine_env(cfg, eng), **cpu_engine}},
        **engine_placement(cfg, eng, engines), **lora,
        # On CPU, a local folder gets no download task per node (sasft_ray/serve_cpu.py); GPU clusters keep
        # Ray's own initialisation, so that their Serve config needs nothing but Ray's LLM image.
        **({} if bucket or cfg.resources.use_gpu else
           {"callback_config": {"callback_class": "sasft_ray.serve_cpu:LocalModel"}}),
    }


def app_args(cfg: Config, models: Models) -> dict:
    engines = len(models.engines) * cfg.serve.engine.concurrency
    args: dict = {"llm_configs": [llm_config(cfg, model_id, path, models.adapters if model_id == models.base else None,
                                             engines) for model_id, path in models.engines.items()]}
    if cfg.serve.api_key_env:
        args["api_key_env"] = cfg.serve.api_key_env
    return args


def serve_config(cfg: Config, models: Models) -> dict:
    """A Serve config file (`serve deploy`, RayService `serveConfigV2`) for the same application."""
    return {
        "http_options": {"host": cfg.serve.host, "port": cfg.serve.port},
        "applications": [{
            "name": APP_NAME, "route_prefix": "/",
            # Ray's own builder unless a key is asked for: ours only adds the key check in front of it.
            "import_path": "sasft_ray.serve:build_app" if cfg.serve.api_key_env else "ray.serve.llm:build_openai_app",
            "args": app_args(cfg, models),
        }],
    }


WRITTEN_BY = "# Written by `sasft serve`: the application it runs, as a Serve config (serve deploy, RayService).\n"


def write_serve_config(cfg: Config, models: Models, path: str) -> None:
    """Write the Serve config to `path`, over an earlier one of ours only: a file of the user's is kept."""
    if Path(path).exists() and not Path(path).read_text(errors="replace").startswith(WRITTEN_BY):
        raise ServeError(f"{path} exists and was not written by sasft serve: it is kept; give --write-config "
                         "another path")
    with open(path, "w") as f:
        f.write(WRITTEN_BY)
        yaml.safe_dump(serve_config(cfg, models), f, sort_keys=False)


def build_app(args: dict):
    """Ray Serve LLM's OpenAI app; with `api_key_env`, every request needs `Authorization: Bearer <key>`."""
    from ray.serve.llm import build_openai_app

    args = dict(args)
    key_env = args.pop("api_key_env", None)
    if not key_env:
        return build_openai_app(args)
    return _keyed_openai_app(args, _api_key(key_env))


def _api_key(env: str) -> str:
    key = os.environ.get(env)
    if not key:
        raise ServeError(f"serve.api_key_env names ${env}, but it is not set (the key is read from the environment)")
    return key


def _keyed_openai_app(args: dict, key: str):
    """`build_openai_app`'s wiring (Ray's documented multi-model recipe) over a FastAPI app that
    checks the key. Serve dropped proxy middlewares, so the check must live in the ingress app."""
    from fastapi.responses import JSONResponse
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.ingress import init as openai_fastapi_app
    from ray.serve.llm import LLMServingArgs, build_llm_deployment
    from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

    configs = LLMServingArgs.model_validate(args).llm_configs
    app = openai_fastapi_app()
    expected = f"Bearer {key}".encode()

    @app.middleware("http")
    async def require_key(request, call_next):
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return JSONResponse({"error": {"message": "invalid or missing API key", "type": "auth_error",
                                           "code": 401}}, status_code=401)
        return await call_next(request)

    ingress = make_fastapi_ingress(OpenAiIngress, app=app)
    return serve.deployment(ingress, **OpenAiIngress.get_deployment_options(configs)).bind(
        llm_deployments={c.model_id: build_llm_deployment(c) for c in configs},
        model_cards={c.model_id: to_model_metadata(c.model_id, c) for c in configs},
        lora_paths={c.model_id: c.lora_config.dynamic_lora_loading_path for c in configs if c.lora_config},
    )


def base_url(cfg: Config) -> str:
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    if ":" in host:  # an IPv6 address: bracketed in a URL, or the port is read as part of it
        host = f"[{host.strip('[]')}]"
    return f"http://{host}:{cfg.serve.port}/v1"


def start(cfg: Config, models: Models, timeout_s: float = 900) -> str:
    """Deploy on the connected Ray cluster and wait until every model answers; returns the API base URL."""
    from ray import serve

    missing = [f"{model_id}: {path}" for model_id, path in models.engines.items()
               if not is_uri(path) and os.path.isabs(path) and not os.path.exists(path)]
    if missing:
        raise ServeError("no model to serve at " + "; ".join(missing))
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port},
                logging_config=None if verbose() else {"log_level": "WARNING"})
    quiet_loggers()
    ids = list(models.api_ids().values())
    print(f"[serve] starting {', '.join(ids)} on {cfg.serve.host}:{cfg.serve.port}"
          + (f" ({len(models.adapters)} LoRA adapters on the {models.base} engine)" if models.adapters else ""))
    started = time.time()
    serve.run(build_app(app_args(cfg, models)), name=APP_NAME, route_prefix="/", blocking=False)
    url = base_url(cfg)
    try:
        wait_until_ready(url, ids, api_key(cfg), timeout_s)
    except BaseException:
        stop()  # a timed-out or interrupted start leaves no half-started app behind
        raise
    print(f"[serve] ready in {time.time() - started:.0f} s at {url}")
    return url


def api_key(cfg: Config) -> str | None:
    return _api_key(cfg.serve.api_key_env) if cfg.serve.api_key_env else None


def wait_until_ready(url: str, model_ids: list[str], key: str | None, timeout_s: float) -> None:
    """Until every model answers a one-token completion: the router lists its models from their cards
    before the engines behind them are up, so `/v1/models` alone says nothing about health."""
    import requests

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline, waiting = time.time() + timeout_s, list(model_ids)
    while waiting:
        for model_id in list(waiting):
            try:
                r = requests.post(f"{url}/completions", headers=headers, timeout=30,
                                  json={"model": model_id, "prompt": "Hello", "max_tokens": 1, "temperature": 0})
            except requests.RequestException:
                continue
            if r.status_code == 401:
                raise ServeError(f"the endpoint {url} refused the API key (401)")
            if r.ok and r.json().get("choices"):
                waiting.remove(model_id)
        if waiting and time.time() > deadline:
            raise ServeError(f"{', '.join(waiting)} did not answer a request at {url} within {timeout_s:.0f} s")
        if waiting:
            time.sleep(2)


def stop() -> None:
    from ray import serve

    serve.delete(APP_NAME)
    serve.shutdown()
