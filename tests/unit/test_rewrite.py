"""train.method sdft without an engine: its config, the rule that keeps, replaces or drops a rewrite, the mix
of a rewrite folder written here the way the stage writes it, the method table, `compare`, the card."""

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sasft_ray.card import model_card
from sasft_ray.config import REWRITE_PROMPT, ConfigError
from sasft_ray.layout import COMPARE, MIXED_PART, REWRITE, TASK_TRAIN
from sasft_ray.methods import METHODS
from sasft_ray.mix import write_mix
from sasft_ray.rewrite import REWRITE_SCHEMA, judge, prompts, rewrite_counts
from sasft_ray.rundir import RunDir
from tests.conftest import make_config


def chat(*contents):
    return [{"role": role, "content": c} for role, c in zip(["user", "assistant"] * len(contents), contents)]


def sdft(tmp_path, **section):
    return make_config(tmp_path, train={"method": "sdft"}, sdft=section).sdft


def test_the_sdft_section_defaults_and_refuses_what_cannot_run(tmp_path):
    cfg = make_config(tmp_path, train={"method": "sdft"})
    assert cfg.sdft.prompt == REWRITE_PROMPT and "{prompt}" in REWRITE_PROMPT and "{reference}" in REWRITE_PROMPT
    assert (cfg.sdft.keep_if, cfg.sdft.min_score, cfg.sdft.temperature, cfg.sdft.on_lost) == (
        "contains", 1.0, 0.0, "original")
    for section, named in (({"answer_pattern": "(unclosed"}, "sdft.answer_pattern.*not a regex"),
                           ({"answer_pattern": "ANS=\\w+"}, "sdft.answer_pattern.*no group"),
                           ({"prompt": "{reference} {other}"}, "sdft.prompt.*KeyError"),
                           ({"prompt": "rewrite {prompt}"}, "sdft.prompt.*put \\{reference\\}"),
                           ({"keep_if": "nope"}, "sdft.keep_if.*unknown scorer"),
                           ({"on_lost": "keep"}, "sdft.on_lost"), ({"min_score": 1.5}, "sdft.min_score")):
        with pytest.raises(ConfigError, match=named):
            make_config(tmp_path, sdft=section)


def test_a_rewrite_is_prompted_with_the_task_input_and_its_reference(tmp_path):
    system = [{"role": "system", "content": "Be terse."}]
    (first, second) = prompts(system + chat("q1", "a1", "q2", "a2"), "{prompt} | {reference}")
    assert first == system + [{"role": "user", "content": "q1 | a1"}]
    assert second == system + chat("q1", "a1") + [{"role": "user", "content": "q2 | a2"}]  # the reference a1


def test_a_rewrite_that_keeps_the_answer_is_used_one_that_loses_it_is_replaced_or_dropped(tmp_path):
    row = chat("Double abc.", '{"result": "aabbcc"}')
    keep = sdft(tmp_path, answer_pattern='"result": "(\\w+)"')
    used = judge(row, [("The answer is aabbcc.", "")], keep)
    assert used == {"messages": chat("Double abc.", "The answer is aabbcc."), "score": 1.0, "replaced": False,
                    "rejected": "", "drop_reason": ""}
    lost = judge(row, [("The answer is abc.", "")], keep)
    assert lost == {"messages": row, "score": 0.0, "replaced": True, "rejected": "lost answer", "drop_reason": ""}
    drop = sdft(tmp_path, answer_pattern='"result": "(\\w+)"', on_lost="drop")
    assert judge(row, [("The answer is abc.", "")], drop)["drop_reason"] == "lost answer"
    assert judge(row, [("  ", "")], drop)["drop_reason"] == "empty"
    assert judge(row, [("aabbcc and more", "truncated")], drop)["drop_reason"] == "truncated"  # the engine's reason
    assert judge(row, [("<|eot|> aabbcc", "")], drop, markers=("<|eot|>",))["drop_reason"] == "template leak"
    # without a pattern (or where it finds nothing) contains asks for the whole reference
    assert judge(row, [("The answer is aabbcc.", "")], sdft(tmp_path))["rejected"] == "lost answer"
    # a threshold on a graded scorer
    graded = sdft(tmp_path, keep_if="rouge_l", min_score=0.3)
    assert not judge(chat("q", "the cat sat on the mat"), [("a cat sat on a mat", "")], graded)["rejected"]
    # several replies: each judged; one lost replaces that one only, and the row is counted replaced
    two = judge(chat("q1", "x 1", "q2", "x 2"), [("so 1", ""), ("so 3", "")], sdft(tmp_path, answer_pattern="x (\\d)"))
    assert two["messages"] == chat("q1", "so 1", "q2", "x 2") and two["replaced"] and two["score"] == 0.0


def rewrite_run(tmp_path, on_lost="original", **sections):
    """A run dir whose task and rewrite stages are done: 10 task rows, rewrites of which rows 0-5 kept the
    answer, 6-7 lost it, 8-9 were cut at max_tokens."""
    cfg = make_config(tmp_path, train={"method": "sdft"}, sdft={"answer_pattern": "a (\\d+)", "on_lost": on_lost},
                      **sections)
    rd = RunDir(cfg.run_dir)
    rd.fs.create_dir(rd.local("task"))
    pq.write_table(pa.Table.from_pylist([{"messages": chat(f"q {i}", f"a {i}"), "source_row": i} for i in range(10)]),
                   rd.local(TASK_TRAIN))
    texts = [(f"it is {i}", "") for i in range(6)] + [("it is 99", "")] * 2 + [("it is", "truncated")] * 2
    rows = [{"source_row": i, "original": [f"a {i}"], "num_tokens": 5,
             **judge(chat(f"q {i}", f"a {i}"), [texts[i]], cfg.sdft)} for i in range(10)]
    rd.fs.create_dir(rd.local(REWRITE))
    for part in range(2):  # several files, like Ray Data writes
        pq.write_table(pa.Table.from_pylist(rows[part::2], REWRITE_SCHEMA), rd.local(REWRITE, f"{part}.parquet"))
    rd.begin("task", "test")
    rd.finish("task", {"train_rows": 10, "heldout_rows": 2})
    rd.begin("rewrite", "test")
    rd.finish("rewrite", rewrite_counts(rd))
    return cfg, rd


def test_the_counts_add_up_and_the_mix_takes_the_kept_rewrites_in_place_of_the_task_rows(tmp_path):
    cfg, rd = rewrite_run(tmp_path / "original")
    counts = rewrite_counts(rd)
    assert counts == {"rows_in": 10, "rows_out": 10, "rewritten": 6, "replaced": 4,
                      "replaced_reasons": {"lost answer": 2, "truncated": 2}, "drops": {}, "generated_tokens": 50}
    write_mix(cfg, rd)
    mixed = {r["id"]: r["messages"] for r in pq.read_table(rd.local(MIXED_PART)).to_pylist()}
    assert mixed == {i: chat(f"q {i}", f"it is {i}" if i < 6 else f"a {i}") for i in range(10)}

    cfg, rd = rewrite_run(tmp_path / "drop", on_lost="drop")
    counts = rewrite_counts(rd)
    assert counts["rows_out"] == counts["rewritten"] == 6 and counts["replaced"] == 0
    assert counts["drops"] == {"lost answer": 2, "truncated": 2}
    mix = write_mix(cfg, rd)
    rows = pq.read_table(rd.local(MIXED_PART)).to_pylist()
    assert mix["task_rows"] == mix["rows_out"] == 6 and {r["source"] for r in rows} == {"task"}
    assert sorted(r["id"] for r in rows) == list(range(6))


def test_sdft_in_the_method_table_and_as_a_compared_method(tmp_path):
    from sasft_ray.generate import mix_hash
    from sasft_ray.pipeline import method_runs

    method = METHODS["sdft"]
    assert method.rewrites and method.mixed_in is None and not method.freezes
    assert method.reads == ("task", "rewrite") and METHODS["sft"].reads == ("task",)
    cfg = make_config(tmp_path, compare=["sdft"], selftalk={"heldout_fraction": 0.1})
    sub, rd = method_runs(cfg, RunDir(cfg.run_dir))["sdft"]
    assert sub.training_method is method and rd.root == f"{cfg.run_dir}/{COMPARE}/sdft"
    assert sub.selftalk_wanted(36) == (0, 4) and sub.selftalk.monitor_from == cfg.run_dir
    assert sub.mix_rows(36) == 36  # an upper bound for the planner: the rewrite keeps at most every row

    # the mix is stale once the rewrite stage is redone
    cfg, rd = rewrite_run(tmp_path / "chain")
    before = mix_hash(cfg, rd)
    rd.begin("rewrite", "test", force=True)
    rd.finish("rewrite", rewrite_counts(rd))
    assert mix_hash(cfg, rd) != before


def test_the_card_of_an_sdft_fine_tune_counts_its_rewrites(tmp_path):
    cfg, rd = rewrite_run(tmp_path)
    card = model_card(cfg, rd)
    assert "with self-distillation fine-tuning (SDFT)" in card and "| method | sdft |" in card
    assert "| rewritten replies | 6 of 10 task rows in the base model's words, 4 kept as they were (sdft.on_lost), " \
           "0 dropped |" in card


def test_the_plan_of_sdft_is_sfts_with_the_rewrites_timed(tmp_path, capsys):
    import yaml

    from sasft_ray.cli import main

    texts = {}
    for method in ("sdft", "sft"):
        raw = make_config(tmp_path, "meta-llama/Meta-Llama-3-8B-Instruct", train={"method": method},
                          resources={"use_gpu": True}).model_dump(mode="json")
        (tmp_path / f"{method}.yaml").write_text(yaml.safe_dump(raw))
        with pytest.raises(SystemExit):  # 8B on 2 GPUs without offload: does not fit; the plan is printed anyway
            main(["plan", str(tmp_path / f"{method}.yaml"), "--task-rows", "20000"])
        texts[method] = capsys.readouterr().out
    assert "rewrites (sdft) at TP 1: 18,000 task rows, <= 9,216,000 tokens decoded" in texts["sdft"]
    assert "rewrites" not in texts["sft"]
    steps = [re.search(r"time: ([\d,]+) steps", texts[m]).group(1) for m in ("sdft", "sft")]
    assert steps[0] == steps[1] == "2,250"  # every row kept: an upper bound


def test_a_rewrite_that_cannot_fit_the_engine_is_refused_before_one_starts(tmp_path):
    from sasft_ray.chat import model_tokenizer, turn_format
    from sasft_ray.rewrite import check_fits
    from sasft_ray.tiny import WORDS, train_tokenizer

    train_tokenizer("llama", WORDS, vocab_size=300).save_pretrained(tmp_path / "model")

    def config(max_tokens, max_model_len):
        return make_config(tmp_path, str(tmp_path / "model"), train={"method": "sdft"}, sdft={"max_tokens": max_tokens},
                           selftalk={"max_user_tokens": 8, "max_assistant_tokens": 8,
                                     "engine": {"max_model_len": max_model_len}})

    tokenizer = model_tokenizer(config(64, 2048).model)
    fmt = turn_format(tokenizer)
    check_fits(config(64, 2048), tokenizer, fmt)
    with pytest.raises(ConfigError, match=r"sdft rewrites need at least \d+ tokens \(the chat template's and "
                                          r"sdft.prompt's \d+ \+ sdft.max_tokens 1900\), over "
                                          r"selftalk.engine.max_model_len 2048"):
        check_fits(config(1900, 2048), tokenizer, fmt)


def test_an_edited_keep_if_scorer_file_redoes_the_rewrites_stand_in_for_the_engine(tmp_path, monkeypatch):
    """A `module:function` keep_if is an input of the rewrite stage: the same file reuses the rewrites; an edited
    one is refused, naming it, until the stage is redone. The rewriting itself (an engine) is stood in for by a
    counter."""
    import sasft_ray.generate as generate
    from sasft_ray.rundir import StageChanged

    (tmp_path / "my_keep.py").write_text("def keep(text, row):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    runs = []
    monkeypatch.setattr(generate, "write_rewrites", lambda cfg, rd, rows: runs.append(rows) or {"rows_in": rows,
                                                                                               "rows_out": rows})
    cfg = make_config(tmp_path, train={"method": "sdft"}, sdft={"keep_if": "my_keep:keep"})
    rd = RunDir(cfg.run_dir)
    for _ in range(2):
        generate.rewrite_stage(cfg, rd, force=False, task_rows=8)
    assert runs == [8]
    (tmp_path / "my_keep.py").write_text("def keep(text, row):\n    return float('ANS' in text)\n")
    with pytest.raises(StageChanged, match="made from other files at sdft.keep_if"):
        generate.rewrite_stage(cfg, rd, force=False, task_rows=8)
    assert runs == [8]
    generate.rewrite_stage(cfg, rd, force=True, task_rows=8)  # what `--redo rewrite` does
    assert runs == [8, 8]
