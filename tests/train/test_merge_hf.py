"""python -m flaxlm.train.merge with Hugging Face checkpoints (`hf:DIR` inputs and `--base
hf:DIR`): against numpy formulas over the arrays written into the safetensors (not what the HF
reader gives back), mixed with flaxlm runs; the tensors read a group at a time; the merged run
read by generate, evaluation and HF export; and the HF inputs it refuses, by name.

The HF directories are tiny random models written by flaxlm's own `save_pretrained` (no torch,
no transformers): a "base" and a "fine-tune" of it with a byte-level tokenizer.json, a run
fine-tuned from the base (its tokenizer files copied, as `init_from=hf:DIR` copies them), and a
checkpoint with the SentencePiece chat tokenizer (tokenizer.model) beside a run that has it."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from flaxlm.models import hf, hf_weights
from flaxlm.models.config import ModelConfig, get_variant
from flaxlm.models.hf_tokenizer import copy_tokenizer, load_tokenizer
from flaxlm.train import checkpoint as ckpt_lib
from flaxlm.train.checkpoint import Checkpointer
from tests.hf_tokenizers import write_hf_tokenizer
from tests.train.test_merge import CFG, _assert_close, _flat, _merge, _params, _random, _write

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # byte-level: ids 256, 257, 258
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"


def _hf_dir(path, params, cfg=CFG, tokenizer=None) -> str:
    """`params` saved as a Llama HF checkpoint at `path`: with the byte-level tokenizer.json
    (EOS <|im_end|>, a chat template; config.json adds the stop id <|endoftext|>, as Qwen's
    do), or `tokenizer` (a tokenizer.model) copied along."""
    stops = {} if tokenizer else {"eos_token_id": [258, 256]}
    hf.save_pretrained(cfg, params, str(path), tokenizer=tokenizer, extra_config=stops)
    if tokenizer is None:
        write_hf_tokenizer(str(path), TEMPLATE, {"eos_token": "<|im_end|>"}, specials=SPECIALS)
    return str(path)


def _run_from(hf_dir, workdir, params) -> str:
    """A run fine-tuned from `hf_dir` as flaxlm writes one: the checkpoint's model config, its
    tokenizer files copied into the workdir (alignment/run_tokenizer.py `save_tokenizer`)."""
    os.makedirs(workdir)
    copy_tokenizer(hf_dir, str(workdir))
    meta = {"model_config": hf.load_config(hf_dir).to_dict(), "task": "sft", "head": "lm",
            "lora": {}, "tokenizer": os.path.join(workdir, "tokenizer.json")}  # fmt: skip
    ck = Checkpointer(str(workdir), keep=0, async_save=False)
    ck.save(6, {"params": params}, {}, meta)
    ck.wait()
    ck.close()
    return str(workdir)


@pytest.fixture(scope="module")
def models(tmp_path_factory, chat_tokenizer):
    root = tmp_path_factory.mktemp("merge_hf")
    base = _random(1)
    m = {"root": root, "params": {"base": base}}
    m["params"]["ft"] = _random(2, like=base, noise=0.01)
    m["params"]["run"] = _random(3, like=base, noise=0.01)
    m["params"]["sp"] = _random(4)
    m["base"] = _hf_dir(root / "base", base)
    m["ft"] = _hf_dir(root / "ft", m["params"]["ft"])
    m["run"] = _run_from(m["base"], root / "run", m["params"]["run"])
    m["sp"] = _hf_dir(root / "sp", m["params"]["sp"], tokenizer=chat_tokenizer[0])
    m["sp_run"] = _write(root / "sp_run", {2: base}, {"task": "pretrain"}, chat_tokenizer[0])
    return m


@pytest.fixture(scope="module")
def mean_run(models, tmp_path_factory):
    """hf:base, the run and hf:ft averaged with weights 1, 2, 1."""
    out = str(tmp_path_factory.mktemp("mean_hf") / "avg")
    argv = [f"hf:{models['base']}", models["run"], f"hf:{models['ft']}", "--weights", "1,2,1"]
    from flaxlm.train import merge as merge_cli

    return out, merge_cli.main([*argv, "--out", out])


def _reference(weighted):
    """Σ w θ in float64 over numpy trees, the weights normalised."""
    total = sum(w for w, _ in weighted)
    flats = [(w / total, _flat(t)) for w, t in weighted]
    return {k: sum(w * f[k].astype(np.float64) for w, f in flats) for k in flats[0][1]}


# ------------------------------------------------------------------------------------------
# what is merged


def test_hf_checkpoints_and_a_run_average_to_the_numpy_mean(models, mean_run):
    out, record = mean_run
    p = models["params"]
    _assert_close(_params(out), _reference([(1, p["base"]), (2, p["run"]), (1, p["ft"])]))
    named = [(f"hf:{models['base']}", None), (models["run"], 6), (f"hf:{models['ft']}", None)]
    assert [(i["run"], i["step"]) for i in record["inputs"]] == named
    assert record["inputs"][0]["read"] == "hf safetensors" and record["trained_on_chats"]
    _, meta = ckpt_lib.read_meta(out)
    assert meta["task"] == "merge" and meta["hf_arch"] == "llama"
    assert ModelConfig.from_dict(meta["model_config"]) == hf.load_config(models["base"])
    # the first input's tokenizer files, as its import copies them (config.json's stop id too)
    assert meta["tokenizer"] == os.path.join(out, "tokenizer.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(models["base"], name),
                                                             "rb") as b:  # fmt: skip
            assert a.read() == b.read(), name
    assert load_tokenizer(meta["tokenizer"]).stop_ids == (258, 256)  # (generation_config.json)


def test_task_arithmetic_with_an_hf_base_reads_each_tensor_once(models, tmp_path, monkeypatch):
    reads, calls = {}, []
    tensor, read_params = hf_weights._tensor, hf_weights.read_params

    def counting_tensor(f, name, full):  # every tensor whose data is read, per directory
        key = (os.path.dirname(full), name)
        reads[key] = reads.get(key, 0) + 1
        return tensor(f, name, full)

    def counting_read(*a, **k):
        calls.append(k.get("only"))
        return read_params(*a, **k)

    monkeypatch.setattr(hf_weights, "_tensor", counting_tensor)
    monkeypatch.setattr(hf_weights, "read_params", counting_read)
    out, record = _merge(tmp_path, f"hf:{models['ft']}", models["run"], "--method",
                         "task_arithmetic", "--base", f"hf:{models['base']}", "--scale", "0.7",
                         "--weights", "1,0.5", "--chunk_mb", "0.001")  # fmt: skip
    p = {k: _flat(v) for k, v in models["params"].items()}
    b = p["base"]  # θ_base + λ Σ_t w_t (θ_t − θ_base)
    want = {k: b[k] + 0.7 * (1 * (p["ft"][k] - b[k]) + 0.5 * (p["run"][k] - b[k])) for k in b}
    _assert_close(_params(out), want, rtol=1e-5, atol=1e-6)
    assert record["base"] == {"run": f"hf:{models['base']}", "step": None, "ema": False,
                              "task": "hf_import", "read": "hf safetensors"}  # fmt: skip
    # a group of one tensor per read: each HF tensor's data read once, never a whole model
    n = len(p["base"])
    for d in (models["base"], models["ft"]):
        names = {name for (where, name) in reads if where == d}
        assert len(names) == n and all(reads[(d, x)] == 1 for x in names)
    parts = [c for c in calls if c]
    assert len(parts) == 2 * n and all(len(c) == 1 for c in parts)
    assert calls.count(set()) == 2  # the check before: headers only


def test_a_sentencepiece_hf_checkpoint_merges_with_a_run_of_its_tokenizer(models, tmp_path):
    out, _ = _merge(tmp_path, models["sp_run"], f"hf:{models['sp']}", "--method", "slerp",
                    "--t", "0")  # fmt: skip
    _assert_close(_params(out), models["params"]["base"])  # t=0: the first input
    # each HF tensor placed in its shards of the mesh as it is read
    out, _ = _merge(tmp_path, f"hf:{models['sp']}", models["sp_run"], "--mesh",
                    "fsdp=4,tensor=2", "--sharding", "fsdp_tp", name="mean")  # fmt: skip
    _assert_close(_params(out), _reference([(1, models["params"]["sp"]),
                                            (1, models["params"]["base"])]))  # fmt: skip
    _, meta = ckpt_lib.read_meta(out)
    assert meta["tokenizer"] == os.path.join(out, "tokenizer.model")
    assert open(meta["tokenizer"], "rb").read() == open(models["sp_run"] + "/tokenizer.model",
                                                        "rb").read()  # fmt: skip


FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "hf")


@pytest.mark.parametrize("family, groups", [
    ("phi3", [{("layers_0", "attn", "k", "kernel")},  # a part of the fused qkv_proj
              {("layers_1", "mlp", "up", "kernel"), ("embed", "embedding")}]),
    ("mixtral", [{("layers_0", "mlp", "experts", "down", "kernel")},  # 4 experts' rows stacked
                 {("layers_1", "mlp", "router", "kernel"), ("final_norm", "scale")}]),
])  # fmt: skip
def test_a_partial_read_gives_the_full_reads_tensors_of_the_group(family, groups):
    """hf_weights.read_params(only=...), merge's reader, on transformers-written checkpoints:
    Phi-3's fused weights split, Mixtral's per-expert tensors stacked, as the full read."""
    d = os.path.join(FIXTURES, family)
    cfg, full = hf.load_pretrained(d)
    full = _flat(full)
    assert hf_weights.read_params(d, cfg, family, only=set()) == {}
    for group in groups:
        got = _flat(hf_weights.read_params(d, cfg, family, only=group))
        assert set(got) == {"/".join(p) for p in group}
        for k, x in got.items():
            np.testing.assert_array_equal(x, full[k], err_msg=k)


# ------------------------------------------------------------------------------------------
# the merged run, read by each consumer


def test_the_merged_run_of_hf_inputs_is_read_by_generate_evaluation_and_export(
    mean_run, tmp_path, capsys
):
    from flaxlm import generate
    from flaxlm.evaluation.__main__ import main as evaluate

    out, _ = mean_run
    want = _params(out)
    (tmp_path / "text.jsonl").write_text('{"text": "the river fox"}\n')
    (tmp_path / "ppl.json").write_text('{"name": "ppl", "type": "perplexity", "file": '
                                       '"text.jsonl"}')  # fmt: skip
    result = evaluate(["--checkpoint", out, "--tasks", str(tmp_path / "ppl.json")])
    assert np.isfinite(result["tasks"]["ppl"]["metrics"]["ppl"])
    capsys.readouterr()
    generate.main([out, "--prompt", "the river", "--max_new_tokens", "3", "--json"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt"] == "the river" and 1 <= line["n_tokens"] <= 3
    hf.main(["export", out, str(tmp_path / "hf")])
    cfg, exported = hf.load_pretrained(str(tmp_path / "hf"))
    _assert_close(exported, want)
    assert cfg == ModelConfig.from_dict(ckpt_lib.read_meta(out)[1]["model_config"])
    assert json.load(open(tmp_path / "hf" / "config.json"))["model_type"] == "llama"
    with open(tmp_path / "hf" / "tokenizer.json", "rb") as a, open(out + "/tokenizer.json",
                                                                   "rb") as b:  # fmt: skip
        assert a.read() == b.read()


# ------------------------------------------------------------------------------------------
# refused HF inputs


def test_an_hf_input_of_another_model_or_tokenizer_is_refused_by_name(models, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    def no_data(f, name, full):
        raise AssertionError(f"{full}: {name} read before the inputs were checked")

    monkeypatch.setattr(hf_weights, "_tensor", no_data)  # refused from config.json and headers
    root = models["root"]
    wide_cfg = get_variant("tiny", vocab_size=CFG.vocab_size, d_ff=96)
    wide = _hf_dir(root / "wide", _random(5, wide_cfg), wide_cfg)
    with pytest.raises(SystemExit, match=rf"hf:{wide} is another model than {models['run']}@6:"
                       r"\n  model_config.d_ff: 96 there, 128 in"):  # fmt: skip
        _merge(tmp_path, models["run"], f"hf:{wide}")
    with pytest.raises(SystemExit, match=rf"{models['run']}@6 is another model than hf:{wide}:"
                       r"\n  model_config.d_ff: 128 there, 96 in"):  # fmt: skip
        _merge(tmp_path, f"hf:{wide}", "--method", "task_arithmetic", "--base", models["run"])
    # its config.json made to say d_ff=128: the same config, tensors of another shape
    lying = str(root / "lying")
    shutil.copytree(wide, lying)
    config = json.load(open(os.path.join(lying, "config.json")))
    json.dump({**config, "intermediate_size": 128}, open(os.path.join(lying, "config.json"), "w"))
    with pytest.raises(SystemExit, match=rf"hf:{lying}: {lying}/model.safetensors: tensor "
                       r"model\.layers\.0\.mlp\.\w+_proj\.weight has shape \((96, 64|64, 96)\), "
                       r"expected"):  # fmt: skip
        _merge(tmp_path, models["run"], f"hf:{lying}")
    # tokenizer.model against tokenizer.json: not the same file, whatever they encode
    with pytest.raises(SystemExit, match=rf"hf:{models['sp']} has another tokenizer than "
                       rf"hf:{models['base']}: {models['sp']}/tokenizer.model there, "
                       rf"{models['base']}/tokenizer.json in"):  # fmt: skip
        _merge(tmp_path, f"hf:{models['base']}", f"hf:{models['sp']}")
    assert not os.listdir(tmp_path)  # nothing written


def test_a_missing_or_unsupported_hf_input_is_refused_by_name(models, tmp_path):
    root, base, run = models["root"], models["base"], models["run"]
    no_weights = root / "no_weights"
    no_weights.mkdir()
    shutil.copy(os.path.join(base, "config.json"), no_weights)
    gpt2 = root / "gpt2"
    shutil.copytree(base, gpt2)
    config = json.load(open(gpt2 / "config.json"))
    json.dump({**config, "model_type": "gpt2"}, open(gpt2 / "config.json", "w"))
    cases = [
        ([f"hf:{root}/absent", run], rf"hf:{root}/absent: no such directory"),
        ([run, f"hf:{run}"], rf"hf:{run}: {run}: no config.json \(not an HF checkpoint"),
        ([run, f"hf:{no_weights}"], rf"hf:{no_weights}: {no_weights}: no model.safetensors"),
        ([run, f"hf:{gpt2}"], rf"hf:{gpt2}: {gpt2}/config.json: model_type 'gpt2' .*not "
                              "supported"),
        ([run, base], rf"{base}: a Hugging Face checkpoint directory .*give it as hf:{base}"),
        ([f"hf:{base}", "--last", "2"], rf"hf:{base}: --last 2 takes a run's newest steps"),
        ([f"hf:{base}", run, "--ema"], rf"hf:{base}: --ema, but an HF checkpoint holds no EMA"),
        ([f"hf:{base}", f"hf:{base}/"], rf"hf:{base} is given twice"),
        ([run, f"hf:{models['ft']}", "--method", "ties", "--base", f"hf:{root}/gone"],
         rf"hf:{root}/gone: no such directory"),
    ]  # fmt: skip
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            _merge(tmp_path, *argv)
    assert not os.listdir(tmp_path)


def test_a_float32_run_merges_with_the_bfloat16_hf_checkpoint_it_started_from(models, tmp_path):
    """param_dtype may differ: every input is read in float32 (a float32 run is never rounded to
    the bfloat16 of an input before it), the result stored in the first input's dtype."""
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    p = models["params"]
    base16 = jax.tree.map(lambda x: np.asarray(x, bf16), p["base"])
    hf16 = str(tmp_path / "base16")
    hf.save_pretrained(CFG, base16, hf16, dtype="bfloat16", extra_config={"eos_token_id": [258]})
    write_hf_tokenizer(hf16, TEMPLATE, {"eos_token": "<|im_end|>"}, specials=SPECIALS)
    assert hf.load_config(hf16).param_dtype == "bfloat16"
    run32 = models["run"]  # float32 params, the same model
    assert ckpt_lib.read_meta(run32)[1]["model_config"]["param_dtype"] == "float32"
    want = {k: (v.astype(np.float32) + _flat(p["run"])[k]) / 2 for k, v in _flat(base16).items()}

    out, _ = _merge(tmp_path, run32, f"hf:{hf16}", name="run_first")  # float32 result
    got = ckpt_lib.load_model(out)[1]
    assert {x.dtype for x in jax.tree.leaves(got)} == {np.dtype(np.float32)}
    _assert_close(got, want)
    out, _ = _merge(tmp_path, f"hf:{hf16}", run32, name="hf_first")  # bfloat16 result
    got = _flat(_params(out))
    assert ckpt_lib.read_meta(out)[1]["model_config"]["param_dtype"] == "bfloat16"
    for k, v in want.items():  # the float32 mean rounded once, to bfloat16
        np.testing.assert_array_equal(got[k], v.astype(bf16).astype(np.float32), err_msg=k)
    # task arithmetic on the bfloat16 base gives the run back (its task vector, scale 1)
    out, _ = _merge(tmp_path, run32, "--method", "task_arithmetic", "--base", f"hf:{hf16}",
                    "--scale", "1", name="ta")  # fmt: skip
    _assert_close(_params(out), p["run"], rtol=1e-6, atol=1e-6)
