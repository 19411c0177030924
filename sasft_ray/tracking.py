"""Experiment tracking: training progress and the evaluation's scores in TensorBoard, MLflow or W&B.

`train.report_to: [tensorboard, mlflow, wandb]` (none by default). Rank 0 of the training loop logs
every record it writes to `train-events.jsonl` (every `train.log_every` steps and at checkpoints:
loss, grad norm, lr, tokens/s per GPU, the task's and the forgetting monitor's held-out losses), and
the evaluation logs each fine-tune's scores to the run of its training, at its last step. One tracked
run per training: its id comes from the run dir and the train stage's id, so a worker group restarted
from a checkpoint and the evaluation later find the same run again.

Where: TensorBoard event files in `<run_dir>/tracking/tensorboard/` (a remote run_dir gets them when
training ends); MLflow at `MLFLOW_TRACKING_URI`, else SQLite in `<run_dir>/tracking/mlflow.db`
(experiment `MLFLOW_EXPERIMENT_NAME`, default `sasft-ray`); W&B's own settings (`WANDB_PROJECT`,
default `sasft-ray`; `WANDB_MODE=offline` writes locally). Keys stay in the nodes' environment or a
secret store (`WANDB_API_KEY`, `MLFLOW_TRACKING_TOKEN`): never in the config, never forwarded.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import time
from pathlib import Path

from sasft_ray.config import Config, flatten
from sasft_ray.layout import MLFLOW_DB, TENSORBOARD, TRACKING, is_uri
from sasft_ray.rundir import RunDir

# the tools' settings that the driver's environment passes to the training workers (no secrets among them)
FORWARDED = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY",
             "WANDB_DIR", "WANDB_BASE_URL")
MODULES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}  # backend -> what it imports
# record fields that are not metrics
NOT_LOGGED = {"time", "event", "step", "nodes", "optimizer_steps"}


def check_backends(cfg: Config) -> None:
    """In the driver, before any worker starts: every backend of `train.report_to` installed, and MLflow told
    where to write when the run dir is in a bucket."""
    import importlib.util

    for backend in cfg.train.report_to:
        if importlib.util.find_spec(MODULES[backend]) is None:
            raise ValueError(f"train.report_to {backend}: `{MODULES[backend]}` is not installed "
                             "(pip install -e \".[tracking]\")")
    if "mlflow" in cfg.train.report_to and is_uri(cfg.run_dir) and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise ValueError("train.report_to mlflow with a run_dir in a bucket: set MLFLOW_TRACKING_URI (the local "
                         "default, SQLite in the run dir, needs a local run_dir)")


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED if k in os.environ}


def mlflow_local_uri(rd: RunDir) -> str:
    """MLflow's store when no MLFLOW_TRACKING_URI is set: SQLite in the run dir (MLflow 3 retired its
    file store)."""
    return f"sqlite:///{rd.local(MLFLOW_DB)}"


def run_id(rd: RunDir) -> str:
    """The tracked run of this run dir's training (its current train stage id)."""
    return hashlib.sha256(f"{rd.root}:{rd.stage_info('train').get('id')}".encode()).hexdigest()[:16]


class Tracker:
    """The tracked run of one training, on the backends of `train.report_to`."""

    def __init__(self, cfg: Config, rd: RunDir, config: dict | None = None):
        self.backends, self.rd = list(cfg.train.report_to), rd
        self.id = run_id(rd)
        name = cfg.train.run_name or f"{Path(cfg.run_dir).name}-{cfg.train.method}"
        self.tensorboard = self.mlflow = self.wandb = None
        if "tensorboard" in self.backends:
            self.tb_dir = tempfile.mkdtemp(prefix="sasft-tb-") if rd.remote else rd.local(TENSORBOARD)
            self.tensorboard = EventFile(self.tb_dir, self.id)
        if "mlflow" in self.backends:
            self.mlflow = self._mlflow_run(name, config or {})
        if "wandb" in self.backends:
            import wandb

            self.wandb = wandb.init(id=self.id, resume="allow", name=name, config=config,
                                    project=os.environ.get("WANDB_PROJECT", "sasft-ray"),
                                    dir=os.environ.get("WANDB_DIR") or (None if rd.remote else rd.local(TRACKING)))

    def _mlflow_run(self, name: str, config: dict):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a local run dir (`check_backends`)
            Path(self.rd.local(TRACKING)).mkdir(parents=True, exist_ok=True)
            uri = mlflow_local_uri(self.rd)
        client = MlflowClient(uri)
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "sasft-ray")
        experiment = client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
        found = client.search_runs([experiment_id], filter_string=f"tags.sasft_run_id = '{self.id}'", max_results=1)
        if found:
            return client, found[0].info.run_id
        run = client.create_run(experiment_id, run_name=name, tags={"sasft_run_id": self.id})
        for key, value in flatten(config).items():
            client.log_param(run.info.run_id, key, str(value)[:6000])
        return client, run.info.run_id

    def log(self, metrics: dict, step: int) -> None:
        numbers = {k: float(v) for k, v in flatten(metrics).items()
                   if k not in NOT_LOGGED and isinstance(v, int | float) and not isinstance(v, bool)}
        if self.tensorboard:
            self.tensorboard.scalars(numbers, step)
        if self.mlflow:
            client, mlflow_run = self.mlflow
            for key, value in numbers.items():
                client.log_metric(mlflow_run, key.replace(",", "_"), value, step=step)
        if self.wandb:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()
            if self.rd.remote:
                self.rd.upload(self.tb_dir, TENSORBOARD)
        if self.wandb:
            self.wandb.finish()


class EventFile:
    """A TensorBoard event file written as each record comes, synced to disk (tensorboardX's SummaryWriter
    queues events for a thread of its own: a worker that dies loses the records still queued)."""

    def __init__(self, folder: str, suffix: str):
        from tensorboardX.record_writer import RecordWriter

        Path(folder).mkdir(parents=True, exist_ok=True)
        self.writer = RecordWriter(str(Path(folder, f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}."
                                                    f"{os.getpid()}.{suffix}")))
        self._write(file_version="brain.Event:2")  # what TensorBoard reads first

    def scalars(self, values: dict[str, float], step: int) -> None:
        from tensorboardX.proto.summary_pb2 import Summary

        self._write(step=step, summary=Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in values.items()]))

    def _write(self, **fields) -> None:
        from tensorboardX.proto.event_pb2 import Event

        self.writer.write(Event(wall_time=time.time(), **fields).SerializeToString())
        self.writer.flush()  # and fsync

    def close(self) -> None:
        self.writer.close()


def train_metrics(record: dict) -> dict:
    """A training record under `train/` names."""
    return {f"train/{k}": v for k, v in record.items() if k not in NOT_LOGGED}


def log_scores(cfg: Config, rd: RunDir, scores: dict) -> None:
    """The evaluation's scores of a fine-tune (benchmark -> metric -> value) to its training's tracked run in
    `rd`, at its last step."""
    if not cfg.train.report_to:
        return
    tracker = Tracker(cfg, rd)
    tracker.log({f"eval/{b}/{m}": v for b, metrics in scores.items() for m, v in metrics.items()},
                step=int(rd.stage_info("train").get("steps") or 0))
    tracker.close()
