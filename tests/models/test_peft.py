"""LoRA adapters in PEFT's format (models/peft.py).

The reference is built independently of flaxlm's LoRA code: the base checkpoint's HF weights
(numpy) plus the exported factors merged the way PEFT defines them, W + (lora_alpha / r)·B·A
on each HF Linear weight, written as a plain HF checkpoint and read back by the (parity-tested)
HF importer. FLAXLM_HF_LIVE=1 (with .venv-hf and `peft` in it) also loads the exported adapter
with PEFT onto transformers' model and compares its logits with flaxlm's.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from flaxlm.models import hf, peft
from flaxlm.models import lora as L

FIX = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "hf", "llama")
SPEC = L.LoraSpec(rank=3, alpha=5.0, targets="attn/(q|k|v|o)$|mlp/(gate|up|down)$|^lm_head$")


def _adapters(params, spec=SPEC, seed=0):
    """Random adapters with nonzero b (a fresh LoRA's b = 0 would test nothing)."""
    rng = np.random.default_rng(seed)
    abstract = L.abstract_adapters(params, spec)
    return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32),
                        abstract)  # fmt: skip


def _reference_merged_dir(tmp_path, adapter_dir, rslora=False):
    """An HF checkpoint: the fixture's weights with the PEFT factors merged in numpy."""
    from safetensors.numpy import load_file, save_file

    cfg = json.loads(open(os.path.join(adapter_dir, peft.CONFIG)).read())
    scale = cfg["lora_alpha"] / (np.sqrt(cfg["r"]) if rslora else cfg["r"])
    factors = load_file(os.path.join(adapter_dir, peft.WEIGHTS))
    weights = {}
    for f in sorted(os.listdir(FIX)):
        if f.endswith(".safetensors"):
            weights.update(load_file(os.path.join(FIX, f)))
    n = 0
    for name, A in factors.items():
        if ".lora_A." not in name:
            continue
        module = name[len("base_model.model.") :].split(".lora_A.")[0]
        B = factors[name.replace(".lora_A.", ".lora_B.")]
        weights[module + ".weight"] = weights[module + ".weight"] + scale * (B @ A)
        n += 1
    out = tmp_path / "merged_ref"
    out.mkdir()
    shutil.copy(os.path.join(FIX, "config.json"), out / "config.json")
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out), n


def _logits(cfg, params):
    ref = np.load(os.path.join(FIX, "reference.npz"))
    return np.asarray(hf.forward(cfg, params, ref["full_tokens"]))


def test_exported_adapter_merges_like_peft_defines_it(tmp_path):
    cfg, params = hf.load_pretrained(FIX)
    lora = _adapters(params)
    out = peft.save_adapter(cfg, lora, SPEC, str(tmp_path / "adapter"), base_model="base")
    c = json.loads(open(os.path.join(out, peft.CONFIG)).read())
    assert (c["r"], c["lora_alpha"], c["peft_type"], c["base_model_name_or_path"]) == (
        3, 5.0, "LORA", "base")  # fmt: skip
    assert c["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                          "up_proj", "down_proj", "lm_head"])  # fmt: skip
    ref_dir, n = _reference_merged_dir(tmp_path, out)
    assert n == cfg.n_layers * 7 + 1
    ref_cfg, ref_params = hf.load_pretrained(ref_dir)
    ours = _logits(cfg, L.merge({"base": params, "lora": lora}, SPEC))
    want = _logits(ref_cfg, ref_params)
    np.testing.assert_allclose(ours, want, atol=2e-5, rtol=1e-5)
    assert np.abs(want - _logits(cfg, params)).max() > 0.1  # the adapters do change the model


def test_import_round_trip_and_rslora(tmp_path):
    cfg, params = hf.load_pretrained(FIX)
    lora = _adapters(params, L.LoraSpec(rank=2, alpha=4.0, targets="attn/(q|o)$|mlp/down$"), 1)
    spec0 = L.LoraSpec(rank=2, alpha=4.0, targets="attn/(q|o)$|mlp/down$")
    out = peft.save_adapter(cfg, lora, spec0, str(tmp_path / "a"))
    spec, back = peft.load_adapter(out, cfg)
    assert (spec.rank, spec.alpha) == (2, 4.0)
    assert L.target_paths(params, spec) == L.target_paths(params, spec0)
    jax.tree.map(np.testing.assert_array_equal, back, lora)
    # rsLoRA (scale α/√r): imported with √r folded into b, merging as PEFT would
    c = json.loads(open(os.path.join(out, peft.CONFIG)).read())
    c["use_rslora"] = True
    with open(os.path.join(out, peft.CONFIG), "w") as f:
        json.dump(c, f)
    spec, back = peft.load_adapter(out, cfg)
    ref_dir, _ = _reference_merged_dir(tmp_path, out, rslora=True)
    ref_cfg, ref_params = hf.load_pretrained(ref_dir)
    np.testing.assert_allclose(_logits(cfg, L.merge({"base": params, "lora": back}, spec)),
                               _logits(ref_cfg, ref_params), atol=2e-5, rtol=1e-5)  # fmt: skip


def test_scanned_layers_export_the_same_tensors():
    cfg, params = hf.load_pretrained(FIX)
    spec = L.LoraSpec(rank=2, alpha=4.0, targets="attn/(q|v)$")
    lora = _adapters(params, spec, 2)
    stacked = {"layers": {"attn": {m: {"kernel": {
        k: np.stack([lora[f"layers_{i}"]["attn"][m]["kernel"][k] for i in range(cfg.n_layers)])
        for k in ("a", "b")}} for m in ("q", "v")}}}  # fmt: skip
    a = peft.adapter_tensors(lora, spec, cfg)
    b = peft.adapter_tensors(stacked, spec, cfg.replace(scan_layers=True))
    assert sorted(a) == sorted(b) and len(a) == 2 * 2 * cfg.n_layers
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_bad_adapters_name_the_key_or_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    cfg, params = hf.load_pretrained(FIX)
    spec = L.LoraSpec(rank=2, alpha=4.0, targets="attn/q$")
    good = peft.save_adapter(cfg, _adapters(params, spec), spec, str(tmp_path / "good"))

    def variant(name, edit_config=None, edit_tensors=None):
        d = tmp_path / name
        shutil.copytree(good, d)
        if edit_config:
            c = json.loads((d / peft.CONFIG).read_text())
            edit_config(c)
            (d / peft.CONFIG).write_text(json.dumps(c))
        if edit_tensors:
            t = load_file(str(d / peft.WEIGHTS))
            edit_tensors(t)
            save_file(t, str(d / peft.WEIGHTS))
        return str(d)

    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    cases = [
        (variant("dora", lambda c: c.update(use_dora=True)), r"use_dora=True is not supported"),
        (variant("bias", lambda c: c.update(bias="all")), r"bias='all' is not supported"),
        (variant("mts", lambda c: c.update(modules_to_save=["score"])), "modules_to_save"),
        (variant("rank", lambda c: c.update(r=4)), rf"{q0}.lora_A.weight has shape \(2, 32\), "
         r"expected \(4, 32\)"),
        (variant("nob", edit_tensors=lambda t: t.pop(f"{q0}.lora_B.weight")),
         rf"lora_B of {q0}.lora_A.weight is missing"),
        (variant("emb", edit_tensors=lambda t: t.update({
            "base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((2, 64), np.float32)
        })), r"embed_tokens.lora_embedding_A is not a LoRA factor of a module flaxlm has"),
        (str(tmp_path), "no adapter_config.json"),
    ]  # fmt: skip
    for d, msg in cases:
        with pytest.raises(hf.HFError, match=msg):
            peft.load_adapter(d, cfg)
    # Phi-3 fuses q|k|v and gate|up: adapters on those have no PEFT module (o/down do)
    phi_cfg, phi = hf.load_pretrained(os.path.join(os.path.dirname(FIX), "phi3"))
    with pytest.raises(hf.HFError, match="phi3 model, whose q/k/v and gate/up are one fused"):
        peft.save_adapter(phi_cfg, _adapters(phi), SPEC, str(tmp_path / "phi"))
    ok = L.LoraSpec(rank=2, alpha=4.0, targets="attn/o$|mlp/down$")
    peft.save_adapter(phi_cfg, _adapters(phi, ok), ok, str(tmp_path / "phi_ok"))
    with pytest.raises(hf.HFError, match=r"train_extra='\^head/' trains base params too"):
        peft.save_adapter(cfg, {}, L.LoraSpec(rank=2, train_extra="^head/"), str(tmp_path / "x"))


def test_adapter_dtype_is_checked_like_the_model_export(tmp_path):
    """save_adapter cast with np.dtype(dtype) unchecked: "int8" wrote an all-zero adapter (the
    factors, |x| < 1, round to 0), "float64" was accepted and "bfloat" was a TypeError
    traceback. Now the whole-model export's float dtypes, or an HFError naming the option."""
    from safetensors.numpy import load_file

    cfg, params = hf.load_pretrained(FIX)
    spec = L.LoraSpec(rank=2, alpha=4.0, targets="attn/q$")
    lora = _adapters(params, spec)
    for bad in ("int8", "float64", "bfloat"):
        with pytest.raises(hf.HFError, match=rf"PEFT export: dtype '{bad}' is not supported; "
                           r"choose one of \('float32', 'bfloat16', 'float16'\)"):  # fmt: skip
            peft.save_adapter(cfg, lora, spec, str(tmp_path / bad), dtype=bad)
        assert not os.path.exists(tmp_path / bad)
    out = peft.save_adapter(cfg, lora, spec, str(tmp_path / "bf16"), dtype="bfloat16")
    t = load_file(os.path.join(out, peft.WEIGHTS))
    assert {str(v.dtype) for v in t.values()} == {"bfloat16"}
    assert all(np.asarray(v, np.float32).any() for v in t.values())


def test_runs_import_and_export_adapters(tmp_path, capsys):
    from flaxlm.train.checkpoint import load_model

    cfg, params = hf.load_pretrained(FIX)
    lora = _adapters(params)
    adapter = peft.save_adapter(cfg, lora, SPEC, str(tmp_path / "adapter"))
    run = str(tmp_path / "run")
    hf.main(["import-adapter", FIX, adapter, run])
    rcfg, merged, meta = load_model(run)  # every reader merges the adapters
    assert rcfg == cfg and meta["lora"]["rank"] == 3
    np.testing.assert_allclose(_logits(cfg, merged),
                               _logits(cfg, L.merge({"base": params, "lora": lora}, SPEC)),
                               atol=1e-6)  # fmt: skip
    hf.main(["export", run, str(tmp_path / "again"), "--adapter"])
    assert "exported the adapters of" in capsys.readouterr().out
    from safetensors.numpy import load_file

    a = load_file(os.path.join(adapter, peft.WEIGHTS))
    b = load_file(str(tmp_path / "again" / peft.WEIGHTS))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    again = json.loads((tmp_path / "again" / peft.CONFIG).read_text())
    assert again["base_model_name_or_path"] == os.path.abspath(FIX)
    # a run without adapters, a directory that is no run: one-line errors
    plain = str(tmp_path / "plain")
    hf.main(["import", FIX, plain])
    with pytest.raises(SystemExit, match="not a LoRA run"):
        hf.main(["export", plain, str(tmp_path / "x"), "--adapter"])
    with pytest.raises(SystemExit, match="error: "):
        hf.main(["export", str(tmp_path / "nowhere"), str(tmp_path / "y"), "--adapter"])
    # --dtype as the whole-model export checks it (int8 wrote an all-zero adapter)
    with pytest.raises(SystemExit, match=r"error: PEFT export: dtype 'int8' is not supported"):
        hf.main(["export", run, str(tmp_path / "i8"), "--adapter", "--dtype", "int8"])
    assert not os.path.exists(tmp_path / "i8")


def test_adapter_base_is_named_only_when_an_hf_checkpoint_holds_its_weights(tmp_path):
    """A LoRA run's base is what its init_from loaded. hf import -> full SFT -> DPO :lora used
    to name the imported HF directory as the adapter's base, though the SFT run had trained
    every weight (PEFT then loaded the adapter onto another model without a word). Only an
    `hf:` init_from or a plain `hf import` run names one; a trained run in between (full or
    LoRA: init_from merges its adapters) leaves it unset, with a warning naming the run to
    export whole."""
    from flaxlm.train.checkpoint import Checkpointer

    plain = str(tmp_path / "imp")
    hf.main(["import", FIX, plain])

    def run(name, meta):
        ckpt = Checkpointer(str(tmp_path / name), async_save=False)
        ckpt.save(1, {"params": {"w": np.zeros(2, np.float32)}}, meta=meta)
        ckpt.close()
        return str(tmp_path / name)

    sft = run("sft", {"task": "sft", "lora": {}, "config": {"init_from": plain}})
    lora_sft = run("lsft", {"task": "sft", "lora": {"rank": 2}, "config": {"init_from": plain}})
    dpo = lambda src: {"task": "dpo", "lora": {"rank": 8}, "config": {"init_from": src}}  # noqa: E731
    assert peft._base_model("dpo", dpo(plain)) == os.path.abspath(FIX)
    assert peft._base_model("dpo", dpo("hf:" + FIX)) == os.path.abspath(FIX)
    assert peft._base_model("dpo", {"hf_source": "/x", "lora": {"rank": 2}}) == "/x"
    for src, what in ((sft, r"a trained flaxlm run \(sft\)"),
                      (lora_sft, r"a trained flaxlm run \(sft\)"),
                      (str(tmp_path / "gone"), "not a run directory")):  # fmt: skip
        with pytest.warns(UserWarning, match=rf"init_from={src} is {what}.*left unset.*"
                          rf"export {src} BASE_DIR"):  # fmt: skip
            assert peft._base_model("dpo", dpo(src)) == ""
    # an image-text base (Gemma 3 4B-27B): the adapter's text-model names are not its modules'
    # (language_model...; its vision tower has q_proj/v_proj too): unset, naming the text
    # model to export (it was named, and PEFT would have attached the adapter to nothing)
    mm = tmp_path / "mm"
    mm.mkdir()
    (mm / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": {}}))
    for meta in ({"hf_source": str(mm), "lora": {"rank": 2}}, dpo("hf:" + str(mm))):
        want = (
            rf"its base {mm} is an image-text checkpoint \(gemma3\).*left unset.*"
            r"export RUN0 BASE_DIR \(gemma3_text\)"
        )
        with pytest.warns(UserWarning, match=want):
            assert peft._base_model("dpo", meta) == ""


LIVE = """
import json, sys
import numpy as np, torch, transformers, peft
base, adapter, tokens = (json.loads(a) for a in sys.argv[1:4])
model = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
model = peft.PeftModel.from_pretrained(model, adapter).eval()
with torch.no_grad():
    out = model(input_ids=torch.as_tensor(tokens)).logits.float().numpy()
print(json.dumps(out.tolist()))
"""


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # (Gemma 3: tied, sandwich norms)
def test_live_peft_loads_the_adapter_onto_transformers(tmp_path, hf_live, family):
    base = os.path.join(os.path.dirname(FIX), family)
    cfg, params = hf.load_pretrained(base)
    lora = _adapters(params)
    adapter = peft.save_adapter(cfg, lora, SPEC, str(tmp_path / "adapter"))
    tokens = np.load(os.path.join(base, "reference.npz"))["full_tokens"]
    live = np.asarray(hf_live(LIVE, base, adapter, tokens.tolist()))
    merged = L.merge({"base": params, "lora": lora}, SPEC)
    ours = np.asarray(hf.forward(cfg, merged, tokens))
    np.testing.assert_allclose(ours, live, atol=1e-4)


def _partial_adapter(tmp_path, name, params, config=None, layers=(0,), seed=3):
    """A PEFT adapter on q/v of `layers` only (what `layers_to_transform=[0]` saves)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    t = {}
    for i in layers:
        for m, out in (("q", params[f"layers_{i}"]["attn"]["q"]["kernel"]),
                       ("v", params[f"layers_{i}"]["attn"]["v"]["kernel"])):  # fmt: skip
            d_in, d_out = out.shape[0], int(np.prod(out.shape[1:]))
            p = f"base_model.model.model.layers.{i}.self_attn.{m}_proj"
            t[f"{p}.lora_A.weight"] = (0.3 * rng.standard_normal((4, d_in))).astype(np.float32)
            t[f"{p}.lora_B.weight"] = (0.3 * rng.standard_normal((d_out, 4))).astype(np.float32)
    d = tmp_path / name
    d.mkdir()
    save_file(t, str(d / peft.WEIGHTS), metadata={"format": "pt"})
    c = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
         "bias": "none", **(config or {})}  # fmt: skip
    (d / peft.CONFIG).write_text(json.dumps(c))
    return str(d)


def test_partial_adapter_imports_generates_and_exports_as_it_came(tmp_path):
    """An adapter covering layer 0 only (layers_to_transform=[0]) used to import, then every
    reader of the run failed ("checkpoint has no params ['lora']['layers_1']..."). Its other
    layers now get zero factors: the run's model is the base with layer 0's update only (the
    numpy reference merges the adapter's own tensors), generates and exports, and export
    --adapter gives back the same tensors and layers_to_transform."""
    from safetensors.numpy import load_file

    from flaxlm.models.decode import generate
    from flaxlm.train.checkpoint import load_model

    cfg, params = hf.load_pretrained(FIX)
    assert cfg.n_layers == 2
    adapter = _partial_adapter(tmp_path, "adapter", params, {"layers_to_transform": [0]})
    spec, lora = peft.load_adapter(adapter, cfg)
    for m in ("q", "v"):  # layer 1: exact zeros, the update B·A = 0
        assert not np.any(lora["layers_1"]["attn"][m]["kernel"]["a"])
        assert not np.any(lora["layers_1"]["attn"][m]["kernel"]["b"])
    run = str(tmp_path / "run")
    hf.main(["import-adapter", FIX, adapter, run])
    rcfg, merged, _ = load_model(run)
    ref_dir, n = _reference_merged_dir(tmp_path, adapter)
    assert n == 2
    ref_cfg, ref_params = hf.load_pretrained(ref_dir)
    np.testing.assert_allclose(_logits(rcfg, merged), _logits(ref_cfg, ref_params), atol=2e-5)
    assert np.abs(_logits(cfg, merged) - _logits(cfg, params)).max() > 0.1
    prompts = [[1, 5, 9, 13], [1, 7]]
    kw = dict(max_new_tokens=5, rng=jax.random.PRNGKey(0), temperature=0)
    got = generate(rcfg, merged, prompts, **kw)
    want = generate(ref_cfg, ref_params, prompts, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    # the merged model exports; the adapter exports as it came
    hf.main(["export", run, str(tmp_path / "merged")])
    back_cfg, back = hf.load_pretrained(str(tmp_path / "merged"))
    np.testing.assert_allclose(_logits(back_cfg, back), _logits(ref_cfg, ref_params), atol=2e-5)
    hf.main(["export", run, str(tmp_path / "again"), "--adapter"])
    a = load_file(os.path.join(adapter, peft.WEIGHTS))
    b = load_file(str(tmp_path / "again" / peft.WEIGHTS))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    c = json.loads((tmp_path / "again" / peft.CONFIG).read_text())
    assert (c["layers_to_transform"], c["layers_pattern"]) == ([0], "layers")
    assert c["target_modules"] == ["q_proj", "v_proj"]
    spec2, lora2 = peft.load_adapter(str(tmp_path / "again"), cfg)
    assert spec2 == spec
    jax.tree.map(np.testing.assert_array_equal, lora2, lora)
    # a full adapter (every layer) exports without layers_to_transform, as before
    full = peft.save_adapter(cfg, _adapters(params), SPEC, str(tmp_path / "full"))
    assert "layers_to_transform" not in json.loads(open(os.path.join(full, peft.CONFIG)).read())


def test_partial_adapter_coverage_comes_from_the_config(tmp_path):
    """Which layers may lack tensors is what the config says: layers_to_transform (a list or
    one int), or a target_modules regex naming some layers. A layer the config covers without
    tensors is a truncated adapter: an error naming the tensor, not zeros."""
    cfg, params = hf.load_pretrained(FIX)
    for i, config in enumerate([
        {"layers_to_transform": 1},
        {"target_modules": r"model\.layers\.1\.self_attn\.(q|v)_proj"},
    ]):  # fmt: skip
        d = _partial_adapter(tmp_path, f"ok{i}", params, config, layers=(1,))
        _, lora = peft.load_adapter(d, cfg)
        assert not np.any(lora["layers_0"]["attn"]["q"]["kernel"]["b"])
        assert np.any(lora["layers_1"]["attn"]["q"]["kernel"]["b"])
    cases = [
        ({}, r"no tensor base_model\.model\.model\.layers\.1\.self_attn\.q_proj\.lora_A\.weight"
             r", though .*adapter_config\.json covers that module"),
        ({"layers_to_transform": [0, 1]}, r"layers\.1\.self_attn\.q_proj\.lora_A\.weight"),
        ({"layers_to_transform": [5]}, r"layers_to_transform=\[5\]: expected layer indices in "
                                       r"\[0, 2\)"),
        ({"layers_to_transform": [0], "layers_pattern": "h"}, "layers_pattern='h'"),
    ]  # fmt: skip
    for i, (config, msg) in enumerate(cases):
        d = _partial_adapter(tmp_path, f"bad{i}", params, config)
        with pytest.raises(hf.HFError, match=msg):
            peft.load_adapter(d, cfg)
