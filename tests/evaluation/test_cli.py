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
    # --gen_batch_size (the CLI had no way to set it) changes the batching, not the samples.
    one = main(argv + ["--gen_batch_size", "1"])
    assert one["gen_batch_size"] == 1 and responses(one["tasks"]) == responses(a)
    with pytest.raises(SystemExit, match="needs temperature > 0"):
        main(argv[:-4] + ["--num_samples", "2"])
    # --top_k 1 reaches the sampler: every sample is the most likely token, the greedy answer
    k1 = main(argv + ["--top_k", "1"])["tasks"]["gen_facts_train"]
    assert k1["spec"]["top_k"] == 1 and all(len(set(s["responses"])) == 1 for s in k1["samples"])
    greedy = main(argv[:-4])["tasks"]["gen_facts_train"]["samples"]
    assert [s["responses"][0] for s in k1["samples"]] == [s["response"] for s in greedy]
    with pytest.raises(SystemExit, match=r"top_p filter samples: they need temperature > 0 .*"
                                         r"\(--top_p 0.9\)$"):  # fmt: skip
        main(argv[:-4] + ["--top_p", "0.9"])
    # --reasoning_end reaches every generation task: this model never writes the marker, so
    # every response is an unfinished reasoning, scored as no answer
    r = main(argv[:-4] + ["--reasoning_end", "</think>"])["tasks"]["gen_facts_train"]
    assert r["spec"]["reasoning_end"] == "</think>" and r["metrics"]["reasoning_unfinished"] == 1
    assert all(s["response"] == "" and isinstance(s["reasoning"], str) for s in r["samples"])


def test_cli_errors(run_dir, world_dir, tok_path, tmp_path, capsys):
    """--tasks naming an unknown task, a missing spec file or a spec with an unknown key, and
    --limit 0 / -1, used to end in tracebacks (KeyError, FileNotFoundError, ValueError) or, for
    --limit 0, in a misleading "no examples"; each is now a one-line usage error naming it."""
    with pytest.raises(SystemExit, match="pass --tokenizer"):
        main(["--checkpoint", run_dir, "--world", world_dir, "--tasks", "mc_arithmetic"])
    base = ["--checkpoint", run_dir, "--world", world_dir, "--tokenizer", tok_path]
    with pytest.raises(SystemExit, match="^--tasks: unknown task 'mc_nope'; known: .*mc_arithm"):
        main([*base, "--tasks", "mc_nope"])
    with pytest.raises(SystemExit, match=r"^--tasks: .*gone\.json: no such task spec file$"):
        main([*base, "--tasks", str(tmp_path / "gone.json")])
    (tmp_path / "k.json").write_text(json.dumps({"name": "k", "type": "generation",
                                                 "file": "g.jsonl", "bogus": 1}))  # fmt: skip
    with pytest.raises(SystemExit, match=r"k\.json\[0\]: unknown spec key\(s\) \['bogus'\]"):
        main([*base, "--tasks", str(tmp_path / "k.json")])
    for empty in ("", " , "):  # an empty $TASKS ran nothing, printed a bare table, exit 0
        with pytest.raises(SystemExit, match="^--tasks: no task names given"):
            main([*base, "--tasks", empty])
    for limit in ("0", "-1"):
        with pytest.raises(SystemExit) as e:
            main([*base, "--tasks", "mc_arithmetic", "--limit", limit])
        assert e.value.code == 2 and f"--limit: {limit}: must be >= 1" in capsys.readouterr().err
    # Each bad override names its own flag (--num_fewshot's was reported as a --chat problem,
    # --temperature's and --num_samples' named no flag).
    for flag, value, why in (("--num_fewshot", "-1", "-1: must be >= 0"),
                             ("--temperature", "-1", "-1.0: must be >= 0"),
                             ("--temperature", "nan", "nan: must be >= 0"),
                             ("--num_samples", "0", "0: must be >= 1")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main([*base, "--tasks", "gen_facts_train", flag, value])
        assert e.value.code == 2 and f"{flag}: {why}" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"num_samples > 1 needs temperature > 0 .*"
                                         r"\(--num_samples 3\)$"):  # fmt: skip
        main([*base, "--tasks", "gen_facts_train", "--num_samples", "3"])
    for value, why in (("0", "'0': expected k values >= 1"), ("x", "'x': expected k values")):
        with pytest.raises(SystemExit) as e:
            main([*base, "--tasks", "gen_facts_train", "--pass_at_k", value])
        assert e.value.code == 2 and f"--pass_at_k: {why}" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"num_samples >= 10 \(it has 2\) \(--pass_at_k 1,10\)$"):
        main([*base, "--tasks", "gen_facts_train", "--temperature", "1", "--num_samples", "2",
              "--pass_at_k", "1,10"])  # fmt: skip
    # --code_limits: a bad value names the field; no code-scored task for it is an error too
    # (it would change nothing). (What it binds: tests/evaluation/test_benchmarks.py.)
    with pytest.raises(SystemExit) as e:
        main([*base, "--tasks", "gen_facts_train", "--code_limits", "memory_mb=0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--code_limits: memory_mb=0: expected a positive integer" in err
    with pytest.raises(SystemExit, match=r"^--code_limits: none of the tasks scores code"):
        main([*base, "--tasks", "gen_facts_train", "--code_limits", "timeout=20"])
    (tmp_path / "c.json").write_text(
        json.dumps(
            {
                "name": "c",
                "type": "multiple_choice",
                "file": "c.jsonl",
                "template": "{context}\n{choices_block}",
            }
        )
    )
    with pytest.raises(SystemExit, match=r"chat mode's user turn .*\(--chat on\)$"):
        main([*base, "--tasks", str(tmp_path / "c.json"), "--num_fewshot", "0", "--chat", "on"])


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
    # What the run trained on decides, not its task's name: a distill student of
    # configs/distill.py:text=True saw pretraining text (data.kind "text"), never the chat
    # template, and was prompted with it; distilled on chats (no data.kind), it is chat-tuned.
    text = {"task": "distill", "config": {"task": "distill", "data": {"kind": "text"}}}
    chats = {"task": "distill", "config": {"task": "distill", "data": {"train": "c.jsonl"}}}
    assert chat_mode("auto", text) is None and chat_mode("auto", chats) is True
    assert chat_mode("on", text) is True  # --chat on still overrides
    for kind in ("text", "markov"):  # any task on pretraining data is a base model
        assert chat_mode("auto", {"task": "sft", "config": {"data": {"kind": kind}}}) is None
    # a pretrain run's meta (data.kind markov or text) stays per task
    assert chat_mode("auto", {"task": "pretrain", "config": {"data": {"kind": "text"}}}) is None


def test_a_student_distilled_on_text_is_prompted_as_each_task_says(run_dir, tok_path, tmp_path):
    """A configs/distill.py:text=True student (trained on pretraining text, a base model) got
    --chat auto's chat prompts like any post-trained run: every task's own template ignored and
    "chat_mode": "on". Its meta's config (data.kind "text") now makes it per task, as a
    pretrained run; the same checkpoint distilled on chats is still prompted as a chat model."""
    from flaxlm.train.checkpoint import Checkpointer, load_model

    cfg, params, _ = load_model(run_dir)

    def distilled(name, data):
        meta = {"model_config": cfg.to_dict(), "head": "lm", "lora": {}, "task": "distill",
                "config": {"task": "distill", "data": data}}  # fmt: skip
        ck = Checkpointer(str(tmp_path / name), async_save=False)
        ck.save(2, {"params": params}, meta=meta)
        ck.close()
        return str(tmp_path / name)

    (tmp_path / "g.jsonl").write_text(json.dumps({"prompt": "Kavo lives in", "answer": "Lima"}))
    tasks = _spec_file(tmp_path, "g.json", [{"name": "g", "type": "generation", "file": "g.jsonl",
                                             "template": "Q: {prompt}\nA:",
                                             "max_new_tokens": 2}])  # fmt: skip
    argv = ["--tokenizer", tok_path, "--tasks", tasks, "--samples"]
    out = main(["--checkpoint", distilled("text", {"kind": "text", "sources": ""}), *argv])
    assert (out["chat"], out["chat_mode"]) == ("auto", "per task")
    gen = out["tasks"]["g"]
    assert gen["spec"]["chat"] is False and gen["samples"][0]["prompt"] == "Q: Kavo lives in\nA:"
    chats = main(["--checkpoint", distilled("chats", {"train": "builtin:sft_train"}), *argv])
    assert chats["chat_mode"] == "on" and chats["tasks"]["g"]["spec"]["chat"] is True


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


def _spec_file(tmp_path, name, specs):
    (tmp_path / name).write_text(json.dumps(specs))
    return str(tmp_path / name)


@pytest.mark.parametrize(
    "spec, rows, match",
    [
        ({"type": "multiple_choice"},
         [{"context": "a", "choices": [" x", " y"], "answer": 0},
          {"context": "b", "choices": ["", " y"], "answer": 1}],
         r"t\.jsonl:2: task 'late': choice 0 \(''\) is empty"),
        ({"type": "generation", "max_new_tokens": 64}, [{"prompt": "a", "answer": "1"}],
         r"task 'late': max_new_tokens=64 leaves no room for the prompt within the model's "
         r"max_seq_len=64"),
        ({"type": "generation", "max_new_tokens": 4, "num_fewshot": 5},
         [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}],
         r"t\.jsonl:1: task 'late': wants 5 shots but the few-shot pool .* has only 1 usable"),
        ({"type": "perplexity", "stride": 128}, [{"text": "Kavo lives in Paris."}],
         r"task 'late' \(.*t\.jsonl\): stride=128 is wider than the window max_len=64"),
        ({"type": "perplexity"}, [{"text": ""}, {"text": ""}],
         r"task 'late' \(.*t\.jsonl\): every text is empty"),
        ({"type": "generation", "template": "[{meta[s]}] {prompt}", "max_new_tokens": 4},
         [{"prompt": "a", "answer": "1", "meta": {"s": "x"}}, {"prompt": "b", "answer": "2"}],
         r"t\.jsonl:2: task 'late': template '\[\{meta\[s\]\}\] \{prompt\}' uses 'meta'"),
    ],
)  # fmt: skip
def test_tasks_that_fail_when_reached_are_found_before_any_task_runs(
    run_dir, tok_path, tmp_path, capsys, spec, rows, match
):
    """Each of these passed the up-front check (which read the first row only and knew no
    max_seq_len) and failed with a traceback once the earlier task had run, --out unwritten:
    an empty choice on line 2, a generation budget >= max_seq_len, more shots than the pool
    holds, a perplexity stride wider than its window, all-empty texts, a template placeholder
    row 2 lacks (which named no file:line)."""
    (tmp_path / "ok.jsonl").write_text(json.dumps({"context": "a", "choices": [" x", " y"],
                                                   "answer": 0}) + "\n")  # fmt: skip
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    specs = [{"name": "ok", "type": "multiple_choice", "file": "ok.jsonl"},
             {"name": "late", "file": "t.jsonl", **spec}]  # fmt: skip
    out = tmp_path / "out.json"
    with pytest.raises(SystemExit, match=match):
        main(["--checkpoint", run_dir, "--tokenizer", tok_path, "--out", str(out),
              "--tasks", _spec_file(tmp_path, "s.json", specs)])  # fmt: skip
    assert "[eval] ok" not in capsys.readouterr().err and not out.exists()  # nothing ran


def test_a_task_failing_when_run_keeps_the_finished_tasks_results(
    run_dir, tok_path, tmp_path, monkeypatch, capsys
):
    """A task that failed at run time (what no check foresees) ended in a traceback after the
    earlier tasks ran, and --out was never written: their results were lost. Now it is a
    one-line exit and OUT.partial holds the finished tasks and the failure; an earlier
    complete OUT is left as it was (a rerun that failed, or was killed, after its first task
    replaced it with that one task's results)."""
    from flaxlm.evaluation.harness import Evaluator

    (tmp_path / "ok.jsonl").write_text(json.dumps({"context": "Kavo lives in",
                                                   "choices": [" Paris", " Lima"],
                                                   "answer": 0}) + "\n")  # fmt: skip
    specs = [{"name": name, "type": "multiple_choice", "file": "ok.jsonl"}
             for name in ("first", "boom", "never")]  # fmt: skip
    run = Evaluator.run

    def failing(self, spec, limit=None):
        if spec.name == "boom":
            raise KeyError("something only running finds")
        return run(self, spec, limit)

    monkeypatch.setattr(Evaluator, "run", failing)
    out = tmp_path / "res" / "out.json"
    out.parent.mkdir()
    out.write_text('{"earlier": "complete results"}')
    with pytest.raises(SystemExit, match=r"^task 'boom' failed: something only running finds; "
                       r"the 1 finished task\(s\) are in .*out\.json\.partial$"):  # fmt: skip
        main(["--checkpoint", run_dir, "--tokenizer", tok_path, "--out", str(out), "--tasks",
              _spec_file(tmp_path, "s.json", specs), "--batch_tokens", "128"])  # fmt: skip
    saved = json.loads((tmp_path / "res" / "out.json.partial").read_text())
    assert list(saved["tasks"]) == ["first"] and saved["tasks"]["first"]["n"] == 1
    assert saved["failed"] == {"task": "boom", "error": "something only running finds"}
    assert saved["tasks_requested"] == ["first", "boom", "never"] and not saved["complete"]
    assert json.loads(out.read_text()) == {"earlier": "complete results"}
    assert "first" in capsys.readouterr().out  # the table of what finished

    monkeypatch.setattr(Evaluator, "run", run)  # the rerun that completes replaces both
    main(["--checkpoint", run_dir, "--tokenizer", tok_path, "--out", str(out), "--tasks",
          _spec_file(tmp_path, "s.json", specs), "--batch_tokens", "128"])  # fmt: skip
    saved = json.loads(out.read_text())
    assert list(saved["tasks"]) == ["first", "boom", "never"] and saved["complete"]
    assert not (tmp_path / "res" / "out.json.partial").exists()


def test_results_record_what_reproduces_the_run(run_dir, tok_path, tmp_path, monkeypatch):
    """The JSON lacked --limit, --seed, --batch_tokens, the chat mode and template variables,
    and stored the tokenizer and task files as given (cwd-relative): two runs differing by seed
    had identical metadata. Paths are absolute now, with each task file's sha256 and rows."""
    import hashlib

    rows = [{"context": f"Kavo {i} lives in", "choices": [" Paris", " Lima"], "answer": i % 2}
            for i in range(3)]  # fmt: skip
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    _spec_file(tmp_path, "s.json", [{"name": "mc", "type": "multiple_choice", "file": "mc.jsonl",
                                     "num_fewshot": 1, "fewshot_file": "mc.jsonl"}])  # fmt: skip
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.json"
    main(["--checkpoint", run_dir, "--tokenizer", tok_path, "--tasks", "s.json", "--limit", "2",
          "--seed", "3", "--batch_tokens", "128", "--chat", "off",
          "--out", "out.json"])  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["tokenizer"] == tok_path and saved["checkpoint"] == run_dir
    assert (saved["limit"], saved["seed"], saved["batch_tokens"]) == (2, 3, 128)
    assert (saved["chat"], saved["chat_mode"], saved["chat_template_kwargs"]) == ("off", "off", {})
    task = saved["tasks"]["mc"]
    data = str(tmp_path / "mc.jsonl")
    assert task["spec"]["file"] == task["spec"]["fewshot_file"] == data
    want = {"path": data, "rows": 3,
            "sha256": hashlib.sha256((tmp_path / "mc.jsonl").read_bytes()).hexdigest()}  # fmt: skip
    assert task["files"] == {"file": want, "fewshot_file": want}


def test_tasks_a_plugin_module_registers_are_named_on_the_command_line(
        run_dir, tok_path, tmp_path, monkeypatch, capsys):  # fmt: skip
    """The docstring promised registered names, but the command line could import nothing:
    its registry was always empty ("known: []"). --tasks_module imports plug-ins first."""
    data = tmp_path / "mini.jsonl"
    data.write_text(json.dumps({"question": "2 + 2 =", "options": ["3", "4"], "label": 1}) + "\n")
    (tmp_path / "my_tasks.py").write_text(
        "from flaxlm.evaluation.tasks import TaskSpec, register\n"
        f"register(TaskSpec(name='my_mc', type='multiple_choice', file={str(data)!r}, "
        "fields={'context': 'question', 'choices': 'options', 'answer': 'label'}))\n"
    )  # fmt: skip
    monkeypatch.chdir(tmp_path)
    argv = ["--checkpoint", run_dir, "--tokenizer", tok_path, "--tasks", "my_mc"]
    with pytest.raises(SystemExit, match="my_mc"):
        main(argv)
    res = main([*argv, "--tasks_module", "my_tasks"])
    assert res["tasks"]["my_mc"]["n"] == 1 and "my_mc" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"--tasks_module: cannot import './my_tasks.py' .*"
                                         r"name a module, not a file path"):  # fmt: skip
        main([*argv, "--tasks_module", "./my_tasks.py"])


def test_code_limits_flag_goes_over_each_code_tasks_own():
    from flaxlm.evaluation.__main__ import _code_limits, _with_code_limits
    from flaxlm.evaluation.tasks import TaskSpec

    code = TaskSpec("c", "generation", "c.jsonl", scoring="code",
                    code_limits={"timeout": 20, "memory_mb": 2048})  # fmt: skip
    other = TaskSpec("g", "generation", "g.jsonl")
    got = _with_code_limits([code, other], _code_limits("memory_mb=4096,network=true"), "--x")
    assert got[0].code_limits == {"timeout": 20, "memory_mb": 4096, "network": True}
    assert got[0].limits.network and got[0].limits.timeout == 20 and got[1] is other
