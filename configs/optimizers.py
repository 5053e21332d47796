"""Optimizer comparison: pretraining (configs/pretrain.py, same args) under AdamW and Muon,
each over five learning rates from the variant's (a third of it, then ×3 up to 27 times it).

    python -m flaxlm.train.sweep --config configs/optimizers.py:variant=mini,runlocal=True \
        --workdir runs/optimizers

Muon (train/muon.py) scales its matrix updates to AdamW's typical RMS, so one learning-rate grid
serves both; the run table (ROOT/runs.csv) sets their final eval losses side by side.
"""

from __future__ import annotations

from flaxlm.configs import pretrain


def get_config(arg: str | None = None):
    return pretrain.get_config(arg)


def sweep(add, arg=None):
    lr = get_config(arg).opt.lr
    for name in ("adamw", "muon"):
        for run_lr in (lr / 3, lr, 3 * lr, 9 * lr, 27 * lr):
            add(**{"opt.name": name, "opt.lr": float(f"{run_lr:.3g}")})
