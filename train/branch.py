"""Branching a run: a new run that starts from another run's whole training state at one of its
checkpoints — params, optimizer state, step counter, EMA and, by default, its place in the data —
and goes on under its own config: another schedule or `total_steps`, another data mixture.

    # one stable (constant or WSD) run, then cooldowns branched from it at several steps: one
    # run gives the loss of every length (Hägele et al. 2024; MiniCPM's WSD)
    python -m flaxlm.train.main --config configs/pretrain.py --workdir runs/cool6k \\
        --config.branch_from=runs/stable@6000 --config.total_steps=7000 \\
        --config.opt.schedule=wsd --config.opt.wsd_decay_frac=0.143
    # an annealing phase on another mixture: the data starts afresh (`branch_data=restart`)
    ...  --config.branch_from=runs/stable --config.branch_data=restart \\
        --config.data.sources=web:0.5,math:0.3,code:0.2

`init_from` is not this: it loads weights alone into a fresh optimizer at step 0, so a WSD
decay started that way restarts Adam's moments and the schedule.

How: on the branch's first start, `seed_workdir` puts the source's checkpoint of that step into
WORKDIR/checkpoints (files hard-linked where the file system allows, else copied: orbax never
rewrites a committed step's files, so the source is never touched), copies the source's
metrics.jsonl lines up to the step (the branch's curves then start at step 0; its TensorBoard
events are not copied: they begin at the branch point) and writes WORKDIR/branch.json. The loop
then resumes from it as from its own checkpoint, with the resume's checks: another model or task
is refused, an optimizer whose state does not fit is refused naming the `opt.` keys, and the
keys this run changes (schedule, data, total_steps) are logged and recorded as a
`config_changed` event, with a `branched` event before it. Later starts of the branch resume
from its own checkpoints like any run.

Data: "continue" (the default) restores the source's data state — the same batches the source
would have drawn next, for a branch on the same data (a cooldown); "restart" leaves it out at
the branch point, so the branch's own data config starts from its beginning (a new mixture; a
data state of another pipeline would not fit). Only at the branch point: a restarted branch's own
checkpoints carry its own data state.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax

from flaxlm.train import checkpoint as ckpt_lib

log = logging.getLogger("flaxlm")

BRANCH_FILE = "branch.json"  # in the branch's workdir: where it came from
DATA_MODES = ("continue", "restart")  # config.branch_data


def parse(spec: str) -> tuple[str, int | None]:
    """ "RUN@STEP" or "RUN" (its latest step) -> (absolute run directory, step or None)."""
    run, sep, step = str(spec).rpartition("@")
    if not sep or not step.isdigit():
        run, step = str(spec), ""
    return os.path.abspath(os.path.expanduser(run)), int(step) if step else None


def check(config) -> None:
    """A ValueError naming the key for settings that cannot branch, before anything is built:
    `branch_data` not one of DATA_MODES, `branch_data` without `branch_from`, `init_from` with
    it (the branch's weights come from its source), a source that is an HF checkpoint."""
    spec, data = config.get("branch_from", ""), config.get("branch_data", "continue")
    if data not in DATA_MODES:
        raise ValueError(f"branch_data={data!r}; expected one of {DATA_MODES}")
    if not spec:
        if data != "continue":
            raise ValueError(f"branch_data={data!r} needs branch_from (a run to branch from)")
        return
    if config.get("init_from", ""):
        raise ValueError(
            f"branch_from={spec!r} and init_from={config.init_from!r}: a branch starts from its "
            "source's whole training state (weights, optimizer, step); init_from loads weights "
            "into a fresh run. Set one of them"
        )
    if str(spec).startswith("hf:"):
        raise ValueError(f"branch_from={spec!r}: an HF checkpoint holds no training state; use "
                         "init_from=hf:DIR to start a run from its weights")  # fmt: skip


def record(workdir: str) -> dict | None:
    """The workdir's branch.json ({"from", "step", "data"}), or None for a run of its own."""
    path = os.path.join(workdir, BRANCH_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def restarts_data(workdir: str, step: int) -> bool:
    """Whether the data state saved with checkpoint `step` is to be left out: the branch point
    of a branch with `branch_data="restart"`."""
    rec = record(workdir)
    return bool(rec) and rec.get("data") == "restart" and rec.get("step") == step


def seed_workdir(config, workdir: str) -> dict | None:
    """On a branch's first start, WORKDIR/checkpoints/<step> from the source (module
    docstring); returns the branch record then, None on every other start (no `branch_from`,
    or the branch resumed from its own steps). A source that is not a run or lacks the step,
    and a workdir that holds another run's checkpoints, are errors naming them."""
    spec = config.get("branch_from", "")
    if not spec:
        return None
    source, step = parse(spec)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    have = os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))
    rec = record(workdir)
    if rec is not None:  # branched before: it resumes from its own steps
        # The same source by its absolute path, or by its path relative to the branch: a study
        # moved whole (a sweep's branches, trained on a cluster, resumed at home) resumes.
        same = source == rec["from"] or rec.get("from_rel") == _relative(source, workdir)
        if not same or rec["step"] != (step if step is not None else rec["step"]):
            raise ValueError(f"branch_from={spec!r}, but {workdir} was branched from "
                             f"{rec['from']}@{rec['step']} ({BRANCH_FILE}): branch into a new "
                             "workdir")  # fmt: skip
        return None
    if have:
        raise ValueError(f"branch_from={spec!r}: {workdir} already holds checkpoints of a run "
                         "of its own; branch into a new workdir")  # fmt: skip
    try:  # the step exists and its meta reads (a missing run or step: the error names both)
        step, _ = ckpt_lib.read_meta(source, step)
    except ckpt_lib.CheckpointError as e:
        raise ValueError(f"branch_from={spec!r}: {e}") from None
    rec = {"from": source, "from_rel": _relative(source, workdir), "step": int(step),
           "data": config.get("branch_data", "continue")}  # fmt: skip
    if jax.process_index() == 0:  # (one shared file system: one process writes)
        _seed(source, int(step), workdir, rec)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("flaxlm_branch_seeded")
    log.info("branched from %s@%d (data: %s)", source, step, rec["data"])
    return rec


def _relative(source: str, workdir: str) -> str:
    return os.path.relpath(source, os.path.abspath(workdir))


def _seed(source: str, step: int, workdir: str, rec: dict) -> None:
    """The step's files linked into a temporary directory, renamed into place (a killed seed
    leaves no half step: the next start seeds again), then the metrics and branch.json."""
    src = os.path.join(source, "checkpoints", str(step))
    tmp = os.path.join(workdir, f".branch-{step}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _link_tree(src, tmp)
    os.makedirs(os.path.join(workdir, "checkpoints"), exist_ok=True)
    os.rename(tmp, os.path.join(workdir, "checkpoints", str(step)))
    _copy_metrics(source, workdir, step)
    with open(os.path.join(workdir, BRANCH_FILE), "w") as f:
        json.dump(rec, f, indent=1)


def _link_tree(src: str, dst: str) -> None:
    for root, _, files in os.walk(src):
        out = os.path.join(dst, os.path.relpath(root, src))
        os.makedirs(out, exist_ok=True)
        for name in files:
            try:
                os.link(os.path.join(root, name), os.path.join(out, name))
            except OSError:  # another file system, or links not allowed: a copy
                shutil.copy2(os.path.join(root, name), os.path.join(out, name))


def _copy_metrics(source: str, workdir: str, step: int) -> None:
    """The source's metrics.jsonl lines of steps <= `step` (the curve the branch continues)."""
    from flaxlm.train.metrics import METRICS_FILE

    path = os.path.join(source, METRICS_FILE)
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, TypeError, AttributeError):  # a line cut short by a kill
                continue
    with open(os.path.join(workdir, METRICS_FILE), "w") as f:
        f.writelines(kept)
