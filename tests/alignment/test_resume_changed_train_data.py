"""Every alignment trainer's data state records what data.train's files held, and a resume over
files changed since is refused naming data.train (or, with
`--config.data.on_changed_sources=warn`, resumes with a warning) — the chat batches' check
(data/chat_batches.py), wired through the trainers. The SFT, DPO, KTO, reward and distillation
batches were built without the policy (the error advised a key the alignment configs did not
have), and the RL prompt cursor (PPO, GRPO, online DPO, on-policy distillation) saved only its
position into the prompts' shuffled order, resuming silently over changed prompts.

Each test builds the trainer's batch source, takes its state as a checkpoint stores it, appends
records to the file and builds the source again, as a resume does."""

import importlib.util
import json
import logging
import os
import re

import pytest

from flaxlm.alignment import distill, dpo, grpo, kto, reward, sft
from flaxlm.configs import distill as distill_config
from flaxlm.configs import dpo as dpo_config
from flaxlm.configs import grpo as grpo_config
from flaxlm.configs import kto as kto_config
from flaxlm.configs import reward as reward_config
from flaxlm.configs import sft as sft_config
from flaxlm.data.source_errors import DataError
from flaxlm.models.sharding import make_mesh

_spec = importlib.util.spec_from_file_location(
    "rl_helpers", os.path.join(os.path.dirname(__file__), "rl_helpers.py")
)
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)


def _chat(i):
    return {"messages": [{"role": "user", "content": f"What is {i} plus 2?"},
                         {"role": "assistant", "content": f"It is {i + 2}."}]}  # fmt: skip


RECORDS = {  # trainer -> one record of its data.train
    "sft": _chat,
    "distill": _chat,
    "dpo": lambda i: {"prompt": f"What is {i} plus 3?", "chosen": f"It is {i + 3}.",
                      "rejected": f"It is {i + 4}."},
    "reward": lambda i: {"prompt": f"What is {i} plus 3?", "chosen": f"It is {i + 3}.",
                         "rejected": f"It is {i + 4}."},
    "kto": lambda i: {"prompt": f"What is {i} plus 3?", "completion": f"It is {i + 3 + i % 2}.",
                      "label": i % 2 == 0},
    "grpo": lambda i: {"prompt": f"What is {i} plus 5?", "answer": str(i + 5)},
}  # fmt: skip
MODULES = {"sft": (sft, sft_config), "distill": (distill, distill_config),
           "dpo": (dpo, dpo_config), "reward": (reward, reward_config),
           "kto": (kto, kto_config), "grpo": (grpo, grpo_config)}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    return H.fake_runs(str(tmp_path_factory.mktemp("changed_runs")), cache_dir)


def _write(path, kind, ids, mode="w"):
    with open(path, mode) as f:
        f.writelines(json.dumps(RECORDS[kind](i)) + "\n" for i in ids)


def _source(kind, runs, cache_dir, path, **overrides):
    """The trainer's training batch source, built as a (re)started run builds it."""
    module, config_module = MODULES[kind]
    keys = {"data.train": path, "data.eval": "", "batch_size": 8, "seq_len": 48, **overrides}
    if kind == "distill":
        keys.update({"distill.teacher": runs[0], "model.vocab_size": H.VOCAB,
                     "model.n_layers": 1, "model.d_model": 32, "model.n_heads": 2,
                     "model.n_kv_heads": 1, "model.d_ff": 64})  # fmt: skip
    else:
        keys["init_from"] = runs[0]
    if kind in ("distill", "sft", "dpo", "kto", "grpo"):
        keys["eval_gen.sets"] = ""
    if kind == "grpo":
        keys.update({"rollout.batch": 8, "grpo.group_size": 2, "rollout.max_prompt_len": 32,
                     "rollout.max_new_tokens": 4})  # fmt: skip
    c = H.tiny(config_module, cache_dir, **keys)
    mesh = make_mesh(dict(c.mesh))
    if kind == "grpo":
        task = module.build_task(c, mesh, None, rewards=[("one", lambda m, t: 1.0, 1.0)])
    else:
        task = module.build_task(c, mesh, None)
    return task.train_batches


@pytest.mark.parametrize("kind", sorted(RECORDS))
def test_a_resume_over_changed_train_files_is_refused_naming_data_train(
    kind, runs, cache_dir, tmp_path, caplog
):
    path = str(tmp_path / f"{kind}.jsonl")
    _write(path, kind, range(24))
    first = _source(kind, runs, cache_dir, path)
    # as the checkpoint stores it (JSON); RL: before any rollout, the cursor at its start
    state = json.loads(json.dumps(first.get_state()))
    assert state["sources"][0]["docs"] == 24, state

    _write(path, kind, range(24, 30), "a")  # records added after the save
    want = (
        rf"data\.train changed.*{re.escape(path)}: .*documents 24 -> 30\).*"
        r"--config\.data\.on_changed_sources=warn"
    )
    with pytest.raises(DataError, match=want):
        _source(kind, runs, cache_dir, path).set_state(state)

    caplog.set_level(logging.WARNING)
    warned = _source(kind, runs, cache_dir, path, **{"data.on_changed_sources": "warn"})
    warned.set_state(state)  # the key the message names exists, and resumes anyway
    assert "resuming anyway: data.on_changed_sources=warn" in caplog.text


@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_an_unchanged_file_resumes_and_a_bad_policy_is_named(kind, runs, cache_dir, tmp_path):
    path = str(tmp_path / f"{kind}.jsonl")
    _write(path, kind, range(24))
    state = json.loads(json.dumps(_source(kind, runs, cache_dir, path).get_state()))
    _source(kind, runs, cache_dir, path).set_state(state)  # no error, nothing changed
    with pytest.raises(ValueError, match="data.on_changed_sources must be one of"):
        _source(kind, runs, cache_dir, path, **{"data.on_changed_sources": "ignore"})
