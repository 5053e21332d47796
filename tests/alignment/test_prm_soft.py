"""Soft step labels and last-step (outcome) training of the process reward model
(alignment/prm.py, data/stepwise.py, data/synthetic_steps.py): soft labels are read and bad ones
refused naming the field and index; the loss and every metric equal float64 formulas written
out here (hand-counted accuracies at three thresholds, BCE, KL and |σ(x) − y| per step), and
the loss's gradient vanishes where σ(x) = y; train_on="last" trains the final steps alone (the
loss and its gradient ignore every other label); the built-in soft chains are Math-Shepherd
rollout fractions; a "last" task built on them still evaluates every held-out step."""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flaxlm.alignment import common, prm
from flaxlm.configs import prm as prm_config
from flaxlm.data import formats as F
from flaxlm.data import stepwise as SW
from flaxlm.data.chat_records import FormatError
from flaxlm.data.synthetic_steps import chain_records, soft_records
from flaxlm.train.step import finish_metrics
from tests.alignment import rl_helpers as H

# ---------------------------------------------------------------------------------------------
# Records


def test_soft_labels_are_read_and_bad_ones_name_the_field_and_index():
    fields = SW.step_fields()
    fields.labels = "ratings"
    rec = {"prompt": "q", "steps": ["a", "b", "c", "d"], "ratings": [0.625, True, 0, 1.0]}
    _, _, labels = SW.step_parts(rec, fields, "\n")
    assert labels == [0.625, 1.0, 0.0, 1.0] and all(type(y) is float for y in labels)
    for bad in (1.5, -0.25, float("nan"), float("inf"), "0.5", 2, None, [0.5]):
        r = {**rec, "ratings": [1, bad, 0, 1]}
        with pytest.raises(FormatError) as e:
            SW.step_parts(r, fields, "\n")
        assert e.value.reason == "bad_label" and f"ratings[1]={bad!r}" in str(e.value), bad


@pytest.fixture(scope="module")
def template(cache_dir):
    c = ml_collections.ConfigDict({"data": common.data_config("", ""), "init_from": ""})
    c.data.world, c.data.builtin_vocab_size, c.data.cache_dir = "small", H.VOCAB, str(cache_dir)
    return F.training_template(common.resolve_tokenizer(c, {}))


def test_soft_labels_reach_the_batches_and_the_report_counts_them_at_the_threshold(template):
    recs = [{"prompt": "q", "steps": ["a", "b", "c"], "labels": [0.7, 0.25, 1]},
            {"prompt": "q", "steps": ["a"], "labels": [0.0]}]  # fmt: skip
    report = SW.StepReport()
    out = SW.render_stepwise([(r, f"f:{i}") for i, r in enumerate(recs)], template, 64,
                             report=report, threshold=0.7)  # fmt: skip
    assert out[0]["labels"].dtype == np.float32
    np.testing.assert_array_equal(out[0]["labels"], np.float32([0.7, 0.25, 1.0]))
    # 0.7 is no float32: the label at the threshold still counts (as the trainer counts it)
    d = report.to_dict()
    assert (d["steps"], d["positive_steps"], d["soft_steps"]) == (4, 2, 2)
    b = next(iter(SW.StepBatches(out, seq_len=64, batch=2, pad_id=0, shuffle=False,
                                 num_epochs=1)))  # fmt: skip
    np.testing.assert_array_equal(b["step_labels"][0, out[0]["pos"]], out[0]["labels"])


# ---------------------------------------------------------------------------------------------
# Loss and metrics

# Two solutions, hand-made: row 0 three steps (labels 0.9, 0.6, 0.2), row 1 two (1.0, 0.5).
X = np.float32([[2.0, -0.5, -1.0], [1.0, 0.0, 9.0]])
Y = np.float32([[0.9, 0.6, 0.2], [1.0, 0.5, 0.3]])
M = np.float32([[1, 1, 1], [1, 1, 0]])  # row 1's third position is no step
# σ(X): row 0 0.881, 0.378, 0.269; row 1 0.731, 0.5. Counted by hand at each threshold t:
# (step_accuracy, solution_accuracy, first_error_accuracy, majority_accuracy).
HAND = {
    # labels right [T T F | T T], predictions [T F F | T T]: row 0 first wrong 2 vs 1
    0.5: (4 / 5, 2 / 2, 1 / 2, 4 / 5),
    # predictions [T T T | T T] (0.269 >= 0.25): row 0 "all right" predicted, not labelled
    0.25: (4 / 5, 1 / 2, 1 / 2, 4 / 5),
    # labels [T F F | T F], predictions [T F F | T F]: every verdict agrees
    0.7: (5 / 5, 2 / 2, 2 / 2, 3 / 5),
}


def _reference(x, y, m):
    """(BCE, KL(y ‖ σ(x)), |σ(x) − y|) averaged over the masked steps, term by term in float64
    with math's log and exp (moderate logits only: σ is computed directly)."""
    bce = kl = mae = 0.0
    steps = [(float(a), float(b)) for a, b, k in zip(x.ravel(), y.ravel(), m.ravel()) if k]
    for xi, yi in steps:
        p = 1.0 / (1.0 + math.exp(-xi))
        bce -= yi * math.log(p) + (1 - yi) * math.log(1 - p)
        kl += (yi * math.log(yi / p) if yi else 0.0) + (
            (1 - yi) * math.log((1 - yi) / (1 - p)) if yi < 1 else 0.0)  # fmt: skip
        mae += abs(p - yi)
    return bce / len(steps), kl / len(steps), mae / len(steps)


@pytest.mark.parametrize("t", sorted(HAND))
def test_metrics_on_soft_labels_are_the_hand_counted_ones(t):
    loss, metrics = prm.step_loss(X, Y, M, t)
    metrics = finish_metrics(metrics)
    host = prm.np_step_metrics(X, Y, M, t)
    bce, kl, mae = _reference(X, Y, M)
    want = dict(zip(("step_accuracy", "solution_accuracy", "first_error_accuracy"), HAND[t]))
    want.update(label_mean=(0.9 + 0.6 + 0.2 + 1.0 + 0.5) / 5, step_kl=kl, prob_mae=mae)
    np.testing.assert_allclose(float(loss), bce, rtol=1e-6)
    np.testing.assert_allclose(host["loss"], bce, rtol=1e-6)  # (Y is float32: 0.9 ≠ 0.9f)
    for k, v in want.items():
        np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-5, atol=1e-7, err_msg=k)
        np.testing.assert_allclose(host[k], v, rtol=1e-6, atol=1e-12, err_msg=k)
    assert host["majority_accuracy"] == pytest.approx(HAND[t][3]) and host["steps"] == 5
    assert float(metrics["weight"]) == 5


def test_random_soft_labels_match_the_reference_and_a_label_at_the_threshold_is_right():
    rng = np.random.default_rng(0)
    x = (2.0 * rng.standard_normal((5, 9))).astype(np.float32)
    y = rng.choice([0.0, 0.125, 0.375, 0.5, 0.875, 1.0], (5, 9)).astype(np.float32)
    m = (rng.random((5, 9)) < 0.6).astype(np.float32)
    loss, metrics = prm.step_loss(x, y, m)
    bce, kl, mae = _reference(x, y, m)
    np.testing.assert_allclose([float(loss), float(metrics["step_kl"]),
                                float(metrics["prob_mae"])], [bce, kl, mae], rtol=2e-5)  # fmt: skip
    host = prm.np_step_metrics(x, y, m)
    np.testing.assert_allclose([host["loss"], host["step_kl"], host["prob_mae"]], [bce, kl, mae],
                               rtol=1e-9)  # fmt: skip
    # t = 0.7 and a label and a logit exactly there (float32): right, predicted right
    x_cut = np.float32(np.log(0.7 / 0.3))
    at = prm.np_step_metrics(np.float32([[x_cut]]), np.float32([[0.7]]), np.ones((1, 1)), 0.7)
    _, dev = prm.step_loss(np.float32([[x_cut]]), np.float32([[0.7]]), np.ones((1, 1)), 0.7)
    assert at["majority_accuracy"] == 1.0 and at["step_accuracy"] == 1.0
    assert float(dev["step_accuracy"]) == 1.0 and at["solution_accuracy"] == 1.0


def test_the_soft_loss_is_minimal_where_the_probability_is_the_label():
    """softplus(x) − y·x is the cross-entropy against a soft target: its gradient in x is
    (σ(x) − y)/n, zero at x = logit y, where the loss is the labels' entropy (KL 0)."""
    y = np.float32([[0.125, 0.5, 0.875, 0.3]])
    m = np.float32([[1, 1, 1, 0]])
    x = np.float32([[-1.0, 2.0, 0.5, 4.0]])
    grad = jax.grad(lambda v: prm.step_loss(v, y, m)[0])(jnp.asarray(x))
    p = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(np.asarray(grad), (p - y) * m / 3, rtol=1e-5, atol=1e-8)
    fit = np.log(y / (1 - y)).astype(np.float32)
    loss, metrics = prm.step_loss(fit, y, m)
    h = -(y * np.log(y) + (1 - y) * np.log(1 - y))[0, :3].mean()
    np.testing.assert_allclose(float(loss), h, rtol=1e-5)
    assert abs(float(metrics["step_kl"])) < 1e-6 and float(metrics["prob_mae"]) < 1e-6
    assert np.abs(np.asarray(jax.grad(lambda v: prm.step_loss(v, y, m)[0])(fit))).max() < 1e-6


# ---------------------------------------------------------------------------------------------
# train_on = "last"


def _batch(labels):
    """Three solutions in a (3, 6) batch: row 0 steps at 1, 3, 5 (final 5); row 1 steps at 0, 2
    with its final step cut by truncation (none marked); row 2 a padding row."""
    mask = np.zeros((3, 6), np.float32)
    mask[0, [1, 3, 5]] = mask[1, [0, 2]] = mask[2, [4]] = 1.0
    final = np.zeros((3, 6), np.float32)
    final[0, 5] = final[2, 4] = 1.0
    return {"tokens": np.zeros((3, 6), np.int32), "positions": np.zeros((3, 6), np.int32),
            "segment_ids": np.ones((3, 6), np.int32), "step_labels": np.float32(labels),
            "step_mask": mask, "final_step": final, "valid": np.float32([1, 1, 0])}  # fmt: skip


def test_last_mode_trains_the_final_step_alone():
    table = lambda params, tokens, positions, segment_ids: params["x"]  # noqa: E731
    x = {"x": np.float32(np.linspace(-2, 2, 18).reshape(3, 6))}
    labels = np.full((3, 6), 0.5, np.float32)
    labels[0, 5] = 0.875
    other = labels.copy()
    other[0, [1, 3]], other[1, [0, 2]], other[2, 4] = 1.0, 0.125, 0.0  # none a final step

    def run(train_on, lab):
        fn = prm.prm_loss_fn(table, train_on=train_on)
        (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(x, _batch(lab), None)
        return float(loss), finish_metrics(metrics), np.asarray(grad["x"])

    loss, metrics, grad = run("last", labels)
    xf, yf = float(x["x"][0, 5]), 0.875
    np.testing.assert_allclose(loss, math.log1p(math.exp(xf)) - yf * xf, rtol=1e-6)
    assert float(metrics["weight"]) == 1  # row 1's final step was cut, row 2 is padding
    assert grad[0, 5] != 0 and np.count_nonzero(grad) == 1
    loss2, _, grad2 = run("last", other)  # every other label changed: nothing moves
    assert loss2 == loss and np.array_equal(grad2, grad)
    # "all" trains on them: the same change moves the loss (the check above can fail)
    assert run("all", other)[0] != run("all", labels)[0]
    assert float(run("all", labels)[1]["weight"]) == 5
    with pytest.raises(ValueError, match="prm.train_on='first'"):
        prm.prm_loss_fn(table, train_on="first")


def test_held_out_final_step_accuracy_is_the_final_steps_verdicts():
    b = _batch(np.zeros((3, 6)))
    x = np.full((3, 6), -1.0)
    x[0, 5] = 1.0  # row 0's final step predicted right, labelled wrong; its others agree
    host = prm.np_step_metrics(x, b["step_labels"], prm.steps_of(b, "all"),
                               final=prm.steps_of(b, "last"))  # fmt: skip
    assert host["final_step_accuracy"] == 0.0 and host["steps"] == 5
    assert host["step_accuracy"] == pytest.approx(4 / 5)
    assert "final_step_accuracy" not in prm.np_step_metrics(x, b["step_labels"], b["step_mask"])


@pytest.mark.parametrize("key, value, match", [
    ("prm.train_on", "first", "prm.train_on='first'"),
    ("prm.label_threshold", 1.0, "prm.label_threshold=1.0"),
    ("prm.label_threshold", 0.0, "prm.label_threshold=0.0"),
])  # fmt: skip
def test_bad_mode_and_threshold_name_their_key(key, value, match, cache_dir):
    c = H.tiny(prm_config, cache_dir, **{key: value})
    with pytest.raises(ValueError, match=match):
        prm.check_settings(c)


# ---------------------------------------------------------------------------------------------
# Built-in soft chains


def test_builtin_soft_labels_are_rollout_fractions():
    hard = chain_records(3000, seed=3, max_operand=5, p_error=0.5)
    soft = soft_records(hard, seed=4, rollouts=8, p_slip=0.2)
    by_distance: dict[int, list[float]] = {}
    for h, s in zip(hard, soft):
        assert s["steps"] == h["steps"] and s["prompt"] == h["prompt"]
        assert s["meta"]["rollouts"] == 8 and s["meta"]["p_slip"] == 0.2
        n = len(h["steps"])
        for i, (y, hy) in enumerate(zip(s["labels"], h["labels"])):
            assert y * 8 == int(y * 8)  # a fraction of 8 rollouts
            if not hy:
                assert y == 0.0  # from a wrong step no rollout reaches the answer
            else:
                by_distance.setdefault(n - 1 - i, []).append(y)
    assert set(by_distance[0]) == {1.0}  # a right final step is the answer
    for d in (1, 2):  # mean (1 − p_slip)^d, within 4 standard errors of a Binomial(8, ·)/8
        p, ys = 0.8**d, by_distance[d]
        assert abs(np.mean(ys) - p) < 4 * math.sqrt(p * (1 - p) / 8 / len(ys)), d
    assert any(0 < y < 0.5 for y in by_distance[2])  # the estimate's noise: some right steps
    assert soft_records(hard[:50], seed=4) == soft_records(hard[:50], seed=4)


def test_a_last_mode_task_on_the_builtin_soft_chains_trains_final_steps_evaluates_all(
        cache_dir, tmp_path):  # fmt: skip
    """The task as main.py builds it (random params, no training: two small compiles): its
    loss reads the config's mode (its weight is the batch's final steps), its held-out
    metrics cover every labelled step."""
    from flaxlm.models.sharding import make_mesh

    c = H.tiny(prm_config, cache_dir, **{
        "data.train": "builtin:prm_steps_soft", "data.eval": "builtin:prm_steps_soft_heldout",
        "prm.train_on": "last", "model.vocab_size": H.VOCAB, "seq_len": 64, "batch_size": 8,
        "eval_every": 1,
    })  # fmt: skip
    workdir = str(tmp_path / "prm")
    task = prm.build_task(c, make_mesh(dict(c.mesh)), workdir)
    report = json.load(open(os.path.join(workdir, "data_report.json")))
    assert report["train"]["soft_steps"] > 0 and report["eval"]["truncated"] == 0
    params = H.random_params(task.init_params, 0)
    b = next(iter(task.train_batches))
    _, metrics = jax.jit(task.loss_fn)(params, b, None)
    assert float(metrics["weight"]) == b["final_step"].sum() == 8 < b["step_mask"].sum()
    ev = task.eval_fn(params)
    assert ev["steps"] == report["eval"]["steps"] > ev["solutions"] == report["eval"]["used"]
    for k in ("prob_mae", "step_kl", "final_step_accuracy", "majority_accuracy"):
        assert np.isfinite(ev[k]), k
