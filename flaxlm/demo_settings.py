"""What each stage of the demo (flaxlm/demo.py) was made with, and what an older workdir shows.

Every stage but eval and report records its settings in WORKDIR/<stage>/demo_stage.json before it
runs: the world's preset and seed; the preprocessing config and overrides (tokenizer vocabulary
included); a training stage's config, overrides and the checkpoint step of every run it starts
from or reads (`init_from`, `reward_from`, `distill.teacher`: "<key> checkpoint"). A rerun that
would make a finished stage with other settings — a `--plan` change, a world of another preset,
a source run trained further since — stops instead of mixing the two (Demo._check_stage).

Workdirs made before a stage recorded some of this are read from their outputs (`recorded`):
the world's preset from manifest.json's config, the data's vocabulary from its tokenizer, and a
source run's step as today's unless that run was stopped short and trained on after the stage's
first checkpoint was written.
"""

from __future__ import annotations

import dataclasses
import json
import os

STAGES = ("world", "data", "pretrain", "sft", "reward", "dpo", "ppo", "grpo", "student",
          "distill", "eval", "report")  # fmt: skip
# The training stages: the module that trains each and its config (configs/<file>.py).
TRAINERS = {
    "pretrain": ("flaxlm.train.pretrain", "pretrain"),
    "sft": ("flaxlm.alignment.sft", "sft"),
    "reward": ("flaxlm.alignment.reward", "reward"),
    "dpo": ("flaxlm.alignment.dpo", "dpo"),
    "ppo": ("flaxlm.alignment.ppo", "ppo"),
    "grpo": ("flaxlm.alignment.grpo", "grpo"),
    "student": ("flaxlm.train.pretrain", "pretrain"),
    "distill": ("flaxlm.alignment.distill", "distill"),
}
# The stages whose settings are recorded and checked (in STAGES order).
RECORDED = ("world", "data", *TRAINERS)
# What each stage's output feeds (a changed stage invalidates these too): the world's files
# (and its preset, which the chat stages read as data.world), the cleaned corpus, and the runs
# each training stage starts from.
DOWNSTREAM = {"world": ("data", "sft", "reward", "dpo", "ppo", "grpo"),
              "data": ("pretrain", "student", "distill"),
              "pretrain": ("sft", "distill"), "sft": ("reward", "dpo", "ppo", "grpo"),
              "reward": ("ppo",)}  # fmt: skip
RECORD = "demo_stage.json"
# Config keys naming another run a training stage reads (weights to start from, a frozen model).
SOURCE_KEYS = ("init_from", "reward_from", "dpo.ref_from", "distill.teacher")


def checkpoint_steps(run_dir: str) -> list[int]:
    ckpts = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpts):
        return []
    return sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())


def latest_checkpoint(run_dir: str) -> list | None:
    """[step, modification time in ns] of a run's newest checkpoint directory (None if none):
    what tells a re-run that a run's model changed."""
    steps = checkpoint_steps(run_dir)
    if not steps:
        return None
    return [steps[-1], _mtime(run_dir, steps[-1])]


def _mtime(run_dir: str, step: int) -> int:
    return os.stat(os.path.join(run_dir, "checkpoints", str(step))).st_mtime_ns


def source_entry(run_dir: str) -> str:
    """The value recorded for a source run: its latest checkpoint step ("None": none yet)."""
    latest = latest_checkpoint(run_dir)
    return str(latest[0] if latest else None)


def read_record(stage_dir: str) -> dict | None:
    path = os.path.join(stage_dir, RECORD)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_record(stage_dir: str, settings: dict) -> None:
    os.makedirs(stage_dir, exist_ok=True)
    with open(os.path.join(stage_dir, RECORD), "w") as f:
        json.dump(settings, f, indent=1)


def recorded(stage: str, stage_dir: str, now: dict, sources: dict) -> dict | None:
    """What a made stage was made with: its record, completed from its outputs where it predates
    a key (`now`: the settings it would be made with now; `sources`: {setting key: source run
    dir} of a training stage). None: no record and nothing to read it from."""
    old = read_record(stage_dir)
    if stage == "world" and old is None:
        return _world_from_manifest(stage_dir)
    if stage == "data" and old is None:
        return _data_from_outputs(stage_dir, now)
    if old is None:
        return None
    old = dict(old)
    for key, source_dir in sources.items():
        if key not in old and key in now:
            old[key] = _source_from_times(stage_dir, source_dir, now[key])
    return old


def _world_from_manifest(world_dir: str) -> dict | None:
    """{"preset", "seed"} of a world written without a record: the preset whose config its
    manifest.json holds ("a config of no preset" if none)."""
    from flaxlm.data.synthetic import PRESETS

    path = os.path.join(world_dir, "manifest.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        manifest = json.load(f)
    config = manifest.get("config")
    as_json = lambda c: json.loads(json.dumps(dataclasses.asdict(c)))  # noqa: E731 (tuples)
    names = [n for n, c in PRESETS.items() if as_json(c) == config]
    return {"preset": names[0] if names else "a config of no preset",
            "seed": str(manifest.get("seed"))}  # fmt: skip


def _data_from_outputs(data_dir: str, now: dict) -> dict | None:
    """The data settings of a data dir made without a record: today's, with the vocabulary of
    the tokenizer it trained (what a --runlocal run changed)."""
    path = os.path.join(data_dir, "tokenizer.model")
    if not os.path.exists(os.path.join(data_dir, "report.json")):
        return None
    old = dict(now)
    if os.path.exists(path):
        from flaxlm.data.tokenizer import Tokenizer

        old["train_tokenizer_vocab"] = str(Tokenizer.load(path).vocab_size)
    return old


def _source_from_times(stage_dir: str, source_dir: str, now: str) -> str:
    """A source's step for a stage recorded without it: today's, unless the source run was
    stopped short (a "preempted" or "data_end" event in its events.jsonl) and trained on past
    that step after the stage's first checkpoint was written — what the demo did before it
    stopped at a stopped stage. (Both, as a copied workdir's times may be in any order.)"""
    mine, theirs = checkpoint_steps(stage_dir), checkpoint_steps(source_dir)
    if not mine or not theirs:
        return now
    stops = []
    path = os.path.join(source_dir, "events.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            events = [json.loads(line) for line in f if line.strip()]
        stops = [e.get("step", 0) for e in events if e.get("event") in ("preempted", "data_end")]
    if any(step < theirs[-1] for step in stops):
        if _mtime(source_dir, theirs[-1]) > _mtime(stage_dir, mine[0]):
            return f"a checkpoint before {theirs[-1]}"
    return now


class StageRecords:
    """Demo's settings checks (flaxlm/demo.py): it provides `w` (the workdir), `dir` ({stage:
    dir}), `_preset()`, `_data_overrides()` and `_spec(stage)` (a training stage's config arg
    and overrides)."""

    def _check_finished(self, stage: str, summary: dict, total: int):
        """Stops the demo when a stage's run returned short of its steps (a SIGTERM saves a
        checkpoint and returns; so does the end of its data): the stages after it would start
        from a half-trained model, and a rerun would keep them."""
        step = summary.get("step", total)
        where = f"at step {step} of {total} (checkpoint saved in {self.dir[stage]})"
        if summary.get("preempted") or (step < total and not summary.get("data_exhausted")):
            stop = summary.get("stop_reason") or "SIGTERM"  # (or max_runtime_minutes)
            why = f"was stopped by {stop}" if summary.get("preempted") else "stopped"
            raise SystemExit(f"demo: {stage} {why} {where}; the stages after it were not run: "
                             "rerun to resume")  # fmt: skip
        if summary.get("data_exhausted"):
            key = "student_steps" if stage == "distill" else f"{stage}_steps"
            raise SystemExit(
                f"demo: {stage}'s training data ended {where}; the stages after it were not run. "
                f"A rerun would stop there again: delete {self.dir[stage]} and rerun with fewer "
                f"steps (--plan {key}=N)"
            )

    def _sources(self, stage: str, overrides: dict | None = None) -> dict:
        """{setting key: run dir} of the runs a training stage starts from or reads."""
        overrides = self._spec(stage)[1] if overrides is None else overrides
        return {f"{k} checkpoint": overrides[k] for k in SOURCE_KEYS if k in overrides}

    def _check_sources(self, stage: str, overrides: dict):
        """A stage starts only from finished runs of this demo (a --stages subset can ask for
        one whose run was interrupted)."""
        for source_dir in self._sources(stage, overrides).values():
            src = next((s for s in TRAINERS if self.dir[s] == source_dir), None)
            if src is None:
                continue
            latest = latest_checkpoint(source_dir)
            total = (read_record(source_dir) or {}).get("total_steps")
            if latest is None:
                raise SystemExit(f"demo: {stage} starts from {src} ({source_dir}), which has no "
                                 f"checkpoint: run the {src} stage first")  # fmt: skip
            if total is not None and latest[0] < int(total):
                raise SystemExit(f"demo: {stage} starts from {src}, which stopped at step "
                                 f"{latest[0]} of {total}: rerun to resume {src} first "
                                 f"(--stages {src},{stage})")  # fmt: skip

    def _affected(self, stage: str) -> list[str]:
        out = [stage]
        for s in DOWNSTREAM.get(stage, ()):
            out += [x for x in self._affected(s) if x not in out]
        return out

    def settings(self, stage: str) -> dict:
        """What a stage is made with now, as recorded (paths relative to the workdir)."""
        if stage == "world":
            return {"preset": self._preset(), "seed": "0"}
        rel = lambda v: str(v).replace(self.w, "<workdir>")  # noqa: E731
        if stage == "data":
            return {"config": "preprocess_world.py",
                    **{k: rel(v) for k, v in self._data_overrides().items()}}  # fmt: skip
        arg, overrides = self._spec(stage)
        # (Held-out generation settings, `eval_gen.*`, may change.)
        sig = {"config": f"{TRAINERS[stage][1]}.py:{arg}", **{
            k: rel(v) for k, v in overrides.items() if not k.startswith("eval_gen.")
        }}  # fmt: skip
        for key, source_dir in self._sources(stage, overrides).items():
            sig[key] = source_entry(source_dir)
        return sig

    def _made(self, stage: str) -> bool:
        if stage == "world":
            return os.path.exists(os.path.join(self.dir["world"], "manifest.json"))
        if stage == "data":
            return os.path.exists(os.path.join(self.dir["data"], "report.json"))
        return latest_checkpoint(self.dir[stage]) is not None

    def _changes(self, stage: str) -> list[str]:
        """One "key: then -> now" per setting a made stage was made with otherwise."""
        if not self._made(stage):
            return []
        now = self.settings(stage)
        sources = self._sources(stage) if stage in TRAINERS else {}
        old = recorded(stage, self.dir[stage], now, sources)
        if old is None:
            return []
        keys = [k for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)]
        return [f"{k}: {old.get(k)} -> {now.get(k)}" for k in keys]

    def _check_stage(self, stage: str):
        """Refuses to resume or reuse a stage made with other settings than it would be now:
        a checkpoint would continue under a changed schedule, a world or corpus of another
        size would feed the stages after it, and those stages would keep the old model. The
        message names every stage to redo: this one, the ones after it, and any other that a
        changed setting (a --plan key sizes several) makes stale."""
        changes = self._changes(stage)
        if changes:
            redo = self._affected(stage)
            also = {s: c for s in RECORDED if s not in redo and (c := self._changes(s))}
            redo += [x for s in also for x in self._affected(s) if x not in redo]
            dirs = " ".join(self.dir[s] for s in STAGES if s in redo and os.path.isdir(self.dir[s]))
            more = "".join(f"; {s} too ({', '.join(c)})" for s, c in also.items())
            raise SystemExit(
                f"demo: {stage} in {self.dir[stage]} was made with other settings "
                f"({', '.join(changes)}){more}; to redo it and the stages after it, delete them "
                f"(rm -r {dirs}) and rerun, or use a new --workdir"
            )
        write_record(self.dir[stage], self.settings(stage))
