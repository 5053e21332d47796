"""`make demo`: the whole recipe on the built-in world, on a laptop CPU, with a report.

    python -m flaxlm.demo --workdir runs/demo            # ≈ 15 min on 2 CPU cores
    python -m flaxlm.demo --workdir /tmp/d --runlocal    # a shrunk run (the end-to-end test)

Stages (each is a normal config under configs/; the command that runs it alone goes to
WORKDIR/commands.json and the report — for eval, the commands that evaluate the SFT checkpoint
as the stage does):
  world     data/synthetic.py writes the world: a noisy corpus, chat data, preferences, evals
  data      clean → dedup → tokenizer → ArrayRecord shards (flaxlm.data.preprocess)
  pretrain  a tiny Llama on the cleaned corpus                         (configs/pretrain.py)
  sft       instruction tuning on the world's chat data                 (configs/sft.py)
  reward    a reward model from the SFT model on preference pairs       (configs/reward.py)
  dpo       DPO (+ chosen-answer NLL, "RPO") from the SFT model          (configs/dpo.py)
  ppo       PPO from the SFT model against the reward model             (configs/ppo.py)
  grpo      GRPO from the SFT model with verifiable rewards (exact match + format)
                                                                        (configs/grpo.py)
  student   a half-width model (45% of the parameters) pretrained alone on the same corpus
                                                                        (configs/pretrain.py)
  distill   the same student pretrained by distillation from the pretrained model: its
            next-token distributions on the same corpus, steps and learning rate
                                                                        (configs/distill.py)
  eval      every checkpoint on the same held-out tasks (flaxlm.evaluation)
  report    WORKDIR/report.md with a table per stage and PNG plots
Re-running resumes: finished stages are skipped (their checkpoints are complete) and an
interrupted one continues from its last checkpoint. A training stage stopped short of its steps
(SIGTERM: it saves a checkpoint and returns; or the end of its data) stops the demo with a
non-zero exit: the stages after it never start from a half-trained model. A stage records what
it was made with (WORKDIR/<stage>/demo_stage.json, flaxlm/demo_settings.py: the world's preset,
the preprocessing settings, a training stage's config and the checkpoint step of each run it
starts from); asking for something else there (e.g. `--plan sft_steps=200` after a finished
SFT, a full run in a --runlocal workdir, a stage whose source run was trained further since)
stops with a message naming the stages to delete, rather than mixing the two runs. `eval`
re-evaluates when any checkpoint it reads (the policies', the students', the reward model's)
changed since its results were written
(WORKDIR/eval/inputs.json), and otherwise reuses them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shutil
import time

from flaxlm import demo_settings as records
from flaxlm.configs.common import override
from flaxlm.data import synthetic
from flaxlm.demo_settings import DOWNSTREAM, RECORDED, STAGES, TRAINERS, StageRecords  # noqa: F401

# The student's shape: the tiny model (d=64, 4 heads, 2 layers) at half width.
STUDENT = {"model.d_model": 32, "model.n_heads": 2, "model.n_kv_heads": 1, "model.d_ff": 64}
VOCAB = (2048, 512)  # the tokenizer's (and so the models') vocabulary: (full, runlocal)

# Stage sizes: (full, runlocal). Steps are optimizer steps; the full sizes fit ≈15 minutes on 2
# CPU cores with the tiny model (2 layers, d=64, vocab 2048: ≈0.34M parameters).
PLAN = {
    "pretrain_steps": (800, 30),
    "sft_steps": (120, 12),
    "reward_steps": (120, 8),
    "dpo_steps": (100, 6),
    "ppo_steps": (128, 4),
    "grpo_steps": (96, 4),
    "student_steps": (400, 6),
    "eval_examples": (132, 16),
}


def _cli(config_file: str, arg: str, overrides: dict, workdir: str) -> str:
    flags = " ".join(f"--config.{k}={v}" for k, v in overrides.items())
    return (f"python -m flaxlm.train.main --config configs/{config_file}:{arg} {flags} "
            f"--workdir {workdir}")  # fmt: skip


class Demo(StageRecords):
    def __init__(self, workdir: str, runlocal: bool, plan_overrides: dict | None = None):
        self.w = os.path.abspath(workdir)
        self.small = runlocal
        self.plan = {k: v[1 if runlocal else 0] for k, v in PLAN.items()}
        for k, v in (plan_overrides or {}).items():
            if k not in self.plan:
                raise KeyError(f"--plan: unknown key {k!r}; known: {sorted(self.plan)}")
            self.plan[k] = int(v)
        self.dir = {s: os.path.join(self.w, s) for s in STAGES}
        self.commands: dict[str, str] = {}
        self.times: dict[str, float] = {}

    # --- stages ---------------------------------------------------------------------------------
    def _preset(self) -> str:
        return "small" if self.small else "demo"

    def world(self):
        world = self.dir["world"]
        self._check_stage("world")  # (first: a refused stage keeps its recorded command)
        self.commands["world"] = (
            f"python -c 'from flaxlm.data import synthetic; "
            f'synthetic.write_world("{world}", "{self._preset()}")\''
        )
        if not os.path.exists(os.path.join(world, "manifest.json")):
            synthetic.write_world(world, self._preset(), seed=0)  # (unsafe_words.txt too)
        else:  # an older generator's world (its questions unmarked: scored 0): written again
            synthetic.refresh_world(world)
        if not os.path.exists(os.path.join(world, "unsafe_words.txt")):  # an older world's
            synthetic.write_unsafe_words(world)
        with open(os.path.join(world, "manifest.json")) as f:
            counts = json.load(f)["counts"]
        print("world: " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)

    def _data_overrides(self) -> dict:
        world = self.dir["world"]
        return {
            "clean.toxic_lists": f"default,{world}/unsafe_words.txt",
            "dedup.decontam_paths": f"{world}/heldout_text.jsonl",
            "train_tokenizer_vocab": VOCAB[self.small],
        }

    def data(self):
        from flaxlm.configs import preprocess_world
        from flaxlm.data import preprocess

        out, world = self.dir["data"], self.dir["world"]
        overrides = self._data_overrides()
        self._check_stage("data")
        self.commands["data"] = (
            f"python -m flaxlm.data.preprocess --input {world}/pretrain.jsonl --output {out} "
            "--config configs/preprocess_world.py "
            + " ".join(f"--config.{k}={v}" for k, v in overrides.items())
        )
        if not os.path.exists(os.path.join(out, "report.json")):
            for sub in ("text", "tokens"):  # an interrupted run's shards: never mixed in
                shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
            cfg = override(preprocess_world.get_config(), overrides)
            preprocess.run([os.path.join(world, "pretrain.jsonl")], out, cfg)
        with open(os.path.join(out, "report.json")) as f:
            report = json.load(f)
        for st in report.get("stages", []):
            if st.get("in") is not None:
                print(f"data {st['stage']}: {st['in']} → {st['out']} documents", flush=True)
        print(f"data: {report.get('tokens', 0):,} tokens in {out}/tokens", flush=True)

    def _train(self, stage: str):
        module_name, file = TRAINERS[stage]
        arg, overrides = self._spec(stage)
        config_module = importlib.import_module(f"flaxlm.configs.{file}")
        cfg = override(config_module.get_config(arg), overrides)
        self._check_sources(stage, overrides)
        self._check_stage(stage)
        self.commands[stage] = _cli(f"{file}.py", arg, overrides, self.dir[stage])
        _, summary = importlib.import_module(module_name).run(cfg, self.dir[stage])
        self._check_finished(stage, summary, int(cfg.total_steps))

    def _spec(self, stage: str) -> tuple[str, dict]:
        """(config arg, overrides) of a training stage."""
        return getattr(self, f"_{stage}_spec")()

    def _common(self, steps: int, evals: int = 2) -> dict:
        return {"total_steps": steps, "ckpt_every": steps, "eval_every": max(steps // evals, 1),
                "progress_bar": True, "async_ckpt": False}  # fmt: skip

    def _corpus(self, steps: int, evals: int) -> dict:
        """Pretraining on the cleaned corpus (the teacher's, the students' settings)."""
        return {
            **self._common(steps, evals=evals),
            "data.sources": os.path.join(self.dir["data"], "tokens"),
            "data.eval_sources": os.path.join(self.dir["world"], "heldout_text.jsonl"),
            "model.vocab_size": VOCAB[self.small], "batch_size": 32, "seq_len": 128,
            "log_every": 20, "opt.lr": 3e-3, "opt.warmup_steps": max(steps // 20, 1),
        }  # fmt: skip

    def _pretrain_spec(self):
        return "variant=tiny,data=text", self._corpus(self.plan["pretrain_steps"], evals=8)

    def _student_spec(self):
        return "variant=tiny,data=text", {**self._corpus(self.plan["student_steps"], evals=4),
                                          **STUDENT}  # fmt: skip

    def _distill_spec(self):
        return "variant=tiny,text=True", {
            **self._corpus(self.plan["student_steps"], evals=4), **STUDENT,
            "distill.teacher": self.dir["pretrain"],
        }  # fmt: skip

    def _world_data(self) -> dict:
        return {"data.world": self._preset()}

    def _sft_spec(self):
        return "variant=tiny", {
            **self._common(self.plan["sft_steps"], evals=3), **self._world_data(),
            "init_from": self.dir["pretrain"], "batch_size": 32, "log_every": 10,
            "eval_gen.examples": self.plan["eval_examples"], "eval_gen.batch": 64,
        }  # fmt: skip

    def _reward_spec(self):
        return "variant=tiny", {
            **self._common(self.plan["reward_steps"], evals=2), **self._world_data(),
            "init_from": self.dir["sft"], "batch_size": 32, "log_every": 10,
        }  # fmt: skip

    def _dpo_spec(self):
        return "variant=tiny", {
            **self._common(self.plan["dpo_steps"], evals=2), **self._world_data(),
            "init_from": self.dir["sft"], "batch_size": 32, "log_every": 5,
            "dpo.sft_coef": 1.0, "opt.lr": 5e-5,
            "eval_gen.examples": self.plan["eval_examples"], "eval_gen.batch": 64,
        }  # fmt: skip

    def _ppo_spec(self):
        return "variant=tiny", {
            **self._common(self.plan["ppo_steps"], evals=2), **self._world_data(),
            "init_from": self.dir["sft"], "reward_from": self.dir["reward"], "log_every": 4,
            "opt.lr": 5e-5, "ppo.kl_coef": 0.1, "rollout.batch": 64, "batch_size": 16,
            "rollout.heldout_prompts": 0,
            "eval_gen.examples": self.plan["eval_examples"], "eval_gen.batch": 64,
        }  # fmt: skip

    def _grpo_spec(self):
        return "variant=tiny", {
            **self._common(self.plan["grpo_steps"], evals=2), **self._world_data(),
            "init_from": self.dir["sft"], "log_every": 4, "grpo.rewards": "exact_match,format:0.2",
            "opt.lr": 3e-5, "rollout.batch": 128, "batch_size": 16,
            "rollout.heldout_prompts": self.plan["eval_examples"],
            "eval_gen.examples": self.plan["eval_examples"], "eval_gen.batch": 64,
        }  # fmt: skip

    def _eval_command(self, samples: int) -> str:
        """The commands that evaluate the SFT checkpoint as the eval stage does
        (demo_report.evaluate_all): perplexity on all of the held-out text, the other tasks on
        their first eval_examples; multiple choice as the task says, generation in the chat
        template without shots, greedy and sampled (T=1, `samples` per prompt)."""
        ev = "python -m flaxlm.evaluation --checkpoint {} --world {}".format(
            self.dir["sft"], self.dir["world"]
        )
        gen = f"--chat on --num_fewshot 0 --limit {self.plan['eval_examples']}"
        return " && ".join([
            f"{ev} --tasks ppl_heldout_text --chat off",
            f"{ev} --tasks mc_facts_heldout --chat off --limit {self.plan['eval_examples']}",
            f"{ev} --tasks gen_facts_heldout,gen_instructions_heldout {gen}",
            f"{ev} --tasks gen_instructions_heldout {gen} --temperature 1 --num_samples {samples}",
        ])  # fmt: skip

    def eval(self):
        from flaxlm.demo_report import POLICIES, SAMPLES, STUDENTS, evaluate_all

        self.commands["eval"] = self._eval_command(SAMPLES)
        path = os.path.join(self.dir["eval"], "results.json")
        inputs_path = os.path.join(self.dir["eval"], "inputs.json")
        inputs = {"eval_examples": self.plan["eval_examples"], "checkpoints": {
            # (the reward model too: it scores the held-out responses, the report's rm_score)
            s: records.latest_checkpoint(self.dir[s]) for s in (*POLICIES, *STUDENTS, "reward")
        }}  # fmt: skip
        if os.path.exists(path) and os.path.exists(inputs_path):
            with open(inputs_path) as f:
                if json.load(f) == inputs:
                    return
            print("eval: checkpoints or eval_examples changed since the last results: "
                  "re-evaluating", flush=True)  # fmt: skip
        os.makedirs(self.dir["eval"], exist_ok=True)
        results = evaluate_all(self.dir, limit=self.plan["eval_examples"])
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        with open(inputs_path, "w") as f:
            json.dump(inputs, f, indent=1)

    def report(self):
        results = os.path.join(self.dir["eval"], "results.json")
        if not os.path.exists(results):
            raise SystemExit(f"demo: the report needs the eval stage's results ({results}): "
                             "run the eval stage first (--stages eval,report)")  # fmt: skip
        from flaxlm.demo_report import write_report

        path = write_report(self.w, self.dir, self.commands, self.times, self.small)
        print(f"\nreport: {path}")

    # --- driver ---------------------------------------------------------------------------------
    def _load(self, name: str) -> dict:
        path = os.path.join(self.w, name)
        return json.load(open(path)) if os.path.exists(path) else {}

    def _save(self, name: str, value: dict):
        with open(os.path.join(self.w, name), "w") as f:
            json.dump(value, f, indent=1)

    def run(self, stages=STAGES):
        unknown = [s for s in stages if s not in STAGES]
        if unknown:  # (a name is looked up as a method: never call anything else)
            raise ValueError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
        # Times and commands accumulate over invocations (a resumed demo reports every stage).
        self.times, self.commands = self._load("times.json"), self._load("commands.json")
        os.makedirs(self.w, exist_ok=True)
        for stage in stages:
            t0 = time.perf_counter()
            print(f"\n=== {stage} ===", flush=True)
            try:
                self._train(stage) if stage in TRAINERS else getattr(self, stage)()
            finally:  # (a stopped stage's time and command count too)
                self.times[stage] = self.times.get(stage, 0.0) + time.perf_counter() - t0
                self._save("times.json", self.times)
                self._save("commands.json", self.commands)


def _parse_stages(parser: argparse.ArgumentParser, text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        what = f"unknown stage(s) {', '.join(map(repr, unknown))}" if unknown else "no stage"
        parser.error(f"--stages: {what}; stages: {','.join(STAGES)}")
    return stages


def _parse_plan(parser: argparse.ArgumentParser, text: str) -> dict:
    plan = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if key not in PLAN:
            parser.error(f"--plan: unknown key {key!r} (in {item!r}); keys: {', '.join(PLAN)}")
        if not eq or not value.strip().isdigit() or int(value) < 1:
            parser.error(f"--plan: {item!r}: {key} takes a positive integer, e.g. {key}="
                         f"{PLAN[key][0]}")  # fmt: skip
        plan[key] = int(value)
    return plan


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m flaxlm.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--runlocal", action="store_true", help="shrunk sizes (tests)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma list to run, of: {','.join(STAGES)}")  # fmt: skip
    parser.add_argument("--plan", default="",
                        help=f"size overrides, e.g. sft_steps=60,ppo_steps=96; keys: "
                        f"{', '.join(PLAN)}")  # fmt: skip
    args = parser.parse_args(argv)
    stages, plan = _parse_stages(parser, args.stages), _parse_plan(parser, args.plan)
    logging.getLogger("flaxlm").setLevel(logging.WARNING)
    Demo(args.workdir, args.runlocal, plan).run(stages)


if __name__ == "__main__":
    main()
