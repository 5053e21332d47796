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


def _start(script, corpus, tok, workdir, log, env=None):
    full_env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, str(script), corpus, tok, str(workdir)],
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
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


def test_killed_mid_epoch_run_resumes_with_identical_losses(tmp_path):
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

    # Only the killed run needs its own process; the others run here (saves two JAX startups),
    # the uninterrupted one while the killed one runs. All share the session's persistent
    # compilation cache (tests/conftest.py).
    log = tmp_path / "killed.log"
    with open(log, "w") as f:
        killed = _start(script, str(corpus), tok, tmp_path / "resumed", f, {loop.KILL_ENV: "9"})
        try:
            _run_here(script, str(corpus), tok, tmp_path / "straight")
            killed.wait(timeout=300)
        finally:
            if killed.poll() is None:
                killed.kill()
                killed.wait()
    assert killed.returncode == -signal.SIGKILL, log.read_text()
    _run_here(script, str(corpus), tok, tmp_path / "resumed")

    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(a) == list(range(1, 13)) and set(range(7, 13)) <= set(b)
    assert {s: b[s] for s in range(7, 13)} == {s: a[s] for s in range(7, 13)}  # bitwise
