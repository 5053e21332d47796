"""HF import on damaged directories: every failure names the file; an import never lands on top
of an existing run."""

import os
import re
import shutil

import pytest

from flaxlm.models import hf

FIX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "hf")


def _copy(tmp_path, name, family="llama3"):
    d = tmp_path / name
    shutil.copytree(os.path.join(FIX, family), d)
    return str(d)


def test_damaged_files_are_named(tmp_path):
    d = _copy(tmp_path, "trunc")
    st = os.path.join(d, "model.safetensors")
    os.truncate(st, os.path.getsize(st) // 2)
    with pytest.raises(hf.HFError, match=r"trunc/model\.safetensors: cannot read"):
        hf.load_pretrained(d)
    d = _copy(tmp_path, "cfg")
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write('{"model_type": "llama",')
    with pytest.raises(hf.HFError, match=r"cfg/config\.json: not valid JSON"):
        hf.load_pretrained(d)
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write("[1, 2]")
    with pytest.raises(hf.HFError, match=r"cfg/config\.json: expected a JSON object, got list"):
        hf.load_config(d)
    d = _copy(tmp_path, "index", family="llama")
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        f.write("{")
    with pytest.raises(hf.HFError, match=r"index/model\.safetensors\.index\.json: not valid"):
        hf.load_pretrained(d)


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("tokenizer.json", '{"version": "1.0", "model": ', r"tokenizer\.json: cannot load"),
        ("tokenizer.model", "garbage", r"tokenizer\.model: not a SentencePiece model"),
    ],
)
def test_import_checks_the_tokenizer_before_writing(tmp_path, name, text, match):
    d = _copy(tmp_path, "src")
    with open(os.path.join(d, name), "w") as f:
        f.write(text)
    run = str(tmp_path / "run")
    with pytest.raises(hf.HFError, match=match):
        hf.import_to_run(d, run)
    assert not os.path.exists(os.path.join(run, "checkpoints"))


def test_tokenizer_settings_that_are_not_json_are_named(tmp_path):
    from tokenizers import Tokenizer, models

    d = tmp_path / "tok"
    d.mkdir()
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(
        str(d / "tokenizer.json")
    )
    (d / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(hf.HFError, match=r"tokenizer_config\.json: cannot read"):
        hf.load_tokenizer(str(d))


def test_import_refuses_a_directory_with_checkpoints(tmp_path):
    run = str(tmp_path / "run")
    hf.import_to_run(_copy(tmp_path, "a"), run)
    # Used to print "imported" and keep the first model (step 0 already saved).
    with pytest.raises(hf.HFError, match="already holds checkpoints"):
        hf.import_to_run(_copy(tmp_path, "b", family="qwen2"), run)
    with pytest.raises(SystemExit, match="error: import: .* already holds checkpoints"):
        hf.main(["import", _copy(tmp_path, "c", family="qwen2"), run])


def test_an_import_killed_mid_save_can_be_rerun_and_an_interrupted_export_is_mended(
    tmp_path, caplog
):
    """A killed import left only checkpoints/0.orbax-checkpoint-tmp: the rerun said "already
    holds checkpoints" while generate said "no checkpoint". An --overwrite export killed
    between its two renames left no export at all, the previous one hidden in .NAME.old-*/x;
    one killed while writing left a full-size .NAME.tmp-* for good. Now the rerun imports, and
    the next export to that name restores or removes what was left (each logged)."""
    import logging

    from flaxlm.train.checkpoint import load_model

    caplog.set_level(logging.WARNING)
    run = str(tmp_path / "run")
    tmp = os.path.join(run, "checkpoints", "0.orbax-checkpoint-tmp-1234")
    os.makedirs(os.path.join(tmp, "state"))
    hf.import_to_run(_copy(tmp_path, "a"), run)
    assert f"import: removing {tmp}, an unfinished save" in caplog.text
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["0"]
    cfg, params, _ = load_model(run)

    out = tmp_path / "exp"
    hf.save_pretrained(cfg, params, str(out))
    good = sorted(os.listdir(out))
    os.makedirs(tmp_path / ".exp.old-abc")
    os.replace(out, tmp_path / ".exp.old-abc" / "x")  # killed between the renames
    os.makedirs(tmp_path / ".exp.tmp-def" / "junk")  # and a write killed part way
    caplog.clear()
    with pytest.raises(hf.HFError, match="exists and is not empty"):  # the restored one
        hf.save_pretrained(cfg, params, str(out))
    assert sorted(os.listdir(out)) == good
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".exp")) == []
    assert f"export: restored {out}, moved aside" in caplog.text
    assert f"export: removing {tmp_path / '.exp.tmp-def'}" in caplog.text


def test_a_mesh_that_cannot_hold_the_model_is_named_before_reading(tmp_path):
    """Loading under tensor=4 a model of 2 kv heads raised jax's IndivisibleError while placing
    a tensor, naming neither the weight nor the directory; now an HFError names both, the mesh
    axes and the logical axis, before any tensor is read."""
    from flaxlm.models.sharding import logical_axis_rules, make_mesh

    d = os.path.join(FIX, "llama")  # 2 kv heads
    mesh = make_mesh({"data": 2, "tensor": 4})
    with pytest.raises(hf.HFError, match=r"llama: parameter .*\['k'\]\['kernel'\] .*'kv_heads', "
                       r"size 2\) does not split over mesh axes tensor=4 = 4; load it under "
                       r"another mesh"):  # fmt: skip
        hf.load_pretrained(d, mesh=mesh, rules=logical_axis_rules("fsdp_tp"))


@pytest.mark.parametrize(
    "family, change, match",
    [
        ("llama3", {"num_key_value_heads": 3},
         r"num_attention_heads=4, num_key_value_heads=3: .*n_heads=4 is not a multiple of "
         r"n_kv_heads=3"),
        ("gemma3", {"head_dim": 7}, r"head_dim=7: .*head_dim=7 must be even for RoPE"),
        # values that are no integer or boolean: named, not int()'s message or a TypeError,
        # and never truncated (int(1.5) is 1) or read as true ("false" is a true string)
        ("qwen2", {"num_key_value_heads": "2x"}, r"num_key_value_heads='2x' is not an integer"),
        ("qwen2", {"num_key_value_heads": [2]}, r"num_key_value_heads=\[2\] is not an integer"),
        ("qwen2", {"vocab_size": 1.5}, r"vocab_size=1.5 is not an integer"),
        ("qwen2", {"tie_word_embeddings": "false"}, r"tie_word_embeddings='false' is not true "
         r"or false"),
    ],
)  # fmt: skip
def test_a_config_the_model_rejects_names_the_file_and_keys(tmp_path, family, change, match):
    """ModelConfig's own checks (kv heads that do not divide the heads; an odd head_dim where
    no partial_rotary_factor check comes first) were a bare ValueError naming neither
    config.json nor the key, a traceback from `import` and `generate`."""
    import json

    d = _copy(tmp_path, "src", family)
    where = os.path.join(d, "config.json")
    with open(where) as f:
        c = json.load(f)
    with open(where, "w") as f:
        json.dump({**c, **change}, f)
    with pytest.raises(hf.HFError, match=rf"^{re.escape(where)}: {match}"):
        hf.load_config(d)
    with pytest.raises(SystemExit, match=rf"error: {re.escape(where)}: {match}"):
        hf.main(["import", d, str(tmp_path / "run")])
