"""flaxlm/demo.py's stage bookkeeping without training: the training stages run a fake trainer
that writes the checkpoint directory a real run would and returns its summary, so these tests
check what the demo does with a stage stopped short, the settings each stage records (the world,
the data, the checkpoint step of every run a stage starts from) and the reruns refused, the
command line's validation, and that the recorded commands reproduce the stages."""

import importlib
import json
import os
import shlex
import subprocess
import sys
import types

import pytest

from flaxlm import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeTrainer:
    """`module.run(cfg, workdir)` of every training stage: "trains" to `total_steps` (or to the
    step in `stop`, {stage: (step, "sigterm" | "data")}) by making checkpoints/<step>."""

    def __init__(self):
        self.ran, self.stop = [], {}

    def run(self, cfg, workdir):
        stage = os.path.basename(workdir)
        self.ran.append(stage)
        step, why = self.stop.pop(stage, (int(cfg.total_steps), None))
        os.makedirs(os.path.join(workdir, "checkpoints", str(step)), exist_ok=True)
        return None, {"step": step, "train": {}, "eval": {}, "preempted": why == "sigterm",
                      "data_exhausted": why == "data"}  # fmt: skip


TRAINERS = ("flaxlm.train.pretrain", "flaxlm.alignment.sft", "flaxlm.alignment.reward",
            "flaxlm.alignment.dpo", "flaxlm.alignment.ppo", "flaxlm.alignment.grpo",
            "flaxlm.alignment.distill")  # fmt: skip


@pytest.fixture
def trainer(monkeypatch):
    fake = FakeTrainer()
    for name in TRAINERS:
        monkeypatch.setattr(importlib.import_module(name), "run", fake.run)
    return fake


def _run(workdir, *args):
    demo.main(["--workdir", str(workdir), "--runlocal", *args])


def _record(workdir, stage):
    return json.load(open(os.path.join(workdir, stage, "demo_stage.json")))


# --- a stage stopped short; the runs a stage starts from --------------------------------------


def test_sigterm_stops_the_demo_and_the_rerun_starts_sft_from_the_finished_pretrain(
    tmp_path, trainer
):
    trainer.stop["pretrain"] = (22, "sigterm")
    with pytest.raises(SystemExit, match=r"pretrain was stopped by SIGTERM at step 22 of 300 .*"
                                         r"rerun to resume"):  # fmt: skip
        _run(tmp_path, "--stages", "pretrain,sft", "--plan", "pretrain_steps=300")
    assert trainer.ran == ["pretrain"]  # sft never started from the half-trained model
    assert "pretrain" in json.load(open(tmp_path / "times.json"))
    # Asked for alone, sft refuses to start from the unfinished run.
    with pytest.raises(SystemExit, match=r"sft starts from pretrain, which stopped at step 22 "
                                         r"of 300: rerun to resume pretrain first"):  # fmt: skip
        _run(tmp_path, "--stages", "sft", "--plan", "pretrain_steps=300")
    assert not os.path.exists(tmp_path / "sft")
    _run(tmp_path, "--stages", "pretrain,sft", "--plan", "pretrain_steps=300")
    assert trainer.ran == ["pretrain", "pretrain", "sft"]
    assert _record(tmp_path, "sft")["init_from checkpoint"] == "300"


def test_end_of_data_stops_the_demo(tmp_path, trainer):
    trainer.stop["pretrain"] = (17, "data")
    with pytest.raises(SystemExit, match=r"pretrain's training data ended at step 17 of 30 .*"
                                         r"--plan pretrain_steps=N") as e:  # fmt: skip
        _run(tmp_path, "--stages", "pretrain,sft")
    assert "rerun to resume" not in str(e.value)  # (it would end there again)
    assert trainer.ran == ["pretrain"]


def test_a_stage_whose_source_run_changed_is_refused(tmp_path, trainer):
    _run(tmp_path, "--stages", "pretrain,sft,reward,ppo")
    rec = _record(tmp_path, "ppo")
    assert rec["init_from checkpoint"] == "12" and rec["reward_from checkpoint"] == "8"
    # As if sft had been trained from pretrain's step 20 (then pretrain trained on to 30).
    path = tmp_path / "sft" / "demo_stage.json"
    json.dump({**_record(tmp_path, "sft"), "init_from checkpoint": "20"}, open(path, "w"))
    with pytest.raises(SystemExit, match=r"sft in \S* was made with other settings \(init_from "
                                         r"checkpoint: 20 -> 30\).*\(rm -r \S*/sft \S*/reward "
                                         r"\S*/ppo\)"):  # fmt: skip
        _run(tmp_path, "--stages", "sft")
    # distill reads pretrain as its teacher: recorded too.
    _run(tmp_path, "--stages", "distill")
    assert _record(tmp_path, "distill")["distill.teacher checkpoint"] == "30"


def test_a_record_from_before_the_source_steps(tmp_path, trainer):
    """A workdir whose records lack the source steps (older demo): sft is taken as trained from
    pretrain's latest checkpoint unless pretrain was stopped short and trained on after sft's
    first checkpoint was written (what the demo did before it stopped at a stopped stage)."""
    _run(tmp_path, "--stages", "pretrain,sft")
    path = tmp_path / "sft" / "demo_stage.json"
    old = {k: v for k, v in _record(tmp_path, "sft").items() if not k.endswith(" checkpoint")}
    json.dump(old, open(path, "w"))
    _run(tmp_path, "--stages", "sft")  # no stop event: accepted and completed
    assert _record(tmp_path, "sft")["init_from checkpoint"] == "30"

    json.dump(old, open(path, "w"))
    with open(tmp_path / "pretrain" / "events.jsonl", "w") as f:
        f.write(json.dumps({"event": "preempted", "step": 22}) + "\n")
    sft_ckpt, pt_ckpt = tmp_path / "sft/checkpoints/12", tmp_path / "pretrain/checkpoints/30"
    os.utime(pt_ckpt, (1e9, 1e9))  # pretrain's step 30 written before sft started: fine
    os.utime(sft_ckpt, (2e9, 2e9))
    _run(tmp_path, "--stages", "sft")
    json.dump(old, open(path, "w"))
    os.utime(pt_ckpt, (3e9, 3e9))  # ... after sft's checkpoint: sft started from step 22
    with pytest.raises(SystemExit, match=r"init_from checkpoint: a checkpoint before 30 -> 30"):
        _run(tmp_path, "--stages", "sft")


def test_a_plan_key_names_every_stage_it_sizes(tmp_path, trainer):
    """student_steps sizes the student and the distilled student: both are named at once."""
    _run(tmp_path, "--stages", "pretrain,student,distill")
    with pytest.raises(SystemExit, match=r"student in \S* was made with other settings \(.*"
                                         r"total_steps: 6 -> 8\); distill too \(.*total_steps: "
                                         r"6 -> 8\).*rm -r \S*/student \S*/distill\)"):  # fmt: skip
        _run(tmp_path, "--stages", "student,distill", "--plan", "student_steps=8")


# --- world and data -------------------------------------------------------------------------


def test_world_and_data_record_their_settings(tmp_path):
    _run(tmp_path, "--stages", "world,data")
    assert _record(tmp_path, "world") == {"preset": "small", "seed": "0"}
    assert _record(tmp_path, "data")["train_tokenizer_vocab"] == "512"
    commands = json.load(open(tmp_path / "commands.json"))
    full = ["--workdir", str(tmp_path)]
    changed = r"world in \S* was made with other settings \(preset: small -> demo\)"
    with pytest.raises(SystemExit, match=changed + r".*rm -r \S*/world \S*/data\)"):
        demo.main([*full, "--stages", "world,data"])
    changed = r"data in \S* was made with other settings \(train_tokenizer_vocab: 512 -> 2048\)"
    with pytest.raises(SystemExit, match=changed + "; world too"):
        demo.main([*full, "--stages", "data"])
    assert json.load(open(tmp_path / "commands.json")) == commands  # still what is on disk

    # A workdir from before the records: read from the manifest and the tokenizer.
    for stage in ("world", "data"):
        os.remove(tmp_path / stage / "demo_stage.json")
    with pytest.raises(SystemExit, match=r"preset: small -> demo"):
        demo.main([*full, "--stages", "world"])
    with pytest.raises(SystemExit, match=r"train_tokenizer_vocab: 512 -> 2048"):
        demo.main([*full, "--stages", "data"])
    _run(tmp_path, "--stages", "world,data")
    assert _record(tmp_path, "world")["preset"] == "small"
    assert _record(tmp_path, "data")["train_tokenizer_vocab"] == "512"


def test_the_world_command_writes_every_file_the_data_command_reads(tmp_path):
    """commands.json's world command, run alone into another directory, leaves there every
    file its data command names (unsafe_words.txt was written by the demo process only)."""
    d = demo.Demo(str(tmp_path / "demo"), runlocal=True)
    d.world()
    d.data()
    other = str(tmp_path / "other")
    world_cmd = shlex.split(d.commands["world"].replace(d.dir["world"], other))
    assert world_cmd[0] == "python"
    subprocess.run([sys.executable, *world_cmd[1:]], check=True, cwd=tmp_path)
    data_cmd = shlex.split(d.commands["data"].replace(d.dir["world"], other))
    read = [data_cmd[data_cmd.index("--input") + 1]]
    for arg in data_cmd:
        key, _, value = arg.partition("=")
        if key in ("--config.clean.toxic_lists", "--config.dedup.decontam_paths"):
            read += [p for p in value.split(",") if p != "default"]
    assert len(read) == 3 and all(p.startswith(other) for p in read)
    for path in read:
        assert os.path.exists(path), path


# --- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--stages", "world,data,pretrian"], "--stages: unknown stage(s) 'pretrian'; stages: world,"),
    (["--stages", "run"], "unknown stage(s) 'run'"),
    (["--stages", "_save"], "unknown stage(s) '_save'"),
    (["--plan", "sft_steps"], "--plan: 'sft_steps': sft_steps takes a positive integer"),
    (["--plan", "sft_steps=1e2"], "'sft_steps=1e2': sft_steps takes a positive integer"),
    (["--plan", "sft_steps=0"], "sft_steps takes a positive integer"),
    (["--plan", "sft_step=3"], "--plan: unknown key 'sft_step' (in 'sft_step=3'); keys: "),
])  # fmt: skip
def test_bad_stages_and_plans_are_usage_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        _run(tmp_path / "w", *args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "w")  # nothing ran


def test_run_calls_stages_only(tmp_path):
    with pytest.raises(ValueError, match="unknown stage"):
        demo.Demo(str(tmp_path), True).run(["world", "run"])
    assert not os.path.exists(tmp_path / "world")


def test_report_before_eval(tmp_path):
    with pytest.raises(SystemExit, match=r"run the eval stage first"):
        _run(tmp_path, "--stages", "report")


# --- the eval command ---------------------------------------------------------------------------


class FakeEvaluator:
    calls: list = []

    def __init__(self, cfg, params, tok, **kw):
        self.seed = kw.get("seed", 0)

    def run(self, spec, limit=None):
        FakeEvaluator.calls.append((spec, limit, self.seed))
        return {"type": spec.type, "n": 0, "metrics": {"x": 0.0}, "samples": [], "seconds": 0.0,
                "spec": spec.to_dict()}  # fmt: skip


def test_the_eval_command_evaluates_as_the_eval_stage(tmp_path, monkeypatch):
    """Every task the stage evaluates the SFT checkpoint on, with the same spec (chat, shots,
    sampling), example limit and seed, comes from the recorded command, in order."""
    import flaxlm.evaluation.__main__ as cli
    from flaxlm.alignment import common
    from flaxlm.data import synthetic
    from flaxlm.data.tokenizer import Tokenizer
    from flaxlm.demo_report import SAMPLED
    from flaxlm.evaluation import harness
    from flaxlm.models import hf_tokenizer
    from flaxlm.train import checkpoint

    cfg = types.SimpleNamespace(param_counts=lambda: {"total": 1}, vocab_size=512)
    tok = types.SimpleNamespace(pad_id=0)
    monkeypatch.setattr(harness, "Evaluator", FakeEvaluator)
    monkeypatch.setattr(common, "load_policy", lambda d: (cfg, {}, {"tokenizer": "t"}))
    monkeypatch.setattr(Tokenizer, "load", staticmethod(lambda path: tok))
    monkeypatch.setattr(checkpoint, "read_meta", lambda d, step=None: (12, {"task": "sft"}))
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: (cfg, {}, {}))
    monkeypatch.setattr(cli, "tokenizer_path", lambda *a: "t")
    monkeypatch.setattr(hf_tokenizer, "load_tokenizer", lambda path, vocab: tok)
    monkeypatch.setattr(hf_tokenizer, "set_template_kwargs", lambda *a: None)

    d = demo.Demo(str(tmp_path), runlocal=True)
    synthetic.write_world(d.dir["world"], "small")
    os.makedirs(os.path.join(d.dir["sft"], "checkpoints", "12"))  # the only run evaluated
    FakeEvaluator.calls = []
    d.eval()
    stage = [({**s.to_dict(), "name": s.name.replace(SAMPLED, "gen_instructions_heldout")},
              limit, seed) for s, limit, seed in FakeEvaluator.calls]  # fmt: skip
    assert [c[1] for c in stage] == [None] + [d.plan["eval_examples"]] * 4

    FakeEvaluator.calls = []
    for command in d.commands["eval"].split(" && "):
        argv = shlex.split(command)
        assert argv[:3] == ["python", "-m", "flaxlm.evaluation"]
        cli.main(argv[3:])
    assert [(s.to_dict(), limit, seed) for s, limit, seed in FakeEvaluator.calls] == stage


# --- README -------------------------------------------------------------------------------------


def _readme_commands() -> list[str]:
    """The commands of README.md's Recipes block, continuation lines joined."""
    text = open(os.path.join(REPO, "README.md")).read()
    block = text[text.index("## Recipes") :].split("```")[1]
    joined = block.replace("\\\n", " ")
    return [line.split("#")[0].strip() for line in joined.splitlines()
            if line.strip().startswith("python")]  # fmt: skip


def test_readme_pretraining_continued_from_a_run_uses_that_runs_variant():
    """pretrain.py's init_from loads the run into the variant's shape: the long-context recipe
    continues runs/pt, so it names runs/pt's variant."""
    variants, checked = {}, 0
    for command in _readme_commands():
        argv = shlex.split(command)
        if "configs/pretrain.py:" not in command or "--workdir" not in argv:
            continue
        config_arg = argv[argv.index("--config") + 1].split(":")[1]
        arg = dict(kv.split("=") for kv in config_arg.split(","))
        init = [a.split("=", 1)[1] for a in argv if a.startswith("--config.init_from=")]
        if init and init[0] in variants:
            assert arg["variant"] == variants[init[0]], command
            checked += 1
        variants[argv[argv.index("--workdir") + 1]] = arg["variant"]
    assert checked >= 1
