"""The inference command lines with a model split over devices (`--mesh`, flaxlm/cli_mesh.py):
the same results as on one device, in one process or two (jax.distributed over gloo)."""

import importlib.util
import json
import os

import pytest

from flaxlm import generate as generate_cli
from flaxlm.evaluation.__main__ import main as eval_main

_spec = importlib.util.spec_from_file_location(
    "multiprocess", os.path.join(os.path.dirname(os.path.dirname(__file__)), "multiprocess.py")
)
mp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mp)

TASKS = "mc_facts_heldout,gen_facts_train,ppl_heldout_text"


def _eval_argv(run_dir, world_dir, tok_path, out, *extra):
    return ["--checkpoint", run_dir, "--world", world_dir, "--tokenizer", tok_path,
            "--tasks", TASKS, "--limit", "6", "--samples", "--batch_tokens", "128",
            "--out", str(out), *extra]  # fmt: skip


def _same_results(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name in want:
        g, w = got[name], want[name]
        assert g["metrics"].keys() == w["metrics"].keys()
        for k, v in w["metrics"].items():
            assert g["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (name, k)
        for gs, ws in zip(g["samples"], w["samples"], strict=True):  # answers, predictions
            assert gs.keys() == ws.keys()
            for k, v in ws.items():
                assert gs[k] == (pytest.approx(v, rel=1e-5) if _numbers(v) else v), (name, k)


def _numbers(v) -> bool:
    return isinstance(v, float) or (isinstance(v, list) and all(isinstance(x, float) for x in v))


@pytest.fixture(scope="module")
def one_device(run_dir, world_dir, tok_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "r.json"
    return eval_main(_eval_argv(run_dir, world_dir, tok_path, out))["tasks"]


@pytest.mark.parametrize(
    "mesh", [["--mesh", "data=2,fsdp=2,tensor=2", "--sharding", "fsdp_tp"], ["--mesh", "fsdp=2"]]
)
def test_evaluation_on_a_mesh_matches_one_device(mesh, one_device, run_dir, world_dir, tok_path,
                                                 tmp_path):  # fmt: skip
    got = eval_main(_eval_argv(run_dir, world_dir, tok_path, tmp_path / "r.json", *mesh))
    _same_results(got["tasks"], one_device)


def test_evaluation_on_two_processes_matches_one(one_device, run_dir, world_dir, tok_path,
                                                 tmp_path):  # fmt: skip
    port, out = mp.free_port(), tmp_path / "r.json"
    dist = ["--coordinator", f"localhost:{port}", "--num_processes", "2", "--mesh", "data=4,fsdp=2"]
    outs = mp.run_processes(lambda i: ["-m", "flaxlm.evaluation", *_eval_argv(
        run_dir, world_dir, tok_path, out, *dist, "--process_id", str(i))])  # fmt: skip
    _same_results(json.loads(out.read_text())["tasks"], one_device)
    assert "mc_facts_heldout" in outs[0] and "mc_facts_heldout" not in outs[1]  # 0 reports


def test_generate_on_a_mesh_and_two_processes_matches_one_device(run_dir, tok_path, capsys):
    argv = [run_dir, "--tokenizer", tok_path, "--prompt", "Kavo lives in", "--prompt", "The",
            "--prompt", "A b c", "--max_new_tokens", "8", "--temperature", "1.0", "--json",
            "--num_samples", "2", "--batch", "2"]  # fmt: skip
    generate_cli.main(argv)
    want = capsys.readouterr().out
    assert len(want.splitlines()) == 6
    generate_cli.main(argv + ["--mesh", "fsdp=4,tensor=2", "--sharding", "fsdp_tp"])
    assert capsys.readouterr().out == want
    port = mp.free_port()
    outs = mp.run_processes(lambda i: ["-m", "flaxlm.generate", *argv, "--coordinator",
                                       f"localhost:{port}", "--num_processes", "2",
                                       "--process_id", str(i)])  # fmt: skip
    lines = [ln for ln in outs[0].splitlines() if ln.startswith("{")]
    assert lines == want.splitlines()
    assert not [ln for ln in outs[1].splitlines() if ln.startswith("{")]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--mesh", "pipeline=2"], "'pipeline=2' is not AXIS=SIZE"),
        (["--mesh", "fsdp=two"], "size 'two' of fsdp is not an integer"),
        (["--mesh", "data=2,data=4"], "axis data is given twice"),
        (["--mesh", "fsdp=3,data=3"], "needs 9 devices, have 8"),
        (["--num_processes", "2"], "--num_processes / --process_id need --coordinator"),
    ],
)
def test_bad_mesh_flags_are_usage_errors(flags, message, run_dir, capsys):
    with pytest.raises(SystemExit) as e:
        generate_cli.main([run_dir, "--prompt", "hi", *flags])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
