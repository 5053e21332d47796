"""flaxlm/demo_report.py `sequence_kl` (the report's "KL to the SFT model") against a plain
reference written here: the same samples, each prompt + sample scored by the reference model in
its own unpadded forward (jitted per length, not batched), KL = Σ over the sample of
(log π − log π_ref)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.demo_report import sequence_kl
from flaxlm.models.config import ModelConfig
from flaxlm.models.decode import generate
from flaxlm.models.transformer import Transformer, forward

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
                  max_seq_len=64)  # fmt: skip
STOPS = (3, 5, 7, 11)  # frequent enough that samples end at different lengths
PROMPTS = [[1, 9, 4], [1, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31], [1], [1, 40, 41, 2],
           [1, 50, 51, 52, 53, 54, 55]]  # fmt: skip


@jax.jit  # (one program for both seeds; eager, the init is hundreds of small ones)
def _init(rng):
    from flaxlm.train.state import unbox

    params = unbox(Transformer(CFG).init(rng, jnp.zeros((1, 4), jnp.int32))["params"])
    return jax.tree.map(lambda x: 3.0 * x, params)  # peaked, unlike at init


def _params(seed):
    return _init(jax.random.PRNGKey(seed))


@jax.jit
def _ref_log_softmax(params, tokens):
    """The reference's forward: a program per sequence length (eager, it was hundreds of
    small ones per prompt)."""
    return jax.nn.log_softmax(forward(CFG, params, tokens).astype(jnp.float32), axis=-1)


def _reference_kl(params, ref_params, max_new_tokens, seed):
    """Per prompt: log π from the sampler (what the KL estimator takes), log π_ref from one
    forward of exactly prompt + sample, summed over the sample's tokens."""
    rng = jax.random.PRNGKey(seed)
    out = generate(CFG, params, PROMPTS, max_new_tokens=max_new_tokens, rng=rng,
                   temperature=1.0, stop_tokens=STOPS, pad_id=0)  # fmt: skip
    toks, logp, mask, lengths = jax.device_get(tuple(out))
    kls = []
    for p, t, lp, m, n in zip(PROMPTS, toks, logp, mask, lengths):
        seq = np.asarray(list(p) + list(t[:n]), np.int32)
        ref_all = np.asarray(_ref_log_softmax(ref_params, seq[None, :-1])[0])
        ref = ref_all[np.arange(len(seq) - 1), seq[1:]][len(p) - 1 :]
        kls.append(float(((lp[:n] - ref) * m[:n]).sum()))
    return float(np.mean(kls)), lengths


def test_sequence_kl_equals_the_per_prompt_reference(monkeypatch):
    """Also: the reference model's forward is traced once per batch shape, not run per prompt
    (several policies' KLs against the same model compile it once)."""
    from flaxlm import demo_report
    from flaxlm.models import transformer

    traced = []  # token shapes `forward` was called with (under jit: traced)
    monkeypatch.setattr(transformer, "forward",
                        lambda cfg, p, tokens, *a: traced.append(tokens.shape) or
                        forward(cfg, p, tokens, *a))  # fmt: skip
    fresh = functools.lru_cache(maxsize=4)(demo_report._ref_logprobs.__wrapped__)
    monkeypatch.setattr(demo_report, "_ref_logprobs", fresh)  # traces with the patched forward
    params, ref_params = _params(0), _params(1)
    want, lengths = _reference_kl(params, ref_params, max_new_tokens=12, seed=3)
    assert len(set(lengths.tolist())) > 1  # samples of different lengths share a batch
    assert abs(want) > 0.1  # two different models: a KL far from zero
    for batch in (64, 2):  # one padded batch of 8 rows; batches of 2 rows, the last padded
        got = sequence_kl(CFG, params, ref_params, PROMPTS, STOPS, 0, max_new_tokens=12,
                          seed=3, batch=batch)  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=1e-5)
    # The same model: every sample's log-ratio is zero up to float error.
    same = sequence_kl(CFG, params, params, PROMPTS, STOPS, 0, max_new_tokens=12, seed=3)
    assert abs(same) < 1e-4
    assert traced == [(8, 32), (2, 32)]  # the third call reused the first one's trace
