"""Compile once, sync only when logging: after warm-up, a training step, an eval pass or an RL
rollout compiles no XLA program, and the loop reads no device value on the host between its log
steps (pretraining, SFT, DPO, GRPO through the one loop; `generate` and the log-likelihood
scorer on their own).

Warm-up, in the loop tests: the first step (the train step's compile), the first log line, the
first evaluation and the first save (the checkpoint fingerprints' program). Every run here is
6 steps: a log line every 2, an evaluation and a save every 3, so steps 4-6 repeat all of it and
must compile nothing; steps 1, 3 and 5 are no log steps and must read nothing.

By design, and so bounded here rather than zero: an RL run compiles its train step once per
row-width bucket its minibatches are cut to (`rollout.trim_buckets`, alignment/rl_rows.py), and
a rollout its decode program per prompt bucket (a power of two, models/decode_batch.py) and its
scoring per width bucket. Those compiles happen at rollouts (the batch source's boundaries) or
at the first step of a width.

How it is measured:
  * compiles: a `jax.monitoring` listener on "/jax/core/compile/backend_compile_duration" (jax
    records it around every backend compile, persistent-cache hit or not: pxla
    `_cached_compilation`), attributed to the number of batches the loop had drawn then;
  * host reads: `ArrayImpl._value` (what `np.asarray`, `float`, `int`, `bool`, `.item()`,
    `.tolist()` and `jax.device_get` of a jax.Array all go through) is wrapped for the test and
    every read outside the loop's logging, evaluation, checkpointing and rollout-boundary code
    is recorded with its caller. `jax.transfer_guard("disallow")`, which the loop sets around
    the step, does nothing on CPU (host memory is the device's), so it cannot be the check here.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import os
import traceback

import jax
import pytest

from flaxlm.configs import pretrain as pretrain_config
from flaxlm.configs.common import override
from flaxlm.models.sharding import make_mesh
from flaxlm.train import checkpoint as ckpt_lib
from flaxlm.train import loop, pretrain

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

# The loop's parts that may read the device: a log step (with its guard check and rollback), an
# eval, the end of the data; besides, a save (`Checkpointer.save`) and a rollout made at the
# batch source's boundary (`loop._before_step`).
ALLOWED = ("_log_and_guard", "_log_window", "_maybe_eval", "_end_of_data")


class _Counting:
    """The task's batch source, counting the batches drawn (state and boundary passed on)."""

    def __init__(self, inner, probe):
        self.inner, self.probe = inner, probe

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        self.probe.step += 1
        return batch

    def __getattr__(self, name):  # get_state / set_state / at_boundary / tokenizer ...
        return getattr(self.inner, name)


@dataclasses.dataclass
class Probe:
    """What a run compiled and read on the host, by the number of batches drawn at the time."""

    step: int = 0  # batches drawn: the loop's step once the batch is trained (0: init, restore)
    compiles: list = dataclasses.field(default_factory=list)  # (step, program name)
    reads: list = dataclasses.field(default_factory=list)  # (step, caller) outside ALLOWED
    allowed: int = 0  # depth of ALLOWED calls in progress
    allowed_reads: int = 0  # host reads inside ALLOWED (the log lines': the hook works)

    def compiled_after(self, step: int) -> list:
        return [c for c in self.compiles if c[0] > step]

    def reads_after(self, step: int) -> list:
        return [r for r in self.reads if r[0] > step]


def _caller() -> str:
    """The innermost flaxlm frame outside this file: where a host read came from."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename
        if name.startswith(REPO) and not name.startswith(HERE) and "site-packages" not in name:
            return f"{os.path.relpath(frame.filename, REPO)}:{frame.lineno} {frame.name}"
    return "?"


@pytest.fixture
def probe(monkeypatch):
    """Installs the compile listener and the host-read hook for one test."""
    from jax._src.array import ArrayImpl

    p = Probe()

    def on_duration(event, duration, **kw):
        if event == COMPILE_EVENT:
            p.compiles.append((p.step, f"{kw.get('fun_name', '?')} from {_caller()}"))

    jax.monitoring.register_event_duration_secs_listener(on_duration)

    value = ArrayImpl._value

    def guarded_value(self):
        if p.step >= 1 and not p.allowed:
            p.reads.append((p.step, _caller()))
        p.allowed_reads += bool(p.allowed)
        return value.fget(self)

    monkeypatch.setattr(ArrayImpl, "_value", property(guarded_value))

    def allow(fn):
        def wrapped(*a, **k):
            p.allowed += 1
            try:
                return fn(*a, **k)
            finally:
                p.allowed -= 1

        return wrapped

    for name in ALLOWED:
        monkeypatch.setattr(loop, name, allow(getattr(loop, name)))
    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", allow(ckpt_lib.Checkpointer.save))
    before = loop._before_step

    def before_step(task, state, meter):
        # A rollout (generation, scoring: host work by design) at the boundary; elsewhere the
        # hook must return at once, reading nothing.
        if loop._at_boundary(task):
            return allow(before)(task, state, meter)
        return before(task, state, meter)

    monkeypatch.setattr(loop, "_before_step", before_step)
    try:
        yield p
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)


def run_counted(module, config, workdir, probe, **build_kw):
    """`module.run(config, workdir)` with the task's batches counted by `probe`."""
    loop.check_cadence(config)
    mesh = make_mesh(dict(config.mesh))
    task = module.build_task(config, mesh, str(workdir), **build_kw)
    task.train_batches = _Counting(task.train_batches, probe)
    return loop.run(config, str(workdir), task, mesh=mesh)


def _fmt(items) -> str:
    counts = collections.Counter(items)
    return "\n".join(f"  {n}x {k}" for k, n in counts.most_common())


def _config(module, arg: str = "variant=tiny,runlocal=True", **overrides):
    c = module.get_config(arg)
    return override(c, {"progress_bar": False, "eval_at_start": False, "total_steps": 6,
                        "log_every": 2, "eval_every": 3, "ckpt_every": 3, "async_ckpt": False,
                        **overrides})  # fmt: skip


WARM = 3  # steps of warm-up (module docstring)


def _check_loop(probe, summary) -> None:
    assert summary["step"] == 6
    assert probe.compiles, "the listener saw no compile: the event name is stale"
    late = probe.compiled_after(WARM)
    assert not late, "compiled after warm-up:\n" + _fmt(n for _, n in late)
    assert not probe.reads, "host reads between log steps:\n" + _fmt(r for _, r in probe.reads)
    assert probe.allowed_reads, "no host read seen at the log steps: the hook is stale"


def test_pretraining_compiles_once_and_reads_only_at_log_steps(tmp_path, probe):
    # With an EMA of the weights (its evaluation and its update in the step) and eval_at_start
    # (an evaluation of the init's params, before any train step placed them).
    c = _config(pretrain_config, "variant=tiny,runlocal=True,data=markov", eval_at_start=True,
                **{"data.eval_batches": 2, "ema.decay": 0.9})  # fmt: skip
    _, summary = run_counted(pretrain, c, tmp_path, probe)
    _check_loop(probe, summary)
    assert "eval_ema/nll" in summary["eval"]


# --- alignment stages (the small world's tokenizer, a random tiny SFT run) ----------------------

_spec = importlib.util.spec_from_file_location(
    "rl_helpers", os.path.join(REPO, "tests", "alignment", "rl_helpers.py")
)
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(sft run, reward-model run, tokenizer cache) with random tiny params."""
    root = tmp_path_factory.mktemp("compile_once")
    cache = root / "tokenizer_cache"
    return (*H.fake_runs(str(root), str(cache)), str(cache))


def _aligned(module, runs, **overrides):
    sft_dir, _, cache = runs
    c = _config(module, init_from=sft_dir, **{"batch_size": 8, "seq_len": 64, **overrides})
    with c.unlocked():  # the small world and its tokenizer (H.tiny's settings)
        c.data.world, c.data.builtin_vocab_size, c.data.cache_dir = "small", H.VOCAB, cache
    return c


def test_sft_compiles_once_and_reads_only_at_log_steps(runs, tmp_path, probe):
    # The evaluation includes a generation eval (models/decode.py generate, one batch).
    from flaxlm.alignment import sft
    from flaxlm.configs import sft as sft_config

    c = _aligned(sft_config, runs, **{"eval_gen.sets": "builtin:sft_heldout",
                                      "eval_gen.examples": 8, "eval_gen.batch": 8,
                                      "eval_gen.max_new_tokens": 4,
                                      "eval_gen.max_prompt_len": 48})  # fmt: skip
    _, summary = run_counted(sft, c, tmp_path, probe)
    _check_loop(probe, summary)
    assert any(k.startswith("eval/sft_heldout/") for k in summary["eval"])


def test_dpo_compiles_once_and_reads_only_at_log_steps(runs, tmp_path, probe):
    from flaxlm.alignment import dpo
    from flaxlm.configs import dpo as dpo_config

    c = _aligned(dpo_config, runs, **{"eval_gen.sets": ""})
    _, summary = run_counted(dpo, c, tmp_path, probe)
    _check_loop(probe, summary)
    assert "eval/accuracy" in summary["eval"]


def test_grpo_compiles_once_per_bucket_and_reads_only_at_rollouts(runs, tmp_path, probe):
    """Rollouts of 16 rows in 2 minibatches: a rollout at steps 1, 3 and 5 (the boundaries,
    where the loop lets it read the device), no evaluation. The train step compiles once per
    row width the minibatches are cut to, at most `rollout.trim_buckets`; after the first
    rollout's steps, anything else compiled is a rollout's (decode, scoring) for a new bucket."""
    from flaxlm.alignment import grpo
    from flaxlm.configs import grpo as grpo_config

    c = _aligned(grpo_config, runs, **{
        "seq_len": 48, "rollout.batch": 16, "grpo.group_size": 4, "rollout.max_prompt_len": 32,
        "rollout.max_new_tokens": 6, "grpo.rewards": "format,judge:0.5", "eval_every": 0,
    })  # fmt: skip
    _, summary = run_counted(grpo, c, tmp_path, probe)
    assert summary["step"] == 6
    assert not probe.reads, "host reads between rollouts and log steps:\n" + _fmt(
        r for _, r in probe.reads
    )
    steps = [n for _, n in probe.compiles if n.startswith("jit(train_step) ")]
    assert 1 <= len(steps) <= c.rollout.trim_buckets, _fmt(steps)
    late = [n for n in (n for _, n in probe.compiled_after(WARM)) if n not in steps]
    rollout = ("alignment/rl_", "alignment/grpo", "models/decode")
    assert all(n.split(" from ")[1].startswith(rollout) for n in late), _fmt(late)


def test_generate_and_loglik_compile_once_per_bucket(runs):
    """Another prompt batch in the same prompt bucket, another temperature, other stop ids, new
    keys: the decode program is reused (module docstring of models/decode.py); another scorer of
    the same model and other requests of the same lengths reuse the scoring program."""
    from flaxlm.evaluation.loglik import LoglikScorer
    from flaxlm.models.config import get_variant
    from flaxlm.models.decode import generate
    from flaxlm.models.sharding import logical_axis_rules
    from flaxlm.train.pretrain import model_fns

    cfg = get_variant("tiny", vocab_size=H.VOCAB)
    mesh, rules = make_mesh({"data": -1}), logical_axis_rules("fsdp")
    params = H.placed_params(model_fns(cfg)[0], mesh, rules)
    names = []

    def on_duration(event, duration, **kw):
        if event == COMPILE_EVENT:
            names.append(kw.get("fun_name", "?"))

    def gen(prompts, seed, temperature, stop):
        out = generate(
            cfg,
            params,
            prompts,
            max_new_tokens=5,
            rng=jax.random.PRNGKey(seed),
            temperature=temperature,
            stop_tokens=stop,
            mesh=mesh,
            rules=rules,
        )
        return jax.device_get(out)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        gen([[1, 2, 3, 4, 5]] * 8, 0, 1.0, [3])  # warm-up: prompt bucket 8
        LoglikScorer(cfg, params, batch_tokens=256).score([([1, 2, 3], [4, 5])] * 4)
        assert names, "the listener saw no compile: the event name is stale"
        names.clear()
        gen([[7, 8, 9]] * 3 + [[1] * 7] * 5, 1, 0.7, [3, 4, 5])
        gen([[9] * 8] * 8, 2, 1.3, [2])  # (stop ids are traced, padded to 4)
        scorer = LoglikScorer(cfg, params, batch_tokens=256)
        scorer.score([([5, 6, 7], [4, 9])] * 4)
        scorer.score([([5, 6, 7, 1], [4])] * 3)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
    assert not names, _fmt(names)
