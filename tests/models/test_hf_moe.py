"""HF interop of the mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): what
tests/models/test_hf.py's parametrized parity / decode / round-trip tests do not cover — the
fused expert layout of transformers 5, the config keys, refusals and damaged checkpoints.

The fixtures' logits parity (padded and not), greedy decoding and round trips run in
test_hf.py with the other families; make_hf_fixtures.py --check loads the exports (and
transformers 5's fused layout) live.
"""

import json
import os
import warnings

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from flaxlm.models import hf
from flaxlm.models.sharding import logical_axis_rules, make_mesh
from flaxlm.models.transformer import stack_layers
from tests.models.test_hf import FIX, _copy


def _config(family):
    return json.loads(open(os.path.join(FIX, family, "config.json")).read())


def _fuse(tensors, E, block):
    """A per-expert checkpoint's tensors in transformers 5's in-memory layout (what its
    save_pretrained(save_original_format=False) writes; --check loads a real one): per layer
    mlp.experts.gate_up_proj (E, 2F, D) = [gate; up] rows per expert, mlp.experts.down_proj
    (E, D, F); Mixtral's block_sparse_moe. renamed mlp."""
    names = ("w1", "w3", "w2") if block == "block_sparse_moe" else ("gate_proj", "up_proj",
                                                                      "down_proj")  # fmt: skip
    out = {k.replace(f".{block}.", ".mlp."): v for k, v in tensors.items() if ".experts." not in k}
    layers = {int(k.split(".")[2]) for k in tensors if ".experts." in k}
    for i in layers:
        p = f"model.layers.{i}.{block}.experts."
        gate, up, down = ([tensors.pop(f"{p}{j}.{n}.weight") for j in range(E)] for n in names)
        q = f"model.layers.{i}.mlp.experts."
        out[q + "gate_up_proj"] = np.stack([np.concatenate(gu) for gu in zip(gate, up)])
        out[q + "down_proj"] = np.stack(down)
    return out


@pytest.mark.parametrize("family,block", [("mixtral", "block_sparse_moe"), ("qwen2_moe", "mlp")])
def test_transformers5_fused_expert_layout_loads_the_same(family, block, tmp_path):
    cfg, want = hf.load_pretrained(os.path.join(FIX, family))
    d = _copy(family, tmp_path)
    st = os.path.join(d, "model.safetensors")
    fused = _fuse(load_file(st), cfg.n_experts, block)
    assert not [k for k in fused if ".experts.0." in k or "block_sparse_moe" in k]
    save_file(fused, st)
    got_cfg, got = hf.load_pretrained(d)
    assert got_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, got, want)
    # Export writes the per-expert layout whatever was read (old and new transformers load it)
    hf.save_pretrained(cfg, got, str(tmp_path / "out"), arch=family)
    names = set(load_file(str(tmp_path / "out" / "model.safetensors")))
    e = "w2" if family == "mixtral" else "down_proj"
    assert f"model.layers.1.{block}.experts.3.{e}.weight" in names
    assert not [n for n in names if n.endswith("gate_up_proj")]
    # A fused tensor of the wrong expert count is named with its shapes.
    fused["model.layers.0.mlp.experts.down_proj"] = fused["model.layers.0.mlp.experts.down_proj"][
        1:
    ]
    save_file(fused, st)
    with pytest.raises(hf.HFError, match=r"tensor model.layers.0.mlp.experts.down_proj has shape "
                       r"\(3, 32, 24\), expected \(4, 32, 24\)"):  # fmt: skip
        hf.load_pretrained(d)


def test_moe_config_translation():
    """The expert keys of each family: counts (both spellings), widths, top-k normalisation,
    shared expert, biases, q/k norms; nothing dropped (capacity factor 0)."""
    get = {f: hf.load_config(os.path.join(FIX, f)) for f in ("mixtral", "qwen2_moe", "qwen3_moe",
                                                              "olmoe")}  # fmt: skip
    for f, cfg in get.items():
        assert (cfg.n_experts, cfg.n_experts_per_token, cfg.d_expert_) == (4, 2, 24), f
        assert cfg.moe_capacity_factor == 0 and hf.default_arch(cfg) == f, f
    mix, q2, q3, olmoe = get.values()
    assert mix.router_norm_topk and mix.sliding_window == 0 and not mix.qkv_bias
    assert not q2.router_norm_topk and q2.qkv_bias and q2.d_shared_expert == 40
    assert q2.shared_expert_gate and q2.d_ff == 64  # (the dense width, unused)
    assert q3.router_norm_topk and q3.qk_norm == "head" and not q3.d_shared_expert
    assert olmoe.qk_norm == "all" and olmoe.norm_placement == "pre" and not olmoe.router_norm_topk
    # Mixtral's window (on every layer); Qwen3-MoE's expert count spelled as transformers 5
    # writes it (num_local_experts), or both
    assert hf.config_from_hf({**_config("mixtral"), "sliding_window": 6}).sliding_window == 6
    c = {k: v for k, v in _config("qwen3_moe").items() if k != "num_experts"}
    assert hf.config_from_hf({**c, "num_local_experts": 4}) == q3
    assert hf.config_from_hf({**c, "num_local_experts": 4, "num_experts": 4}) == q3
    # router_aux_loss_coef is a training setting: ignored
    assert hf.config_from_hf({**_config("qwen2_moe"), "router_aux_loss_coef": 0.5}) == q2


def test_qwen2_moe_config_without_qkv_bias_has_the_biases():
    """Qwen2-MoE's attention always had q/k/v biases before transformers 5 added the qkv_bias
    key (Qwen1.5-MoE-A2.7B's config.json has none): a config without the key has them; the
    fixture (transformers 5) writes it, and qkv_bias=false drops them."""
    c = _config("qwen2_moe")
    assert c["qkv_bias"] is True
    old = {k: v for k, v in c.items() if k != "qkv_bias"}
    assert hf.config_from_hf(old).qkv_bias
    assert not hf.config_from_hf({**c, "qkv_bias": False}).qkv_bias


@pytest.mark.parametrize(
    "family,edit,match",
    [("qwen2_moe", dict(decoder_sparse_step=2), r"decoder_sparse_step=2, mlp_only_layers=\[\]: "
      "dense MLP layers mixed among the MoE layers are not supported"),
     ("qwen3_moe", dict(mlp_only_layers=[1]), r"mlp_only_layers=\[1\]: dense MLP layers"),
     ("qwen3_moe", dict(use_sliding_window=True, sliding_window=4),
      "use_sliding_window=true is not supported for qwen3_moe"),
     ("qwen2_moe", dict(num_experts=0), "num_experts=0: flaxlm's mixture of experts needs >= 2"),
     ("qwen2_moe", dict(num_local_experts=8), "num_experts=4 and num_local_experts=8 disagree"),
     ("mixtral", dict(num_local_experts=None), "missing key 'num_experts' .or 'num_local_exp"),
     ("mixtral", dict(num_experts_per_tok=5), r"num_experts_per_tok=5 must be in \[1, num_ex"),
     ("qwen3_moe", dict(moe_intermediate_size=None), "missing key 'moe_intermediate_size'"),
     ("qwen2_moe", dict(shared_expert_intermediate_size=0), "without a shared expert"),
     ("olmoe", dict(clip_qkv=8.0), "clip_qkv=8.0 is not supported")],
)  # fmt: skip
def test_moe_configs_flaxlm_cannot_express_are_refused(family, edit, match):
    with pytest.raises(hf.HFError, match=match):
        hf.config_from_hf({**_config(family), **edit}, f"{family}/config.json")


def test_damaged_moe_checkpoints_name_the_tensor(tmp_path):
    # An expert's tensor missing
    d = _copy("qwen3_moe", tmp_path, name="a")
    t = load_file(os.path.join(d, "model.safetensors"))
    gone = t.pop("model.layers.1.mlp.experts.2.up_proj.weight")
    save_file(t, os.path.join(d, "model.safetensors"))
    with pytest.raises(hf.HFError, match=r"missing tensor\(s\) \['model.layers.1.mlp.experts.2."
                       r"up_proj.weight'\]"):  # fmt: skip
        hf.load_pretrained(d)
    # Fewer experts in config.json than in the file; more
    t["model.layers.1.mlp.experts.2.up_proj.weight"] = gone
    save_file(t, os.path.join(d, "model.safetensors"))
    d = _copy("mixtral", tmp_path, lambda c: c.update(num_local_experts=3), "b")
    with pytest.raises(hf.HFError, match=r"b/model.safetensors: tensor model.layers.0."
                       r"block_sparse_moe.experts.3.w\d.weight is expert 3, but config.json has 3 "
                       "experts"):  # fmt: skip
        hf.load_pretrained(d)
    d = _copy("mixtral", tmp_path, lambda c: c.update(num_local_experts=6), "c")
    with pytest.raises(hf.HFError, match=r"tensor model.layers.0.block_sparse_moe.gate.weight has "
                       r"shape \(4, 32\), expected \(6, 32\)"):  # fmt: skip
        hf.load_pretrained(d)
    # The expert width of config.json not the tensors'
    d = _copy("qwen2_moe", tmp_path, lambda c: c.update(moe_intermediate_size=32), "d")
    with pytest.raises(hf.HFError, match=r"tensor model.layers.0.mlp.experts.0.\w+_proj.weight "
                       r"has shape \((24, 32|32, 24)\), expected \((32, 32)\)"):  # fmt: skip
        hf.load_pretrained(d)
    d = _copy("qwen2_moe", tmp_path, lambda c: c.update(shared_expert_intermediate_size=8), "e")
    with pytest.raises(hf.HFError, match=r"shared_expert.\w+_proj.weight has shape"):
        hf.load_pretrained(d)


def test_moe_export_refuses_what_the_arch_cannot_state(tmp_path):
    q2cfg, q2 = hf.load_pretrained(os.path.join(FIX, "qwen2_moe"))
    q3cfg, q3 = hf.load_pretrained(os.path.join(FIX, "qwen3_moe"))
    mcfg, mix = hf.load_pretrained(os.path.join(FIX, "mixtral"))
    x = str(tmp_path / "x")
    with pytest.raises(hf.HFError, match="arch 'qwen3' has a dense MLP, this model n_experts=4; "
                       "use arch='qwen3_moe'"):  # fmt: skip
        hf.save_pretrained(q3cfg, q3, x, arch="qwen3")
    with pytest.raises(hf.HFError, match="arch 'mixtral' cannot state d_shared_expert=40; "
                       "use arch='qwen2_moe'"):  # fmt: skip
        hf.save_pretrained(q2cfg.replace(qkv_bias=False), q2, x, arch="mixtral")
    with pytest.raises(hf.HFError, match="arch 'mixtral' always renormalises the top-k "
                       "router weights, this model router_norm_topk=False; no supported "
                       "arch"):  # fmt: skip
        hf.save_pretrained(mcfg.replace(router_norm_topk=False), mix, x, arch="mixtral")
    with pytest.raises(hf.HFError, match="arch 'qwen2_moe' always has a gated shared expert, "
                       "this model d_shared_expert=0"):  # fmt: skip
        hf.save_pretrained(mcfg, mix, x, arch="qwen2_moe")
    dcfg, dense = hf.load_pretrained(os.path.join(FIX, "llama"))
    with pytest.raises(hf.HFError, match="arch 'mixtral' is a mixture of experts, this model has "
                       "a dense MLP .n_experts=0.; use arch='llama'"):  # fmt: skip
        hf.save_pretrained(dcfg, dense, x, arch="mixtral")
    # Mixtral's params as Qwen3-MoE without q/k norms: refused by the fixed q/k norm
    with pytest.raises(hf.HFError, match="arch 'qwen3_moe' has qk_norm='head'.*use arch='mixtral'"):
        hf.save_pretrained(mcfg, mix, x, arch="qwen3_moe")
    assert not os.path.exists(x)


def test_moe_export_of_a_capacity_limited_model_warns_and_writes_dropless(tmp_path):
    cfg, params = hf.load_pretrained(os.path.join(FIX, "mixtral"))
    with pytest.warns(UserWarning, match="moe_capacity_factor=1.25 is not written: transformers' "
                      "mixtral never drops expert assignments"):  # fmt: skip
        hf.save_pretrained(cfg.replace(moe_capacity_factor=1.25), params, str(tmp_path / "o"),
                           arch="mixtral")  # fmt: skip
    back, _ = hf.load_pretrained(str(tmp_path / "o"))
    assert back == cfg  # (factor 0: what HF computes)
    c = json.loads((tmp_path / "o" / "config.json").read_text())
    assert c["num_local_experts"] == c["num_experts"] == 4 and c["intermediate_size"] == 24
    assert c["router_aux_loss_coef"] == 0.001 and c["sliding_window"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a dropless model exports without a warning
        hf.save_pretrained(cfg, params, str(tmp_path / "p"), arch="mixtral")


def test_moe_scanned_export_and_sharded_import(tmp_path):
    """A scanned model (experts with a leading layer axis) exports like the unrolled one; a
    mesh import places the expert kernels split over `tensor` (rows assembled on the host)."""
    d = os.path.join(FIX, "qwen2_moe")
    cfg, params = hf.load_pretrained(d)
    scfg = cfg.replace(scan_layers=True)
    hf.save_pretrained(scfg, stack_layers(params, cfg.n_layers), str(tmp_path / "s"),
                       arch="qwen2_moe", max_shard_bytes=30_000)  # fmt: skip
    back_cfg, back = hf.load_pretrained(str(tmp_path / "s"))
    assert back_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, back, params)
    c = json.loads((tmp_path / "s" / "config.json").read_text())
    assert (c["moe_intermediate_size"], c["shared_expert_intermediate_size"]) == (24, 40)
    assert c["decoder_sparse_step"] == 1 and c["mlp_only_layers"] == [] and c["qkv_bias"]
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, sharded = hf.load_pretrained(d, mesh=mesh, rules=logical_axis_rules("fsdp_tp"))
    up = sharded["layers_1"]["mlp"]["experts"]["up"]["kernel"]
    assert up.sharding.spec[0] == "tensor" and len(up.sharding.device_set) == 8
    jax.tree.map(np.testing.assert_array_equal, sharded, params)


def test_moe_fixtures_catch_routing_bugs():
    """The fixtures are sensitive to the router: top-k weights renormalised or not, top-1
    instead of top-2."""

    def err(cfg, params, ref):
        mask = ref["left_mask"]
        logits = hf.forward(cfg, params, ref["left_tokens"], ref["left_positions"], mask)
        return float(np.abs(np.asarray(logits) - ref["left_logits"])[mask == 1].max())

    for family, wrong in (("mixtral", dict(router_norm_topk=False)),
                          ("olmoe", dict(n_experts_per_token=1))):  # fmt: skip
        d = os.path.join(FIX, family)
        cfg, params = hf.load_pretrained(d)
        assert err(cfg.replace(**wrong), params, np.load(os.path.join(d, "reference.npz"))) > 1e-2
