"""`make demo`: the recipe end to end on built-in data, on a laptop CPU.

Stage 1 today: pretraining a tiny Llama-style model on the built-in synthetic stream. Later
stages (data cleaning, tokenizer, SFT, reward model, PPO/DPO, evaluation) join as they land.
"""

from __future__ import annotations

import argparse
import os

from flaxlm.configs import pretrain as pretrain_config
from flaxlm.train import pretrain
from flaxlm.train.metrics import read_metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="runs/demo")
    args = parser.parse_args(argv)
    workdir = os.path.abspath(args.workdir)
    config = pretrain_config.get_config("variant=tiny,runlocal=True")
    _, summary = pretrain.run(config, os.path.join(workdir, "pretrain"))
    recs = [r for r in read_metrics(os.path.join(workdir, "pretrain")) if "eval/nll" in r]
    print("\nheld-out loss during pretraining:")
    for r in recs:
        print(f"  step {r['step']:5d}  nll {r['eval/nll']:.4f}  ppl {r['eval/perplexity']:.2f}")
    print(f"\noutputs: {workdir}/pretrain (metrics.jsonl, tb/, checkpoints/)")


if __name__ == "__main__":
    main()
