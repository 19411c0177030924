"""`sasft push`: the model folder to the Hugging Face Hub, against a stand-in for huggingface_hub's HfApi."""

import contextlib
import io
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import yaml

from sasft_ray.cli import main
from sasft_ray.layout import MODEL
from sasft_ray.push import folder_files
from tests.conftest import make_config
from tests.unit.test_card import HUB_BASE, _run_dir

ENV_TOKEN = "stand-in-token-from-the-environment"


class StandInHub:
    """HfApi as `sasft push` uses it, recording every call; `repos` is the hub: repo id -> (private, files)."""

    made: list = []
    repos: dict = {}

    def __init__(self, token=None, library_name=None, **_):
        self.token, self.calls = token, []
        StandInHub.made.append(self)

    def _call(self, name, **kw):
        self.calls.append((name, kw))

    def create_repo(self, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False):
        self._call("create_repo", repo_id=repo_id, token=token, private=private, exist_ok=exist_ok)
        StandInHub.repos.setdefault(repo_id, (bool(private), {".gitattributes": ""}))

    def repo_info(self, repo_id, *, repo_type=None, token=None):
        self._call("repo_info", repo_id=repo_id, token=token)
        return SimpleNamespace(private=StandInHub.repos[repo_id][0])

    def create_branch(self, repo_id, *, branch, token=None, repo_type=None, exist_ok=False):
        self._call("create_branch", repo_id=repo_id, branch=branch, token=token, exist_ok=exist_ok)

    def list_repo_files(self, repo_id, *, revision=None, repo_type=None, token=None):
        self._call("list_repo_files", repo_id=repo_id, revision=revision, token=token)
        return list(StandInHub.repos[repo_id][1])

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, revision=None, token=None, commit_message=None,
                      **more):
        files = {f: Path(folder_path, f).read_bytes() for f in folder_files(folder_path)}
        self._call("upload_folder", repo_id=repo_id, files=files, revision=revision, token=token, more=more)
        StandInHub.repos[repo_id][1].update(files)
        return SimpleNamespace(commit_url=f"https://stand-in.hub/{repo_id}/commit/1")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in in place of HfApi; HF_TOKEN set, and a cached login the push must not use."""
    StandInHub.made, StandInHub.repos = [], {}
    monkeypatch.setattr(huggingface_hub, "HfApi", StandInHub)
    home = tmp_path / "hf-home"
    home.mkdir()
    (home / "token").write_text("cached-login-token")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    return StandInHub


def _cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _trained_run(tmp_path, **train):
    """A run dir as training leaves it, with an export of a LoRA fine-tune: weights, tokenizer, adapter/."""
    cfg = make_config(tmp_path, model_path=HUB_BASE, train={"lora": {"r": 8}, **train})
    rd = _run_dir(cfg, lora=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "drift.json"):
        rd.write_text("{}", "model", name)
    rd.write_text("adapter weights", "model", "adapter", "adapter_model.safetensors")
    rd.save_config(cfg)
    return cfg, rd


def test_push_uploads_every_file_of_the_model_folder_stand_in_hub(tmp_path, hub):
    cfg, rd = _trained_run(tmp_path)
    model = Path(rd.local(MODEL))
    assert not (model / "README.md").exists()  # an export from before model cards: push writes it
    code, out, err = _cli("push", cfg.run_dir, "me/llama-sasft", "--private", "--revision", "try-1")
    assert code == 0, err
    (api,) = hub.made
    assert api.token == ENV_TOKEN  # HF_TOKEN, not the cached login
    calls = dict(api.calls)
    assert calls["create_repo"] == {"repo_id": "me/llama-sasft", "token": ENV_TOKEN, "private": True, "exist_ok": True}
    assert calls["create_branch"]["branch"] == "try-1"
    upload = calls["upload_folder"]
    assert upload["revision"] == "try-1" and upload["token"] == ENV_TOKEN and upload["more"] == {}  # no filters
    assert set(upload["files"]) == set(folder_files(str(model))) == {
        "README.md", "model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja", "drift.json", "train_result.json", "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors"}
    card = upload["files"]["README.md"].decode()
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == HUB_BASE
    assert "adapter/adapter_model.safetensors" in out and "https://stand-in.hub/me/llama-sasft/commit/1" in out
    assert all(token == ENV_TOKEN for _, kw in api.calls for key, token in kw.items() if key == "token")


def test_push_reads_the_token_from_hf_token_only_stand_in_hub(tmp_path, hub, monkeypatch):
    cfg, _ = _trained_run(tmp_path)
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = _cli("push", cfg.run_dir, "me/llama-sasft")
    assert code == 2 and "HF_TOKEN is not set" in err and "nothing was uploaded" in err
    assert hub.made == []  # refused before any client was made, the cached login unused


def test_push_refuses_a_model_folder_without_weights_stand_in_hub(tmp_path, hub):
    cfg, rd = _trained_run(tmp_path)
    rd.remove(MODEL, "model.safetensors")  # adapter/'s weights are not the model's
    code, _, err = _cli("push", cfg.run_dir, "me/llama-sasft")
    assert code == 2 and "holds no weights" in err
    rd.remove("model")
    code, _, err = _cli("push", cfg.run_dir, "me/llama-sasft")
    assert code == 2 and "does not exist: train the run first" in err
    assert hub.made == []


def test_push_refuses_a_public_repo_for_private_and_other_weights_stand_in_hub(tmp_path, hub):
    cfg, _ = _trained_run(tmp_path)
    hub.repos["me/public"] = (False, {".gitattributes": "", "README.md": "theirs"})
    code, _, err = _cli("push", cfg.run_dir, "me/public")  # private is the default
    assert code == 2 and "exists and is public" in err
    hub.repos["me/sharded"] = (True, {"model-00001-of-00002.safetensors": "", "model.safetensors.index.json": "",
                                      "LICENSE": "theirs"})
    code, _, err = _cli("push", cfg.run_dir, "me/sharded")
    assert code == 2 and "holds weights this export does not have: model-00001-of-00002.safetensors" in err
    assert not any(name == "upload_folder" for api in hub.made for name, _ in api.calls)

    del hub.repos["me/sharded"][1]["model-00001-of-00002.safetensors"]
    del hub.repos["me/sharded"][1]["model.safetensors.index.json"]
    code, out, _ = _cli("push", cfg.run_dir, "me/sharded")
    assert code == 0 and "left in the repo as they are (not in this export): LICENSE" in out
    assert hub.repos["me/sharded"][1]["LICENSE"] == "theirs"  # nothing on the hub deleted


def test_a_missing_repo_is_created_private_unless_asked_public_stand_in_hub(tmp_path, hub):
    cfg, _ = _trained_run(tmp_path)
    assert _cli("push", cfg.run_dir, "me/new")[0] == 0
    assert hub.repos["me/new"][0] is True  # not the hub's default visibility
    assert _cli("push", cfg.run_dir, "me/open", "--public")[0] == 0
    assert hub.repos["me/open"][0] is False
