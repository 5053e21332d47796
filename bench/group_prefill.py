"""What sharing a prompt's prefill among its samples saves (`generate(..., num_samples=G)`).

    python -m flaxlm.bench.group_prefill --out OUT --tiny   # CPU: a small shape, timed
    .venv-gpu-aot/bin/python -m flaxlm.bench.group_prefill --out OUT --h200   # H200 memory

GRPO samples G answers per prompt. Generating `[p]*G` prefills the same prompt G times;
`num_samples=G` prefills it once and copies its cache rows (models/decode.py). Per case, both
ways, the same B = prompts × G rows decoded:

  prefill_tflop   forward FLOPs of the prefill (DESIGN.md's count, causal attention: a third of
                  `flops_per_token(P, causal=True)` per prompt token), prompts × P tokens
                  shared, B × P repeated
  temp_gib        the compiled program's temporaries (XLA's buffer assignment on this backend
                  or, --h200, compiled for an H200 on this machine; float32 on the CPU:
                  bench/window_cache.py says why); the prefill's activations over B or
                  prompts rows, and the decode cache
  call_s          (timed cases) median wall time of the whole `generate` call, and
  prefill_s       of a call with max_new_tokens=1 (prefill and one sampled token)

Shapes: "1b-grpo" — the 1.1B Llama shape, 8 prompts × 8 samples, 1536-token prompts + 512
new (a long-prompt GRPO rollout filling its 2048 context); "7b-grpo" — the 7B shape, 4 × 8,
2048 + 512; "small-grpo"
(CPU, timed) — the "small" variant, 2 × 8, 512 + 32; "tiny-grpo" the CI smoke test's.
"""

from __future__ import annotations

import json
import time

from flaxlm.bench import compiled_generate
from flaxlm.bench.compiled_generate import GiB, abstract_params, backend_config, median_s

# name: (variant, config overrides, prompts, samples per prompt G, prompt length, new tokens)
SHAPES = {
    "1b-grpo": ("1b", dict(dtype="bfloat16", param_dtype="bfloat16"), 8, 8, 1536, 512),
    "7b-grpo": ("7b", dict(dtype="bfloat16", param_dtype="bfloat16"), 4, 8, 2048, 512),
    "small-grpo": ("small", dict(max_seq_len=1024), 2, 8, 512, 32),
    "tiny-grpo": ("tiny", {}, 2, 4, 32, 4),
}


def measure(shape: str, timed: bool, target=None) -> list[dict]:
    """Both ways' records for one shape (shared prefill, repeated prompts)."""
    import jax
    import numpy as np

    from flaxlm.models.config import get_variant
    from flaxlm.models.decode import generate, generate_program

    variant, over, n_prompts, G, P, N = SHAPES[shape]
    cfg, backend = backend_config(get_variant(variant, **over), target)
    init, abstract, place = abstract_params(cfg, target)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (n_prompts, P), np.int32)
    params = jax.jit(init)(jax.random.PRNGKey(0)) if timed else None
    per_token = cfg.flops_per_token(P, causal=True) / 3  # forward only
    records = []
    for shared in (False, True):
        tokens = prompts if shared else np.repeat(prompts, G, axis=0)
        kw = dict(prompt_lengths=np.full((len(tokens),), P, np.int32), temperature=1.0,
                  num_samples=G if shared else 1)  # fmt: skip
        t0 = time.perf_counter()
        fn, args = generate_program(cfg, tokens, rng=jax.random.PRNGKey(0), max_new_tokens=N, **kw)
        args = [jax.tree.map(place, abstract)] + [place(np.asarray(x)) for x in args]
        memory = fn.lower(*args).compile().memory_analysis()
        rec = {
            "shape": shape, "shared_prefill": shared, "prompts": n_prompts, "samples": G,
            "prompt": P, "new": N, "backend": backend, "dtype": cfg.dtype,
            "prefill_tflop": len(tokens) * P * per_token / 1e12,
            "temp_gib": memory.temp_size_in_bytes / GiB,
            "compile_s": time.perf_counter() - t0,
        }  # fmt: skip
        if timed:

            def call(n, kw=kw, tokens=tokens):
                return lambda i: generate(
                    cfg, params, tokens, rng=jax.random.PRNGKey(i), max_new_tokens=n, **kw
                ).tokens.block_until_ready()

            rec["call_s"], rec["prefill_s"] = median_s(call(N)), median_s(call(1))
        records.append(rec)
        print(json.dumps(rec), flush=True)
    return records


def table(records: list[dict]) -> str:
    head = ("shape", "backend", "dtype", "prompts × G", "prompt + new", "prefill", "prefill TFLOP",
            "temp GiB", "call s", "prefill s")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        t = lambda k, r=r: f"{r[k]:.3f}" if k in r else "-"  # noqa: E731
        cells = (r["shape"], r["backend"], r["dtype"], f"{r['prompts']} × {r['samples']}",
                 f"{r['prompt']} + {r['new']}", "shared" if r["shared_prefill"] else "repeated",
                 f"{r['prefill_tflop']:.2f}", f"{r['temp_gib']:.3f}", t("call_s"),
                 t("prefill_s"))  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    compiled_generate.main(
        argv,
        doc=__doc__,
        name="group_prefill",
        shapes=SHAPES,
        tiny="small-grpo",
        default=["1b-grpo", "7b-grpo"],
        measure=measure,
        table=table,
        key=("shape", "backend", "shared_prefill"),
    )


if __name__ == "__main__":
    main()
