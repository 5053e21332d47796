"""What sliding-window layers' ring caches save in decoding (`generate(window_cache=...)`).

    python -m flaxlm.bench.window_cache --out OUT            # memory at two real shapes
    python -m flaxlm.bench.window_cache --out OUT --time     # + decode speed (needs the params)
    python -m flaxlm.bench.window_cache --out OUT --tiny     # CPU: a small shape, timed too
    .venv-gpu-aot/bin/python -m flaxlm.bench.window_cache --out OUT --h200   # H200 memory, no GPU

A local layer never looks further back than its window W, so `generate` keeps it a ring of W
slots instead of prompt + new tokens (models/transformer.py `window_cache`). Per case, both
ways (`window_cache=True` / `False`), the same `generate` program:

  kv_gib        the decode cache, K and V of every layer in the compute dtype: counted from
                the shapes (global layers hold prompt bucket + new tokens slots, rings W)
  temp_gib      the compiled program's temporaries, XLA's buffer assignment on this backend:
                its peak, cache and prefill activations together (params are arguments, not
                counted). XLA:CPU fuses less than a GPU's and copies bf16 matmul operands to
                float32, so on the CPU every shape runs in float32 (KV bytes double) and the
                figure is the CPU's, a guide only. `--h200` compiles for an H200 on this machine
                (bench/gpu_aot.py's way), in the shape's dtype, with cuDNN attention
  call_s, prefill_call_s  (timed cases) medians of 3 calls decoding N and 1 new tokens
  decode_tok_s  (timed cases) B·(N−1) / (call_s − prefill_call_s); absent when the difference
                is not positive (too few new tokens to time: CI's tiny shape on a busy CPU)

Shapes: "gemma3-1b" — Gemma 3 1B's dimensions (26 layers, 5 local in 6, W=512, 1 kv head of
256 dims, vocab 262144), "mistral-7b" — Mistral 7B v0.1's (32 layers all local, W=4096, 8 kv
heads of 128), both bf16; "small-window" — the "small" variant with W=64, 1 local in 2, float32
(--tiny); "-rollout" shapes: RL rollouts with long answers (Gemma 3 1B at batch 64, 256 +
8192; Mistral 7B at batch 16, 512 + 16384), where the decode cache, not the prefill, sets the
peak; "gemma3-1b-long" Gemma 3 1B at batch 16, 4096 + 512 (the GPU suite's, timed);
"tiny-window" the CI smoke test's. Memory needs no parameters (compiled from their
shapes); --time draws random ones.
"""

from __future__ import annotations

import json
import time

from flaxlm.bench import compiled_generate
from flaxlm.bench.compiled_generate import GiB, abstract_params, backend_config, median_s

# name: (config overrides of a variant, batch, prompt, new tokens)
SHAPES = {
    "gemma3-1b": (
        dict(variant="1b", vocab_size=262144, d_model=1152, n_layers=26, n_heads=4, n_kv_heads=1,
             head_dim=256, d_ff=6912, max_seq_len=32768, sliding_window=512,
             sliding_window_pattern=6, rope_local_theta=10000.0, rope_theta=1e6,
             query_pre_attn_scalar=256.0, norm_placement="sandwich", norm_unit_offset=True,
             scale_embeddings=True, qk_norm="head", tie_embeddings=True, dtype="bfloat16",
             param_dtype="bfloat16"),
        8, 4096, 4096,
    ),
    "mistral-7b": (
        dict(variant="7b", n_kv_heads=8, d_ff=14336, max_seq_len=32768, sliding_window=4096,
             dtype="bfloat16", param_dtype="bfloat16"),
        4, 8192, 4096,
    ),
    # RL rollouts with long answers: short prompts, many new tokens, a big batch. The decode
    # cache is then the program's peak, not the prefill's activations.
    "gemma3-1b-rollout": (dict(variant="gemma3-1b"), 64, 256, 8192),
    "mistral-7b-rollout": (dict(variant="mistral-7b"), 16, 512, 16384),
    "gemma3-1b-long": (  # the GPU suite's timed case: a long prompt, fewer new tokens
        dict(variant="gemma3-1b"), 16, 4096, 512,
    ),
    "small-window": (
        dict(variant="small", sliding_window=64, sliding_window_pattern=2, max_seq_len=2048,
             dtype="float32", param_dtype="float32"),
        4, 512, 512,
    ),
    "tiny-window": (  # the CI smoke test's
        dict(variant="tiny", sliding_window=8, sliding_window_pattern=2, dtype="float32",
             param_dtype="float32"),
        2, 32, 128,  # enough new tokens that decoding, not timer noise, sets the times
    ),
}  # fmt: skip


def config(shape: str):
    """The shape's ModelConfig: a variant with overrides ("variant" may name another shape)."""
    from flaxlm.models.config import get_variant

    over = dict(SHAPES[shape][0])
    base = over.pop("variant")
    if base in SHAPES:
        return config(base).replace(**over)
    return get_variant(base, **over)


def kv_bytes(cfg, batch: int, prompt: int, new: int, ring: bool) -> int:
    """Bytes of the decode cache's keys and values, as `generate` allocates them."""
    import jax.numpy as jnp

    from flaxlm.models.decode import prompt_bucket

    full = prompt_bucket(prompt) + new
    per_slot = 2 * batch * cfg.n_kv_heads * cfg.head_dim_ * jnp.dtype(cfg.dtype).itemsize
    use_ring = ring and 0 < cfg.sliding_window < full
    slots = [cfg.sliding_window if use_ring and cfg.layer_window(i) else full
             for i in range(cfg.n_layers)]  # fmt: skip
    return per_slot * sum(slots)


def measure(shape: str, timed: bool, target=None) -> list[dict]:
    """Both ways' records for one shape, compiled for this backend or for `target` (a
    compile-only device, bench/gpu_aot.py's H200: memory only)."""
    import jax
    import numpy as np

    from flaxlm.models.decode import generate, generate_program

    cfg, backend = backend_config(config(shape), target)
    _, B, P, N = SHAPES[shape]
    init, abstract, place = abstract_params(cfg, target)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, P), np.int32)
    kw = dict(prompt_lengths=np.full((B,), P, np.int32), temperature=1.0)
    params = jax.jit(init)(jax.random.PRNGKey(0)) if timed else None
    records = []
    for ring in (False, True):
        t0 = time.perf_counter()
        fn, args = generate_program(cfg, tokens, rng=jax.random.PRNGKey(0), max_new_tokens=N,
                                    window_cache=ring, **kw)  # fmt: skip
        args = [jax.tree.map(place, abstract)] + [place(np.asarray(x)) for x in args]
        memory = fn.lower(*args).compile().memory_analysis()
        rec = {
            "shape": shape, "window_cache": ring, "batch": B, "prompt": P, "new": N,
            "window": cfg.sliding_window, "backend": backend,
            "kv_gib": kv_bytes(cfg, B, P, N, ring) / GiB,
            "temp_gib": memory.temp_size_in_bytes / GiB,
            "compile_s": time.perf_counter() - t0,
        }  # fmt: skip
        if timed:

            def call(n, ring=ring):
                return lambda i: generate(cfg, params, tokens, rng=jax.random.PRNGKey(i),
                                          max_new_tokens=n, window_cache=ring, **kw
                                          ).tokens.block_until_ready()  # fmt: skip

            whole, prefill = median_s(call(N)), median_s(call(1))
            rec["call_s"], rec["prefill_call_s"] = whole, prefill
            if whole > prefill:
                rec["decode_tok_s"] = B * (N - 1) / (whole - prefill)
        rec["dtype"] = cfg.dtype
        records.append(rec)
        print(json.dumps(rec), flush=True)
    return records


def table(records: list[dict]) -> str:
    head = ("shape", "backend", "dtype", "B", "prompt + new", "W", "window_cache", "KV GiB",
            "temp GiB", "decode tok/s")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        speed = f"{r['decode_tok_s']:.0f}" if "decode_tok_s" in r else "-"
        cells = (r["shape"], r["backend"], r["dtype"], r["batch"], f"{r['prompt']} + {r['new']}",
                 r["window"], r["window_cache"], f"{r['kv_gib']:.3f}", f"{r['temp_gib']:.3f}",
                 speed)  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    compiled_generate.main(
        argv,
        doc=__doc__,
        name="window_cache",
        shapes=SHAPES,
        tiny="small-window",
        default=["gemma3-1b", "mistral-7b", "gemma3-1b-rollout", "mistral-7b-rollout"],
        measure=measure,
        table=table,
        key=KEY,
    )


KEY = ("shape", "backend", "window_cache")  # the table shows the latest record of each


def markdown(path: str) -> str:
    """The table of OUT/window_cache.jsonl (`path`), as `main` prints it."""
    return compiled_generate.markdown(path, table, KEY)


if __name__ == "__main__":
    main()
