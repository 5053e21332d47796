"""Two processes × 4 simulated CPU devices (jax.distributed, gloo) train like one process × 8."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from flaxlm.configs import pretrain as pretrain_config
from flaxlm.configs.common import override
from flaxlm.train import pretrain
from flaxlm.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _cmd(workdir, extra=()):
    return [
        sys.executable,
        "-m",
        "flaxlm.train.main",
        "--config",
        os.path.join(REPO, "configs/pretrain.py") + ":variant=tiny,runlocal=True,data=markov",
        "--workdir",
        str(workdir),
        "--config.progress_bar=False",
        "--config.total_steps=6",
        "--config.log_every=1",
        "--config.eval_every=0",
        "--config.ckpt_every=0",
        "--config.mesh.data=4",
        "--config.mesh.fsdp=2",
        *extra,
    ]


def _env(n_devices):
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={n_devices}",
    }


def _reference_config():
    """The config _cmd's flags give, for the one-process reference run in this process."""
    c = pretrain_config.get_config("variant=tiny,runlocal=True,data=markov")
    flags = {"progress_bar": False, "total_steps": 6, "log_every": 1, "eval_every": 0,
             "ckpt_every": 0, "mesh.data": 4, "mesh.fsdp": 2}  # fmt: skip
    return override(c, flags)


def test_two_processes_match_one(tmp_path):
    # The two processes start first; the one-process reference (the same config on this
    # process's 8 devices, as `python -m flaxlm.train.main` runs it) trains here meanwhile.
    assert jax.device_count() == 8
    port = _free_port()
    logs = [open(tmp_path / f"process_{i}.log", "w+") for i in range(2)]
    procs = [
        subprocess.Popen(
            _cmd(
                tmp_path / "two",
                [
                    "--coordinator",
                    f"localhost:{port}",
                    "--num_processes",
                    "2",
                    "--process_id",
                    str(i),
                ],
            ),
            env=_env(4),
            stdout=logs[i],
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        pretrain.run(_reference_config(), str(tmp_path / "one"))
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = []
    for log in logs:
        log.seek(0)
        outs.append(log.read())
        log.close()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    one = [r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r]
    two = [r["loss"] for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert len(one) == len(two) == 6
    np.testing.assert_allclose(two, one, rtol=1e-5)
