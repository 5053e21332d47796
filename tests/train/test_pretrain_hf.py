"""Continued pretraining of an HF checkpoint whose tokenizer is a tokenizer.json (Llama 3,
Qwen2, SmolLM, OLMo 2 ...): `init_from=hf:DIR` with raw text builds the checkpoint's
architecture, starts from its weights, tokenizes with its tokenizer (a special token's string
in a document stays text), keeps that tokenizer with the run, and exports back to HF; the
preprocess CLI writes token shards with it; a run continued from such a run takes its
tokenizer; shards of another tokenizer are refused."""

import json
import logging
import os

import jax
import numpy as np
import pytest

from flaxlm.configs import pretrain as pretrain_config
from flaxlm.data import pipeline, preprocess
from flaxlm.data.sources import DataError
from flaxlm.models import hf
from flaxlm.models.config import ModelConfig
from flaxlm.train import pretrain
from flaxlm.train.checkpoint import read_meta
from flaxlm.train.metrics import read_metrics
from flaxlm.train.state import unbox
from tests.hf_tokenizers import write_hf_tokenizer

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 256, 257, 258 (bytes first)
EOS, PAD = 258, 256
WORDS = "river fox train garden museum bridge harbour village letter morning".split()


def _docs(n, offset=0):
    return [" ".join(WORDS[(i + j) % 10] for j in range(30 + i % 7)) + "." for i in
            range(offset, offset + n)]  # fmt: skip


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random Llama-shaped HF checkpoint (vocab 264 > the tokenizer's 259 ids: as real ones,
    padded) with a byte-level tokenizer.json whose EOS is <|im_end|>."""
    root = tmp_path_factory.mktemp("hf")
    cfg = ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=128, tie_embeddings=False)  # fmt: skip
    params = unbox(pretrain.model_fns(cfg)[0](jax.random.PRNGKey(3)))
    d = str(root / "model")
    hf.save_pretrained(cfg, params, d)
    write_hf_tokenizer(d, "", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                       specials=SPECIALS)  # fmt: skip
    for name, docs in (("train.jsonl", _docs(120)), ("heldout.jsonl", _docs(12, 500))):
        (root / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return d


def _config(hf_dir, steps=8, **kw):
    root = os.path.dirname(hf_dir)
    c = pretrain_config.get_config(f"variant=tiny,steps={steps}")
    with c.unlocked():
        c.progress_bar = False
        c.init_from = f"hf:{hf_dir}"
        c.batch_size, c.seq_len = 8, 64
        c.eval_every = c.ckpt_every = c.log_every = steps
        c.data.sources = os.path.join(root, "train.jsonl")
        c.data.eval_sources = os.path.join(root, "heldout.jsonl")
        c.data.eval_batches = 1
        for k, v in kw.items():
            node, *rest = k.split(".")
            if rest:
                c[node][rest[0]] = v
            else:
                c[k] = v
    return c


def test_continued_pretraining_starts_from_the_checkpoint_and_exports_back(hf_dir, tmp_path):
    run = str(tmp_path / "run")
    c = _config(hf_dir, **{"opt.lr": 0.0})  # lr 0: the weights at the end are the start's
    pretrain.run(c, run)
    _, meta = read_meta(run)
    # the checkpoint's architecture (not the tiny variant's: d_model 32, vocab 264) ...
    assert ModelConfig.from_dict(meta["model_config"]) == hf.load_config(hf_dir)
    # ... its tokenizer, copied with the run (tokenizer.json and the settings beside it)
    assert meta["tokenizer"] == os.path.join(run, "tokenizer.json")
    assert os.path.exists(os.path.join(run, "tokenizer_config.json"))
    out = str(tmp_path / "export")
    hf.export_run(run, out)
    _, want = hf.load_pretrained(hf_dir)
    _, got = hf.load_pretrained(out)
    jax.tree.map(np.testing.assert_array_equal, got, want)  # its weights, exactly
    tok = pipeline.open_tokenizer(out)
    assert tok.sha256 == pipeline.open_tokenizer(hf_dir).sha256


def test_the_first_held_out_loss_is_the_checkpoint_s_and_training_lowers_it(hf_dir, tmp_path):
    c = _config(hf_dir, steps=30, **{"opt.lr": 3e-3, "eval_at_start": True})
    pretrain.run(c, str(tmp_path))
    evals = [r["eval/nll"] for r in read_metrics(tmp_path) if "eval/nll" in r]
    # the start's loss, computed here from the HF weights by hf.forward over the same rows
    tok = pipeline.open_tokenizer(hf_dir)
    rows = pretrain.text_eval_batches(c, tok)[0]
    cfg, params = hf.load_pretrained(hf_dir)
    logits = np.asarray(hf.forward(cfg, params, rows["tokens"], rows["positions"],
                                   rows["segment_ids"]), np.float64)  # fmt: skip
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, rows["targets"][..., None], -1)[..., 0]
    w = rows["loss_mask"]
    assert evals[0] == pytest.approx((nll * w).sum() / w.sum(), rel=1e-4)
    assert evals[0] > 5.0 and evals[-1] < evals[0] - 2.0  # from ~log(264) to well below


def test_a_special_token_s_string_in_a_document_is_text(hf_dir, tmp_path):
    src = tmp_path / "docs.jsonl"
    text = "the model ends a turn with <|im_end|> and pads with <|endoftext|> here"
    src.write_text(json.dumps({"text": text}) + "\n")
    d = pipeline.data_config()
    d.sources, d.tokenizer, d.shuffle = str(src), hf_dir, False
    batch = next(pipeline.make_pretrain_iterator(d, seq_len=96, global_batch=1, seed=0,
                                                 process_index=0, process_count=1))  # fmt: skip
    ids = [int(i) for i in np.concatenate([batch["tokens"][0][:1], batch["targets"][0]])]
    tok = pipeline.open_tokenizer(hf_dir)
    n = len(text.encode()) + 1  # every byte one id (no merges), then the EOS ending the document
    assert ids[n - 1] == EOS and not {EOS, PAD} & set(ids[: n - 1])
    assert tok.decode(ids[: n - 1]) == text
    assert EOS in tok.encode(text) and PAD in tok.encode(text)  # (a chat template's specials)


def test_preprocess_writes_token_shards_with_an_hf_tokenizer(hf_dir, tmp_path):
    root = os.path.dirname(hf_dir)
    out = tmp_path / "data"
    preprocess.main(["--input", os.path.join(root, "train.jsonl"), "--output", str(out),
                     f"--config.tokenizer={hf_dir}", "--config.do_clean=False",
                     "--config.dedup.near=False", "--config.dedup.exact=False"])  # fmt: skip
    meta = json.loads((out / "tokens" / "meta.json").read_text())
    assert meta["tokenizer"] == "../tokenizer.json"
    tok = pipeline.open_tokenizer(hf_dir)
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["vocab_size"] == 259
    assert (out / "tokenizer_config.json").exists()  # (its EOS: how the loader frames)
    # pretraining on the shards from the checkpoint: the same rows as on the raw text
    on_shards = _config(hf_dir, **{"data.sources": str(out / "tokens")})
    shards = pretrain.make_batches(on_shards, seed=0, vocab_size=264)  # (the shards' tokenizer)
    on_raw = _config(hf_dir)
    raw = pretrain.make_batches(on_raw, seed=0, vocab_size=264,
                                tokenizer=pretrain.source_tokenizer(on_raw))  # fmt: skip
    assert shards.tokenizer.sha256 == tok.sha256
    for _ in range(3):
        a, b = next(shards), next(raw)
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    # a special token's string in a document is text in the shards too (Beam tokenizes alike)
    src = tmp_path / "special.jsonl"
    text = "a document that mentions <|im_end|> and <|endoftext|> in its text"
    src.write_text(json.dumps({"text": text}) + "\n")
    out2 = tmp_path / "special"
    preprocess.main(["--input", str(src), "--output", str(out2), f"--config.tokenizer={hf_dir}",
                     "--config.do_clean=False", "--config.dedup.near=False"])  # fmt: skip
    from flaxlm.data.sources import open_source

    ids = [int(i) for i in open_source(str(out2 / "tokens"))[0]]
    assert not {EOS, PAD} & set(ids) and tok.decode(ids) == text
    beam = pytest.importorskip("flaxlm.data.beam")
    out3 = tmp_path / "special_beam"
    beam.main(["--input", str(src), "--output", str(out3), f"--config.tokenizer={hf_dir}",
               "--config.do_clean=False", "--config.dedup.near=False", "--num_shards=1",
               "--runner=DirectRunner"])  # fmt: skip
    assert [int(i) for i in open_source(str(out3 / "tokens"))[0]] == ids


def test_shards_of_another_tokenizer_are_refused_with_an_hf_source(hf_dir, tmp_path):
    root = os.path.dirname(hf_dir)
    out = tmp_path / "data"
    preprocess.main(["--input", os.path.join(root, "train.jsonl"), "--output", str(out),
                     "--config.do_clean=False", "--config.dedup.near=False",
                     "--config.train_tokenizer_vocab=300"])  # fmt: skip
    c = _config(hf_dir, **{"data.sources": str(out / "tokens")})
    with pytest.raises(DataError, match=r"shards were tokenized with tokenizer sha256"):
        pretrain.make_batches(c, seed=0, vocab_size=264, tokenizer=pretrain.source_tokenizer(c))


def test_a_run_continued_from_an_hf_started_run_takes_its_tokenizer(hf_dir, tmp_path, caplog):
    first = str(tmp_path / "first")
    pretrain.run(_config(hf_dir, steps=2), first)
    c = _config(hf_dir, steps=2)
    with c.unlocked():
        c.init_from = first  # a flaxlm run: the model is config.model's, as before
        c.model = pretrain_config.get_config("variant=tiny").model
        for k, v in read_meta(first)[1]["model_config"].items():
            if k in c.model:
                c.model[k] = v
    second = str(tmp_path / "second")
    pretrain.run(c, second)  # (no data.tokenizer: it used to be "data.tokenizer is empty")
    assert read_meta(second)[1]["tokenizer"] == os.path.join(second, "tokenizer.json")
    # a data.tokenizer other than the source's: a warning naming both
    other = write_hf_tokenizer(str(tmp_path / "other"), "", {"eos_token": "<|endoftext|>"},
                               specials=SPECIALS[:1])  # fmt: skip
    with c.unlocked():
        c.data.tokenizer = other
    with caplog.at_level(logging.WARNING, logger="flaxlm"):
        tok = pretrain.source_tokenizer(c)
    assert tok.name == os.path.join(other, "tokenizer.json")
    assert "is not the tokenizer init_from=" in caplog.text


def _snapshot(out) -> dict:
    return {os.path.relpath(os.path.join(r, f), out): open(os.path.join(r, f), "rb").read()
            for r, _, files in os.walk(out) for f in files}  # fmt: skip


def test_an_overwrite_keeps_or_puts_back_the_hf_tokenizer_files(hf_dir, tmp_path):
    """preprocess --overwrite sets the earlier run aside whole — an HF tokenizer's settings
    files too — and puts it back when the new run fails; an overwrite that tokenizes with the
    output's own tokenizer.json keeps it and its settings."""
    root = os.path.dirname(hf_dir)
    out = tmp_path / "data"
    base = ["--input", os.path.join(root, "train.jsonl"), "--output", str(out),
            "--config.do_clean=False", "--config.dedup.near=False"]  # fmt: skip
    preprocess.main([*base, f"--config.tokenizer={hf_dir}"])
    earlier = _snapshot(out)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(earlier)
    with pytest.raises(SystemExit, match="survived"):  # a new run that keeps nothing
        preprocess.main([*base, "--overwrite", "--config.train_tokenizer_vocab=300",
                         "--config.dedup.exact=False", "--config.do_clean=True",
                         "--config.clean.max_words=3"])  # fmt: skip
    assert _snapshot(out) == earlier  # byte for byte
    preprocess.main([*base, "--overwrite", f"--config.tokenizer={out / 'tokenizer.json'}"])
    assert _snapshot(out)["tokenizer_config.json"] == earlier["tokenizer_config.json"]
    preprocess.main([*base, "--overwrite", "--config.train_tokenizer_vocab=300"])
    left = set(os.listdir(out))  # a SentencePiece run replaces the HF one: nothing stale
    assert "tokenizer.model" in left and not {"tokenizer.json", "tokenizer_config.json"} & left
    assert not [f for f in left if f.startswith(".")]


def test_the_set_aside_covers_every_file_an_hf_tokenizer_is_copied_with():
    from flaxlm.data import preprocess_aside
    from flaxlm.models import hf_tokenizer

    copied = {*hf_tokenizer._TOKENIZER_FILES, hf_tokenizer._NAMED_TEMPLATES_DIR}
    assert copied <= set(preprocess_aside.TOKENIZER_OUTPUTS) <= set(preprocess_aside.OUTPUTS)


def test_perplexity_encodes_documents_as_pretraining_does(hf_dir):
    """Evaluation's perplexity scores a document holding a special token's string over the ids
    pretraining trained on (the string as text), not over the special id."""
    from flaxlm.evaluation.loglik import LoglikScorer, perplexity

    cfg, params = hf.load_pretrained(hf_dir)
    tok = pipeline.open_tokenizer(hf_dir)
    scorer = LoglikScorer(cfg, params, pad_id=tok.pad_id)
    text = "the turn ends at <|im_end|> in the template"
    got = perplexity(scorer, tok, [text], bos=False, eos=False)
    # every byte an id (the first only context): "<|im_end|>" as the special id was one
    assert got["tokens"] == len(text.encode()) - 1


def test_a_checkpoint_without_a_tokenizer_needs_data_tokenizer(hf_dir, tmp_path):
    bare = tmp_path / "bare"  # weights and config.json only
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes(open(os.path.join(hf_dir, f), "rb").read())
    c = _config(str(bare))
    with pytest.raises(DataError, match=r"init_from=hf:.*bare: tokenizer: .*no tokenizer\.json"):
        pretrain.source_tokenizer(c)
    with c.unlocked():
        c.data.tokenizer = hf_dir  # named: taken, with nothing to compare it to
    assert pretrain.source_tokenizer(c).sha256 == pipeline.open_tokenizer(hf_dir).sha256


def test_a_continued_run_resumes_bitwise(hf_dir, tmp_path):
    """Killed after its step-3 save (the step-6 checkpoint gone), a run started from an HF
    checkpoint resumes from its own checkpoint to the weights of the uninterrupted run."""
    import shutil

    c = _config(hf_dir, steps=6, **{"ckpt_every": 3, "async_ckpt": False})
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    pretrain.run(c, straight)
    pretrain.run(c, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
    pretrain.run(c, resumed)
    assert read_meta(resumed)[0] == 6
    for run in (straight, resumed):
        hf.export_run(run, run + "-hf")
    _, a = hf.load_pretrained(straight + "-hf")
    _, b = hf.load_pretrained(resumed + "-hf")
    jax.tree.map(np.testing.assert_array_equal, a, b)
    _, start = hf.load_pretrained(hf_dir)
    assert not np.array_equal(a["embed"]["embedding"], start["embed"]["embedding"])  # it trained
