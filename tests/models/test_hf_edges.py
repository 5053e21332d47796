"""HF import/export edge cases a user bringing Llama/Mistral/Qwen2 checkpoints hits: a single
file beside a stale index, export targets that are files, dtype names config.json cannot state,
and an explicit head_dim round-tripping bit-exactly in bf16."""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.models import hf
from flaxlm.models.config import ModelConfig
from flaxlm.models.transformer import Transformer

FIX = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "hf")


def test_single_file_wins_over_a_stale_index_as_in_transformers(tmp_path):
    """transformers loads model.safetensors when it sits beside a model.safetensors.index.json
    (modeling_utils checks the single file first); we read the index's shards instead, i.e. other
    weights than transformers — or failed on a shard the stale index still names."""
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "ckpt"
    shutil.copytree(os.path.join(FIX, "llama"), d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    tensors = {}
    for f in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(d / f)))
    save_file({k: v * 2 for k, v in tensors.items()}, str(d / "model.safetensors"))
    _, ref = hf.load_pretrained(os.path.join(FIX, "llama"))
    _, params = hf.load_pretrained(str(d))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, 2 * b), params, ref)
    os.remove(d / "model-00002-of-00003.safetensors")  # the stale shards may be gone
    hf.load_pretrained(str(d))


@pytest.mark.parametrize("overwrite", [False, True])
def test_export_onto_a_file_is_refused_and_the_file_kept(tmp_path, overwrite):
    cfg, params = hf.load_pretrained(os.path.join(FIX, "qwen2"))
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with pytest.raises(hf.HFError, match="notes.txt exists and is not a directory"):
        hf.save_pretrained(cfg, params, str(target), arch="qwen2", overwrite=overwrite)
    assert target.read_text() == "keep me" and os.listdir(tmp_path) == ["notes.txt"]


def test_dtypes_config_json_cannot_state_are_refused_by_name(tmp_path):
    """`--dtype bf16` was a bare TypeError; an export in float64 wrote a checkpoint whose
    config.json dtype load_pretrained itself then refused."""
    d = os.path.join(FIX, "mistral")
    with pytest.raises(hf.HFError, match="dtype 'bf16' is not supported"):
        hf.load_pretrained(d, dtype="bf16")
    cfg, params = hf.load_pretrained(d)
    for bad in ("float64", "int8", "fp16"):
        with pytest.raises(hf.HFError, match=f"export: dtype '{bad}' is not supported"):
            hf.save_pretrained(cfg, params, str(tmp_path / "out"), arch="mistral", dtype=bad)
    assert os.listdir(tmp_path) == []
    with pytest.raises(SystemExit, match="dtype 'bf16' is not supported"):
        hf.main(["import", d, str(tmp_path / "run"), "--dtype", "bf16"])


def test_explicit_head_dim_and_bf16_round_trip_bit_exactly(tmp_path):
    """Mistral-Nemo / Qwen3-style head_dim != hidden/heads, tied embeddings, bf16 tensors."""
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                      head_dim=16, d_ff=48, tie_embeddings=True, param_dtype="bfloat16",
                      dtype="bfloat16")  # fmt: skip
    init = jax.jit(Transformer(cfg).init)  # (one program; eager, the init is dozens)
    boxed = init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    params = nn.meta.unbox(boxed)
    out = str(tmp_path / "out")
    hf.save_pretrained(cfg, boxed, out, arch="mistral")  # boxed params export as they are
    c = json.loads(open(os.path.join(out, "config.json")).read())
    assert c["head_dim"] == 16 and c["dtype"] == "bfloat16" and c["tie_word_embeddings"]
    cfg2, params2 = hf.load_pretrained(out)
    assert cfg2 == cfg
    same = lambda a, b: np.testing.assert_array_equal(
        np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16)
    )
    jax.tree.map(same, params2, params)


def test_export_refuses_the_run_directory_a_parent_of_it_or_inside_it(tmp_path):
    """`export RUN RUN --overwrite` (or a directory holding RUN) moved the target aside and
    deleted it: the run with it. Real paths are compared (a trailing "/", "..", a symlink)."""
    from flaxlm.models import peft

    run = tmp_path / "runs" / "run"
    hf.import_to_run(os.path.join(FIX, "qwen2"), str(run))
    before = sorted(os.listdir(run))
    os.symlink(run, tmp_path / "link")
    targets = [
        (str(run), "is the run directory"),
        (str(run) + "/", "is the run directory"),
        (str(run / ".." / "run"), "is the run directory"),
        (str(tmp_path / "link"), "is the run directory"),
        (str(tmp_path / "runs"), "holds the run directory"),
        (str(tmp_path), "holds the run directory"),
        (str(run / "hf"), "is inside the run directory"),
    ]
    for target, what in targets:
        for adapter in ([], ["--adapter"]):
            with pytest.raises(SystemExit, match=f"error: export: target .* {what}"):
                hf.main(["export", str(run), target, "--overwrite", *adapter])
    with pytest.raises(hf.HFError, match="is the run directory"):
        peft.export_run_adapter(str(run), str(run), overwrite=True)
    assert sorted(os.listdir(run)) == before and not os.path.exists(run / "hf")
    hf.main(["export", str(run), str(tmp_path / "out")])  # a sibling is fine
    hf.main(["export", str(run), str(tmp_path / "out"), "--overwrite"])
    assert os.path.exists(tmp_path / "out" / "config.json")
    before = sorted(os.listdir(tmp_path / "out"))
    with pytest.raises(hf.HFError, match="is the HF checkpoint"):  # import into its source
        hf.import_to_run(str(tmp_path / "out"), str(tmp_path / "out" / "."))
    assert sorted(os.listdir(tmp_path / "out")) == before
