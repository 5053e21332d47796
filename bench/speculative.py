"""Speculative decoding (models/speculative.py): how often a draft is accepted, and what an
iteration costs against a plain decode step.

    # acceptance of trained drafts (CPU is enough): a target run and one or more draft runs
    python -m flaxlm.bench.speculative --out OUT --target runs/demo/pretrain \
        --draft runs/demo/distill --draft runs/demo/student \
        --prompts runs/demo/world/heldout_text.jsonl
    # cost: random weights, plain `generate` against speculative iterations (GPU; --tiny: CPU)
    python -m flaxlm.bench.speculative --out OUT --shapes 1b-125m
    python -m flaxlm.bench.speculative --out OUT --tiny

Acceptance (`--target`, `--draft`): the first `--prompt_tokens` tokens of each of `--rows`
texts (a .jsonl's "text" fields, or plain lines) as prompts, `--new` tokens greedy and sampled
at temperature 1, for k = 1, 2, 4, 8 draft tokens per target forward. Per (draft, temperature,
k): α, the probability that a judged draft is kept (kept / (kept + rejected): comparable
across k), the share of proposed drafts kept (smaller for larger k: drafts after a rejection
are never judged), tokens per target forward (the speedup's upper bound when a draft step is
free), and wall time against plain `generate` on the same
prompts — on a CPU with tiny models a forward costs its launch overhead, not its weights, so
those times say little about a GPU.

Cost (`--shapes`): random weights, so a draft is almost never accepted and every iteration
yields one token: an iteration's time t_iter(k) = (k draft steps + one (k+1)-token target
forward) is then measured directly, against plain greedy `generate`'s per-token step t_step.
With acceptance α an iteration yields E(α, k) = (1 − α^(k+1)) / (1 − α) tokens, so the
speedup is E(α, k) · t_step / t_iter(k) (Leviathan et al. 2023); the table gives it at α = 0.6
and 0.8 and the break-even α where it is 1. Combine with the acceptance measured on trained
pairs. Records: OUT/speculative.jsonl, table OUT/speculative.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from flaxlm.bench import driver
from flaxlm.bench.compiled_generate import backend_config, median_s

KS = (1, 2, 4, 8)
# name: (target variant, draft variant, overrides of both, batches, prompt, new tokens, ks)
SHAPES = {
    "1b-125m": ("1b", "125m", dict(dtype="bfloat16", param_dtype="bfloat16"), (1,), 128, 256,
                (2, 4)),
    "small-tiny": ("small", "tiny", dict(vocab_size=2048), (1,), 16, 32, (2, 4)),
    "tiny": ("tiny", "tiny", {}, (2,), 8, 8, (2,)),  # the CI smoke test's
}  # fmt: skip


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens per iteration when each draft is kept with probability α independently."""
    return k + 1.0 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def break_even(ratio: float, k: int) -> float:
    """The α at which E(α, k) = ratio (t_iter / t_step), by bisection; 1.0 if never."""
    if expected_tokens(1.0, k) < ratio:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens(mid, k) < ratio else (lo, mid)
    return hi


# ----------------------------------------------------------------------------------------------
# Cost: random weights


def measure_cost(shape: str) -> list[dict]:
    import jax
    import numpy as np

    from flaxlm.bench.compiled_generate import abstract_params
    from flaxlm.models.config import get_variant
    from flaxlm.models.decode import generate
    from flaxlm.models.speculative import speculative_generate

    tv, dv, over, batches, P, N, ks = SHAPES[shape]
    cfg, backend = backend_config(get_variant(tv, **over))
    dcfg, _ = backend_config(get_variant(dv, **over))
    params = jax.jit(abstract_params(cfg)[0])(jax.random.PRNGKey(0))
    dparams = jax.jit(abstract_params(dcfg)[0])(jax.random.PRNGKey(1))
    records = []
    for B in batches:
        prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, P), np.int32)
        kw = dict(prompt_lengths=np.full((B,), P, np.int32), temperature=0.0)

        def plain(n, i, kw=kw, prompts=prompts):
            return generate(cfg, params, prompts, max_new_tokens=n, rng=jax.random.PRNGKey(i),
                            **kw).tokens.block_until_ready()  # fmt: skip

        call_s = median_s(lambda i: plain(N, i))
        prefill_s = median_s(lambda i: plain(1, i))
        t_step = (call_s - prefill_s) / (N - 1)
        base = {"shape": shape, "backend": backend, "batch": B, "prompt": P, "new": N,
                "target": tv, "draft": dv, "dtype": cfg.dtype}  # fmt: skip
        rec = {**base, "k": 0, "call_s": call_s, "prefill_s": prefill_s, "step_ms": 1e3 * t_step,
               "tokens_per_s": B * N / call_s}  # fmt: skip
        records.append(rec)
        print(json.dumps(rec), flush=True)
        for k in ks:
            out = {}

            def spec(i, k=k, kw=kw, prompts=prompts, out=out):
                o = speculative_generate(
                    cfg,
                    params,
                    dcfg,
                    dparams,
                    prompts,
                    max_new_tokens=N,
                    rng=jax.random.PRNGKey(i),
                    draft_tokens=k,
                    **kw,
                )
                out["o"] = jax.block_until_ready(o)  # fmt: skip

            s = median_s(spec)
            o = jax.device_get(out["o"])
            iters = int(o.iterations.max())
            t_iter = (s - prefill_s) / max(iters, 1)
            ratio = t_iter / t_step
            rec = {**base, "k": k, "call_s": s, "iterations": iters,
                   "alpha": o.alpha(),
                   "iter_ms": 1e3 * t_iter, "iter_over_step": ratio,
                   "break_even_alpha": break_even(ratio, k),
                   "speedup_at_0.6": expected_tokens(0.6, k) / ratio,
                   "speedup_at_0.8": expected_tokens(0.8, k) / ratio}  # fmt: skip
            records.append(rec)
            print(json.dumps(rec), flush=True)
    return records


def cost_table(records: list[dict]) -> str:
    head = ("shape", "backend", "batch", "k", "step / iteration ms", "iteration / step",
            "break-even α", "speedup at α=0.6", "at α=0.8")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if r["k"] == 0:
            cells = (r["shape"], r["backend"], r["batch"], "plain", f"{r['step_ms']:.2f}",
                     "1", "-", "-", "-")  # fmt: skip
        else:
            cells = (r["shape"], r["backend"], r["batch"], r["k"], f"{r['iter_ms']:.2f}",
                     f"{r['iter_over_step']:.2f}", f"{r['break_even_alpha']:.2f}",
                     f"{r['speedup_at_0.6']:.2f}", f"{r['speedup_at_0.8']:.2f}")  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Acceptance: trained pairs


def read_texts(path: str, rows: int) -> list[str]:
    """The first `rows` texts of a .jsonl ("text" fields) or a plain text file (lines)."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            texts.append(json.loads(line)["text"] if path.endswith(".jsonl") else line.strip())
            if len(texts) == rows:
                break
    return texts


def measure_acceptance(target: str, drafts: list[str], prompts_path: str, rows: int,
                       prompt_tokens: int, new: int, ks=KS) -> list[dict]:  # fmt: skip
    import jax

    from flaxlm.generate import load
    from flaxlm.models.decode import generate
    from flaxlm.models.speculative import speculative_generate

    cfg, params, tok = load(target)
    texts = read_texts(prompts_path, rows)
    prompts = [tok.encode(t, bos=tok.bos_id >= 0)[:prompt_tokens] for t in texts]
    records = []
    for temperature in (0.0, 1.0):
        kw = dict(max_new_tokens=new, temperature=temperature, rng=jax.random.PRNGKey(0))
        plain_s = median_s(lambda i, kw=kw: jax.block_until_ready(
            generate(cfg, params, prompts, **kw)))  # fmt: skip
        for draft in drafts:  # "ngram": prompt lookup, no draft model
            dcfg, dparams, _ = (None, None, None) if draft == "ngram" else load(draft)
            for k in ks:
                out = {}

                def spec(i, k=k, kw=kw, out=out, dcfg=dcfg, dparams=dparams):
                    out["o"] = jax.block_until_ready(speculative_generate(
                        cfg, params, dcfg, dparams, prompts, draft_tokens=k, **kw))  # fmt: skip

                t = time.perf_counter()
                s = median_s(spec)
                o = out["o"]
                rec = {"target": target, "draft": draft, "temperature": temperature, "k": k,
                       "rows": len(prompts), "prompt_tokens": prompt_tokens, "new": new,
                       "alpha": o.alpha(), "acceptance_rate": o.acceptance_rate(k),
                       "tokens_per_forward": o.tokens_per_iteration(),
                       "call_s": s, "plain_call_s": plain_s,
                       "draft_params": sum(x.size for x in jax.tree.leaves(dparams or {})),
                       "target_params": sum(x.size for x in jax.tree.leaves(params)),
                       "bench_s": time.perf_counter() - t}  # fmt: skip
                records.append(rec)
                print(json.dumps(rec), flush=True)
    return records


def acceptance_table(records: list[dict]) -> str:
    head = ("draft", "draft / target params", "temperature", "k", "α (kept / judged)",
            "kept / proposed", "tokens per target forward", "wall s (plain)")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        cells = (os.path.basename(r["draft"].rstrip("/")),
                 f"{r['draft_params'] / r['target_params']:.2f}", r["temperature"], r["k"],
                 f"{r['alpha']:.3f}", f"{r['acceptance_rate']:.3f}",
                 f"{r['tokens_per_forward']:.2f}",
                 f"{r['call_s']:.2f} ({r['plain_call_s']:.2f})")  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="cost on the CPU shape small-tiny")
    p.add_argument("--shapes", default="", help="cost shapes: " + ",".join(SHAPES))
    p.add_argument("--target", default="", help="acceptance: the target run / HF directory")
    p.add_argument(
        "--draft",
        action="append",
        default=[],
        help="a draft run (repeatable); 'ngram': prompt lookup (n-grams up to 3)",
    )
    p.add_argument("--prompts", default="", help=".jsonl with 'text' fields, or text lines")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--prompt_tokens", type=int, default=16)
    p.add_argument("--new", type=int, default=48)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.target:
        if not a.draft or not a.prompts:
            p.error("--target needs --draft and --prompts")
        records = measure_acceptance(a.target, a.draft, a.prompts, a.rows, a.prompt_tokens,
                                     a.new)  # fmt: skip
        name, table = "speculative_acceptance", acceptance_table
    else:
        shapes = a.shapes.split(",") if a.shapes else (["small-tiny"] if a.tiny else ["1b-125m"])
        records = [r for s in shapes for r in measure_cost(s)]
        name, table = "speculative", cost_table
    with open(os.path.join(a.out, f"{name}.jsonl"), "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    driver.write_table(a.out, f"{name}.md", table(records).rstrip("\n"))
    print(table(records))


def markdown(path: str) -> str:
    """The cost table of OUT/speculative.jsonl (`path`): the latest record of every shape,
    backend, batch and k (the GPU suite's summary)."""
    from flaxlm.bench.compiled_generate import markdown as latest_table

    return latest_table(path, cost_table, ("shape", "backend", "batch", "k"))


if __name__ == "__main__":
    main()
