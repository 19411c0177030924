"""Ray Serve LLM on CPU: two start-up costs that a machine without GPUs need not pay.

- `LocalModel`, a callback: before each engine starts, Ray Serve LLM runs a task on every node of the engine's
  placement group to download the model there. For a local folder there is nothing to download (Ray's own code
  returns the path unchanged), but each task is a fresh process importing torch, transformers and Ray's LLM stack:
  on 2 cores, three served models paid for three such processes.
- `OneProcessEngine`, the engine class: on CPU Ray Serve LLM sets vLLM's executor to `mp`, so the engine's own
  process (vLLM's engine core, beside the replica) spawns one more process for its single worker, which imports
  vLLM and torch again before it loads the model (~18 s a served model on this machine, `docs/LOG.md`). One rank
  needs no process of its own: it runs in the engine core's (vLLM's `uni` executor, as `vllm.LLM` does).

`serve.llm_config` names both for CPU deployments only (the callback for local folders): a model in a bucket keeps
Ray's download, and a GPU cluster's Serve config needs nothing but Ray's own image.
"""

from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine


class LocalModel(CallbackBase):
    async def on_before_node_init(self) -> None:
        self.ctx.run_init_node = False


class OneProcessEngine(VLLMEngine):
    def _start_async_llm_engine(self, vllm_engine_args, vllm_engine_config, placement_group):
        parallel = vllm_engine_config.parallel_config
        if parallel.world_size == 1:
            parallel.distributed_executor_backend = "uni"
        return super()._start_async_llm_engine(vllm_engine_args, vllm_engine_config, placement_group)
