"""A sweep's root is a local path: a bucket URL (gs://...) used to become ./gs:/bucket/... here,
and the pod script named that local path on every TPU worker, each training into its own disk.
Refused, naming the workdir and what to do instead (mount the bucket)."""

import os

import pytest

from flaxlm.train import sweep, sweep_launch, sweep_plan

CONFIG = os.path.join(sweep_launch.checkout_root(), "configs", "scaling.py") + ":runlocal=True"


@pytest.mark.parametrize("launch", ["local", "pod"])
def test_a_url_workdir_is_refused(tmp_path, monkeypatch, capsys, launch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        sweep.main(["--config", CONFIG, "--workdir", "gs://mybucket/sw", "--launch", launch])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--workdir gs://mybucket/sw" in err and "gcsfuse" in err
    assert os.listdir(tmp_path) == []  # no ./gs:/mybucket/sw


def test_local_workdirs_pass(tmp_path):
    for path in ("runs/sw", str(tmp_path / "a:b"), "./x", "/mnt/gcs/sw", "C"):
        sweep_plan.check_local_workdir(path)  # a ':' is a path character; '://' is a URL
    for path in ("gs://b/sw", "s3://b/x", "file:///tmp/x", "hdfs://nn/x"):
        with pytest.raises(ValueError, match="mount"):
            sweep_plan.check_local_workdir(path)
