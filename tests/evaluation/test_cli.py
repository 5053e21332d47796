"""`python -m flaxlm.evaluation` end to end on a tiny checkpoint trained for 2 steps."""

import json
import subprocess
import sys

import pytest

from flaxlm.evaluation.__main__ import main


def test_cli_end_to_end(run_dir, world_dir, tok_path, tmp_path, capsys):
    (tmp_path / "mmlu.jsonl").write_text(
        json.dumps({"question": "2 + 2 =", "options": ["3", "4"], "label": "B"}) + "\n"
        + json.dumps({"question": "Kavo lives in", "options": ["Paris", "Lima"], "label": 0})
    )  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps({
        "name": "mmlu_mini", "type": "multiple_choice", "file": "mmlu.jsonl",
        "fields": {"context": "question", "choices": "options", "answer": "label"},
        "template": "{context}\n{choices_block}\nAnswer:", "choice_template": " {letter}",
    }))  # fmt: skip
    out = tmp_path / "res" / "results.json"
    tasks = f"mc_facts_heldout,gen_facts_train,ppl_heldout_text,{tmp_path / 'spec.json'}"
    argv = ["--checkpoint", run_dir, "--world", world_dir, "--tokenizer", tok_path,
            "--tasks", tasks, "--limit", "4", "--out", str(out), "--samples",
            "--batch_tokens", "128", "--num_fewshot", "1"]  # fmt: skip
    ret = main(argv)
    table = capsys.readouterr().out
    for name in ("mc_facts_heldout", "gen_facts_train", "ppl_heldout_text", "mmlu_mini",
                 "acc_norm", "judge", "ppl"):  # fmt: skip
        assert name in table
    saved = json.loads(out.read_text())
    assert saved["step"] == 2 and saved["tokenizer"] == tok_path
    res = saved["tasks"]
    assert set(res) == {"mc_facts_heldout", "gen_facts_train", "ppl_heldout_text", "mmlu_mini"}
    assert all(r["spec"]["num_fewshot"] == 1 for r in res.values())
    gen = res["gen_facts_train"]
    assert gen["n"] == 4 and -1.5 <= gen["metrics"]["judge"] <= 1.0
    assert all(s["prompt"].count("Question:") == 2 for s in gen["samples"])  # 1 shot + question
    assert res["mc_facts_heldout"]["n"] == 4 and res["mmlu_mini"]["n"] == 2
    for r in (res["mc_facts_heldout"], res["mmlu_mini"]):
        assert 0.0 <= r["metrics"]["acc"] <= 1.0 and len(r["samples"]) == r["n"]
    ppl = res["ppl_heldout_text"]["metrics"]
    assert ppl["docs"] == 4 and 1.0 < ppl["ppl"] < 1e4 and ppl["tokens"] > 100
    assert ret["tasks"]["mmlu_mini"]["metrics"] == res["mmlu_mini"]["metrics"]


def test_cli_sampling_is_seeded(run_dir, world_dir, tok_path):
    """--temperature/--num_samples sample every generation task through the real decoder: the
    same seed gives the same samples, another seed other ones; scoring tasks are untouched."""
    argv = ["--checkpoint", run_dir, "--world", world_dir, "--tokenizer", tok_path, "--tasks",
            "gen_facts_train,mc_facts_heldout", "--limit", "3", "--samples",
            "--temperature", "1.0", "--num_samples", "2"]  # fmt: skip
    a, b = main(argv)["tasks"], main(argv)["tasks"]
    c = main(argv + ["--seed", "7"])["tasks"]
    gen = a["gen_facts_train"]
    assert gen["spec"]["temperature"] == 1.0 and gen["spec"]["num_samples"] == 2
    assert "pass@2" in gen["metrics"] and all(len(s["responses"]) == 2 for s in gen["samples"])
    responses = lambda r: [s["responses"] for s in r["gen_facts_train"]["samples"]]
    assert responses(a) == responses(b) and responses(a) != responses(c)
    assert a["mc_facts_heldout"]["spec"]["temperature"] == 0.0
    with pytest.raises(SystemExit, match="needs temperature > 0"):
        main(argv[:-4] + ["--num_samples", "2"])
    # --reasoning_end reaches every generation task: this model never writes the marker, so
    # every response is an unfinished reasoning, scored as no answer
    r = main(argv[:-4] + ["--reasoning_end", "</think>"])["tasks"]["gen_facts_train"]
    assert r["spec"]["reasoning_end"] == "</think>" and r["metrics"]["reasoning_unfinished"] == 1
    assert all(s["response"] == "" and isinstance(s["reasoning"], str) for s in r["samples"])


def test_cli_errors(run_dir, world_dir, tok_path):
    with pytest.raises(SystemExit, match="pass --tokenizer"):
        main(["--checkpoint", run_dir, "--world", world_dir, "--tasks", "mc_arithmetic"])
    with pytest.raises(KeyError, match="unknown task 'mc_nope'"):
        main(["--checkpoint", run_dir, "--world", world_dir, "--tokenizer", tok_path,
              "--tasks", "mc_nope"])  # fmt: skip


def test_cli_checks_every_task_file_before_running_any(run_dir, tok_path, tmp_path, capsys):
    rows = [{"context": "a", "choices": ["x", "y"], "answer": 0}]
    (tmp_path / "ok.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n")
    specs = [{"name": "ok", "type": "multiple_choice", "file": "ok.jsonl"},
             {"name": "bad", "type": "multiple_choice", "file": "bad.jsonl"},
             {"name": "gone", "type": "multiple_choice", "file": "gone.jsonl"}]  # fmt: skip
    for spec in specs[1:]:
        (tmp_path / f"{spec['name']}.json").write_text(json.dumps([specs[0], spec]))
        with pytest.raises(SystemExit, match=rf"{spec['file']}(:2: invalid JSON|: no such file)"):
            main(["--checkpoint", run_dir, "--tokenizer", tok_path,
                  "--tasks", str(tmp_path / f"{spec['name']}.json")])  # fmt: skip
        assert "[eval] ok" not in capsys.readouterr().err  # no task ran before the error


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "flaxlm.evaluation", "--help"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "--checkpoint" in out and "--tasks" in out and "--world" in out


def test_tokenizer_and_chat_mode_come_from_the_checkpoint_meta(tmp_path, tok_path):
    from flaxlm.evaluation.__main__ import chat_mode, tokenizer_path

    assert tokenizer_path("", {"tokenizer": tok_path}, str(tmp_path)) == tok_path
    (tmp_path / "tokenizer.model").write_bytes(b"")
    rel = tokenizer_path("", {"tokenizer": "tokenizer.model"}, str(tmp_path))
    assert rel == str(tmp_path / "tokenizer.model")  # relative to the run directory
    assert tokenizer_path(tok_path, {"tokenizer": "elsewhere"}, str(tmp_path)) == tok_path
    with pytest.raises(SystemExit, match="not found"):
        tokenizer_path("", {"tokenizer": "missing.model"}, str(tmp_path))
    assert chat_mode("auto", {"task": "pretrain"}) is None
    assert chat_mode("auto", {"task": "sft"}) is True
    assert chat_mode("off", {"task": "sft"}) is False and chat_mode("on", {}) is True


def test_a_run_that_is_no_language_model_is_a_one_line_error(tmp_path, tok_path):
    """--checkpoint naming a reward-model run printed a traceback (load_model's CheckpointError
    was re-raised unless --ema); so did a directory without checkpoints. Both exit with the
    message."""
    import numpy as np

    from flaxlm.models.config import get_variant
    from flaxlm.train.checkpoint import Checkpointer

    rows = [{"context": "a", "choices": ["x", "y"], "answer": 0}]
    (tmp_path / "ok.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"name": "ok", "type": "multiple_choice", "file": "ok.jsonl"}]))
    rm = str(tmp_path / "rm")
    ck = Checkpointer(rm, async_save=False)
    meta = {"model_config": get_variant("tiny", vocab_size=512).to_dict(), "head": "scalar"}
    ck.save(1, {"params": {"w": np.zeros(2, np.float32)}}, meta=meta)
    ck.close()
    argv = ["--tokenizer", tok_path, "--tasks", str(tasks)]
    with pytest.raises(SystemExit, match=r"rm: a reward-model run \(scalar head\), not a "):
        main(["--checkpoint", rm, *argv])
    with pytest.raises(SystemExit, match="no checkpoint under"):
        main(["--checkpoint", str(tmp_path / "nowhere"), *argv])
