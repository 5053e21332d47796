"""Two processes × 4 simulated CPU devices (jax.distributed, gloo) train like one process × 8."""

import os
import socket
import subprocess
import sys

import numpy as np

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


def test_two_processes_match_one(tmp_path):
    single = subprocess.run(
        _cmd(tmp_path / "one"), env=_env(8), capture_output=True, text=True, timeout=300
    )
    assert single.returncode == 0, single.stdout + single.stderr
    port = _free_port()
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
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    one = [r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r]
    two = [r["loss"] for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert len(one) == len(two) == 6
    np.testing.assert_allclose(two, one, rtol=1e-5)
