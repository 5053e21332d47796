"""The scaling config and workflow: the sweep's shape, the predict variant's size, and the
workflow's table → fit → prediction → report path on runs whose losses follow a known law.

Training the real sweep takes ~15 minutes (configs/scaling.py); here the run directories are
written as a finished sweep would leave them (metrics.jsonl, DONE, tasks.json), so the workflow
skips training and the test checks everything after it, including that a re-run is a no-op.
"""

import json
import os
import re
import shlex

import pytest

from flaxlm.configs import scaling as scaling_config
from flaxlm.configs.common import to_model_config
from flaxlm.evaluation import scaling_emergence, scaling_workflow
from flaxlm.evaluation.scaling import predict_parametric
from flaxlm.train import sweep

LAW = dict(E=0.35, A=60.0, alpha=0.4, B=300.0, beta=0.45)  # L(N, D) the fake runs follow


def _n_nonembed(config) -> int:
    counts = to_model_config(config.model).param_counts()
    return counts["total"] - counts["embedding"]


def test_scaling_sweep_shape_and_predict_variant():
    runs = []
    scaling_config.sweep(lambda **kw: runs.append(kw), None)
    widths = {r["model.d_model"] for r in runs}
    budgets = {r["total_steps"] for r in runs}
    assert len(widths) >= 4 and len(budgets) >= 3 and len(runs) == len(widths) * len(budgets)
    largest = scaling_config.get_config(f"width={max(widths)}")
    big = scaling_config.get_config("predict=True")
    assert _n_nonembed(big) >= 4 * _n_nonembed(largest)
    assert big.total_steps <= max(budgets)  # the target's D lies inside the fitted budgets


def test_scaling_config_derived_keys_follow_overrides():
    c = scaling_config.get_config(None)
    c.model.d_model, c.total_steps = 32, 300  # what the sweep's --config.k=v overrides do
    assert (c.model.n_heads, c.model.n_kv_heads, c.model.d_ff) == (2, 2, 96)
    lr64 = scaling_config.get_config("width=64").opt.lr
    assert c.opt.lr == pytest.approx(lr64 * (64 / 32) ** scaling_config.LR_EXPONENT)
    assert (c.opt.warmup_steps, c.eval_every, c.ckpt_every) == (30, 300, 150)
    tok = c.data.builtin_vocab_size
    assert c.model.vocab_size == tok and c.model.tie_embeddings
    c.eval_every, c.model.vocab_size = 100, 4096  # overriding a derived key leaves its source
    assert (c.total_steps, c.data.builtin_vocab_size, c.ckpt_every) == (300, tok, 150)


def _write_run(run_dir, steps, loss, tasks):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": steps, "loss": loss * 1.01}) + "\n")
        f.write(json.dumps({"step": steps, "eval/nll": loss, "eval/accuracy": 0.5}) + "\n")
    with open(os.path.join(run_dir, "DONE"), "w") as f:
        f.write("{}")
    with open(os.path.join(run_dir, "tasks.json"), "w") as f:
        json.dump({"mc_facts_train": tasks}, f)


def _cached_tasks(run_dir, world_dir, tasks, **kw):
    """emergence.evaluate_run on a fake run (no checkpoint): its tasks.json, as its cache."""
    with open(os.path.join(run_dir, "tasks.json")) as f:
        return json.load(f)


def test_workflow_fits_predicts_and_reports_from_finished_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(scaling_emergence, "evaluate_run", _cached_tasks)
    root = str(tmp_path)
    config = scaling_workflow.DEFAULT_CONFIG
    runs = sweep.plan(config, os.path.join(root, "sweep"))
    for r in runs:
        n, d = r.info["n_params_nonembed"], r.info["tokens"]
        acc = min(0.25 + 1e-13 * r.info["flops"], 0.9)
        _write_run(r.workdir, r.total_steps, float(predict_parametric(LAW, n, d)), {"acc": acc})
    big = sweep.run_info(scaling_config.get_config("predict=True"))
    actual = float(predict_parametric(LAW, big["n_params_nonembed"], big["tokens"]))
    _write_run(os.path.join(root, "target"), big["total_steps"], actual * 0.99, {"acc": 0.8})
    _write_run(os.path.join(root, "target-seed1"), big["total_steps"], actual * 1.01, {})

    argv = ["--workdir", root, "--n_boot", "20", "--tasks", "mc_facts_train", "--target_seeds=2"]
    report = scaling_workflow.main(argv)
    pred = report["prediction"]
    assert pred["N"] == big["n_params_nonembed"] and pred["actual"] == pytest.approx(actual)
    assert abs(pred["rel_error"]) < 2e-3  # a noise-free law is recovered
    assert pred["lo"] <= pred["predicted"] <= pred["hi"]
    fixed = report["prediction_fixed_budget"]  # the slice at the target's D is E' + A/N^alpha
    assert len(fixed["fitted_N"]) == len(scaling_config.WIDTHS) and abs(fixed["rel_error"]) < 2e-3
    assert [s["tokens"] for s in report["slopes_by_budget"]] == sorted(
        {r.info["tokens"] for r in runs}
    )
    for name in ("loss_vs_compute", "prediction", "emergence", "fixed_budget"):
        assert os.path.getsize(report["plots"][name]) > 10_000
    md = open(os.path.join(root, "report", "report.md")).read()
    assert "error (predicted / actual − 1)" in md and "mc_facts_train acc" in md
    assert "mean of 2 seeds" in md
    rows = open(os.path.join(root, "runs.csv")).read().splitlines()
    assert len(rows) == len(runs) + 2 and rows[-1].split(",")[1] == "target"
    timing = json.load(open(os.path.join(root, "timing.json")))
    assert "sweep" not in timing and "target" not in timing and len(timing["fit"]) == 1

    # The report's command is the one that ran, every argument in it: it used to drop
    # --tasks, --n_boot (and --config, --heldout_docs), so re-running it made another study.
    command = re.search(r"Command: `([^`]*)`", md).group(1)
    assert shlex.split(command) == ["python", "-m", "flaxlm.evaluation.scaling_workflow", *argv]
    assert json.load(open(os.path.join(root, "workflow.json"))) == {
        "config": config, "heldout_docs": 1000}  # fmt: skip

    again = scaling_workflow.main(shlex.split(command)[3:])  # finished: nothing retrains
    assert again["prediction"]["predicted"] == pytest.approx(pred["predicted"])
    assert "sweep" not in json.load(open(os.path.join(root, "timing.json")))


def test_scaling_sweep_runlocal_shrinks_the_swept_budgets():
    # the sweep sets total_steps itself, so runlocal must shrink its budgets, not only the default
    runs = []
    scaling_config.sweep(lambda **kw: runs.append(kw), "runlocal=True,heldout=x.jsonl")
    budgets = sorted({r["total_steps"] for r in runs})
    assert budgets == list(scaling_config.RUNLOCAL_STEPS) and max(budgets) <= 16
    assert scaling_config.get_config("predict=True,runlocal=True").total_steps <= max(budgets)


def test_a_rerun_with_other_settings_is_refused(tmp_path, capsys):
    """The workflow's runs depend on --config and --heldout_docs; a re-run with others planned
    another sweep (other run names, so the sweep's own check never fired) beside the old one.
    Refused before anything is written or trained, naming both settings."""
    root = str(tmp_path)
    config = scaling_workflow.DEFAULT_CONFIG
    scaling_workflow.write_settings(root, config, 1000)
    scaling_workflow.check_settings(root, config, 1000)  # the same settings: fine
    for args, now in (
        (["--config", config + ":runlocal=True"], f"--config {config}:runlocal=True "),
        (["--heldout_docs", "0"], "--heldout_docs 0"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            scaling_workflow.main(["--workdir", root, *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"--config {config} --heldout_docs 1000; now: " in err
        assert now in err
    assert sorted(os.listdir(root)) == ["workflow.json"]  # no world, no sweep
    # A workdir from before workflow.json: its sweep.json's config arg is compared.
    old = tmp_path / "old"
    os.makedirs(old / "sweep")
    (old / "sweep" / "sweep.json").write_text(json.dumps({"config": config + ":runlocal=True"}))
    with pytest.raises(ValueError, match="sweep was trained with --config .*runlocal=True"):
        scaling_workflow.check_settings(str(old), config, 0)
    scaling_workflow.check_settings(str(old), config + ":runlocal", 0)  # the same, spelt apart


def test_a_target_trained_with_another_config_is_refused(tmp_path, monkeypatch):
    """The target was never checked against its config: a finished target of another config
    (a runlocal smoke run's 8 steps) was skipped as finished, and target_row then raised "has
    not finished" on every re-run. Refused, naming the directory and both configs or steps."""
    monkeypatch.setattr(sweep, "run_local", lambda *a, **k: pytest.fail("trained"))
    config = scaling_workflow.DEFAULT_CONFIG
    small = scaling_workflow.with_arg(config, "runlocal=True")
    root = str(tmp_path)
    _write_run(os.path.join(root, "target"), 8, 3.0, {})
    # target.json says which config trained it
    run = {"index": 0, "name": "target", "overrides": {}, "workdir": os.path.join(root, "target")}
    json.dump({"config": small + ",predict=True", "runs": [run]},
              open(os.path.join(root, "target.json"), "w"))  # fmt: skip
    with pytest.raises(ValueError, match=r"target was started by a sweep with --config .*runlocal"):
        scaling_workflow.run_target(root, config)
    # without target.json (a workdir from before it): DONE short of the config's total_steps
    os.remove(os.path.join(root, "target.json"))
    steps = scaling_config.get_config("predict=True").total_steps
    with pytest.raises(ValueError, match=f"DONE\\) at step 8, but .* trains {steps} steps"):
        scaling_workflow.run_target(root, config)
    assert not os.path.exists(os.path.join(root, "target.json"))
    assert scaling_workflow.run_target(root, small)[0].total_steps == 8  # its own: finished


def test_tasks_asked_for_later_are_evaluated(tmp_path, monkeypatch):
    """A run with a tasks.json was skipped, so a task added to --tasks later was never
    evaluated; every run goes to evaluate_run, whose cache decides."""
    run = tmp_path / "sweep" / "run-a"
    os.makedirs(run)
    (run / "tasks.json").write_text(json.dumps({"mc_facts_train": {"acc": 0.5}}))
    calls = []

    def evaluate_run(run_dir, world_dir, tasks, **kw):
        calls.append((run_dir, list(tasks)))
        done = json.loads((run / "tasks.json").read_text())
        done.update({t: {"acc": 0.25} for t in tasks if t not in done})
        (run / "tasks.json").write_text(json.dumps(done))
        return done

    monkeypatch.setattr(scaling_emergence, "evaluate_run", evaluate_run)
    scaling_workflow.evaluate_tasks(str(tmp_path), [str(run)], ["mc_facts_train", "mc_arithmetic"])
    assert calls == [(str(run), ["mc_facts_train", "mc_arithmetic"])]
    assert json.loads((run / "tasks.json").read_text())["mc_arithmetic"] == {"acc": 0.25}
    assert json.load(open(tmp_path / "timing.json"))["tasks"][0]["evaluated"] == 1


def test_the_world_gets_the_held_out_documents_asked_for(tmp_path):
    """ensure_world kept an existing world's held-out count: a study asking for 1000 documents
    after a smoke run that wrote the world with the preset's 100 got 100, silently. The file is
    written again (the world regenerates deterministically); the rest of the world is kept."""
    world = str(tmp_path / "world")
    scaling_emergence.ensure_world(world, 0)
    path = os.path.join(world, "heldout_text.jsonl")
    first = open(path).read().splitlines()
    corpus = open(os.path.join(world, "pretrain.jsonl")).read()
    assert len(first) == 100
    scaling_emergence.ensure_world(world, 150)
    now = open(path).read().splitlines()
    assert len(now) == 150 and now[:100] == first  # the first 100 are the same documents
    manifest = json.load(open(os.path.join(world, "manifest.json")))
    assert manifest["config"]["n_heldout_text"] == manifest["counts"]["heldout_text"] == 150
    assert open(os.path.join(world, "pretrain.jsonl")).read() == corpus
    scaling_emergence.ensure_world(world, 0)  # 0: the world as it is
    assert len(open(path).read().splitlines()) == 150


def test_gpus_reach_every_trainer_and_a_bad_split_is_refused(tmp_path, monkeypatch):
    """The study's runs (batch 4) on an 8-GPU host each saw all 8 GPUs and failed; `--gpus`
    reaches the sweep's and the target's `run_local`, and a split that cannot be made is a
    usage error before anything trains."""
    calls = []

    def fake_run_local(config_arg, runs, **kw):
        calls.append((kw["gpus"], kw["gpus_per_run"]))
        return {r.name: "skipped" for r in runs}

    monkeypatch.setattr(sweep, "run_local", fake_run_local)
    monkeypatch.setattr(scaling_workflow.sweep_lib, "is_done", lambda run: False)
    split = (["0", "1", "2"], 1)
    scaling_workflow.run_sweep(str(tmp_path), scaling_workflow.DEFAULT_CONFIG, 3, split)
    scaling_workflow.run_target(str(tmp_path), scaling_workflow.DEFAULT_CONFIG, 1, split)
    assert calls == [split, split]
    with pytest.raises(SystemExit):
        scaling_workflow.main(["--workdir", str(tmp_path / "w"), "--gpus", "0",
                               "--gpus_per_run", "2"])  # fmt: skip


def test_a_diverged_run_stops_the_fit_naming_it_or_is_left_out(tmp_path):
    """A run with a nan held-out loss stopped the fit with a traceback naming `runs[i]`, a
    position among the finished runs; --drop_nonfinite fits without it and says so."""
    root = str(tmp_path)
    runs = sweep.plan(scaling_workflow.DEFAULT_CONFIG, os.path.join(root, "sweep"))
    bad = runs[3]
    for r in runs:
        loss = predict_parametric(LAW, r.info["n_params_nonembed"], r.info["tokens"])
        _write_run(r.workdir, r.total_steps, float("nan") if r is bad else float(loss), {})
    argv = ["--workdir", root, "--n_boot", "0", "--tasks", "", "--no_target"]
    with pytest.raises(SystemExit, match=rf"fit: .*\({re.escape(bad.name)}, sweep index 3\): "
                       "column 'heldout_loss' = nan .*--drop_nonfinite"):  # fmt: skip
        scaling_workflow.main(argv)
    with pytest.warns(UserWarning, match=re.escape(bad.name)):
        report = scaling_workflow.main([*argv, "--drop_nonfinite"])
    assert report["n_runs"] == len(runs) - 1 and report["dropped_runs"] == [bad.name]
    md = open(os.path.join(root, "report", "report.md")).read()
    assert f"left out of the fit (--drop_nonfinite): {bad.name}" in md
    table = open(os.path.join(root, "runs.csv")).read()
    assert bad.name in table  # the run table keeps every run


@pytest.mark.parametrize(
    "args, starts", [("", (300, 450)), (",cooldown_frac=0.2,cooldown_shape=linear", (480, 720))]
)
def test_scaling_cooldowns_branch_each_shorter_budget_where_its_decay_begins(tmp_path, args,
                                                                            starts):  # fmt: skip
    from flaxlm.train.optim import make_schedule

    config = os.path.join(os.path.dirname(scaling_config.__file__), "scaling.py")
    runs = sweep.plan(config + ":cooldowns=True" + args, str(tmp_path))
    assert sorted({r.branch_of[1] for r in runs if r.branch_of}) == list(starts)
    budgets = sorted(scaling_config.STEPS)
    assert len(runs) == len(scaling_config.WIDTHS) * len(budgets)
    sources = [r for r in runs if r.branch_of is None]
    assert [r.total_steps for r in sources] == [budgets[-1]] * len(scaling_config.WIDTHS)

    def schedule(width, steps):
        c = scaling_config.get_config(f"cooldowns=True,width={width},steps={steps}{args}")
        assert c.opt.schedule == "wsd"
        return c.opt.lr, make_schedule(c.opt, steps)

    for r in (r for r in runs if r.branch_of is not None):
        source = next(s for s in sources if s.name == r.branch_of[0])
        width, start = r.overrides["model.d_model"], r.branch_of[1]
        assert source.overrides["model.d_model"] == width
        assert start in starts and start % source.overrides[
            "ckpt_every"] == 0 and source.overrides["keep_ckpts"] == 0  # fmt: skip
        lr, own = schedule(width, r.total_steps)
        # the branch's first own update is its decay's first; the one before it at the peak
        assert float(own(start)) < lr and float(own(start - 1)) == pytest.approx(lr)
        # ... as every update the source made up to the branch point
        assert float(schedule(width, source.total_steps)[1](start - 1)) == pytest.approx(lr)
        assert r.info["tokens"] == r.total_steps * 512  # D counts the source's steps too
    assert scaling_config.get_config("predict=True,cooldowns=True").opt.schedule == "wsd"


def test_report_counts_the_steps_a_branched_sweep_saved():
    from flaxlm.evaluation.scaling_workflow_report import _branch_lines

    source = {"overrides": {"total_steps": 1200}, "total_steps": 1200, "step": 1200}
    rows = [source] + [
        {"overrides": json.dumps({"branch_from": f"run-a@{at}", "total_steps": n}),
         "total_steps": n, "step": n}  # (runs.csv holds the overrides as JSON text)
        for at, n in ((480, 600), (720, 900))
    ]  # fmt: skip
    assert _branch_lines(rows)[0] == (
        "2 of the 3 runs are branches of another run (`branch_from`): the sweep trained 1500 "
        "optimizer steps, against 2700 for the same runs trained separately (56%)."
    )
    assert _branch_lines([source]) == []
    from flaxlm.evaluation.scaling_workflow_report import run_label

    assert run_label({**rows[1], "name": "run-branch_from=...-07db6239"}) == (
        "total_steps=600 (branched at 480)"
    )
    assert run_label({"name": "target", "overrides": {}}) == "target"


def test_a_branched_sweep_spelled_two_ways_is_one_study():
    """Equal config args (the defaults written out) are one study, branch points and all: a
    run handle's identity is no part of a branch_from value (it made every re-run of such a
    study with the other spelling a refusal)."""
    from flaxlm.train.sweep_plan import _same_config_arg

    config = os.path.join(os.path.dirname(scaling_config.__file__), "scaling.py")
    same = f"{config}:cooldowns=True,cooldown_frac=0.5,cooldown_shape=sqrt"
    assert _same_config_arg(f"{config}:cooldowns=True", same)
    assert not _same_config_arg(f"{config}:cooldowns=True,cooldown_frac=0.2", same)
