"""`generate` (and `speculative_generate`) in a multi-process job: two processes × 4 CPU
devices decode what one process × 8 decodes, and each reads back the whole output; prompts that
differ between the processes are an error on both."""

import importlib.util
import os

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mp = _load("multiprocess", os.path.join(os.path.dirname(HERE), "multiprocess.py"))
SCRIPT = os.path.join(HERE, "multiprocess_generate.py")
cases = _load("multiprocess_generate", SCRIPT)


def test_two_processes_decode_what_one_does(tmp_path):
    assert jax.device_count() == 8
    script, port, out = SCRIPT, mp.free_port(), tmp_path / "o"
    mp.run_processes(lambda i: [script, port, i, 2, out])
    want = cases.cases(*cases.model_and_mesh())
    for pid in range(2):
        got = np.load(f"{out}.{pid}.npz")
        assert sorted(got.files) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"process {pid}: {k}")
    # The cases are not trivial: rows stopped at different lengths, samples differ in a group.
    assert len(set(want["sampled/lengths"].tolist())) > 1
    assert (want["grouped/tokens"][0] != want["grouped/tokens"][1]).any()
    assert 0 < want["speculative/accepted"].sum() and want["speculative/rejected"].sum() > 0


def test_prompts_that_differ_between_processes_are_an_error_on_both(tmp_path):
    script, port, out = SCRIPT, mp.free_port(), tmp_path / "o"
    outs = mp.run_processes(lambda i: [script, port, i, 2, out, "differ"])
    for text in outs:
        assert "VALUE_ERROR generate: processes [1] passed other values than process 0" in text
