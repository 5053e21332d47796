"""PPO's maths (alignment/ppo.py) against float64 references written here from the papers:
GAE (Schulman et al. 2016) over KL-shaped token rewards with the sequence reward on the last
response token (Ziegler et al. 2019 / InstructGPT), at the γ, λ edges (γ = λ = 1 is the Monte
Carlo return minus the value); truncated and stop-terminated responses both terminal; prompt
and post-stop padding masked; whitening over the rollout's valid response tokens; the clipped
surrogate's value and gradient (Schulman et al. 2017), the clipped value loss, the logged
metrics (approx_kl, clipfrac, vf_clipfrac, explained variance) and the adaptive KL controller,
plus the `ppo.*` settings that used to be taken without a word.

No reference calls the flaxlm function it checks; inputs are small, random, with garbage in
every prompt and padding position. Tolerance: float32 against float64.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flaxlm.alignment import ppo, rl_common, rl_rollout
from flaxlm.configs.ppo import ppo_config

TOL = {"rtol": 2e-5, "atol": 2e-5}
V = 11  # vocabulary of the table "model"


# ---------------------------------------------------------------------------------------------
# float64 references


def gae_ref(r, v, gamma, lam):
    """One response: A_j = Σ_k (γλ)^k δ_{j+k}, δ_j = r_j + γ·V_{j+1} − V_j, V_n = 0 (the
    response's end is terminal), R_j = A_j + V_j."""
    n = len(r)
    vn = [float(x) for x in v] + [0.0]
    delta = [float(r[j]) + gamma * vn[j + 1] - vn[j] for j in range(n)]
    adv = [sum((gamma * lam) ** k * delta[j + k] for k in range(n - j)) for j in range(n)]
    return adv, [a + vn[j] for j, a in enumerate(adv)]


def kl_ref(lp, ref_lp, kind):
    d = float(lp) - float(ref_lp)
    return d if kind == "k1" else math.exp(-d) - 1.0 + d  # k3: (r − 1) − log r, r = π_ref/π


def rollout_ref(s, lp, ref_lp, values, score, valid, cfg):
    """The whole rollout: per-token r_j = −β·kl_j, + (score, empty_reward, − nonstop_penalty)
    on the last response token; GAE per response; whitening over every valid response token."""
    r, p = cfg.rollout, cfg.ppo
    out = {"adv": {}, "ret": {}, "kl": {}, "val": {}, "rew": {}}
    for b, (P, n) in enumerate(zip(s["prompt_lens"], s["lengths"])):
        if not valid[b]:
            continue
        ts = [P - 1 + j for j in range(n)]  # the logprob / value index of response token j
        kls = [kl_ref(lp[b, t], ref_lp[b, t], p.kl_estimator) for t in ts]
        seq = r.empty_reward if s["empty"][b] else float(score[b])
        seq -= r.nonstop_penalty * (not s["stopped"][b])
        rew = [-p.kl_coef * k for k in kls]
        rew[-1] += seq
        vs = [float(values[b, t]) for t in ts]
        a, ret = gae_ref(rew, vs, p.gamma, p.lam)
        out["adv"][b], out["ret"][b] = dict(zip(ts, a)), dict(zip(ts, ret))
        out["kl"][b], out["val"][b], out["rew"][b] = sum(kls), dict(zip(ts, vs)), rew
    flat = [x for d in out["adv"].values() for x in d.values()]
    mu = sum(flat) / len(flat)
    sd = math.sqrt(sum((x - mu) ** 2 for x in flat) / len(flat) + 1e-8)
    out["white"] = {b: {t: (x - mu) / sd for t, x in d.items()} for b, d in out["adv"].items()}
    out["flat"] = flat
    return out


# ---------------------------------------------------------------------------------------------
# A PPOSource with its decoder and scoring replaced by fixed arrays


def _cfg(gamma, lam, kl_estimator="k1", whiten=True, B=6, seq_len=16):
    c = ml_collections.ConfigDict()
    c.rollout = rl_common.rollout_config(B)
    c.rollout.empty_reward, c.rollout.nonstop_penalty = -1.5, 0.25
    c.seq_len = seq_len
    c.ppo = ppo_config()
    c.ppo.update({"gamma": gamma, "lam": lam, "kl_estimator": kl_estimator,
                  "whiten_advantages": whiten, "kl_coef": 0.3, "kl_target": 1.5,
                  "kl_horizon": 200})  # fmt: skip
    return c


def _sample(rng, prompt_lens, resp_lens, seq_len, stopped, empty):
    """The decoder's output as `RolloutSource.sample` returns it: tokens past each response's
    length are garbage (what the decoder leaves after a stop) and must be ignored."""
    prompts = [rng.integers(3, V, P).astype(np.int32) for P in prompt_lens]
    N = max(resp_lens) + 3
    tokens = rng.integers(3, V, (len(prompts), N)).astype(np.int32)
    rows = rl_common.rollout_rows(prompts, tokens, np.asarray(resp_lens), seq_len, 0)
    B = len(prompts)
    return {
        "rows": rows, "texts": ["x"] * B, "stopped": np.asarray(stopped, bool),
        "lengths": np.asarray(resp_lens), "empty": np.asarray(empty, bool), "gen_s": 0.0,
        "metas": [{} for _ in range(B)], "prompt_lens": np.asarray(prompt_lens),
        "messages": [None] * B, "sample_logprobs": np.zeros((B, seq_len), np.float32),
    }  # fmt: skip


def _source(config, sample, scored):
    src = object.__new__(ppo.PPOSource)
    src.config, src.iteration, src.errors_logged, src.spec = config, 0, 0, None
    src.cursor = type("Cursor", (), {"take": lambda self, k: list(range(k))})()
    src.sample = lambda params, idx, rng, num_samples=1: sample
    src.score = lambda fn, *args: scored
    src._score = None
    p = config.ppo
    src.kl = ppo.KLController(p.kl_coef, p.kl_target, p.kl_horizon)
    src._gae, src._whiten = jax.jit(ppo.gae), jax.jit(ppo.whiten)
    src.ref_params = src.rm_params = None
    return src


# rows: EOS-stopped, empty (stop token alone), truncated (no stop) reaching the row's end,
# a one-token truncated response, a broken reward-model score (skipped), a long stopped one
PROMPTS, LENS = [3, 5, 2, 6, 4, 1], [4, 1, 14, 1, 3, 9]
STOPPED, EMPTY = [1, 1, 0, 0, 1, 1], [0, 1, 0, 0, 0, 0]


def _rollout(cfg, seed=0):
    rng = np.random.default_rng(seed)
    T, B = cfg.seq_len, len(PROMPTS)
    s = _sample(rng, PROMPTS, LENS, T, STOPPED, EMPTY)
    lp = rng.normal(-2, 0.7, (B, T)).astype(np.float32)
    ref_lp = (lp + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    values = rng.normal(0, 1, (B, T)).astype(np.float32)
    score = rng.normal(0, 2, B).astype(np.float32)
    outside = s["rows"]["loss_mask"] == 0
    lp[outside], ref_lp[outside], values[outside] = np.nan, -1e4, 1e6  # garbage: must not leak
    score[4] = np.nan
    valid = np.isfinite(score)
    src = _source(cfg, s, (lp, ref_lp, values, score, lp))
    rows, stats = src.make_rollout({"policy": None, "value": None}, None)
    return s, (lp, ref_lp, values, score, valid), src, rows, stats


def test_rollout_rows_mask_only_response_targets_and_ignore_tokens_after_the_stop():
    rng = np.random.default_rng(1)
    s = _sample(rng, PROMPTS, LENS, 16, STOPPED, EMPTY)
    rows = s["rows"]
    for b, (P, n) in enumerate(zip(PROMPTS, LENS)):
        want = np.zeros(16)
        want[P - 1 : P - 1 + n] = 1  # targets P .. P + n − 1: the response, stop token included
        np.testing.assert_array_equal(rows["loss_mask"][b], want)
        assert (rows["segment_ids"][b, P + n :] == 0).all() and (
            rows["tokens"][b, P + n :] == 0
        ).all()
        assert (rows["targets"][b, P + n - 1 :] == 0).all()  # nothing after the last token


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.9, 1.0), (1.0, 0.0),
                                       (0.0, 0.7), (0.8, 0.6)])  # fmt: skip
@pytest.mark.parametrize("whiten", [True, False])
def test_rollout_advantages_returns_and_stats_equal_the_reference(gamma, lam, whiten):
    cfg = _cfg(gamma, lam, "k3" if lam < 1 else "k1", whiten)
    s, (lp, ref_lp, values, score, valid), src, rows, stats = _rollout(cfg)
    want = rollout_ref(s, lp, ref_lp, values, score, valid, cfg)
    adv_want = want["white"] if whiten else want["adv"]
    T = cfg.seq_len
    for b in range(len(PROMPTS)):
        m = np.zeros(T)
        for t in want["adv"].get(b, {}):
            m[t] = 1
            np.testing.assert_allclose(rows["advantages"][b, t], adv_want[b][t], **TOL)
            np.testing.assert_allclose(rows["returns"][b, t], want["ret"][b][t], **TOL)
            np.testing.assert_allclose(rows["old_values"][b, t], want["val"][b][t], **TOL)
        np.testing.assert_array_equal(rows["loss_mask"][b], m)  # the skipped row 4: all zero
        for k in ("advantages", "returns", "old_values", "old_logprobs"):
            assert not rows[k][b, m == 0].any(), (k, b)  # prompt, padding, skipped: exactly 0
    if whiten:  # zero mean, unit population std over the valid tokens
        w = rows["advantages"][rows["loss_mask"] > 0].astype(np.float64)
        assert abs(w.mean()) < 1e-5 and abs(w.std() - 1) < 1e-4
    # the logged statistics against their definitions
    kls = np.asarray(list(want["kl"].values()))
    np.testing.assert_allclose(stats["kl"], kls.mean(), **TOL)
    np.testing.assert_allclose(stats["kl_coef"], 0.3)
    np.testing.assert_allclose(stats["non_score_reward"], -0.3 * kls.mean(), **TOL)
    R = np.asarray([x for d in want["ret"].values() for x in d.values()])
    Vv = np.asarray([x for d in want["val"].values() for x in d.values()])
    np.testing.assert_allclose(stats["explained_var"], 1 - np.var(R - Vv) / np.var(R), **TOL)
    np.testing.assert_allclose(stats["value_mean"], Vv.mean(), **TOL)
    np.testing.assert_allclose(stats["adv_std"], np.std(want["flat"]), **TOL)
    # Ziegler's proportional controller, over the valid sequences' mean per-sequence KL
    n = int(valid.sum())
    beta = 0.3 * (1 + np.clip(kls.mean() / 1.5 - 1, -0.2, 0.2) * n / 200)
    np.testing.assert_allclose(src.kl.value, beta, rtol=1e-6)


def test_gamma_lambda_one_is_the_monte_carlo_return_and_truncation_is_terminal():
    """γ = λ = 1: A_j = Σ_{k>=j} r_k − V_j and R_j = Σ_{k>=j} r_k (no value anywhere but V_j).
    A truncated response (row 2, row 3) is not bootstrapped from V after its last token, just as
    a stopped one: A_last = r_last − V_last for both (TRL's convention, the module docstring)."""
    cfg = _cfg(1.0, 1.0, whiten=False)
    s, (lp, ref_lp, values, score, valid), _, rows, _ = _rollout(cfg, seed=3)
    want = rollout_ref(s, lp, ref_lp, values, score, valid, cfg)
    for b, rew in want["rew"].items():
        ts = sorted(want["adv"][b])
        togo = np.cumsum(np.asarray(rew, np.float64)[::-1])[::-1]
        np.testing.assert_allclose(rows["returns"][b, ts], togo, **TOL)
        np.testing.assert_allclose(rows["advantages"][b, ts],
                                   togo - values[b, ts].astype(np.float64), **TOL)  # fmt: skip
        last = ts[-1]
        np.testing.assert_allclose(rows["advantages"][b, last], rew[-1] - values[b, last], **TOL)
    assert not s["stopped"][2] and not s["stopped"][3] and s["stopped"][0]


def test_sequence_reward_sits_on_the_last_response_token_only():
    """Zero KL (π = π_ref), γ = λ = 1, zero values: the unwhitened advantage of every response
    token is the sequence reward (score, empty_reward, score − nonstop_penalty)."""
    cfg = _cfg(1.0, 1.0, whiten=False)
    rng = np.random.default_rng(4)
    T, B = cfg.seq_len, len(PROMPTS)
    s = _sample(rng, PROMPTS, LENS, T, STOPPED, EMPTY)
    lp = rng.normal(-2, 0.7, (B, T)).astype(np.float32)
    score = np.asarray([0.5, 9.0, -0.7, 2.0, 1.0, 3.0], np.float32)
    src = _source(cfg, s, (lp, lp.copy(), np.zeros((B, T), np.float32), score, lp))
    rows, stats = src.make_rollout({"policy": None, "value": None}, None)
    seq = [0.5, -1.5, -0.7 - 0.25, 2.0 - 0.25, 1.0, 3.0]  # row 1 empty: empty_reward, not 9
    for b in range(B):
        m = rows["loss_mask"][b] > 0
        assert m.sum() == LENS[b]
        np.testing.assert_allclose(rows["advantages"][b, m], seq[b], **TOL)
    np.testing.assert_allclose(stats["kl"], 0.0, atol=1e-7)
    np.testing.assert_allclose(stats["reward_mean"], np.mean(seq), **TOL)


# ---------------------------------------------------------------------------------------------
# Losses and their metrics


def _table_apply(params, tokens, positions, segment_ids):
    del segment_ids
    return params["table"][tokens] + params["pos"][positions]


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max()
    return x - m - np.log(np.sum(np.exp(x - m)))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_loss_fn_value_metrics_and_token_aggregation(temperature):
    """L = L_clip + c_V·L_V − c_H·H, each a mean over the minibatch's response tokens (not a
    mean of per-sequence means), at the rollout temperature; approx_kl = mean ½(log π −
    log π_old)² (k2, OpenAI baselines / TRL), clipfrac = share of |ρ − 1| > ε, vf_clipfrac =
    share where the clipped squared error is the larger."""
    rng = np.random.default_rng(11)
    B, T, eps, eps_v, c_v, c_h = 4, 12, 0.2, 0.25, 0.4, 0.03
    p = ml_collections.ConfigDict({"clip": eps, "value_clip": eps_v, "vf_coef": c_v,
                                   "ent_coef": c_h})  # fmt: skip
    params = {
        "policy": {"table": jnp.asarray(rng.normal(0, 1.5, (V, V)), jnp.float32),
                   "pos": jnp.asarray(rng.normal(0, 0.5, (T, V)), jnp.float32)},
        "value": jnp.asarray(rng.normal(0, 1, V), jnp.float32),
    }  # fmt: skip
    value_apply = lambda vp, tokens, positions, segment_ids: vp[tokens]  # noqa: E731
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    mask = np.zeros((B, T), np.float32)
    for b, (s0, n) in enumerate([(1, 9), (3, 2), (0, 1), (5, 6)]):  # very uneven lengths
        mask[b, s0 : s0 + n] = 1
    table, pos = np.asarray(params["policy"]["table"], np.float64), np.asarray(
        params["policy"]["pos"], np.float64)  # fmt: skip
    logq = np.stack([[_log_softmax((table[tokens[b, t]] + pos[t]) / temperature)
                      for t in range(T)] for b in range(B)])  # fmt: skip
    lp = np.take_along_axis(logq, targets[..., None], -1)[..., 0]
    old = lp + rng.normal(0, 0.3, (B, T))
    adv = rng.normal(0, 1, (B, T))
    vals = np.asarray(params["value"], np.float64)[tokens]
    old_v = vals + rng.normal(0, 0.4, (B, T))
    ret = rng.normal(0, 1, (B, T))
    garbage = mask == 0
    batch = {
        "tokens": tokens, "targets": targets, "positions": positions,
        "segment_ids": np.ones((B, T), np.int32), "loss_mask": mask,
        "old_logprobs": np.where(garbage, 0.0, old).astype(np.float32),
        "advantages": np.where(garbage, 0.0, adv).astype(np.float32),
        "old_values": np.where(garbage, 0.0, old_v).astype(np.float32),
        "returns": np.where(garbage, 0.0, ret).astype(np.float32),
    }  # fmt: skip
    loss, met = jax.jit(ppo.ppo_loss_fn(_table_apply, value_apply, p, temperature))(
        params, batch, None)  # fmt: skip

    per = {k: [] for k in ("pg", "vf", "ent", "k2", "cf", "vcf")}
    rows_pg = []
    for b in range(B):
        row = []
        for t in np.flatnonzero(mask[b]):
            rho = math.exp(lp[b, t] - old[b, t])
            a = adv[b, t]
            pg = max(-a * rho, -a * min(max(rho, 1 - eps), 1 + eps))
            v, vo, R = vals[b, t], old_v[b, t], ret[b, t]
            vc = vo + min(max(v - vo, -eps_v), eps_v)
            per["pg"].append(pg)
            per["vf"].append(0.5 * max((v - R) ** 2, (vc - R) ** 2))
            per["ent"].append(-np.sum(np.exp(logq[b, t]) * logq[b, t]))
            per["k2"].append(0.5 * (lp[b, t] - old[b, t]) ** 2)
            per["cf"].append(float(abs(rho - 1) > eps))
            per["vcf"].append(float((vc - R) ** 2 > (v - R) ** 2))
            row.append(pg)
        rows_pg.append(np.mean(row))
    mean = {k: float(np.mean(x)) for k, x in per.items()}
    np.testing.assert_allclose(float(met["pg_loss"]), mean["pg"], **TOL)
    np.testing.assert_allclose(float(met["vf_loss"]), mean["vf"], **TOL)
    np.testing.assert_allclose(float(met["entropy"]), mean["ent"], **TOL)
    np.testing.assert_allclose(float(met["approx_kl"]), mean["k2"], **TOL)
    np.testing.assert_allclose(float(met["clipfrac"]), mean["cf"], **TOL)
    np.testing.assert_allclose(float(met["vf_clipfrac"]), mean["vcf"], **TOL)
    np.testing.assert_allclose(float(loss), mean["pg"] + c_v * mean["vf"] - c_h * mean["ent"],
                               **TOL)  # fmt: skip
    assert 0 < mean["cf"] < 1 and 0 < mean["vcf"] < 1  # both branches exercised
    assert abs(np.mean(rows_pg) - mean["pg"]) > 1e-3  # the test tells token from sequence means
    assert float(met["weight"]) == mask.sum()


def test_clipped_surrogate_gradient_is_zero_exactly_where_the_clip_is_active():
    """d/d log π of max(−Aρ, −A·clip(ρ, 1 ± ε)) = −Aρ/n where the unclipped term is the max,
    0 where ρ is past the clip in the advantage's direction (A > 0, ρ > 1 + ε; A < 0, ρ < 1 − ε)."""
    rng = np.random.default_rng(5)
    B, T, eps = 3, 20, 0.2
    logp = rng.normal(-2, 1, (B, T))
    old = logp + rng.normal(0, 0.3, (B, T))
    adv = rng.normal(0, 1, (B, T))
    mask = (rng.random((B, T)) < 0.7).astype(np.float32)
    grad = np.asarray(jax.grad(lambda lp: ppo.policy_loss(lp, old.astype(np.float32),
                                                          adv.astype(np.float32), mask, eps)[0])(
        jnp.asarray(logp, jnp.float32)))  # fmt: skip
    n = mask.sum()
    rho = np.exp(logp - old)
    clipped = ((adv > 0) & (rho > 1 + eps)) | ((adv < 0) & (rho < 1 - eps))
    want = np.where(clipped, 0.0, -adv * rho / n) * mask
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)
    assert clipped[mask > 0].sum() > 0 and (~clipped)[mask > 0].sum() > 0


# ---------------------------------------------------------------------------------------------
# Settings


def _settings(**ppo_keys):
    c = ml_collections.ConfigDict({"ppo": ppo_config()})
    c.ppo.update(ppo_keys)
    return c


@pytest.mark.parametrize("keys,match", [
    # adaptive β from 0: β·(1 + e·n/H) stays 0 every rollout, the KL penalty never switches on
    ({"kl_coef": 0.0, "kl_target": 6.0}, r"ppo\.kl_coef=0\.0 must be > 0 when ppo\.kl_target"),
    # a negative entropy bonus is an entropy penalty (the loss is … − ent_coef·H)
    ({"ent_coef": -0.01}, r"ppo\.ent_coef=-0\.01 must be"),
    ({"kl_coef": float("inf")}, r"ppo\.kl_coef=inf must be"),
    ({"vf_coef": float("inf")}, r"ppo\.vf_coef=inf must be"),
])  # fmt: skip
def test_settings_that_train_without_a_word_are_refused(keys, match):
    with pytest.raises(ValueError, match=match):
        ppo.check_settings(_settings(**keys))


def test_adaptive_beta_from_zero_never_moves():
    """The evidence for refusing kl_coef=0 with kl_target > 0: the controller is
    multiplicative, so β stays 0 whatever the KL."""
    c = ppo.KLController(0.0, target=6.0, horizon=100)
    for _ in range(50):
        c.update(100.0, 64)
    assert c.value == 0.0


def test_sane_settings_pass():
    ppo.check_settings(_settings())
    ppo.check_settings(_settings(kl_coef=0.0, kl_target=0.0, ent_coef=0.0))  # no KL penalty
    ppo.check_settings(_settings(gamma=1.0, lam=1.0, kl_target=6.0, ent_coef=0.01))


@pytest.mark.parametrize("target,want", [(0.0, 0.2), (6.0, 0.05)])
def test_resume_keeps_the_configs_fixed_beta_and_the_adaptive_state(monkeypatch, target, want):
    """A fixed β (kl_target = 0) is the config's `ppo.kl_coef`: a resume with another value must
    use it (the loop reports the changed key as taking effect), not the checkpoint's 0.05. An
    adaptive β is controller state and continues from the checkpoint."""
    monkeypatch.setattr(rl_rollout.RolloutSource, "set_state", lambda self, st: None)
    src = object.__new__(ppo.PPOSource)
    src.kl = ppo.KLController(0.2, target, 100)
    src.set_state({"cursor": {"epoch": 0, "pos": 0}, "iteration": 3, "kl_coef": 0.05})
    assert src.kl.value == want
