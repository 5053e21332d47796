"""train/pretrain.py `make_eval_fn`: the held-out eval runs each batch in `opt.grad_accum`
micro-batches, as the train step does. It ignored grad_accum and jitted one pass over the whole
global batch, full-batch float32 logits included: a run sized with grad_accum to fit its memory
could run out of it in the eval at step 0 (`eval_at_start`). The metrics are those of the
unsplit eval; the program's temporary memory that of one micro-batch.

The micro-batched eval is train/step.py's `eval_step` (`jit_eval_step`), every trainer's, and it
combines micro-batches with the train step's own code (`_micro_mean`): its metrics are
`loss_and_grads`' to the bit. The alignment trainers' evals:
tests/alignment/test_eval_micro_alignment.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.configs import pretrain as pretrain_config
from flaxlm.configs.common import override, to_model_config
from flaxlm.models.sharding import logical_axis_rules, make_mesh, shard_batch, use_mesh
from flaxlm.train import pretrain, step
from flaxlm.train.state import unbox

BATCH = 32  # rows: 8 devices × 4 micro-batches of one row per device


def _setup(grad_accum: int, **extra):
    c = pretrain_config.get_config("variant=tiny,runlocal=True,data=markov")
    c = override(c, {"batch_size": BATCH, "seq_len": 32, "model.vocab_size": 1024,
                     "model.d_model": 32, "model.n_layers": 1, "model.d_ff": 64,
                     "opt.grad_accum": grad_accum, "data.eval_batches": 2, **extra})  # fmt: skip
    mesh = make_mesh({"data": -1})
    cfg = to_model_config(c.model)
    init_params, apply = pretrain.model_fns(cfg)
    loss_fn = pretrain.lm_loss(apply, c.loss, moe=cfg.n_experts > 0)
    params = unbox(init_params(jax.random.key(0)))
    return c, mesh, loss_fn, params


def _evaluate(grad_accum: int, **extra) -> dict:
    c, mesh, loss_fn, params = _setup(grad_accum, **extra)
    with use_mesh(mesh, logical_axis_rules(c.sharding)):
        return pretrain.make_eval_fn(c, mesh, loss_fn)(params)


def test_eval_in_micro_batches_gives_the_whole_batch_metrics():
    one, four = _evaluate(1), _evaluate(4)
    assert set(one) == set(four) and {"loss", "nll", "perplexity"} <= set(one)
    for k in one:
        assert four[k] == pytest.approx(one[k], rel=1e-5), k


def test_eval_uses_opt_grad_accum(monkeypatch):
    """make_eval_fn builds its program with the run's grad_accum (not the whole batch at once)."""
    seen = []
    real = pretrain.jit_eval_step
    monkeypatch.setattr(pretrain, "jit_eval_step", lambda f, n: seen.append(n) or real(f, n))
    _evaluate(4)
    assert seen == [4]


def test_eval_in_micro_batches_needs_less_temporary_memory():
    c, mesh, loss_fn, params = _setup(4)
    batch = shard_batch(next(pretrain.make_batches(c, seed=1)), mesh)
    with use_mesh(mesh, logical_axis_rules(c.sharding)):
        temp = {n: step.jit_eval_step(loss_fn, n).lower(params, batch).compile()
                .memory_analysis().temp_size_in_bytes for n in (1, 4)}  # fmt: skip
    # (the full batch's float32 logits alone are 32·32·1024·4 B / 8 devices = 512 KiB)
    assert temp[4] < 0.5 * temp[1], temp


def test_a_grad_accum_that_does_not_divide_the_batch_is_named():
    c, mesh, loss_fn, params = _setup(1)
    batch = shard_batch(next(pretrain.make_batches(c, seed=1)), mesh)
    with pytest.raises(ValueError, match=r"opt\.grad_accum=3 does not divide the batch of 32"):
        step.jit_eval_step(loss_fn, 3)(params, batch)


def _toy_loss(params, batch, rng):
    """A loss with every kind of metric: a weighted mean, a count (SUMS) and a group mean of
    its own (RATIOS), over rows whose weights differ (row 0 of each micro-batch of 4: none)."""
    del rng
    x, w = batch["x"] * params, batch["w"]
    pos = (x > 0).astype(jnp.float32) * w
    metrics = {"mean_x": jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0), "weight": jnp.sum(w),
               step.SUMS: {"count": jnp.sum(pos)},
               step.RATIOS: {"pos_mean": (jnp.sum(x * pos)[None], jnp.sum(pos)[None])}}  # fmt: skip
    return metrics["mean_x"] ** 2, metrics


def test_eval_step_combines_micro_batches_as_the_train_step_does():
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.standard_normal(16), jnp.float32),
             "w": jnp.asarray(np.arange(16) % 4, jnp.float32)}  # fmt: skip
    params, key = jnp.float32(1.5), jax.random.key(0)
    whole = step.eval_step(params, batch, key, loss_fn=_toy_loss)
    for n in (2, 4):
        got = jax.jit(lambda p, b, n=n: step.eval_step(p, b, key, loss_fn=_toy_loss,
                                                       grad_accum=n))(params, batch)  # fmt: skip
        train = jax.jit(lambda p, b, n=n: step.loss_and_grads(p, b, key, _toy_loss, n))
        loss, metrics, _ = train(params, batch)
        assert got == {**metrics, "loss": loss}  # (the same combine, to the bit)
        assert set(got) == set(whole) == {"loss", "mean_x", "weight", "count", "pos_mean"}
        for k in ("mean_x", "weight", "count", "pos_mean"):  # the whole batch's
            assert float(got[k]) == pytest.approx(float(whole[k]), rel=1e-6, abs=1e-6), k


def test_eval_rows_gives_each_row_its_own_outputs_in_the_batch_order():
    """Per-row outputs (DPO's, KTO's, the reward model's evals) come back row by row as the
    unsplit pass gives them, a pair's two sides together."""
    batch = {"chosen": jnp.arange(24.0).reshape(8, 3), "rejected": -jnp.arange(8.0)}
    rows_fn = lambda p, b: [jnp.sum(b["chosen"], -1) * p, b["rejected"] + p]  # noqa: E731
    whole = step.eval_rows(2.0, batch, rows_fn=rows_fn)
    for n in (2, 4, 8):
        got = step.jit_eval_rows(rows_fn, n)(2.0, batch)
        for a, b in zip(got, whole, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_micro_batches_that_all_weigh_nothing_keep_their_metrics():
    """A GRPO or online-DPO minibatch whose every row weighs 0 (all pairs tied, every answer
    truncated under mask_truncated) logged its rollout/* statistics as 0 with grad_accum > 1
    (0·x / 1e-8), where one micro-batch logs them as they are."""

    def fn(x):
        w, stat = x
        return w * 2.0, {"weight": w, "rollout/nonstop": stat, "kl": w * 3.0}, jnp.ones(2) * w

    stat = jnp.asarray([32.0, 32.0, 30.0])
    loss, metrics, grads = step._micro_mean(fn, (jnp.zeros(3), stat))
    assert float(loss) == 0 and not np.asarray(grads).any()
    np.testing.assert_allclose(metrics["rollout/nonstop"], 94.0 / 3, rtol=1e-6)
    assert float(metrics["kl"]) == 0
    # any weight at all: the weighted mean, as before
    loss, metrics, _ = step._micro_mean(fn, (jnp.asarray([0.0, 1.0, 3.0]), stat))
    np.testing.assert_allclose(metrics["rollout/nonstop"], (32.0 + 3 * 30.0) / 4, rtol=1e-6)
    np.testing.assert_allclose(metrics["weight"], 4.0)
    np.testing.assert_allclose(loss, 2.0 * (1 + 9) / 4, rtol=1e-6)
