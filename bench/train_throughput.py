"""Training throughput and MFU: flaxlm against the HF PyTorch peer, same shapes, same batch.

    python -m flaxlm.bench.train_throughput --out OUT [--cases 1b:flax,1b:hf-eager,...]
    python -m flaxlm.bench.train_throughput --tiny --out OUT     # CPU smoke test (HF if torch)

Each case runs in its own subprocess (so every case starts with an empty accelerator and a
crash or OOM costs only that case) and appends one JSON record to OUT/train_throughput.jsonl;
the driver then writes OUT/train_throughput.md with the table and the flaxlm/peer ratios. The
HF cases need torch and transformers; without them they are recorded as skipped (no failure).

Cases are "SHAPE:IMPL[:PLAN[:FLAGS|profile]]" (FLAGS: a key of driver.XLA_FLAG_SETS; flax
only; "profile": after the timed steps one more step is traced and summarised into the
record's "profile", as bench/decode.py does — where a step's GPU time goes):
  SHAPE  125m | 1b (TinyLlama-1.1B) | 7b (Llama-2-7B) | tiny (CPU smoke) | 125m-moe, tiny-moe
         (8 / 4 experts, top 2: Mixtral's layout; the HF peer is MixtralForCausalLM, which never
         drops a token, against flaxlm's capacity factor 1.25 — the "dropless" plan matches it)
  IMPL   flax | hf-eager | hf-compile
  PLAN   flax: a named memory/speed plan from PLANS (default: "fast"; "cpu" for tiny);
         hf: "ckpt" turns on gradient checkpointing.
Both sides train the same model (Llama architecture, vocab 32000, bf16 compute), with AdamW,
global-norm clipping at 1.0, on a fixed random batch of one unpadded document per row, and
the same timing rule: `warmup` steps (compilation) excluded, then `steps` steps timed after a
device sync. MFU uses DESIGN.md's PaLM count (6·N_matmul + 12·L·d_attn·T per token) and also
the causal count, against the dense bf16 peak of the device kind (flaxlm.train.metrics: 989
TFLOP/s for H100/H200 SXM) × the devices the step ran on, as bench/alignment_throughput.py
does: flaxlm splits the batch over gcd(batch, devices) of them, the HF peer runs on one. The
record names the device kind and count ("device", "devices", "peak_tflops"), and the table's
"vs hf-*" ratios are of tokens/s per device. Where the table has no peak (a CPU: the smoke
test) the record's MFU is null and the table prints n/a.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from flaxlm.bench import driver

# Shapes: (variant, global batch, seq_len).
SHAPES = {
    "tiny": ("tiny", 4, 64),
    "125m": ("125m", 16, 2048),
    "1b": ("1b", 8, 2048),
    "7b": ("7b", 4, 2048),
    # Mixtral-style mixture of experts on the 125m shape (models/moe.py): 8 experts of the
    # dense width, top 2 — 0.53B parameters, 1.39x the dense FLOPs per token. The HF peer is
    # MixtralForCausalLM with the same sizes.
    "125m-moe": ("125m", 16, 2048),
    "tiny-moe": ("tiny", 4, 64),
}
# ModelConfig fields a shape sets on top of its variant.
SHAPE_MODEL = {
    "125m-moe": dict(n_experts=8, n_experts_per_token=2, moe_capacity_factor=1.25),
    "tiny-moe": dict(n_experts=4, n_experts_per_token=2, moe_capacity_factor=1.25),
}

# flaxlm plans: ModelConfig overrides (and "loss." / "opt." keys); a bf16 param_dtype also
# keeps Adam's first moment in bf16. The default is "fast" ("cpu" for tiny). "bf16" params
# mirror the HF peer's bf16-parameter plan; the others keep fp32 masters.
PLANS = {
    "fast": dict(dtype="bfloat16", attention_impl="cudnn", remat_policy="none"),
    # `fast` with q|k|v and gate|up as separate matmuls (as before joining them in the cast):
    # the A/B of models/layers.py `stacked_projection` on the device.
    "fast_separate": dict(
        dtype="bfloat16", attention_impl="cudnn", remat_policy="none", join_projections=False
    ),
    "fast_scan": dict(
        dtype="bfloat16", attention_impl="cudnn", remat_policy="none", scan_layers=True
    ),
    "save_proj": dict(dtype="bfloat16", attention_impl="cudnn", remat_policy="save_proj"),
    "bf16_params": dict(
        dtype="bfloat16", param_dtype="bfloat16", attention_impl="cudnn", remat_policy="none"
    ),
    # The HF peer's memory plan (each layer recomputed in the backward). Unrolled: compiled for
    # the H200 (bench/gpu_aot.py) it needs 51.2 GiB against 53.7 scanned, and skips the scan's
    # per-layer slicing of stacked weights and gradients.
    "bf16_full_remat": dict(
        dtype="bfloat16", param_dtype="bfloat16", attention_impl="cudnn", remat_policy="full"
    ),
    "bf16_save_proj": dict(
        dtype="bfloat16",
        param_dtype="bfloat16",
        attention_impl="cudnn",
        remat_policy="save_proj",
        scan_layers=True,
    ),
    "fast_chunked_ce": {
        **dict(dtype="bfloat16", attention_impl="cudnn", remat_policy="none"),
        "loss.chunk_tokens": 512,  # cross-entropy over 4 chunks of 512 positions
    },
    "xla_attn": dict(dtype="bfloat16", attention_impl="xla", remat_policy="none"),
    # the blockwise kernel in plain JAX (models/flash_attention.py), against cuDNN's and XLA's
    "flash_attn": dict(dtype="bfloat16", attention_impl="flash", remat_policy="none"),
    # `fast` with Muon for the layers' matrices (train/muon.py): Newton-Schulz's cost per step
    "fast_muon": {
        **dict(dtype="bfloat16", attention_impl="cudnn", remat_policy="none"),
        "opt.name": "muon",
    },
    "fast_muon_bf16": {  # ... with its Newton-Schulz iterations in bfloat16
        **dict(dtype="bfloat16", attention_impl="cudnn", remat_policy="none"),
        "opt.name": "muon",
        "opt.muon_dtype": "bfloat16",
    },
    "cpu": dict(),
    # a mixture of experts with no capacity limit (HF's computation, E/k× the expert work)
    "fast_dropless": dict(
        dtype="bfloat16", attention_impl="cudnn", remat_policy="none", moe_capacity_factor=0.0
    ),
}


def _flops(shape: str, seq: int):
    """(FLOPs per token, causal count, ModelConfig) of a shape (experts: active weights)."""
    from flaxlm.models.config import get_variant

    cfg = get_variant(SHAPES[shape][0], **SHAPE_MODEL.get(shape, {}))
    return cfg.flops_per_token(seq), cfg.flops_per_token(seq, causal=True), cfg


def _record(case, tokens, dt, steps, peak_gb, extra=None, device="cpu", devices=1):
    """A case's record: `tokens` per step over `devices` devices of kind `device`. MFU is
    against their summed dense bf16 peak (train/metrics.py's table); null where the table has
    none (a CPU: a datasheet figure means nothing there)."""
    from flaxlm.train.metrics import peak_flops_for_kind

    shape = case.split(":")[0]
    variant, batch, seq = SHAPES[shape]
    fpt, fpt_causal, cfg = _flops(shape, seq)
    tps = tokens * steps / dt
    peak = peak_flops_for_kind(device)
    rec = {
        "case": case,
        "tokens_per_s": tps,
        "tokens_per_s_per_device": tps / devices,
        "step_time_s": dt / steps,
        "mfu": tps * fpt / (peak * devices) if peak else None,
        "mfu_causal": tps * fpt_causal / (peak * devices) if peak else None,
        "peak_mem_gb": peak_gb,
        "batch": batch,
        "seq_len": seq,
        "params": cfg.param_counts()["total"],
        "device": device,
        "devices": devices,
        "peak_tflops": peak / 1e12 if peak else None,
    }
    rec.update(extra or {})
    return rec


# ----------------------------------------------------------------------------------------------
# flaxlm


def flax_case_config(case: str):
    """(pretrain config, ModelConfig, plan name, batch, seq) of a flaxlm case "SHAPE:flax[:PLAN]"
    (shared with bench/memory_plan.py, so the plan it sizes is the one that runs here)."""
    from flaxlm.configs import pretrain as pretrain_config
    from flaxlm.configs.common import to_model_config

    shape, _, plan = (case.split(":") + ["", ""])[:3]
    plan = plan or ("cpu" if shape.startswith("tiny") else "fast")
    if plan not in PLANS:
        raise ValueError(f"case {case!r}: unknown plan {plan!r}; plans: {', '.join(PLANS)}")
    variant, batch, seq = SHAPES[shape]
    config = pretrain_config.get_config(f"variant={variant},data=markov")
    with config.unlocked():
        for k, v in SHAPE_MODEL.get(shape, {}).items():
            config.model[k] = v
        for k, v in PLANS[plan].items():
            if k.startswith(("loss.", "opt.")):
                section, key = k.split(".", 1)
                config[section][key] = v
            else:
                config.model[k] = v
        if PLANS[plan].get("param_dtype") == "bfloat16":
            config.opt.mu_dtype = "bfloat16"
        config.opt.warmup_steps = 10
    return config, to_model_config(config.model), plan, batch, seq


def flax_train_program(case: str, devices) -> dict:
    """What a flaxlm case runs, before any array exists: its configs, mesh, rules, model init,
    optimizer, state shardings and the jitted train step, over `devices`. Shared with
    bench/gpu_aot.py, which compiles this same step for an H200 on a machine without one."""
    from flaxlm.models.sharding import logical_axis_rules, make_mesh
    from flaxlm.train.optim import make_optimizer
    from flaxlm.train.pretrain import lm_loss, model_fns
    from flaxlm.train.state import state_shardings
    from flaxlm.train.step import jit_train_step

    config, cfg, plan, batch, seq = flax_case_config(case)
    # Data parallel over as many devices as split the batch (all of them on a GPU host; the
    # CPU smoke test's 4 rows on 8 simulated devices use 4).
    n_dev = math.gcd(batch, len(devices))
    mesh = make_mesh({"data": n_dev}, devices=list(devices)[:n_dev])
    rules = logical_axis_rules("fsdp")
    init_params, apply = model_fns(cfg)
    tx, sched = make_optimizer(config.opt, 1000)
    shardings = state_shardings(init_params, tx, mesh, rules)
    loss_fn = lm_loss(apply, config.loss, moe=cfg.n_experts > 0)
    step = jit_train_step(loss_fn, tx, sched, config.guard, 1, shardings, mesh)
    return dict(config=config, cfg=cfg, plan=plan, batch=batch, seq=seq, mesh=mesh, rules=rules,
                init_params=init_params, tx=tx, shardings=shardings, step=step)  # fmt: skip


def run_flax(case: str, steps: int, warmup: int, profile: bool = False) -> dict:
    import jax
    import numpy as np

    from flaxlm.models.sharding import shard_batch, use_mesh
    from flaxlm.train.state import create_train_state

    prog = flax_train_program(case, jax.devices())
    cfg, plan, batch, seq = prog["cfg"], prog["plan"], prog["batch"], prog["seq"]
    mesh, rules, step = prog["mesh"], prog["rules"], prog["step"]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    host = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones((batch, seq), np.float32),
    }
    with use_mesh(mesh, rules):
        state, _ = create_train_state(prog["init_params"], prog["tx"], mesh, rules, seed=0)
        b = shard_batch(host, mesh)
        t_compile = time.perf_counter()
        for _ in range(warmup):
            state, m = step(state, b)
        jax.block_until_ready(m)
        t_compile = time.perf_counter() - t_compile
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, b)
        jax.block_until_ready(m)
        dt = time.perf_counter() - t0
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    extra = {"impl": "flaxlm", "plan": plan, "loss": float(m["loss"]), "warmup_s": t_compile,
             "jax": jax.__version__}  # fmt: skip
    if profile:  # after the timing and the memory reading, so neither sees the profiler
        from flaxlm.bench.trace_summary import profile_call

        def one_step():
            with use_mesh(mesh, rules):
                jax.block_until_ready(step(state, b))

        extra.update(profile_call(one_step))
    extra["devices_visible"] = len(jax.devices())  # the mesh may use fewer (gcd with batch)
    return _record(case, batch * seq, dt, steps, peak / 2**30 if peak else None, extra,
                   jax.devices()[0].device_kind, mesh.devices.size)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# HF transformers peer


def run_hf(case: str, steps: int, warmup: int) -> dict:
    import torch
    import transformers

    shape, impl, plan = (case.split(":") + ["", ""])[:3]
    variant, batch, seq = SHAPES[shape]
    _, _, cfg = _flops(shape, seq)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    sizes = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_expert_ if cfg.n_experts else cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=max(seq, 2048),
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        use_cache=False,
    )
    if cfg.n_experts:  # Mixtral, with its load-balancing loss as flaxlm trains with one
        hf_cfg = transformers.MixtralConfig(
            **sizes, num_local_experts=cfg.n_experts,
            num_experts_per_tok=cfg.n_experts_per_token, output_router_logits=True,
            router_aux_loss_coef=0.01, sliding_window=None,
        )  # fmt: skip
        model_cls = transformers.MixtralForCausalLM
    else:
        hf_cfg, model_cls = transformers.LlamaConfig(**sizes), transformers.LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(dev):
        model = model_cls(hf_cfg).to(dtype)
    if plan == "ckpt":
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=(dev == "cuda"))
    fwd = torch.compile(model) if impl == "hf-compile" else model
    x = torch.randint(0, cfg.vocab_size, (batch, seq), device=dev)

    def step():
        loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    t_compile = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    sync()
    t_compile = time.perf_counter() - t_compile
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
    return _record(
        case,
        batch * seq,
        dt,
        steps,
        peak,
        {
            "impl": impl,
            "plan": plan or "bf16",
            "loss": float(loss),
            "warmup_s": t_compile,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        devices=1,
    )


# ----------------------------------------------------------------------------------------------
# Driver


def run_case(case: str, steps: int, warmup: int) -> dict:
    impl = case.split(":")[1]
    if impl != "flax":
        try:
            return run_hf(case, steps, warmup)
        except ModuleNotFoundError as e:  # no torch here: the peer's case is skipped, not failed
            rec = driver.skip_record(case, e)
            if rec is None:
                raise
            return rec
    return run_flax(case, steps, warmup, profile="profile" in case.split(":")[3:])


def _peer(records, shape: str, impl: str, remat: bool):
    """The HF record to compare a flaxlm case with: same shape, same recompute plan if any."""
    cands = [r for r in records if "tokens_per_s" in r and r["case"].startswith(f"{shape}:{impl}")]
    same = [r for r in cands if (r["plan"] == "ckpt") == remat]
    return (same or cands or [None])[0]


def table(records: list[dict]) -> str:
    lines = [
        "| case | tokens/s | step (s) | MFU (PaLM) | MFU (causal) | peak GB |"
        " vs hf-eager (per device) | vs hf-compile (per device) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "tokens_per_s" not in r:
            why = f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r.get('error', '?')}"
            lines.append(f"| {r['case']} | {why[:110]} | | | | | | |")
            continue
        ratios = ["", ""]
        if r.get("impl") == "flaxlm":
            remat = PLANS[r["plan"]].get("remat_policy", "none") != "none"
            for i, impl in enumerate(("hf-eager", "hf-compile")):
                ref = _peer(records, r["case"].split(":")[0], impl, remat)
                if ref is not None:
                    ratios[i] = f"{_per_device(r) / _per_device(ref):.2f}x ({ref['case']})"
        mem = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") else "n/a"
        lines.append(
            f"| {r['case']} | {r['tokens_per_s']:,.0f} | {r['step_time_s']:.3f} | "
            f"{_pct(r.get('mfu'))} | {_pct(r.get('mfu_causal'))} | {mem} | {ratios[0]} | "
            f"{ratios[1]} |"
        )
    return "\n".join(lines)


def _per_device(r: dict) -> float:
    """Tokens/s per device (records from before "devices" was recorded ran on one)."""
    return r["tokens_per_s"] / r.get("devices", 1)


def _pct(x):
    return f"{x:.1%}" if x is not None else "n/a"


def markdown(path: str) -> str:
    """The table of the latest record of every case in OUT/train_throughput.jsonl (`path`)."""
    return table(driver.latest_records(path))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--cases", default="")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test on the tiny shape")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timeout", type=int, default=600, help="seconds per case")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # run a single case in-process
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "train_throughput.jsonl")
    if a.one:
        driver.run_one(path, a.one, lambda: run_case(a.one, a.steps, a.warmup))
        return
    cases = (
        a.cases.split(",")
        if a.cases
        else (
            ["tiny:flax", "tiny:hf-eager"]
            if a.tiny
            else [
                "1b:flax",
                "1b:hf-eager",
                "1b:hf-compile",
                "7b:flax:bf16_params",
                "7b:hf-eager:ckpt",
            ]
        )
    )
    for case in cases:
        cmd = [
            sys.executable,
            "-m",
            "flaxlm.bench.train_throughput",
            "--out",
            a.out,
            "--one",
            case,
            "--steps",
            str(a.steps),
            "--warmup",
            str(a.warmup),
        ]
        extra = case.split(":")[3:]
        if extra and case.split(":")[1] != "flax":
            raise SystemExit(f"case {case!r}: XLA flag sets are for flax cases only")
        env = driver.case_env(case, extra, allowed=("profile",))  # + driver.XLA_FLAG_SETS
        driver.run_case(cmd, case, path, a.timeout, env)
    md = markdown(path)
    driver.write_table(a.out, "train_throughput.md", md)
    print(md)
    driver.exit_if_failed(path, cases)


if __name__ == "__main__":
    main()
