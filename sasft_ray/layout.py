"""Where each thing lies in a run directory: every path named once, relative to the run dir (or, for what
lies inside an exported model, to `MODEL`); and which paths are URIs rather than local.

    manifest.json                 MANIFEST    each stage's record (`sasft_ray.rundir`)
    sasft.lock                    LOCK        held by the command writing there
    config.yaml                   CONFIG      the config of the last run
    task/{train,heldout}.parquet  TASK        the task's rows in the canonical form (`TASK_TRAIN`, `TASK_HELDOUT`)
    sources/<i>/train.parquet     SOURCES     mix.sources' rows (`source_folder(i)`)
    external/train.parquet        EXTERNAL    external-mix's rows
    replay/train.parquet          REPLAY      replay's rows
    selftalk/*.parquet            SELFTALK    every self-dialogue with its drop_reason
    selftalk_heldout.parquet      MONITOR     the forgetting monitor's self-dialogues
    rewrite/*.parquet             REWRITE     sdft's task rows, replies rewritten by the base model, drop_reason
    mixed/part-0.parquet          MIXED       the training rows (`MIXED_PART`)
    train/                        RAY_TRAIN   Ray Train's run: its checkpoints and snapshot
    train-kept/step-<n>/          KEPT_DIR    train.select's copies of checkpoints (`kept(step)`, `KEPT_MARK`)
    train-events.jsonl            EVENTS      the training's records
    train-failed-once             FAILED_ONCE the tests' fault: written when it struck
    model.partial/                PARTIAL     the export as it is written, before it becomes model/
    model/                        MODEL       the exported model; in it ADAPTER, DRIFT, TRAIN_RESULT, CARD
    interpolated/<α>/             INTERPOLATED export.interpolate's models between the base model and model/
    tracking/                     TRACKING    TensorBoard's files, MLflow's local database (TENSORBOARD, MLFLOW_DB)
    eval/results.json             RESULTS     every model's scores, with the config that made them
    eval/models/<id>.json         SCORED      each model's scores as soon as it is done
    eval/samples/<id>/            SAMPLES     every reply
    eval/lm_eval/<id>/            LM_EVAL     lm-eval's own files
    report.md, report.png         REPORT, REPORT_PLOT
    diagnose.json, diagnose.png   DIAGNOSIS, DIAGNOSIS_PLOT
    serving.json                  SERVING     what a running `sasft serve` puts behind its endpoint
    serve/adapters/<model id>/    ADAPTERS    LoRA adapters as Ray Serve LLM reads them
    compare/<method>/             COMPARE     a compared method's own run dir

Beside the run dir (not in it): `BASE_CACHE`, the base model's general scores shared across runs.
"""

from __future__ import annotations

MANIFEST = "manifest.json"
LOCK = "sasft.lock"
CONFIG = "config.yaml"

TASK = "task"
SOURCES = "sources"
EXTERNAL = "external"
REPLAY = "replay"
SELFTALK = "selftalk"
MONITOR = "selftalk_heldout.parquet"
REWRITE = "rewrite"
MIXED = "mixed"
MIXED_PART = f"{MIXED}/part-0.parquet"

RAY_TRAIN = "train"
KEPT_DIR = "train-kept"
KEPT_MARK = "kept.json"  # written last into a kept copy: a copy without it is incomplete
EVENTS = "train-events.jsonl"
FAILED_ONCE = "train-failed-once"
PARTIAL = "model.partial"

MODEL = "model"
ADAPTER = "adapter"  # a LoRA fine-tune's PEFT adapter, beside its merged weights
DRIFT = "drift.json"
TRAIN_RESULT = "train_result.json"
INTERPOLATED = "interpolated"
CARD = "README.md"  # the model card

TRACKING = "tracking"
TENSORBOARD = f"{TRACKING}/tensorboard"
MLFLOW_DB = f"{TRACKING}/mlflow.db"
EVAL = "eval"
RESULTS = f"{EVAL}/results.json"
SCORED = f"{EVAL}/models"
SAMPLES = f"{EVAL}/samples"
LM_EVAL = f"{EVAL}/lm_eval"
REPORT = "report.md"
REPORT_PLOT = "report.png"
DIAGNOSIS = "diagnose.json"
DIAGNOSIS_PLOT = "diagnose.png"
SERVING = "serving.json"
ADAPTERS = "serve/adapters"
COMPARE = "compare"
BASE_CACHE = "base-eval-cache"


def split_file(folder: str, name: str) -> str:
    """A canonical folder's split file: `task/heldout.parquet`, `external/train.parquet`."""
    return f"{folder}/{name}.parquet"


TASK_TRAIN, TASK_HELDOUT = split_file(TASK, "train"), split_file(TASK, "heldout")


def source_folder(i: int) -> str:
    return f"{SOURCES}/{i}"


KEPT_STEP = "step-"  # + the step: a copy's folder in KEPT_DIR


def kept(step: int) -> str:
    return f"{KEPT_DIR}/{KEPT_STEP}{step}"


def is_uri(path: str) -> bool:
    """A `s3://` / `gs://` (or other scheme's) address, not a path on this machine."""
    return "://" in path
