"""Gemma 1/2/3 checkpoints: what sets them apart from the Llama family, each shown to matter
against transformers' logits (tests/fixtures/hf/gemma*), and read from every config layout
transformers reads.

The families' plain parity, cached greedy decoding and round trips run with the others in
test_hf.py; here: each Gemma feature dropped breaks parity, local/global layer patterns and
the two RoPEs of Gemma 3 in both config layouts, scanned layers, heads split over devices,
and export refusing what an arch cannot state.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from flaxlm.models import hf
from flaxlm.models.sharding import logical_axis_rules, make_mesh, use_mesh
from flaxlm.models.transformer import stack_layers

FIX = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "hf")


def _load(family):
    cfg, params = hf.load_pretrained(os.path.join(FIX, family))
    return cfg, params, np.load(os.path.join(FIX, family, "reference.npz"))


def _max_err(cfg, params, ref, layout="full"):
    mask = ref[f"{layout}_mask"]
    logits = hf.forward(cfg, params, ref[f"{layout}_tokens"], ref[f"{layout}_positions"], mask)
    return float(np.abs(np.asarray(logits) - ref[f"{layout}_logits"])[mask == 1].max())


def _copy(family, tmp_path, edit_config):
    d = tmp_path / family
    shutil.copytree(os.path.join(FIX, family), d)
    c = json.loads((d / "config.json").read_text())
    edit_config(c)
    (d / "config.json").write_text(json.dumps(c))
    return str(d)


def test_configs_translate():
    cfg = hf.load_config(os.path.join(FIX, "gemma"))
    assert (cfg.norm_unit_offset, cfg.scale_embeddings, cfg.tie_embeddings) == (True, True, True)
    assert (cfg.mlp_activation, cfg.head_dim_, cfg.norm_placement) == ("gelu", 16, "pre")
    assert hf.default_arch(cfg) == "gemma"
    cfg = hf.load_config(os.path.join(FIX, "gemma2"))
    assert (cfg.norm_placement, cfg.sliding_window, cfg.sliding_window_pattern) == (
        "sandwich", 4, 2)  # fmt: skip
    assert [cfg.layer_window(i) for i in range(3)] == [4, 0, 4]  # local, global, local
    assert (cfg.query_pre_attn_scalar, cfg.attn_logit_softcap, cfg.final_logit_softcap) == (
        24, 1.5, 2.0)  # fmt: skip
    assert hf.default_arch(cfg) == "gemma2"
    cfg = hf.load_config(os.path.join(FIX, "gemma3"))
    assert [cfg.layer_window(i) for i in range(4)] == [4, 4, 0, 4]
    assert (cfg.qk_norm, cfg.rope_scaling, cfg.rope_scaling_factor) == ("head", "linear", 8)
    assert (cfg.rope_theta, cfg.rope_local_theta) == (1e6, 1e4)
    assert hf.default_arch(cfg) == "gemma3_text"


def test_layers_all_of_one_kind_take_that_kinds_rope():
    """Gemma 3 with every layer of one type: each layer rotates with its own type's RoPE
    (transformers picks rope_parameters[layer_type] per layer), so all sliding is the local
    RoPE (base 1e4, unscaled) on every layer, all full the global one (1e6, linear ×8)."""
    c = json.loads(open(os.path.join(FIX, "gemma3", "config.json")).read())
    n = c["num_hidden_layers"]
    local = hf.config_from_hf({**c, "layer_types": ["sliding_attention"] * n})
    assert (local.sliding_window, local.sliding_window_pattern) == (4, 0)
    assert (local.rope_theta, local.rope_scaling, local.rope_local_theta) == (1e4, "none", 0.0)
    full = hf.config_from_hf({**c, "layer_types": ["full_attention"] * n})
    assert (full.sliding_window, full.sliding_window_pattern) == (0, 0)
    assert (full.rope_theta, full.rope_scaling, full.rope_scaling_factor) == (1e6, "linear", 8)
    assert full.rope_local_theta == 0.0


def test_each_gemma_feature_shows_in_the_logits():
    """Dropping any one feature moves the logits by > 1e-2: the fixtures would catch its bug."""
    cfg, params, ref = _load("gemma")
    for wrong in (dict(scale_embeddings=False), dict(norm_unit_offset=False),
                  dict(mlp_activation="silu")):  # fmt: skip
        assert _max_err(cfg.replace(**wrong), params, ref) > 1e-2, wrong
    cfg, params, ref = _load("gemma2")
    for wrong in (dict(attn_logit_softcap=0.0), dict(final_logit_softcap=0.0),
                  dict(query_pre_attn_scalar=0.0), dict(sliding_window_pattern=0),
                  dict(sliding_window=0, sliding_window_pattern=0)):  # fmt: skip
        assert _max_err(cfg.replace(**wrong), params, ref) > 1e-2, wrong
    assert _max_err(cfg.replace(norm_placement="pre"), params, ref) > 1e-2  # post norms unused
    cfg, params, ref = _load("gemma3")
    for wrong in (dict(rope_local_theta=0.0), dict(rope_scaling="none"), dict(qk_norm="none"),
                  dict(sliding_window_pattern=2)):  # fmt: skip
        assert _max_err(cfg.replace(**wrong), params, ref) > 1e-2, wrong


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_scanned_layers_pick_their_kind(family):
    """Scanned layers get their kind (local or global) as a scanned flag and select masks and
    RoPE tables by it: the same logits as unrolled layers, with and without padding."""
    cfg, params, ref = _load(family)
    scan = cfg.replace(scan_layers=True, remat_policy="full")
    stacked = stack_layers(params, cfg.n_layers)
    for layout in ("full", "left"):
        assert _max_err(scan, stacked, ref, layout) < 1e-4, layout


def test_parity_with_heads_split_over_devices():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = logical_axis_rules("fsdp_tp")
    d = os.path.join(FIX, "gemma3")
    cfg, params = hf.load_pretrained(d, mesh=mesh, rules=rules)
    ref = np.load(os.path.join(d, "reference.npz"))
    with use_mesh(mesh, rules):
        for layout in ("full", "left"):
            tokens, mask, pos = (np.concatenate([ref[f"{layout}_{k}"]] * 2)
                                 for k in ("tokens", "mask", "positions"))  # fmt: skip
            logits = np.asarray(hf.forward(cfg, params, tokens, pos, mask))[:3]
            err = np.abs(logits - ref[f"{layout}_logits"])[ref[f"{layout}_mask"] == 1].max()
            assert err < 1e-4, (layout, err)


def test_older_config_layouts_read_the_same(tmp_path):
    """Gemma 3's flat rope keys (rope_theta, rope_scaling for global layers,
    rope_local_base_freq) and sliding_window_pattern instead of layer_types; Gemma 1's legacy
    hidden_act "gelu" (the tanh approximation, as transformers reads it)."""
    want = hf.load_config(os.path.join(FIX, "gemma3"))

    def flat(c):
        rp = c.pop("rope_parameters")
        c.update(rope_theta=rp["full_attention"]["rope_theta"],
                 rope_local_base_freq=rp["sliding_attention"]["rope_theta"],
                 rope_scaling={"rope_type": "linear", "factor": 8.0})  # fmt: skip

    assert hf.load_config(_copy("gemma3", tmp_path, flat)) == want

    def by_pattern(c):
        c.pop("layer_types")
        c["sliding_window_pattern"] = 3

    shutil.rmtree(tmp_path / "gemma3")
    assert hf.load_config(_copy("gemma3", tmp_path, by_pattern)) == want
    want = hf.load_config(os.path.join(FIX, "gemma"))
    assert hf.load_config(_copy("gemma", tmp_path, lambda c: c.update(hidden_act="gelu"))) == want


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
     "every P-th layer full"),
    (lambda c: c.update(layer_types=["sliding_attention"] * 2), "has 2 entries for 3 layers"),
    (lambda c: c.update(layer_types=["chunked_attention"] * 3), "chunked_attention"),
    (lambda c: c.update(sliding_window=None), "sliding_window is None"),
])  # fmt: skip
def test_unsupported_layer_patterns_name_the_key(tmp_path, edit, match):
    with pytest.raises(hf.HFError, match=match) as e:
        hf.load_config(_copy("gemma2", tmp_path, edit))
    assert "gemma2/config.json" in str(e.value)


def test_gemma3_bad_rope_and_bidirectional_name_the_key(tmp_path):
    def scaled_local(c):
        c["rope_parameters"]["sliding_attention"] = {"rope_type": "linear", "factor": 2.0,
                                                     "rope_theta": 1e4}  # fmt: skip

    with pytest.raises(hf.HFError, match="scaled RoPE on sliding_attention"):
        hf.load_config(_copy("gemma3", tmp_path, scaled_local))
    shutil.rmtree(tmp_path / "gemma3")
    with pytest.raises(hf.HFError, match="use_bidirectional_attention"):
        hf.load_config(_copy("gemma3", tmp_path,
                             lambda c: c.update(use_bidirectional_attention=True)))  # fmt: skip


def test_export_refuses_what_the_arch_cannot_state(tmp_path):
    cfg, params, _ = _load("gemma3")
    with pytest.raises(hf.HFError, match="arch 'llama' has qk_norm='none', this model "
                       "qk_norm='head'; use arch='gemma3_text'"):  # fmt: skip
        hf.save_pretrained(cfg, params, str(tmp_path / "x"), arch="llama")
    with pytest.raises(hf.HFError, match="arch 'qwen3' has norm_placement='pre'.*"
                       "use arch='gemma3_text'"):  # fmt: skip
        hf.save_pretrained(cfg, params, str(tmp_path / "x"), arch="qwen3")
    g2, p2, _ = _load("gemma2")
    with pytest.raises(hf.HFError, match="arch 'gemma' has norm_placement='pre'.*"
                       "use arch='gemma2'"):  # fmt: skip
        hf.save_pretrained(g2, p2, str(tmp_path / "x"), arch="gemma")
    # Gemma 3's model ignores attention soft-capping: a Gemma 2 model cannot become one
    with pytest.raises(hf.HFError, match="arch 'gemma3_text' cannot state attn_logit_softcap"):
        hf.save_pretrained(g2.replace(qk_norm="head"), p2, str(tmp_path / "x"),
                           arch="gemma3_text")  # fmt: skip
    # A Llama model as Gemma would need its norms and embeddings changed: refused, not converted
    llama, lp = hf.load_pretrained(os.path.join(FIX, "llama"))
    with pytest.raises(hf.HFError, match="arch 'gemma' has norm_unit_offset=True.*"
                       "use arch='llama'"):  # fmt: skip
        hf.save_pretrained(llama, lp, str(tmp_path / "x"), arch="gemma")
    assert not os.path.exists(tmp_path / "x")


def test_gemma3_export_writes_both_rope_layouts(tmp_path):
    cfg, params, _ = _load("gemma3")
    hf.save_pretrained(cfg, params, str(tmp_path / "out"), arch="gemma3_text")
    c = json.loads((tmp_path / "out" / "config.json").read_text())
    assert c["rope_parameters"] == {
        "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}  # fmt: skip
    assert (c["rope_theta"], c["rope_local_base_freq"]) == (1e6, 1e4)
    assert c["layer_types"][2] == "full_attention" and c["query_pre_attn_scalar"] == 24
    assert c["hidden_activation"] == "gelu_pytorch_tanh" and "hidden_act" not in c


def _as_image_text_checkpoint(d):
    """The gemma3 fixture in the hub layout of Gemma 3 4B-27B (Gemma3ForConditionalGeneration):
    the text config under text_config, stating only what differs from Gemma3TextConfig's
    defaults, and tensors under language_model. next to an image tower's."""
    from safetensors.numpy import load_file, save_file

    os.makedirs(d)
    text = json.load(open(os.path.join(FIX, "gemma3", "config.json")))
    defaults = {"tie_word_embeddings": True, "rms_norm_eps": 1e-6}
    sparse = {k: v for k, v in text.items() if defaults.get(k, object()) != v
              and k not in ("dtype", "architectures", "tie_word_embeddings")}  # fmt: skip
    sparse["rms_norm_eps"] = text["rms_norm_eps"]
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": sparse, "vision_config": {"hidden_size": 16}, "dtype": "float32",
              "tie_word_embeddings": True, "image_token_index": 63}  # fmt: skip
    json.dump(config, open(os.path.join(d, "config.json"), "w"))
    tensors = load_file(os.path.join(FIX, "gemma3", "model.safetensors"))
    tensors = {f"language_model.{k}": v for k, v in tensors.items()}
    tensors["vision_tower.embeddings.patch_embedding.weight"] = np.zeros((16, 3, 14, 14), "f4")
    tensors["multi_modal_projector.mm_input_projection_weight"] = np.zeros((16, 32), "f4")
    save_file(tensors, os.path.join(d, "model.safetensors"))
    return d


def test_image_text_checkpoint_loads_its_text_model(tmp_path):
    """Gemma 3 4B-27B ship as image-text models: the text model loads (the image tower is
    skipped) with the text-only model's logits, imports as a gemma3_text run and exports as
    one. (Live, make_hf_fixtures.py --check compares a real Gemma3ForConditionalGeneration.)"""
    d = _as_image_text_checkpoint(str(tmp_path / "mm"))
    cfg, params = hf.load_pretrained(d)
    want_cfg, want_params, ref = _load("gemma3")
    assert cfg == want_cfg
    jax.tree.map(np.testing.assert_array_equal, params, want_params)
    run = hf.import_to_run(d, str(tmp_path / "run"))
    hf.export_run(run, str(tmp_path / "export"))
    c = json.loads((tmp_path / "export" / "config.json").read_text())
    assert c["model_type"] == "gemma3_text" and c["architectures"] == ["Gemma3ForCausalLM"]
    assert hf.load_config(str(tmp_path / "export")) == want_cfg
    # A stray tensor outside the text model's prefix is named, not silently dropped.
    from safetensors.numpy import load_file, save_file

    t = load_file(os.path.join(d, "model.safetensors"))
    save_file({**t, "model.layers.0.extra.weight": np.zeros(2, "f4")},
              os.path.join(d, "model.safetensors"))  # fmt: skip
    with pytest.raises(hf.HFError, match=r"unexpected tensor model\.layers\.0\.extra\.weight "
                       r"\(the text model's are under 'language_model\.'\)"):  # fmt: skip
        hf.load_pretrained(d)


def test_sparse_gemma3_text_config_takes_transformers_defaults():
    """The hub's gemma-3-4b-it text_config states six keys; the rest are Gemma3TextConfig's
    defaults (transformers 5.24), as transformers reads it."""
    cfg = hf.config_from_hf({
        "model_type": "gemma3", "torch_dtype": "bfloat16",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                        "model_type": "gemma3_text", "num_hidden_layers": 34,
                        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024}})  # fmt: skip
    assert (cfg.vocab_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim_) == (262_208, 8, 4, 256)
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling) == (1e6, 1e4, "linear")
    assert (cfg.sliding_window, cfg.sliding_window_pattern, cfg.query_pre_attn_scalar) == (
        1024, 6, 256)  # fmt: skip
    assert (cfg.norm_eps, cfg.tie_embeddings, cfg.dtype, cfg.max_seq_len) == (
        1e-6, True, "bfloat16", 131_072)  # fmt: skip
    assert 3.8e9 < cfg.param_counts()["total"] < 3.9e9  # Gemma 3 4B's text model: 3.88B
