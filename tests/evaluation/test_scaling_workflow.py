"""The scaling config and workflow: the sweep's shape, the predict variant's size, and the
workflow's table → fit → prediction → report path on runs whose losses follow a known law.

Training the real sweep takes ~15 minutes (configs/scaling.py); here the run directories are
written as a finished sweep would leave them (metrics.jsonl, DONE, tasks.json), so the workflow
skips training and the test checks everything after it, including that a re-run is a no-op.
"""

import json
import os

import pytest

from flaxlm.configs import scaling as scaling_config
from flaxlm.configs.common import to_model_config
from flaxlm.evaluation import scaling_workflow
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


def test_workflow_fits_predicts_and_reports_from_finished_runs(tmp_path):
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

    again = scaling_workflow.main(argv)  # everything finished: nothing retrains
    assert again["prediction"]["predicted"] == pytest.approx(pred["predicted"])
    assert "sweep" not in json.load(open(os.path.join(root, "timing.json")))


def test_scaling_sweep_runlocal_shrinks_the_swept_budgets():
    # the sweep sets total_steps itself, so runlocal must shrink its budgets, not only the default
    runs = []
    scaling_config.sweep(lambda **kw: runs.append(kw), "runlocal=True,heldout=x.jsonl")
    budgets = sorted({r["total_steps"] for r in runs})
    assert budgets == list(scaling_config.RUNLOCAL_STEPS) and max(budgets) <= 16
    assert scaling_config.get_config("predict=True,runlocal=True").total_steps <= max(budgets)
