"""Measures what SFT and the reward model buy on the built-in world, end to end, on a CPU.

    python -m flaxlm.alignment.check [--workdir runs/alignment_check] [--variant tiny]

1. pretrains a small model on the built-in world's corpus (configs/pretrain.py, text data);
2. SFT from it (configs/sft.py): held-out instruction accuracy — greedy answers to
   `sft_heldout` questions (people/attributes, sums, words never seen in SFT) and
   `heldout_facts` (people who appear only in pretraining), scored by the world's judge (exact
   "The answer is X.") — at step 0 (the pretrained model) and after SFT;
3. a reward model from the SFT run (configs/reward.py): held-out pairwise accuracy on
   `preferences_heldout` at step 0 (random head) and after training, per pair kind.

Prints a table and writes `results.json` in the workdir. Re-running reuses finished stages
(the loop resumes from their last checkpoints, so nothing is retrained).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from flaxlm.alignment import reward, sft
from flaxlm.configs import pretrain as pretrain_config
from flaxlm.configs import reward as reward_config
from flaxlm.configs import sft as sft_config
from flaxlm.configs.common import override
from flaxlm.train import pretrain
from flaxlm.train.checkpoint_read import run_steps
from flaxlm.train.metrics import read_metrics

# Per variant: (pretrain steps, pretrain lr, sft steps, rm steps). tiny fits a 2-core CPU in
# about 5 minutes (idle); mini and small are larger plans for an accelerator (not measured yet).
PLANS = {
    "tiny": (600, 3e-3, 200, 100),
    "mini": (1200, 2e-3, 300, 150),
    "small": (1500, 1e-3, 300, 150),
}


def _evals(workdir: str) -> list[dict]:
    return [r for r in read_metrics(workdir) if any(k.startswith("eval/") for k in r)]


def run_stages(workdir: str, variant: str, batch: int) -> dict:
    pt_steps, pt_lr, sft_steps, rm_steps = PLANS[variant]
    lr = min(1e-3, pt_lr / 2)  # fine-tuning lr (SFT and reward model)
    dirs = {k: os.path.join(workdir, k) for k in ("pretrain", "sft", "reward")}
    common = {"progress_bar": False, "log_every": 50, "async_ckpt": False}
    times = {}
    # A re-run reuses finished stages (each resumes at its last step): their times are those
    # of the run that trained them, from its results.json, not the second it took to find so.
    try:
        with open(os.path.join(workdir, "results.json")) as f:
            before = json.load(f).get("times", {})
    except (OSError, ValueError):
        before = {}

    def timed(stage: str, steps: int, train, config) -> None:
        finished = run_steps(dirs[stage])[:1] == [steps]
        t = time.perf_counter()
        train(config, dirs[stage])
        key = f"{stage}_s"
        times[key] = before[key] if finished and key in before else time.perf_counter() - t

    c = pretrain_config.get_config(f"variant={variant},data=text")
    override(c, {**common, "total_steps": pt_steps, "batch_size": batch, "seq_len": 128,
                 "eval_every": pt_steps, "ckpt_every": pt_steps, "eval_at_start": False,
                 "opt.lr": pt_lr, "opt.warmup_steps": pt_steps // 20})  # fmt: skip
    timed("pretrain", pt_steps, pretrain.run, c)

    c = sft_config.get_config(f"variant={variant}")
    override(c, {**common, "total_steps": sft_steps, "batch_size": batch, "seq_len": 128,
                 "eval_every": sft_steps, "ckpt_every": sft_steps, "init_from": dirs["pretrain"],
                 "eval_gen.examples": 200, "eval_gen.batch": 100, "eval_gen.max_new_tokens": 16,
                 "opt.lr": lr, "opt.warmup_steps": 10})  # fmt: skip
    timed("sft", sft_steps, sft.run, c)

    c = reward_config.get_config(f"variant={variant}")
    override(c, {**common, "total_steps": rm_steps, "batch_size": batch, "seq_len": 128,
                 "eval_every": rm_steps, "ckpt_every": rm_steps, "init_from": dirs["sft"],
                 "opt.lr": lr, "opt.warmup_steps": 10})  # fmt: skip
    timed("reward", rm_steps, reward.run, c)

    pt = _evals(dirs["pretrain"])[-1]
    s0, s1 = _evals(dirs["sft"])[0], _evals(dirs["sft"])[-1]
    r0, r1 = _evals(dirs["reward"])[0], _evals(dirs["reward"])[-1]
    return {"variant": variant, "times": times, "pretrain": pt, "sft_start": s0, "sft_end": s1,
            "reward_start": r0, "reward_end": r1}  # fmt: skip


def report(res: dict) -> str:
    s0, s1, r0, r1 = res["sft_start"], res["sft_end"], res["reward_start"], res["reward_end"]
    lines = [
        f"variant {res['variant']}; pretrain held-out nll {res['pretrain']['eval/nll']:.3f}; "
        + ", ".join(f"{k} {v:.0f}" for k, v in res["times"].items()),
        f"{'metric':42s} {'pretrained':>10s} {'after SFT':>10s}",
    ]
    keys = sorted(k for k in s1 if k.startswith("eval/") and "/" in k[5:] or k == "eval/nll")
    for k in keys:
        if k in s0:
            lines.append(f"{k:42s} {s0[k]:10.3f} {s1[k]:10.3f}")
    lines.append(f"{'reward model (held-out pairs)':42s} {'step 0':>10s} {'trained':>10s}")
    for k in sorted(k for k in r1 if k.startswith("eval/") and k != "eval/time_s"):
        lines.append(f"{k:42s} {r0.get(k, float('nan')):10.3f} {r1[k]:10.3f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="runs/alignment_check")
    parser.add_argument("--variant", default="tiny", choices=sorted(PLANS))
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    logging.getLogger("flaxlm").setLevel(logging.INFO)
    workdir = os.path.abspath(args.workdir)
    res = run_stages(workdir, args.variant, args.batch)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(report(res))


if __name__ == "__main__":
    main()
