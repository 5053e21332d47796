"""Training memory plans without an accelerator: what a train step keeps live, by component.

    python -m flaxlm.bench.memory_plan                         # 1b and 7b plans, a table
    python -m flaxlm.bench.memory_plan --cases 7b:flax:bf16_params,7b:flax:bf16_save_proj --out OUT

A GPU lease is too short to find out by OOM which plan fits, so the plan for each shape is
sized here first, on the CPU, from the model's own code: everything below is traced abstractly
(`jax.eval_shape` / `jax.make_jaxpr`), no array is allocated, so the 7B shape takes seconds.

Cases are the flaxlm cases of bench/train_throughput.py ("SHAPE:flax:PLAN"), built by the same
`flax_case_config`, so the plan sized here is the plan that runs there. Components, in bytes:

  params      the train state's parameters (fp32 masters, or bf16 in the bf16_params plans)
  opt state   AdamW's moments (mu in bf16 where the plan says so, nu in the param dtype)
  grads       one gradient per parameter, in the parameter dtype
  residuals   what the forward pass keeps for the backward under the plan's remat policy and
              layer layout: the residuals of `jax.vjp` of the loss, minus the parameters
              themselves (already counted). The bf16 copies of fp32 masters appear here.
  dlogits     the gradient of the (B, T, V) logits, in their (compute) dtype, the largest
              transient of the loss (train/losses.py writes it in one pass from the logits)
              (of one (B, chunk, V) piece when the plan chunks the cross-entropy)

On a GPU the attention is cuDNN's fused kernel, which cannot be traced without cuDNN; tracing
swaps in a stand-in with the same residuals as the kernel (q, k, v, the output and the float32
softmax statistics, B·N·T), so the count is the kernel's, not plain XLA attention's B·N·T·T.

Two totals of `params + opt state + grads + residuals + dlogits`:
  bound           with jax's residual count, before any fusion: an upper bound, and a loose
                  one — most of those bytes are elementwise values a GPU fusion recomputes from
                  their inputs instead of keeping (silu's sigmoid, RMSNorm's float32 copies).
  fused estimate  with `fused_residual_bytes`: only what a fusing compiler must write (matmul,
                  attention and gather outputs, and elementwise values a matmul reads).
Checked against the GPU: the 1.1B `fast` plan peaked at 37.2 GiB on the H200
(bench/RESULTS.md), when its fused estimate was 42.4 GiB (1.14×) and its bound 60.9 GiB; since
the cross-entropy change they are 40.4 and 58.9 GiB (RESULTS.md's table, where the H200 compile
of the same step needs 35.6). The estimate stays above the peak because in the backward pass
the residuals of the last layers are freed before the gradients of the first ones exist. So a
plan whose bound fits fits, and one whose fused estimate fits very likely does. (Compiling the
step for the CPU instead is no guide: XLA:CPU fuses less; its buffer assignment for the 1.1B
step needs 58 GiB of temporaries alone.)

Where jax's CUDA plugin can be installed, bench/gpu_aot.py gives the exact figure instead: XLA's
GPU compiler itself, compiling the step for an H200 on this machine, and its buffer assignment
(37.3 GiB for the 1.1B `fast` plan against the 37.2 measured). This module needs nothing but
the project's own venv and says which component the bytes belong to.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import numpy as np

GiB = 2**30
HBM_BYTES = 139 * GiB  # what the H200 lease exposes to one process (about 139 GiB usable)

DEFAULT_CASES = [
    "1b:flax:fast",
    "7b:flax:bf16_params",
    "7b:flax:bf16_save_proj",
    "7b:flax:bf16_full_remat",
]


def _nbytes(tree) -> int:
    import jax

    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _aval_bytes(aval) -> int:
    return int(np.prod(aval.shape) * np.dtype(aval.dtype).itemsize)


# Primitives XLA fuses into one kernel with their neighbours (elementwise, layout, identity
# names), and reductions, which read fused elementwise producers without materialising them.
_ELEMENTWISE = frozenset(
    "convert_element_type mul add sub neg exp log logistic rsqrt sqrt div max min select_n "
    "broadcast_in_dim reshape squeeze expand_dims integer_pow square tanh pow eq ne lt gt le ge "
    "and or not abs sign copy transpose slice concatenate pad iota erf exp2 log1p expm1 "
    "stop_gradient name".split()
)
_REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min argmax argmin reduce_and reduce_or".split()
)


def _is_elementwise(eqn) -> bool:
    if eqn.primitive.name in _ELEMENTWISE:
        return True
    if eqn.primitive.name in ("pjit", "jit"):  # jitted helpers such as jax.nn.silu
        return all(_is_elementwise(e) for e in eqn.params["jaxpr"].jaxpr.eqns)
    return False


def _vjp_residuals(f, *args):
    """(jaxpr, residual vars) of `jax.vjp(f, *args)`, traced only: nothing runs."""
    import jax

    leaves, tree = jax.tree.flatten(args)

    def vjp_of_flat(*flat):
        return jax.vjp(lambda *a: f(*jax.tree.unflatten(tree, a)), *flat)

    closed, (_, vjp_shape) = jax.make_jaxpr(vjp_of_flat, return_shape=True)(*leaves)
    jaxpr = closed.jaxpr
    n_res = len(jax.tree.leaves(vjp_shape))
    inputs = {id(v) for v in jaxpr.invars}
    res, seen = [], set()
    for v in jaxpr.outvars[len(jaxpr.outvars) - n_res :]:
        if type(v).__name__ == "Literal" or id(v) in inputs or id(v) in seen:
            continue
        seen.add(id(v))
        res.append(v)
    return jaxpr, res


def residual_bytes(f, *args) -> tuple[int, int]:
    """(bytes, count) of the values `jax.vjp(f, *args)` keeps for the backward pass, excluding
    the arguments themselves (they live anyway) — jax's own count, before any fusion."""
    _, res = _vjp_residuals(f, *args)
    return sum(_aval_bytes(v.aval) for v in res), len(res)


def fused_residual_bytes(f, *args) -> int:
    """Bytes of residuals a fusing compiler materialises: a residual made by elementwise ops
    that, in the forward pass, only feed other elementwise ops or reductions is never written
    to memory — the backward fusion recomputes it from the nearest values that are (matmul,
    attention and gather outputs, or elementwise values a matmul reads), and those are
    counted instead. A model of XLA's fusion, not its buffer assignment: checked against the
    H200's measured peak in bench/RESULTS.md."""
    return _fused_bytes(*_vjp_residuals(f, *args))


def _fused_bytes(jaxpr, res) -> int:
    producer, consumers = {}, {}
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            producer[id(v)] = eqn
        for v in eqn.invars:
            if type(v).__name__ != "Literal":
                consumers.setdefault(id(v), []).append(eqn)
    inputs = {id(v) for v in jaxpr.invars}

    def frontier(r, available=()) -> dict:
        """The values the backward would recompute residual `r` from: walk back through
        fusable elementwise producers to the nearest ones a fusion must write, or to values
        already `available` (kept for the backward anyway)."""
        out, stack, seen = {}, [r], set()
        while stack:
            v = stack.pop()
            eqn = producer.get(id(v))
            if id(v) in inputs or eqn is None or id(v) in seen:
                continue
            seen.add(id(v))
            if id(v) in available and v is not r:
                out[id(v)] = v
                continue
            fusable_uses = all(_is_elementwise(c) or c.primitive.name in _REDUCTIONS
                               for c in consumers.get(id(v), []))  # fmt: skip
            if _is_elementwise(eqn) and fusable_uses:
                stack.extend(u for u in eqn.invars if type(u).__name__ != "Literal")
            else:
                out[id(v)] = v
        return out

    # Residuals that are not elementwise results (matmul, attention, gather outputs) are
    # written whatever happens; an elementwise one costs what rebuilding it needs beyond
    # those — or its own bytes, if keeping it is cheaper (h_i = h_{i-1} + block_i(...) under
    # full remat would otherwise be "rebuilt" from every block output before it). In program
    # order, so a residual rebuilt from an earlier one that was kept costs nothing more
    # (silu(gate) from gate, where gate is kept as a slice of the gate|up matmul's output).
    order = {id(v): i for i, eqn in enumerate(jaxpr.eqns) for v in eqn.outvars}
    res = sorted(res, key=lambda r: order.get(id(r), -1))
    kept = {id(r): r for r in res if frontier(r).keys() == {id(r)}}
    for r in res:
        if id(r) in kept:
            continue
        extra = {k: v for k, v in frontier(r, kept).items() if k not in kept}
        if sum(_aval_bytes(v.aval) for v in extra.values()) > _aval_bytes(r.aval):
            extra = {id(r): r}
        kept.update(extra)
    return sum(_aval_bytes(v.aval) for v in kept.values())


def _flash_standin():
    """An attention with cuDNN flash attention's residuals (q, k, v, out, fp32 softmax stats),
    for tracing on a machine without cuDNN. Its backward is never run, only traced."""
    import jax
    import jax.numpy as jnp

    from flaxlm.models import attention

    @jax.custom_vjp
    def attend(q, k, v):
        return q  # (B, T, N, H): the output's shape and dtype (GQA keeps q's head count)

    def fwd(q, k, v):
        out = attend(q, k, v)
        stats = jnp.zeros(q.shape[:3], jnp.float32) + q[..., 0].astype(jnp.float32)  # (B, T, N)
        return out, (q, k, v, out * 1, stats)

    def bwd(res, g):
        q, k, v, _, _ = res
        return g, jnp.zeros_like(k), jnp.zeros_like(v)

    attend.defvjp(fwd, bwd)

    def standin(q, k, v, mask, window=0, scale=None):  # attention.cudnn_attention's signature
        del mask, window, scale
        return attend(q, k, v)

    return attention, standin


@contextlib.contextmanager
def _traceable_cudnn():
    attention, standin = _flash_standin()
    real = attention.cudnn_attention
    attention.cudnn_attention = standin
    try:
        yield
    finally:
        attention.cudnn_attention = real


def plan_case(case: str) -> dict:
    """The memory plan of one flaxlm train_throughput case (bytes per component, estimate)."""
    import jax
    import jax.numpy as jnp

    from flaxlm.bench.train_throughput import flax_case_config
    from flaxlm.train.optim import make_optimizer
    from flaxlm.train.pretrain import lm_loss, model_fns
    from flaxlm.train.state import unbox

    config, cfg, plan, batch, seq = flax_case_config(case)
    init_params, apply = model_fns(cfg)
    tx, _ = make_optimizer(config.opt, 1000)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    data = {"tokens": tokens, "targets": tokens}
    data["loss_mask"] = jax.ShapeDtypeStruct((batch, seq), jnp.float32)
    loss_fn = lm_loss(apply, config.loss, moe=cfg.n_experts > 0)  # (router losses' statistics)
    with _traceable_cudnn():
        params = jax.eval_shape(lambda r: unbox(init_params(r)), jax.random.PRNGKey(0))
        opt_state = jax.eval_shape(tx.init, params)
        jaxpr, residuals = _vjp_residuals(lambda p, b: loss_fn(p, b, None)[0], params, data)
    res, n_res = sum(_aval_bytes(v.aval) for v in residuals), len(residuals)
    fused_res = _fused_bytes(jaxpr, residuals)
    parts = {
        "params": _nbytes(params),
        "opt_state": _nbytes(opt_state),
        "grads": _nbytes(params),
        "residuals": res,
        "dlogits": batch
        * (config.loss.get("chunk_tokens", 0) or seq)
        * cfg.vocab_size
        * jnp.dtype(cfg.dtype).itemsize,
    }
    est = sum(parts.values())
    fused_est = est - res + fused_res
    return {
        "case": case,
        "plan": plan,
        "batch": batch,
        "seq_len": seq,
        "model": {
            "params": cfg.param_counts()["total"],
            "n_layers": cfg.n_layers,
            "d_model": cfg.d_model,
            "vocab_size": cfg.vocab_size,
            "param_dtype": str(jnp.dtype(cfg.param_dtype)),
            "remat_policy": cfg.remat_policy,
            "scan_layers": cfg.scan_layers,
        },
        "bytes": parts,
        "residual_values": n_res,
        "fused_residual_bytes": fused_res,
        "estimate_bytes": est,
        "fused_estimate_bytes": fused_est,
        "fits": est <= HBM_BYTES,
    }


def table(records: list[dict]) -> str:
    cols = ["params", "opt_state", "grads", "residuals", "dlogits"]
    lines = [
        "| case | remat | " + " | ".join(cols) + " | fused residuals | bound (GiB) | "
        "fused estimate (GiB) | bound fits 139 GiB |",
        "|---|---|" + "---|" * len(cols) + "---|---|---|---|",
    ]
    for r in records:
        gb = [f"{r['bytes'][c] / GiB:.1f}" for c in cols]
        lines.append(
            f"| {r['case']} | {r['model']['remat_policy']} | "
            + " | ".join(gb)
            + f" | {r['fused_residual_bytes'] / GiB:.1f} | {r['estimate_bytes'] / GiB:.1f} | "
            f"{r['fused_estimate_bytes'] / GiB:.1f} | {'yes' if r['fits'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", default=",".join(DEFAULT_CASES))
    p.add_argument("--out", default="", help="also write memory_plan.jsonl / .md here")
    a = p.parse_args(argv)
    records = [plan_case(c) for c in a.cases.split(",") if c]
    md = table(records)
    print(md)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "memory_plan.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        with open(os.path.join(a.out, "memory_plan.md"), "w") as f:
            f.write(md + "\n")
    return records


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
