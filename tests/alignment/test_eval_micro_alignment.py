"""The alignment trainers' held-out evals run each batch in `opt.grad_accum` micro-batches, as
their train steps do (train/step.py `eval_step`, `eval_rows`). Each compiled its eval over the
whole batch — for DPO and KTO both sides' rows, full-batch float32 logits included — so a run
that needs grad_accum to fit its train step could run out of memory in the eval at step 0
(`eval_at_start`). The metrics are those of the unsplit eval (float rounding); the eval
program's temporary memory that of one micro-batch.

The eval programs are found without naming them: every function a trainer's `make_eval_fn`
jits is recorded with the arguments of its last call, then compiled again for its memory."""

import importlib.util
import json
import os

import jax
import pytest

from flaxlm.alignment import distill, dpo, kto, reward, sft
from flaxlm.configs import distill as distill_config
from flaxlm.configs import dpo as dpo_config
from flaxlm.configs import kto as kto_config
from flaxlm.configs import reward as reward_config
from flaxlm.configs import sft as sft_config
from flaxlm.models.sharding import logical_axis_rules, make_mesh, use_mesh

_spec = importlib.util.spec_from_file_location(
    "rl_helpers", os.path.join(os.path.dirname(__file__), "rl_helpers.py")
)
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

BATCH = 32  # rows (pairs, examples): 8 devices × 4 micro-batches of one row per device
ACCUM = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    return H.fake_runs(str(tmp_path_factory.mktemp("eval_micro_runs")), cache_dir)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Paths of small record files: chats, preference pairs, labelled completions."""
    root = tmp_path_factory.mktemp("eval_micro_data")
    rows = {
        # (long enough that a packed row holds one or two: a few full batches)
        "chats": [{"messages": [{"role": "user", "content": f"What is {i} plus {i % 7}? " * 3},
                                {"role": "assistant", "content": f"The answer is {i + i % 7}."}]}
                  for i in range(96)],
        "pairs": [{"prompt": f"What is {i} plus 3?", "chosen": f"The answer is {i + 3}.",
                   "rejected": f"The answer is {i + 4}, I think so."} for i in range(BATCH)],
        "unpaired": [{"prompt": f"What is {i} plus 3?", "completion": f"The answer is "
                      f"{i + 3 + i % 2}.", "label": i % 2 == 0} for i in range(BATCH)],
    }  # fmt: skip
    for name, recs in rows.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return {name: str(root / f"{name}.jsonl") for name in rows}


def _record_eval_programs(monkeypatch, module) -> list:
    """[(jitted function, [args of its calls])] of every function `module.make_eval_fn` jits."""
    made, real_jit, real_make = [], jax.jit, module.make_eval_fn

    def jit(fun, *a, **k):
        jitted, calls = real_jit(fun, *a, **k), []
        made.append((jitted, calls))

        def call(*args):
            calls[:] = [args]
            return jitted(*args)

        return call

    def make_eval_fn(*a, **k):
        with monkeypatch.context() as m:
            m.setattr(jax, "jit", jit)
            return real_make(*a, **k)

    monkeypatch.setattr(module, "make_eval_fn", make_eval_fn)
    return made


def _evaluate(monkeypatch, module, config, seed: int = 5) -> tuple[dict, int]:
    """(eval metrics of random params, the largest temporary memory of its eval programs)."""
    mesh = make_mesh(dict(config.mesh))
    with monkeypatch.context() as m:  # (undone after each build: one recorder at a time)
        made = _record_eval_programs(m, module)
        task = module.build_task(config, mesh, None)
    params = H.random_params(task.init_params, seed)  # (not the reference: seed 0)
    metrics = task.eval_fn(params)
    temp = 0
    with use_mesh(mesh, logical_axis_rules(config.sharding)):
        for jitted, calls in made:
            for args in calls:
                stats = jitted.lower(*args).compile().memory_analysis()
                temp = max(temp, stats.temp_size_in_bytes)
    assert temp > 0, "no eval program was called"
    return metrics, temp


def _same_metrics_less_memory(monkeypatch, module, configs):
    (one, temp1), (acc, temp_n) = (_evaluate(monkeypatch, module, configs(n))
                                   for n in (1, ACCUM))  # fmt: skip
    assert set(one) == set(acc) and "loss" in one, (sorted(one), sorted(acc))
    for k in one:
        assert acc[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6), k
    # (the whole batch's float32 logits — 32 rows, DPO's and KTO's 64, × 64 × 512 × 4 B / 8
    # devices — or the reward model's activations, against a micro-batch's)
    assert temp_n < 0.5 * temp1, (temp1, temp_n)
    return one


def _configs(config_module, cache_dir, gen: bool = True, **overrides):
    """grad_accum -> the trainer's tiny config; `gen`: it has generation sets (none here)."""
    common = {"batch_size": BATCH, "seq_len": 64, "eval_every": 1,
              **({"eval_gen.sets": ""} if gen else {}), **overrides}  # fmt: skip
    return lambda n: H.tiny(config_module, cache_dir, **common, **{"opt.grad_accum": n})


def test_sft_eval_in_micro_batches(monkeypatch, runs, data, cache_dir):
    configs = _configs(sft_config, cache_dir, init_from=runs[0], **{
        "data.train": data["chats"], "data.eval": data["chats"]})  # fmt: skip
    one = _same_metrics_less_memory(monkeypatch, sft, configs)
    assert {"loss", "nll", "accuracy"} <= set(one)


def test_dpo_eval_in_micro_batches(monkeypatch, runs, data, cache_dir):
    """Preference batches split by pairs: a pair's chosen and rejected rows stay together."""
    configs = _configs(dpo_config, cache_dir, init_from=runs[0], **{
        "data.train": data["pairs"], "data.eval": data["pairs"], "dpo.sft_coef": 0.5})  # fmt: skip
    one = _same_metrics_less_memory(monkeypatch, dpo, configs)
    assert {"accuracy", "margin", "logp_accuracy", "pref_loss", "sft_nll"} <= set(one)


def test_reward_eval_in_micro_batches(monkeypatch, runs, data, cache_dir):
    configs = _configs(reward_config, cache_dir, gen=False, init_from=runs[0], **{
        "data.train": data["pairs"], "data.eval": data["pairs"]})  # fmt: skip
    one = _same_metrics_less_memory(monkeypatch, reward, configs)
    assert {"accuracy", "margin", "reward_mean"} <= set(one)


def test_kto_eval_in_micro_batches(monkeypatch, runs, data, cache_dir):
    """The held-out z0 is one estimate over the whole held-out set's mismatched rows (the
    module docstring), whatever the micro-batches: the eval's metrics do not change."""
    configs = _configs(kto_config, cache_dir, init_from=runs[0], **{
        "data.train": data["unpaired"], "data.eval": data["unpaired"]})  # fmt: skip
    one = _same_metrics_less_memory(monkeypatch, kto, configs)
    assert {"kl", "kl_unclamped", "accuracy", "margin"} <= set(one)


def test_distill_eval_in_micro_batches(monkeypatch, runs, data, cache_dir):
    """The teacher is the eval step's argument, as the train step's."""
    configs = _configs(distill_config, cache_dir, **{
        "distill.teacher": runs[0], "model.vocab_size": H.VOCAB, "model.n_layers": 1,
        "model.d_model": 32, "model.n_heads": 2, "model.n_kv_heads": 1, "model.d_ff": 64,
        "data.train": data["chats"], "data.eval": data["chats"]})  # fmt: skip
    one = _same_metrics_less_memory(monkeypatch, distill, configs)
    assert {"kd", "nll", "agreement", "teacher_nll"} <= set(one)
