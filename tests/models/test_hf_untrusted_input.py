"""A downloaded HF directory is untrusted input (found by the security review): ids past the
embedding, quantized tensors, shard names and tokenizer links that leave the directory, JSON
nested to the recursion limit, chat templates that ask for gigabytes or recurse forever. Each
is an HFError naming the file, not a NaN, a read elsewhere, a traceback or a stalled machine."""

import json
import os
import shutil
import stat

import numpy as np
import pytest

from flaxlm.models import hf
from tests.hf_tokenizers import write_hf_tokenizer

FIX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "hf")


def _copy(tmp_path, name, family="llama3"):
    d = tmp_path / name
    shutil.copytree(os.path.join(FIX, family), d)
    return str(d)


def _word_tokenizer(d, vocab: dict, **settings):
    from tokenizers import Tokenizer, models, pre_tokenizers

    d.mkdir(exist_ok=True)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    for name, obj in settings.items():
        (d / f"{name}.json").write_text(json.dumps(obj))
    return str(d)


def test_a_vocabulary_with_gaps_in_its_ids_is_measured_by_its_largest_id(tmp_path):
    """3 tokens, one of them id 39: the count (3) passed a 32-row model and id 39 read NaN."""
    d = _word_tokenizer(tmp_path / "tok", {"<unk>": 0, "a": 1, "world": 39})
    tok = hf.load_tokenizer(d)
    assert tok.vocab_size == 40 and tok.encode("world a") == [39, 1]
    with pytest.raises(hf.HFError, match="has ids up to 39 but the model's vocab_size is 32"):
        hf.load_tokenizer(d, vocab_size=32)
    hf.load_tokenizer(d, vocab_size=40)


@pytest.mark.parametrize(
    "settings, said",
    [
        ({"config": {"eos_token_id": 100}}, "eos 100"),
        ({"generation_config": {"eos_token_id": [1, 77]}}, "stop id 77"),
        ({"tokenizer_config": {"pad_token_id": 50}}, "pad 50"),
    ],
)
def test_special_ids_past_the_embedding_are_refused(tmp_path, settings, said):
    d = _word_tokenizer(tmp_path / "tok", {"<unk>": 0, "a": 1}, **settings)
    with pytest.raises(hf.HFError, match=f"declare {said}, past the model's vocab_size 32"):
        hf.load_tokenizer(d, vocab_size=32)


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"config": {"eos_token_id": "x"}}, r"config\.json: eos_token_id 'x' is not a token id"),
        ({"generation_config": {"eos_token_id": [None]}}, r"generation_config\.json: eos_token"),
        ({"tokenizer_config": {"pad_token_id": "0"}}, "pad_token_id '0' is not a token id"),
    ],
)
def test_special_ids_that_are_not_integers_are_named(tmp_path, settings, match):
    d = _word_tokenizer(tmp_path / "tok", {"<unk>": 0, "a": 1}, **settings)
    with pytest.raises(hf.HFError, match=match):
        hf.load_tokenizer(d)


def test_integer_tensors_are_refused_with_a_quantization_hint(tmp_path):
    """An int8 weight (its scales in other tensors) was cast to float as it was."""
    from safetensors.numpy import load_file, save_file

    d = _copy(tmp_path, "int8")
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = np.clip(tensors[name] * 100, -127, 127).astype(np.int8)
    save_file(tensors, path)
    with pytest.raises(hf.HFError, match=rf"tensor {name} is stored as I8, not as a float .*"
                       "quantized checkpoint"):  # fmt: skip
        hf.load_pretrained(d)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/x.safetensors", 3, ""])
def test_an_index_naming_files_outside_its_directory_is_refused(tmp_path, shard):
    d = _copy(tmp_path, "index", family="llama")
    index = os.path.join(d, "model.safetensors.index.json")
    with open(index) as f:
        obj = json.load(f)
    obj["weight_map"]["lm_head.weight"] = shard
    with open(index, "w") as f:
        json.dump(obj, f)
    with pytest.raises(hf.HFError, match=r"weight_map\['lm_head.weight'\] = .* is not the name of"):
        hf.load_pretrained(d)
    obj["weight_map"] = ["lm_head.weight"]
    with open(index, "w") as f:
        json.dump(obj, f)
    with pytest.raises(hf.HFError, match=r"'weight_map' is not a \{tensor: file\} object"):
        hf.load_pretrained(d)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_attention_heads": 0}, "num_attention_heads must be >= 1, got 0"),
        ({"hidden_size": 0}, "hidden_size must be >= 1, got 0"),
        ({"num_hidden_layers": 1_000_000}, "num_hidden_layers=1000000, but the weights hold 2"),
    ],
)
def test_config_sizes_the_weights_cannot_have_are_refused_before_reading(tmp_path, change, match):
    """0 heads was a ZeroDivisionError; a million layers beside a 2-layer checkpoint built a
    million-layer plan (62 s, 4.8 GB) before MemoryError."""
    d = _copy(tmp_path, "cfg")
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({**cfg, **change}, f)
    with pytest.raises(hf.HFError, match=match):
        hf.load_pretrained(d)


def test_json_nested_past_the_recursion_limit_is_named(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    d = _copy(tmp_path, "deep")
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write(deep)
    with pytest.raises(hf.HFError, match=r"deep/config\.json: nested too deeply"):
        hf.load_pretrained(d)
    t = _word_tokenizer(tmp_path / "tok", {"<unk>": 0, "a": 1})
    with open(os.path.join(t, "tokenizer_config.json"), "w") as f:
        f.write(deep)
    with pytest.raises(hf.HFError, match=r"tokenizer_config\.json: cannot read tokenizer"):
        hf.load_tokenizer(t)


def test_an_export_is_readable_by_others_directories_included(tmp_path):
    """mkdtemp's 0700 was changed for the files at the top only; additional_chat_templates/
    became 0644 (a directory without its x bit: its owner could not list it)."""
    tok = write_hf_tokenizer(str(tmp_path / "tok"), "{{ messages[0]['content'] }}", {})
    os.makedirs(os.path.join(tok, "additional_chat_templates"))
    with open(os.path.join(tok, "additional_chat_templates", "tool_use.jinja"), "w") as f:
        f.write("{{ tools }}")
    cfg, params = hf.load_pretrained(os.path.join(FIX, "llama3"))
    out = str(tmp_path / "out")
    old = os.umask(0o022)
    try:
        hf.save_pretrained(cfg, params, out, tokenizer=tok)
    finally:
        os.umask(old)
    named = os.path.join(out, "additional_chat_templates")
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(named).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(os.path.join(named, "tool_use.jinja")).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(os.path.join(out, "model.safetensors")).st_mode) == 0o644


def test_tokenizer_files_linking_outside_their_directory_are_not_exported(tmp_path):
    """A downloaded repository's `chat_template.jinja -> ~/.ssh/id_rsa` was copied into every
    export of the model. The HF cache's own links (snapshots/REV/x -> ../../blobs/HASH) stay
    allowed, and so do only NAME.jinja files of additional_chat_templates/."""
    secret = tmp_path / "secret"
    secret.write_text("PRIVATE KEY")
    tok = write_hf_tokenizer(str(tmp_path / "tok"), "{{ messages[0]['content'] }}", {})
    os.symlink(secret, os.path.join(tok, "chat_template.jinja"))
    cfg, params = hf.load_pretrained(os.path.join(FIX, "llama3"))
    out = str(tmp_path / "out")
    with pytest.raises(hf.HFError, match=r"chat_template\.jinja links to .*secret, outside"):
        hf.save_pretrained(cfg, params, out, tokenizer=tok)
    assert not os.path.exists(out)

    os.remove(os.path.join(tok, "chat_template.jinja"))
    named = os.path.join(tok, "additional_chat_templates")
    os.makedirs(named)
    os.symlink(secret, os.path.join(named, "rag.jinja"))
    with pytest.raises(hf.HFError, match=r"rag\.jinja links to .*secret, outside"):
        hf.save_pretrained(cfg, params, out, tokenizer=tok)
    os.remove(os.path.join(named, "rag.jinja"))
    with open(os.path.join(named, "notes.txt"), "w") as f:
        f.write("not a template")
    hf.save_pretrained(cfg, params, out, tokenizer=tok)
    assert os.listdir(os.path.join(out, "additional_chat_templates")) == []

    # The HF cache layout: models--org--name/snapshots/REV/tokenizer.json -> ../../blobs/HASH
    repo = tmp_path / "cache" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "rev").mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok, name), repo / "blobs" / f"hash-{name}")
        os.symlink(f"../../blobs/hash-{name}", repo / "snapshots" / "rev" / name)
    cached = str(tmp_path / "cached")
    hf.save_pretrained(cfg, params, cached, tokenizer=str(repo / "snapshots" / "rev"))
    assert os.path.isfile(os.path.join(cached, "tokenizer.json"))


def _chat(tmp_path, template):
    return hf.load_tokenizer(write_hf_tokenizer(str(tmp_path / "chat"), template, {}))


@pytest.mark.parametrize(
    "template, match",
    [
        ("{{ 'a' * 10**9 }}", "an exponent of 9|a repetition of 1000000000 items"),
        ("{{ 'ab' * 1000000 }}", "a repetition of 2000000 items"),
        ("{{ [1] * 2000000 }}", "a repetition of 2000000 items"),
        ("{{ 2 ** 100000 }}", "an exponent of 100000"),
        ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "RecursionError while rendering"),
    ],
)
def test_chat_templates_cannot_take_the_machine(tmp_path, template, match):
    tok = _chat(tmp_path, template)
    with pytest.raises(hf.HFError, match=match):
        tok.render_chat_text([{"role": "user", "content": "hi"}])


def test_chat_templates_keep_small_repetitions_and_powers(tmp_path):
    tok = _chat(tmp_path, "{{ '-' * 3 }}{{ 2 ** 10 }}{{ 3 * 4 }}{{ messages[0]['content'] }}")
    assert tok.render_chat_text([{"role": "user", "content": "hi"}]) == "---102412hi"


def test_template_kwargs_must_be_variable_names(tmp_path):
    tok = _chat(tmp_path, "{{ messages[0]['content'] }}")
    with pytest.raises(hf.HFError, match=r"\['enable-thinking'\] are not template variable names"):
        hf.set_template_kwargs(tok, {"enable-thinking": True})
    assert hf.set_template_kwargs(tok, {"enable_thinking": True}).template_kwargs == {
        "enable_thinking": True
    }
