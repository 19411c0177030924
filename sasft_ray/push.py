"""`sasft push RUN_DIR REPO_ID`: the exported model folder, `<run_dir>/model/`, to the Hugging Face Hub.

Everything in the folder is uploaded (weights, config, tokenizer and chat template, the model card
README.md, `adapter/` of a LoRA fine-tune, drift.json and train_result.json), in one commit with
huggingface_hub's `HfApi.upload_folder`; the list is printed first, and anything the hub client would leave
out (it never uploads `.git/` or `.cache/huggingface/`) is named. The token is read from HF_TOKEN and
from nowhere else (no cached login): a push is never made with credentials the user did not hand it.
Files already in the repo that the folder lacks are left there, and named; weight files among them
(which transformers could load instead of these) stop the push before anything is uploaded.
"""

from __future__ import annotations

import os
import tempfile
from fnmatch import fnmatch
from pathlib import Path

import pyarrow.fs as pafs
import yaml

from sasft_ray.card import write_model_card
from sasft_ray.config import validate_config
from sasft_ray.layout import CARD, CONFIG, MODEL
from sasft_ray.rundir import RunDir, RunDirError

TOKEN_ENV = "HF_TOKEN"
WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.gguf")


class PushError(ValueError):
    """A push that cannot be made: no token, no weights, a repo that would mix in other weights."""


def _is_weights(name: str) -> bool:
    return any(fnmatch(Path(name).name, pattern) for pattern in WEIGHTS)


def folder_files(folder: str) -> list[str]:
    """Every file under `folder`, as repo paths (posix, relative)."""
    root = Path(folder)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _token() -> str:
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise PushError(f"{TOKEN_ENV} is not set: push reads the Hugging Face token from {TOKEN_ENV} only (a token "
                        "with write access, https://huggingface.co/settings/tokens); nothing was uploaded")
    return token


def _api(token: str):
    from huggingface_hub import HfApi

    return HfApi(token=token, library_name="sasft-ray")


def push(run_dir: str, repo_id: str, private: bool = True, revision: str | None = None) -> str:
    """Upload `<run_dir>/model/` to `repo_id` (created if missing: private unless `private` is False, never
    the hub's default; a public one is refused unless `private` is False), on `revision` (a branch, created
    if missing; None: main). Returns the commit's URL."""
    token = _token()  # before anything is read or sent
    try:
        return _push(RunDir(run_dir), repo_id, token, private, revision)
    except RunDirError as e:  # not a run dir, or one another command holds
        raise PushError(str(e)) from None


def _push(rd: RunDir, repo_id: str, token: str, private: bool, revision: str | None) -> str:
    if not rd.exists(MODEL):
        raise PushError(f"{rd.path(MODEL)} does not exist: train the run first (`sasft train` or `sasft run`)")
    with rd.locked(), tempfile.TemporaryDirectory() as scratch:
        found = rd.fs.get_file_info(pafs.FileSelector(rd.local(MODEL)))  # the weights, not adapter/'s
        if not any(i.type == pafs.FileType.File and _is_weights(i.base_name) for i in found):
            raise PushError(f"{rd.path(MODEL)} holds no weights ({', '.join(WEIGHTS[:2])}): nothing was uploaded; "
                            "train the run first")
        if not rd.exists(MODEL, CARD) and rd.exists(CONFIG):  # an export from before model cards
            cfg = validate_config(yaml.safe_load(rd.read_text(CONFIG)), source=rd.path(CONFIG))
            write_model_card(cfg, rd)
            print(f"[push] wrote the model card {rd.path(MODEL, CARD)} (no scores: `sasft eval` adds them)")
        folder = rd.local(MODEL)
        if rd.remote:  # upload_folder reads a local folder
            folder = str(Path(scratch, MODEL))
            pafs.copy_files(rd.local(MODEL), folder, source_filesystem=rd.fs,
                            destination_filesystem=pafs.LocalFileSystem())
        return _upload(folder, repo_id, token, private, revision, rd.root)


def _upload(folder: str, repo_id: str, token: str, private: bool, revision: str | None, run_dir: str) -> str:
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    files = folder_files(folder)
    kept = list(filter_repo_objects(files, ignore_patterns=DEFAULT_IGNORE_PATTERNS))
    left_out = sorted(set(files) - set(kept))
    if CARD not in kept:
        print(f"[push] WARNING: no {CARD} model card in {folder} (no {CONFIG} in the run dir to write one from)")
    sizes = {f: Path(folder, f).stat().st_size for f in kept}
    print(f"[push] {len(kept)} files, {sum(sizes.values()) / 2**30:.2f} GiB, from {folder} to {repo_id}"
          + (f" (branch {revision})" if revision else "") + ":")
    for f in kept:
        print(f"  {f}  ({sizes[f]:,} bytes)")
    if left_out:
        print(f"[push] not uploaded (the hub client never uploads .git/ or .cache/huggingface/): {', '.join(left_out)}")

    api = _api(token)
    api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    if private and not api.repo_info(repo_id, repo_type="model", token=token).private:
        raise PushError(f"{repo_id} exists and is public; nothing was uploaded (push to it with --public, or to a "
                        "new repo, created private)")
    if revision:
        api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
    there = set(api.list_repo_files(repo_id, revision=revision, repo_type="model", token=token))
    stale = sorted(f for f in there - set(kept) if f != ".gitattributes")
    if any(_is_weights(f) for f in stale):
        raise PushError(f"{repo_id}{'@' + revision if revision else ''} holds weights this export does not have: "
                        f"{', '.join(f for f in stale if _is_weights(f))}; transformers could load them instead of "
                        "these. Nothing was uploaded: delete them on the hub, or push to another repo or --revision")
    if stale:
        print(f"[push] left in the repo as they are (not in this export): {', '.join(stale)}")
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision, token=token,
                               commit_message=f"sasft push of {Path(run_dir.rstrip('/')).name}/{MODEL}")
    url = getattr(commit, "commit_url", None) or str(commit)
    print(f"[push] done: {url}")
    return url
