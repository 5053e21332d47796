"""Sampled generation tasks through `num_samples`: a decoder that takes it gets each prompt
once and returns k responses per prompt (one prefill per prompt in `make_generate_fn`); the
scores are those of the same responses handed back for repeated prompts."""

import pytest

from flaxlm.evaluation import generate_tasks as G
from flaxlm.evaluation.prompts import encode_prompt
from flaxlm.evaluation.tasks import read_examples, world_tasks


def test_a_decoder_taking_num_samples_gets_each_prompt_once(world_dir, tok):
    spec = world_tasks(world_dir)["gen_facts_train"].replace(temperature=0.7, num_samples=3)
    examples = read_examples(spec, limit=2)
    prompts = [encode_prompt(spec, ex, [], tok) for ex in examples]
    right = examples[0].fields["answer"]
    # example 0: right, wrong, right; example 1: wrong three times
    responses = [tok.encode(f" The answer is {a}.") for a in [right, "x", right, "x", "x", "x"]]
    seen = {}

    def with_samples(prompt_ids, max_new_tokens, temperature=0.0, num_samples=1):
        seen.update(ids=prompt_ids, k=num_samples, t=temperature)
        return responses

    def repeated(prompt_ids, max_new_tokens, temperature=0.0):
        return responses

    got = G.generation(spec, examples, prompts, with_samples, tok, max_prompt_len=10_000)
    assert seen == {"ids": [ids for _, ids in prompts], "k": 3, "t": 0.7}
    want = G.generation(spec, examples, prompts, repeated, tok, max_prompt_len=10_000)
    assert got == want
    assert got[0]["pass@3"] == pytest.approx(0.5) and got[0]["correct"] == pytest.approx(1 / 3)


def test_make_generate_fn_samples_each_prompt_k_times_whatever_its_batch(model, tok, world_dir):
    """Responses i·k … i·k + k - 1 are prompt i's k samples: the same whichever prompts share
    its decoder call (batch_size 1 or 8; a prompt's keys are its own), different from each
    other, and the same prompt at another index samples with another key."""
    cfg, params = model
    spec = world_tasks(world_dir)["gen_facts_train"]
    prompts = [ids for _, ids in (encode_prompt(spec, ex, [], tok)
                                  for ex in read_examples(spec, limit=3))]  # fmt: skip
    k, kw = 3, dict(stop_tokens=(tok.eos_id,), pad_id=tok.pad_id, seed=5)
    one_per_call = G.make_generate_fn(cfg, params, batch_size=1, **kw)
    eight = G.make_generate_fn(cfg, params, batch_size=8, **kw)
    got = eight(prompts, 8, temperature=1.0, num_samples=k)
    assert len(got) == len(prompts) * k
    assert one_per_call(prompts, 8, temperature=1.0, num_samples=k) == got
    assert len({tuple(r) for r in got[:k]}) > 1  # k samples, not one repeated
    # Prompt 0 alone at index 0 samples as before; at index 1 it has another key.
    assert eight(prompts[:1], 8, temperature=1.0, num_samples=k) == got[:k]
    assert eight([prompts[1], prompts[0]], 8, temperature=1.0, num_samples=k)[k:] != got[:k]
    with pytest.raises(ValueError, match="num_samples=2"):
        eight(prompts, 8, num_samples=2)  # greedy samples would all be the same


def test_a_tasks_sampling_filters_reach_the_decoder(model, tok, world_dir):
    """A task's top_p / top_k / min_p are passed to the generate function by name (and only
    when set); `make_generate_fn` decodes with them, as a direct `generate` call does; a
    function that cannot take one is an error, not a silently unfiltered run; under greedy
    decoding they are refused."""
    import jax

    from flaxlm.models.decode import generate, prompt_keys

    base = world_tasks(world_dir)["gen_facts_train"].replace(temperature=1.0, num_samples=2)
    spec = base.replace(top_p=0.5, top_k=3)
    assert spec.sampler == {"top_p": 0.5, "top_k": 3} and base.sampler == {}
    examples = read_examples(spec, limit=2)
    prompts = [encode_prompt(spec, ex, [], tok) for ex in examples]
    seen = []

    def fake(prompt_ids, max_new_tokens, temperature=0.0, num_samples=1, top_p=1.0, top_k=0,
             min_p=0.0):  # fmt: skip
        seen.append(dict(top_p=top_p, top_k=top_k, min_p=min_p))
        return [tok.encode(" x")] * (len(prompt_ids) * num_samples)

    G.generation(spec, examples, prompts, fake, tok, max_prompt_len=10_000)
    G.generation(base, examples, prompts, fake, tok, max_prompt_len=10_000)
    assert seen == [dict(top_p=0.5, top_k=3, min_p=0.0), dict(top_p=1.0, top_k=0, min_p=0.0)]

    def no_filters(prompt_ids, max_new_tokens, temperature=0.0, num_samples=1):
        return [tok.encode(" x")] * (len(prompt_ids) * num_samples)

    with pytest.raises(ValueError, match="top_p=0.5, and its generate function takes no 'top_p'"):
        G.generation(spec, examples, prompts, no_filters, tok, max_prompt_len=10_000)
    # the real decoder: the filters change the samples as a direct call with them does
    cfg, params = model
    fn = G.make_generate_fn(cfg, params, batch_size=4, stop_tokens=(tok.eos_id,),
                            pad_id=tok.pad_id, seed=5)  # fmt: skip
    ids = [p for _, p in prompts]
    got = fn(ids, 8, temperature=1.0, num_samples=2, top_k=2)
    out = generate(cfg, params, ids, max_new_tokens=8, rng=prompt_keys(jax.random.PRNGKey(5),
                   range(2)), temperature=1.0, top_k=2, stop_tokens=(tok.eos_id,),
                   pad_id=tok.pad_id, num_samples=2)  # fmt: skip
    want = [[int(t) for t in row[:n]] for row, n in zip(out.tokens, out.lengths)]
    assert got == want and got != fn(ids, 8, temperature=1.0, num_samples=2)
    for bad, why in ((dict(top_p=0.0), "0 < top_p <= 1"), (dict(min_p=1.0), "min_p < 1"),
                     (dict(top_k=-1), "top_k=-1 must be an int >= 0"),
                     (dict(top_k=1.5), "top_k=1.5 must be an int")):  # fmt: skip
        with pytest.raises(ValueError, match=why):
            base.replace(**bad)
    with pytest.raises(ValueError, match="top_p filter samples: they need temperature > 0"):
        base.replace(temperature=0.0, num_samples=1, top_p=0.9)
