"""DPO family: every loss type equals its published formula written independently in numpy
(float32 inputs, float64 references, rtol 1e-5 / atol 1e-5); reference log-probabilities are the
same precomputed or online; a run trains through the shared loop."""

import importlib.util
import os

import jax
import numpy as np
import pytest

from flaxlm.alignment import dpo
from flaxlm.configs import dpo as dpo_config
from flaxlm.train.metrics import read_metrics

_spec = importlib.util.spec_from_file_location(
    "rl_helpers", os.path.join(os.path.dirname(__file__), "rl_helpers.py")
)
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

TOL = {"rtol": 1e-5, "atol": 1e-5}

# Fixed vectors: sequence log-probabilities (sums), lengths, chosen better and worse than the
# reference, a large margin (saturated sigmoid) and a tie.
PC = np.array([-12.0, -30.5, -8.25, -50.0, -20.0, -3.0], np.float32)
PR = np.array([-15.0, -28.0, -9.0, -10.0, -20.0, -40.0], np.float32)
RC = np.array([-13.0, -29.0, -8.0, -45.0, -20.0, -35.0], np.float32)
RR = np.array([-14.0, -29.5, -9.5, -12.0, -20.0, -5.0], np.float32)
LC = np.array([6, 12, 4, 20, 10, 3], np.float32)
LR = np.array([8, 11, 4, 5, 10, 16], np.float32)


def _logsig(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def _reference(kind, beta, eps=0.0, gamma=0.0):
    """Each paper's per-pair loss, written from its formula in float64."""
    pc, pr, rc, rr = (a.astype(np.float64) for a in (PC, PR, RC, RR))
    lc, lr = LC.astype(np.float64), LR.astype(np.float64)
    h = (pc - rc) - (pr - rr)  # log π/π_ref of chosen minus that of rejected
    if kind == "sigmoid":  # DPO eq. 7
        return -_logsig(beta * h)
    if kind == "conservative":  # cDPO: labels flipped with probability ε
        return -(1 - eps) * _logsig(beta * h) - eps * _logsig(-beta * h)
    if kind == "ipo":  # IPO eq. 17 with τ = β
        return (h - 1 / (2 * beta)) ** 2
    if kind == "hinge":  # SLiC-HF calibration loss, δ = 1/β scaled
        return np.maximum(0.0, 1 - beta * h)
    if kind == "robust":  # rDPO eq. 10
        return ((1 - eps) * -_logsig(beta * h) - eps * -_logsig(-beta * h)) / (1 - 2 * eps)
    if kind == "simpo":  # SimPO eq. 6
        return -_logsig(beta / lc * pc - beta / lr * pr - gamma)
    if kind == "orpo":  # ORPO: L_SFT + λ·L_OR, odds(y) = P/(1 − P), P = exp(mean log-prob)
        p_c, p_r = np.exp(pc / lc), np.exp(pr / lr)
        log_or = np.log((p_c / (1 - p_c)) / (p_r / (1 - p_r)))
        return -pc / lc + beta * -_logsig(log_or)
    if kind == "exo_pair":  # EXO eq. 16: KL from (q, 1 − q), q = σ(βh), to (1 − ε, ε)
        q, qbar = np.exp(_logsig(beta * h)), np.exp(_logsig(-beta * h))
        return q * (np.log(q) - np.log(1 - eps)) + qbar * (np.log(qbar) - np.log(eps))
    if kind == "discopop":  # DiscoPOP eq. 5, τ = 0.05
        w = np.exp(_logsig(beta * h / 0.05))
        return (1 - w) * -_logsig(beta * h) + w * np.exp(-beta * h)
    if kind in ("aot", "aot_pair"):  # AOT: the batch's quantiles, slot i to the row of u_(i)
        u, v = (pc - pr, rc - rr) if kind == "aot" else (pc - rc, pr - rr)
        out = np.zeros(len(u))
        out[np.argsort(u)] = -_logsig(beta * (np.sort(u) - np.sort(v)))
        return out
    raise AssertionError(kind)


CASES = [("sigmoid", 0.1, 0.0), ("sigmoid", 1.0, 0.0), ("conservative", 0.1, 0.2),
         ("ipo", 0.1, 0.0), ("ipo", 0.5, 0.0), ("hinge", 0.1, 0.0), ("hinge", 0.5, 0.0),
         ("robust", 0.1, 0.2), ("simpo", 2.0, 0.0), ("orpo", 0.1, 0.0),
         ("orpo", 1.0, 0.0), ("exo_pair", 0.1, 1e-3), ("exo_pair", 0.5, 0.25),
         ("discopop", 0.05, 0.0), ("discopop", 1.0, 0.0), ("aot", 0.1, 0.0),
         ("aot_pair", 0.1, 0.0)]  # fmt: skip


@pytest.mark.parametrize("kind,beta,eps", CASES)
def test_each_loss_equals_its_formula(kind, beta, eps):
    gamma = 0.8 if kind == "simpo" else 0.0
    losses, rew_c, rew_r = dpo.preference_loss(
        PC, PR, RC, RR, beta=beta, loss_type=kind, label_smoothing=eps,
        chosen_lengths=LC, rejected_lengths=LR, simpo_gamma=gamma,
    )  # fmt: skip
    losses = np.asarray(losses)
    assert losses.dtype == np.float32 and losses.shape == (6,)
    np.testing.assert_allclose(losses, _reference(kind, beta, eps, gamma), **TOL)
    if kind in dpo.REFERENCE_FREE:
        np.testing.assert_allclose(rew_c, beta * PC / LC, **TOL)
        np.testing.assert_allclose(rew_r, beta * PR / LR, **TOL)
    else:
        np.testing.assert_allclose(rew_c, beta * (PC.astype(np.float64) - RC), **TOL)
        np.testing.assert_allclose(rew_r, beta * (PR.astype(np.float64) - RR), **TOL)


def test_family_relations_and_gradient_direction():
    kw = dict(beta=0.1, chosen_lengths=LC, rejected_lengths=LR)
    sig = np.asarray(dpo.preference_loss(PC, PR, RC, RR, loss_type="sigmoid", **kw)[0])
    for kind in ("conservative", "robust"):  # ε = 0 is plain DPO
        same = dpo.preference_loss(PC, PR, RC, RR, loss_type=kind, label_smoothing=0.0, **kw)[0]
        np.testing.assert_allclose(same, sig, **TOL)
    # Where the policy prefers the rejected answer more than the reference does (h < 0), every
    # loss falls as the chosen answer gets likelier (IPO and cDPO push back only past a margin).
    h = (PC - RC) - (PR - RR)
    assert (h < 0).sum() == 3

    def grad(kind, eps=0.0):
        total = lambda pc: dpo.preference_loss(pc, PR, RC, RR, loss_type=kind,
                                               label_smoothing=eps, **kw)[0].sum()  # fmt: skip
        return np.asarray(jax.grad(total)(PC))

    for kind, _, eps in CASES:
        if kind == "discopop":  # (at β = 0.1 its slope at βh ∈ (−0.12, 0.08) is > 0: dpo.py)
            continue
        assert (grad(kind, eps)[h < 0] < 0).all(), kind
    g = grad("ipo")
    np.testing.assert_array_equal(np.sign(g), np.sign(h - 1 / (2 * 0.1)))  # IPO: h → 1/(2β)
    # ... and SimPO / ORPO ignore the reference.
    for kind in dpo.REFERENCE_FREE:
        a = dpo.preference_loss(PC, PR, RC, RR, loss_type=kind, **kw)[0]
        b = dpo.preference_loss(PC, PR, RC * 0, RR * 3, loss_type=kind, **kw)[0]
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo.preference_loss(PC, PR, RC, RR, beta=1.0, loss_type="simpo")
    with pytest.raises(ValueError, match="loss_type"):
        dpo.preference_loss(PC, PR, RC, RR, beta=1.0, loss_type="nope")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    return H.fake_runs(str(tmp_path_factory.mktemp("dpo_runs")), cache_dir)


def _ref_chosen_in_step(task, batches):
    """Online mode: the reference's chosen log-probabilities as the step scores them, from the
    task's frozen argument (`loop.Task.frozen`)."""
    from flaxlm.train.pretrain import model_fns

    apply = model_fns(H.get_variant("tiny", vocab_size=H.VOCAB))[1]
    fn = jax.jit(lambda f, b: dpo.pair_logps(apply, f, b)[0][0])
    return np.concatenate([np.asarray(fn(task.frozen, b)) for b in batches])


def test_reference_logps_precomputed_equal_online(runs, cache_dir):
    from flaxlm.models.sharding import make_mesh

    sft, _ = runs
    out = {}
    for mode in ("precompute", "online"):
        c = H.tiny(dpo_config, cache_dir, init_from=sft, **{
            "batch_size": 8, "seq_len": 64, "dpo.ref_logps": mode, "data.eval": "",
        })  # fmt: skip
        task = dpo.build_task(c, make_mesh(dict(c.mesh)), None)
        if mode == "online":  # scored in the step from its frozen argument, not in the batches
            batches = [next(task.train_batches) for _ in range(3)]
            assert not any(k.startswith("ref_") for b in batches for k in b)
            out[mode] = _ref_chosen_in_step(task, batches)
            continue
        assert task.frozen is None
        ref = task.train_batches.ref
        before = ref.forward_rows
        batches = [next(task.train_batches) for _ in range(3)]
        out[mode] = np.concatenate([b["ref_chosen_logps"] for b in batches])
        # precompute: the reference ran over every pair once, at build time, and never again
        assert ref.forward_rows == before
        assert (out[mode] < 0).all()
        # ...and its weights are released once every pair is scored.
        assert ref.params is None
        # a pair the table lacks reloads the reference to score it
        ref.table.clear()
        again = ref.add({k: v for k, v in batches[0].items() if not k.startswith("ref_")})
        assert ref.params is not None and ref.forward_rows - before == 8
        np.testing.assert_allclose(again["ref_chosen_logps"], out[mode][:8], rtol=1e-6)
    np.testing.assert_allclose(out["precompute"], out["online"], rtol=1e-6)


def test_reference_with_int8_weights_scores_near_float32(runs, cache_dir):
    """dpo.ref_dtype=int8: the reference's projections in int8 (a quarter of float32's bytes),
    its sequence log-probabilities near the float32 reference's, precomputed or scored in the
    step (online); a bad value names the key."""
    from flaxlm.models.sharding import make_mesh
    from flaxlm.train.pretrain import model_fns

    sft, _ = runs
    out, loss = {}, {}
    policy = H.random_params(model_fns(H.get_variant("tiny", vocab_size=H.VOCAB))[0], 0)
    for dtype in ("float32", "int8"):
        for mode in ("precompute", "online"):
            c = H.tiny(dpo_config, cache_dir, init_from=sft, **{
                "batch_size": 8, "seq_len": 64, "dpo.ref_logps": mode, "data.eval": "",
                "dpo.ref_dtype": dtype,
            })  # fmt: skip
            task = dpo.build_task(c, make_mesh(dict(c.mesh)), None)
            batch = next(task.train_batches)
            if mode == "precompute":
                out[dtype] = np.asarray(batch["ref_chosen_logps"])
            else:  # the int8 weights as the step's frozen argument: the policy (the SFT
                # weights, in float32) against them, log 2 against the float32 reference
                loss[dtype] = float(jax.jit(task.loss_fn)(policy, batch, None, task.frozen)[0])
    assert (out["float32"] < 0).all() and not np.array_equal(out["int8"], out["float32"])
    np.testing.assert_allclose(out["int8"], out["float32"], rtol=0.02)
    assert loss["float32"] == pytest.approx(np.log(2), abs=1e-6)
    assert loss["int8"] != loss["float32"] and loss["int8"] == pytest.approx(np.log(2), abs=0.05)
    c.dpo.ref_dtype = "int4"
    with pytest.raises(ValueError, match="dpo.ref_dtype='int4'"):
        dpo.build_task(c, make_mesh(dict(c.mesh)), None)


def test_init_from_ema_is_the_reference_unless_ref_from_names_one(cache_dir, tmp_path):
    """init_from_ema: the reference is the SFT run's EMA (the policy's start); dpo.ref_from
    names a reference of its own, read as its params."""
    from flaxlm.models.sharding import make_mesh
    from flaxlm.train.pretrain import model_fns

    sft, _ = H.fake_runs(str(tmp_path), cache_dir, ema=True)
    for ref_from, seed in (("", H.EMA_SEED["lm"]), (sft, 0)):
        c = H.tiny(dpo_config, cache_dir, init_from=sft, init_from_ema=True, **{
            "batch_size": 8, "seq_len": 64, "dpo.ref_logps": "online", "data.eval": "",
            "dpo.ref_from": ref_from,
        })  # fmt: skip
        task = dpo.build_task(c, make_mesh(dict(c.mesh)), None)
        cfg = H.get_variant("tiny", vocab_size=H.VOCAB)
        want = H.random_params(model_fns(cfg)[0], seed)
        got = jax.device_get(task.frozen)  # (online: the step's frozen argument)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ref_from_with_another_tokenizer_is_refused_before_any_load(
    runs, cache_dir, tmp_path, chat_tokenizer, monkeypatch
):  # fmt: skip
    """dpo.ref_from naming a run trained with another tokenizer used to train without a word:
    the reference scored this run's ids as other pieces. Refused (as distill refuses a
    teacher), naming the key and both tokenizers, before any data or model loads."""
    from flaxlm.models.sharding import make_mesh

    sft, _ = runs
    other = H.other_tokenizer_run(str(tmp_path / "other"), chat_tokenizer[0])
    H.forbid_loads(monkeypatch)
    c = H.tiny(dpo_config, cache_dir, init_from=sft, **{"dpo.ref_from": other})
    with pytest.raises(
        ValueError,
        match=rf"dpo.ref_from={other}: its tokenizer "
        rf"{chat_tokenizer[0]} \(\d+ pieces\) is not this run's .*\(512 pieces\)",
    ):
        dpo.build_task(c, make_mesh(dict(c.mesh)), None)


def test_label_smoothing_of_half_or_more_is_refused_before_any_load(cache_dir):
    """dpo.loss_type=conservative with dpo.label_smoothing >= 0.5 was accepted: at ε > 0.5
    cDPO's loss is smallest when the policy prefers the *rejected* answer (at 0.5 at h = 0).
    robust's ε was checked only when the loss was first traced, after the reference's
    precompute. Both are refused when the task is built, naming the key, before anything is
    read (init_from names no run)."""
    for loss_type, eps in (("conservative", 0.5), ("conservative", 0.7), ("robust", 0.6),
                           ("conservative", -0.1), ("exo_pair", 0.0),
                           ("exo_pair", 0.5)):  # fmt: skip
        c = H.tiny(dpo_config, cache_dir, init_from="/no/such/run", **{
            "dpo.loss_type": loss_type, "dpo.label_smoothing": eps})  # fmt: skip
        with pytest.raises(ValueError, match=f"dpo.label_smoothing={eps}: "
                                             f"dpo.loss_type={loss_type}"):  # fmt: skip
            dpo.build_task(c, None, None)
    with pytest.raises(ValueError, match="conservative DPO needs 0 <= label_smoothing < 0.5"):
        dpo.preference_loss(PC, PR, RC, RR, beta=0.1, loss_type="conservative",
                            label_smoothing=0.7)  # fmt: skip


def test_exo_pair_and_discopop_settings_are_refused_before_any_load(cache_dir):
    """loss=exo_pair comes with EXO's ε = 1e-3; `--config.dpo.loss_type=exo_pair` alone keeps
    ε = 0, EXO's log 0 (TRL quietly swaps in 1e-3): refused when the task is built, naming the
    key, as DiscoPOP's τ <= 0 is — before anything is read (init_from names no run)."""
    assert dpo_config.get_config("loss=exo_pair").dpo.label_smoothing == 1e-3
    assert dpo_config.get_config("loss=discopop").dpo.discopop_tau == 0.05
    for overrides, match in (
        ({"dpo.loss_type": "exo_pair"}, r"dpo\.label_smoothing=0.0: dpo\.loss_type=exo_pair"),
        ({"dpo.loss_type": "discopop", "dpo.discopop_tau": 0.0}, r"dpo\.discopop_tau=0.0 must"),
        ({"dpo.loss_type": "discopop", "dpo.discopop_tau": -1.0}, r"dpo\.discopop_tau=-1.0 "),
    ):
        c = H.tiny(dpo_config, cache_dir, init_from="/no/such/run", **overrides)
        with pytest.raises(ValueError, match=match):
            dpo.build_task(c, None, None)


def test_beta_of_zero_or_below_and_a_negative_sft_coef_are_refused_before_any_load(cache_dir):
    """dpo.beta=0 passed the settings check: IPO then failed at its first traced step with a
    bare ZeroDivisionError (its target 1/(2β)) and every other type trained on a constant loss.
    Refused when the task is built, naming the key; `preference_loss` itself says so too."""
    for loss_type, key, bad in (("ipo", "beta", 0.0), ("sigmoid", "beta", -0.1),
                                ("orpo", "beta", 0.0), ("sigmoid", "sft_coef", -1.0)):  # fmt: skip
        c = H.tiny(dpo_config, cache_dir, f"runlocal=True,loss={loss_type}",
                   init_from="/no/such/run", **{f"dpo.{key}": bad})  # fmt: skip
        with pytest.raises(ValueError, match=rf"dpo\.{key}={bad} must be"):
            dpo.build_task(c, None, None)
    with pytest.raises(ValueError, match="ipo DPO needs beta > 0, got 0.0"):
        dpo.preference_loss(PC, PR, RC, RR, beta=0.0, loss_type="ipo")


def test_dpo_trains_in_the_loop(runs, cache_dir, tmp_path):
    sft, _ = runs
    c = H.tiny(dpo_config, cache_dir, init_from=sft, **{
        "batch_size": 8, "seq_len": 64, "opt.lr": 3e-3, "total_steps": 6, "log_every": 3,
        "eval_every": 6, "eval_gen.examples": 8, "eval_gen.batch": 8,
        "eval_gen.max_new_tokens": 4, "eval_gen.max_prompt_len": 48,
    })  # fmt: skip
    _, summary = dpo.run(c, str(tmp_path))
    recs = [r for r in read_metrics(str(tmp_path)) if "loss" in r]
    assert recs[0]["loss"] == pytest.approx(np.log(2), abs=0.05)  # policy = reference at start
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
                "logps/chosen", "logps/rejected"):  # fmt: skip
        assert np.isfinite(recs[-1][key])
    # Training raises the implicit-reward margin on its batches.
    assert recs[-1]["rewards/margin"] > recs[0]["rewards/margin"]
    ev = summary["eval"]
    for key in ("eval/loss", "eval/accuracy", "eval/margin", "eval/logp_accuracy",
                "eval/sft_heldout/accuracy"):  # fmt: skip
        assert np.isfinite(ev[key]), key


def test_loss_fn_reads_sequences_off_the_batch_and_adds_the_sft_term():
    """dpo_loss_fn: sums of response-token log-probs and lengths from the loss masks; RPO's
    α·NLL(chosen)/|y_c| is added to any loss type."""
    import ml_collections

    rng = np.random.default_rng(0)
    B, T, V = 3, 7, 11
    batch = {"valid": np.ones(B, np.float32), "ref_chosen_logps": RC[:B],
             "ref_rejected_logps": RR[:B]}  # fmt: skip
    for side in ("chosen", "rejected"):
        batch[f"{side}_tokens"] = rng.integers(0, V, (B, T)).astype(np.int32)
        batch[f"{side}_targets"] = rng.integers(0, V, (B, T)).astype(np.int32)
        batch[f"{side}_positions"] = np.tile(np.arange(T, dtype=np.int32), (B, 1))
        batch[f"{side}_segment_ids"] = np.ones((B, T), np.int32)
        batch[f"{side}_loss_mask"] = (rng.random((B, T)) > 0.4).astype(np.float32)
    logits = rng.normal(size=(2 * B, T, V)).astype(np.float32)
    apply = lambda p, tokens, positions, segment_ids: p  # noqa: E731  (logits as "params")
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    seq = {}
    for i, side in enumerate(("chosen", "rejected")):
        tgt, m = batch[f"{side}_targets"], batch[f"{side}_loss_mask"]
        picked = np.take_along_axis(logp[i * B : (i + 1) * B], tgt[..., None], -1)[..., 0]
        seq[side] = ((picked * m).sum(1), m.sum(1))
    d = ml_collections.ConfigDict({"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0,
                                   "simpo_gamma": 0.0, "sft_coef": 0.0})  # fmt: skip
    base, m0 = dpo.dpo_loss_fn(apply, d)(logits, batch, None)
    want = dpo.preference_loss(seq["chosen"][0], seq["rejected"][0], RC[:B], RR[:B],
                               beta=0.1, loss_type="sigmoid")[0].mean()  # fmt: skip
    np.testing.assert_allclose(float(base), float(want), **TOL)
    np.testing.assert_allclose(float(m0["logps/chosen"]), seq["chosen"][0].mean(), **TOL)
    d.sft_coef = 0.5
    with_sft, _ = dpo.dpo_loss_fn(apply, d)(logits, batch, None)
    nll = -(seq["chosen"][0] / seq["chosen"][1]).mean()
    np.testing.assert_allclose(float(with_sft), float(want) + 0.5 * nll, **TOL)


def test_reward_accuracy_counts_strict_wins_only():
    """rewards/accuracy: the share of real pairs whose chosen answer's implicit reward is
    strictly above the rejected one's (TRL's chosen_rewards > rejected_rewards). At step 0 the
    policy is the reference, every reward is 0 and no pair is won: accuracy 0, not 1."""
    import ml_collections

    rng = np.random.default_rng(1)
    B, T, V = 4, 6, 9
    batch = {"valid": np.array([1, 1, 1, 0], np.float32)}  # (the last row: padding)
    for side in ("chosen", "rejected"):
        batch[f"{side}_tokens"] = rng.integers(0, V, (B, T)).astype(np.int32)
        batch[f"{side}_targets"] = rng.integers(0, V, (B, T)).astype(np.int32)
        batch[f"{side}_positions"] = np.tile(np.arange(T, dtype=np.int32), (B, 1))
        batch[f"{side}_segment_ids"] = np.ones((B, T), np.int32)
        batch[f"{side}_loss_mask"] = np.ones((B, T), np.float32)
    logits = rng.normal(size=(2 * B, T, V)).astype(np.float32)
    apply = lambda p, tokens, positions, segment_ids: p  # noqa: E731  (logits as "params")
    (pc, pr), _ = dpo.pair_logps(apply, logits, batch)
    pc, pr = np.asarray(pc), np.asarray(pr)
    d = ml_collections.ConfigDict({"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0,
                                   "simpo_gamma": 0.0, "sft_coef": 0.0})  # fmt: skip
    loss_fn = dpo.dpo_loss_fn(apply, d)
    # the reference is the policy: rewards exactly 0 on both sides, every pair a tie
    _, m = loss_fn(logits, {**batch, "ref_chosen_logps": pc, "ref_rejected_logps": pr}, None)
    assert float(m["rewards/margin"]) == 0.0
    assert float(m["rewards/accuracy"]) == 0.0
    # pair 0 won (chosen up 1 nat), pair 1 a tie, pair 2 lost (rejected up 1 nat); pair 3 is
    # padding, won but weighed 0
    up_c, up_r = np.array([1.0, 0, 0, 1.0], np.float32), np.array([0, 0, 1.0, 0], np.float32)
    _, m = loss_fn(logits, {**batch, "ref_chosen_logps": pc - up_c,
                            "ref_rejected_logps": pr - up_r}, None)  # fmt: skip
    won = ((d.beta * up_c > d.beta * up_r) * batch["valid"]).sum() / batch["valid"].sum()
    assert won == pytest.approx(1 / 3)
    np.testing.assert_allclose(float(m["rewards/accuracy"]), won, **TOL)
