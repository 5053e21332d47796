"""DPO, PPO and GRPO throughput: policy-training tokens/s, and where an RL iteration's time goes.

    python -m flaxlm.bench.alignment_throughput --out OUT [--cases 125m:dpo,125m:ppo,...]
    python -m flaxlm.bench.alignment_throughput --tiny --out OUT     # CPU smoke test

Each case runs the real task — `flaxlm.alignment.{dpo,ppo,grpo}.run` on the configs of
configs/{dpo,ppo,grpo}.py, through the one training loop — for a few steps in
a temp workdir, and reads its metrics.jsonl. The runs start from a throwaway chain written once
per shape (`--work`, shared by the cases of one invocation): an "SFT" run and a "reward-model"
run with random weights (bf16 checkpoints, the reward model's backbone = the LM's) and the
built-in world's tokenizer. A random policy rarely samples the stop token, so rollouts run to
(nearly) `max_new_tokens` tokens: a fixed, worst-case generation length. Each case
is its own subprocess and appends a JSON record to OUT/alignment_throughput.jsonl; the driver
rewrites OUT/alignment_throughput.md after every case from the latest record of each case.

Cases are "SHAPE:ALGO[:OPT...]":
  SHAPE  tiny (CPU smoke) | 125m | 1b (TinyLlama-1.1B layout)
  ALGO   dpo | ppo | grpo (groups of GRPO_GROUP samples, the built-in `format` reward; the
         rollout options and the time split are PPO's)
  OPT    dpo: "online" = reference log-probs computed every step (default: the config's
         "precompute", once for every pair before training, outside the timed steps);
         ppo, grpo: "gN" = N new tokens per response (default: SHAPES); "cN" = rollouts test
         "all stopped" every N tokens (rollout.check_every; default 1); rollouts decode
         with rollout.decode_attention "auto" (the Pallas decode-step kernel on CUDA GPUs),
         "pallas" = the kernel anywhere, "decode_xla" = XLA's attention;
         both: "loraN" = LoRA adapters of rank N (`lora.rank`, targets LORA_TARGETS) on the
         policy (and PPO's critic, whose head trains whole; the reference is then the policy's
         frozen base); "xla" = XLA attention instead of cuDNN (GPU); a name in bench/driver.py
         XLA_FLAG_SETS (e.g. "cmdbuf") runs the case under those XLA flags
Model: the shape's variant with vocab_size = the built-in tokenizer's (512 tiny, 2048 otherwise;
sampled ids must decode, and the world's corpus supports no 32k-piece tokenizer), so "125m" has
88M parameters and "1b" 0.98B (1.10B with its usual 32k vocab). On a GPU the model computes in
bf16 with cuDNN attention and fp32 master params (train_throughput's "fast" plan) and the
frozen reference / reward models are bf16 (`dpo.ref_dtype`, `rollout.frozen_dtype`); elsewhere
everything is float32 with XLA attention (the configs' defaults).

What is counted:
  DPO  tokens = chosen + rejected rows of the batch, padding included (B pairs · 2 · T, what the
       model computes on and what the loop's tokens/s counts); `nonpad_fraction` is the share
       that is real tokens. Step time = the loop's per-step wall time over the last `--steps`
       steps of 2·`--steps` (the first window holds the compilation). FLOPs per token: the
       policy's forward+backward, DESIGN.md's 6·N_matmul + 12·L·d_attn·T; with "online" plus the
       reference forward, one third of that. The precomputed reference is not in the step.
  PPO  one iteration = generate (one decoder call, `rollout.batch` prompts) → score (policy,
       reference, value and reward-model forwards over the rollout, then GAE) → train
       (`rollout.epochs` passes in `batch_size`-row minibatches, policy + value fwd+bwd), from
       the task's own `rollout/gen_s`, `rollout/score_s`, `rollout/train_s`; iteration 0
       (compilation) is excluded, and `--iters` iterations are averaged.
         gen_share            gen_s / (gen_s + score_s + train_s)
         other_s              the loop's wall time of the iteration minus those three: host
                              work no timer covers (decoding texts, building rows)
         rollout_tokens_per_s generated response tokens / gen_s
         train_tokens_per_s   epochs · rollout.batch · T / train_s (rows incl. padding)
       Rows are T = max_prompt_len + max_new_tokens wide (configs/ppo.py sets seq_len so),
       not cut to their longest (`rollout.trim_buckets=1`; the default cuts them, which saves
       compute this count would not see).
       Training FLOPs per token: policy + value, 6·N_matmul + 12·L·d_attn·T
       each, minus the value model's absent LM head (ppo.py's count); generation and scoring
       FLOPs are not counted.
  GRPO as PPO (score: policy and reference forwards; train: the policy alone), FLOPs of the
       policy only.
  LoRA ("loraN") the frozen bases get no weight gradients: 4·N_matmul instead of 6, adapters
       left out (ModelConfig.flops_per_token, the count the run's own MFU uses too).
  MFU  against the device's dense bf16 peak (flaxlm.train.metrics: 989 TFLOP/s H100/H200) ×
       devices, also with the causal count (attention halved); null where the peak is unknown
       (CPU). peak_mem_gb: the backend's peak_bytes_in_use, null where it reports none.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from flaxlm.bench import driver

# Shapes: variant, tokenizer vocab, DPO (pairs per batch, seq_len), PPO (rollout batch,
# minibatch, max prompt len, new tokens). DPO: configs/dpo.py's seq_len, fewer pairs than its
# 64 / 128 (a step that fits a short lease). PPO: configs/ppo.py's epochs (2), minibatch (64)
# and prompt cap (64); rollouts of 256 (1b's config: 512) and responses of 256 tokens rather
# than its 32, closer to RLHF practice (OpenRLHF's ~80% generation share is for long ones).
# LoRA cases ("loraN") adapt every projection, the usual choice for RL with LoRA.
LORA_TARGETS = "attn/(q|k|v|o)|mlp/(gate|up|down)"

SHAPES = {
    "tiny": dict(variant="tiny", vocab=512, dpo=(8, 128), ppo=(16, 8, 64, 16)),
    "125m": dict(variant="125m", vocab=2048, dpo=(16, 1024), ppo=(256, 64, 64, 256)),
    "1b": dict(variant="1b", vocab=2048, dpo=(8, 2048), ppo=(256, 64, 64, 256)),
}
GRPO_GROUP = 4  # GRPO cases: samples per prompt (rollout.batch / GRPO_GROUP prompts)
WORLD = "small"  # built-in world preset: 60 preference pairs, 30 RL prompts (content is moot)
GPU_PLAN = dict(dtype="bfloat16", attention_impl="cudnn", remat_policy="none")


# ----------------------------------------------------------------------------------------------
# The throwaway SFT / reward-model chain


def _random_params(init, seed: int):
    """bf16 params of `init`'s shapes: norm scales 1, every other weight N(0, 0.02²) — slices of
    one shared pool of normals at random offsets (no jitted init to compile, no 1e9 draws)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flaxlm.train.state import unbox

    rng = np.random.default_rng(seed)
    pool = 0.02 * rng.standard_normal(1 << 24, dtype=np.float32)

    def leaf(path, s):
        if path[-1].key == "scale":
            x = np.ones(s.shape, np.float32)
        else:  # a pool slice from a random offset, repeated if the leaf is larger
            x = np.resize(pool[rng.integers(len(pool) // 2) :], s.shape)
        return jax.device_put(x.astype(jnp.bfloat16))

    abstract = unbox(jax.eval_shape(init, jax.random.PRNGKey(0)))
    return jax.tree_util.tree_map_with_path(leaf, abstract)


def build_chain(root: str, shape: str, attention: str = "cudnn") -> tuple[str, str, dict]:
    """(sft_dir, rm_dir, ModelConfig overrides) under `root`, written on first use and then
    reused; the overrides (GPU_PLAN, with `attention`; none on other backends) are stored in
    the runs' model config, which the tasks take from `init_from`."""
    import jax
    import ml_collections

    from flaxlm.alignment import common
    from flaxlm.models.config import get_variant
    from flaxlm.models.heads import scalar_model_fns
    from flaxlm.train.checkpoint import Checkpointer
    from flaxlm.train.pretrain import model_fns

    s = SHAPES[shape]
    plan = {**GPU_PLAN, "attention_impl": attention} if jax.default_backend() == "gpu" else {}
    d = os.path.join(root, f"chain-{shape}-{plan.get('attention_impl', 'xla')}")
    sft, rm = os.path.join(d, "sft"), os.path.join(d, "rm")
    if os.path.exists(os.path.join(d, "DONE")):
        return sft, rm, plan
    c = ml_collections.ConfigDict({"data": common.data_config("", ""), "init_from": ""})
    c.data.world, c.data.builtin_vocab_size = WORLD, s["vocab"]
    c.data.cache_dir = os.path.join(d, "cache")
    tok = common.resolve_tokenizer(c, {})
    tok_path = os.path.join(d, "tokenizer.model")
    tok.save(tok_path)
    cfg = get_variant(s["variant"], vocab_size=tok.vocab_size, **plan)
    lm = _random_params(model_fns(cfg)[0], 0)
    head = _random_params(scalar_model_fns(cfg)[0], 1)
    head["transformer"] = {k: v for k, v in lm.items() if k != "lm_head"}
    meta = {"model_config": cfg.to_dict(), "tokenizer": tok_path, "lora": {}}
    for path, params, kind in ((sft, lm, "lm"), (rm, head, "scalar")):
        ck = Checkpointer(path, keep=1, async_save=False)
        ck.save(1, {"params": params}, {}, {**meta, "head": kind})
        ck.close()
    open(os.path.join(d, "DONE"), "w").close()
    return sft, rm, plan


# ----------------------------------------------------------------------------------------------
# One case, in this process


def _base(config_module, shape: str, sft: str, **overrides):
    from flaxlm.configs.common import override

    arg = "variant=tiny,runlocal=True" if shape == "tiny" else f"variant={SHAPES[shape]['variant']}"
    c = config_module.get_config(arg)
    return override(c, {"init_from": sft, "data.world": WORLD, "progress_bar": False,
                        "eval_every": 0, "eval_at_start": False, "ckpt_every": 0,
                        "opt.warmup_steps": 1, **overrides})  # fmt: skip


def _env(plan: dict) -> dict:
    import jax

    from flaxlm.train.metrics import peak_flops_per_device

    peak = peak_flops_per_device()
    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
            "peak_tflops": peak / 1e12 if peak else None, "plan": plan}  # fmt: skip


def _mfu(tps: float, fpt: float, env: dict):
    if not env["peak_tflops"]:
        return None
    return tps * fpt / (env["peak_tflops"] * 1e12 * env["devices"])


def _peak_mem(recs: list[dict]):
    mems = [r["peak_mem_gb"] for r in recs if r.get("peak_mem_gb") is not None]
    return max(mems) if mems else None


def _lora_overrides(rank: int) -> dict:
    return {"lora.rank": rank, "lora.targets": LORA_TARGETS} if rank else {}


def _policy_flops(cfg, seq: int, lora: int, causal: bool = False) -> float:
    """The policy's training FLOPs per token, the loop's own count (ModelConfig.flops_per_token):
    LoRA (rank > 0) skips the frozen base's weight gradients (4·N_matmul, not 6)."""
    return cfg.flops_per_token(seq, causal, frozen_base=bool(lora))


def _rl_flops(cfg, seq: int, lora: int, algo: str) -> tuple[float, float]:
    """(PaLM, causal) training FLOPs per token of a PPO step (policy + critic, ppo.py's count)
    or a GRPO one (the policy alone), as the task's own MFU counts them."""
    if algo == "ppo":
        from flaxlm.alignment.ppo import train_flops_per_token

        return train_flops_per_token(cfg, cfg, seq, bool(lora))  # the critic's backbone = cfg
    return _policy_flops(cfg, seq, lora), _policy_flops(cfg, seq, lora, causal=True)


def run_dpo(shape: str, online: bool, steps: int, sft: str, plan: dict, workdir: str,
            lora: int = 0) -> dict:  # fmt: skip
    from flaxlm.alignment import common, dpo
    from flaxlm.alignment.reward import load_pairs
    from flaxlm.configs import dpo as dpo_config
    from flaxlm.data import formats as F
    from flaxlm.models.config import ModelConfig
    from flaxlm.train.metrics import read_metrics

    batch, seq = SHAPES[shape]["dpo"]
    config = _base(dpo_config, shape, sft, **{
        "batch_size": batch, "seq_len": seq, "total_steps": 2 * steps, "log_every": steps,
        "dpo.ref_logps": "online" if online else "precompute",
        "dpo.ref_dtype": "bfloat16" if plan else "float32", **_lora_overrides(lora),
    })  # fmt: skip
    dpo.run(config, workdir)
    recs = [r for r in read_metrics(workdir) if "loss" in r]
    timed = recs[-1]  # the second window: `steps` steps after the compiling first one
    meta = common.source_meta(sft)
    cfg = ModelConfig.from_dict(meta["model_config"])
    tok = common.resolve_tokenizer(config, meta)
    pairs = load_pairs(config.data.train, config, F.training_template(tok), F.DataReport())
    real = sum(len(p["chosen"][0]) + len(p["rejected"][0]) for p in pairs) / (2 * len(pairs))
    tokens = 2 * batch * seq
    tps = tokens / timed["step_time_s"]
    fpt, fpt_c = _policy_flops(cfg, seq, lora), _policy_flops(cfg, seq, lora, causal=True)
    if online:  # + the reference's forward pass: a third of a full forward+backward
        fpt += cfg.flops_per_token(seq) / 3
        fpt_c += cfg.flops_per_token(seq, causal=True) / 3
    env = _env(plan)
    return {
        "algo": "dpo", "ref_logps": config.dpo.ref_logps, "variant": SHAPES[shape]["variant"],
        "lora_rank": lora,
        "params": cfg.param_counts()["total"], "vocab": cfg.vocab_size, "batch_pairs": batch,
        "seq_len": seq, "tokens_per_step": tokens, "step_time_s": timed["step_time_s"],
        "tokens_per_s": tps, "pairs_per_s": batch / timed["step_time_s"],
        "nonpad_fraction": real / seq, "flops_per_token": fpt,
        "mfu": _mfu(tps, fpt, env), "mfu_causal": _mfu(tps, fpt_c, env),
        "peak_mem_gb": _peak_mem(recs), "timed_steps": steps,
        # the first window: its compiling first step (logged apart) + the rest at their rate
        "warmup_s": recs[0].get("first_step_s", 0.0)
        + (recs[0]["step_time_s"] or 0.0) * (steps - 1), "loss": timed["loss"], **env,
    }  # fmt: skip


def run_ppo(shape: str, new: int | None, iters: int, sft: str, rm: str, plan: dict,
            workdir: str, check_every: int = 1, decode_attention: str = "auto",
            lora: int = 0, algo: str = "ppo") -> dict:  # fmt: skip
    """A PPO case, or (`algo="grpo"`) a GRPO one: the same rollout / score / train split, with
    groups of GRPO_GROUP samples per prompt rewarded by the built-in `format` function."""
    import importlib

    import numpy as np

    from flaxlm.alignment import common
    from flaxlm.configs.common import override
    from flaxlm.models.config import ModelConfig
    from flaxlm.train.metrics import read_metrics

    task = importlib.import_module(f"flaxlm.alignment.{algo}")
    rbatch, mbatch, prompt, default_new = SHAPES[shape]["ppo"]
    new = new or default_new
    only = {"reward_from": rm} if algo == "ppo" else {
        "grpo.group_size": GRPO_GROUP, "grpo.rewards": "format"}  # fmt: skip
    config = _base(importlib.import_module(f"flaxlm.configs.{algo}"), shape, sft, **{
        "batch_size": mbatch, "seq_len": prompt + new,
        "rollout.batch": rbatch, "rollout.max_prompt_len": prompt, "rollout.max_new_tokens": new,
        "rollout.heldout_prompts": 0, "rollout.frozen_dtype": "bfloat16" if plan else "float32",
        "rollout.check_every": check_every, "rollout.decode_attention": decode_attention,
        # Full-width rows (no `rollout.trim_buckets`): the FLOP count and train tokens/s below
        # are of T-wide rows, what the hardware computes then.
        "rollout.trim_buckets": 1,
        **only, **_lora_overrides(lora),
    })  # fmt: skip
    epochs = config.rollout.epochs
    n = epochs * rbatch // mbatch  # optimizer steps per iteration
    # Iteration 0 compiles; 1..iters are timed; one step of iteration iters+1 reports the train
    # time of iteration `iters` (rollout/train_s is logged with the *next* rollout).
    override(config, {"total_steps": (iters + 1) * n + 1, "log_every": n})
    try:
        task.run(config, workdir)
    except RuntimeError as e:  # (the guard's stop: say where the non-finite values began)
        raise RuntimeError(f"{e}; logged: {failure_details(workdir)}") from e
    recs = [r for r in read_metrics(workdir) if "rollout/iteration" in r]
    by_it = {int(round(r["rollout/iteration"])): r for r in recs}
    its = list(range(1, iters + 1))
    gen = np.mean([by_it[i]["rollout/gen_s"] for i in its])
    score = np.mean([by_it[i]["rollout/score_s"] for i in its])
    train = np.mean([by_it[i + 1]["rollout/train_s"] for i in its])
    resp = np.mean([by_it[i]["rollout/response_len"] for i in its])
    # the loop's window = 1 iteration: its steps, and the rollout before them (left out of
    # step_time_s, logged as before_step_s)
    wall = np.mean([by_it[i]["step_time_s"] * n + by_it[i].get("before_step_s", 0.0)
                    for i in its])  # fmt: skip
    cfg = ModelConfig.from_dict(common.source_meta(sft)["model_config"])
    T = prompt + new
    fpt, fpt_c = _rl_flops(cfg, T, lora, algo)
    total = gen + score + train
    train_tps = epochs * rbatch * T / train
    env = _env(plan)
    return {
        "algo": algo, "variant": SHAPES[shape]["variant"],
        "group_size": GRPO_GROUP if algo == "grpo" else None,
        "params": cfg.param_counts()["total"], "vocab": cfg.vocab_size, "rollout_batch": rbatch,
        "minibatch": mbatch, "epochs": epochs, "steps_per_iter": n, "max_prompt_len": prompt,
        "max_new_tokens": new, "seq_len": T, "response_len": float(resp), "timed_iters": iters,
        "check_every": check_every, "decode_attention": decode_attention, "lora_rank": lora,
        "gen_s": float(gen), "score_s": float(score), "train_s": float(train),
        "iteration_s": float(total), "iteration_wall_s": float(wall),
        "other_s": float(wall - total), "gen_share": float(gen / total),
        "score_share": float(score / total), "train_share": float(train / total),
        "rollout_tokens_per_s": float(rbatch * resp / gen),
        "train_tokens_per_s": float(train_tps), "tokens_per_s": float(train_tps),
        "step_time_s": float(train / n), "flops_per_token": fpt,
        "mfu": _mfu(train_tps, fpt, env), "mfu_causal": _mfu(train_tps, fpt_c, env),
        "peak_mem_gb": _peak_mem(recs), "warmup_iter_s": float(
            by_it[0]["rollout/gen_s"] + by_it[0]["rollout/score_s"] + by_it[1]["rollout/train_s"]),
        **env,
    }  # fmt: skip


# What a failed RL case's record shows of each logged row besides its non-finite values: where
# a NaN entered (the reward model's scores, the KL to the reference, the decoder against the
# scoring forward, the losses).
DIAGNOSTIC_KEYS = ("rollout/score_mean", "rollout/reward_mean", "rollout/kl",
                   "rollout/logprob_gap", "rollout/response_len", "rollout/explained_var",
                   "skipped_loss", "skipped_grad_norm", "pg_loss", "vf_loss",
                   "grad_norm")  # fmt: skip


def failure_details(workdir: str) -> str:
    """The rows a failed run logged, compact: each row's step, its non-finite values by key and
    the DIAGNOSTIC_KEYS it has (the 2026-12-04 lease's PPO cases stopped at step 8 with
    "8 bad steps in a row" and nothing else to go on)."""
    import json
    import math

    from flaxlm.train.metrics import read_metrics

    try:
        rows = read_metrics(workdir)
    except (OSError, ValueError) as e:
        return f"no metrics ({type(e).__name__}: {e})"
    out = []
    for r in rows:
        bad = sorted(k for k, v in r.items() if isinstance(v, float) and not math.isfinite(v))
        keep = {k: r[k] for k in DIAGNOSTIC_KEYS if k in r and k not in bad}
        out.append({"step": r.get("step"), "nonfinite": bad, **keep})
    return json.dumps(out) if out else "no rows"


def parse_case(case: str) -> tuple[str, str, dict]:
    """(shape, algo, {"online", "new", "attention", "check_every", "decode_attention",
    "flags"}) of a case "SHAPE:ALGO[:OPT...]"."""
    parts = case.split(":")
    shape, algo, opts = parts[0], (parts[1:2] or [""])[0], parts[2:]
    if shape not in SHAPES or algo not in ("dpo", "ppo", "grpo"):
        raise ValueError(
            f"case {case!r}: expected SHAPE:dpo|ppo|grpo[:OPT], SHAPE in {list(SHAPES)}"
        )
    rl = algo in ("ppo", "grpo")  # the rollout options
    out = {"online": False, "new": None, "attention": "cudnn", "check_every": 1,
           "decode_attention": "auto", "lora": 0, "flags": []}  # fmt: skip
    for o in opts:
        if o in driver.XLA_FLAG_SETS:  # applied by the driver to the case's process
            out["flags"].append(o)
        elif o == "xla":
            out["attention"] = "xla"
        elif o[:4] == "lora" and o[4:].isdigit() and int(o[4:]) > 0:
            out["lora"] = int(o[4:])
        elif o in ("pallas", "decode_xla") and rl:
            out["decode_attention"] = o.removeprefix("decode_")
        elif o[:1] == "c" and o[1:].isdigit() and rl:
            out["check_every"] = int(o[1:])
        elif o == "online" and algo == "dpo":
            out["online"] = True
        elif o[:1] == "g" and o[1:].isdigit() and rl:
            out["new"] = int(o[1:])
        else:
            raise ValueError(f"case {case!r}: unknown option {o!r} for {algo}")
    return shape, algo, out


def run_case(case: str, work: str, steps: int, iters: int) -> dict:
    """The record of one case (module docstring), run in this process; `work` holds the chain
    (reused across calls) and the run's workdir (removed)."""
    shape, algo, o = parse_case(case)
    t0 = time.perf_counter()
    sft, rm, plan = build_chain(work, shape, o["attention"])
    setup = time.perf_counter() - t0
    workdir = tempfile.mkdtemp(prefix=f"{algo}-", dir=work)
    try:
        if algo == "dpo":
            rec = run_dpo(shape, o["online"], steps, sft, plan, workdir, o["lora"])
        else:
            rec = run_ppo(shape, o["new"], iters, sft, rm, plan, workdir, o["check_every"],
                          o["decode_attention"], o["lora"], algo)  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"case": case, **rec, "setup_s": setup, "case_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------
# Driver


def _pct(x):
    return f"{x:.1%}" if x is not None else "n/a"


def table(records: list[dict]) -> str:
    lines = [
        "| case | train tokens/s | step (s) | MFU PaLM (causal) | gen share | gen / score / train"
        " (+other) s per iter | rollout tok/s | peak GB | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['case']} | failed: {r.get('error', '?')[:120]} | | | | | | | |")
            continue
        mem = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") else "n/a"
        mfu = f"{_pct(r['mfu'])} ({_pct(r['mfu_causal'])})"
        if r["algo"] == "dpo":
            split, share, roll = "", "", ""
            notes = (f"{r['batch_pairs']} pairs × 2 × {r['seq_len']}, ref {r['ref_logps']}, "
                     f"{r['nonpad_fraction']:.0%} non-pad")  # fmt: skip
        else:
            split = (f"{r['gen_s']:.3f} / {r['score_s']:.3f} / {r['train_s']:.3f} "
                     f"(+{max(r['other_s'], 0):.3f})")  # fmt: skip
            share, roll = _pct(r["gen_share"]), f"{r['rollout_tokens_per_s']:,.0f}"
            mb = r["steps_per_iter"] // r["epochs"]
            notes = (f"{r['rollout_batch']} × ({r['max_prompt_len']}+{r['max_new_tokens']}), "
                     f"{r['epochs']} epochs × {mb} minibatches")  # fmt: skip
            if r.get("group_size"):
                notes += f", groups of {r['group_size']}"
        if r.get("lora_rank"):
            notes += f", LoRA rank {r['lora_rank']} (FLOPs: no base weight gradients)"
        lines.append(
            f"| {r['case']} | {r['tokens_per_s']:,.0f} | {r['step_time_s']:.3f} | {mfu} | "
            f"{share} | {split} | {roll} | {mem} | {notes} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--cases", default="", help="comma list of SHAPE:dpo|ppo|grpo[:OPT]")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test on the tiny shape")
    p.add_argument("--steps", type=int, default=0, help="timed DPO steps (default 10; tiny 3)")
    p.add_argument("--iters", type=int, default=0, help="timed PPO iterations (default 2; tiny 1)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per case")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # run a single case in-process
    p.add_argument("--work", default="", help=argparse.SUPPRESS)  # where the chain lives
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "alignment_throughput.jsonl")
    steps, iters = a.steps or (3 if a.tiny else 10), a.iters or (1 if a.tiny else 2)
    if a.one:
        work = a.work or tempfile.mkdtemp(prefix="flaxlm-align-bench-")
        try:
            driver.run_one(path, a.one, lambda: run_case(a.one, work, steps, iters))
        finally:
            if not a.work:
                shutil.rmtree(work, ignore_errors=True)
        return
    cases = a.cases.split(",") if a.cases else (
        ["tiny:dpo", "tiny:ppo"] if a.tiny else ["125m:dpo", "125m:ppo"])  # fmt: skip
    work = tempfile.mkdtemp(prefix="flaxlm-align-bench-")
    try:
        for case in cases:
            cmd = [sys.executable, "-m", "flaxlm.bench.alignment_throughput", "--out", a.out,
                   "--one", case, "--work", work, "--steps", str(steps),
                   "--iters", str(iters)]  # fmt: skip
            env = driver.case_env(case, parse_case(case)[2]["flags"])
            driver.run_case(cmd, case, path, a.timeout, env)
            md = markdown(path)  # after every case: a run cut short
            driver.write_table(a.out, "alignment_throughput.md", md)  # keeps its table
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(md)
    driver.exit_if_failed(path, cases)


def markdown(path: str) -> str:
    """The table of the latest record of every case in OUT/alignment_throughput.jsonl."""
    return table(driver.latest_records(path))


if __name__ == "__main__":
    main()
