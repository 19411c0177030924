"""Ray Serve LLM's node initialisation, skipped for a model in a local folder.

Before each engine starts, Ray Serve LLM runs a task on every node of the engine's placement group
to download the model there. For a local folder there is nothing to download (Ray's own code
returns the path unchanged), but each task is a fresh process importing torch, transformers and
Ray's LLM stack: on 2 cores, three served models paid for three such processes. `serve.llm_config`
names this callback for local folders on CPU only: a model in a bucket (s3://, gs://) keeps Ray's
download, and a GPU cluster's Serve config needs nothing but Ray's own image.
"""

from ray.llm._internal.common.callbacks.base import CallbackBase


class LocalModel(CallbackBase):
    async def on_before_node_init(self) -> None:
        self.ctx.run_init_node = False
