"""bench/alignment_throughput.py on the tiny shape, in-process: the DPO and PPO records carry sane
throughput figures and a consistent PPO time split, and the table renders them (a smoke test of
the bench, not a timing test: no figure is compared with a threshold)."""

import math

import pytest

from flaxlm.bench import alignment_throughput as A


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One chain (tokenizer, SFT and reward-model checkpoints) for every case of this file."""
    return str(tmp_path_factory.mktemp("align_bench"))


# The PPO case checks "all stopped" every 4 tokens (`c4`, the blocked stop checks; every token,
# the default, is the rollout loop test_ppo.py trains with) and trains LoRA adapters of rank 4 on
# the policy (`lora4`; full fine-tuning: test_ppo.py). One PPO case serves every test here.
PPO = "tiny:ppo:c4:lora4"
GRPO = "tiny:grpo"


@pytest.fixture(scope="module")
def records(work):
    return {c: A.run_case(c, work, steps=2, iters=1) for c in ("tiny:dpo", PPO, GRPO)}


def test_dpo_record(records):
    r = records["tiny:dpo"]
    assert r["algo"] == "dpo" and r["ref_logps"] == "precompute"
    assert r["tokens_per_step"] == 2 * r["batch_pairs"] * r["seq_len"]
    assert r["step_time_s"] > 0 and r["tokens_per_s"] > 0
    assert math.isclose(r["tokens_per_s"] * r["step_time_s"], r["tokens_per_step"], rel_tol=1e-9)
    assert 0 < r["nonpad_fraction"] <= 1
    assert (r["batch_pairs"], r["seq_len"]) == A.SHAPES["tiny"]["dpo"]
    assert r["flops_per_token"] > 0
    assert r["mfu"] is None or r["mfu"] > 0  # no known peak on a CPU
    assert math.isfinite(r["loss"])


@pytest.mark.parametrize("case", [PPO, GRPO])
def test_ppo_record_time_split(records, case):
    r = records[case]
    assert r["algo"] == case.split(":")[1]
    for k in ("gen_s", "score_s", "train_s"):
        assert r[k] > 0, k
    assert math.isclose(r["gen_s"] + r["score_s"] + r["train_s"], r["iteration_s"], rel_tol=1e-9)
    assert 0 < r["gen_share"] < 1
    # the loop's wall time of an iteration covers the three timers, up to timer boundaries
    assert r["iteration_wall_s"] > 0.5 * r["iteration_s"]
    assert math.isclose(r["other_s"], r["iteration_wall_s"] - r["iteration_s"], rel_tol=1e-9)
    assert math.isclose(r["gen_share"], r["gen_s"] / r["iteration_s"], rel_tol=1e-9)
    assert math.isclose(r["gen_share"] + r["score_share"] + r["train_share"], 1.0, rel_tol=1e-9)
    assert 0 < r["response_len"] <= r["max_new_tokens"]
    assert r["seq_len"] == r["max_prompt_len"] + r["max_new_tokens"]
    assert r["rollout_tokens_per_s"] > 0 and r["train_tokens_per_s"] > 0
    rows = r["epochs"] * r["rollout_batch"]
    assert math.isclose(r["train_tokens_per_s"] * r["train_s"], rows * r["seq_len"], rel_tol=1e-9)
    assert r["steps_per_iter"] == rows // r["minibatch"]
    assert r["warmup_iter_s"] > r["iteration_s"]  # iteration 0 compiled, and is left out


def test_ppo_blocked_stop_checks(records):
    """`cN`: rollouts test "all stopped" every N tokens (the stop-token loop PPO runs)."""
    r = records[PPO]
    assert r["check_every"] == 4 and r["gen_s"] > 0
    assert 0 < r["response_len"] <= r["max_new_tokens"]


def test_ppo_lora_flops_leave_out_the_frozen_weights_gradients(records):
    """`loraN`: the policy's FLOPs per token drop the frozen weights' gradients (2·N_matmul),
    the critic's those of its backbone (it has no LM head); the attention terms count in
    full."""
    from flaxlm.models.config import get_variant

    r = records[PPO]
    cfg = get_variant("tiny", vocab_size=r["vocab"])
    full = cfg.flops_per_token(r["seq_len"])
    head = 6 * cfg.vocab_size * cfg.d_model
    assert r["lora_rank"] == 4
    n, vd = cfg.param_counts()["matmul"], cfg.vocab_size * cfg.d_model
    assert r["flops_per_token"] == (full - 2 * n) + (full - head - 2 * (n - vd))
    assert "LoRA rank 4" in A.table([r])


@pytest.mark.parametrize("algo", ["dpo", "ppo", "grpo"])
def test_lora_run_counts_the_flops_its_benchmark_counts(work, tmp_path, algo):
    """A LoRA run's own MFU (the task's FLOPs per token, what the loop divides by) and the
    bench's record count one figure: 4·N_matmul for the frozen base (no weight gradients), not
    the loop's 6·N beside the bench's 4·N (1.34x apart on this shape before)."""
    import importlib

    from flaxlm.alignment import common
    from flaxlm.models.config import ModelConfig
    from flaxlm.models.sharding import make_mesh

    sft, rm, _ = A.build_chain(work, "tiny")
    only = {"ppo": {"reward_from": rm}, "grpo": {"grpo.rewards": "format"}}.get(algo, {})
    overrides = {"batch_size": 8, "seq_len": 96, **only, **A._lora_overrides(4)}
    config = A._base(importlib.import_module(f"flaxlm.configs.{algo}"), "tiny", sft, **overrides)
    task = importlib.import_module(f"flaxlm.alignment.{algo}").build_task(
        config, make_mesh(dict(config.mesh)), str(tmp_path)
    )
    cfg = ModelConfig.from_dict(common.source_meta(sft)["model_config"])
    if algo == "dpo":
        bench = (A._policy_flops(cfg, 96, 4), A._policy_flops(cfg, 96, 4, causal=True))
    else:
        bench = A._rl_flops(cfg, 96, 4, algo)
    assert (task.flops_per_token, task.flops_per_token_causal) == bench
    # and that count is the LoRA one: the frozen weights' gradients (2·N_matmul) left out
    n = cfg.param_counts()["matmul"]
    assert A._policy_flops(cfg, 96, 4) == cfg.flops_per_token(96) - 2 * n


def test_table_and_case_parsing(records):
    md = A.table([*records.values(), {"case": "1b:ppo", "error": "RuntimeError: boom"}])
    lines = md.splitlines()
    assert len(lines) == 2 + 4
    assert lines[2].startswith("| tiny:dpo |") and lines[3].startswith(f"| {PPO} |")
    assert f"{records[PPO]['gen_share']:.1%}" in lines[3] and lines[4].startswith(f"| {GRPO} |")
    assert "failed: RuntimeError: boom" in lines[5]
    want = {"online": False, "new": 64, "attention": "xla", "check_every": 8,
            "decode_attention": "auto", "lora": 0, "flags": ["cmdbuf"]}  # fmt: skip
    assert A.parse_case("1b:ppo:g64:xla:c8:cmdbuf") == ("1b", "ppo", want)
    assert A.parse_case("125m:ppo:c8:pallas")[2]["decode_attention"] == "pallas"
    assert A.parse_case("125m:ppo:c8:decode_xla")[2]["decode_attention"] == "xla"
    assert A.parse_case("125m:dpo:online")[2]["online"]
    assert A.parse_case("125m:dpo:lora16")[2]["lora"] == 16
    assert A.parse_case("1b:grpo:g64:c8:lora8")[2] == {**want, "attention": "cudnn",
                                                      "lora": 8, "flags": []}  # fmt: skip
    for bad in (
        "tiny",
        "tiny:sft",
        "7b:dpo",
        "tiny:dpo:g8",
        "tiny:ppo:online",
        "tiny:dpo:c8",
        "tiny:dpo:pallas",
        "tiny:ppo:lora0",
        "tiny:ppo:lora",
        "tiny:grpo:online",
    ):
        with pytest.raises(ValueError):
            A.parse_case(bad)


def test_grpo_record_counts_the_policy_alone(records):
    """A GRPO case: groups of GRPO_GROUP, and training FLOPs of the policy only (no critic)."""
    from flaxlm.models.config import get_variant

    r = records[GRPO]
    cfg = get_variant("tiny", vocab_size=r["vocab"])
    assert r["group_size"] == A.GRPO_GROUP and r["rollout_batch"] % A.GRPO_GROUP == 0
    assert r["flops_per_token"] == cfg.flops_per_token(r["seq_len"])
    assert "groups of 4" in A.table([r])


def test_a_failed_rl_case_names_where_the_non_finite_values_are(tmp_path):
    """The guard's "8 bad steps in a row" alone (the 2026-12-04 lease's PPO cases) says nothing
    of where a NaN entered: the record now carries each logged row's non-finite keys and the
    rollout's scores, KL and decoder gap."""
    import json

    rows = [{"step": 4, "loss": 0.5, "rollout/score_mean": 0.1, "rollout/kl": 0.0},
            {"step": 8, "skipped_loss": float("nan"), "rollout/score_mean": float("nan"),
             "rollout/logprob_gap": 0.02, "lr": 1e-5}]  # fmt: skip
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    got = json.loads(A.failure_details(str(tmp_path)))
    assert got == [
        {"step": 4, "nonfinite": [], "rollout/score_mean": 0.1, "rollout/kl": 0.0},
        {"step": 8, "nonfinite": ["rollout/score_mean", "skipped_loss"],
         "rollout/logprob_gap": 0.02},
    ]  # fmt: skip
    assert A.failure_details(str(tmp_path / "none")).startswith("no metrics (")
