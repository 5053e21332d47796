"""EMA of the weights (train/ema.py) through the step, the loop, checkpoints and the readers.

* the step's EMA equals an independent numpy recurrence over the params it produced (with and
  without warmup; a step the guard skips moves neither the EMA nor its count);
* off by default: the state, its checkpoint and the metrics have no EMA; turned on, training
  itself (losses, params, held-out eval) is bit for bit the same, and `eval_ema/*` is logged;
* a run killed (SIGKILL) and resumed ends with the uninterrupted run's state bit for bit, EMA
  included, as tests/train/test_loop.py checks for the rest;
* a step saved without an EMA resumes into an EMA run with the EMA at its params (warned), and
  an EMA step into a run without one drops it (warned);
* sharded over data×fsdp×tensor the EMA is sharded like the params and matches one device;
* readers: `load_params` / `load_model` with ema=True give the saved EMA; a run without one is
  an error naming the step; a LoRA SFT run averages only its adapters, and its EMA weights
  (merged) go through `generate --ema`, HF export `--ema` and `python -m flaxlm.evaluation
  --ema`.
"""

import logging
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from flaxlm.configs import pretrain as pretrain_config
from flaxlm.configs import sft as sft_config
from flaxlm.configs.common import override
from flaxlm.models.sharding import logical_axis_rules, make_mesh, shard_batch, use_mesh
from flaxlm.train import checkpoint as ckpt_lib
from flaxlm.train import loop, pretrain
from flaxlm.train.metrics import read_metrics
from flaxlm.train.optim import make_optimizer
from flaxlm.train.state import (
    EmaTrainState,
    TrainState,
    abstract_state,
    create_train_state,
    state_shardings,
    unbox,
)
from flaxlm.train.step import jit_train_step

STEPS = 8
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(ema=0.0, **overrides):
    """The tiny markov pretraining config, 8 steps, saves at 4 and 8; `ema`: ema.decay."""
    c = pretrain_config.get_config("variant=tiny,runlocal=True,data=markov")
    return override(c, {"progress_bar": False, "eval_at_start": False, "total_steps": STEPS,
                        "log_every": 1, "eval_every": STEPS, "ckpt_every": STEPS // 2,
                        "keep_ckpts": 0, "opt.warmup_steps": 1, "ema.decay": ema,
                        **overrides})  # fmt: skip


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _bitwise(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    return all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"plain": (workdir, state), "ema": (workdir, state)}: the same 8 steps without and with
    an EMA (decay 0.9), checkpoints at 4 and 8."""
    out = {}
    for name, decay in (("plain", 0.0), ("ema", 0.9)):
        workdir = str(tmp_path_factory.mktemp(name))
        state, _ = pretrain.run(_config(ema=decay), workdir)
        out[name] = (workdir, jax.device_get(state))
    return out


@pytest.mark.parametrize("warmup", [True, False])
def test_the_ema_is_a_numpy_recurrence_over_the_params(warmup):
    decay, skip = 0.8, 2  # batch 2's loss mask is NaN: the guard skips that update
    c = _config(ema=decay)
    mesh = make_mesh({"data": -1})
    rules = logical_axis_rules(c.sharding)
    task = pretrain.build_task(c, mesh)
    tx, schedule = make_optimizer(c.opt, c.total_steps)
    with use_mesh(mesh, rules):
        state, shardings = create_train_state(task.init_params, tx, mesh, rules, 0, ema=True)
        step = jit_train_step(task.loss_fn, tx, schedule, c.guard, 1, shardings, mesh,
                              ema_decay=decay, ema_warmup=warmup)  # fmt: skip
        assert _bitwise(state.ema, state.params)  # it starts at the initial weights
        params, decays = [_leaves(state.params)], []
        for i in range(6):
            batch = next(task.train_batches)
            if i == skip:
                batch["loss_mask"] = batch["loss_mask"] * np.nan
            state, metrics = step(state, shard_batch(batch, mesh))
            params.append(_leaves(state.params))
            decays.append(float(metrics["ema_decay"]))
    ema, n, want_decays = [p.astype(np.float64) for p in params[0]], 0, []
    for i, p in enumerate(params[1:]):
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        want_decays.append(d)
        if i == skip:
            assert all(np.array_equal(a, b) for a, b in zip(p, params[i]))  # skipped
            continue
        ema = [d * e + (1 - d) * x.astype(np.float64) for e, x in zip(ema, p)]
        n += 1
    assert int(state.ema_count) == n == 5
    np.testing.assert_allclose(decays, want_decays, rtol=1e-6)
    for got, want in zip(_leaves(state.ema), ema):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert not _bitwise(state.ema, state.params)


def test_off_by_default_and_on_it_leaves_training_unchanged(runs):
    assert pretrain_config.get_config("variant=tiny").ema.decay == 0.0
    (plain_dir, plain), (ema_dir, ema) = runs["plain"], runs["ema"]
    assert type(plain) is TrainState and isinstance(ema, EmaTrainState)
    keys = ckpt_lib.saved_state_keys(os.path.join(plain_dir, "checkpoints", str(STEPS)))
    assert keys == {"step", "params", "opt_state", "rng", "guard"}
    assert {"ema", "ema_count"} <= ckpt_lib.saved_state_keys(
        os.path.join(ema_dir, "checkpoints", str(STEPS))
    )
    a, b = read_metrics(plain_dir), read_metrics(ema_dir)
    assert not any(k.startswith("eval_ema/") or k == "ema_decay" for r in a for k in r)
    # Training is the same bit for bit: losses, params, optimizer state, held-out eval.
    assert _losses(plain_dir) == _losses(ema_dir) and len(_losses(ema_dir)) == STEPS
    assert _bitwise(plain.params, ema.params) and _bitwise(plain.opt_state, ema.opt_state)
    (ev_a,), (ev_b,) = [r for r in a if "eval/loss" in r], [r for r in b if "eval/loss" in r]
    assert ev_a["eval/loss"] == ev_b["eval/loss"]
    # The EMA's own eval: another model (it lags the params), scored the same way.
    assert ev_b["eval_ema/loss"] != ev_b["eval/loss"] and np.isfinite(ev_b["eval_ema/loss"])
    assert int(ema.ema_count) == STEPS
    assert [r["ema_decay"] for r in b if "ema_decay" in r][-1] == pytest.approx(8 / 17)


def _main(workdir, *overrides, env=None):
    """`python -m flaxlm.train.main` on the tiny markov config (as tests/train/test_loop.py)."""
    cmd = [sys.executable, "-m", "flaxlm.train.main", "--config",
           os.path.join(REPO, "configs/pretrain.py") + ":variant=tiny,runlocal=True,data=markov",
           "--workdir", str(workdir), "--config.progress_bar=False"]  # fmt: skip
    cmd += [f"--config.{o}" for o in overrides]
    full_env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                "JAX_PLATFORMS": "cpu", **(env or {})}  # fmt: skip
    return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def test_resume_after_sigkill_reproduces_the_ema_bitwise(runs, tmp_path, caplog):
    # The uninterrupted run is `runs["ema"]` (in-process, the same config). The run killed is
    # the CLI's; the resume is in this process, with the programs `runs` compiled (the CLI's own
    # resume after a kill is tests/train/test_loop.py's).
    ema_dir, _ = runs["ema"]
    common = [f"total_steps={STEPS}", f"ckpt_every={STEPS // 2}", "log_every=1",
              f"eval_every={STEPS}", "eval_at_start=False", "keep_ckpts=0",
              "opt.warmup_steps=1", "ema.decay=0.9"]  # fmt: skip
    killed = _main(tmp_path / "resumed", *common, env={loop.KILL_ENV: str(STEPS // 2 + 2)})
    out = killed.communicate(timeout=300)[0]
    assert killed.returncode == -signal.SIGKILL, out
    assert ckpt_lib.Checkpointer(tmp_path / "resumed").all_steps() == [STEPS // 2]
    with caplog.at_level(logging.INFO, logger="flaxlm"):
        state, _ = pretrain.run(_config(ema=0.9), str(tmp_path / "resumed"))
    assert int(state.step) == STEPS
    assert f"resumed from {tmp_path / 'resumed'}" in caplog.text  # (not trained from step 0)
    assert _losses(ema_dir) == _losses(tmp_path / "resumed") and len(_losses(ema_dir)) == STEPS
    target = _target(_config(ema=0.9))
    a, b = (ckpt_lib.Checkpointer(d).restore(STEPS, target)[0]
            for d in (ema_dir, tmp_path / "resumed"))  # fmt: skip
    assert isinstance(a, EmaTrainState) and int(a.ema_count) == STEPS
    assert _bitwise(a, b)  # every leaf: EMA, its count, params, optimizer state, RNG, guard
    assert not _bitwise(a.ema, a.params)


def _target(config):
    mesh = make_mesh(dict(config.mesh))
    task = pretrain.build_task(config, mesh)
    tx, _ = make_optimizer(config.opt, config.total_steps)
    rules = logical_axis_rules(config.sharding)
    ema = config.ema.decay > 0
    shardings = state_shardings(task.init_params, tx, mesh, rules, ema=ema)
    return abstract_state(task.init_params, tx, shardings)


def test_a_step_without_an_ema_starts_one_at_its_params_and_one_with_it_drops_it(
    runs, caplog, tmp_path
):
    plain_dir, plain = runs["plain"]
    with caplog.at_level(logging.WARNING, logger="flaxlm"):
        state, _, _ = ckpt_lib.Checkpointer(plain_dir).restore(4, _target(_config(ema=0.9)))
    assert "has no EMA of the weights" in caplog.text and "/checkpoints/4" in caplog.text
    assert isinstance(state, EmaTrainState) and int(state.ema_count) == 0
    assert int(state.step) == 4 and _bitwise(state.ema, state.params)  # float32: a copy
    # Resuming that step with the EMA on trains on (the EMA shares no donated buffer with the
    # params), exactly as the run without one, averaging from step 4.
    resumed_dir = str(tmp_path / "plain_to_ema")
    shutil.copytree(plain_dir, resumed_dir)
    shutil.rmtree(os.path.join(resumed_dir, "checkpoints", str(STEPS)))
    state, _ = pretrain.run(_config(ema=0.9), resumed_dir)
    assert int(state.ema_count) == STEPS - 4 and _bitwise(state.params, plain.params)

    ema_dir, ema = runs["ema"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flaxlm"):
        state, _, _ = ckpt_lib.Checkpointer(ema_dir).restore(STEPS, _target(_config()))
    assert "holds an EMA of the weights; this run has ema.decay=0" in caplog.text
    assert type(state) is TrainState and _bitwise(state.params, ema.params)
    assert _bitwise(state.opt_state, ema.opt_state) and int(state.step) == STEPS


def test_an_ema_run_resumed_with_the_ema_off_saves_and_resumes_again(runs, tmp_path, caplog):
    """An EMA run resumed with ema.decay=0 used to crash at its first save: the partial read
    that drops the EMA tied the manager's `state` item to orbax's PyTreeCheckpointHandler, and
    the save's StandardSave then failed (ValueError, a tmp step left behind), on every rerun."""
    ema_dir, _ = runs["ema"]
    plain_dir, plain = runs["plain"]
    workdir = str(tmp_path / "ema_off")
    shutil.copytree(ema_dir, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS)))  # resume at step 4 (EMA)
    with caplog.at_level(logging.WARNING, logger="flaxlm"):
        state, _ = pretrain.run(_config(), workdir)  # saves step 8, without an EMA
    assert "holds an EMA of the weights; this run has ema.decay=0" in caplog.text
    assert type(state) is TrainState and _bitwise(state.params, plain.params)
    steps_dir = os.path.join(workdir, "checkpoints")
    assert sorted(os.listdir(steps_dir)) == ["4", str(STEPS)]  # no *.orbax-checkpoint-tmp
    assert "ema" not in ckpt_lib.saved_state_keys(os.path.join(steps_dir, str(STEPS)))
    # ... and that run resumes again (from its own step 8) and saves on.
    state, _ = pretrain.run(_config(total_steps=STEPS + 4), workdir)
    assert int(state.step) == STEPS + 4 and ckpt_lib.Checkpointer(workdir).all_steps()[-1] == 12


def test_sharded_ema_matches_one_device(tmp_path):
    meshes = {"one": ({"data": 1}, "dp", jax.devices()[:1]),
              "mesh": ({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp", None)}  # fmt: skip
    out = {}
    for name, (shape, rules, devices) in meshes.items():
        c = _config(ema=0.9, total_steps=4, eval_every=0, ckpt_every=0, sharding=rules,
                    **{f"mesh.{k}": v for k, v in shape.items()})  # fmt: skip
        mesh = make_mesh(dict(c.mesh), devices=devices)
        workdir = str(tmp_path / name)
        out[name], _ = loop.run(c, workdir, pretrain.build_task(c, mesh, workdir), mesh=mesh)
    sharded = out["mesh"]
    for e, p in zip(jax.tree.leaves(sharded.ema), jax.tree.leaves(sharded.params)):
        assert e.sharding == p.sharding and e.dtype == np.float32
    assert any(not e.sharding.is_fully_replicated for e in jax.tree.leaves(sharded.ema))
    for a, b in zip(_leaves(out["one"].ema), _leaves(sharded.ema)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # ~1e-7 measured


def test_readers_take_the_ema_weights_and_name_a_step_without_them(runs):
    ema_dir, ema = runs["ema"]
    _, params, _ = ckpt_lib.load_model(ema_dir, ema=True)
    assert _bitwise(params, ema.ema)  # float32 params: read as saved
    _, params, _ = ckpt_lib.load_model(ema_dir)
    assert _bitwise(params, ema.params)
    plain_dir, _ = runs["plain"]
    step_dir = os.path.join(plain_dir, "checkpoints", str(STEPS))
    with pytest.raises(ckpt_lib.CheckpointError, match="holds no EMA of the weights") as e:
        ckpt_lib.load_model(plain_dir, ema=True)
    assert step_dir in str(e.value)


def _sft_lora_config(tmp_path, **overrides):
    c = sft_config.get_config("variant=tiny,runlocal=True,lora=2")
    return override(c, {"progress_bar": False, "eval_at_start": False, "data.world": "small",
                        "data.builtin_vocab_size": 512, "model.vocab_size": 512,
                        "data.cache_dir": str(tmp_path / "tok"), "seq_len": 64, "batch_size": 8,
                        "total_steps": 4, "eval_every": 4, "ckpt_every": 4, "log_every": 2,
                        "opt.warmup_steps": 1, "eval_gen.sets": "", **overrides})  # fmt: skip


@pytest.fixture(scope="module")
def lora_sft(tmp_path_factory):
    """(root, workdir, final state, summary) of a 4-step LoRA SFT run with an EMA (decay 0.5)."""
    from flaxlm.alignment import sft

    root = tmp_path_factory.mktemp("lora_sft")
    workdir = str(root / "sft")
    state, summary = sft.run(_sft_lora_config(root, **{"ema.decay": 0.5}), workdir)
    return root, workdir, state, summary


def test_a_lora_sft_run_averages_its_adapters_and_exports_its_ema(lora_sft):
    from flaxlm import generate
    from flaxlm.alignment import common
    from flaxlm.models import hf
    from flaxlm.models import lora as lora_lib

    tmp_path, workdir, state, summary = lora_sft
    # Only the adapters are averaged: the frozen base keeps no float32 copy.
    base, lora = state.ema["base"], state.ema["lora"]
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    assert all(masked(x) for x in jax.tree.leaves(base, is_leaf=masked))
    assert jax.tree.structure(lora) == jax.tree.structure(state.params["lora"])
    assert len(jax.tree.leaves(state.ema)) == len(jax.tree.leaves(state.params["lora"]))
    assert not _bitwise(lora, state.params["lora"])  # the adapters moved, the EMA lags them
    assert np.isfinite(summary["eval"]["eval_ema/loss"])
    assert summary["eval"]["eval_ema/loss"] != summary["eval"]["eval/loss"]

    spec = lora_lib.LoraSpec(rank=2, targets=_sft_lora_config(tmp_path).lora.targets)
    host = jax.device_get(state)
    want = lora_lib.merge({"base": host.params["base"], "lora": host.ema["lora"]}, spec)
    cfg, got, _ = ckpt_lib.load_model(workdir, ema=True)
    for a, b in zip(_leaves(got), _leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    _, plain, _ = ckpt_lib.load_model(workdir)
    assert not _bitwise(got, plain)
    _, policy, _ = common.load_policy(workdir, ema=True)
    assert _bitwise(policy, got)

    # generate --ema and HF export --ema read the same weights.
    _, gen_params, _ = generate.load(workdir, ema=True)
    assert _bitwise(gen_params, got)
    hf.main(["export", workdir, str(tmp_path / "hf"), "--ema"])
    _, exported = hf.load_pretrained(str(tmp_path / "hf"))
    assert jax.tree.structure(exported) == jax.tree.structure(got)
    for a, b in zip(_leaves(exported), _leaves(got)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(SystemExit, match="an HF directory holds one set of weights"):
        generate.load(str(tmp_path / "hf"), ema=True)

    # python -m flaxlm.evaluation --ema scores the EMA weights (another perplexity).
    from flaxlm.evaluation.__main__ import main as evaluate

    (tmp_path / "text.jsonl").write_text('{"text": "Kavo lives in Lima."}\n')
    (tmp_path / "ppl.json").write_text('{"name": "ppl", "type": "perplexity", "file": '
                                       '"text.jsonl"}')  # fmt: skip
    argv = ["--checkpoint", workdir, "--tasks", str(tmp_path / "ppl.json")]
    with_ema, without = evaluate([*argv, "--ema"]), evaluate(argv)
    assert with_ema["ema"] and not without["ema"]
    ppl = lambda r: r["tasks"]["ppl"]["metrics"]["ppl"]  # noqa: E731
    assert ppl(with_ema) != ppl(without) and np.isfinite(ppl(with_ema))


def test_a_decay_outside_0_1_is_an_error_naming_the_key():
    from flaxlm.train import ema as ema_lib

    assert ema_lib.settings(_config()) == (0.0, True)
    assert ema_lib.settings(_config(ema=0.99, **{"ema.warmup": False})) == (0.99, False)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"ema.decay=.* must be a number in \[0, 1\)"):
            ema_lib.settings(_config(ema=bad))


def test_swap_in_gives_the_params_dtype_and_keeps_frozen_leaves():
    """The float32 EMA replaces the trainable leaves in the params' own dtype (bfloat16 params
    evaluate as bfloat16, not float32); a frozen leaf is the params' own."""
    import jax.numpy as jnp

    from flaxlm.train import ema as ema_lib

    params = {"w": jnp.full((2, 3), 1.5, jnp.bfloat16), "frozen": jnp.ones(4, jnp.bfloat16)}
    mask = {"w": True, "frozen": False}
    avg = ema_lib.update(ema_lib.init(params, mask), {**params, "w": params["w"] * 3}, 0.5)
    out = ema_lib.swap_in(params, avg)
    assert {k: v.dtype for k, v in out.items()} == {"w": jnp.bfloat16, "frozen": jnp.bfloat16}
    np.testing.assert_array_equal(np.asarray(out["w"], np.float32), 3.0)  # 1.5 + 0.5 · 3
    assert out["frozen"] is params["frozen"]


def _capture_start(monkeypatch):
    """A list that receives (params, ema) of every state the loop starts with, before the first
    step (whose buffers it then donates)."""
    started, real = [], loop._init_or_resume

    def init_or_resume(*a):
        out = real(*a)
        state = jax.device_get(out[0])
        started.append((state.params, getattr(state, "ema", None)))
        return out

    monkeypatch.setattr(loop, "_init_or_resume", init_or_resume)
    return started


def test_init_from_ema_starts_a_run_at_the_ema_weights(runs, tmp_path, monkeypatch, caplog):
    """init_from_ema: a pretraining run continued from an EMA run starts at its EMA weights
    (and its own EMA starts there too); the log line and the saved config say so; without the
    key it starts at the params."""
    ema_dir, ema = runs["ema"]
    started = _capture_start(monkeypatch)
    c = _config(ema=0.5, init_from=ema_dir, init_from_ema=True, total_steps=1, ckpt_every=1,
                eval_every=0)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="flaxlm"):
        pretrain.run(c, str(tmp_path / "from_ema"))
    assert f"initialised params from {ema_dir} (EMA)" in caplog.text
    ((params, own_ema),) = started
    assert _bitwise(params, ema.ema) and _bitwise(own_ema, ema.ema)  # float32: as saved
    assert not _bitwise(params, ema.params)
    _, meta = ckpt_lib.read_meta(str(tmp_path / "from_ema"))
    assert meta["config"]["init_from_ema"] is True and meta["config"]["init_from"] == ema_dir
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flaxlm"):
        pretrain.run(override(c, {"init_from_ema": False}), str(tmp_path / "from_params"))
    assert f"initialised params from {ema_dir}" in caplog.text and "(EMA)" not in caplog.text
    assert _bitwise(started[1][0], ema.params)


def test_init_from_ema_without_an_ema_is_an_error_before_the_init(runs, tmp_path, monkeypatch):
    """A run saved without an EMA, an HF checkpoint or no init_from: an error naming
    init_from_ema and the run, before the train state is built or any step compiled."""

    def no_init(*a, **k):
        raise AssertionError("the state was built before init_from_ema was checked")

    monkeypatch.setattr(loop, "create_train_state", no_init)
    plain_dir, _ = runs["plain"]
    step_dir = os.path.join(plain_dir, "checkpoints", str(STEPS))
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        pretrain.run(_config(init_from=plain_dir, init_from_ema=True), str(tmp_path / "a"))
    assert f"init_from_ema=True: init_from={plain_dir} holds no EMA of the weights" in str(e.value)
    assert step_dir in str(e.value) and "ema.decay=0" in str(e.value)
    with pytest.raises(ckpt_lib.CheckpointError, match="init_from=hf:/x is an HF checkpoint"):
        pretrain.run(_config(init_from="hf:/x", init_from_ema=True), str(tmp_path / "b"))
    with pytest.raises(ValueError, match="init_from_ema=True but init_from is not set"):
        pretrain.run(_config(init_from_ema=True), str(tmp_path / "c"))
    assert _config().init_from_ema is False


def test_sft_from_a_lora_runs_ema_starts_at_its_merged_ema(lora_sft, tmp_path, monkeypatch):
    """SFT with init_from_ema from a LoRA SFT run: the new (plain) model starts at the source's
    EMA adapters merged into its base — what load_lm_params(..., ema=True) reads."""
    from flaxlm.alignment import common, sft
    from flaxlm.models import lora as lora_lib

    root, src, src_state, _ = lora_sft
    started = _capture_start(monkeypatch)
    c = _sft_lora_config(root, **{"lora.rank": 0, "init_from": src, "init_from_ema": True,
                                  "total_steps": 1, "eval_every": 0, "ckpt_every": 0})  # fmt: skip
    sft.run(c, str(tmp_path / "sft"))
    ((params, _),) = started
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), params)
    assert _bitwise(params, common.load_lm_params(src, target, ema=True))
    host = jax.device_get(src_state)
    spec = lora_lib.LoraSpec(rank=2, targets=c.lora.targets)
    want = lora_lib.merge({"base": host.params["base"], "lora": host.ema["lora"]}, spec)
    for a, b in zip(_leaves(params), _leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not _bitwise(params, common.load_lm_params(src, target))


def test_pretraining_from_a_lora_runs_ema_reads_its_merged_ema(lora_sft):
    """Pretraining's init_from (with init_from_ema) of a LoRA run: its EMA adapters merged into
    its base, as the alignment stages read it; it used to be refused as another model."""
    from flaxlm.alignment import common
    from flaxlm.configs.common import to_model_config

    _, src, _, _ = lora_sft
    _, meta = ckpt_lib.read_meta(src)
    init = pretrain.model_fns(to_model_config(meta["model_config"]))[0]
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
                          unbox(jax.eval_shape(init, jax.random.PRNGKey(0))))  # fmt: skip
    load = pretrain.init_loader(init)
    ema = load(src, target, ema=True)
    assert _bitwise(ema, common.load_lm_params(src, target, ema=True))
    assert _bitwise(load(src, target), common.load_lm_params(src, target))
    assert not _bitwise(ema, load(src, target))
