"""A user's journey with Gemma 3, end to end through the public entry points: an image-text
checkpoint as Gemma 3 4B-27B ship (text model under language_model., an image tower, a sparse
text_config; mixed local/global layers, two RoPEs, q/k norms, sandwich norms) with Gemma's chat
template, whose turns end with <end_of_turn> — not its EOS — and generation_config.json listing
both → LoRA SFT from `init_from=hf:DIR` → `generate --chat` rendering as training did and
stopping at <end_of_turn> → the adapters in PEFT's format and the merged model as an HF
gemma3_text checkpoint, both loading back with the trained logits.
"""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from flaxlm.models import hf
from flaxlm.models.config import ModelConfig

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("hf_tokenizers", f"{HERE}/hf_tokenizers.py")
T = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T)

# Gemma's template (system folded into the first user turn, the assistant is "model")
TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first = messages[0]['content'] + '\\n\\n' %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set first = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for m in loop_messages %}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first if loop.first else '') }}"
    "{{- m['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)
SPECIALS = ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")


def _image_text_checkpoint(cfg, params, d):
    """`cfg`/`params` written as HF gemma3_text, then rewritten in the image-text layout."""
    hf.save_pretrained(cfg, params, d, arch="gemma3_text")
    text = json.load(open(os.path.join(d, "config.json")))
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "sliding_window",
            "layer_types", "rope_parameters", "query_pre_attn_scalar", "max_position_embeddings",
            "model_type")  # fmt: skip
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": {k: text[k] for k in keep}, "vision_config": {"hidden_size": 8},
              "dtype": "float32", "tie_word_embeddings": True}  # fmt: skip
    json.dump(config, open(os.path.join(d, "config.json"), "w"))
    tensors = {f"language_model.{k}": v
               for k, v in load_file(os.path.join(d, "model.safetensors")).items()}  # fmt: skip
    tensors["vision_tower.embeddings.patch_embedding.weight"] = np.zeros((8, 3, 2, 2), "f4")
    save_file(tensors, os.path.join(d, "model.safetensors"))
    T.write_hf_tokenizer(d, TEMPLATE, {"bos_token": "<bos>", "eos_token": "<eos>",
                                       "pad_token": "<pad>"}, specials=SPECIALS)  # fmt: skip
    ids = {t["content"]: t["id"] for t in
           json.load(open(os.path.join(d, "tokenizer.json")))["added_tokens"]}  # fmt: skip
    json.dump({"eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]]},
              open(os.path.join(d, "generation_config.json"), "w"))  # fmt: skip
    return ids


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    from flaxlm.alignment import sft
    from flaxlm.configs import sft as sft_config
    from flaxlm.configs.common import override
    from flaxlm.train.pretrain import model_fns
    from flaxlm.train.state import unbox

    root = tmp_path_factory.mktemp("gemma3")
    cfg = ModelConfig(vocab_size=264, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                      head_dim=32, d_ff=64, max_seq_len=512, qk_norm="head",
                      norm_placement="sandwich", norm_unit_offset=True, scale_embeddings=True,
                      tie_embeddings=True, mlp_activation="gelu", query_pre_attn_scalar=32.0,
                      sliding_window=8, sliding_window_pattern=3, rope_theta=1e6,
                      rope_scaling="linear", rope_scaling_factor=2.0, rope_local_theta=1e4,
                      init_std=0.2)  # fmt: skip
    params = unbox(model_fns(cfg)[0](jax.random.PRNGKey(0)))
    base = str(root / "base")
    ids = _image_text_checkpoint(cfg, params, base)
    rng = np.random.default_rng(0)
    recs = []
    for _ in range(24):
        a, b = (int(x) for x in rng.integers(0, 9, 2))
        recs.append({"messages": [{"role": "system", "content": "Add."},
                                  {"role": "user", "content": f"{a}+{b}?"},
                                  {"role": "assistant", "content": str(a + b)}]})  # fmt: skip
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    c = sft_config.get_config("variant=tiny,runlocal=True,lora=4")
    c = override(c, {
        "init_from": f"hf:{base}", "data.train": str(data), "data.eval": "", "eval_gen.sets": "",
        "seq_len": 64, "batch_size": 8, "total_steps": 3, "eval_every": 3, "ckpt_every": 3,
        "log_every": 1, "progress_bar": False, "eval_at_start": False, "opt.warmup_steps": 1,
    })  # fmt: skip
    run = str(root / "sft")
    sft.run(c, run)
    return root, base, run, cfg, ids


def test_sft_trained_on_the_template_up_to_end_of_turn(journey):
    from flaxlm.data import formats
    from flaxlm.models.hf_tokenizer import load_tokenizer
    from flaxlm.train.checkpoint import read_meta

    _, base, run, cfg, ids = journey
    meta = read_meta(run)[1]
    got = ModelConfig.from_dict(meta["model_config"])  # the architecture of the checkpoint
    for key in (
        "norm_placement",
        "norm_unit_offset",
        "scale_embeddings",
        "qk_norm",
        "sliding_window_pattern",
        "rope_local_theta",
        "query_pre_attn_scalar",
    ):
        assert getattr(got, key) == getattr(cfg, key), key
    report = meta["data_report"]["train"]
    assert report["used"] == 24 and report["chat_template"].startswith("jinja:")
    t = formats.training_template(load_tokenizer(base))
    assert t.end_id == ids["<end_of_turn>"] and set(t.stop_tokens) == {
        ids["<eos>"], ids["<end_of_turn>"]}  # fmt: skip


def test_generate_renders_and_stops_as_trained(journey, capsys):
    from flaxlm import generate as cli

    _, _, run, _, ids = journey
    _, _, tok = cli.load(run)
    prompt, stops = cli.encode_prompts(tok, ["3+4?"], chat=True)
    text = tok.tok.decode(prompt[0], skip_special_tokens=False)
    assert text == "<bos><start_of_turn>user\n3+4?<end_of_turn>\n<start_of_turn>model\n"
    assert ids["<end_of_turn>"] in stops
    args = [run, "--prompt", "3+4?", "--chat", "--max_new_tokens", "6", "--json",
            "--temperature", "0"]  # fmt: skip
    cli.main(args)
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["prompt"] == "3+4?" and 1 <= rec["n_tokens"] <= 6


def test_adapters_and_merged_model_load_back(journey, tmp_path):
    from flaxlm.train.checkpoint import load_model

    _, base, run, cfg, _ = journey
    tokens = np.arange(1, 41, dtype=np.int32).reshape(2, 20)  # (past the window of 8)
    _, trained, _ = load_model(run)
    want = np.asarray(hf.forward(cfg, trained, tokens))
    _, base_params = hf.load_pretrained(base)
    assert np.abs(np.asarray(hf.forward(cfg, base_params, tokens)) - want).max() > 1e-4
    adapter, back = str(tmp_path / "adapter"), str(tmp_path / "back")
    # the base is image-text: the adapter names no base (PEFT would not find the text model's
    # modules under its names), and the warning says which text model to load it onto
    with pytest.warns(UserWarning, match="is an image-text checkpoint .*left unset"):
        hf.main(["export", run, adapter, "--adapter"])
    assert json.load(open(os.path.join(adapter, "adapter_config.json"))).get(
        "base_model_name_or_path") in (None, "")  # fmt: skip
    hf.main(["import-adapter", base, adapter, back])
    _, reloaded, _ = load_model(back)
    np.testing.assert_allclose(np.asarray(hf.forward(cfg, reloaded, tokens)), want, atol=1e-5)
    merged = str(tmp_path / "merged")
    hf.main(["export", run, merged])
    assert json.load(open(os.path.join(merged, "config.json")))["model_type"] == "gemma3_text"
    mcfg, mparams = hf.load_pretrained(merged)
    assert mcfg == cfg.replace(init_std=mcfg.init_std)  # (not an HF field)
    np.testing.assert_allclose(np.asarray(hf.forward(mcfg, mparams, tokens)), want, atol=1e-5)
