"""What ending rows at stop strings inside the decode loop costs and saves
(`generate(..., stop_strings=)`, models/stop_strings.py).

    python -m flaxlm.bench.stop_strings --out OUT            # CPU, the "small" shape
    python -m flaxlm.bench.stop_strings --out OUT --tiny     # CI smoke test

Workload: a model of the variant's shape with random weights and a SentencePiece tokenizer
trained here on the built-in synthetic world's text; B prompts of P tokens, up to N new tokens
sampled at temperature 1, EOS a stop token (as in evaluation). Three ways, each the median of
3 timed calls after a warm-up:

  cut after      no stop strings in the decoder: every row runs N tokens, the text is cut
                 at the string afterwards (what evaluation did before)
  in the loop    the string given to `generate`: a row ends once its text holds it, the loop
                 once every row has
  never found    a string no row produces (four BEL characters): the automaton's cost per
                 step, nothing saved

Reported: call seconds (median of 3), mean tokens generated per row, and the tables' build
time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

# name: (variant, batch, prompt length, new tokens)
SHAPES = {"small": ("small", 16, 32, 256), "tiny": ("tiny", 4, 8, 16)}


def _tokenizer(vocab: int, workdir: str):
    from flaxlm.data import tokenizer
    from flaxlm.data.synthetic import write_world

    world = os.path.join(workdir, "world")
    write_world(world, "small", seed=0)
    with open(os.path.join(world, "pretrain.jsonl")) as f:
        texts = [json.loads(ln)["text"] for ln in f][:5000]
    return tokenizer.train(texts, vocab, model_path=os.path.join(workdir, "tokenizer.model"))


def measure(shape: str, workdir: str) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flaxlm.models.config import get_variant
    from flaxlm.models.decode import generate
    from flaxlm.models.stop_strings import StopStrings
    from flaxlm.models.transformer import Transformer
    from flaxlm.train.state import unbox

    variant, B, P, N = SHAPES[shape]
    cfg = get_variant(variant, vocab_size=512, init_std=0.1)
    tok = _tokenizer(cfg.vocab_size, workdir)
    init = lambda r: unbox(Transformer(cfg).init(r, jnp.zeros((1, 4), jnp.int32)))["params"]  # noqa: E731
    params = jax.jit(init)(jax.random.PRNGKey(0))
    prompts = np.random.default_rng(0).integers(3, tok.vocab_size, (B, P)).tolist()
    # The string: the printable character by whose first appearance every row of the free run
    # (the first timed call's) has ended nearest the middle of the budget — a stand-in for
    # answers that end within half of it (a random model has no "\n\n" habit). EOS stops
    # every way, as in evaluation: the loop is a while loop in all three.
    kw = dict(max_new_tokens=N, temperature=1.0, stop_tokens=(tok.eos_id,))
    free = np.asarray(generate(cfg, params, prompts, rng=jax.random.PRNGKey(1), **kw).tokens)
    prefixes = [[tok.decode(r[: k + 1]) for k in range(N)] for r in free]

    def last_end(c):
        return max(next((k for k, t in enumerate(p) if c in t), N) for p in prefixes)

    chars = sorted({c for p in prefixes for c in p[-1] if c.isascii() and c.isprintable()} - {" "})
    common = min(chars, key=lambda c: abs(last_end(c) - N / 2))
    records = []
    ways = (("cut after", None), ("in the loop", [common]), ("never found", ["\x07" * 4]))
    for way, strings in ways:
        t0 = time.perf_counter()
        stops = StopStrings.build(tok, strings, cfg.vocab_size) if strings else None
        build_s = time.perf_counter() - t0

        def call(i, stops=stops):
            out = generate(cfg, params, prompts, rng=jax.random.PRNGKey(i), stop_strings=stops,
                           **kw)  # fmt: skip
            return jax.device_get(out.lengths)

        call(0)
        times, lengths = [], []
        for i in range(3):
            t = time.perf_counter()
            lengths.append(call(i + 1))
            times.append(time.perf_counter() - t)
        rec = {"shape": shape, "way": way, "string": (strings or [common])[0], "batch": B,
               "prompt": P, "new": N, "call_s": statistics.median(times),
               "mean_tokens": float(np.mean(lengths)), "build_s": build_s}  # fmt: skip
        records.append(rec)
        print(json.dumps(rec), flush=True)
    return records


def table(records: list[dict]) -> str:
    lines = ["| shape | B | prompt + new | way | string | call s | tokens per row | tables s |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in records:
        lines.append(f"| {r['shape']} | {r['batch']} | {r['prompt']} + {r['new']} | {r['way']} | "
                     f"{r['string']!r} | {r['call_s']:.3f} | {r['mean_tokens']:.1f} | "
                     f"{r['build_s']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="the CI smoke shape")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    records = measure("tiny" if a.tiny else "small", os.path.join(a.out, "work"))
    with open(os.path.join(a.out, "stop_strings.jsonl"), "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.join(a.out, "stop_strings.md"), "w") as f:
        f.write(table(records))
    print(table(records))


if __name__ == "__main__":
    main()
