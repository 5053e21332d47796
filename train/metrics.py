"""Metric writers (metrics.jsonl + TensorBoard), throughput and MFU.

`metrics.jsonl` has one JSON object per logged step (`step`, `loss`, `lr`, `grad_norm`,
`tokens_per_s` of the whole job, `mfu`, ... and `eval/...` keys at eval steps). Only process 0
writes.

MFU = achieved model FLOP/s ÷ (peak FLOP/s per chip × chips), with model FLOPs per token from
`ModelConfig.flops_per_token` (PaLM count: 6·N_matmul + 12·L·d_attn·T; `mfu_causal` halves the
attention term). Peaks are dense bf16 datasheet figures; on an unknown device (a CPU) MFU is
null unless `peak_tflops` is configured.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np

# Dense bf16 peak TFLOP/s per chip, by substring of jax's device_kind.
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6": 918.0,
}


def peak_flops_per_device(override_tflops: float = 0.0) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return tflops * 1e12
    return None


def tokens_in_batch(batch) -> int:
    """Tokens the model processes for a batch: every `tokens` / `*_tokens` array."""
    return int(sum(np.size(v) for k, v in batch.items() if k == "tokens" or k.endswith("_tokens")))


class Throughput:
    """Tokens/s and MFU over the interval between two `measure` calls, for the whole job.

    `add` gets this process's batch slice (the loop feeds per-process slices, all of one size),
    so the job's rate is this process's × the process count; MFU divides that by the peak of
    every chip in the job.
    """

    def __init__(
        self,
        flops_per_token: float = 0.0,
        flops_per_token_causal: float = 0.0,
        peak_tflops: float = 0.0,
    ):
        self.flops, self.flops_causal = flops_per_token, flops_per_token_causal
        self.peak = peak_flops_per_device(peak_tflops)
        self.n_devices = jax.device_count()
        self.n_processes = jax.process_count()
        self.reset()

    def reset(self):
        self.t0, self.tokens, self.steps = time.perf_counter(), 0, 0

    def add(self, tokens: int):
        self.tokens += tokens
        self.steps += 1

    def measure(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tps = self.tokens * self.n_processes / dt
        out = {"tokens_per_s": tps, "step_time_s": dt / max(self.steps, 1), "mfu": None}
        if self.peak and self.flops:
            out["mfu"] = tps * self.flops / (self.peak * self.n_devices)
            out["mfu_causal"] = tps * self.flops_causal / (self.peak * self.n_devices)
        self.reset()
        return out


def peak_memory_gb() -> float | None:
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # CPU backends may not implement memory_stats
        return None
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def _clean(v):
    if isinstance(v, (np.generic, np.ndarray)):
        v = v.item() if np.size(v) == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep them visible as strings
    return v


class MetricWriter:
    """Appends to WORKDIR/metrics.jsonl and writes TensorBoard events (process 0 only)."""

    def __init__(self, workdir: str, resume_step: int | None = None, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._truncate_after(resume_step)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tb"))

    def _truncate_after(self, step: int | None):
        """A resumed run drops lines logged after its checkpoint (they will be redone), so
        metrics.jsonl always reads like one uninterrupted run."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        keep = []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if step is not None and rec.get("step", 0) <= step:
                keep.append(json.dumps(rec) + "\n")
        with open(self.path, "w") as f:
            f.writelines(keep)

    def write(self, step: int, metrics: dict):
        if not self.active:
            return
        rec = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


def read_metrics(workdir_or_file: str) -> list[dict]:
    """All records of a run's metrics.jsonl (for notebooks, reports and tests). A line that is
    not JSON (cut short by a killed trainer, or being written) is skipped."""
    path = workdir_or_file
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    out = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a killed run resumes by truncating it (MetricWriter._truncate_after)
    return out
