"""Distillation: the divergences, the metrics and the loss against numpy written independently
(float64), their gradients (forward KL's closed form, JSD's central differences), the chunked
loss against the full one (values and gradients), the teacher passed to the jitted step as an
argument, runs through the shared loop (a fresh student learning a teacher; a LoRA student that
starts as its teacher: zero divergence, full agreement), and the bad input named by key/run."""

import importlib
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flaxlm.alignment import distill
from flaxlm.configs import distill as distill_config
from flaxlm.models.config import get_variant
from flaxlm.train.checkpoint import read_meta
from flaxlm.train.metrics import read_metrics
from flaxlm.train.pretrain import model_fns

_spec = importlib.util.spec_from_file_location(
    "rl_helpers", os.path.join(os.path.dirname(__file__), "rl_helpers.py")
)
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _d(**kw):
    d = distill_config.distill_config()
    d.update(kw)
    return d


# ---------------------------------------------------------------------------------------------
# numpy references (float64)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def _np_divergence(s_logits, t_logits, kind, tau, beta):
    s, t = _log_softmax(s_logits / tau), _log_softmax(t_logits / tau)
    ps, pt = np.exp(s), np.exp(t)
    if kind == "forward_kl":
        return (pt * (t - s)).sum(-1)
    if kind == "reverse_kl":
        return (ps * (s - t)).sum(-1)
    m = beta * pt + (1 - beta) * ps  # the mixture itself, not in log space
    return beta * (pt * (t - np.log(m))).sum(-1) + (1 - beta) * (ps * (s - np.log(m))).sum(-1)


def _np_sums(s_logits, t_logits, targets, mask, kind, tau, beta):
    """kd, student nll, student accuracy, agreement, teacher nll: sums over the mask. The teacher
    is cut to the shared V ids and renormalised there; the student is normalised over its FULL
    vocabulary: forward KL is Σ_{v<V} p_T (log p_T − log p_S) with that p_S; the other two are
    taken against the student renormalised over V, plus −log(1 − m), m = p_S's mass past V."""
    V = min(s_logits.shape[-1], t_logits.shape[-1])
    s, t = np.asarray(s_logits, np.float64), np.asarray(t_logits, np.float64)
    if kind == "forward_kl":
        log_ps, log_pt = _log_softmax(s / tau)[..., :V], _log_softmax(t[..., :V] / tau)
        div = (np.exp(log_pt) * (log_pt - log_ps)).sum(-1)
    else:
        outside = np.exp(_log_softmax(s / tau))[..., V:].sum(-1)
        div = _np_divergence(s[..., :V], t[..., :V], kind, tau, beta) - np.log1p(-outside)

    def nll(x):
        return -np.take_along_axis(_log_softmax(x), targets[..., None], -1)[..., 0]

    top_s, top_t = s.argmax(-1), t[..., :V].argmax(-1)
    cols = [div, nll(s), top_s == targets, top_s == top_t, nll(t)]
    return np.array([(np.asarray(c, np.float64) * mask).sum() for c in cols])


def _logits(rng, shape, scale=2.0):
    return jnp.asarray(rng.normal(0, scale, shape), jnp.float32)


@pytest.mark.parametrize("kind", distill.DIVERGENCES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("vs,vt", [(13, 16), (16, 13)])
def test_sums_match_numpy(kind, tau, vs, vt):
    """Every column, with a mask with holes, and a teacher whose vocabulary is padded past the
    student's (13 vs 16: the teacher over the 13 both have) or a student's past the teacher's
    (16 vs 13: the student normalised over all its 16 ids, its mass on the last 3 counted)."""
    rng = np.random.default_rng(0)
    B, T = 3, 5
    s, t = _logits(rng, (B, T, vs)), _logits(rng, (B, T, vt))
    targets = jnp.asarray(rng.integers(0, 13, (B, T)), jnp.int32)
    mask = jnp.asarray(rng.random((B, T)) < 0.7, jnp.float32)
    d = _d(divergence=kind, temperature=tau, jsd_beta=0.3)
    got = distill.token_sums(s, t, targets, mask, d)
    want = _np_sums(np.asarray(s), np.asarray(t), np.asarray(targets), np.asarray(mask), kind,
                    tau, 0.3)  # fmt: skip
    np.testing.assert_allclose(np.asarray(got), want, **TOL)
    assert want[0] > 0.1  # (distributions far apart: the check is not of zeros)


@pytest.mark.parametrize("kind", distill.DIVERGENCES)
def test_a_student_vocabulary_past_the_teachers_is_pushed_down(kind):
    """Student 12 ids, teacher 8: the gradient of every divergence raises none of the 4 extra
    logits (each lowered, in proportion to its probability), and a student equal to the teacher
    on the 8 with mass m on the other 4 pays −log(1 − m) — no divergence lets mass hide there."""
    rng = np.random.default_rng(5)
    t = _logits(rng, (6, 8))
    s = jnp.concatenate([t, _logits(rng, (6, 4))], -1)
    mask = jnp.ones((6,), jnp.float32)
    d = _d(divergence=kind, jsd_beta=0.3)
    targets = jnp.zeros((6,), jnp.int32)
    kd = lambda x: distill.token_sums(x, t, targets, mask, d)[0]  # noqa: E731
    p = np.exp(_log_softmax(np.asarray(s)))
    np.testing.assert_allclose(float(kd(s)), -np.log1p(-p[:, 8:].sum(-1)).sum(), rtol=1e-5)
    g = np.asarray(jax.grad(kd)(s))[:, 8:]
    assert (g > 0).all(), g  # (descent lowers them)


def test_divergences_vanish_at_the_teacher_and_jsd_is_symmetric_at_one_half():
    rng = np.random.default_rng(1)
    s, t = _logits(rng, (4, 9)), _logits(rng, (4, 9))
    for kind in distill.DIVERGENCES:
        np.testing.assert_allclose(distill.token_divergence(t, t, kind), 0.0, atol=1e-6)
    np.testing.assert_allclose(distill.token_divergence(s, t, "jsd", beta=0.5),
                               distill.token_divergence(t, s, "jsd", beta=0.5), **TOL)  # fmt: skip
    # forward and reverse KL are each other's swap
    np.testing.assert_allclose(distill.token_divergence(s, t, "forward_kl"),
                               distill.token_divergence(t, s, "reverse_kl"), **TOL)  # fmt: skip


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_forward_kl_gradient_is_tau_times_the_softmax_difference(tau):
    """d/ds of τ²·KL(p_T ‖ p_S) = τ·(p_S − p_T): the τ² scale keeps the gradient's size."""
    rng = np.random.default_rng(2)
    s, t = _logits(rng, (6, 11)), _logits(rng, (6, 11))
    g = jax.grad(lambda x: tau**2 * distill.token_divergence(x, t, "forward_kl", tau).sum())(s)
    p = lambda x: np.exp(_log_softmax(np.asarray(x) / tau))  # noqa: E731
    np.testing.assert_allclose(np.asarray(g), tau * (p(s) - p(t)), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_gradients_match_central_differences_of_the_numpy_formula(kind):
    rng = np.random.default_rng(3)
    s, t = rng.normal(0, 1.5, (2, 7)), rng.normal(0, 1.5, (2, 7))
    t32 = jnp.asarray(t, jnp.float32)
    g = jax.grad(lambda x: distill.token_divergence(x, t32, kind, 1.5, 0.3).sum())(
        jnp.asarray(s, jnp.float32)
    )
    eps, want = 1e-6, np.zeros_like(s)
    for i in np.ndindex(s.shape):
        up, down = s.copy(), s.copy()
        up[i] += eps
        down[i] -= eps
        want[i] = (_np_divergence(up, t, kind, 1.5, 0.3).sum()
                   - _np_divergence(down, t, kind, 1.5, 0.3).sum()) / (2 * eps)  # fmt: skip
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The loss over two real models, full and chunked


@pytest.fixture(scope="module")
def two_models():
    """(student apply, params), (teacher apply, params), a packed batch: a 1-layer student and
    a 2-layer teacher with a larger padded vocabulary (64 vs 72)."""
    scfg = get_variant("tiny", vocab_size=64, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1,
                       d_ff=64)  # fmt: skip
    tcfg = get_variant("tiny", vocab_size=72, n_layers=2, d_model=48, n_heads=2, n_kv_heads=2,
                       d_ff=96)  # fmt: skip
    (s_init, s_apply), (t_init, t_apply) = model_fns(scfg), model_fns(tcfg)
    sp, tp = H.random_params(s_init, 0), H.random_params(t_init, 1)
    sp, tp = jax.tree.map(lambda x: 4 * x, sp), jax.tree.map(lambda x: 4 * x, tp)  # (sharper)
    rng = np.random.default_rng(4)
    B, T = 4, 16
    seg = np.repeat([[1] * 9 + [2] * 5 + [0] * 2], B, 0).astype(np.int32)
    pos = np.concatenate([np.arange(9), np.arange(5), [0, 0]])[None].repeat(B, 0).astype(np.int32)
    batch = {"tokens": rng.integers(0, 64, (B, T)).astype(np.int32),
             "targets": rng.integers(0, 64, (B, T)).astype(np.int32),
             "segment_ids": seg, "positions": pos,
             "loss_mask": ((seg > 0) & (rng.random((B, T)) < 0.8)).astype(np.float32)}  # fmt: skip
    return (s_apply, sp), (t_apply, tp), batch


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_loss_over_models_matches_numpy_and_chunks_change_nothing(two_models, kind):
    (s_apply, sp), (t_apply, tp), batch = two_models
    d = _d(divergence=kind, temperature=2.0, ce_weight=0.25, jsd_beta=0.7)
    full = distill.distill_loss_fn(s_apply, t_apply, d)
    chunked = distill.distill_loss_fn(s_apply, t_apply, d, chunk=4)
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    sums = _np_sums(np.asarray(s_apply(sp, *args)), np.asarray(t_apply(tp, *args)),
                    batch["targets"], batch["loss_mask"], kind, 2.0, 0.7)  # fmt: skip
    n = batch["loss_mask"].sum()
    kd, nll = sums[0] / n, sums[1] / n
    want_loss = 0.25 * nll + 0.75 * 4.0 * kd
    (loss, m), grads = jax.value_and_grad(full, has_aux=True)(sp, batch, None, tp)
    (loss_c, m_c), grads_c = jax.value_and_grad(chunked, has_aux=True)(sp, batch, None, tp)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    for i, k in enumerate(distill.SUMS):
        np.testing.assert_allclose(float(m[k]), sums[i] / n, rtol=1e-5, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(float(m_c[k]), float(m[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(float(loss_c), float(loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_c), strict=True):
        # float32 summation order, relative to the leaf's scale: the embedding's gradient runs
        # to ~19 here, so its entries near 2e-4 differ by ~1e-6 between the two orders (jax
        # 0.11.2 on the CPU: 1.03e-6, past a fixed atol of 1e-6); a chunking bug is O(scale)
        scale = float(np.abs(np.asarray(a)).max())
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=2e-6 * scale)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(grads)) > 0


def test_the_jitted_step_takes_the_teacher_as_arguments_not_constants(two_models):
    """Closed over, the teacher's weights would be constants of the program (jax embeds
    closed-over arrays): every teacher leaf is an argument of the lowered step, and the step
    trains the student."""
    import optax

    from flaxlm.models.sharding import logical_axis_rules, make_mesh, use_mesh
    from flaxlm.train.state import create_train_state
    from flaxlm.train.step import guard_config, jit_train_step

    (s_apply, _), (t_apply, tp), batch = two_models
    scfg = get_variant("tiny", vocab_size=64, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1,
                       d_ff=64)  # fmt: skip
    loss_fn = distill.distill_loss_fn(s_apply, t_apply, _d())
    mesh, rules = make_mesh({"data": -1}), logical_axis_rules("fsdp")
    tx = optax.adam(1e-3)
    with use_mesh(mesh, rules):
        state, shardings = create_train_state(model_fns(scfg)[0], tx, mesh, rules, 0)
        step = jit_train_step(loss_fn, tx, lambda s: 1e-3, guard_config(), 1, shardings, mesh,
                              frozen=True)  # fmt: skip
        lowered = step.lower(state, batch, tp)
        n_args = len(jax.tree.leaves(lowered.args_info))
        assert n_args == sum(len(jax.tree.leaves(x)) for x in (state, batch, tp))
        new_state, metrics = step(state, batch, tp)
    assert float(metrics["kd"]) > 0 and int(new_state.step) == 1


# ---------------------------------------------------------------------------------------------
# Runs through the shared loop


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    return H.fake_runs(str(tmp_path_factory.mktemp("distill_runs")), cache_dir)


# The shape of the fake "SFT" run (rl_helpers.fake_runs: the tiny variant's). A student started
# from it (init_from) sets these as its source has them: the 1-layer student's set shape would
# be refused, not ignored (alignment/common.py `resolve_model_config`).
SFT_SHAPE = {f"model.{k}": getattr(get_variant("tiny"), k)
             for k in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff")}  # fmt: skip


def _config(cache_dir, **overrides):
    return H.tiny(distill_config, cache_dir, **{
        "model.vocab_size": H.VOCAB, "model.n_layers": 1, "model.d_model": 32,
        "model.n_heads": 2, "model.n_kv_heads": 1, "model.d_ff": 64, "batch_size": 8,
        "seq_len": 64, "eval_gen.examples": 8, "eval_gen.batch": 8,
        "eval_gen.max_new_tokens": 4, "async_ckpt": False, "log_every": 1,
        "eval_at_start": True, **overrides,
    })  # fmt: skip


def test_a_fresh_student_learns_the_teacher(runs, cache_dir, tmp_path):
    """A fresh 1-layer student of the random 2-layer "SFT" teacher: the held-out divergence
    falls and the top-1 agreement rises; the student took the teacher's tokenizer; the
    teacher's generation marks are computed once and logged with every evaluation."""
    sft, _ = runs
    wd = tmp_path / "distill"
    c = _config(cache_dir, **{"distill.teacher": sft, "total_steps": 30, "eval_every": 30,
                              "ckpt_every": 30, "opt.lr": 1e-2})  # fmt: skip
    distill.run(c, str(wd))
    evals = [r for r in read_metrics(wd) if "eval/kd" in r]
    first, last = evals[0], evals[-1]
    assert (first["step"], last["step"]) == (0, 30)
    assert last["eval/kd"] < 0.5 * first["eval/kd"], (first["eval/kd"], last["eval/kd"])
    assert last["eval/agreement"] > first["eval/agreement"] + 0.2
    assert last["eval/teacher_nll"] == pytest.approx(first["eval/teacher_nll"], rel=1e-6)
    marks = [k for k in first if k.startswith("eval/teacher/")]
    assert "eval/teacher/sft_heldout/accuracy" in marks
    assert all(last[k] == first[k] for k in marks)
    assert "eval/sft_heldout/accuracy" in last
    trained = [r for r in read_metrics(wd) if "loss" in r]
    assert len(trained) == 30 and trained[-1]["kd"] < trained[0]["kd"]
    assert trained[0]["loss"] == pytest.approx(trained[0]["kd"], rel=1e-5)  # α 0, τ 1
    _, meta = read_meta(str(wd))
    assert meta["teacher"] == sft
    theirs = read_meta(sft)[1]["tokenizer"]
    assert open(meta["tokenizer"], "rb").read() == open(theirs, "rb").read()


def _mass_past(run_dir: str, vocab: int) -> float:
    """The mean probability a run's model puts on ids >= `vocab`, over a held-out text."""
    from flaxlm.data.tokenizer import Tokenizer
    from flaxlm.train.checkpoint import load_model

    cfg, params, meta = load_model(run_dir)
    tok = Tokenizer.load(meta["tokenizer"])
    ids = np.asarray([tok.encode("Radupin lives in Oslo. Sanu is a baker and likes red.",
                                 bos=True)], np.int32)  # fmt: skip
    logits = model_fns(cfg)[1](params, ids, None, None)
    return float(jax.nn.softmax(logits.astype(jnp.float32), -1)[..., vocab:].sum(-1).mean())


def test_a_student_vocabulary_past_the_teachers_learns_to_leave_it_empty(runs, cache_dir,
                                                                         tmp_path):  # fmt: skip
    """A student of 2048 ids (given) and a teacher of 512: after 20 steps the student puts
    under 1% of its probability on the 1536 ids no token is (it starts near 75%). Cut before
    the student's softmax, those logits were never trained and kept most of the mass."""
    sft, _ = runs
    wd = tmp_path / "wide"
    c = _config(cache_dir, **{"distill.teacher": sft, "model.vocab_size": 4 * H.VOCAB,
                              "total_steps": 20, "eval_every": 0, "ckpt_every": 20,
                              "eval_gen.sets": "", "opt.lr": 3e-2})  # fmt: skip
    distill.run(c, str(wd))
    assert read_meta(str(wd))[1]["model_config"]["vocab_size"] == 4 * H.VOCAB  # (as given)
    assert _mass_past(str(wd), H.VOCAB) < 0.01


def test_a_fresh_student_takes_the_teachers_vocab_size(runs, cache_dir, tmp_path):
    """Without --config.model.vocab_size a fresh student has the teacher's vocab_size (512),
    not the config's default (the built-in tokenizer's 2048); given, or with init_from, the
    run's own is kept."""
    sft, _ = runs
    shape = {"model.n_layers": 1, "model.d_model": 32, "model.n_heads": 2,
             "model.n_kv_heads": 1, "model.d_ff": 64}  # fmt: skip
    c = H.tiny(distill_config, cache_dir, "variant=tiny,runlocal=True", **shape, **{
        "distill.teacher": sft, "total_steps": 2, "eval_every": 0, "ckpt_every": 2,
        "eval_gen.sets": "", "async_ckpt": False, "batch_size": 8, "seq_len": 64,
    })  # fmt: skip
    assert c.model.vocab_size == 2048 != H.VOCAB
    wd = tmp_path / "fresh"
    distill.run(c, str(wd))
    assert read_meta(str(wd))[1]["model_config"]["vocab_size"] == H.VOCAB
    given = H.tiny(distill_config, cache_dir, "variant=tiny,runlocal=True",
                   **{"distill.teacher": sft, "model.vocab_size": 2048})  # fmt: skip
    distill.fresh_student_vocab(given)
    assert given.model.vocab_size == 2048
    started = H.tiny(distill_config, cache_dir, "variant=tiny,runlocal=True",
                     **{"distill.teacher": sft, "init_from": sft})  # fmt: skip
    distill.fresh_student_vocab(started)
    assert started.model.vocab_size == 2048  # (init_from's architecture rules; untouched)


def test_a_lora_student_starting_as_its_teacher_has_nothing_to_learn(runs, cache_dir, tmp_path):
    """init_from = the teacher, adapters at zero: divergence 0, agreement 1, the same NLL."""
    sft, _ = runs
    wd = tmp_path / "lora"
    c = _config(cache_dir, init_from=sft, **SFT_SHAPE, **{
        "distill.teacher": sft, "lora.rank": 4, "total_steps": 1, "eval_every": 1,
        "ckpt_every": 1, "eval_gen.sets": "", "distill.divergence": "jsd",
    })  # fmt: skip
    distill.run(c, str(wd))
    first = next(r for r in read_metrics(wd) if "eval/kd" in r)
    assert first["eval/kd"] == pytest.approx(0.0, abs=1e-6)
    assert first["eval/agreement"] == 1.0
    assert first["eval/nll"] == pytest.approx(first["eval/teacher_nll"], rel=1e-6)


def test_on_policy_the_student_learns_the_teacher_on_its_own_samples(runs, cache_dir, tmp_path):
    """On-policy: every 2 steps a rollout of 16 prompts answered by the live student (one
    decoder call); the divergence on its samples falls; the rollout statistics are logged; the
    checkpoint lands on a rollout boundary and records where the prompts were."""
    sft, _ = runs
    wd = tmp_path / "on_policy"
    c = H.tiny(distill_config, cache_dir, "runlocal=True,on_policy=True", **{
        "distill.teacher": sft, "model.vocab_size": H.VOCAB, "model.n_layers": 1,
        "model.d_model": 32, "model.n_heads": 2, "model.n_kv_heads": 1, "model.d_ff": 64,
        "batch_size": 8, "rollout.batch": 16, "rollout.max_prompt_len": 32,
        "rollout.max_new_tokens": 8, "seq_len": 40, "total_steps": 20, "eval_every": 0,
        "ckpt_every": 20, "log_every": 2, "async_ckpt": False, "opt.lr": 1e-2,
    })  # fmt: skip
    assert c.data.train == "builtin:rl_prompts" and c.distill.on_policy
    distill.run(c, str(wd))
    rows = [r for r in read_metrics(wd) if "loss" in r]
    assert len(rows) == 10
    assert rows[-1]["kd"] < 0.7 * rows[0]["kd"], (rows[0]["kd"], rows[-1]["kd"])
    assert {r["rollout/iteration"] for r in rows} == set(range(10))
    assert all(0 < r["rollout/response_len"] <= 8 and r["rollout/gen_s"] > 0 for r in rows)
    state = json.load(open(wd / "checkpoints" / "20" / "data" / "metadata"))  # (orbax's JSON)
    assert state["iteration"] == 10 and state["unused_minibatches"] == 0


def test_on_pretraining_text_every_token_is_distilled(runs, cache_dir, tmp_path):
    """`text=True`: packed documents of the built-in corpus in the teacher's tokenizer; the
    held-out divergence falls and the agreement rises; the loss weight is every real target
    token."""
    sft, _ = runs
    wd = tmp_path / "text"
    c = H.tiny(distill_config, cache_dir, "runlocal=True,text=True", **{
        "distill.teacher": sft, "model.vocab_size": H.VOCAB, "model.n_layers": 1,
        "model.d_model": 32, "model.n_heads": 2, "model.n_kv_heads": 1, "model.d_ff": 64,
        "batch_size": 8, "seq_len": 64, "total_steps": 20, "eval_every": 20, "ckpt_every": 20,
        "eval_at_start": True, "log_every": 20, "async_ckpt": False, "opt.lr": 1e-2,
        "data.eval_batches": 1,
    })  # fmt: skip
    assert c.data.kind == "text" and c.eval_gen.sets == ""
    distill.run(c, str(wd))
    first, last = [r for r in read_metrics(wd) if "eval/kd" in r]
    assert last["eval/kd"] < 0.8 * first["eval/kd"]  # (a random teacher: near-uniform)
    assert last["eval/agreement"] > first["eval/agreement"]
    # (the student learns a random teacher, not the text: its perplexity need not fall)
    assert last["eval/perplexity"] == pytest.approx(np.exp(last["eval/nll"]), rel=1e-6)
    trained = [r for r in read_metrics(wd) if "loss" in r]
    assert trained[-1]["weight"] > 0.9 * 8 * 64  # (packed rows: nearly every position)
    assert read_meta(str(wd))[1]["teacher"] == sft


def test_a_preempted_text_run_resumes_bit_for_bit(runs, cache_dir, tmp_path):
    """SIGTERM during step 3 of 6: the loop saves and stops; the resumed run (the teacher read
    again, the grain iterator restored) ends with the uninterrupted run's params."""
    import signal

    from flaxlm.models.sharding import make_mesh
    from flaxlm.train import loop

    sft, _ = runs
    c = H.tiny(distill_config, cache_dir, "runlocal=True,text=True", **{
        "distill.teacher": sft, "model.vocab_size": H.VOCAB, "model.n_layers": 1,
        "model.d_model": 32, "model.n_heads": 2, "model.n_kv_heads": 1, "model.d_ff": 64,
        "batch_size": 8, "seq_len": 64, "total_steps": 6, "eval_every": 0, "ckpt_every": 6,
        "log_every": 1, "async_ckpt": False, "opt.lr": 1e-2,
    })  # fmt: skip
    straight, _ = distill.run(c, str(tmp_path / "straight"))
    mesh = make_mesh(dict(c.mesh))
    task = distill.build_task(c, mesh, str(tmp_path / "resumed"))

    def sigterm_at_step_3(state):
        if int(state.step) == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    task.before_step = sigterm_at_step_3
    _, summary = loop.run(c, str(tmp_path / "resumed"), task, mesh=mesh)
    assert summary["preempted"] and summary["step"] == 4
    resumed, summary = distill.run(c, str(tmp_path / "resumed"))
    assert summary["step"] == 6
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gkd_mix_alternates_student_samples_and_the_data_answers(runs, cache_dir, tmp_path):
    """on_policy_fraction 0.5 on chats: rollouts are drawn as the student's samples or as the
    data's answers to the same prompts (one conversation per row, no decoder call), chosen per
    rollout from (seed, rollout count) — the same choices in a second run."""
    sft, _ = runs
    over = {
        "distill.teacher": sft, "distill.on_policy_fraction": 0.5,
        "data.train": "builtin:sft_train", "model.vocab_size": H.VOCAB, "model.n_layers": 1,
        "model.d_model": 32, "model.n_heads": 2, "model.n_kv_heads": 1, "model.d_ff": 64,
        "batch_size": 8, "rollout.batch": 8, "rollout.max_prompt_len": 48,
        "rollout.max_new_tokens": 8, "seq_len": 128, "total_steps": 6, "eval_every": 0,
        "ckpt_every": 6, "log_every": 1, "async_ckpt": False,
    }  # fmt: skip
    c = H.tiny(distill_config, cache_dir, "runlocal=True,on_policy=True", **over)
    distill.run(c, str(tmp_path / "mix"))
    rows = [r for r in read_metrics(tmp_path / "mix") if "loss" in r]
    kinds = [r["rollout/on_policy"] for r in rows]
    assert set(kinds) == {0.0, 1.0}, kinds
    for r in rows:
        assert r["kd"] > 0 and r["rollout/response_len"] > 0
        assert (r["rollout/gen_s"] > 0) == (r["rollout/on_policy"] == 1.0)
    source = distill.StudentRollouts.__new__(distill.StudentRollouts)
    source.config, source.fraction = c, 0.5
    again = []
    for i in range(6):
        source.iteration = i
        again.append(float(source.on_policy_now()))
    assert again == kinds


def test_the_task_is_registered():
    from flaxlm.train.main import TASKS

    assert importlib.import_module(TASKS["distill"]).run is distill.run
    assert distill_config.get_config("runlocal=True").task == "distill"


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("key,value,match", [
    ("teacher", "", "distill.teacher"),
    ("divergence", "kl", "distill.divergence='kl'"),
    ("temperature", 0.0, "distill.temperature=0.0"),
    ("jsd_beta", 1.0, "distill.jsd_beta=1.0"),
    ("ce_weight", 1.5, "distill.ce_weight=1.5"),
    ("on_policy_fraction", 0.0, "distill.on_policy_fraction=0.0 must be in (0, 1]"),
    ("on_policy_fraction", 0.5, "distill.on_policy_fraction=0.5 needs distill.on_policy"),
])  # fmt: skip
def test_bad_settings_name_their_key(key, value, match):
    d = _d(teacher="runs/x", divergence="jsd")
    d[key] = value
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(".", r"\.")):
        distill.check_config(d)


def _lm_run(path, tokenizer, vocab):
    cfg = get_variant("tiny", vocab_size=vocab, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1,
                      d_ff=64)  # fmt: skip
    params = H.random_params(model_fns(cfg)[0], 5)
    meta = {"model_config": cfg.to_dict(), "tokenizer": tokenizer, "lora": {}, "head": "lm"}
    return H.write_run(str(path), params, meta)


def test_a_student_with_another_tokenizer_is_refused(runs, cache_dir, tmp_path, chat_tokenizer):
    sft, _ = runs
    student = _lm_run(tmp_path / "student", chat_tokenizer[0], H.VOCAB)
    c = _config(cache_dir, init_from=student, **{"distill.teacher": sft})
    with pytest.raises(ValueError, match=f"distill.teacher={sft}: .* is not this run's") as e:
        distill.run(c, str(tmp_path / "wd"))
    assert chat_tokenizer[0] in str(e.value) and sft in str(e.value)


def test_a_student_set_to_another_shape_than_its_init_from_is_refused(runs, cache_dir, tmp_path):
    """The 1-layer student shape `_config` sets, with init_from the 2-layer "SFT" run: the set
    keys used to be dropped silently (the student was the source's shape); now an error names
    each, with both values, before the teacher is read or anything compiled."""
    sft, _ = runs
    c = _config(cache_dir, init_from=sft, **{"distill.teacher": sft})
    with pytest.raises(ValueError) as e:
        distill.run(c, str(tmp_path / "wd"))
    for line in (f"model.n_layers: init_from={sft} has 2, this run 1",
                 f"model.d_model: init_from={sft} has 64, this run 32"):  # fmt: skip
        assert line in str(e.value)


def test_a_teacher_whose_vocabulary_misses_tokenizer_ids_is_refused(runs, cache_dir, tmp_path):
    sft, _ = runs
    small = _lm_run(tmp_path / "teacher", read_meta(sft)[1]["tokenizer"], H.VOCAB // 2)
    c = _config(cache_dir, init_from=sft, **SFT_SHAPE, **{"distill.teacher": small})
    with pytest.raises(ValueError, match=f"teacher {small}'s vocab_size {H.VOCAB // 2}"):
        distill.run(c, str(tmp_path / "wd"))


def test_config_sections_are_complete():
    c = distill_config.get_config("variant=mini,runlocal=True")
    assert isinstance(c.distill, ml_collections.ConfigDict)
    assert set(c.distill) == set(distill_config.distill_config())


def test_text_without_a_tokenizer_anywhere_is_one_line_naming_the_key(cache_dir, tmp_path):
    """`text=True` with `data.tokenizer` empty and a teacher that records none (one trained on
    synthetic data): a DataError naming the key to set, raised before the teacher loads, which
    the trainer CLI prints as one line (it was a ValueError traceback)."""
    from flaxlm.data.source_errors import DataError
    from flaxlm.train import main as train_main

    cfg = get_variant("tiny", vocab_size=H.VOCAB)
    teacher = H.write_run(
        str(tmp_path / "markov_teacher"),
        H.random_params(model_fns(cfg)[0], 0),
        {"model_config": cfg.to_dict(), "head": "lm", "lora": {}},
    )
    c = H.tiny(distill_config, cache_dir, "runlocal=True,text=True",
               **{"distill.teacher": teacher, "data.tokenizer": ""})  # fmt: skip
    want = rf"data\.tokenizer.*distill\.teacher={teacher} records none"
    with pytest.raises(DataError, match=want):
        distill.run(c, str(tmp_path / "wd"))
    with pytest.raises(SystemExit, match=rf"^DataError: distill: no tokenizer .*{want}"):
        train_main.run_task("flaxlm.alignment.distill", c, str(tmp_path / "wd"))


def test_settings_that_would_fail_later_or_silently_are_refused_first(runs, cache_dir, tmp_path):
    """Each before the teacher loads: on-policy with a student vocabulary past the teacher's
    (its samples held ids the teacher cannot score: NaN from the first rollout), and
    distill.teacher_ema on a teacher run without an EMA (a CheckpointError naming neither key).
    With text=True an "hf:" init_from's own tokenizer is the text's, not the teacher's (that one
    was taken, and compared with itself)."""
    from flaxlm.models.sharding import make_mesh

    sft, _ = runs
    mesh = make_mesh({"data": -1})
    c = H.tiny(distill_config, cache_dir, "runlocal=True,on_policy=True", **{
        "distill.teacher": sft, "model.vocab_size": 4 * H.VOCAB, "model.n_layers": 1,
        "model.d_model": 32, "model.n_heads": 2, "model.n_kv_heads": 1, "model.d_ff": 64,
    })  # fmt: skip
    with pytest.raises(ValueError, match=rf"distill.on_policy: the student's vocab_size "
                       rf"{4 * H.VOCAB} is larger than distill.teacher's {H.VOCAB}"):  # fmt: skip
        distill.build_task(c, mesh, str(tmp_path / "wide"))
    c = _config(cache_dir, **{"distill.teacher": sft, "distill.teacher_ema": True})
    with pytest.raises(Exception, match=r"distill.teacher_ema=True.*distill.teacher="):
        distill.build_task(c, mesh, str(tmp_path / "ema"))
    text = H.tiny(distill_config, cache_dir, "runlocal=True,text=True",
                  **{"distill.teacher": sft, "init_from": "hf:/student/dir"})  # fmt: skip
    assert distill._text_tokenizer_path(text, {}) == "/student/dir"
    with text.unlocked():
        text.data.tokenizer = "/given.model"  # (data.tokenizer still comes first)
    assert distill._text_tokenizer_path(text, {}) == "/given.model"
