"""`python -m flaxlm.models.hf extend-vocab` (models/hf_extend.py): tokens added to an HF
checkpoint's tokenizer (tokenizer.json or SentencePiece), embeddings grown and initialised,
the old model's logits untouched, padding rows reused, and bad input named.

Built on the tiny committed fixtures (tests/fixtures/hf: llama untied in three shards, qwen2
tied), each given a word-level tokenizer.json or a tiny SentencePiece model here."""

import json
import os
import shutil

import numpy as np
import pytest

from flaxlm.data import tokenizer as sp_tokenizer
from flaxlm.models import hf, hf_extend
from flaxlm.models.hf_tokenizer import SENTENCEPIECE_KEY, sentencepiece_hf_files

FIX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "hf")


def _checkpoint(tmp_path, family, n_ids, name="src") -> str:
    """A copy of fixture `family` (vocab_size 64) with a word-level tokenizer.json of `n_ids`
    ids: <unk> <s> </s> (special), then w0, w1, ...; fewer than 64 leaves padding rows."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = str(tmp_path / name)
    shutil.copytree(os.path.join(FIX, family), d, ignore=shutil.ignore_patterns("*.npz"))
    vocab = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(n_ids - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(vocab[:3])
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "added_tokens_decoder": {}}, f)
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": 2, "temperature": 0.7}, f)
    return d


def _logits(d, tokens):
    cfg, params = hf.load_pretrained(d)
    return cfg, params, np.asarray(hf.forward(cfg, params, tokens))


def _tokens(n_ids):  # a fixed batch of old ids only
    return np.random.default_rng(0).integers(0, n_ids, (2, 8)).astype(np.int32)


def test_untied_sharded_checkpoint_grows_and_keeps_the_old_logits(tmp_path, capsys):
    src = _checkpoint(tmp_path, "llama", 64)  # no padding: the embedding must grow
    out = str(tmp_path / "out")
    hf.main(["extend-vocab", src, out, "--tokens", "<tool_call>, </tool_call>",
             "--pad_to_multiple_of", "32"])  # fmt: skip
    said = capsys.readouterr().out
    assert "'<tool_call>' = 64, '</tool_call>' = 65" in said and "vocab_size: 64 -> 96" in said
    assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == 96

    tokens = _tokens(64)
    cfg0, p0, logits0 = _logits(src, tokens)
    cfg1, p1, logits1 = _logits(out, tokens)
    assert cfg1 == cfg0.replace(vocab_size=96) and logits1.shape[-1] == 96
    np.testing.assert_allclose(logits1[..., :64], logits0, rtol=0, atol=1e-5)

    # the old rows as they were; every new row (2 tokens + 30 padding) the old rows' mean
    emb0, emb1 = p0["embed"]["embedding"], np.asarray(p1["embed"]["embedding"])
    head0, head1 = p0["lm_head"]["kernel"], np.asarray(p1["lm_head"]["kernel"])  # (D, V)
    np.testing.assert_array_equal(emb1[:64], emb0)
    np.testing.assert_array_equal(head1[:, :64], head0)
    want = np.asarray(emb0, np.float64).mean(0)
    np.testing.assert_allclose(emb1[64:], np.broadcast_to(want, (32, want.size)), atol=1e-6)
    want = np.asarray(head0, np.float64).mean(1)
    np.testing.assert_allclose(head1[:, 64:], np.broadcast_to(want[:, None], (want.size, 32)),
                               atol=1e-6)  # fmt: skip
    assert np.abs(want).max() > 1e-3  # (the mean is not the zero vector: zeros would fail)
    assert emb1.dtype == np.float32

    # the shard without either matrix copied byte for byte; the index's sizes grown
    mid = "model-00002-of-00003.safetensors"
    assert open(os.path.join(out, mid), "rb").read() == open(os.path.join(src, mid), "rb").read()
    meta = [json.load(open(os.path.join(d, "model.safetensors.index.json")))["metadata"]
            for d in (src, out)]  # fmt: skip
    assert meta[1]["total_size"] - meta[0]["total_size"] == 2 * 32 * 32 * 4
    # settings files: generation_config as it was, tokenizer_config lists the new tokens
    assert json.load(open(os.path.join(out, "generation_config.json"))) == {
        "eos_token_id": 2, "temperature": 0.7}  # fmt: skip
    decoder = json.load(open(os.path.join(out, "tokenizer_config.json")))["added_tokens_decoder"]
    assert decoder["65"]["content"] == "</tool_call>" and not decoder["65"]["special"]

    tok = hf.load_tokenizer(out, vocab_size=96)
    assert tok.encode("<tool_call>") == [64] and tok.encode("</tool_call>") == [65]
    text = "w1 <tool_call> w2 w3 </tool_call> w4"
    ids = tok.encode(text)
    assert ids.count(64) == ids.count(65) == 1 and tok.decode(ids) == text
    assert hf.load_tokenizer(src).encode("w1 w2") == tok.encode("w1 w2")  # old ids unchanged


def test_tied_checkpoint_reuses_its_padding_rows_for_special_tokens(tmp_path):
    """vocab_size 64 over a 40-id tokenizer: the new ids are 40 and 41, inside the padding;
    those rows (never trained) are re-initialised, the rest of the matrix is kept."""
    src = _checkpoint(tmp_path, "qwen2", 40)
    out = str(tmp_path / "out")
    done = hf_extend.extend_vocab(src, out, ["<|im_start|>", "<|im_end|>"], special=True)
    assert done.added == {"<|im_start|>": 40, "<|im_end|>": 41}
    assert done.vocab_size == (64, 64) and done.tokenizer_size == (40, 42)
    assert done.initialised == [40, 41]

    tokens = _tokens(40)
    cfg0, p0, logits0 = _logits(src, tokens)
    cfg1, p1, logits1 = _logits(out, tokens)
    assert cfg1 == cfg0 and cfg1.tie_embeddings and "lm_head" not in p1
    emb0, emb1 = np.asarray(p0["embed"]["embedding"]), np.asarray(p1["embed"]["embedding"])
    np.testing.assert_array_equal(emb1[:40], emb0[:40])
    np.testing.assert_array_equal(emb1[42:], emb0[42:])  # the padding the tokens did not take
    mean = emb0[:40].astype(np.float64).mean(0)
    np.testing.assert_allclose(emb1[40:42], np.stack([mean, mean]), atol=1e-6)
    assert np.abs(emb0[40:42] - mean).max() > 1e-2  # (the padding rows were something else)
    # tied: the logits of every column but the two new ones are the source's
    np.testing.assert_allclose(logits1[..., :40], logits0[..., :40], rtol=0, atol=1e-5)
    np.testing.assert_allclose(logits1[..., 42:], logits0[..., 42:], rtol=0, atol=1e-5)

    tok = hf.load_tokenizer(out, vocab_size=64)
    assert tok.encode("<|im_start|>w5<|im_end|>") == [40, 8, 41]
    assert tok.decode([40, 8, 41]) == "w5"  # special: dropped when decoding, as transformers
    added = json.load(open(os.path.join(out, "tokenizer.json")))["added_tokens"]
    assert [(t["id"], t["special"]) for t in added[-2:]] == [(40, True), (41, True)]


def _sentencepiece_checkpoint(tmp_path, name, exported=False) -> tuple[str, int]:
    """(dir, pieces): the qwen2 fixture with a tiny SentencePiece BPE tokenizer.model (fewer
    pieces than the 64 rows); `exported`: with the tokenizer.json and tokenizer_config.json a
    flaxlm export generates from it (models/hf_tokenizer.py `sentencepiece_hf_files`)."""
    d = str(tmp_path / name)
    shutil.copytree(os.path.join(FIX, "qwen2"), d, ignore=shutil.ignore_patterns("*.npz"))
    texts = ["the quick brown fox jumps over the lazy dog", "hello world how are you"] * 50
    tok = sp_tokenizer.train(texts, 40, byte_fallback=False, user_defined_symbols=(),
                             model_path=os.path.join(d, "tokenizer.model"))  # fmt: skip
    if exported:
        for fname, obj in sentencepiece_hf_files(tok).items():
            with open(os.path.join(d, fname), "w") as f:
                json.dump(obj, f)
        assert json.load(open(os.path.join(d, "tokenizer_config.json")))[SENTENCEPIECE_KEY]
    return d, tok.vocab_size


def test_sentencepiece_pieces_and_seeded_mean_noise_rows(tmp_path):
    src, n = _sentencepiece_checkpoint(tmp_path, "src")
    assert n < 62
    new = ["<tool_call>", "</tool_call>"]

    def extend(name, seed):
        out = str(tmp_path / name)
        hf_extend.extend_vocab(src, out, new, init="mean_noise", seed=seed)
        _, params = hf.load_pretrained(out)
        return out, np.asarray(params["embed"]["embedding"])

    out, a = extend("a", 0)
    _, b = extend("b", 0)
    _, c = extend("c", 1)
    np.testing.assert_array_equal(a, b)  # seeded: the same rows again
    assert np.abs(a[n : n + 2] - c[n : n + 2]).min() > 0  # another seed, other noise
    _, p0 = hf.load_pretrained(src)
    old = np.asarray(p0["embed"]["embedding"])
    np.testing.assert_array_equal(a[:n], old[:n])
    mean, spread = old[:n].mean(0), old[:n].std(0)
    off = np.abs(a[n : n + 2] - mean)
    # near the mean: noise of std sqrt(1e-5) of the rows' own spread, per direction
    assert off.max() < 6 * np.sqrt(hf_extend.NOISE_SCALE) * spread.max() and off.max() > 0
    assert np.abs(a[n] - a[n + 1]).max() > 0  # the two new tokens set apart

    tok = hf.load_tokenizer(out, vocab_size=64)
    assert isinstance(tok, sp_tokenizer.Tokenizer) and tok.vocab_size == n + 2
    assert [tok.token_id(t) for t in new] == [n, n + 1]
    text = "hello <tool_call> the world </tool_call> fox"
    ids = tok.encode(text)
    assert ids.count(n) == ids.count(n + 1) == 1 and tok.decode(ids) == text
    assert hf.load_tokenizer(src).encode("hello world") == tok.encode("hello world")


def test_sentencepiece_export_gets_its_tokenizer_json_generated_again(tmp_path):
    """A flaxlm export (tokenizer.model, and the tokenizer.json generated from it): both have
    the new tokens at the same ids, special in tokenizer.json with --special."""
    from tokenizers import Tokenizer as RawTokenizer

    src, n = _sentencepiece_checkpoint(tmp_path, "src", exported=True)
    out = str(tmp_path / "out")
    hf.main(["extend-vocab", src, out, "--tokens", "<|im_start|>,<|im_end|>", "--special"])
    raw = RawTokenizer.from_file(os.path.join(out, "tokenizer.json"))
    assert raw.encode("<|im_end|>", add_special_tokens=False).ids == [n + 1]
    assert raw.decode([n, n + 1], skip_special_tokens=True) == ""
    tok = hf.load_tokenizer(out)  # (flaxlm reads the model itself)
    assert isinstance(tok, sp_tokenizer.Tokenizer) and tok.token_id("<|im_start|>") == n
    decoder = json.load(open(os.path.join(out, "tokenizer_config.json")))["added_tokens_decoder"]
    assert decoder[str(n)]["content"] == "<|im_start|>" and decoder[str(n)]["special"]


def test_a_run_directory_is_exported_then_extended(tmp_path):
    src = _checkpoint(tmp_path, "qwen2", 40)
    run = str(tmp_path / "run")
    hf.main(["import", src, run])
    a, b = str(tmp_path / "from_run"), str(tmp_path / "from_hf")
    done = hf_extend.extend_vocab(run, a, ["<x>"], pad_to_multiple_of=8)
    hf_extend.extend_vocab(src, b, ["<x>"], pad_to_multiple_of=8)
    assert done.added == {"<x>": 40} and done.vocab_size == (64, 64)
    _, pa = hf.load_pretrained(a)
    _, pb = hf.load_pretrained(b)
    np.testing.assert_array_equal(pa["embed"]["embedding"], pb["embed"]["embedding"])
    assert hf.load_tokenizer(a).encode("w1 <x>") == [4, 40]
    assert not [d for d in os.listdir(tmp_path) if d.startswith(".")]  # no temporary left


def test_existing_tokens_are_reported_not_added_again(tmp_path):
    src = _checkpoint(tmp_path, "llama", 64)
    out = str(tmp_path / "out")
    done = hf_extend.extend_vocab(src, out, ["w3", "<new>", "<new>", "</s>"])
    assert done.present == {"w3": 6, "</s>": 2} and done.added == {"<new>": 64}
    assert "already in the vocabulary (not added): 'w3' = 6, '</s>' = 2" in done.summary()
    assert done.vocab_size == (64, 65)  # no --pad_to_multiple_of: one row more
    contents = [t["content"] for t in json.load(open(os.path.join(out, "tokenizer.json")))
                ["added_tokens"]]  # fmt: skip
    assert contents.count("<new>") == 1 and "w3" not in contents and contents.count("</s>") == 1
    with pytest.raises(hf.HFError, match=r"every token given is already in .*tokenizer\.json: "
                       r"'w3' = 6"):  # fmt: skip
        hf_extend.extend_vocab(src, str(tmp_path / "none"), ["w3"])
    assert not os.path.exists(tmp_path / "none")


def test_bad_input_is_named(tmp_path, capsys):
    src = _checkpoint(tmp_path, "qwen2", 40)
    out = str(tmp_path / "out")
    for tokens, match in ((["<a>", ""], "token 2 is empty"),
                          (["<a>", " \t"], r"token 2 is whitespace only \(' \\t'\)")):  # fmt: skip
        with pytest.raises(hf.HFError, match=match):
            hf_extend.extend_vocab(src, out, tokens)
    with pytest.raises(SystemExit, match=r"token 2 of --tokens '<a>,,<b>' is empty"):
        hf.main(["extend-vocab", src, out, "--tokens", "<a>,,<b>"])
    (tmp_path / "list.txt").write_text("<a>\n  \n<b>\n")
    with pytest.raises(SystemExit, match=r"list\.txt:2: token '  ' is whitespace only"):
        hf.main(["extend-vocab", src, out, "--tokens_file", str(tmp_path / "list.txt")])
    gone = str(tmp_path / "gone")
    with pytest.raises(SystemExit, match=f"SRC {gone} does not exist"):
        hf.main(["extend-vocab", gone, out, "--tokens", "<a>"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(hf.HFError, match=r"empty: no config\.json \(not an HF checkpoint"):
        hf_extend.extend_vocab(str(tmp_path / "empty"), out, ["<a>"])
    bare = str(tmp_path / "bare")  # a checkpoint without a tokenizer
    shutil.copytree(os.path.join(FIX, "qwen2"), bare)
    with pytest.raises(hf.HFError, match=r"bare: no tokenizer\.json or tokenizer\.model"):
        hf_extend.extend_vocab(bare, out, ["<a>"])
    sp, _ = _sentencepiece_checkpoint(tmp_path, "sp")
    with pytest.raises(hf.HFError, match=r"tokenizer\.model is a SentencePiece model.*'a b'"):
        hf_extend.extend_vocab(sp, out, ["a b"])
    with pytest.raises(hf.HFError, match="is inside SRC"):
        hf_extend.extend_vocab(src, os.path.join(src, "x"), ["<a>"])
    assert not os.path.exists(out)
    # an existing OUT is refused, and replaced with --overwrite
    hf_extend.extend_vocab(src, out, ["<a>"])
    with pytest.raises(SystemExit, match="exists and is not empty .*--overwrite"):
        hf.main(["extend-vocab", src, out, "--tokens", "<b>"])
    hf.main(["extend-vocab", src, out, "--tokens", "<b>", "--overwrite"])
    assert hf.load_tokenizer(out).encode("<b>") == [40] and "<b>" in capsys.readouterr().out


def test_pretraining_takes_the_extended_checkpoint_as_init_from(tmp_path):
    """What `init_from=hf:OUT` reads before training: the grown architecture, the extended
    tokenizer, and batches of text with the new token's id. (A full run, compiling a train
    step, adds ~20 s: load_pretrained, which it starts from, is tested above.)"""
    from flaxlm.configs import pretrain as pretrain_config
    from flaxlm.train import pretrain

    src = _checkpoint(tmp_path, "llama", 64)
    out = str(tmp_path / "out")
    hf_extend.extend_vocab(src, out, ["<tool_call>"], pad_to_multiple_of=8)
    docs = [" ".join(f"w{(i * 7 + j) % 50}" for j in range(20)) + " <tool_call> w1"
            for i in range(16)]  # fmt: skip
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    c = pretrain_config.get_config("variant=tiny,steps=2")
    with c.unlocked():
        c.init_from = f"hf:{out}"
        c.batch_size, c.seq_len = 8, 32
        c.data.sources = str(tmp_path / "train.jsonl")
    cfg = pretrain.model_config(c)
    assert cfg == hf.load_config(src).replace(vocab_size=72)
    tok = pretrain.source_tokenizer(c)
    assert tok.sha256 == hf.load_tokenizer(out).sha256
    batch = next(pretrain.make_batches(c, seed=0, tokenizer=tok, vocab_size=cfg.vocab_size))
    ids = np.asarray(batch["tokens"])
    assert (ids == 64).any() and ids.max() == 64


def test_the_source_dtype_is_kept(tmp_path):
    from safetensors import safe_open

    src = _checkpoint(tmp_path, "qwen2", 64)
    cfg, params = hf.load_pretrained(src)
    bf16 = str(tmp_path / "bf16")
    hf.save_pretrained(cfg, params, bf16, arch="qwen2", dtype="bfloat16", tokenizer=src)
    out = str(tmp_path / "out")
    hf_extend.extend_vocab(bf16, out, ["<x>", "<y>"], init="mean_noise")
    with safe_open(os.path.join(out, "model.safetensors"), framework="numpy") as f:
        dtypes = {f.get_slice(n).get_dtype() for n in f.keys()}
        emb = f.get_tensor("model.embed_tokens.weight")
    assert dtypes == {"BF16"} and emb.shape == (66, 32)
    mean = emb[:64].astype(np.float64).mean(0)
    np.testing.assert_allclose(emb[64:].astype(np.float64), np.stack([mean, mean]), atol=2e-2)
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
