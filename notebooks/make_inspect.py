"""Writes notebooks/inspect.ipynb from the cells below (edit here, re-run, commit both).

python notebooks/make_inspect.py
"""

import os

import nbformat

CELLS = [
    (
        "md",
        """# Inspect a flaxlm checkpoint

Loads a run's latest checkpoint (config, parameters and tokenizer all come from the checkpoint
itself), shows the parameter tree with shapes and shardings, generates from a few prompts, plots
one attention head, and plots the loss curves from `metrics.jsonl` (with, faint, the steps a
rollback or resume trained again, from `metrics.superseded.jsonl`).

Set `FLAXLM_RUN` to a run directory (default: the demo's pretraining run).""",
    ),
    (
        "code",
        """import os

import jax
import matplotlib.pyplot as plt
import numpy as np

from flaxlm.models.decode import generate_text
from flaxlm.models.hf_tokenizer import load_tokenizer
from flaxlm.models.sharding import logical_axis_rules, make_mesh
from flaxlm.models.transformer import Transformer, unstack_layers
from flaxlm.train.checkpoint import load_model
from flaxlm.train.curves import plot_loss

RUN_DIR = os.environ.get("FLAXLM_RUN", "../runs/demo/pretrain")
print("run:", os.path.abspath(RUN_DIR), "| devices:", jax.device_count())""",
    ),
    ("md", "## Load: the model config and parameters, sharded over all devices (fsdp rules)"),
    (
        "code",
        """mesh = make_mesh({"fsdp": -1})
rules = logical_axis_rules("fsdp")
cfg, params, meta = load_model(RUN_DIR, mesh=mesh, rules=rules)
# SentencePiece (.model) or an imported HF tokenizer.json: load_tokenizer reads either.
tokenizer = load_tokenizer(meta["tokenizer"]) if meta.get("tokenizer") else None
print(f"task={meta['task']}  params={cfg.param_counts()['total']:,}")
print(cfg)""",
    ),
    ("md", "## Parameter tree: shape, dtype and how each array is split over the mesh"),
    (
        "code",
        """def param_rows(tree):
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        yield name, tuple(x.shape), str(x.dtype), str(x.sharding.spec)

rows = list(param_rows(params))
width = max(len(r[0]) for r in rows)
for name, shape, dtype, spec in rows:
    print(f"{name:<{width}}  {str(shape):<18} {dtype:<8} {spec}")""",
    ),
    ("md", "## Generate (greedy) from a few prompts"),
    (
        "code",
        """prompts = ["Once upon a time", "The capital of", "12 plus 7 is"]
if tokenizer is not None:
    for p, out in zip(prompts, generate_text(cfg, params, tokenizer, prompts,
                                                max_new_tokens=24, temperature=0.0)):
        print(repr(p), "→", repr(out))
else:
    print("this run has no tokenizer (synthetic data); skipping generation")""",
    ),
    ("md", "## Attention weights of one head (layer 0, head 0)"),
    (
        "code",
        """text = "Once upon a time there was a small town by the river."
ids = tokenizer.encode(text, bos=True) if tokenizer is not None else list(range(12))
local = jax.device_get(params)
if cfg.scan_layers:  # per-layer intermediates need the unrolled layout
    local = unstack_layers(local, cfg.n_layers)
_, inter = Transformer(cfg.replace(scan_layers=False)).apply(
    {"params": local}, np.asarray([ids], np.int32), mutable="intermediates")
probs = np.asarray(inter["intermediates"]["layers_0"]["attn"]["attn_probs"][0])[0, 0]  # (T, S)
labels = [tokenizer.decode([i]) if tokenizer is not None else str(i) for i in ids]
fig, ax = plt.subplots(figsize=(6, 5))
ax.imshow(probs, cmap="viridis")
ax.set_xticks(range(len(ids)), labels, rotation=90, fontsize=7)
ax.set_yticks(range(len(ids)), labels, fontsize=7)
ax.set_title("layer 0 · head 0 (rows attend to columns)")
plt.show()
print("rows sum to 1:", np.allclose(probs.sum(-1), 1, atol=1e-4),
      "| causal:", np.allclose(np.triu(probs, 1), 0))""",
    ),
    ("md", "## Loss curves from metrics.jsonl (and metrics.superseded.jsonl)"),
    (
        "code",
        """# A run made by `hf import` (or copied without its logs) has no metrics.jsonl.
if not os.path.exists(os.path.join(RUN_DIR, "metrics.jsonl")):
    print("this run has no metrics.jsonl (imported, not trained here); skipping the curves")
else:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    # superseded=True overlays, faint, the steps a rollback or resume trained again (from
    # metrics.superseded.jsonl, when the run has one); False plots the final run only.
    curves = plot_loss(ax, RUN_DIR, superseded=True)
    plt.show()
    train, evals, old = curves["train"], curves["eval"], curves["superseded"]
    last = f"; last loss {train[-1][1]:.3f}" if train else ""
    print(f"{len(train)} train records, {len(evals)} eval records{last}; "
          f"superseded segments overlaid: {len(old)}")
    for seg in old:
        print(f"  {seg['event']} ({seg['reason']}): steps {seg['steps'][0]}-{seg['steps'][-1]}")""",
    ),
]


def build() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    for i, (kind, src) in enumerate(CELLS):
        cell = nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell
        # Fixed ids (nbformat draws random ones): rebuilding changes only the cells edited.
        nb.cells.append(cell(src, id=f"cell-{i:02d}"))
    return nb


if __name__ == "__main__":
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "inspect.ipynb")
    nbformat.write(build(), path)
    print("wrote", path)
