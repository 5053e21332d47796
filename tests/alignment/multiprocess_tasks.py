"""The runs of tests/alignment/test_rl_multiprocess.py and test_multiprocess_offline.py:
`config_for` builds a run's config (the test runs it on one process), and as a script (`python
THIS PORT PROCESS_ID N ROOT TASKS SFT RM CACHE REWARDS_DIR`) this runs each of the
comma-separated TASKS in turn, into ROOT/TASK, as one of N processes: one start and one
jax.distributed set-up for all of a test file's runs (`run_all`)."""

import importlib
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _helpers():
    spec = importlib.util.spec_from_file_location("rl_helpers", os.path.join(HERE, "rl_helpers.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def config_for(task: str, sft: str, rm: str, cache_dir: str):
    """Two rollouts of 16 rows in 8-row minibatches, held-out evals (greedy; GRPO also sampled)
    and a checkpoint at the end; data 4 × fsdp 2 over 8 devices. GRPO and
    online DPO judge with `counted_rewards.length_parity` (importable from REWARDS_DIR) and the
    format reward."""
    from flaxlm.configs import grpo as grpo_config
    from flaxlm.configs import ppo as ppo_config

    common = {
        "batch_size": 8, "rollout.batch": 16, "rollout.epochs": 1, "seq_len": 48,
        "rollout.max_prompt_len": 32, "rollout.max_new_tokens": 6, "opt.lr": 1e-3,
        "eval_at_start": False, "eval_every": 4, "eval_gen.examples": 8, "eval_gen.batch": 8,
        "eval_gen.max_new_tokens": 4, "eval_gen.max_prompt_len": 32, "ckpt_every": 4,
        "async_ckpt": False, "mesh.data": 4, "mesh.fsdp": 2, "log_every": 1,
    }  # fmt: skip
    from flaxlm.configs import online_dpo as online_dpo_config

    if task in OFFLINE:  # 2 steps of 8 rows, held-out evals at the start and the end
        module = importlib.import_module(f"flaxlm.configs.{task}")
        H = _helpers()
        # Generation evals on several processes: SFT's covers them (DPO's and KTO's are the
        # same code; one compile less each). Distillation: a fresh 1-layer student of the
        # "SFT" teacher (loss evals only).
        gen = {"eval_gen.sets": ""} if task in ("dpo", "kto") else {}
        student = {"init_from": "", "distill.teacher": sft, "eval_gen.sets": "",
                   "model.vocab_size": H.VOCAB, "model.n_layers": 1, "model.d_model": 32,
                   "model.n_heads": 2, "model.n_kv_heads": 1, "model.d_ff": 64}  # fmt: skip
        return H.tiny(module, cache_dir, **{
            "init_from": sft, "batch_size": 8, "seq_len": 64, "total_steps": 2, "eval_every": 2,
            "ckpt_every": 2, "eval_at_start": True, "log_every": 1, "async_ckpt": False,
            "mesh.data": 4, "mesh.fsdp": 2, "opt.lr": 1e-3,
            **gen, **(student if task == "distill" else {}),
        })  # fmt: skip

    rewards = "counted_rewards:length_parity,format:0.5"
    if task != "grpo":  # sampled held-out answers: GRPO's test covers them (one compile less)
        common["eval_gen.sample_temperature"] = 0.0
    if task == "grpo":
        return _helpers().tiny(grpo_config, cache_dir, init_from=sft, **common,
                               **{"grpo.group_size": 4, "grpo.rewards": rewards})  # fmt: skip
    if task == "online_dpo":  # 16 prompts × 2 samples; minibatches of 8 pairs
        pairs = {**common, "rollout.batch": 32, "online.rewards": rewards}
        return _helpers().tiny(online_dpo_config, cache_dir, init_from=sft, **pairs)
    return _helpers().tiny(ppo_config, cache_dir, init_from=sft, reward_from=rm, **common)


OFFLINE = ("sft", "reward", "dpo", "kto", "distill")


def run(task: str, config, workdir: str):
    return importlib.import_module(f"flaxlm.alignment.{task}").run(config, workdir)


def run_all(tasks, configs, root: str, rewards_dir: str) -> None:
    """Runs each task's config into root/TASK; the reward calls a task logged in
    rewards_dir/calls.<process> move to rewards_dir/TASK.calls.<process> after it."""
    import jax

    for task in tasks:
        run(task, configs[task], os.path.join(root, task))
        calls = os.path.join(rewards_dir, f"calls.{jax.process_index()}")
        if os.path.exists(calls):
            os.replace(calls, os.path.join(rewards_dir, f"{task}.calls.{jax.process_index()}"))


REWARDS = '''
import os
import jax

def length_parity(meta, response):
    """1 for a response of even length; appends a line per call to calls.<process>."""
    with open(os.path.join(os.path.dirname(__file__), f"calls.{jax.process_index()}"), "a") as f:
        f.write(response.replace("\\n", " ") + "\\n")
    return float(len(response) % 2 == 0)
'''


def write_rewards(directory: str) -> None:
    with open(os.path.join(directory, "counted_rewards.py"), "w") as f:
        f.write(REWARDS)


if __name__ == "__main__":
    port, pid, n, root, tasks, sft, rm, cache, rewards_dir = sys.argv[1:10]
    sys.path.insert(0, rewards_dir)
    from flaxlm.train.main import init_distributed

    init_distributed(f"localhost:{port}", int(n), int(pid))
    tasks = tasks.split(",")
    run_all(tasks, {t: config_for(t, sft, rm, cache) for t in tasks}, root, rewards_dir)
