"""notebooks/inspect.ipynb executes top to bottom against a tiny run, so it never rots."""

import os
import pathlib

import nbformat
from nbclient import NotebookClient

from flaxlm.configs import pretrain as pretrain_config
from flaxlm.train import pretrain
from flaxlm.train.metrics import MetricWriter
from tests.hf_tokenizers import imported_qwen2_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train(tmp_path, steps: int, eval_every: int):
    """A tiny pretraining run of `steps` steps under tmp_path/run."""
    c = pretrain_config.get_config("variant=tiny,runlocal=True")
    with c.unlocked():
        c.progress_bar = False
        c.total_steps, c.eval_every, c.ckpt_every, c.log_every = steps, eval_every, steps, 1
    run = tmp_path / "run"
    pretrain.run(c, str(run))
    return run


def _execute(run, tmp_path, monkeypatch):
    """The notebook, executed top to bottom on `run` (FLAXLM_RUN)."""
    monkeypatch.setenv("FLAXLM_RUN", str(run))
    nb = nbformat.read(os.path.join(REPO, "notebooks", "inspect.ipynb"), as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    return nb


def test_inspect_notebook_runs(tmp_path, monkeypatch):
    run = _train(tmp_path, steps=4, eval_every=2)
    # What a resume from step 2 does first: the lines of steps 3-4 move to
    # metrics.superseded.jsonl (the loss plot overlays them).
    MetricWriter(str(run), resume_step=2, tensorboard=False).close()
    nb = _execute(run, tmp_path, monkeypatch)
    text = "\n".join(
        o.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for o in cell.get("outputs", [])
    )
    assert "layers_0/attn/q/kernel" in text and "fsdp" in text  # tree with shardings
    assert "→" in text  # generation ran
    assert "rows sum to 1: True | causal: True" in text
    assert "superseded segments overlaid: 1" in text and "resume (resumed from" in text
    images = [
        o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert len(images) == 2  # attention map and loss curve


def test_inspect_notebook_runs_on_an_hf_import(tmp_path, monkeypatch):
    """A run made by `hf import` has a checkpoint but no metrics.jsonl: the loss-curve cell
    failed with FileNotFoundError and stopped the notebook; it now says so and skips. Its
    tokenizer is the model's tokenizer.json, which the load cell read as SentencePiece (a
    ValueError, "not a SentencePiece model"): it is loaded as generation loads it now."""
    run, _ = imported_qwen2_run(str(tmp_path), words=["Once", "upon", "a", "time"])
    run = pathlib.Path(run)
    assert not (run / "metrics.jsonl").exists()
    nb = _execute(run, tmp_path, monkeypatch)
    text = "\n".join(
        o.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for o in cell.get("outputs", [])
    )
    assert "'Once upon a time' →" in text  # generation with the imported tokenizer
    assert "rows sum to 1: True | causal: True" in text
    last = nb.cells[-1].get("outputs", [])
    assert "no metrics.jsonl (imported, not trained here)" in last[0]["text"]
