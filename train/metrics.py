"""Metric writers (metrics.jsonl + TensorBoard), throughput and MFU.

`metrics.jsonl` has one JSON object per logged step (`step`, `loss`, `lr`, `grad_norm`,
`tokens_per_s` of the whole job, `mfu`, ... and `eval/...` keys at eval steps) of the run as it
finally went, and one at each checkpoint saved between log steps (`"cut_at_checkpoint": true`,
the steps since the line before: train/loop.py), so every checkpoint ends on a line and a resume
or rollback to it leaves no step out of the file. Steps a guard rollback or a resume trains
again have their earlier lines moved to `metrics.superseded.jsonl` (tagged with the event and
why), and `events.jsonl` records each resume, rollback and early stop. Only process 0 writes.

MFU = achieved model FLOP/s ÷ (peak FLOP/s per chip × chips), with model FLOPs per token from
`ModelConfig.flops_per_token` (PaLM count: 6·N_matmul + 12·L·d_attn·T, a sliding-window layer's
T capped at its window; `mfu_causal` halves the attention term). Peaks are dense bf16 datasheet
figures; on an unknown device (a CPU) MFU is null unless `peak_tflops` is configured.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
import warnings

import jax
import numpy as np

# Dense bf16 peak TFLOP/s per chip, by substring of jax's device_kind, first match wins: the
# PCIe and NVL cards come before the generic SXM names they contain. NVIDIA's datasheets quote
# bf16 "with sparsity", twice the dense rate: H100 SXM 1,979 → 989; H100 PCIe (and H800 PCIe)
# 1,513 → 756; H100 NVL and H200 NVL 1,671 → 835 (H100 / H200 Tensor Core GPU datasheets).
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H800 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200 NVL": 835.0,
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


def peak_flops_for_kind(kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of a device named `kind` (jax's device_kind, or torch's
    get_device_name: "NVIDIA H100 PCIe"); None when the table has no entry (a CPU)."""
    for name, tflops in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return tflops * 1e12
    return None


def peak_flops_per_device(override_tflops: float = 0.0) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    return peak_flops_for_kind(jax.devices()[0].device_kind)


def tokens_in_batch(batch) -> int:
    """Tokens the model processes for a batch: every `tokens` / `*_tokens` array."""
    return int(sum(np.size(v) for k, v in batch.items() if k == "tokens" or k.endswith("_tokens")))


class Throughput:
    """Tokens/s and MFU over the interval between two `measure` calls, for the whole job.

    `add` gets this process's batch slice (the loop feeds per-process slices, all of one size),
    so the job's rate is this process's × the process count; MFU divides that by the peak of
    every chip in the job.

    The rate is of training steps only: the loop calls `skip` after what is not one — the
    first step of a run or resume (startup, restore and compilation: its seconds are logged
    once as `first_step_s`), an evaluation, a checkpoint save, a rollback's restore — which
    drops the interval so far, its tokens and its time; and `exclude` for a task's
    `before_step` work between steps (PPO/GRPO's rollouts: `before_step_s`). A log line whose
    interval holds no step after such a skip (log_every=1 at the first step) has tokens_per_s,
    step_time_s and mfu null.
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
        self.notes: dict[str, float] = {}  # skipped intervals' seconds, for the next measure
        self.reset()

    def reset(self):
        self.t0, self.tokens, self.steps = time.perf_counter(), 0, 0

    def skip(self, label: str = "") -> None:
        """Leaves the interval so far out of the rate; with `label` the next `measure`
        reports its seconds under that key."""
        if label:
            self.notes[label] = self.notes.get(label, 0.0) + time.perf_counter() - self.t0
        self.reset()

    def exclude(self, seconds: float, label: str = "") -> None:
        """Leaves `seconds` just spent out of the rate, keeping the interval's steps and tokens
        (a task's `before_step` work between two steps); with `label` the next `measure`
        reports them under that key, summed."""
        self.t0 += seconds
        if label:
            self.notes[label] = self.notes.get(label, 0.0) + seconds

    def add(self, tokens: int):
        self.tokens += tokens
        self.steps += 1

    def measure(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out: dict = {"tokens_per_s": None, "step_time_s": None, "mfu": None, **self.notes}
        if self.steps:  # else nothing but skipped time since the last line: no rate
            tps = self.tokens * self.n_processes / dt
            out.update(tokens_per_s=tps, step_time_s=dt / self.steps)
            if self.peak and self.flops:
                out["mfu"] = tps * self.flops / (self.peak * self.n_devices)
                out["mfu_causal"] = tps * self.flops_causal / (self.peak * self.n_devices)
        elif self.peak and self.flops:
            out["mfu_causal"] = None
        self.notes = {}
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


METRICS_FILE = "metrics.jsonl"  # one line per logged step of the run as it finally went
SUPERSEDED_FILE = "metrics.superseded.jsonl"  # lines of steps a rollback or resume redid
EVENTS_FILE = "events.jsonl"  # resumes, restarts, rollbacks and early stops, one line each
_COMMIT_FILE = "metrics.commit.json"  # names the .tmp files a multi-file replace moves in place


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _replace_together(workdir: str, texts: dict[str, str]) -> None:
    """Replaces several files of `workdir` as one step: a kill at any point leaves either all
    the old files or all the new ones (completed by `_finish_replace` on the next start).

    Each new text is written to NAME.tmp and synced; then the commit file naming them is
    renamed into place (the commit point); then each NAME.tmp is renamed over NAME.
    """
    for name, text in texts.items():
        with open(os.path.join(workdir, name + ".tmp"), "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    commit = os.path.join(workdir, _COMMIT_FILE)
    with open(commit + ".tmp", "w") as f:
        json.dump(sorted(texts), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(commit + ".tmp", commit)
    _finish_replace(workdir)


def _finish_replace(workdir: str) -> None:
    """Completes a committed `_replace_together` cut short by a kill, or drops an uncommitted
    one's .tmp files (the old files are then intact)."""
    commit = os.path.join(workdir, _COMMIT_FILE)
    names = json.loads(_read_text(commit) or "[]")
    for name in names:
        tmp = os.path.join(workdir, name + ".tmp")
        if os.path.exists(tmp):
            os.replace(tmp, os.path.join(workdir, name))
    if os.path.exists(commit):
        os.remove(commit)
    for name in (METRICS_FILE, SUPERSEDED_FILE, EVENTS_FILE, _COMMIT_FILE):
        tmp = os.path.join(workdir, name + ".tmp")
        if os.path.exists(tmp):
            os.remove(tmp)


class MetricWriter:
    """Appends to WORKDIR/metrics.jsonl and writes TensorBoard events (process 0 only).

    metrics.jsonl holds one line per logged step of the run as it finally went (and one per
    eval, and one per checkpoint saved between log steps): when a rollback or a resume trains
    steps again, the lines of the steps after the checkpoint it continues from are moved, in
    one atomic replace, to metrics.superseded.jsonl — each with a `superseded` entry naming
    the event and why — and the event is appended to events.jsonl. Nothing logged is lost.
    TensorBoard hides the superseded steps too (tensorboardX's `purge_step`).

    Args:
      workdir: the run directory.
      resume_step: the checkpoint step the run continues from; None for a run that starts from
        scratch (any lines already there, from an attempt that saved no checkpoint, are moved
        aside as a "restart").
      tensorboard: also write TensorBoard events under WORKDIR/tb.
    """

    def __init__(self, workdir: str, resume_step: int | None = None, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.workdir = workdir
        self.path = os.path.join(workdir, METRICS_FILE)
        self.tb = None
        self._tensorboard, self._tb_opened = tensorboard, 0
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        _finish_replace(workdir)
        had_tb = os.path.isdir(os.path.join(workdir, "tb"))
        if resume_step is None:
            self.supersede_after(-1, "restart", "the run started again from step 0 (no "
                                 "checkpoint to resume from)", always=False)  # fmt: skip
        else:
            self.supersede_after(resume_step, "resume", f"resumed from checkpoint {resume_step}"
                                 "; the steps after it are trained again")  # fmt: skip
        # TensorBoard hides its events of the steps trained again (all of them on a restart).
        purge = (0 if resume_step is None else resume_step + 1) if had_tb else None
        self._open_tb(purge)

    def _open_tb(self, purge_step: int | None):
        if not self._tensorboard:
            return
        from tensorboardX import SummaryWriter

        if self.tb is not None:
            self.tb.close()
        # A file name of its own: tensorboardX names files by the second, so a writer reopened
        # within the second (a rollback) would overwrite the events of the one before.
        self._tb_opened += 1
        suffix = f".{os.getpid()}.{self._tb_opened}"
        self.tb = SummaryWriter(os.path.join(self.workdir, "tb"), purge_step=purge_step,
                                filename_suffix=suffix)  # fmt: skip

    def supersede_after(self, step: int, event: str, reason: str, always: bool = True,
                        **info) -> int:  # fmt: skip
        """Moves the lines of steps after `step` to metrics.superseded.jsonl (each with
        `superseded: {event, time, reason}`) and appends the event to events.jsonl, in one
        atomic replace; returns how many lines moved. With `always=False` an event that moves
        nothing is not recorded. A line cut short by a kill is moved as {"unparsed": text}."""
        if not self.active:
            return 0
        tag = {"event": event, "time": _now(), "reason": reason}
        keep, moved, last = [], [], None
        for line in _read_text(self.path).splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                rec_step = int(rec.get("step", 0))
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                moved.append(json.dumps({"unparsed": line, "superseded": tag}) + "\n")
                continue
            last = rec_step if last is None else max(last, rec_step)
            if rec_step <= step:
                keep.append(line + "\n")
            else:
                moved.append(json.dumps({**rec, "superseded": tag}) + "\n")
        if not moved and not always:
            return 0
        record = {**tag, "to_step": max(step, 0), "last_logged_step": last, **info,
                  "superseded_lines": len(moved)}  # fmt: skip
        if not moved:
            self._append_event(record)
            return 0
        superseded = _read_text(os.path.join(self.workdir, SUPERSEDED_FILE))
        events = _read_text(os.path.join(self.workdir, EVENTS_FILE))
        _replace_together(self.workdir, {
            METRICS_FILE: "".join(keep),
            SUPERSEDED_FILE: superseded + "".join(moved),
            EVENTS_FILE: events + json.dumps(record) + "\n",
        })  # fmt: skip
        return len(moved)

    def rolled_back(self, step: int, to_step: int, reason: str, **info) -> int:
        """A rollback at `step` to checkpoint `to_step`: supersedes the lines after it (and
        TensorBoard's events from `to_step` + 1 on); returns how many lines moved."""
        n = self.supersede_after(to_step, "rollback", reason, at_step=step, **info)
        if self.active:
            self._open_tb(to_step + 1)
        return n

    def event(self, event: str, reason: str, **info):
        """Appends an event (a preemption stop, the end of the data) to events.jsonl."""
        if self.active:
            self._append_event({"event": event, "time": _now(), "reason": reason, **info})

    def _append_event(self, record: dict):
        with open(os.path.join(self.workdir, EVENTS_FILE), "a") as f:
            f.write(json.dumps(record) + "\n")

    def write(self, step: int, metrics: dict):
        if not self.active:
            return
        rec = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:  # the values before _clean: a NaN/Inf loss is a point, not a gap
            for k, v in metrics.items():
                if isinstance(v, (np.generic, np.ndarray)) and np.size(v) == 1:
                    v = v.item()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


def read_metrics(workdir_or_file: str) -> list[dict]:
    """All records of a run's metrics.jsonl (for notebooks, reports and tests): one per logged
    step (and eval) of the run as it finally went, in step order. A line that is not JSON (cut
    short by a killed trainer, or being written) is skipped. A line that is not UTF-8 text (a
    corrupt byte: the writer writes ASCII) is skipped too, with a warning naming the file and
    line. Also reads any other JSONL file given by path."""
    path = workdir_or_file
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    out, undecodable = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                undecodable.append(lineno)
                continue
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the resumed run moves it to metrics.superseded.jsonl
    if undecodable:
        more = f" (and {len(undecodable) - 1} more)" if len(undecodable) > 1 else ""
        warnings.warn(f"{path}:{undecodable[0]}: not UTF-8 text{more}; skipped", stacklevel=2)
    return out


def read_superseded(workdir: str) -> list[dict]:
    """The lines a rollback or resume moved out of metrics.jsonl (the steps it trained again),
    oldest first; each has `superseded: {event, time, reason}`. [] when there are none."""
    path = os.path.join(workdir, SUPERSEDED_FILE)
    return read_metrics(path) if os.path.exists(path) else []


def read_events(workdir: str) -> list[dict]:
    """The run's resumes, restarts, rollbacks and early stops (events.jsonl), oldest first."""
    path = os.path.join(workdir, EVENTS_FILE)
    return read_metrics(path) if os.path.exists(path) else []


def data_end_step(workdir: str) -> int | None:
    """The step at which the run's finite data ended (its last event is `data_end`: it stopped
    there, with a checkpoint, before total_steps), or None. A sweep counts such a run as
    finished: resuming it would only stop again."""
    events = read_events(workdir)
    if events and events[-1].get("event") == "data_end":
        return int(events[-1]["step"])
    return None
