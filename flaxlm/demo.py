"""`make demo`: the whole recipe on the built-in world, on a laptop CPU, with a report.

    python -m flaxlm.demo --workdir runs/demo            # ≈ 15 min on 2 CPU cores
    python -m flaxlm.demo --workdir /tmp/d --runlocal    # a shrunk run (the end-to-end test)

Stages (each is a normal config under configs/; the command that runs it alone goes to
WORKDIR/commands.json and the report — for eval, the command for the SFT checkpoint):
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
interrupted one continues from its last checkpoint. A stage records what it was trained with
(WORKDIR/<stage>/demo_stage.json); asking for something else there (e.g. `--plan
sft_steps=200` after a finished SFT) stops with a message naming the stages to delete, rather
than mixing the two runs. `eval` re-evaluates when any evaluated checkpoint changed since its
results were written (WORKDIR/eval/inputs.json), and otherwise reuses them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time

from flaxlm.configs.common import override
from flaxlm.data import synthetic

STAGES = ("world", "data", "pretrain", "sft", "reward", "dpo", "ppo", "grpo", "student",
          "distill", "eval", "report")  # fmt: skip
# The training stages each one starts from (a changed stage invalidates these too).
DOWNSTREAM = {"pretrain": ("sft", "distill"), "sft": ("reward", "dpo", "ppo", "grpo"),
              "reward": ("ppo",)}  # fmt: skip
# The student's shape: the tiny model (d=64, 4 heads, 2 layers) at half width.
STUDENT = {"model.d_model": 32, "model.n_heads": 2, "model.n_kv_heads": 1, "model.d_ff": 64}

# Stage sizes: (full, runlocal). Steps are optimizer steps; the full sizes fit ≈15 minutes on 2
# CPU cores with the tiny model (2 layers, d=64, vocab 2048: ≈0.4M parameters).
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


def _latest_checkpoint(run_dir: str) -> list | None:
    """[step, modification time in ns] of a run's newest checkpoint directory (None if none):
    what tells a re-run that a run's model changed."""
    ckpts = os.path.join(run_dir, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) if os.path.isdir(ckpts) else []
    if not steps:
        return None
    return [steps[-1], os.stat(os.path.join(ckpts, str(steps[-1]))).st_mtime_ns]


class Demo:
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
    def world(self):
        preset = "small" if self.small else "demo"
        if not os.path.exists(os.path.join(self.dir["world"], "manifest.json")):
            synthetic.write_world(self.dir["world"], preset, seed=0)
        with open(os.path.join(self.dir["world"], "unsafe_words.txt"), "w") as f:
            f.write("\n".join(synthetic.UNSAFE_WORDS) + "\n")
        with open(os.path.join(self.dir["world"], "manifest.json")) as f:
            counts = json.load(f)["counts"]
        print("world: " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
        self.commands["world"] = (
            f"python -c 'from flaxlm.data import synthetic; "
            f'synthetic.write_world("{self.dir["world"]}", "{preset}")\''
        )

    def data(self):
        from flaxlm.configs import preprocess_world
        from flaxlm.data import preprocess

        out = self.dir["data"]
        world = self.dir["world"]
        overrides = {
            "clean.toxic_lists": f"default,{world}/unsafe_words.txt",
            "dedup.decontam_paths": f"{world}/heldout_text.jsonl",
        }
        if self.small:
            overrides["train_tokenizer_vocab"] = 512
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

    def _train(self, stage: str, module, config_module, arg: str, overrides: dict):
        cfg = override(config_module.get_config(arg), overrides)
        file = config_module.__name__.rsplit(".", 1)[-1] + ".py"
        self.commands[stage] = _cli(file, arg, overrides, self.dir[stage])
        self._check_stage(stage, file, arg, overrides)
        module.run(cfg, self.dir[stage])

    def _affected(self, stage: str) -> list[str]:
        out = [stage]
        for s in DOWNSTREAM.get(stage, ()):
            out += [x for x in self._affected(s) if x not in out]
        return out

    def _check_stage(self, stage: str, file: str, arg: str, overrides: dict):
        """Refuses to resume a stage's run with other training settings than it started with:
        the checkpoint would continue under a changed schedule and the stages after it would
        keep the old model. (Held-out generation settings, `eval_gen.*`, may change.)"""
        sig = {"config": f"{file}:{arg}", **{
            k: str(v).replace(self.w, "<workdir>")
            for k, v in overrides.items() if not k.startswith("eval_gen.")
        }}  # fmt: skip
        path = os.path.join(self.dir[stage], "demo_stage.json")
        has_ckpt = os.path.isdir(os.path.join(self.dir[stage], "checkpoints"))
        old = json.load(open(path)) if os.path.exists(path) else None
        if old is not None and old != sig and has_ckpt:
            changed = [k for k in sorted(set(old) | set(sig)) if old.get(k) != sig.get(k)]
            diff = ", ".join(f"{k}: {old.get(k)} -> {sig.get(k)}" for k in changed)
            dirs = " ".join(self.dir[s] for s in STAGES if s in self._affected(stage))
            raise SystemExit(
                f"demo: {stage} in {self.dir[stage]} was trained with other settings ({diff}); "
                f"to retrain it and the stages after it, delete them (rm -r {dirs}) and rerun, "
                "or use a new --workdir"
            )
        os.makedirs(self.dir[stage], exist_ok=True)
        with open(path, "w") as f:
            json.dump(sig, f, indent=1)

    def _common(self, steps: int, evals: int = 2) -> dict:
        return {"total_steps": steps, "ckpt_every": steps, "eval_every": max(steps // evals, 1),
                "progress_bar": True, "async_ckpt": False}  # fmt: skip

    def pretrain(self):
        from flaxlm.configs import pretrain as config
        from flaxlm.train import pretrain

        self._train(
            "pretrain",
            pretrain,
            config,
            "variant=tiny,data=text",
            self._corpus(self.plan["pretrain_steps"], evals=8),
        )

    def _corpus(self, steps: int, evals: int) -> dict:
        """Pretraining on the cleaned corpus (the teacher's, the students' settings)."""
        return {
            **self._common(steps, evals=evals),
            "data.sources": os.path.join(self.dir["data"], "tokens"),
            "data.eval_sources": os.path.join(self.dir["world"], "heldout_text.jsonl"),
            "model.vocab_size": 512 if self.small else 2048, "batch_size": 32, "seq_len": 128,
            "log_every": 20, "opt.lr": 3e-3, "opt.warmup_steps": max(steps // 20, 1),
        }  # fmt: skip

    def student(self):
        from flaxlm.configs import pretrain as config
        from flaxlm.train import pretrain

        self._train("student", pretrain, config, "variant=tiny,data=text",
                    {**self._corpus(self.plan["student_steps"], evals=4), **STUDENT})  # fmt: skip

    def distill(self):
        from flaxlm.alignment import distill
        from flaxlm.configs import distill as config

        self._train("distill", distill, config, "variant=tiny,text=True", {
            **self._corpus(self.plan["student_steps"], evals=4), **STUDENT,
            "distill.teacher": self.dir["pretrain"],
        })  # fmt: skip

    def _world_data(self) -> dict:
        preset = "small" if self.small else "demo"
        return {"data.world": preset}

    def sft(self):
        from flaxlm.alignment import sft
        from flaxlm.configs import sft as config

        self._train("sft", sft, config, "variant=tiny", {
            **self._common(self.plan["sft_steps"], evals=3), **self._world_data(),
            "init_from": self.dir["pretrain"], "batch_size": 32, "log_every": 10,
            "eval_gen.examples": self.plan["eval_examples"], "eval_gen.batch": 64,
        })  # fmt: skip

    def reward(self):
        from flaxlm.alignment import reward
        from flaxlm.configs import reward as config

        self._train("reward", reward, config, "variant=tiny", {
            **self._common(self.plan["reward_steps"], evals=2), **self._world_data(),
            "init_from": self.dir["sft"], "batch_size": 32, "log_every": 10,
        })  # fmt: skip

    def dpo(self):
        from flaxlm.alignment import dpo
        from flaxlm.configs import dpo as config

        self._train("dpo", dpo, config, "variant=tiny", {
            **self._common(self.plan["dpo_steps"], evals=2), **self._world_data(),
            "init_from": self.dir["sft"], "batch_size": 32, "log_every": 5,
            "dpo.sft_coef": 1.0, "opt.lr": 5e-5,
            "eval_gen.examples": self.plan["eval_examples"], "eval_gen.batch": 64,
        })  # fmt: skip

    def ppo(self):
        from flaxlm.alignment import ppo
        from flaxlm.configs import ppo as config

        self._train("ppo", ppo, config, "variant=tiny", {
            **self._common(self.plan["ppo_steps"], evals=2), **self._world_data(),
            "init_from": self.dir["sft"], "reward_from": self.dir["reward"], "log_every": 4,
            "opt.lr": 5e-5, "ppo.kl_coef": 0.1, "rollout.batch": 64, "batch_size": 16,
            "rollout.heldout_prompts": 0,
            "eval_gen.examples": self.plan["eval_examples"], "eval_gen.batch": 64,
        })  # fmt: skip

    def grpo(self):
        from flaxlm.alignment import grpo
        from flaxlm.configs import grpo as config

        self._train("grpo", grpo, config, "variant=tiny", {
            **self._common(self.plan["grpo_steps"], evals=2), **self._world_data(),
            "init_from": self.dir["sft"], "log_every": 4, "grpo.rewards": "exact_match,format:0.2",
            "opt.lr": 3e-5, "rollout.batch": 128, "batch_size": 16,
            "rollout.heldout_prompts": self.plan["eval_examples"],
            "eval_gen.examples": self.plan["eval_examples"], "eval_gen.batch": 64,
        })  # fmt: skip

    def eval(self):
        from flaxlm.demo_report import evaluate_all

        ev = "python -m flaxlm.evaluation --checkpoint {} --world {}".format(
            self.dir["sft"], self.dir["world"]
        )
        self.commands["eval"] = (
            f"{ev} --tasks ppl_heldout_text,mc_facts_heldout,gen_facts_heldout,"
            f"gen_instructions_heldout && {ev} --tasks gen_instructions_heldout --temperature 1 "
            "--num_samples 4"
        )
        path = os.path.join(self.dir["eval"], "results.json")
        inputs_path = os.path.join(self.dir["eval"], "inputs.json")
        inputs = {"eval_examples": self.plan["eval_examples"], "checkpoints": {
            s: _latest_checkpoint(self.dir[s])
            for s in DOWNSTREAM["sft"] + ("pretrain", "sft", "student", "distill")
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
        # Times and commands accumulate over invocations (a resumed demo reports every stage).
        self.times, self.commands = self._load("times.json"), self._load("commands.json")
        for stage in stages:
            t0 = time.perf_counter()
            print(f"\n=== {stage} ===", flush=True)
            getattr(self, stage)()
            self.times[stage] = self.times.get(stage, 0.0) + time.perf_counter() - t0
            self._save("times.json", self.times)
            self._save("commands.json", self.commands)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--runlocal", action="store_true", help="shrunk sizes (tests)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma list to run")
    parser.add_argument("--plan", default="", help="size overrides, e.g. sft_steps=60,ppo_steps=96")
    args = parser.parse_args(argv)
    logging.getLogger("flaxlm").setLevel(logging.WARNING)
    os.makedirs(args.workdir, exist_ok=True)
    plan = dict(kv.split("=", 1) for kv in args.plan.split(",") if kv)
    Demo(args.workdir, args.runlocal, plan).run(args.stages.split(","))


if __name__ == "__main__":
    main()
