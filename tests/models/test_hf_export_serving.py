"""An exported checkpoint as transformers, vLLM and TGI serve it, beyond the weights (found by
the export review): the stop ids a source declares only in config.json, the template variables
a run trained with, and an imported SentencePiece checkpoint's own chat template and sampling
defaults reach the export; a chat-trained run exported without a chat template says so."""

import json
import logging
import os
import random

import jax
import pytest

from flaxlm.models import hf
from flaxlm.models.config import get_variant
from flaxlm.train.pretrain import model_fns
from flaxlm.train.state import unbox

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory, request):
    """An HF directory: a tiny random model, a ChatML byte-level tokenizer whose
    tokenizer_config names <|endoftext|> as EOS, and a config.json whose eos_token_id list
    adds <|im_end|> (mergekit-style: no generation_config.json)."""
    import importlib.util

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, "hf_tokenizers.py")
    spec = importlib.util.spec_from_file_location("hf_tokenizers", path)
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    root = tmp_path_factory.mktemp("export_serving")
    cfg = get_variant("tiny", vocab_size=320, n_layers=1)
    params = unbox(model_fns(cfg)[0](jax.random.PRNGKey(0)))
    src = str(root / "src")
    hf.save_pretrained(cfg, params, src, "qwen2")
    helpers.write_hf_tokenizer(src, CHATML, {"eos_token": "<|endoftext|>", "bos_token": None,
                                             "pad_token": None})  # fmt: skip
    tok = hf.load_tokenizer(src)
    end, eot = tok.token_id("<|endoftext|>"), tok.token_id("<|im_end|>")
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["eos_token_id"] = [eot, end]
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(config, f)
    return root, src, end, eot


def test_stop_ids_only_config_json_declares_survive_import_and_export(hf_source):
    """The run's copy of the tokenizer had no config.json: its stop ids were EOS alone, and
    the export's too — transformers' generate never stopped at <|im_end|>."""
    root, src, end, eot = hf_source
    assert set(hf.load_tokenizer(src).stop_ids) == {end, eot}
    run, out = str(root / "run_stops"), str(root / "out_stops")
    hf.import_to_run(src, run)
    assert set(hf.load_tokenizer(os.path.join(run, "tokenizer.json")).stop_ids) == {end, eot}
    hf.export_run(run, out)
    assert set(hf.load_tokenizer(out).stop_ids) == {end, eot}
    with open(os.path.join(out, "generation_config.json")) as f:
        assert set(json.load(f)["eos_token_id"]) == {end, eot}


def test_the_exported_templates_default_to_the_runs_template_variables(hf_source, monkeypatch):
    """A run that trained with data.chat_template_kwargs={"enable_thinking": false} was
    exported with the bare template: served prompts lacked the empty think block it learnt
    after. The variables are now the exported templates' defaults; a caller still overrides."""
    from flaxlm.train import checkpoint

    root, src, _, _ = hf_source
    run, out = str(root / "run_kwargs"), str(root / "out_kwargs")
    hf.import_to_run(src, run)
    named = os.path.join(run, "additional_chat_templates")  # as transformers >= 4.5x saves
    os.makedirs(named)
    for path in (os.path.join(run, "chat_template.jinja"), os.path.join(named, "tool_use.jinja")):
        with open(path, "w") as f:
            f.write(CHATML)
    kwargs = {"enable_thinking": False, "budget": [1, "two", None], "style": {"k": True}}
    load_model = checkpoint.load_model

    def with_kwargs(*a, **kw):
        cfg, params, meta = load_model(*a, **kw)
        return cfg, params, {**meta, "chat_template_kwargs": kwargs}

    monkeypatch.setattr(checkpoint, "load_model", with_kwargs)
    hf.export_run(run, out)
    chat = [{"role": "user", "content": "hi"}]
    trained = hf.set_template_kwargs(hf.load_tokenizer(src), kwargs)
    want = trained.render_chat_text(chat, add_generation_prompt=True)
    assert "<think>\n\n</think>" in want
    served = hf.load_tokenizer(out)  # no variables passed, as transformers by default
    assert served.template_kwargs == {}
    assert served.render_chat_text(chat, add_generation_prompt=True) == want
    override = hf.set_template_kwargs(hf.load_tokenizer(out), {"enable_thinking": True})
    assert "<think>" not in override.render_chat_text(chat, add_generation_prompt=True)
    tool_use = open(os.path.join(out, "additional_chat_templates", "tool_use.jinja")).read()
    assert tool_use.startswith("{%- if enable_thinking is not defined %}")
    with open(os.path.join(out, "tokenizer_config.json")) as f:  # the inline one too
        assert json.load(f)["chat_template"].startswith("{%- if enable_thinking is not")
    assert '{%- set budget = [1, "two", none] %}' in tool_use
    assert '{%- set style = {"k": true} %}' in tool_use


def test_an_imported_sentencepiece_checkpoint_keeps_its_template_and_sampling(tmp_path):
    """A Llama-2-style source (tokenizer.model, a tokenizer_config.json chat template, a
    generation_config.json with sampling defaults): import then export replaced both files
    with generated ones, and the template and sampling defaults were gone."""
    from flaxlm.data import tokenizer

    rng = random.Random(0)
    words = "the river and mountain have a forest of tall trees".split()
    texts = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    sp = tokenizer.train(texts, 300, user_defined_symbols=())
    cfg = get_variant("tiny", vocab_size=320, n_layers=1)
    params = unbox(model_fns(cfg)[0](jax.random.PRNGKey(0)))
    src = str(tmp_path / "src")
    hf.save_pretrained(cfg, params, src, "llama")
    sp.save(os.path.join(src, "tokenizer.model"))
    template = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": template, "tokenizer_class": "LlamaTokenizer"}, f)
    sampling = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_length": 4096}
    with open(os.path.join(src, "generation_config.json"), "w") as f:
        json.dump({**sampling, "eos_token_id": 2}, f)
    hf.import_to_run(src, str(tmp_path / "run"))
    hf.export_run(str(tmp_path / "run"), str(tmp_path / "out"))
    with open(tmp_path / "out" / "tokenizer_config.json") as f:
        tc = json.load(f)
    with open(tmp_path / "out" / "generation_config.json") as f:
        gc = json.load(f)
    assert tc["chat_template"] == template
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast"  # the tokenizer.json written
    assert {k: gc[k] for k in sampling} == sampling
    eos = gc["eos_token_id"]
    assert set(eos if isinstance(eos, list) else [eos]) == {sp.eos_id, 2}


def test_a_chat_run_exported_without_a_chat_template_is_warned_about(hf_source, monkeypatch,
                                                                      caplog):  # fmt: skip
    from flaxlm.train import checkpoint

    root, src, _, _ = hf_source
    bare = str(root / "bare")
    os.makedirs(bare)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        os.link(os.path.join(src, name), os.path.join(bare, name))
    with open(os.path.join(bare, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "bos_token": None}, f)
    run = str(root / "run_bare")
    hf.import_to_run(bare, run)
    load_model = checkpoint.load_model
    monkeypatch.setattr(checkpoint, "load_model",
                        lambda *a, **kw: (*load_model(*a, **kw)[:2],
                                          {**load_model(*a, **kw)[2], "task": "sft"}))  # fmt: skip
    with caplog.at_level(logging.WARNING):
        hf.export_run(run, str(root / "out_bare"))
    assert "sft run's tokenizer has no chat template" in caplog.text
    caplog.clear()
    for chats, warned in ((True, True), (False, False)):  # a merged run: as its inputs were
        merged = {"task": "merge", "merge": {"trained_on_chats": chats}}
        monkeypatch.setattr(checkpoint, "load_model",
                            lambda *a, merged=merged, **kw: (*load_model(*a, **kw)[:2],
                                              {**load_model(*a, **kw)[2], **merged}))  # fmt: skip
        with caplog.at_level(logging.WARNING):
            hf.export_run(run, str(root / f"out_merged_{chats}"))
        assert ("merge run's tokenizer has no chat template" in caplog.text) == warned
        caplog.clear()
    monkeypatch.setattr(checkpoint, "load_model", load_model)
    with caplog.at_level(logging.WARNING):
        hf.export_run(str(root / "run_kwargs"), str(root / "out_chat"))  # has one: no warning
    assert "no chat template" not in caplog.text
