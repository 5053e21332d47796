"""Reproduces the alignment results on the built-in world: PPO, DPO and GRPO, each started from
the same SFT model, each measured before and after training.

    python -m flaxlm.alignment.rl_check --chain /tmp/rlchain/slim --workdir /tmp/rlcheck
    python -m flaxlm.alignment.rl_check ... --only grpo            # one method
    python -m flaxlm.alignment.rl_check ... --only dpo_plain       # plain DPO (the "why" below)
    python -m flaxlm.alignment.rl_check --build_chain --chain /tmp/rlchain/slim   # the chain

The chain (`--build_chain`): "mini" model (4 layers, d=128) pretrained on the demo world's
corpus (2000 steps), SFT on its chat data (600 steps, a checkpoint every 100), a reward model on
its preference pairs from the final SFT (400 steps): the default configs of configs/pretrain.py,
sft.py and reward.py at variant=mini (about 3 minutes on one H200; hours on 2 CPU cores). The
runs are copied, params only, to CHAIN/{pt,sft100,sft300,sft600,rm}.

Start (`--sft`, default sft100 = the SFT run at step 100): the final SFT model is saturated on
the RL prompts — 97% of its samples are already right and its entropy is 0.005 nats/token, so
on-policy RL has nothing to sample; at step 100 it answers 80% right. The world's held-out
questions (`sft_heldout`: facts that SFT never asked about) are answered 27% right by both;
their errors are wrong facts (format is perfect), and a question's fact does not transfer to
another, which bounds what any method trained on other questions can do there.

Eval sets (greedy unless "sampled"; `rl_*` from the task's own prompt split, whole questions):
  rl_train     training prompts (a fixed sample);     rl_heldout   unseen RL questions
  sft_heldout  the world's held-out questions;        rl_prompts   the RL prompts (DPO: the
               questions its preference pairs ask, i.e. the trained distribution)
Checks (PASS/FAIL where required, "(reported)" otherwise; WORKDIR/results.json):
  PPO   reward-model score of rollouts and of greedy answers to held-out prompts rises; task
        accuracy on sft_heldout rises; per-sequence KL to the reference stays < KL_BOUND
  DPO   sigmoid DPO with the RPO term (dpo.sft_coef = 1): held-out preference accuracy and the
        task accuracy on rl_prompts rise. Plain DPO (`--only dpo_plain`) raises preference
        accuracy but lowers task accuracy: it meets its objective by pushing the rejected
        answers down (their log-prob falls by tens of nats) while the chosen answers' log-prob
        falls too (likelihood displacement), and the rejected answers are off-policy
        distractors, not the policy's own mistakes
  GRPO  exact-match accuracy on its training prompts rises (greedy and sampled); unseen
        questions are reported
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

from flaxlm.configs.common import override

KL_BOUND = 2.0  # nats per sequence
COMMON = {"progress_bar": False, "eval_at_start": True, "log_every": 4}


def ppo_config(chain: str, sft: str):
    from flaxlm.configs import ppo

    return override(ppo.get_config("variant=mini"), {
        **COMMON, "init_from": f"{chain}/{sft}", "reward_from": f"{chain}/rm",
        "total_steps": 96, "eval_every": 96, "batch_size": 16, "rollout.batch": 64,
        "rollout.epochs": 2, "opt.lr": 1e-4, "opt.warmup_steps": 4, "ppo.kl_coef": 0.05,
        "rollout.heldout_prompts": 200, "eval_gen.examples": 300,
    })  # fmt: skip


def dpo_config(chain: str, sft: str, sft_coef: float = 1.0, lr: float = 1e-4):
    """Sigmoid DPO with the RPO term (see alignment/dpo.py and the module docstring)."""
    from flaxlm.configs import dpo

    return override(dpo.get_config("variant=mini"), {
        **COMMON, "init_from": f"{chain}/{sft}", "total_steps": 60, "eval_every": 60,
        "batch_size": 16, "opt.lr": lr, "dpo.sft_coef": sft_coef, "eval_gen.examples": 300,
    })  # fmt: skip


def dpo_plain_config(chain: str, sft: str):
    """Plain sigmoid DPO, same run otherwise (the task metric falls: likelihood displacement)."""
    return dpo_config(chain, sft, sft_coef=0.0)


def grpo_config(chain: str, sft: str):
    from flaxlm.configs import grpo

    # 800 of the 1000 prompts (whole questions) held out: GRPO trains on ~200 prompts, each
    # seen ~2 times, and is evaluated on those (rl_train), on unseen questions of the same
    # kind (rl_heldout) and on the world's held-out questions (sft_heldout).
    return override(grpo.get_config("variant=mini"), {
        **COMMON, "init_from": f"{chain}/{sft}", "total_steps": 96, "eval_every": 96,
        "batch_size": 32, "rollout.batch": 128, "grpo.group_size": 8, "opt.lr": 3e-5,
        "opt.warmup_steps": 4, "rollout.heldout_prompts": 800, "eval_gen.examples": 300,
        "eval_gen.samples": 4, "eval_gen.sets": "builtin:sft_heldout",
    })  # fmt: skip


def _evals(workdir: str) -> tuple[dict, dict]:
    from flaxlm.train.metrics import read_metrics

    evals = [r for r in read_metrics(workdir) if any(k.startswith("eval/") for k in r)]
    return evals[0], evals[-1]


def _train(workdir: str) -> list[dict]:
    from flaxlm.train.metrics import read_metrics

    return [r for r in read_metrics(workdir) if "loss" in r]


def _check(name, before, after, ok, results, required=True):
    verdict = ("PASS" if ok else "FAIL") if required else "(reported)"
    print(f"  {name:<50} {before:7.3f} -> {after:7.3f}   {verdict}", flush=True)
    results.append({"check": name, "before": before, "after": after,
                    "pass": bool(ok) or not required, "required": required})  # fmt: skip


def _up(name, b, a, key, results, required=True):
    _check(name, b[key], a[key], a[key] > b[key], results, required)


def _rollout_means(recs, key, frac=0.25):
    """Mean of `key` over the first and the last quarter of the rollouts."""
    by_it = {}
    for r in recs:
        by_it.setdefault(r.get("rollout/iteration"), r[key])
    vals = [by_it[k] for k in sorted(by_it)]
    n = max(1, int(len(vals) * frac))
    return sum(vals[:n]) / n, sum(vals[-n:]) / n


def check_ppo(workdir, results):
    b, a = _evals(workdir)
    recs = _train(workdir)
    s0, s1 = _rollout_means(recs, "rollout/score_mean")
    _check("PPO reward-model score of rollouts (1st/last 1/4)", s0, s1, s1 > s0, results)
    for s in ("rl_heldout", "sft_heldout"):
        _up(f"PPO reward-model score, {s} (greedy)", b, a, f"eval/{s}/rm_score", results)
    _up("PPO task accuracy, sft_heldout (greedy)", b, a, "eval/sft_heldout/accuracy", results)
    for k in ("accuracy", "sampled_accuracy"):
        _up(f"PPO task {k}, rl_heldout", b, a, f"eval/rl_heldout/{k}", results, False)
    kl = recs[-1]["rollout/kl"]
    _check(f"PPO KL to the reference per sequence (< {KL_BOUND})", recs[0]["rollout/kl"], kl,
           0 <= kl < KL_BOUND, results)  # fmt: skip


def check_dpo(workdir, results):
    b, a = _evals(workdir)
    _up("DPO held-out preference accuracy (implicit reward)", b, a, "eval/accuracy", results)
    _up("DPO held-out preference accuracy (mean logp)", b, a, "eval/logp_accuracy", results, False)
    _up("DPO task accuracy, rl_prompts (greedy)", b, a, "eval/rl_prompts/accuracy", results)
    _up("DPO task accuracy, sft_heldout (greedy)", b, a, "eval/sft_heldout/accuracy", results,
        False)  # fmt: skip


def check_dpo_plain(workdir, results):
    b, a = _evals(workdir)
    _up("DPO (plain) held-out preference accuracy", b, a, "eval/accuracy", results)
    for k in ("rl_prompts", "sft_heldout"):
        _up(f"DPO (plain) task accuracy, {k}", b, a, f"eval/{k}/accuracy", results, False)
    recs = _train(workdir)
    _check("DPO (plain) log-prob of chosen answers (train)", recs[0]["logps/chosen"],
           recs[-1]["logps/chosen"], True, results, False)  # fmt: skip


def check_grpo(workdir, results):
    b, a = _evals(workdir)
    for k in ("accuracy", "sampled_accuracy"):
        _up(f"GRPO exact-match {k}, rl_train", b, a, f"eval/rl_train/{k}", results)
    for s in ("rl_heldout", "sft_heldout"):
        _up(f"GRPO exact-match accuracy, {s}", b, a, f"eval/{s}/accuracy", results, False)
    s0, s1 = _rollout_means(_train(workdir), "rollout/accuracy")
    _check("GRPO rollout accuracy (first/last 1/4)", s0, s1, s1 > s0, results, False)


METHODS = {
    "ppo": ("flaxlm.alignment.ppo", ppo_config, check_ppo),
    "dpo": ("flaxlm.alignment.dpo", dpo_config, check_dpo),
    "grpo": ("flaxlm.alignment.grpo", grpo_config, check_grpo),
    "dpo_plain": ("flaxlm.alignment.dpo", dpo_plain_config, check_dpo_plain),  # not by default
}


def build_chain(chain: str, scratch: str) -> None:
    """pretrain → SFT → reward model (variant=mini, demo world), then params-only copies."""
    main = [sys.executable, "-m", "flaxlm.train.main"]
    flags = ["--config.progress_bar=False"]
    steps = [
        ("pt", "configs/pretrain.py:variant=mini", ["--config.eval_every=1000"]),
        (
            "sft",
            "configs/sft.py:variant=mini",
            [
                f"--config.init_from={scratch}/pt",
                "--config.ckpt_every=100",
                "--config.keep_ckpts=10",
            ],
        ),  # fmt: skip
        ("rm", "configs/reward.py:variant=mini", [f"--config.init_from={scratch}/sft"]),
    ]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, cfg, extra in steps:
        cmd = [*main, "--config", os.path.join(repo, cfg), *flags, *extra,
               f"--workdir={scratch}/{name}"]  # fmt: skip
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    copies = [("pt", "pt", None), ("sft", "sft100", 100), ("sft", "sft300", 300),
              ("sft", "sft600", 600), ("rm", "rm", None)]  # fmt: skip
    for src, dst, step in copies:
        copy_params(f"{scratch}/{src}", f"{chain}/{dst}", step)


def copy_params(src: str, dst: str, step: int | None = None) -> None:
    """A run's params at `step` (no optimizer state), its meta and tokenizer, into `dst`."""
    import jax

    from flaxlm.alignment.run_tokenizer import save_tokenizer
    from flaxlm.models.config import ModelConfig
    from flaxlm.models.heads import scalar_model_fns
    from flaxlm.models.hf_tokenizer import load_tokenizer
    from flaxlm.train import checkpoint as ckpt_lib
    from flaxlm.train.pretrain import model_fns
    from flaxlm.train.state import unbox

    step, meta = ckpt_lib.read_meta(src, step)
    cfg = ModelConfig.from_dict(meta["model_config"])
    init = (scalar_model_fns if meta.get("head") == "scalar" else model_fns)(cfg)[0]
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
                          unbox(jax.eval_shape(init, jax.random.PRNGKey(0))))  # fmt: skip
    params = ckpt_lib.load_params(src, target, step)
    os.makedirs(dst, exist_ok=True)
    if meta.get("tokenizer"):  # SentencePiece or an HF tokenizer.json with its configs, by name
        meta["tokenizer"] = save_tokenizer(load_tokenizer(meta["tokenizer"]), dst)
    meta.pop("flaxlm_version", None)
    meta.pop("flaxlm_commit", None)
    ck = ckpt_lib.Checkpointer(dst, keep=1, async_save=False)
    ck.save(step, {"params": params}, {}, meta)
    ck.wait()
    ck.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chain", default="/tmp/rlchain/slim", help="folder of the chain's runs")
    ap.add_argument("--sft", default="sft100", help="SFT run (in --chain) every method starts from")
    ap.add_argument("--workdir", default="/tmp/rlcheck")
    ap.add_argument("--only", default="ppo,dpo,grpo")
    ap.add_argument("--seed", type=int, default=0, help="config.seed (rollouts, data order)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every method run (VALUE parsed as JSON if it can)",
    )
    ap.add_argument("--build_chain", action="store_true", help="build the chain first")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in METHODS]
    if unknown:  # before anything trains: a typo in the list stopped the run after the others
        ap.error(f"--only: unknown {unknown}; choose from {sorted(METHODS)}")
    logging.getLogger("flaxlm").setLevel(logging.WARNING)
    if args.build_chain:
        build_chain(args.chain, args.chain + "_runs")
    import importlib
    import shutil

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    results, t_all = {}, time.perf_counter()
    for name in names:
        module, make_config, check = METHODS[name]
        workdir = os.path.join(args.workdir, name)
        shutil.rmtree(workdir, ignore_errors=True)
        t0 = time.perf_counter()
        config = make_config(args.chain, args.sft)
        run_overrides = {"seed": args.seed, "ckpt_every": config.total_steps, **overrides}
        config = override(config, run_overrides)
        importlib.import_module(module).run(config, workdir)
        print(f"{name.upper()} ({time.perf_counter() - t0:.0f} s, {workdir})", flush=True)
        results[name] = []
        check(workdir, results[name])
    print(f"total {time.perf_counter() - t_all:.0f} s")
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0 if all(r["pass"] for rs in results.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
