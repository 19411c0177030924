import hashlib
import json

import pytest
import yaml

from sasft_ray.cli import main
from sasft_ray.config import ConfigError, absolute_paths, load_config, shipped_configs, validate_config


def test_shipped_demo_config_loads_by_name():
    assert "demo" in shipped_configs()
    cfg = load_config("demo")
    assert cfg.train.method == "sa-sft"
    assert cfg.serve.host == "127.0.0.1"  # secure default
    assert cfg.model.trust_remote_code is False


def test_overrides_are_parsed_as_yaml():
    cfg = load_config("demo", ["selftalk.temperature=0.3", "selftalk.turns=3", "mix.self_ratio=0.5",
                               "train.method=sft", "resources.address=null", "data.columns={prompt: q}"])
    assert (cfg.selftalk.temperature, cfg.selftalk.turns, cfg.mix.self_ratio) == (0.3, 3, 0.5)
    assert cfg.train.method == "sft" and cfg.resources.address is None
    assert cfg.data.columns == {"prompt": "q"}


@pytest.mark.parametrize("override, expected", [
    ("selftalk.temprature=0.5", "unknown key 'selftalk.temprature' (did you mean 'selftalk.temperature'?)"),
    ("mix.self_raito=2", "did you mean 'mix.self_ratio'?"),
    ("selftalk.engine.concurency=2", "did you mean 'selftalk.engine.concurrency'?"),
    ("modle.path=x", "did you mean 'model'?"),
    ("selftalk.turns=many", "selftalk.turns"),
    ("selftalk.top_p=1.5", "selftalk.top_p"),
    ("train.method=magic", "train.method"),
])
def test_bad_keys_and_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config("demo", [override])
    assert expected in str(err.value)
    assert "demo.yaml" in str(err.value)


def test_malformed_override_and_missing_config():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("demo", ["selftalk.turns"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config("demo", ["run_dir.x=1"])
    with pytest.raises(ConfigError, match="neither a file nor a shipped config"):
        load_config("no-such-config")


def test_missing_required_key_and_method_without_its_data():
    with pytest.raises(ConfigError, match="missing key 'model'"):
        validate_config({"run_dir": "r", "data": {"path": "x"}})
    for method, data in (("external-mix", "external"), ("replay", "replay")):
        with pytest.raises(ConfigError, match=f"train.method '{method}' needs mix.{data} "):
            validate_config({"run_dir": "r", "model": {"path": "m"}, "data": {"path": "x"},
                             "train": {"method": method}})


def test_dialogues_must_fit_the_self_talk_engine_only_where_a_run_talks_to_itself():
    """3 turns of 64 + 64 tokens outgrow a 256-token self-talk engine: refused for SA-SFT, for a compared SA-SFT
    and for the forgetting monitor's own dialogues; plain SFT without a monitor starts no engine to outgrow."""
    long = ["selftalk.turns=3", "selftalk.max_user_tokens=64", "selftalk.max_assistant_tokens=64",
            "selftalk.engine.max_model_len=256"]
    for extra in ([], ["train.method=sft", "compare=[sa-sft]"], ["train.method=sft", "selftalk.heldout_fraction=0.1"]):
        with pytest.raises(ConfigError, match=r"= 384 tokens do not fit selftalk.engine.max_model_len 256"):
            load_config("demo", [*long, *extra])
    assert load_config("demo", [*long, "train.method=sft", "compare=[]", "selftalk.heldout_fraction=0"])
    assert load_config("demo", [*long, "train.method=sft", "compare=[]", "selftalk.monitor_from=runs/other"])


def test_section_hash_tracks_only_its_sections():
    a = load_config("demo")
    b = load_config("demo", ["mix.self_ratio=3"])
    assert a.section_hash("selftalk") == b.section_hash("selftalk")
    assert a.section_hash("mix") != b.section_hash("mix")
    c = load_config("demo", ["train.lr=0.1"])
    assert a.section_hash("train.method") == c.section_hash("train.method")
    assert a.section_hash("train.lr") != c.section_hash("train.lr")


def test_a_setting_added_later_and_left_unset_keeps_finished_stages_finished():
    from sasft_ray.config import MixConfig

    class MixConfigOfALaterVersion(MixConfig):
        added_later: int | None = None

    now = load_config("demo")
    later = now.model_copy(update={"mix": MixConfigOfALaterVersion(**now.mix.model_dump())})
    assert later.section_hash("mix") == now.section_hash("mix")
    later.mix.added_later = 3
    assert later.section_hash("mix") != now.section_hash("mix")


def test_cli_config_prints_resolved_yaml_and_reports_errors(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run_dir": "r", "model": {"path": "m"}, "data": {"path": "d.jsonl"}}))
    assert main(["config", str(path), "--set", "selftalk.turns=2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["selftalk"]["turns"] == 2 and printed["selftalk"]["top_p"] == 0.9
    assert main(["config", str(path), "--set", "selftalk.trns=2"]) == 2
    assert "did you mean 'selftalk.turns'" in capsys.readouterr().err


def test_cli_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("generate", "config", "tiny-model"):
        assert command in out


def test_local_paths_become_absolute_hub_ids_do_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "m").mkdir(parents=True)
    cfg = validate_config({"run_dir": "runs/x", "model": {"path": "models/m"}, "data": {"path": "org/dataset"}})
    fixed = absolute_paths(cfg)
    assert fixed.run_dir == str(tmp_path / "runs/x") and fixed.model.path == str(tmp_path / "models/m")
    assert fixed.data.path == "org/dataset"  # not here: a hub id


def test_a_chat_template_file_is_checked_at_load_served_and_fingerprinted(tmp_path, monkeypatch):
    from sasft_ray.engines import engine_kwargs
    from sasft_ray.rundir import MODEL_FILES, fingerprints

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}{{ m.content }}")
    with pytest.raises(ConfigError, match="model.chat_template missing.jinja: cannot be read"):
        load_config("demo", ["model.chat_template=missing.jinja"])
    with pytest.raises(ConfigError, match="model.chat_template bad.jinja, line 1: not a Jinja template"):
        load_config("demo", ["model.chat_template=bad.jinja"])
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    cfg = load_config("demo", ["model.chat_template=chat.jinja"])
    assert absolute_paths(cfg).model.chat_template == str(template)  # Ray workers run elsewhere
    # served by its text (a replica's node may not have the file); self-talk renders its prompts itself
    assert engine_kwargs(cfg, cfg.serve.engine, serving=True)["chat_template"] == template.read_text()
    assert "chat_template" not in engine_kwargs(cfg, cfg.selftalk.engine)
    assert load_config("demo").section_hash("model") != cfg.section_hash("model")
    before = fingerprints(cfg, *MODEL_FILES)["model.chat_template"]
    template.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}{% endfor %}")
    assert before and fingerprints(cfg, *MODEL_FILES)["model.chat_template"] != before  # edited in place


def test_select_needs_the_held_out_losses_it_chooses_by():
    base = {"run_dir": "r", "model": {"path": "m"}, "data": {"path": "x"}}
    assert validate_config(base).train.select == "last"
    assert validate_config({**base, "train": {"select": "best_task"}}).train.select_tolerance == 0.02
    with pytest.raises(ConfigError, match=r"train.select best_task .* needs data.heldout_fraction > 0"):
        validate_config({**base, "data": {"path": "x", "heldout_fraction": 0}, "train": {"select": "best_task"}})
    with pytest.raises(ConfigError, match=r"train.select balanced .* needs selftalk.heldout_fraction > 0"):
        validate_config({**base, "selftalk": {"heldout_fraction": 0}, "train": {"select": "balanced"}})
    with pytest.raises(ConfigError, match=r"train.select balanced .* needs data.heldout_fraction > 0"):
        validate_config({**base, "data": {"path": "x", "heldout_fraction": 0}, "train": {"select": "balanced"}})
    with pytest.raises(ConfigError, match="train.select_tolerance"):
        validate_config({**base, "train": {"select": "balanced", "select_tolerance": -0.1}})
    with pytest.raises(ConfigError, match="train.select"):
        validate_config({**base, "train": {"select": "best"}})


def test_select_enters_the_train_hash_only_off_its_default():
    """A run trained before train.select existed stays finished (its default is that run's behaviour);
    another rule, or another tolerance, is another training."""
    now = load_config("demo")
    before = json.dumps({"train": {k: v for k, v in now.train.model_dump(mode="json", exclude_none=True).items()
                                   if k not in ("select", "select_tolerance")}}, sort_keys=True)
    assert now.section_hash("train") == hashlib.sha256(before.encode()).hexdigest()[:16]
    best = load_config("demo", ["train.select=best_task"])
    balanced = load_config("demo", ["train.select=balanced"])
    wider = load_config("demo", ["train.select=balanced", "train.select_tolerance=0.05"])
    assert len({now.section_hash("train"), best.section_hash("train"), balanced.section_hash("train"),
                wider.section_hash("train")}) == 4
    assert load_config("demo", ["train.select=last"]).section_hash("train") == now.section_hash("train")


def test_a_bootstraps_own_benchmarks_are_checked_only_once_it_has_written_them(tmp_path, monkeypatch):
    """`sasft run demo` on a clean clone: the lab's evals and the real-model probes do not exist before the
    bootstrap writes them, and that is no mistake; without a bootstrap, a missing benchmark is one."""
    from sasft_ray.evaluate import EvalError, check_eval

    monkeypatch.chdir(tmp_path)
    for name in ("demo", "smollm2"):
        check_eval(load_config(name))
    with pytest.raises(EvalError, match="eval suite 'knowledge': no file or folder"):
        check_eval(load_config("smollm2", ["bootstrap=null"]))
