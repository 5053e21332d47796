"""HF interop: logits parity with transformers (committed fixtures), round trips, atomic export,
tokenizers, and clear errors for bad checkpoints.

The fixtures under tests/fixtures/hf were written by tests/fixtures/make_hf_fixtures.py with
transformers + torch; these tests need neither. The live check (transformers loading our export)
is that script's --check mode; set FLAXLM_HF_LIVE=1 with .venv-hf present to run it here too.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from flaxlm.models import hf
from flaxlm.models.decode import generate
from flaxlm.models.sharding import logical_axis_rules, make_mesh, use_mesh

FIX = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "hf")
FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3", "qwen3_yarn", "phi3", "olmo2",
            "gemma", "gemma2", "gemma3", "phi3_longrope", "smollm3", "olmo3", "mixtral",
            "qwen2_moe", "qwen3_moe", "olmoe")  # fmt: skip
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(family):
    """(cfg, params, reference arrays) of a committed fixture."""
    cfg, params = hf.load_pretrained(os.path.join(FIX, family))
    return cfg, params, np.load(os.path.join(FIX, family, "reference.npz"))


def _max_err(cfg, params, ref, layout):
    mask = ref[f"{layout}_mask"] * _batch_choice_rows(cfg, ref[f"{layout}_mask"])[:, None]
    logits = hf.forward(cfg, params, ref[f"{layout}_tokens"], ref[f"{layout}_positions"],
                        ref[f"{layout}_mask"])  # fmt: skip
    return float(np.abs(np.asarray(logits) - ref[f"{layout}_logits"])[mask == 1].max())


def _batch_choice_rows(cfg, mask_BT):
    """The rows whose transformers reference is flaxlm's too. transformers picks LongRoPE's
    factors once per forward, by the whole batch's longest row; flaxlm per row, by the row's
    own real tokens (`rope.longrope_long`), so a padded row within the original context next
    to a longer one has no batched reference (the "short" layout checks such rows)."""
    lengths = np.asarray(mask_BT).sum(1)
    if cfg.rope_scaling != "longrope":
        return np.ones(len(lengths), bool)
    own = lengths > cfg.rope_original_max_len
    return own == own.any()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family):
    cfg, params, ref = _load(family)
    layouts = [k[: -len("_mask")] for k in ref.files if k.endswith("_mask")]
    assert {"full", "right", "left"} <= set(layouts)  # no padding, right and left padding
    for layout in layouts:  # (+ LongRoPE's "short": within the original context)
        assert _max_err(cfg, params, ref, layout) < 1e-4, (family, layout)
    # Logits are O(1): a 1e-4 match is not a match of near-constant outputs.
    assert np.std(ref["full_logits"]) > 0.5


def test_longrope_rows_within_the_original_context_take_the_short_factors():
    """A right-padded row within the original context, next to a row past it, is rotated by
    the short factors of transformers' forward over that row alone (the "short" layout holds
    the same rows' first tokens), not by the long ones the batch's longest row asks for."""
    cfg, params, ref = _load("phi3_longrope")
    mask, n = ref["right_mask"], ref["short_mask"].shape[1]
    within = mask.sum(1) <= cfg.rope_original_max_len
    assert within.any() and not within.all()  # (the fixture mixes both kinds of rows)
    logits = np.asarray(hf.forward(cfg, params, ref["right_tokens"], ref["right_positions"], mask))
    err = np.abs(logits[:, :n] - ref["short_logits"])[within][mask[within, :n] == 1]
    assert err.size and err.max() < 1e-4


@pytest.mark.parametrize(
    "family,attn",
    [("mistral", "xla"), ("qwen2", "xla"), ("qwen3", "xla"), ("qwen3_yarn", "xla"),
     ("qwen3_yarn", "pallas"), ("phi3", "xla"), ("phi3", "pallas"), ("olmo2", "xla"),
     ("olmo2", "pallas"), ("gemma", "xla"), ("gemma2", "xla"), ("gemma2", "pallas"),
     ("gemma3", "xla"), ("gemma3", "pallas"), ("phi3_longrope", "xla"), ("smollm3", "xla"),
     ("olmo3", "xla"), ("mixtral", "xla"), ("qwen2_moe", "xla"), ("qwen3_moe", "xla"),
     ("olmoe", "xla")],
)  # fmt: skip  # the families' decode-time features (head_dim 8/16 keep "pallas" on the XLA
# path; Gemma 3's head_dim 32 runs the kernel: local and global layers' masks and tables,
# query_pre_attn_scalar; test_decode.py runs it with Gemma 2's soft-capping)
def test_cached_greedy_decoding_matches_transformers_generate(family, attn):
    """flaxlm's KV-cache decode (ragged right-padded prompts) reproduces transformers' greedy
    `generate` (left-padded, its own cache) token for token: sliding window, biases, per-head
    q/k norms and YaRN's scaled tables included."""
    cfg, params, ref = _load(family)
    prompts = [t[m == 1].tolist() for t, m in zip(ref["left_tokens"], ref["left_mask"])]
    want = ref["greedy_tokens"]
    out = generate(cfg, params, prompts, max_new_tokens=want.shape[1],
                   rng=jax.random.PRNGKey(0), temperature=0, decode_attention=attn)  # fmt: skip
    # (LongRoPE: transformers rotated the shorter prompts by their longest batch mate's long
    # factors; flaxlm gives each row its own, so only those rows compare)
    rows = _batch_choice_rows(cfg, ref["left_mask"])
    np.testing.assert_array_equal(np.asarray(out.tokens)[rows], want[rows])


def test_fixtures_catch_rope_and_window_bugs():
    """The fixtures are sensitive: dropping Llama-3 rope scaling or Mistral's window shows."""
    cfg, params, ref = _load("llama3")
    assert _max_err(cfg.replace(rope_scaling="none"), params, ref, "full") > 1e-2
    cfg, params, ref = _load("mistral")
    assert _max_err(cfg.replace(sliding_window=0), params, ref, "full") > 1e-2
    # Qwen3: without the per-head q/k norms; YaRN without its ramp or its attention factor
    cfg, params, ref = _load("qwen3")
    assert _max_err(cfg.replace(qk_norm="none"), params, ref, "full") > 1e-2
    cfg, params, ref = _load("qwen3_yarn")
    for wrong in (dict(rope_scaling="none"), dict(rope_attention_factor=1.0),
                  dict(rope_scaling="linear")):  # fmt: skip
        assert _max_err(cfg.replace(**wrong), params, ref, "full") > 1e-2, wrong
    # Phi-3: RoPE on the whole head instead of its first half; no window
    cfg, params, ref = _load("phi3")
    for wrong in (dict(rotary_dim=0), dict(sliding_window=0)):
        assert _max_err(cfg.replace(**wrong), params, ref, "full") > 1e-2, wrong
    # OLMo 2: q/k norms per head instead of over all heads; norms before instead of after
    cfg, params, ref = _load("olmo2")
    head = {
        **params,
        **{
            f"layers_{i}": {
                **params[f"layers_{i}"],
                "attn": {
                    **params[f"layers_{i}"]["attn"],
                    "q_norm": {"scale": np.ones(cfg.head_dim_, np.float32)},
                    "k_norm": {"scale": np.ones(cfg.head_dim_, np.float32)},
                },
            }
            for i in range(cfg.n_layers)
        },
    }
    assert _max_err(cfg.replace(qk_norm="head"), head, ref, "full") > 1e-2
    assert _max_err(cfg.replace(norm_placement="pre"), params, ref, "full") > 1e-2
    # LongRoPE: the long factors past the original context, the short ones within it, and
    # the attention factor — each swapped or dropped shows
    cfg, params, ref = _load("phi3_longrope")
    short, long = cfg.rope_short_factors, cfg.rope_long_factors
    assert _max_err(cfg.replace(rope_long_factors=short), params, ref, "full") > 1e-2
    assert _max_err(cfg.replace(rope_short_factors=long), params, ref, "short") > 1e-2
    assert _max_err(cfg.replace(rope_attention_factor=1.0), params, ref, "full") > 1e-2
    # SmolLM3: RoPE in its NoPE layers, or NoPE in the others
    cfg, params, ref = _load("smollm3")
    for wrong in (dict(nope_layer_interval=0), dict(nope_layer_interval=4)):
        assert _max_err(cfg.replace(**wrong), params, ref, "full") > 1e-2, wrong
    # OLMo 3: YaRN on the local layers too, another period, or every layer local
    cfg, params, ref = _load("olmo3")
    for wrong in (dict(rope_local_theta=0.0), dict(sliding_window_pattern=2),
                  dict(sliding_window_pattern=0, rope_local_theta=0.0)):  # fmt: skip
        assert _max_err(cfg.replace(**wrong), params, ref, "full") > 1e-2, wrong


def test_config_translation():
    assert hf.load_config(os.path.join(FIX, "llama3")).rope_scaling == "llama3"
    cfg = hf.load_config(os.path.join(FIX, "mistral"))
    assert cfg.sliding_window == 4 and not cfg.qkv_bias
    cfg = hf.load_config(os.path.join(FIX, "qwen2"))
    assert cfg.qkv_bias and cfg.tie_embeddings and cfg.rope_theta == 1e6 and cfg.sliding_window == 0
    cfg = hf.load_config(os.path.join(FIX, "qwen3"))
    assert cfg.qk_norm == "head" and not cfg.qkv_bias and cfg.rope_scaling == "none"
    assert hf.default_arch(cfg) == "qwen3"
    cfg = hf.load_config(os.path.join(FIX, "qwen3_yarn"))
    assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_original_max_len) == ("yarn", 8, 32)
    assert cfg.rope_attention_factor == pytest.approx(0.1 * np.log(8) + 1)
    cfg = hf.load_config(os.path.join(FIX, "phi3"))
    assert (cfg.rotary_dim, cfg.head_dim_, cfg.sliding_window) == (4, 8, 6)
    assert hf.default_arch(cfg) == "phi3" and not cfg.qkv_bias
    cfg = hf.load_config(os.path.join(FIX, "olmo2"))
    assert (cfg.qk_norm, cfg.norm_placement, hf.default_arch(cfg)) == ("all", "post", "olmo2")


def _qwen2_old_layout(**edits):
    """The qwen2 fixture's config.json as transformers < 4.53 writes it: no layer_types, each
    layer's kind derived from use_sliding_window / max_window_layers."""
    base = json.loads(open(os.path.join(FIX, "qwen2", "config.json")).read())
    return {**{k: v for k, v in base.items() if k != "layer_types"}, **edits}


def test_qwen_sliding_layers_follow_max_window_layers_as_transformers():
    """Qwen2Attention (transformers < 4.53): layer i slides when use_sliding_window is set and
    i >= max_window_layers, else it attends to everything. Written out for the fixture's 2
    layers: max_window_layers 0 -> both sliding (the window on every layer), 2 -> both full (no
    window), 1 -> full then sliding (a pattern flaxlm refuses, not one read as all full)."""
    n = _qwen2_old_layout()["num_hidden_layers"]
    assert n == 2

    def kinds(mwl):  # transformers' rule
        return ["sliding_attention" if i >= mwl else "full_attention" for i in range(n)]

    def read(mwl):
        return hf.config_from_hf(_qwen2_old_layout(use_sliding_window=True, sliding_window=4,
                                                   max_window_layers=mwl))  # fmt: skip

    assert set(kinds(0)) == {"sliding_attention"} and read(0).sliding_window == 4
    assert set(kinds(n)) == {"full_attention"} and read(n).sliding_window == 0
    assert kinds(1) == ["full_attention", "sliding_attention"]
    with pytest.raises(hf.HFError, match="supported: all full, all sliding"):
        read(1)
    # without use_sliding_window every layer is full, whatever max_window_layers says
    assert hf.config_from_hf(_qwen2_old_layout(sliding_window=4, max_window_layers=0)
                             ).sliding_window == 0  # fmt: skip


def test_qwen_export_with_a_window_slides_every_layer_for_old_readers():
    """An exported Qwen2/Qwen3 config with a sliding window: transformers < 4.53 ignores
    layer_types and slides layer i only when i >= max_window_layers, so max_window_layers must
    be 0 for the window to reach every layer, as layer_types says."""
    cfg = hf.config_from_hf(_qwen2_old_layout()).replace(sliding_window=4)
    for arch in ("qwen2", "qwen3"):
        out = hf.config_to_hf(cfg.replace(qk_norm="head") if arch == "qwen3" else cfg, arch)
        assert out["use_sliding_window"] and out["sliding_window"] == 4
        assert out["layer_types"] == ["sliding_attention"] * cfg.n_layers
        slides = [
            out["use_sliding_window"] and i >= out["max_window_layers"] for i in range(cfg.n_layers)
        ]  # (Qwen2Attention's rule)
        assert all(slides), (arch, out["max_window_layers"])
        legacy = {k: v for k, v in out.items() if k != "layer_types"}
        assert hf.config_from_hf(legacy).sliding_window == 4, arch


# transformers 5.24 `ROPE_INIT_FUNCTIONS["yarn"]` for a Qwen3Config with head_dim 16, rope_theta
# 1e4, factor 4, original_max_position_embeddings 64 (attention factor 1.138629436111989):
# inverse frequencies with truncate=True (the default) and truncate=False. At this head dim the
# ramp's rounded ends move pairs 1 and 2; the fixture's head dim 8 cannot show it.
YARN_INV_FREQ = {
    True: [1.0, 0.23717081546783447, 0.04999999701976776, 0.007905694656074047,
           0.0024999999441206455, 0.0007905694656074047, 0.0002500000118743628,
           7.905694656074047e-05],
    False: [1.0, 0.19858352839946747, 0.025595249608159065, 0.007905694656074047,
            0.0024999999441206455, 0.0007905694656074047, 0.0002500000118743628,
            7.905694656074047e-05],
}  # fmt: skip


@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_frequencies_match_transformers(truncate):
    from flaxlm.models.attention import rope_attention_factor, rope_inv_freq
    from flaxlm.models.config import ModelConfig

    cfg = ModelConfig(d_model=64, n_heads=4, head_dim=16, rope_theta=1e4, rope_scaling="yarn",
                      rope_scaling_factor=4.0, rope_original_max_len=64,
                      rope_yarn_truncate=truncate)  # fmt: skip
    np.testing.assert_allclose(rope_inv_freq(cfg), YARN_INV_FREQ[truncate], rtol=1e-6)
    assert rope_attention_factor(cfg) == pytest.approx(1.138629436111989)


def test_longrope_attention_factor_defaults_as_transformers():
    """A hand-built LongRoPE config without a factor: transformers takes max positions /
    original (131072 / 4096 = 32), so sqrt(1 + ln 32 / ln 4096) = 1.1902 (it was 1.0); the
    imported value and a given factor are kept."""
    from flaxlm.models.attention import rope_attention_factor
    from flaxlm.models.config import ModelConfig

    cfg = ModelConfig(d_model=64, n_heads=4, head_dim=16, max_seq_len=131072,
                      rope_scaling="longrope", rope_original_max_len=4096,
                      rope_short_factors=(1.0,) * 8, rope_long_factors=(2.0,) * 8)  # fmt: skip
    want = np.sqrt(1 + np.log(32) / np.log(4096))
    assert rope_attention_factor(cfg) == pytest.approx(want) and want == pytest.approx(1.1902, 1e-4)
    assert rope_attention_factor(cfg.replace(rope_scaling_factor=8.0)) == pytest.approx(
        np.sqrt(1 + np.log(8) / np.log(4096)))  # fmt: skip
    assert rope_attention_factor(cfg.replace(rope_attention_factor=1.3)) == 1.3
    assert rope_attention_factor(cfg.replace(max_seq_len=4096)) == 1.0  # no extension


def test_yarn_settings_read_as_transformers_reads_them():
    """YaRN's optional keys (transformers 5 modeling_rope_utils): DeepSeek's mscale pair sets
    the attention factor, an explicit one wins, the original context defaults to
    max_position_embeddings, beta_fast/beta_slow/truncate pass through."""
    base = json.loads(open(os.path.join(FIX, "qwen3_yarn", "config.json")).read())

    def read(**rope):
        rope = {"rope_type": "yarn", "rope_theta": 1e4, **rope}
        return hf.config_from_hf({**base, "rope_parameters": rope})

    def mscale(s, m=1.0):
        return 0.1 * m * np.log(s) + 1.0

    c = read(factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=0.707)
    assert c.rope_attention_factor == pytest.approx(mscale(40, 1.0) / mscale(40, 0.707))
    assert read(factor=4.0, attention_factor=0.5).rope_attention_factor == 0.5
    c = read(factor=4.0, beta_fast=16, beta_slow=2, truncate=False)
    assert c.rope_original_max_len == base["max_position_embeddings"]
    assert (c.rope_yarn_beta_fast, c.rope_yarn_beta_slow, c.rope_yarn_truncate) == (16, 2, False)
    # The legacy spelling ({rope_theta, rope_scaling: {type: yarn}}) reads the same.
    legacy = {k: v for k, v in base.items() if k != "rope_parameters"}
    scaling = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32}
    legacy.update(rope_theta=1e4, rope_scaling=scaling)
    assert hf.config_from_hf(legacy) == hf.config_from_hf(base)
    with pytest.raises(hf.HFError, match="partial_rotary_factor"):
        read(factor=4.0, partial_rotary_factor=0.5)


@pytest.mark.parametrize("family", ["olmo3", "gemma3"])
def test_yarn_by_layer_type_falls_back_on_the_top_level_context(family):
    """OLMo 3's / Gemma 3's RoPE per layer type was read from its rope parameters alone: a
    yarn without its own original_max_position_embeddings failed instead of taking the
    top-level key, else max_position_embeddings (as every other family, transformers 5)."""
    base = json.loads(open(os.path.join(FIX, family, "config.json")).read())
    theta = base["rope_parameters"]["full_attention"]["rope_theta"]
    yarn = {"rope_type": "yarn", "factor": 4.0, "rope_theta": theta}
    per_type = {**base, "rope_parameters": {**base["rope_parameters"], "full_attention": yarn}}
    flat = {k: v for k, v in base.items() if k != "rope_parameters"}
    flat.update(rope_theta=theta, rope_scaling=yarn)
    for c in (per_type, flat):
        cfg = hf.config_from_hf(c)
        assert (cfg.rope_scaling, cfg.rope_original_max_len) == ("yarn", 128)
        assert hf.config_from_hf({**c, "original_max_position_embeddings": 64}
                                 ).rope_original_max_len == 64  # fmt: skip
        with pytest.raises(hf.HFError, match="lacks 'original_max_position_embeddings'"):
            hf.config_from_hf({**c, "max_position_embeddings": None, "rope_scaling": None,
                               "rope_parameters": {"full_attention": yarn}})  # fmt: skip


def test_null_config_values_name_the_key():
    """A null in config.json was a bare TypeError (float(None)): where transformers reads null
    as its default it is that default here, elsewhere an HFError naming the key."""
    base = json.loads(open(os.path.join(FIX, "llama3", "config.json")).read())
    ref = hf.config_from_hf(base)

    def read(**nulls):
        return hf.config_from_hf({**base, **nulls})

    assert read(num_key_value_heads=None).n_kv_heads == ref.n_heads
    assert read(head_dim=None).head_dim_ == ref.d_model // ref.n_heads
    assert read(sliding_window=None, rope_scaling=None, partial_rotary_factor=None) == ref
    assert read(max_position_embeddings=None).max_seq_len == 2048  # (as when absent)
    legacy = {k: v for k, v in base.items() if k != "rope_parameters"}
    rope = base["rope_parameters"]
    cases = [
        ({**base, "rms_norm_eps": None}, "config.json: rms_norm_eps is null; expected a number"),
        ({**base, "rms_norm_eps": "small"}, "config.json: rms_norm_eps='small' is not a number"),
        ({**legacy, "rope_theta": None}, "config.json: rope_theta is null"),
        ({**base, "rope_parameters": {**rope, "rope_theta": None}}, "rope_theta is null"),
        ({**base, "rope_parameters": {**rope, "factor": None}}, "'llama3' lacks 'factor'"),
        ({**base, "rope_parameters": {**rope, "low_freq_factor": None}},
         "low_freq_factor is null"),
        ({**base, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4,
          "max_window_layers": None}, "max_window_layers is null"),
    ]  # fmt: skip
    for c, msg in cases:
        with pytest.raises(hf.HFError, match=msg):
            hf.config_from_hf(c)
    phi = json.loads(open(os.path.join(FIX, "phi3_longrope", "config.json")).read())
    rope = phi.get("rope_parameters") or phi["rope_scaling"]
    key = "rope_parameters" if "rope_parameters" in phi else "rope_scaling"
    with pytest.raises(hf.HFError, match="longrope rope scaling lacks 'short_factor'"):
        hf.config_from_hf({**phi, key: {**rope, "short_factor": None}})
    assert hf.config_from_hf({**phi, "max_position_embeddings": None})


def test_tied_embeddings_default_per_family():
    """A config.json without tie_word_embeddings reads as its family's config class default:
    tied for Gemma and SmolLM3 (it was read as untied for SmolLM3), untied for the others."""
    for family, tied in (("smollm3", True), ("gemma3", True), ("llama", False),
                         ("qwen3", False), ("olmo3", False)):  # fmt: skip
        c = json.loads(open(os.path.join(FIX, family, "config.json")).read())
        c.pop("tie_word_embeddings", None)
        assert hf.config_from_hf(c).tie_embeddings == tied, family


def _copy(family, tmp_path, edit_config=None, name="src"):
    d = tmp_path / name
    shutil.copytree(os.path.join(FIX, family), d)
    if edit_config:
        c = json.loads((d / "config.json").read_text())
        edit_config(c)
        (d / "config.json").write_text(json.dumps(c))
    return str(d)


def test_smollm3_nope_layers_read_as_transformers_reads_them():
    c = json.loads(open(os.path.join(FIX, "smollm3", "config.json")).read())
    assert hf.config_from_hf(c).nope_layer_interval == 2
    derived = {k: v for k, v in c.items() if k != "no_rope_layers"}  # (from the interval)
    assert hf.config_from_hf(derived).nope_layer_interval == 2
    assert hf.config_from_hf({**derived, "no_rope_layer_interval": None}).nope_layer_interval == 4
    assert hf.config_from_hf({**c, "no_rope_layers": [1] * 4}).nope_layer_interval == 0
    with pytest.raises(hf.HFError, match=r"no_rope_layers \[1, 0, 0, 1\]: supported are"):
        hf.config_from_hf({**c, "no_rope_layers": [1, 0, 0, 1]})
    with pytest.raises(hf.HFError, match="use_sliding_window=true is not supported for smollm3"):
        hf.config_from_hf({**c, "use_sliding_window": True, "sliding_window": 4})
    cfg = hf.config_from_hf(c)
    with pytest.raises(hf.HFError, match="arch 'llama' cannot state nope_layer_interval=2; "
                       "use arch='smollm3'"):  # fmt: skip
        hf.config_to_hf(cfg, "llama")


def test_old_rope_layout_reads_the_same(tmp_path):
    def old_layout(c):
        rp = c.pop("rope_parameters")
        c["rope_theta"] = rp.pop("rope_theta")
        c["rope_scaling"] = {"type": rp.pop("rope_type"), **rp}  # pre-4.45 spelling: "type"

    d = _copy("llama3", tmp_path, old_layout)
    assert hf.load_config(d) == hf.load_config(os.path.join(FIX, "llama3"))
    c = hf.config_from_hf({**json.loads((tmp_path / "src" / "config.json").read_text()),
                           "rope_scaling": None, "rope_theta": 5e5})  # fmt: skip
    assert c.rope_scaling == "none" and c.rope_theta == 5e5
    # Phi-3's first configs: LongRoPE as rope_scaling {"type": "su"} (or "yarn"), as Phi3Config
    # reads them; the top-level original context wins over the rope parameters' (transformers)
    want = hf.load_config(os.path.join(FIX, "phi3_longrope"))
    for name in ("su", "yarn"):
        d = _copy("phi3_longrope", tmp_path, old_layout, name=name)
        c = json.loads(open(os.path.join(d, "config.json")).read())
        c["rope_scaling"]["type"] = name
        c["rope_scaling"]["original_max_position_embeddings"] = 99
        open(os.path.join(d, "config.json"), "w").write(json.dumps(c))
        assert hf.load_config(d) == want, name
    with pytest.raises(hf.HFError, match="lacks 'long_factor'"):
        hf.config_from_hf({**c, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 3}})
    with pytest.raises(ValueError, match="rope_long_factors has 2 factors; longrope needs "
                       r"rotary_dim / 2 = 3"):  # fmt: skip
        want.replace(rope_long_factors=(1.0, 2.0))
    # OLMo 3's flat layout: rope_scaling on the global layers only; the local ones get
    # Olmo3Config's default base whatever rope_theta says (transformers 5.24)
    want = hf.load_config(os.path.join(FIX, "olmo3"))
    o3 = json.loads(open(os.path.join(FIX, "olmo3", "config.json")).read())
    rp = o3.pop("rope_parameters")
    scaling = {k: v for k, v in rp["full_attention"].items() if k != "rope_theta"}
    flat = {**o3, "rope_theta": 5e5, "rope_scaling": scaling}
    assert hf.config_from_hf(flat) == want
    other = hf.config_from_hf({**flat, "rope_theta": 1e6})
    assert (other.rope_theta, other.rope_local_theta) == (1e6, 5e5)


@pytest.mark.parametrize("family,arch", [("llama", "llama"), ("llama3", "llama"),
                                         ("mistral", "mistral"), ("qwen2", "qwen2"),
                                         ("qwen3", "qwen3"), ("qwen3_yarn", "qwen3"),
                                         ("phi3", "phi3"), ("olmo2", "olmo2"),
                                         ("gemma", "gemma"), ("gemma2", "gemma2"),
                                         ("gemma3", "gemma3_text"), ("phi3_longrope", "phi3"),
                                         ("smollm3", "smollm3"), ("olmo3", "olmo3"),
                                         ("mixtral", "mixtral"), ("qwen2_moe", "qwen2_moe"),
                                         ("qwen3_moe", "qwen3_moe"),
                                         ("olmoe", "olmoe")])  # fmt: skip
def test_import_export_import_round_trip(family, arch, tmp_path):
    cfg, params = hf.load_pretrained(os.path.join(FIX, family))
    out = tmp_path / "export"
    hf.save_pretrained(cfg, params, str(out), arch=arch, max_shard_bytes=30_000)
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and len(files) > 3  # sharded, with index
    cfg2, params2 = hf.load_pretrained(str(out))
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    # The exported config reads in both rope layouts' readers (new dict + legacy keys).
    c = json.loads((out / "config.json").read_text())
    rope = c["rope_parameters"].get("full_attention", c["rope_parameters"])  # (Gemma 3: by type)
    assert rope["rope_theta"] == c["rope_theta"] == cfg.rope_theta
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp dirs left


def test_export_fills_what_the_arch_needs_and_refuses_what_it_cannot_express(tmp_path):
    cfg, params = hf.load_pretrained(os.path.join(FIX, "llama"))
    # Qwen2 always has q/k/v biases: exported as zeros, so the logits are unchanged.
    hf.save_pretrained(cfg, params, str(tmp_path / "q"), arch="qwen2")
    qcfg, qparams = hf.load_pretrained(str(tmp_path / "q"))
    assert qcfg.qkv_bias and not np.any(np.asarray(qparams["layers_1"]["attn"]["k"]["bias"]))
    with pytest.raises(hf.HFError, match="arch 'llama' cannot state sliding_window=8; "
                       "use arch='mistral'"):  # fmt: skip
        hf.save_pretrained(cfg.replace(sliding_window=8), params, str(tmp_path / "x"))
    with pytest.raises(hf.HFError, match="arch 'mistral' cannot state qkv_bias=True; "
                       "use arch='llama'"):  # fmt: skip
        hf.save_pretrained(qcfg, qparams, str(tmp_path / "x"), arch="mistral")
    with pytest.raises(hf.HFError, match="arch 'olmo2' cannot state sliding_window=8"):
        hf.save_pretrained(cfg.replace(sliding_window=8, qk_norm="all", norm_placement="post"),
                           params, str(tmp_path / "x"), arch="olmo2")  # fmt: skip
    with pytest.raises(hf.HFError, match="use arch='qwen2'"):  # biases and a window: Qwen2's
        hf.save_pretrained(qcfg.replace(sliding_window=8), qparams, str(tmp_path / "x"))
    with pytest.raises(hf.HFError, match="exists and is not empty"):
        hf.save_pretrained(cfg, params, str(tmp_path / "q"), arch="llama")
    # Only Qwen3 normalises q and k per head, and it always does: no silent dropping or adding.
    q3cfg, q3params = hf.load_pretrained(os.path.join(FIX, "qwen3"))
    for arch in ("llama", "mistral", "qwen2"):
        with pytest.raises(hf.HFError, match=rf"arch '{arch}' has qk_norm='none', this model "
                           r"qk_norm='head'; use arch='qwen3'"):  # fmt: skip
            hf.save_pretrained(q3cfg, q3params, str(tmp_path / "x"), arch=arch)
    with pytest.raises(hf.HFError, match="arch 'qwen3' has qk_norm='head', this model "
                       "qk_norm='none'"):  # fmt: skip
        hf.save_pretrained(cfg, params, str(tmp_path / "x"), arch="qwen3")
    with pytest.raises(hf.HFError, match="arch 'olmo2' has qk_norm='all'"):
        hf.save_pretrained(cfg, params, str(tmp_path / "x"), arch="olmo2")
    # Partial rotary exists only in Phi-3's format, and Phi-3 has no biases.
    pcfg, pparams = hf.load_pretrained(os.path.join(FIX, "phi3"))
    with pytest.raises(hf.HFError, match="arch 'mistral' cannot state rotary_dim=4; "
                       "use arch='phi3'"):  # fmt: skip
        hf.save_pretrained(pcfg, pparams, str(tmp_path / "x"), arch="mistral")
    with pytest.raises(hf.HFError, match="arch 'phi3' cannot state qkv_bias=True; "
                       "no supported arch can state this model"):  # fmt: skip
        hf.save_pretrained(qcfg.replace(rotary_dim=4), qparams, str(tmp_path / "x"), arch="phi3")
    # A Llama model as Phi-3: fused weights written, read back the same.
    hf.save_pretrained(cfg, params, str(tmp_path / "p"), arch="phi3")
    p3cfg, p3params = hf.load_pretrained(str(tmp_path / "p"))
    assert p3cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, p3params, params)
    # Qwen3 with biases: attention_bias=true also biases o_proj, written as zeros.
    hf.save_pretrained(q3cfg.replace(qkv_bias=True), _with_qkv_bias(q3params), str(tmp_path / "b"),
                       arch="qwen3")  # fmt: skip
    c = json.loads((tmp_path / "b" / "config.json").read_text())
    assert c["attention_bias"] is True and c["model_type"] == "qwen3"
    bcfg, bparams = hf.load_pretrained(str(tmp_path / "b"))
    assert bcfg == q3cfg.replace(qkv_bias=True)
    jax.tree.map(np.testing.assert_array_equal, bparams, _with_qkv_bias(q3params))


@pytest.mark.parametrize("family, arch, scan", [("qwen2_moe", "qwen2_moe", True),
                                                ("llama", "phi3", False)])  # fmt: skip
def test_export_of_int8_params_writes_the_dequantized_weights(family, arch, scan, tmp_path):
    """save_pretrained of `quant.quantize_params` output wrote each int8 kernel's integers
    (up to ±127) as the float weight and dropped its kernel_scale: a garbage model, ~100x too
    large. Now each is written as kernel · scale — experts, shared expert, untied head,
    Phi-3's fused q|k|v and gate|up, and scanned layers (a leading layer axis) included."""
    from flaxlm.models import quant
    from flaxlm.models.transformer import stack_layers

    cfg, params = hf.load_pretrained(os.path.join(FIX, family))
    q = quant.quantize_params(params)
    assert q["lm_head"]["kernel"].dtype == np.int8  # (the head is quantized too)

    def dequantized(node):  # the float model int8 decoding computes: kernel · kernel_scale
        if not isinstance(node, dict):
            return np.asarray(node)
        if "kernel_scale" in node:
            rest = {k: v for k, v in node.items() if k not in ("kernel", "kernel_scale")}
            kernel = quant.dequantize(node["kernel"], node["kernel_scale"], np.float32)
            return {**rest, "kernel": np.asarray(kernel)}
        return {k: dequantized(v) for k, v in node.items()}

    want = dequantized(q)
    if scan:
        cfg, q = cfg.replace(scan_layers=True), stack_layers(q, cfg.n_layers)
    hf.save_pretrained(cfg, q, str(tmp_path / "out"), arch=arch)
    _, back = hf.load_pretrained(str(tmp_path / "out"))
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=0), back, want)
    # (and the dequantized model is the float one to int8 rounding, not the integers)
    k, exported = params["layers_0"]["attn"]["q"]["kernel"], back["layers_0"]["attn"]["q"]["kernel"]
    assert np.abs(np.asarray(exported) - k).max() <= np.abs(k).max() / 127


def _with_qkv_bias(params):
    """params with nonzero q/k/v biases added to every layer's attention."""
    out = {k: v for k, v in params.items()}
    rng = np.random.default_rng(0)
    for name, layer in params.items():
        if not name.startswith("layers_"):
            continue
        attn = dict(layer["attn"])
        for p in ("q", "k", "v"):
            n, h = attn[p]["kernel"].shape[1:]
            attn[p] = {**attn[p], "bias": rng.normal(size=(n, h)).astype(np.float32)}
        out[name] = {**layer, "attn": attn}
    return out


def test_export_is_all_or_nothing(tmp_path, monkeypatch):
    cfg, params = hf.load_pretrained(os.path.join(FIX, "qwen2"))
    import safetensors.numpy

    real, calls = safetensors.numpy.save_file, []

    def fail_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(safetensors.numpy, "save_file", fail_second)
    with pytest.raises(OSError, match="disk full"):
        hf.save_pretrained(cfg, params, str(tmp_path / "out"), arch="qwen2", max_shard_bytes=30_000)
    assert os.listdir(tmp_path) == []  # neither the target nor a temp directory
    # Overwriting keeps the old export until the new one is complete.
    monkeypatch.setattr(safetensors.numpy, "save_file", real)
    hf.save_pretrained(cfg, params, str(tmp_path / "out"), arch="qwen2")
    calls.clear()
    monkeypatch.setattr(safetensors.numpy, "save_file", fail_second)
    with pytest.raises(OSError):
        hf.save_pretrained(cfg, params, str(tmp_path / "out"), arch="qwen2",
                           max_shard_bytes=30_000, overwrite=True)  # fmt: skip
    assert os.listdir(tmp_path) == ["out"] and hf.load_config(str(tmp_path / "out")) == cfg


def test_export_shards_fill_up_to_max_shard_bytes():
    """Export shards (HF order) hold at most max_shard_bytes each and are full: a tensor starts
    a new shard only when it would take the current one past the limit (transformers' rule),
    so a limit of exactly the model's bytes is one model.safetensors, and one of exactly the
    first k tensors' bytes puts those k in the first shard. Only the shapes are read here."""
    from flaxlm.models.hf_weights import export_tensors

    cfg, f32 = hf.load_config(os.path.join(FIX, "qwen2")), np.dtype(np.float32)

    def shards(limit):  # each shard's tensor sizes in bytes
        return [[int(np.prod(shape)) * 4 for _, shape, _ in s]
                for s in export_tensors(cfg, None, "qwen2", f32, limit)]  # fmt: skip

    (sizes,) = shards(1 << 40)
    assert len(shards(sum(sizes))) == 1
    for k in (1, 3, 5):
        assert len(shards(sum(sizes[:k]))[0]) == k
    for limit in (max(sizes), 30_000, sum(sizes) // 3):
        got = shards(limit)
        assert [n for s in got for n in s] == sizes  # every tensor once, in order
        assert all(sum(s) <= limit for s in got)
        assert all(sum(a) + b[0] > limit for a, b in zip(got, got[1:]))  # each one full


def test_export_files_are_readable_like_config_json(tmp_path):
    """safetensors writes its files 0600: an export was unreadable by anyone else (a shared
    directory, a serving container under another user) while its directory was 0755."""
    cfg, params = hf.load_pretrained(os.path.join(FIX, "qwen2"))
    out = tmp_path / "out"
    hf.save_pretrained(cfg, params, str(out), arch="qwen2", max_shard_bytes=30_000)
    umask = os.umask(0)
    os.umask(umask)
    modes = {f: os.stat(out / f).st_mode & 0o777 for f in os.listdir(out)}
    assert len([f for f in modes if f.endswith(".safetensors")]) > 1
    assert set(modes.values()) == {0o666 & ~umask}, modes  # as open() makes config.json


def test_bad_checkpoints_name_the_key_or_tensor(tmp_path):
    with pytest.raises(hf.HFError, match="model_type 'gpt2'.*not supported"):
        hf.load_pretrained(_copy("llama", tmp_path, lambda c: c.update(model_type="gpt2"), "a"))
    with pytest.raises(hf.HFError, match="missing key 'hidden_size'"):
        hf.load_config(_copy("llama", tmp_path, lambda c: c.pop("hidden_size"), "b"))
    with pytest.raises(hf.HFError, match="rope type 'dynamic' is not supported"):
        edit = lambda c: c["rope_parameters"].update(rope_type="dynamic", factor=2.0)
        hf.load_config(_copy("llama", tmp_path, edit, "c"))
    with pytest.raises(hf.HFError, match=r"c2/config.json: longrope rope scaling lacks 'short_"):
        edit = lambda c: c["rope_parameters"].update(rope_type="longrope", factor=2.0)
        hf.load_config(_copy("llama", tmp_path, edit, "c2"))
    with pytest.raises(hf.HFError, match="layer_types"):
        edit = lambda c: c.update(
            layer_types=["full_attention", "sliding_attention"], sliding_window=4
        )
        hf.load_config(_copy("qwen2", tmp_path, edit, "d"))
    # Shape mismatch: config says a wider MLP than the tensors have.
    with pytest.raises(
        hf.HFError,
        match=r"mlp\.(gate|up|down)_proj\.weight has shape \((64, 32|32, 64)\), "
        r"expected \((96, 32|32, 96)\)",
    ):
        hf.load_pretrained(
            _copy("mistral", tmp_path, lambda c: c.update(intermediate_size=96), "e")
        )
    # Vocab mismatch shows as the embedding's shape.
    with pytest.raises(
        hf.HFError, match=r"embed_tokens.weight has shape \(64, 32\), expected \(80"
    ):
        hf.load_pretrained(_copy("qwen2", tmp_path, lambda c: c.update(vocab_size=80), "f"))
    # Missing and unexpected tensors.
    from safetensors.numpy import load_file, save_file

    d = _copy("qwen2", tmp_path, name="g")
    tensors = load_file(os.path.join(d, "model.safetensors"))
    gone = tensors.pop("model.layers.1.self_attn.v_proj.bias")
    save_file(tensors, os.path.join(d, "model.safetensors"))
    with pytest.raises(hf.HFError, match=r"missing tensor\(s\) \['model.layers.1.self_attn.v_proj"):
        hf.load_pretrained(d)
    tensors["model.layers.1.self_attn.v_proj.bias"] = gone
    tensors["model.layers.0.mlp.gate_proj.bias"] = gone
    save_file(tensors, os.path.join(d, "model.safetensors"))
    with pytest.raises(hf.HFError, match="unexpected tensor model.layers.0.mlp.gate_proj.bias"):
        hf.load_pretrained(d)
    # A shard named in the index but absent.
    d = _copy("llama", tmp_path, name="h")
    os.remove(os.path.join(d, "model-00002-of-00003.safetensors"))
    with pytest.raises(hf.HFError, match="shard model-00002-of-00003.safetensors .* missing"):
        hf.load_pretrained(d)


def test_load_into_mesh_shards_and_in_bf16():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    d = os.path.join(FIX, "llama")
    cfg, ref = hf.load_pretrained(d)
    _, params = hf.load_pretrained(d, mesh=mesh, rules=logical_axis_rules("fsdp_tp"))
    gate = params["layers_0"]["mlp"]["gate"]["kernel"]
    assert gate.sharding.spec == P("fsdp", "tensor") and len(gate.sharding.device_set) == 8
    jax.tree.map(np.testing.assert_array_equal, params, ref)
    bcfg, bparams = hf.load_pretrained(d, dtype="bfloat16")
    assert bcfg.dtype == bcfg.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(bparams)} == {np.dtype("bfloat16")}


@pytest.mark.parametrize("family", ["qwen3_yarn", "olmo2", "olmo3"])
def test_qk_norm_parity_with_heads_split_over_devices(family):
    """q/k norms per head (Qwen3) and over all heads (OLMo 2: a reduction across the devices
    holding the heads) with the heads split over the tensor axis (and fsdp, data): the sharded
    forward still matches transformers' logits."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = logical_axis_rules("fsdp_tp")
    d = os.path.join(FIX, family)
    cfg, params = hf.load_pretrained(d, mesh=mesh, rules=rules)
    assert params["layers_0"]["attn"]["q"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
    ref = np.load(os.path.join(d, "reference.npz"))
    with use_mesh(mesh, rules):
        for layout in ("full", "left"):
            tokens = np.concatenate([ref[f"{layout}_tokens"]] * 2)  # batch 6 over data × fsdp
            mask, pos = (np.concatenate([ref[f"{layout}_{k}"]] * 2) for k in ("mask", "positions"))
            logits = np.asarray(hf.forward(cfg, params, tokens, pos, mask))[:3]
            err = np.abs(logits - ref[f"{layout}_logits"])[ref[f"{layout}_mask"] == 1].max()
            assert err < 1e-4, (layout, err)


def _write_hf_tokenizer(d, vocab):
    """A Llama-2-style tokenizer.json: its post-processor adds BOS <s> (id 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<unk>", "<s>", "</s>", "<|user|>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(words[:4])  # already in the vocab: marks them special (not decoded)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": None}
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)


def test_tokenizers_behind_one_interface(tmp_path):
    _write_hf_tokenizer(tmp_path / "hf", 40)
    tok = hf.load_tokenizer(str(tmp_path / "hf"), vocab_size=64)
    assert isinstance(tok, hf.HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 40)
    ids = tok.encode("w3 w7 w3", bos=True, eos=True)
    assert ids == [1, 7, 11, 7, 2] and tok.decode(ids) == "w3 w7 w3"
    assert tok.special_ids()["<|user|>"] == 3
    with pytest.raises(hf.HFError, match="has ids up to 39 but the model.s vocab_size is 32"):
        hf.load_tokenizer(str(tmp_path / "hf"), vocab_size=32)
    # SentencePiece tokenizer.model through the same call.
    from flaxlm.data.tokenizer import train

    sp = train([f"the river number {i} flows" for i in range(200)], 300)
    sp.save(str(tmp_path / "sp" / "tokenizer.model"))
    tok = hf.load_tokenizer(str(tmp_path / "sp"))
    assert tok.decode(tok.encode("the river", bos=True)) == "the river" and tok.eos_id == 3
    with pytest.raises(hf.HFError, match="vocab_size is 64"):
        hf.load_tokenizer(str(tmp_path / "sp"), vocab_size=64)
    with pytest.raises(hf.HFError, match="no tokenizer.json or tokenizer.model"):
        hf.load_tokenizer(str(tmp_path))


def _edit_json(path, **changes):
    c = json.loads(open(path).read()) if os.path.exists(path) else {}
    for k, v in changes.items():
        if v is ...:
            c.pop(k, None)
        else:
            c[k] = v
    with open(path, "w") as f:
        json.dump(c, f)


TURNS = "{% for m in messages %}<|user|> {{ m.content }}{% endfor %}"


def test_chat_template_jinja_file_is_read_and_travels(tmp_path):
    """transformers >= 4.5x saves the template as chat_template.jinja, not in
    tokenizer_config.json: it was ignored (--chat fell back to flaxlm's template) and left
    behind by import and export. It wins over an inline template, as in transformers."""
    from flaxlm import generate as cli
    from flaxlm.alignment.common import save_tokenizer

    d = _copy("qwen2", tmp_path)
    _write_hf_tokenizer(d, 50)
    _edit_json(os.path.join(d, "tokenizer_config.json"), chat_template="INLINE")
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:
        f.write("{{ bos_token }}" + TURNS)
    tok = hf.load_tokenizer(d)
    assert tok.chat_template == "{{ bos_token }}" + TURNS
    assert cli.encode_prompts(tok, ["w1 w2"], chat=True)[0] == [[1, 3, 5, 6]]
    run = str(tmp_path / "run")
    hf.import_to_run(d, run)
    assert os.path.exists(os.path.join(run, "chat_template.jinja"))
    assert cli.load(run)[2].chat_template == tok.chat_template
    hf.export_run(run, str(tmp_path / "out"))
    assert hf.load_tokenizer(str(tmp_path / "out")).chat_template == tok.chat_template
    sft = tmp_path / "sft"  # a stage's workdir gets the tokenizer's files (save_tokenizer)
    assert hf.load_tokenizer(save_tokenizer(tok, str(sft))).chat_template == tok.chat_template


def test_named_chat_templates(tmp_path):
    """tokenizer_config.json's chat_template as a list of {name, template}: the loader reused
    the name of the special-token dict for it, so `{{ bos_token }}` rendered empty. "default"
    renders; given tools, "tool_use" (as transformers picks); without a default, an error
    naming the templates there are."""
    d = str(tmp_path / "tok")
    _write_hf_tokenizer(d, 50)
    cfg_file = os.path.join(d, "tokenizer_config.json")
    named = [{"name": "default", "template": "{{ bos_token }}" + TURNS},
             {"name": "tool_use", "template": "{{ bos_token }}TOOLS " + TURNS}]  # fmt: skip
    _edit_json(cfg_file, chat_template=named)
    tok = hf.load_tokenizer(d)
    msgs = [{"role": "user", "content": "w1"}]
    assert tok.special_tokens["bos_token"] == "<s>"
    assert tok.render_chat_text(msgs) == "<s><|user|> w1"
    assert tok.render_chat_text(msgs, tools=[{"name": "f"}]) == "<s>TOOLS <|user|> w1"
    _edit_json(cfg_file, chat_template=named[1:] + [{"name": "rag", "template": "RAG"}])
    tok = hf.load_tokenizer(d)
    with pytest.raises(hf.HFError, match=r"chat templates are named \['rag', 'tool_use'\] and "
                       "none is 'default'"):  # fmt: skip
        tok.render_chat_text(msgs)
    assert tok.render_chat_text(msgs, tools=[]) == "<s>TOOLS <|user|> w1"
    # transformers' own layout for named templates: chat_template.jinja (the default) and
    # additional_chat_templates/NAME.jinja, copied along with the tokenizer
    _edit_json(cfg_file, chat_template=...)
    os.makedirs(os.path.join(d, "additional_chat_templates"))
    for name, text in (("chat_template.jinja", "D " + TURNS),
                       ("additional_chat_templates/tool_use.jinja", "T " + TURNS)):  # fmt: skip
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    hf.copy_tokenizer(d, str(tmp_path))
    tok = hf.load_tokenizer(str(tmp_path))
    assert tok.render_chat_text(msgs) == "D <|user|> w1"
    assert tok.render_chat_text(msgs, tools=[{"name": "f"}]) == "T <|user|> w1"


def test_bos_follows_the_tokenizer_config_in_hf_dirs_and_imported_runs(tmp_path):
    """Qwen2.5's tokenizer_config.json says bos_token null / add_bos_token false, its
    config.json bos_token_id 151643: BOS (that id) was prepended to plain prompts of the HF
    directory but not of the imported run (no config.json there). The tokenizer's own
    settings decide; config.json's id counts only when they say nothing."""
    from flaxlm import generate as cli

    d = _copy("qwen2", tmp_path, lambda c: c.update(bos_token_id=1, eos_token_id=2))
    _write_hf_tokenizer(d, 50)
    cfg_file = os.path.join(d, "tokenizer_config.json")
    run = str(tmp_path / "run")
    for n, (settings, bos) in enumerate([
        (dict(bos_token=None, add_bos_token=False), -1),  # Qwen2.5
        (dict(bos_token="<s>", add_bos_token=False), -1),  # a BOS the tokenizer does not add
        (dict(bos_token=None), -1),
        (dict(bos_token=..., add_bos_token=True), 1),  # nothing named: config.json's id
        (dict(bos_token="<s>"), 1),
    ]):  # fmt: skip
        _edit_json(cfg_file, **settings)
        hf_tok = cli.load(d)[2]
        assert hf_tok.bos_id == bos, settings
        if isinstance(settings.get("bos_token"), str):  # still the template's {{ bos_token }}
            assert hf_tok.special_tokens["bos_token"] == "<s>"
        if bos == -1:  # the imported run (no config.json) encodes the same prompt ids
            hf.import_to_run(d, f"{run}{n}")
            run_tok = cli.load(f"{run}{n}")[2]
            assert cli.encode_prompts(run_tok, ["w1 w2"], chat=False)[0] == \
                cli.encode_prompts(hf_tok, ["w1 w2"], chat=False)[0] == [[5, 6]]  # fmt: skip


def test_a_null_bos_in_either_tokenizer_file_and_an_eos_id_list_alone(tmp_path):
    """`bos_token: null` declares no BOS (`bos_token_id` -1: what export writes to config.json
    and a Jinja template's truncation keeps) whether tokenizer_config.json or
    special_tokens_map.json says it, and whatever config.json's bos_token_id; add_bos_token is
    left unset here. An eos_token_id list without an eos_token string: EOS is its first id and
    every one of them stops."""
    d = str(tmp_path / "hf")
    _write_hf_tokenizer(d, 40)
    raw = json.loads(open(os.path.join(d, "tokenizer.json")).read())
    raw["post_processor"] = None  # a tokenizer that adds no BOS (Qwen2.5's)
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(raw, f)
    _edit_json(os.path.join(d, "config.json"), bos_token_id=1, eos_token_id=[2, 3])
    cfg_file = os.path.join(d, "tokenizer_config.json")
    _edit_json(cfg_file, eos_token=...)
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        _edit_json(cfg_file, bos_token=...)
        _edit_json(os.path.join(d, file), bos_token=None)
        tok = hf.load_tokenizer(d)
        assert (tok.bos_id, tok.bos_token_id) == (-1, -1), file
        assert tok.eos_id == 2 and tok.stop_ids == (2, 3), file


def test_bos_is_added_only_when_the_tokenizer_adds_it(tmp_path):
    """GPT-2-style byte-level tokenizers (SmolLM2, Phi-4) declare a bos_token that their
    tokenizer.json post-processor never adds: encode(bos=True) — generate's plain prompts,
    document framing, evaluation's prefix — prepended it anyway, so every prompt differed from
    transformers' tokenizer(text) (and the greedy output with it). The post-processor decides;
    the declared token stays known (`bos_token_id`: a chat template's BOS, export's
    config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    from flaxlm import generate as cli
    from flaxlm.data.chat_template import JinjaChatTemplate
    from flaxlm.evaluation.prompts import prefix_ids

    text = ["hello world this is a test", "the quick brown fox jumps over the lazy dog"] * 20
    for post in (False, True):
        d = str(tmp_path / f"post{int(post)}")
        raw = Tokenizer(models.BPE())
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        raw.train_from_iterator(text, _bpe_trainer(specials))
        bos = raw.token_to_id("<|im_start|>")
        if post:
            raw.post_processor = processors.TemplateProcessing(
                single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
            )
        os.makedirs(d)
        raw.save(os.path.join(d, "tokenizer.json"))
        _edit_json(os.path.join(d, "tokenizer_config.json"), tokenizer_class="GPT2Tokenizer",
                   bos_token="<|im_start|>", eos_token="<|im_end|>",
                   chat_template="{{ bos_token }}{{ messages[0]['content'] }}")  # fmt: skip
        tok = hf.load_tokenizer(d)
        want = raw.encode("hello world", add_special_tokens=True).ids  # transformers' ids
        assert (want[0] == bos) == post
        assert tok.encode("hello world", bos=True) == want, post
        assert cli.encode_prompts(tok, ["hello world"], chat=False)[0] == [want]
        assert tok.bos_id == (bos if post else -1) and tok.bos_token_id == bos
        assert tok.special_tokens["bos_token"] == "<|im_start|>"
        eos = raw.token_to_id("<|im_end|>")
        assert prefix_ids(tok) == [bos if post else eos]  # without BOS: lm-eval's EOS prefix
        # a template that writes the BOS token itself: truncation keeps it either way
        chat = tok.render_chat_template([{"role": "user", "content": "hello"}])
        assert chat[0] == bos and JinjaChatTemplate(tok).head(chat) == 1


def test_a_word_level_tokenizer_without_an_unknown_token_loads(tmp_path):
    """Whether the post-processor adds a BOS was probed by encoding "Hello world": a character
    vocabulary without an unknown token (an arithmetic task's) could not encode it, and the
    tokenizer no longer loaded ("WordLevel error: Missing [UNK] token")."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    chars = list("0123456789+=")
    raw = Tokenizer(models.WordLevel(vocab={"<bos>": 0, "<eos>": 1,
                                            **{c: i + 2 for i, c in enumerate(chars)}},
                                     unk_token=None))  # fmt: skip
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    raw.add_special_tokens(["<bos>", "<eos>"])
    raw.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", 0)])  # fmt: skip
    d = str(tmp_path / "digits")
    os.makedirs(d)
    raw.save(os.path.join(d, "tokenizer.json"))
    _edit_json(os.path.join(d, "tokenizer_config.json"), bos_token="<bos>", eos_token="<eos>")
    tok = hf.load_tokenizer(d)
    assert tok.bos_id == 0 and tok.encode("12+3=15", bos=True) == raw.encode("12+3=15").ids


def _bpe_trainer(specials):
    from tokenizers import pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    return trainers.BpeTrainer(vocab_size=120, special_tokens=specials, initial_alphabet=alphabet,
                               show_progress=False)  # fmt: skip


def test_moved_run_finds_its_tokenizer(tmp_path):
    """An imported run's meta names its tokenizer by absolute path: a run copied elsewhere
    and the original deleted could neither generate nor export. The lookup (generate's and
    export's alike) falls back to the run's own copy; a relative path is the run's."""
    from flaxlm import generate as cli
    from flaxlm.models.hf_tokenizer import run_tokenizer_path

    d = _copy("qwen2", tmp_path)
    _write_hf_tokenizer(d, 50)
    hf.import_to_run(d, str(tmp_path / "a" / "run"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    moved = str(tmp_path / "b" / "run")
    assert cli.load(moved)[2].eos_id == 2
    hf.export_run(moved, str(tmp_path / "out"))
    assert hf.load_tokenizer(str(tmp_path / "out")).eos_id == 2
    old = str(tmp_path / "gone" / "tokenizer.json")
    assert run_tokenizer_path(old, moved) == os.path.join(moved, "tokenizer.json")
    assert run_tokenizer_path("tokenizer.json", moved) == os.path.join(moved, "tokenizer.json")
    assert run_tokenizer_path(old, str(tmp_path)) == old  # nowhere: named as recorded
    # every other reader (init_from, evaluation, distillation, notebooks) reads the meta
    # through read_meta, which finds it the same way
    from flaxlm.train.checkpoint import read_meta

    assert read_meta(moved)[1]["tokenizer"] == os.path.join(moved, "tokenizer.json")


def test_cli_import_then_export(tmp_path):
    from flaxlm.train.checkpoint import load_model

    src = _copy("qwen2", tmp_path)
    _write_hf_tokenizer(src, 50)
    hf.main(["import", src, str(tmp_path / "run")])
    cfg, params, meta = load_model(str(tmp_path / "run"))
    want_cfg, want = hf.load_pretrained(src)
    assert cfg == want_cfg and meta["hf_arch"] == "qwen2"
    jax.tree.map(np.testing.assert_array_equal, params, want)
    assert meta["tokenizer"].endswith("tokenizer.json") and os.path.exists(meta["tokenizer"])
    from flaxlm import generate as cli  # the generate CLI finds the run's tokenizer via meta

    assert cli.load(str(tmp_path / "run"))[2].eos_id == 2
    hf.main(["export", str(tmp_path / "run"), str(tmp_path / "back")])
    back_cfg, back = hf.load_pretrained(str(tmp_path / "back"))
    assert back_cfg == want_cfg
    jax.tree.map(np.testing.assert_array_equal, back, want)
    c = json.loads((tmp_path / "back" / "config.json").read_text())
    assert c["architectures"] == ["Qwen2ForCausalLM"] and c["eos_token_id"] == 2
    assert os.path.exists(tmp_path / "back" / "tokenizer.json")
    # the CLI's error names its own flag (it said "pass overwrite=True", the Python argument)
    with pytest.raises(SystemExit, match="exists and is not empty .*pass --overwrite"):
        hf.main(["export", str(tmp_path / "run"), str(tmp_path / "back")])
    hf.main(["export", str(tmp_path / "run"), str(tmp_path / "back"), "--overwrite"])


def test_export_gives_transformers_flaxlm_chat_template(tmp_path, chat_tokenizer):
    """A run with flaxlm's own SentencePiece tokenizer exports tokenizer.json (SentencePiece's
    own encoding: tests/models/test_hf_sentencepiece.py), tokenizer_config.json (chat
    template, special tokens) and generation_config.json (stop tokens). The template is
    rendered with jinja2 as transformers renders it, and the text encoded by the exported
    tokenizer.json (the `tokenizers` package, as transformers loads it); that must give
    render_chat's ids, and plain text starting with spaces SentencePiece's. flaxlm itself
    reads the export's tokenizer.model again. make_hf_fixtures.py --check runs transformers
    itself on the same export."""
    import jinja2
    from tokenizers import Tokenizer as HFTok

    from flaxlm.data import formats, tokenizer
    from flaxlm.models.config import get_variant
    from flaxlm.train.checkpoint import read_meta
    from flaxlm.train.pretrain import model_fns
    from flaxlm.train.state import unbox

    tok_path, tok = chat_tokenizer
    cfg = get_variant("tiny", vocab_size=512, n_layers=1)
    params = unbox(model_fns(cfg)[0](jax.random.PRNGKey(0)))
    hf.save_pretrained(cfg, params, str(tmp_path / "hf"), tokenizer=tok_path)
    hf.import_to_run(str(tmp_path / "hf"), str(tmp_path / "run"))
    hf.export_run(str(tmp_path / "run"), str(tmp_path / "out"))
    tc = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    gc = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    template = formats.ChatTemplate(tok)
    assert sorted(gc["eos_token_id"]) == sorted(template.stop_tokens)
    assert tc["bos_token"] == "<s>" and tc["add_bos_token"]
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast"  # tokenizer.json as it is
    special = {v["content"]: int(k) for k, v in tc["added_tokens_decoder"].items()}
    assert {t: special[t] for t in tokenizer.CHAT_TOKENS} == {
        t: i for t, i in tok.special_ids().items() if t in tokenizer.CHAT_TOKENS
    }
    fast = HFTok.from_file(str(tmp_path / "out" / "tokenizer.json"))
    render = jinja2.Environment().from_string(tc["chat_template"]).render
    chats = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "where  Kavo"},
         {"role": "assistant", "content": "Brel, 42"}, {"role": "user", "content": "yes\nno"}],
        [{"role": "user", "content": "où ☃"}, {"role": "assistant", "content": " the city"}],
        [{"role": "user", "content": "  two leading"}, {"role": "assistant", "content": "a  "},
         {"role": "user", "content": "\n x"}],
    ]  # fmt: skip
    for chat in chats:
        gen = chat[-1]["role"] == "user"
        text = render(messages=chat, add_generation_prompt=gen, bos_token="<s>", eos_token="</s>")
        want = formats.render_chat(chat, tok, add_generation_prompt=gen)[0].tolist()
        assert fast.encode(text, add_special_tokens=False).ids == want
    for text in (" x", "  where does", "Kavo  \n", " \n city ☃"):  # the dummy "▁" always
        assert fast.encode(text).ids == tok.encode(text, bos=True), text
    # flaxlm reads the export's SentencePiece model, not the tokenizer.json written from it
    assert hf.load_tokenizer(str(tmp_path / "out")).sha256 == tok.sha256
    hf.import_to_run(str(tmp_path / "out"), str(tmp_path / "run2"))
    assert read_meta(str(tmp_path / "run2"))[1]["tokenizer"].endswith("tokenizer.model")


@pytest.mark.skipif(
    os.environ.get("FLAXLM_HF_LIVE") != "1"
    or not os.path.exists(os.path.join(REPO, ".venv-hf", "bin", "python")),
    reason="live transformers check: set FLAXLM_HF_LIVE=1 and create .venv-hf",
)
def test_live_transformers_check():
    script = os.path.join(REPO, "tests", "fixtures", "make_hf_fixtures.py")
    res = subprocess.run(
        [os.path.join(REPO, ".venv-hf", "bin", "python"), script, "--check",
         "--flaxlm-python", sys.executable],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stdout + res.stderr


def test_generate_cli_on_an_hf_directory(tmp_path, capsys):
    from flaxlm import generate as cli

    d = _copy("qwen2", tmp_path)
    _write_hf_tokenizer(d, 50)
    c = json.loads(open(os.path.join(d, "tokenizer_config.json")).read())
    c["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}<|user|> {{ m.content }}{% endfor %}"
    )
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(c, f)
    args = [d, "--prompt", "w1 w2", "--prompt", "w9", "--temperature", "0", "--json",
            "--max_new_tokens", "5"]  # fmt: skip
    cli.main(args)
    plain = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in plain] == ["w1 w2", "w9"]
    cli.main(args + ["--decode_attention", "pallas"])  # the flag reaches generate
    assert [json.loads(ln) for ln in capsys.readouterr().out.splitlines()] == plain
    from flaxlm.models import decode as decode_module  # (the CLI imports it when it runs)

    seen, real = [], decode_module.generate  # --full_cache reaches generate: window_cache=False
    picked = ("window_cache", "decode_mlp", "decode_norm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decode_module, "generate",
                   lambda *a, **k: seen.append([k[n] for n in picked]) or real(*a, **k),
                   )  # fmt: skip
        cli.main(args + ["--full_cache"])
        cli.main(args + ["--decode_mlp", "pallas:16:64:4:2"])
        # Qwen2's q|k|v biases: the norms cannot fold, refused by name in one line once the
        # weights are read, before generate is called
        with pytest.raises(SystemExit, match="decode_norm='fold' does not apply.*qkv_bias"):
            cli.main(args + ["--decode_norm", "fold"])
    assert seen == [[False, "xla", "auto"], [True, "pallas:16:64:4:2", "auto"]]
    assert [json.loads(ln) for ln in capsys.readouterr().out.splitlines()] == plain * 2
    with pytest.raises(SystemExit):
        cli.main(args + ["--decode_mlp", "pallas:16"])
    assert "--decode_mlp: decode_mlp='pallas:16'" in capsys.readouterr().err
    assert all(0 < r["n_tokens"] <= 5 and isinstance(r["completion"], str) for r in plain)
    # The same greedy tokens as calling generate directly.
    cfg, params, tok = cli.load(d)
    want = generate(cfg, params, [[1, 5, 6], [1, 13]], max_new_tokens=5, rng=jax.random.PRNGKey(0),
                    temperature=0, stop_tokens=(2,), pad_id=2)  # fmt: skip
    n0 = int(want.lengths[0])
    ids0 = [int(i) for i in np.asarray(want.tokens[0])[:n0]]
    assert plain[0]["completion"] == tok.decode([i for i in ids0 if i != 2])
    # --chat renders the checkpoint's own template: <s> <|user|> w1 w2
    ids, stops = cli.encode_prompts(tok, ["w1 w2"], chat=True)
    assert ids == [[1, 3, 5, 6]] and stops == (2,)
    cli.main(args + ["--chat"])
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_generate_cli_samples_do_not_depend_on_batch(tmp_path, capsys):
    """Prompt i samples with its own key: --batch 1 and --batch 3 print the same samples."""
    from flaxlm import generate as cli

    d = _copy("qwen2", tmp_path)
    _write_hf_tokenizer(d, 50)
    args = [d, "--prompt", "w1 w2", "--prompt", "w9", "--prompt", "w3 w4 w5", "--json",
            "--temperature", "1", "--max_new_tokens", "6", "--seed", "3"]  # fmt: skip
    runs = []
    for batch in ("1", "3"):
        cli.main(args + ["--batch", batch])
        runs.append([json.loads(ln) for ln in capsys.readouterr().out.splitlines()])
    assert runs[0] == runs[1] and len(runs[0]) == 3
    cli.main(args[:-2] + ["--seed", "4", "--batch", "3"])
    assert [json.loads(ln) for ln in capsys.readouterr().out.splitlines()] != runs[0]
    # --num_samples K: sample k of prompt i has its own key (fold_in(fold_in(seed, i), k)), so
    # the first two of three samples are the two of two, whatever --batch.
    cli.main(args + ["--num_samples", "2", "--batch", "4"])
    two = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [(r["prompt"], r["sample"]) for r in two] == [
        (p, k) for p in ("w1 w2", "w9", "w3 w4 w5") for k in (0, 1)
    ]
    cli.main(args + ["--num_samples", "3", "--batch", "1"])
    three = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [r for r in three if r["sample"] < 2] == two
    assert len({r["completion"] for r in three if r["prompt"] == "w9"}) > 1
