"""GPUs for a sweep's local trainers: each run gets its own slice of the host's GPUs.

`python -m flaxlm.train.sweep ... --parallel 8 --gpus auto` trains eight runs at once on an
8-GPU host, one GPU each (`--gpus_per_run 2`: four runs, two GPUs each). The slice reaches the
trainer as CUDA_VISIBLE_DEVICES and comes back to the pool when the trainer exits. Without
`--gpus`, every trainer sees every GPU: XLA's client preallocates 75% of each visible GPU's
memory per process, so the second trainer of a parallel sweep runs out of memory, and the runs
that do start share chips they were never meant to.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence


def visible_gpus(spec: str) -> list[str]:
    """The GPU ids `--gpus` names: "" none; "auto" CUDA_VISIBLE_DEVICES when it is set, else
    the ids nvidia-smi lists; else a comma-separated list ("0,1,2,3")."""
    if not spec:
        return []
    if spec != "auto":
        ids = [g.strip() for g in spec.split(",") if g.strip()]
        if len(set(ids)) != len(ids):
            raise ValueError(f"--gpus {spec!r}: a GPU is named twice")
        return ids
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    ids = nvidia_smi_gpus()
    if not ids:
        raise ValueError("--gpus auto: CUDA_VISIBLE_DEVICES is unset and nvidia-smi lists no GPU")
    return ids


def nvidia_smi_gpus() -> list[str]:
    """The GPU indices nvidia-smi lists ([] without nvidia-smi or a driver). Asking jax would
    initialise its GPU client in the sweep process, which would then hold memory on every GPU."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


class GPUSlots:
    """Disjoint slices of `gpus`, `per_run` ids each, handed out and returned by the sweep."""

    def __init__(self, gpus: Sequence[str], per_run: int):
        if per_run < 1:
            raise ValueError(f"--gpus_per_run {per_run}: must be >= 1")
        if len(gpus) < per_run:
            raise ValueError(
                f"--gpus_per_run {per_run}, but --gpus gives {len(gpus)} GPU(s): {list(gpus)}"
            )
        # GPUs left over by an uneven split stay unused: a run with fewer would train another
        # global batch per device, or not fit.
        starts = range(0, len(gpus) - per_run + 1, per_run)
        self.free = [tuple(gpus[i : i + per_run]) for i in starts]
        self.size = len(self.free)

    def take(self) -> tuple[str, ...]:
        return self.free.pop(0)

    def give(self, gpus: tuple[str, ...]) -> None:
        self.free.append(gpus)
