"""A training run on packed grain batches, killed mid-epoch and resumed, reproduces its losses.

The loop saves ``iterator.get_state()`` with every checkpoint and calls ``set_state`` on resume;
this runs the real pretraining task (train/pretrain.py builds ``make_pretrain_iterator`` from
``config.data``) on a small jsonl corpus whose epoch is longer than the run, so the resume point
is mid-epoch and usually mid-document.
"""

import json
import os
import runpy
import signal
import subprocess
import sys

import numpy as np
import pytest

from flaxlm.train import loop

SCRIPT = r"""
import sys
from flaxlm.configs import pretrain as pretrain_config
from flaxlm.models.sharding import make_mesh
from flaxlm.train import loop, pretrain

corpus, tok, workdir = sys.argv[1:4]
c = pretrain_config.get_config("variant=tiny,runlocal=True,data=text")
with c.unlocked():
    c.progress_bar = False
    c.eval_at_start = False
    c.total_steps, c.ckpt_every, c.log_every, c.eval_every = 12, 6, 1, 0
    c.async_ckpt = False
    c.model.vocab_size = 512
    c.data.sources, c.data.tokenizer, c.data.read_threads = corpus, tok, 1
mesh = make_mesh(dict(c.mesh))
loop.run(c, workdir, pretrain.build_task(c, mesh), mesh=mesh)
"""


def _run(script, corpus, tok, workdir, env=None):
    full_env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, str(script), corpus, tok, str(workdir)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _run_here(script, corpus, tok, workdir):
    argv = sys.argv
    sys.argv = [str(script), corpus, tok, str(workdir)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv


def _losses(workdir):
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                out[r["step"]] = r["loss"]
    return out


@pytest.fixture
def compile_cache(tmp_path):
    """A persistent XLA cache shared by the three runs: compiling dominates this test."""
    import jax

    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {k: getattr(jax.config, k) for k in keys}
    path = str(tmp_path / "xla_cache")
    for k, v in zip(keys, (path, 0.0, 0)):
        jax.config.update(k, v)
    yield path
    for k, v in old.items():
        jax.config.update(k, v)


def test_killed_mid_epoch_run_resumes_with_identical_losses(tmp_path, compile_cache):
    from flaxlm.data.tokenizer import train

    rng = np.random.default_rng(0)
    words = "the river runs past old mill into green valley where farmers grow wheat".split()
    docs = [" ".join(rng.choice(words, rng.integers(5, 150))) + f" {i}." for i in range(2000)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    tok = str(tmp_path / "tok.model")
    train(docs, 400, model_path=tok)
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)

    # Only the killed run needs its own process; the others run here (saves two JAX startups).
    _run_here(script, str(corpus), tok, tmp_path / "straight")
    env = {
        loop.KILL_ENV: "9",
        "JAX_COMPILATION_CACHE_DIR": compile_cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    killed = _run(script, str(corpus), tok, tmp_path / "resumed", env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    _run_here(script, str(corpus), tok, tmp_path / "resumed")

    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(a) == list(range(1, 13)) and set(range(7, 13)) <= set(b)
    assert {s: b[s] for s in range(7, 13)} == {s: a[s] for s in range(7, 13)}  # bitwise
