"""The README's "From Python" block runs as written (in a scratch directory), and what it
points to next loads the run it trained."""

import os
import re

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_block() -> str:
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    block = re.search(r"<!-- python-api -->\n```python\n(.*?)```\n<!-- /python-api -->", text, re.S)
    assert block, "README.md lost its python-api block"
    return block.group(1)


def test_the_readme_python_block_trains_and_the_run_loads(tmp_path, monkeypatch, capsys):
    from flaxlm.models.transformer import forward
    from flaxlm.train.checkpoint import load_model

    monkeypatch.chdir(tmp_path)
    exec(compile(_readme_block(), "README.md:python-api", "exec"), {})
    step, loss = capsys.readouterr().out.split()[-2:]
    assert step == "20" and float(loss) < 5.0  # from ln(256) = 5.55 at step 0
    cfg, params, meta = load_model(str(tmp_path / "runs" / "nb_pretrain"))
    assert cfg.attention_impl == "xla" and meta["model_config"]["attention_impl"] == "xla"
    logits = forward(cfg, params, [[1, 2, 3]])
    assert logits.shape == (1, 3, cfg.vocab_size) and np.isfinite(np.asarray(logits)).all()
