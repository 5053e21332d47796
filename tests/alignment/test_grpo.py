"""GRPO: group advantages and the clipped+KL loss equal their formulas (float32, tolerances
stated); the bad-input policy (raising / NaN rewards, empty responses, over-long prompts) is
applied and counted; a run trains through the shared loop."""

import importlib.util
import math
import os
import re

import jax
import numpy as np
import pytest

from flaxlm.alignment import common, grpo, rl_common, rl_eval, rl_rollout
from flaxlm.configs import grpo as grpo_config
from flaxlm.data import formats as F
from flaxlm.models.decode import GenerateOutput
from flaxlm.models.sharding import logical_axis_rules, make_mesh
from flaxlm.train.metrics import read_metrics
from flaxlm.train.pretrain import model_fns

_spec = importlib.util.spec_from_file_location(
    "rl_helpers", os.path.join(os.path.dirname(__file__), "rl_helpers.py")
)
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

TOL = {"rtol": 1e-5, "atol": 1e-6}  # float32 against float64 references


def test_group_advantages_equal_the_formula():
    r = np.array([[1, 0, 0, 1], [0.5, 0.5, 0.5, 0.5], [1, 0, 3, -2]], np.float32)
    valid = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 1]], bool)
    adv = grpo.group_advantages(r, valid, eps=1e-4)
    for g in range(3):
        xs = [float(x) for x, ok in zip(r[g], valid[g]) if ok]
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
        for i in range(4):
            want = (float(r[g, i]) - mean) / (std + 1e-4) if valid[g, i] else 0.0
            np.testing.assert_allclose(adv[g, i], want, **TOL)
    assert np.all(adv[1] == 0)  # a flat group carries no signal
    plain = grpo.group_advantages(r, valid, scale_by_std=False)
    np.testing.assert_allclose(plain[2], [1 + 1 / 3, 1 / 3, 0, -2 + 1 / 3], **TOL)  # mean −1/3
    # RLOO: each reward minus the mean of the group's other valid rewards.
    loo = grpo.group_advantages(r, valid, scale_by_std=False, baseline="loo")
    for g in range(3):
        for i in range(4):
            others = [float(r[g, j]) for j in range(4) if j != i and valid[g, j]]
            want = float(r[g, i]) - sum(others) / len(others) if valid[g, i] else 0.0
            np.testing.assert_allclose(loo[g, i], want, **TOL)
    one_valid = grpo.group_advantages(r[:1], valid[:1] & [[1, 0, 0, 0]], baseline="loo")
    assert np.all(one_valid == 0)  # no other sample: no baseline, no signal
    with pytest.raises(ValueError, match="grpo.baseline='median'"):
        grpo.group_advantages(r, valid, baseline="median")
    # REINFORCE++-baseline: the group mean subtracted, then one std over the whole batch's
    # valid baselined rewards (population std), so groups keep their relative scales
    batch = grpo.group_advantages(r, valid, eps=1e-4, std_scope="batch")
    centred = [float(x) - float(np.mean(r[g][valid[g]])) for g in range(3)
               for x, ok in zip(r[g], valid[g]) if ok]  # fmt: skip
    std = math.sqrt(sum(c * c for c in centred) / len(centred))  # (their mean is 0)
    np.testing.assert_allclose(batch, np.where(valid, plain, 0.0) / (std + 1e-4), **TOL)
    assert abs(batch[0, 0]) < abs(adv[0, 0])  # group 0's small spread is not blown up
    with pytest.raises(ValueError, match="grpo.std_scope='global'"):
        grpo.group_advantages(r, valid, std_scope="global")


@pytest.mark.parametrize("agg", ["seq", "token"])
def test_grpo_loss_equals_the_formula(agg):
    rng = np.random.default_rng(0)
    B, T, eps, beta = 4, 9, 0.2, 0.05
    logp = rng.normal(-2, 0.5, (B, T)).astype(np.float32)
    old = (logp + rng.normal(0, 0.3, (B, T))).astype(np.float32)
    ref = (logp + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    adv = rng.normal(size=B).astype(np.float32)
    mask = np.zeros((B, T), np.float32)
    for b, (s, e) in enumerate([(1, 6), (3, 9), (0, 2), (0, 0)]):
        mask[b, s:e] = 1
    loss, m = grpo.grpo_loss(logp, old, ref, adv, mask, clip=eps, beta=beta, agg=agg)
    per_seq, all_terms = [], []
    for b in range(B):
        terms = []
        for t in range(T):
            if mask[b, t]:
                ratio = math.exp(float(logp[b, t]) - float(old[b, t]))
                a = float(adv[b])
                surrogate = min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
                q = math.exp(float(ref[b, t]) - float(logp[b, t]))  # π_ref / π
                terms.append(-surrogate + beta * (q - math.log(q) - 1))
        if terms:
            per_seq.append(sum(terms) / len(terms))
        all_terms += terms
    want = sum(per_seq) / len(per_seq) if agg == "seq" else sum(all_terms) / len(all_terms)
    np.testing.assert_allclose(float(loss), want, **TOL)
    assert float(m["weight"]) == (3 if agg == "seq" else mask.sum())


@pytest.mark.parametrize("importance", ["token", "sequence"])
def test_grpo_loss_ignores_extreme_values_outside_the_mask(importance):
    """A prompt or padding position may hold anything (a policy 100 nats below the reference
    on an untrained prompt token; inf from a low-precision reference): the loss, metrics and
    gradient equal the clean ones. Masking by multiplication gave inf·0 = NaN."""
    B, T = 2, 6
    logp = np.full((B, T), -1.0, np.float32)
    mask = np.zeros((B, T), np.float32)
    mask[:, 3:] = 1
    adv = np.array([1.0, -1.0], np.float32)
    kw = dict(clip=0.2, beta=0.04, importance=importance)

    def loss_and_grad(lp, old, ref):
        f = lambda x: grpo.grpo_loss(x, old, ref, adv, mask, **kw)  # noqa: E731
        (loss, metrics), g = jax.value_and_grad(f, has_aux=True)(lp)
        return float(loss), {k: float(v) for k, v in metrics.items()}, np.asarray(g)

    clean = loss_and_grad(logp, logp, logp)
    bad_lp = logp.copy()
    bad_lp[0, 0] = -101.0
    bad_ref = logp.copy()
    bad_ref[1, 1] = np.inf
    bad_old = logp.copy()
    bad_old[1, 2] = -np.inf
    loss, metrics, g = loss_and_grad(bad_lp, bad_old, bad_ref)
    assert loss == clean[0] and metrics == clean[1]
    np.testing.assert_array_equal(g, clean[2])


def test_builtin_rewards_use_the_world_judge():
    from flaxlm.data.synthetic_judge import WORLD_KEY, WORLD_MARK

    meta = {"task": "arithmetic", "a": 3, "b": 4, "answer": "7", WORLD_KEY: WORLD_MARK}
    assert grpo.exact_match(meta, "The answer is 7.") == 1.0
    assert grpo.exact_match(meta, "The answer is 8.") == 0.0
    assert grpo.format_reward(meta, "The answer is 8.") == 1.0
    assert grpo.format_reward(meta, "I think 7") == 0.0
    assert grpo.judge_reward(meta, "The answer is 7.") == pytest.approx(1.0)
    fns = grpo.parse_rewards("exact_match,format:0.25")
    assert [(n, w) for n, _, w in fns] == [("exact_match", 1.0), ("format", 0.25)]
    with pytest.raises(ValueError, match="unknown reward .nope."):
        grpo.parse_rewards("exact_match,nope")


def test_own_rewards_by_import_path_and_reference_answers(tmp_path, monkeypatch):
    """`grpo.rewards` names a user's function as module:function[:weight] (no edit of flaxlm),
    and exact_match scores own prompts against meta.answer."""
    (tmp_path / "my_rewards.py").write_text(
        "def numeric(meta, response):\n"
        "    return float(response.split()[-1].rstrip('.') == meta['answer'])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fns = grpo.parse_rewards("my_rewards:numeric, format:0.1, my_rewards:numeric:0.5")
    assert [(n, w) for n, _, w in fns] == [
        ("my_rewards.numeric", 1.0),
        ("format", 0.1),
        ("my_rewards.numeric", 0.5),
    ]
    assert fns[0][1]({"answer": "6"}, "It is 6.") == 1.0
    with pytest.raises(ValueError, match="my_rewards:missing"):
        grpo.parse_rewards("my_rewards:missing")
    with pytest.raises(ValueError, match="no_such_module"):
        grpo.parse_rewards("no_such_module:fn")
    assert grpo.exact_match({"answer": "6"}, " 6 ") == 1.0
    assert grpo.exact_match({"answer": "6"}, "It is 6.") == 0.0
    with pytest.raises(KeyError, match="meta.answer"):
        grpo.exact_match({}, "6")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    return H.fake_runs(str(tmp_path_factory.mktemp("grpo_runs")), cache_dir)


class _State:
    def __init__(self, params):
        self.params = params


def test_bad_input_policy(runs, cache_dir, monkeypatch):
    """Raising and NaN rewards skip their sample (weight 0, counted); empty responses get
    `empty_reward`; over-long prompts are cut or dropped (counted); all-bad raises."""
    sft, _ = runs
    c = H.tiny(grpo_config, cache_dir, init_from=sft, **{
        "batch_size": 8, "rollout.batch": 16, "grpo.group_size": 4, "seq_len": 48,
        "rollout.max_prompt_len": 32, "rollout.max_new_tokens": 6, "rollout.empty_reward": -0.5,
    })  # fmt: skip
    mesh = make_mesh(dict(c.mesh))

    def flaky(meta, text):  # raises on one of every 4 calls, NaN on another
        flaky.n += 1
        if flaky.n % 4 == 1:
            raise ZeroDivisionError("boom")
        return float("nan") if flaky.n % 4 == 2 else 1.0

    flaky.n = 0
    task = grpo.build_task(c, mesh, None, rewards=[("flaky", flaky, 1.0)])
    source = task.train_batches
    end = source.template.end_id
    empty_rows = [2, 10]

    def fake_generate(cfg, params, prompts, *, max_new_tokens, num_samples=1, **kw):
        B = len(prompts) * num_samples
        tok = np.full((B, max_new_tokens), 5, np.int32)
        lengths = np.full(B, max_new_tokens, np.int32)
        tok[:, -1] = end
        for b in empty_rows:
            tok[b, 0], lengths[b] = end, 1
        mask = (np.arange(max_new_tokens)[None] < lengths[:, None]).astype(np.float32)
        return GenerateOutput(tok, np.full((B, max_new_tokens), -1.0, np.float32), mask, lengths)

    monkeypatch.setattr(rl_rollout, "generate", fake_generate)
    init, _ = model_fns(source.cfg)
    params = H.placed_params(init, mesh, logical_axis_rules("fsdp"))
    source.before_step(_State(params))
    batches = [next(source), next(source)]
    mb = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert mb["rollout/bad_reward"][0] == 8  # 2 of every 4 calls (14 judged): raised or NaN
    assert mb["rollout/empty"][0] == 2
    assert np.isfinite(mb["advantages"]).all() and np.isfinite(mb["old_logprobs"]).all()
    weight = mb["loss_mask"].sum(1)
    assert (weight == 0).sum() == 8 and (weight > 0).sum() == 8
    # Valid: 6 judged samples (reward 1) and the two empty ones, not judged (−0.5).
    assert mb["rollout/reward_mean"][0] == pytest.approx((6 * 1.0 + 2 * -0.5) / 8)

    flaky.n = 0
    # (the two empty rows, valid with empty_reward, do not hide a reward broken on the rest)
    task = grpo.build_task(c, mesh, None, rewards=[("always", lambda m, t: 1 / 0, 1.0)])
    # (the message says where the reward raised: its traceback is not kept with the sample)
    where = r"ZeroDivisionError: division by zero \(test_grpo.py:\d+ in <lambda>\)"
    with pytest.raises(rl_rollout.RewardError, match="no valid sample.*" + where):
        task.train_batches.before_step(_State(params))
    with c.unlocked():
        c.rollout.check_every = 0
    with pytest.raises(ValueError, match="rollout.check_every=0 must be >= 1"):
        grpo.build_task(c, mesh, None, rewards=[("flaky", flaky, 1.0)])
    with c.unlocked():
        c.rollout.check_every = 1
        c.rollout.decode_attention = "triton"
    with pytest.raises(ValueError, match="rollout.decode_attention='triton'"):
        grpo.build_task(c, mesh, None, rewards=[("flaky", flaky, 1.0)])
    with c.unlocked():
        c.rollout.decode_attention = "pallas:64:4"  # a malformed kernel variant
    with pytest.raises(ValueError, match="rollout.decode_attention='pallas:64:4'"):
        grpo.build_task(c, mesh, None, rewards=[("flaky", flaky, 1.0)])
    with c.unlocked():
        c.rollout.decode_attention = "xla"
        c.rollout.decode_gemm = "triton"
    with pytest.raises(ValueError, match="rollout.decode_gemm='triton'"):
        grpo.build_task(c, mesh, None, rewards=[("flaky", flaky, 1.0)])
    with c.unlocked():
        c.rollout.decode_gemm = "auto"
    for key, bad in (("decode_mlp", "pallas:16:64"), ("decode_norm", "folded")):
        with c.unlocked():
            c.rollout[key] = bad
        with pytest.raises(ValueError, match=f"rollout.{key}='{bad}'"):
            grpo.build_task(c, mesh, None, rewards=[("flaky", flaky, 1.0)])
        with c.unlocked():
            c.rollout[key] = "xla"

    # A reward that takes `prompt` gets each sample's prompt as chat turns, a group's G
    # samples the same one; (meta, response) rewards next to it are called as before.
    empty_rows.clear()  # (every sample judged)
    seen = []

    def with_prompt(meta, response, prompt):
        seen.append(prompt)
        return 1.0

    task = grpo.build_task(c, mesh, None, rewards=[("p", with_prompt, 1.0),
                                                   ("f", lambda m, t: 0.5, 1.0)])  # fmt: skip
    task.train_batches.before_step(_State(params))
    assert len(seen) == 16 and all(seen[g * 4] == seen[g * 4 + i] for g in range(4)
                                   for i in range(4))  # fmt: skip
    user = [m for m in seen[0] if m["role"] == "user"]
    known = [p["messages"] for p in task.train_batches.prompts]
    assert user and all(p in known for p in seen)
    assert rl_rollout.wants_prompt(lambda meta, response, **kw: 0.0)
    assert not rl_rollout.wants_prompt(lambda meta, response: 0.0)
    with pytest.raises(ValueError, match="takes `prompt` but none was given"):
        rl_rollout.call_reward_fns([with_prompt], [1.0], [{}], ["x"])

    # Over-long prompts: truncated from the left (counted) or dropped (counted).
    long_prompt = [{"prompt": "word " * 200, "meta": {}}]
    tpl = source.template
    for policy, used in (("truncate_left", 1), ("drop", 0)):
        with c.unlocked():
            c.data.overlength = policy
        report = F.DataReport()
        monkeypatch.setattr(rl_common.common, "iter_records", lambda *a: [(long_prompt[0], "x:1")])
        out = rl_common.load_prompts("x", c, tpl, report)
        assert len(out) == used and report.to_dict()["used"] == used
        assert (report.truncated, report.log.total) == ((1, 0) if used else (0, 1))
        if used:
            assert len(out[0]["ids"]) == c.rollout.max_prompt_len

    # Prompts under the user's own role/content field names (data.fields) read like the
    # default ones; a malformed turn is counted, not a crash.
    plain = {"prompt": [{"role": "user", "content": "Where does Kavo live?"}], "meta": {}}
    own = {"prompt": [{"who": "user", "text": "Where does Kavo live?"}], "meta": {}}
    bad = {"prompt": [{"who": "user"}], "meta": {}}
    want = None
    for rec, role, content in ((plain, "role", "content"), (own, "who", "text"),
                               (bad, "who", "text")):  # fmt: skip
        with c.unlocked():
            c.data.fields.role, c.data.fields.content = role, content
        report = F.DataReport()
        monkeypatch.setattr(rl_common.common, "iter_records", lambda *a, r=rec: [(r, "x:1")])
        out = rl_common.load_prompts("x", c, tpl, report)
        if rec is bad:
            assert out == [] and report.log.total == 1
            continue
        assert out[0]["messages"] == plain["prompt"]
        want = out[0]["ids"] if want is None else want
        np.testing.assert_array_equal(out[0]["ids"], want)
    with c.unlocked():
        c.data.fields.role, c.data.fields.content = "role", "content"


def _texts_generate(tok, stop, texts):
    """A stand-in decoder whose row b answers texts[b % len(texts)], then the stop token."""
    ids = [list(tok.encode(t)) + [stop] for t in texts]

    def fake_generate(cfg, params, prompts, *, max_new_tokens, num_samples=1, **kw):
        B = len(prompts) * num_samples
        tokens, lengths = np.zeros((B, max_new_tokens), np.int32), np.zeros(B, np.int32)
        for b in range(B):
            row = ids[b % len(ids)]
            tokens[b, : len(row)], lengths[b] = row, len(row)
        mask = (np.arange(max_new_tokens)[None] < lengths[:, None]).astype(np.float32)
        return GenerateOutput(tokens, np.zeros(tokens.shape, np.float32), mask, lengths)

    return fake_generate


def test_an_empty_answer_after_the_reasoning_gets_empty_reward(runs, cache_dir, monkeypatch):
    """With grpo.reasoning_end, "<think>...</think>" then the stop token (a finished reasoning,
    no answer) was judged on "": a reward like `response.split()[-1]` raised and the sample was
    skipped (bad_reward, dropped from the loss) instead of getting rollout.empty_reward like an
    unfinished reasoning. It is now no answer: not judged, empty_reward, counted as empty."""
    sft, _ = runs
    c = H.tiny(grpo_config, cache_dir, init_from=sft, **{
        "batch_size": 8, "rollout.batch": 8, "grpo.group_size": 4, "seq_len": 64,
        "rollout.max_prompt_len": 40, "rollout.max_new_tokens": 24,
        "grpo.reasoning_end": "</think>", "rollout.empty_reward": -1.0,
    })  # fmt: skip
    called = []

    def last_word(meta, response):  # a typical user reward: the last word is the answer
        called.append(response)
        return float(response.split()[-1] == "red")

    last_word.max_workers = 4  # judged from threads, as code_tests is (rl_rollout.concurrency)
    src = grpo.build_task(c, make_mesh(dict(c.mesh)), None,
                          rewards=[("last_word", last_word, 1.0)]).train_batches  # fmt: skip
    kinds = [
        "<think>hm</think> red",
        "<think>hm</think> blue",
        "<think>hm</think> \n",
        "<think>hm hm",
    ]  # right, wrong, no answer, unfinished
    t = src.template
    monkeypatch.setattr(rl_rollout, "generate",
                        _texts_generate(t.tok, t.stop_tokens[0], kinds))  # fmt: skip
    rows, stats = src.make_rollout(src.ref_params, jax.random.PRNGKey(0))
    assert stats["bad_reward"] == 0 and stats["empty"] == 2  # (one no-answer row per group)
    assert sorted(called) == ["blue", "blue", "red", "red"]  # no answer: never judged
    assert (rows["loss_mask"].sum(1) > 0).all()
    adv = rows["advantages"][:4]
    # no answer and unfinished: both empty_reward (−1), below wrong (0), below right (1)
    assert adv[2] == adv[3] < adv[1] < adv[0]
    assert stats["reasoning_unfinished"] == pytest.approx(0.25)
    assert stats["reward_mean"] == pytest.approx((1 + 0 - 1 - 1) / 4)


def test_accuracy_stats_keep_one_batch_structure_when_some_prompts_lack_an_answer(
        runs, cache_dir, monkeypatch):  # fmt: skip
    """rollout/accuracy was added only when every prompt of the rollout had a meta.answer: a
    prompt mix changed the minibatches' keys between rollouts (a recompile of the step) and the
    log line's average raised KeyError: 'rollout/accuracy'. Now every rollout carries accuracy
    (over the samples whose prompt has an answer) and accuracy_n (their count); a log window
    weights accuracy by the count and leaves it out when no sample had an answer."""
    from flaxlm.train.loop_logging import _summarise

    sft, _ = runs
    c = H.tiny(grpo_config, cache_dir, init_from=sft, **{
        "batch_size": 8, "rollout.batch": 16, "grpo.group_size": 4, "seq_len": 48,
        "rollout.max_prompt_len": 32, "rollout.max_new_tokens": 6,
    })  # fmt: skip
    src = grpo.build_task(c, make_mesh(dict(c.mesh)), None,
                          rewards=[("one", lambda m, t: 1.0, 1.0)]).train_batches  # fmt: skip
    t = src.template
    fake = _texts_generate(t.tok, t.stop_tokens[0], ["7"])  # every sample answers "7"
    drawn = []

    def generate(cfg, params, prompts, **kw):
        drawn.extend(tuple(p) for p in prompts)
        return fake(cfg, params, prompts, **kw)

    monkeypatch.setattr(rl_rollout, "generate", generate)

    def answer(ids):  # by content: right ("7"), wrong ("8") or none (an open-ended prompt)
        return ("7", "8", None)[sum(ids) % 3]

    def rollout(kind: str) -> list[dict]:
        for p in src.prompts:
            a = {"none": None, "all": "7", "mixed": answer(p["ids"])}[kind]
            p["meta"] = {} if a is None else {"answer": a}
        drawn.clear()
        src.before_step(_State(src.ref_params))
        out = [next(src) for _ in range(len(src.queue))]
        assert not src.queue
        return out

    every, none, mixed = rollout("all"), rollout("none"), rollout("mixed")
    answers = [answer(ids) for ids in drawn for _ in range(4)]  # (G = 4 samples per prompt)
    n = sum(a is not None for a in answers)
    assert 0 < n < len(answers), "the prompts drawn should mix answered and open-ended ones"
    # one batch structure: the same keys, shapes and dtypes (no recompile of the step)
    spec = lambda b: {k: (v.shape, v.dtype) for k, v in b.items()}  # noqa: E731
    assert all(spec(b) == spec(every[0]) for b in every + none + mixed)
    assert every[0]["rollout/accuracy"][0] == 1 and every[0]["rollout/accuracy_n"][0] == 16
    assert none[0]["rollout/accuracy_n"][0] == 0 and none[0]["rollout/accuracy"][0] == 0
    acc = sum(a == "7" for a in answers) / n
    assert mixed[0]["rollout/accuracy_n"][0] == n
    assert mixed[0]["rollout/accuracy"][0] == pytest.approx(acc)

    # The log line (per-step metrics: each stat field's mean, as rl_rollout.passthrough_stats)
    step = lambda b: {k: v.mean() for k, v in b.items() if k.startswith("rollout/")}  # noqa: E731
    rec = _summarise([step(b) for b in none + mixed])
    assert rec["rollout/accuracy"] == pytest.approx(acc)  # not pulled down by the 0 of none
    assert "rollout/accuracy" not in _summarise([step(b) for b in none])  # no 0 pretended
    assert _summarise([step(b) for b in none])["rollout/accuracy_n"] == 0


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_non_finite_weights_are_refused_and_non_finite_rewards_skipped(runs, cache_dir,
                                                                     monkeypatch):  # fmt: skip
    """grpo.rewards="format:inf" (or nan) was taken as a weight: every reward and advantage
    NaN, with bad_reward 0. Such a weight is now an error naming the key; and a combined
    reward that is not finite (a value that overflows float32) marks its sample invalid."""
    for spec, w in (("format:inf", "inf"), ("exact_match,format:nan", "nan"),
                    ("format:-Infinity", "-Infinity")):  # fmt: skip
        with pytest.raises(ValueError, match=f"grpo.rewards: bad weight '{w}' in 'format:{w}'"):
            grpo.parse_rewards(spec)
    with pytest.raises(ValueError, match="online.rewards: bad weight 'nan'"):
        grpo.parse_rewards("exact_match:nan", "online.rewards")
    sft, _ = runs
    c = H.tiny(grpo_config, cache_dir, init_from=sft, **{
        "batch_size": 8, "rollout.batch": 8, "grpo.group_size": 4, "seq_len": 48,
        "rollout.max_prompt_len": 32, "rollout.max_new_tokens": 8,
    })  # fmt: skip
    # finite as a Python float, inf once a float32 reward (one sample of every group of 4)
    huge = ("huge", lambda meta, t: 1e39 if t == "b" else 1.0, 1.0)
    src = grpo.build_task(c, make_mesh(dict(c.mesh)), None, rewards=[huge]).train_batches
    t = src.template
    monkeypatch.setattr(
        rl_rollout, "generate", _texts_generate(t.tok, t.stop_tokens[0], ["a", "b", "c", "d"])
    )
    rows, stats = src.make_rollout(src.ref_params, jax.random.PRNGKey(0))
    assert stats["bad_reward"] == 2 and np.isfinite(stats["reward_mean"])
    assert np.isfinite(rows["advantages"]).all()
    assert (rows["loss_mask"].sum(1) == 0).tolist() == [False, True, False, False] * 2


def test_rollouts_end_at_stop_strings(runs, cache_dir):
    """rollout.stop_strings: a response ends at the first token after which its text holds a
    string (kept in the text, counted as stopped) — or at a stop token, or the budget."""
    sft, _ = runs
    c = H.tiny(grpo_config, cache_dir, init_from=sft, **{
        "batch_size": 8, "rollout.batch": 8, "grpo.group_size": 4, "seq_len": 48,
        "rollout.max_prompt_len": 32, "rollout.max_new_tokens": 10,
        "rollout.stop_strings": ("e", "?"),
    })  # fmt: skip
    mesh = make_mesh(dict(c.mesh))
    source = grpo.build_task(c, mesh, None, rewards=[("one", lambda m, t: 1.0, 1.0)]).train_batches
    init, _ = model_fns(source.cfg)
    params = H.placed_params(init, mesh, logical_axis_rules("fsdp"))
    s = source.sample(params, [0, 1], jax.random.PRNGKey(3), num_samples=4)
    tok, stops, by_string = source.template.tok, set(source.template.stop_tokens), 0
    for row, text, n, stopped, p in zip(s["rows"]["tokens"], s["texts"], s["lengths"],
                                        s["stopped"], s["prompt_lens"]):  # fmt: skip
        ids = [int(t) for t in row[p : p + n]]  # the response
        if ids[-1] in stops:
            assert stopped and not any(x in tok.decode(ids[:-1]) for x in "e?")
        elif any(x in text for x in "e?"):
            by_string += 1
            assert stopped and not any(x in tok.decode(ids[:-1]) for x in "e?")
        else:
            assert not stopped and n == 10
    assert by_string > 0
    # The held-out evaluation ends answers at the same strings: shorter, and more of them stop.
    examples = [{"ids": p["ids"], "meta": p["meta"], "answer": p["meta"].get("answer", "")}
                for p in source.prompts[:8]]  # fmt: skip
    rules = logical_axis_rules("fsdp")
    runs = [rl_eval.make_policy_eval(source.cfg, source.template, {"x": examples}, c.eval_gen,
                                     mesh, rules, stop_strings=strings)(params)
            for strings in ((), ("e", "?"))]  # fmt: skip
    assert runs[1]["x/response_len"] < runs[0]["x/response_len"]
    assert runs[1]["x/stopped"] > runs[0]["x/stopped"]
    with c.unlocked():
        c.rollout.stop_strings = ("",)
    with pytest.raises(ValueError, match="rollout.stop_strings"):
        grpo.build_task(c, mesh, None, rewards=[("one", lambda m, t: 1.0, 1.0)])


@pytest.fixture(scope="module")
def straight_run(runs, cache_dir, tmp_path_factory):
    """(config, workdir, final state, summary) of an uninterrupted GRPO run from the SFT run:
    the run test_grpo_trains_in_the_loop reads, and the one the SIGTERM test's resumed run
    must end equal to (one run for both: each costs a rollout and a training compile)."""
    sft, _ = runs
    c = H.tiny(grpo_config, cache_dir, init_from=sft, **{
        "batch_size": 8, "rollout.batch": 16, "grpo.group_size": 4, "seq_len": 48,
        "rollout.max_prompt_len": 32, "rollout.max_new_tokens": 6, "opt.lr": 1e-3,
        "grpo.rewards": "format,judge:0.5", "async_ckpt": False,
    })  # fmt: skip
    workdir = str(tmp_path_factory.mktemp("grpo_straight"))
    state, summary = grpo.run(c, workdir)
    return c, workdir, state, summary


def test_grpo_trains_in_the_loop(straight_run):
    _, workdir, state, summary = straight_run
    recs = [r for r in read_metrics(workdir) if "loss" in r]
    last = recs[-1]
    keys = ("pg_loss", "kl", "clipfrac", "entropy", "rollout/reward_mean", "rollout/r_format",
            "rollout/r_judge", "rollout/flat_groups", "rollout/kl", "rollout/gen_s")  # fmt: skip
    for key in keys:
        assert np.isfinite(last[key]), key
    assert summary["train"]["n_skipped"] == 0
    assert last["rollout/iteration"] == 1
    assert jax.tree.leaves(state.params)[0].ndim >= 1


def test_sigterm_inside_a_rollout_resumes_bit_for_bit(straight_run, tmp_path, monkeypatch):
    """SIGTERM after the first of a rollout's two minibatches: the loop trains the second, saves
    at the rollout boundary and stops; the resumed run ends with the uninterrupted run's params."""
    import signal

    c, _, straight, _ = straight_run
    fired = []
    next_batch = rl_rollout.RolloutSource.__next__

    def next_then_sigterm(self):
        out = next_batch(self)
        if not fired and len(self.queue) == 1:  # one minibatch of the first rollout left
            fired.append(os.kill(os.getpid(), signal.SIGTERM))
        return out

    monkeypatch.setattr(rl_rollout.RolloutSource, "__next__", next_then_sigterm)
    _, summary = grpo.run(c, str(tmp_path / "resumed"))
    assert fired and summary["preempted"] and summary["step"] == 2
    monkeypatch.setattr(rl_rollout.RolloutSource, "__next__", next_batch)
    resumed, summary = grpo.run(c, str(tmp_path / "resumed"))
    assert summary["step"] == c.total_steps
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dynamic_sampling_fills_the_batch_with_groups_that_have_signal(
    runs, cache_dir, monkeypatch
):
    """grpo.dynamic_sampling = N: groups whose rewards are all equal are set aside and up to N
    more decoder calls draw the next prompts until the batch holds rollout.batch / G groups with
    signal (set-aside groups fill it when the calls run out); off, the one call's groups are the
    batch. A fresh source restored from the state after a rollout draws what the first draws."""
    import zlib

    sft, _ = runs
    G = 4
    c = H.tiny(grpo_config, cache_dir, init_from=sft, **{
        "batch_size": 8, "rollout.batch": 16, "grpo.group_size": G, "seq_len": 48,
        "rollout.max_prompt_len": 32, "rollout.max_new_tokens": 6,
    })  # fmt: skip
    mesh = make_mesh(dict(c.mesh))
    calls = []

    def fake_generate(cfg, params, prompts, *, max_new_tokens, num_samples=1, **kw):
        calls.append([tuple(p) for p in prompts])
        B = len(prompts) * num_samples
        tok = np.full((B, max_new_tokens), 5, np.int32)
        lengths = np.full(B, max_new_tokens, np.int32)
        mask = np.ones((B, max_new_tokens), np.float32)
        return GenerateOutput(tok, np.full((B, max_new_tokens), -1.0, np.float32), mask, lengths)

    def has_signal(prompt) -> bool:  # about one prompt in three
        return zlib.crc32(repr(prompt).encode()) % 3 == 0

    def reward(meta, response, prompt):  # samples of a group are called in order
        reward.n += 1
        return float(reward.n % G) if has_signal(prompt) else 1.0

    monkeypatch.setattr(rl_rollout, "generate", fake_generate)

    def rollout(extra, state=None):
        with c.unlocked():
            c.grpo.dynamic_sampling = extra
        reward.n = 0
        calls.clear()
        source = grpo.build_task(c, mesh, None, rewards=[("r", reward, 1.0)]).train_batches
        if state is not None:
            source.set_state(state)
        init, _ = model_fns(source.cfg)
        params = H.placed_params(init, mesh, logical_axis_rules("fsdp"))
        source.before_step(_State(params))
        mbs = [next(source), next(source)]
        mb = {k: np.concatenate([b[k] for b in mbs]) for k in mbs[0]}
        by_ids = {tuple(p["ids"]): p["messages"] for p in source.prompts}
        drawn = [p for call in calls for p in call]
        signal = [has_signal(by_ids[p]) for p in drawn]
        return source, mb, drawn, signal

    source, mb, drawn, signal = rollout(0)
    assert len(calls) == 1 and "rollout/sample_calls" not in mb
    assert mb["rollout/flat_groups"][0] == pytest.approx(1 - np.mean(signal))

    for extra in (1, 2, 8):
        source, mb, drawn, signal = rollout(extra)
        need = np.flatnonzero(signal)[:4]  # the first four groups with signal, in draw order
        n_calls = min(extra + 1, int(need[-1]) // 4 + 1) if len(need) == 4 else extra + 1
        assert len(calls) == n_calls and mb["rollout/sample_calls"][0] == n_calls
        assert len(drawn) == 4 * n_calls
        kept = [drawn[i] for i in np.flatnonzero(signal)[:4]]
        kept += [drawn[i] for i in np.flatnonzero(~np.asarray(signal))][: 4 - len(kept)]
        prompt_of_row = []
        for row, mask in zip(mb["tokens"], mb["loss_mask"]):
            start = int(np.argmax(mask > 0)) + 1 if mask.any() else None
            prompt_of_row.append(tuple(int(t) for t in row[:start]))
        assert sorted(prompt_of_row) == sorted(p for p in kept for _ in range(G))
        flat_kept = 4 - min(4, int(np.sum(signal)))
        assert mb["rollout/flat_groups"][0] == flat_kept / 4
        assert mb["rollout/drawn_without_signal"][0] == pytest.approx(1 - np.mean(signal))
        adv = mb["advantages"].reshape(-1)
        assert (np.abs(adv) > 0).sum() == G * (
            4 - flat_kept
        )  # rewards 1, 2, 3, 0: none at the mean

    # Resume: the cursor moved past every drawn prompt; a restored source draws the same next.
    state = source.get_state()
    _, _, next_drawn, _ = rollout(8, state)
    _, _, again, _ = rollout(8, state)
    assert next_drawn == again and not set(next_drawn) & set(drawn)
    with c.unlocked():
        c.grpo.dynamic_sampling = -1
    with pytest.raises(ValueError, match="grpo.dynamic_sampling=-1"):
        grpo.build_task(c, mesh, None, rewards=[("r", reward, 1.0)])


def test_lora_refuses_what_would_move_or_miss_its_reference(runs, cache_dir):
    """With LoRA the reference is params["base"]: lora.train_extra (base leaves that train)
    would move it with the policy (the KL against a moving target), so GRPO and online DPO
    refuse it by name, before anything loads; rollout.frozen_dtype=int8 with no frozen model to
    apply to (no reward_from) is refused too (it was silently unused)."""
    from flaxlm.alignment import online_dpo
    from flaxlm.configs import online_dpo as odpo_config

    sft, _ = runs
    base = {"batch_size": 8, "rollout.batch": 16, "seq_len": 48, "lora.rank": 4}
    mesh = make_mesh({"data": -1})
    reward = [("r", lambda m, t: 1.0, 1.0)]
    for module, build, stage in ((grpo_config, grpo.build_task, "grpo"),
                                 (odpo_config, online_dpo.build_task, "online_dpo")):  # fmt: skip
        c = H.tiny(module, cache_dir, init_from=sft, **{**base, "lora.train_extra": "norm"})
        want = (
            f"{stage}: lora.train_extra='norm' trains base parameters, but with LoRA the "
            "reference is the policy's own base"
        )
        with pytest.raises(ValueError, match=want):
            build(c, mesh, None, rewards=reward)
    c = H.tiny(grpo_config, cache_dir, init_from=sft, **{**base, "rollout.frozen_dtype": "int8"})
    with pytest.raises(ValueError, match="rollout.frozen_dtype='int8' has no frozen model"):
        grpo.build_task(c, mesh, None, rewards=reward)


def test_lora_grpo_trains_adapters_against_its_frozen_base(runs, cache_dir, tmp_path,
                                                           monkeypatch):  # fmt: skip
    """lora.rank > 0: only the adapters train; the frozen base is the reference (no second copy
    loaded), so the first rollout's KL is exactly 0 (b = 0: the policy is the base) and a later
    one's is not; the run's checkpoint reads back (LoRA merged) like any policy's."""
    sft, _ = runs
    c = H.tiny(grpo_config, cache_dir, init_from=sft, **{
        "batch_size": 8, "rollout.batch": 16, "grpo.group_size": 4, "seq_len": 48,
        "rollout.max_prompt_len": 32, "rollout.max_new_tokens": 6, "opt.lr": 1e-2,
        "grpo.rewards": "format,judge:0.5", "async_ckpt": False, "lora.rank": 4,
        "lora.targets": "attn/(q|v)|mlp/up", "ckpt_every": 4,
    })  # fmt: skip
    H.forbid_reference_copy(monkeypatch)
    state, summary = grpo.run(c, str(tmp_path))
    assert summary["train"]["n_skipped"] == 0
    meta = H.check_lora_rl_run(str(tmp_path), sft, state.params)
    assert meta["lora"]["rank"] == 4


def test_mask_truncated_drops_cut_off_responses_from_the_loss(runs, cache_dir, monkeypatch):
    """grpo.mask_truncated (DAPO's overlong filtering): a response that reached max_new_tokens
    without a stop token gets loss weight 0; the advantages are those computed with it."""
    sft, _ = runs
    c = H.tiny(grpo_config, cache_dir, init_from=sft, **{
        "batch_size": 8, "rollout.batch": 8, "grpo.group_size": 4, "seq_len": 48,
        "rollout.max_prompt_len": 32, "rollout.max_new_tokens": 6,
    })  # fmt: skip
    mesh = make_mesh(dict(c.mesh))

    def fake_generate(cfg, params, prompts, *, max_new_tokens, num_samples=1, stop_tokens, **kw):
        B = len(prompts) * num_samples
        tok = np.full((B, max_new_tokens), 10 + np.arange(B)[:, None] % 3, np.int32)
        tok[::2, -1] = stop_tokens[0]  # even rows stop at the budget's last token; odd are cut
        lengths = np.full(B, max_new_tokens, np.int32)
        mask = np.ones((B, max_new_tokens), np.float32)
        return GenerateOutput(tok, np.full((B, max_new_tokens), -1.0, np.float32), mask, lengths)

    def reward(meta, response):
        reward.n += 1
        return float(reward.n % 3)

    monkeypatch.setattr(rl_rollout, "generate", fake_generate)
    out = {}
    for flag in (False, True):
        with c.unlocked():
            c.grpo.mask_truncated = flag
        reward.n = 0
        source = grpo.build_task(c, mesh, None, rewards=[("r", reward, 1.0)]).train_batches
        init, _ = model_fns(source.cfg)
        params = H.placed_params(init, mesh, logical_axis_rules("fsdp"))
        source.before_step(_State(params))
        mb = next(source)  # the whole rollout: one minibatch of 8 rows (permuted)
        out[flag] = {k: mb[k] for k in ("tokens", "loss_mask", "advantages")}
    order = [np.flatnonzero((out[True]["tokens"] == row).all(1))[0] for row in out[False]["tokens"]]
    np.testing.assert_array_equal(out[True]["advantages"][order], out[False]["advantages"])
    tokens, mask_off = out[False]["tokens"], out[False]["loss_mask"]
    last = mask_off.shape[1] - 1 - np.argmax(mask_off[:, ::-1] > 0, axis=1) + 1  # last response
    stopped = tokens[np.arange(len(tokens)), last] == source.template.stop_tokens[0]
    weight_off, weight_on = mask_off.sum(1), out[True]["loss_mask"][order].sum(1)
    assert stopped.sum() == 4 and (weight_off > 0).all()
    np.testing.assert_array_equal(weight_on, np.where(stopped, weight_off, 0.0))


def test_reward_model_scores_next_to_reward_functions(runs, cache_dir):
    """ "rm" in grpo.rewards (with reward_from): each sample's reward adds w × the reward
    model's score at its last token, the same score an independent forward gives; naming rm
    without reward_from, or reward_from without rm, is an error."""
    sft, rm_dir = runs
    c = H.tiny(grpo_config, cache_dir, init_from=sft, reward_from=rm_dir, **{
        "batch_size": 8, "rollout.batch": 8, "grpo.group_size": 4, "seq_len": 48,
        "rollout.max_prompt_len": 32, "rollout.max_new_tokens": 6,
        "grpo.rewards": "rm:0.5,format",
    })  # fmt: skip
    mesh = make_mesh(dict(c.mesh))
    source = grpo.build_task(c, mesh, None).train_batches
    init, _ = model_fns(source.cfg)
    params = H.placed_params(init, mesh, logical_axis_rules("fsdp"))
    s = source._judged(source.sample(params, [0, 1], jax.random.PRNGKey(3), num_samples=4))
    _, rm_apply, rm_params = rl_common.frozen_scalar(rm_dir, mesh, logical_axis_rules("fsdp"))
    want = np.asarray(rl_common.reward_scorer(rm_apply)(rm_params, s["rows"]))
    np.testing.assert_allclose(s["parts"]["rm"], want, rtol=1e-5, atol=1e-6)
    assert np.ptp(want) > 0  # a real score per sample, not a constant
    r = c.rollout
    total = 0.5 * want + s["parts"]["format"]
    total = np.where(s["empty"], r.empty_reward, total) - r.nonstop_penalty * ~s["stopped"]
    np.testing.assert_allclose(s["reward"], total, rtol=1e-5, atol=1e-6)
    for rewards, reward_from, match in (("rm", "", "reward_from is not set"),
                                        ("format", rm_dir, "does not name rm")):  # fmt: skip
        with c.unlocked():
            c.grpo.rewards, c.reward_from = rewards, reward_from
        with pytest.raises(ValueError, match=match):
            grpo.build_task(c, mesh, None)


def test_reward_from_with_another_tokenizer_is_refused_before_any_load(
    runs, cache_dir, tmp_path, chat_tokenizer, monkeypatch
):  # fmt: skip
    """The reward model's tokenizer, not only its vocab size, must be the policy's: a reward
    model with another tokenizer of the same size scored other pieces without a word."""
    sft, _ = runs
    other = H.other_tokenizer_run(str(tmp_path / "other"), chat_tokenizer[0], "scalar")
    H.forbid_loads(monkeypatch)
    c = H.tiny(grpo_config, cache_dir, init_from=sft, reward_from=other,
               **{"grpo.rewards": "rm"})  # fmt: skip
    with pytest.raises(
        ValueError,
        match=rf"reward_from={other}: its tokenizer "
        rf"{chat_tokenizer[0]} \(\d+ pieces\) is not this run's",
    ):
        grpo.build_task(c, make_mesh(dict(c.mesh)), None)


def test_bad_settings_are_refused_when_the_task_is_built(cache_dir):
    """grpo.group_size=1 was accepted (only rollout.batch % group_size was checked): each
    sample is its own group's baseline, every advantage 0, and the run trained on the KL term
    alone without a word. grpo.loss_agg was checked only when the loss was first traced, after
    the reference's load and a whole rollout. Both are refused first, naming the key (init_from
    names no run: a check after the source's resolution would fail on that instead)."""
    for key, bad, match in (("grpo.group_size", 1, "grpo.group_size=1"),
                            ("grpo.loss_agg", "mean", "grpo.loss_agg='mean'"),
                            ("grpo.clip", 0.0, "grpo.clip=0.0 must be > 0"),
                            ("grpo.clip", -0.2, "grpo.clip=-0.2 must be > 0"),
                            ("grpo.beta", -0.04, "grpo.beta=-0.04 must be >= 0")):  # fmt: skip
        c = H.tiny(grpo_config, cache_dir, init_from="/no/such/run", **{key: bad})
        with pytest.raises(ValueError, match=re.escape(match)):
            grpo.build_task(c, None, None)


@pytest.fixture(scope="module")
def ema_runs(tmp_path_factory, cache_dir):
    """fake_runs whose checkpoints also hold an EMA of the weights (other random weights)."""
    return H.fake_runs(str(tmp_path_factory.mktemp("grpo_ema_runs")), cache_dir, ema=True)


def _assert_equal(got, want):
    got, want = jax.device_get(got), jax.device_get(want)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_from_ema_is_the_policy_start_and_the_reference(ema_runs, cache_dir, tmp_path,
                                                              monkeypatch, caplog):  # fmt: skip
    """init_from_ema: the policy starts at the SFT run's EMA weights and the reference is the
    same EMA (the policy the run starts from), so the first rollout's KL is exactly 0;
    reward_from_ema: the reward model is its run's EMA. The log names the EMA start."""
    import logging

    from flaxlm.models.heads import scalar_model_fns
    from flaxlm.train import loop

    sft, rm_dir = ema_runs
    c = H.tiny(grpo_config, cache_dir, init_from=sft, init_from_ema=True, reward_from=rm_dir,
               reward_from_ema=True, **{
        "batch_size": 8, "rollout.batch": 8, "grpo.group_size": 4, "seq_len": 48,
        "rollout.max_prompt_len": 32, "rollout.max_new_tokens": 6, "grpo.rewards": "rm,format",
        "total_steps": 1, "log_every": 1, "async_ckpt": False,
    })  # fmt: skip
    started, real = [], loop._init_or_resume

    def init_or_resume(*a):  # the state before the first step (its buffers are then donated)
        out = real(*a)
        started.append(jax.device_get(out[0].params))
        return out

    monkeypatch.setattr(loop, "_init_or_resume", init_or_resume)
    mesh = make_mesh(dict(c.mesh))
    task = grpo.build_task(c, mesh, str(tmp_path))
    with caplog.at_level(logging.INFO, logger="flaxlm"):
        loop.run(c, str(tmp_path), task, mesh=mesh)
    cfg = task.train_batches.cfg
    lm_ema = H.random_params(model_fns(cfg)[0], H.EMA_SEED["lm"])  # what the runs hold
    rm_ema = H.random_params(scalar_model_fns(cfg)[0], H.EMA_SEED["rm"])
    (start,) = started
    _assert_equal(start, lm_ema)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          task.train_batches.ref_params)  # fmt: skip
    _assert_equal(start, common.load_lm_params(sft, target, ema=True))
    _assert_equal(task.train_batches.ref_params, lm_ema)
    _assert_equal(task.train_batches._rm[1], rm_ema)
    assert f"initialised params from {sft} (EMA)" in caplog.text
    (rec,) = [r for r in read_metrics(str(tmp_path)) if "rollout/kl" in r]
    assert rec["rollout/kl"] == 0.0  # the policy is its reference
    # Without the flags: the runs' params, not their EMA.
    with c.unlocked():
        c.init_from_ema, c.reward_from_ema = False, False
    plain = grpo.build_task(c, mesh, None).train_batches
    _assert_equal(plain.ref_params, H.random_params(model_fns(cfg)[0], 0))
    with pytest.raises(AssertionError):
        _assert_equal(plain._rm[1], rm_ema)


def test_init_from_ema_without_an_ema_is_an_error_before_any_load(runs, ema_runs, cache_dir,
                                                                  monkeypatch):  # fmt: skip
    """init_from_ema / reward_from_ema of a run saved without an EMA, of an HF checkpoint or of
    no run: an error naming the key and the run, raised before any model is loaded."""
    from flaxlm.train.checkpoint import CheckpointError

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the source was checked")

    for name in ("frozen_lm", "frozen_scalar"):
        monkeypatch.setattr(rl_common, name, no_load)
    sft, rm_dir = runs  # no EMA in them
    ema_sft, ema_rm = ema_runs
    mesh = make_mesh({"data": -1})
    cases = [
        ({"init_from": sft, "init_from_ema": True},
         CheckpointError, f"init_from_ema=True: init_from={sft} holds no EMA of the weights"),
        ({"init_from": "hf:/no/such/dir", "init_from_ema": True},
         CheckpointError, "init_from_ema=True: init_from=hf:/no/such/dir is an HF checkpoint"),
        ({"init_from": ema_sft, "reward_from": rm_dir, "reward_from_ema": True,
          "grpo.rewards": "rm"},
         CheckpointError, f"reward_from_ema=True: reward_from={rm_dir} holds no EMA"),
        ({"init_from": ema_sft, "reward_from_ema": True},
         ValueError, "reward_from_ema=True but reward_from is not set"),
    ]  # fmt: skip
    for overrides, error, match in cases:
        c = H.tiny(grpo_config, cache_dir, **overrides)
        with pytest.raises(error, match=re.escape(match)):
            grpo.build_task(c, mesh, None, rewards=None)
