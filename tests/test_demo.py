"""`python -m flaxlm.demo --runlocal` end to end: every stage runs, every policy is evaluated,
the report is written, the printed per-stage commands rebuild exactly the configs the stages
ran with, and a second invocation resumes instead of redoing work."""

import json
import os
import shlex

import pytest
from absl import flags
from ml_collections import config_flags

from flaxlm import demo, demo_report
from flaxlm.demo_report import POLICIES, SAMPLED, STUDENTS
from flaxlm.train.checkpoint import read_meta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo_dir(demo_run):
    """The finished runlocal demo. tests/conftest.py starts it in a worker process as soon as
    this file is collected, so it runs alongside the tests before this one; `demo_main` runs
    further demo.main calls in that worker."""
    return demo_run


def test_every_stage_runs_and_every_policy_is_evaluated(demo_dir):
    times = json.load(open(os.path.join(demo_dir, "times.json")))
    assert list(times) == list(demo.STAGES)
    results = json.load(open(os.path.join(demo_dir, "eval", "results.json")))
    assert list(results) == list(POLICIES + STUDENTS)
    for name, row in results.items():
        assert 1.0 < row["ppl_heldout_text/ppl"] < 600, name  # vocab 512: uniform is 512
        assert 0.0 <= row["mc_facts_heldout/acc"] <= 1.0
        if name in STUDENTS:  # base models of half the width: text and multiple choice
            assert row["params"] < 0.6 * results["pretrain"]["params"], name
            assert "gen_instructions_heldout/judge" not in row
            # ... and the pretrained model's speculative draft (models/speculative.py)
            assert 0.0 <= row["draft/alpha"] <= 1.0
            assert 1.0 <= row["draft/tokens_per_forward"] <= 1 + demo_report.DRAFT_TOKENS
            continue
        assert -1.5 <= row["gen_instructions_heldout/judge"] <= 1.0
        assert row["gen_instructions_heldout/n"] == demo.PLAN["eval_examples"][1]
        assert "rm_score" in row
        if name != "pretrain":  # chat models are also sampled
            assert 0.0 <= row[f"{SAMPLED}/well_formed"] <= 1.0
            assert row[f"{SAMPLED}/pass@4"] >= row[f"{SAMPLED}/correct"]
    assert all("kl_to_sft" in results[n] for n in ("dpo", "ppo", "grpo"))
    assert "kl_to_sft" not in results["sft"]

    report = open(os.path.join(demo_dir, "report.md")).read()
    assert "**runlocal** run" in report
    assert "| metric | pretrain | sft | dpo | ppo | grpo |" in report
    assert "Change over SFT on sampled answers" in report and "- ppo: judge" in report
    assert "| metric | teacher (pretrain) | student alone | student distilled |" in report
    assert "agrees with the teacher's on" in report
    assert "| as the teacher's draft: tokens per teacher forward | – |" in report
    _, meta = read_meta(os.path.join(demo_dir, "distill"))
    assert meta["teacher"] == os.path.join(demo_dir, "pretrain")
    for png in ("losses.png", "rl.png", "accuracy.png"):
        assert os.path.getsize(os.path.join(demo_dir, png)) > 10_000, png
    data = json.load(open(os.path.join(demo_dir, "data", "report.json")))
    assert data["tokens"] > 10_000


def _config_from_command(command: str, workdir: str):
    """The config a printed `python -m flaxlm.train.main ...` command would run with."""
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "flaxlm.train.main"]
    assert argv[argv.index("--workdir") + 1] == workdir
    fv = flags.FlagValues()
    args = [argv[0]] + argv[3 : argv.index("--workdir")]
    # sys_argv: the override flags (--config.a.b=...) are defined from the arguments to parse.
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=fv, lock_config=True, sys_argv=args
    )
    fv(args)
    from flaxlm.train.main import parsed_config

    return parsed_config(fv["config"])  # as train.main reads it (records model keys given)


@pytest.mark.parametrize(
    "stage", ["pretrain", "sft", "reward", "dpo", "ppo", "grpo", "student", "distill"]
)
def test_printed_commands_rebuild_each_stage_config(demo_dir, stage, monkeypatch):
    monkeypatch.chdir(REPO)  # commands name configs/<file>.py relative to the repository
    commands = json.load(open(os.path.join(demo_dir, "commands.json")))
    workdir = os.path.join(demo_dir, stage)
    rebuilt = _config_from_command(commands[stage], workdir)
    _, meta = read_meta(workdir)
    assert json.loads(json.dumps(rebuilt.to_dict())) == meta["config"]


def test_rerun_resumes_finished_stages(demo_dir, demo_main):
    before = json.load(open(os.path.join(demo_dir, "times.json")))
    mtime = os.path.getmtime(os.path.join(demo_dir, "eval", "results.json"))
    demo_main(["--workdir", demo_dir, "--runlocal", "--stages", "data,pretrain,sft,eval"])
    after = json.load(open(os.path.join(demo_dir, "times.json")))
    assert os.path.getmtime(os.path.join(demo_dir, "eval", "results.json")) == mtime
    for stage in ("data", "pretrain", "sft", "eval"):
        # a finished stage only checks its outputs (restoring a checkpoint costs a few seconds)
        assert after[stage] - before[stage] < 20, stage


def test_changed_settings_refuse_and_changed_checkpoints_reevaluate(demo_dir, demo_main):
    """`--plan sft_steps=N` on a finished SFT stops and names the stages to delete (resuming
    would mix two runs); eval re-evaluates once a checkpoint it reads changed."""
    with pytest.raises(SystemExit, match=r"sft in .* total_steps: 12 -> 13.*rm -r \S*/sft "
                                         r"\S*/reward \S*/dpo \S*/ppo \S*/grpo"):  # fmt: skip
        demo_main(["--workdir", demo_dir, "--runlocal", "--plan", "sft_steps=13",
                   "--stages", "sft"])  # fmt: skip
    results = os.path.join(demo_dir, "eval", "results.json")
    inputs_path = os.path.join(demo_dir, "eval", "inputs.json")
    inputs = json.load(open(inputs_path))
    assert inputs["checkpoints"]["grpo"][0] == demo.PLAN["grpo_steps"][1]
    stale = json.loads(json.dumps(inputs))
    # As if the reward model had been retrained since: it scores the held-out responses (the
    # report's reward-model row), and eval reused the old model's scores beside the new one.
    stale["checkpoints"]["reward"][1] -= 1
    json.dump(stale, open(inputs_path, "w"))
    before = os.path.getmtime(results)
    demo_main(["--workdir", demo_dir, "--runlocal", "--stages", "eval"])
    assert os.path.getmtime(results) > before
    assert json.load(open(inputs_path)) == inputs
