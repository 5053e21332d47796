"""Preprocess's ``split_languages``: one shard set per language, read alone or together.

What splitting must not change is checked against the same run unsplit: the union of the
languages' shards is the unsplit run's records, document for document. Each set holds only its
language's documents, the loader takes a weighted mix of sets (and their tokenizer from their
meta.json), Beam writes the same sets, and report.md's suggested weights follow the formula
``language_mix`` documents (recomputed here by hand).
"""

import json
import math
import string

import numpy as np
import pytest

from flaxlm.data import pipeline, preprocess, sources
from flaxlm.data.clean_stats import DocStats
from flaxlm.data.tokenizer import Tokenizer, train

STOPS = {
    "en": ["the", "of", "and", "to", "that", "with", "have", "be"],
    "fr": ["le", "la", "les", "et", "est", "que", "des", "pour"],
    "de": ["der", "die", "und", "das", "ist", "zu", "mit", "den"],
}


def latin_doc(rng, lang, n=90):
    letters = np.array(list(string.ascii_lowercase))
    words = ["".join(rng.choice(letters, rng.integers(3, 9))) for _ in range(n)]
    for i in range(0, n, 5):
        words[i] = STOPS[lang][i % 8]
    return " ".join(words).capitalize() + "."


def zh_doc(rng, n=150):
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 300)]
    chars = list(rng.choice(han, n))
    for i in range(0, n, 7):
        chars[i] = "的是在了和有"[i % 6]
    return "".join(chars) + "。"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """en 24, fr 9, de 4 (dropped unless kept), zh 6 documents, plus an exact duplicate."""
    d = tmp_path_factory.mktemp("langs")
    rng = np.random.default_rng(0)
    docs = {"en": [latin_doc(rng, "en") for _ in range(24)],
            "fr": [latin_doc(rng, "fr") for _ in range(9)],
            "de": [latin_doc(rng, "de") for _ in range(4)],
            "zh": [zh_doc(rng) for _ in range(6)]}  # fmt: skip
    rows = [t for lang in ("en", "fr", "de", "zh") for t in docs[lang]]
    rows.append(docs["fr"][0])  # an exact duplicate: removed by dedup, not written twice
    order = rng.permutation(len(rows))
    path = d / "in.jsonl"
    path.write_text(
        "".join(json.dumps({"text": rows[i]}, ensure_ascii=False) + "\n" for i in order)
    )
    tok = str(d / "tok.model")
    train([t for v in docs.values() for t in v], 600, model_path=tok)
    return str(path), docs, tok


def _run(tmp_path, name, inp, *over):
    return preprocess.main(["--input", inp, "--output", str(tmp_path / name), *over])


def _records(path):
    src = sources.open_source(str(path))
    return sorted(src[i].tobytes() for i in range(len(src)))


def test_split_sets_are_the_unsplit_output_by_language(tmp_path, corpus):
    inp, docs, tok = corpus
    over = [f"--config.tokenizer={tok}", "--config.clean.languages=en,fr,zh"]
    ref = _run(tmp_path, "flat", inp, *over)
    got = _run(tmp_path, "split", inp, *over, "--config.split_languages=True")
    out = tmp_path / "split"

    assert sorted(p.name for p in (out / "tokens").iterdir()) == ["en", "fr", "zh"]
    assert got["split_languages"] == {
        "en": {"documents": 24, "tokens": got["split_languages"]["en"]["tokens"]},
        "fr": {"documents": 9, "tokens": got["split_languages"]["fr"]["tokens"]},
        "zh": {"documents": 6, "tokens": got["split_languages"]["zh"]["tokens"]},
    }
    assert sum(v["tokens"] for v in got["split_languages"].values()) == got["tokens"]
    assert (got["documents_out"], got["tokens"], got["removed"]) == (
        ref["documents_out"], ref["tokens"], ref["removed"])  # fmt: skip
    assert got["removed"] == {"language": 4, "exact_duplicate": 1}
    # The union of the sets is the unsplit output; the directory reads as all of them
    parts = [_records(out / "tokens" / lang) for lang in ("en", "fr", "zh")]
    assert sorted(r for p in parts for r in p) == _records(tmp_path / "flat" / "tokens")
    assert _records(out) == _records(out / "tokens") == _records(tmp_path / "flat")
    # Each set holds its language's documents only
    sp = Tokenizer.load(tok)
    for lang, recs in zip(("en", "fr", "zh"), parts):
        texts = [sp.decode(np.frombuffer(r, np.int32).tolist()) for r in recs]
        assert sorted(texts) == sorted(set(docs[lang])), lang
        assert {DocStats(t).language for t in texts} == {lang}
    for lang in ("en", "fr", "zh"):  # meta.json one level further down than the unsplit one
        meta = json.loads((out / "tokens" / lang / "meta.json").read_text())
        assert meta["tokenizer"] == "../../tokenizer.model" and meta["format"] == "tokens"
    assert all(s.startswith("tokens/") and s.count("/") == 2 for s in got["shards"])


def test_the_loader_mixes_sets_and_finds_their_tokenizer(tmp_path, corpus):
    inp, _, tok = corpus
    _run(tmp_path, "split", inp, f"--config.tokenizer={tok}", "--config.clean.languages=en,fr",
         "--config.split_languages=True")  # fmt: skip
    out = tmp_path / "split"
    cfg = pipeline.data_config()
    cfg.sources = f"{out}/tokens/en:0.5,{out}/tokens/fr:0.5"
    loaded = pipeline.load_tokenizer(cfg)
    assert loaded.sha256 == Tokenizer.load(tok).sha256
    it = pipeline.make_pretrain_iterator(
        cfg, seq_len=64, global_batch=4, seed=0, process_index=0, process_count=1, tokenizer=loaded
    )
    batch = next(iter(it))
    assert batch["tokens"].shape == (4, 64) and batch["loss_mask"].sum() > 0


def test_report_weights_follow_the_temperature_formula(tmp_path, corpus):
    inp, _, tok = corpus
    rep = _run(tmp_path, "split", inp, f"--config.tokenizer={tok}",
               "--config.clean.languages=en,fr,zh", "--config.split_languages=True")  # fmt: skip
    langs = rep["split_languages"]
    total = sum(v["tokens"] for v in langs.values())
    p = {k: v["tokens"] ** 0.3 for k, v in langs.items()}
    w = {k: p[k] / sum(p.values()) / (v["tokens"] / v["documents"]) for k, v in langs.items()}
    mix = preprocess.language_mix(langs, 0.3)
    for k, v in langs.items():
        assert mix[k]["token_share"] == pytest.approx(v["tokens"] / total)
        assert mix[k]["sampled_share"] == pytest.approx(p[k] / sum(p.values()))
        assert mix[k]["weight"] == pytest.approx(w[k] / sum(w.values()))
    # Sampling documents by these weights gives the sampled token shares
    tok_rate = {k: mix[k]["weight"] * v["tokens"] / v["documents"] for k, v in langs.items()}
    for k in langs:
        assert tok_rate[k] / sum(tok_rate.values()) == pytest.approx(mix[k]["sampled_share"])
    # alpha 1 is the corpus's own mix (weights ∝ documents), alpha 0 every language equally
    own = preprocess.language_mix(langs, 1.0)
    n = sum(v["documents"] for v in langs.values())
    assert all(math.isclose(own[k]["weight"], langs[k]["documents"] / n) for k in langs)
    flat = preprocess.language_mix(langs, 0.0)
    assert all(math.isclose(flat[k]["sampled_share"], 1 / 3) for k in langs)
    md = (tmp_path / "split" / "report.md").read_text()
    assert "| tokens/en | 24 |" in md and "| tokens/zh | 6 |" in md
    spec = ",".join(f"{tmp_path}/split/tokens/{k}:{mix[k]['weight']:.4g}" for k in sorted(mix))
    assert f"--config.data.sources={spec}" in md
    assert len(pipeline.parse_sources(spec)) == 3


def test_trained_tokenizer_and_unjudged_documents(tmp_path, corpus):
    """The two-pass run (a tokenizer trained on the sample) tokenizes each language's text
    set into its token set; ``do_clean=False`` names languages as the cleaner would."""
    inp, docs, _ = corpus
    got = _run(tmp_path, "trained", inp, "--config.train_tokenizer_vocab=700",
               "--config.clean.languages=en,fr,zh", "--config.split_languages=True")  # fmt: skip
    out = tmp_path / "trained"
    assert sorted(p.name for p in (out / "text").iterdir()) == ["en", "fr", "zh"]
    assert sorted(p.name for p in (out / "tokens").iterdir()) == ["en", "fr", "zh"]
    sp = Tokenizer.load(str(out / "tokenizer.model"))
    for lang in ("en", "fr", "zh"):
        ids = _records(out / "tokens" / lang)
        texts = [sp.decode(np.frombuffer(r, np.int32).tolist()) for r in ids]
        assert sorted(texts) == sorted(set(docs[lang]))
        assert got["split_languages"][lang]["tokens"] == sum(len(r) // 4 for r in ids)

    raw = _run(tmp_path, "raw", inp, "--config.do_clean=False", "--config.split_languages=True")
    assert {k: v["documents"] for k, v in raw["split_languages"].items()} == {
        "en": 24, "fr": 9, "de": 4, "zh": 6}  # fmt: skip
    assert raw["split_languages"]["de"]["tokens"] == 0  # (text shards: no tokenizer)
    assert "## Languages" in (tmp_path / "raw" / "report.md").read_text()


def test_an_earlier_unsplit_runs_shards_are_refused(tmp_path, corpus):
    """Left in out/tokens, an interrupted unsplit run's shards would be what reading the
    directory finds (its own files), not the languages: refused, naming them."""
    inp, _, tok = corpus
    stale = tmp_path / "out" / "tokens"
    stale.mkdir(parents=True)
    (stale / "shard-00000.arrayrecord").write_bytes(b"")
    cfg = preprocess.preprocess_config()
    cfg.tokenizer, cfg.split_languages = tok, True
    # (the CLI refuses the folder before this, "already holds a preprocess run"; run() is the
    # API notebooks call)
    with pytest.raises(sources.DataError, match="shard-00000.arrayrecord from an earlier"):
        preprocess.run([inp], str(tmp_path / "out"), cfg)


def test_a_directory_of_files_and_sets_reads_only_its_files(tmp_path):
    """Only a directory of nothing but shard sets stands for them: one with files of its own
    is its files, as before (its subdirectories are not read)."""
    d = tmp_path / "d"
    (d / "en").mkdir(parents=True)
    (d / "en" / "meta.json").write_text("{}")
    (d / "a.jsonl").write_text('{"text": "x"}\n')
    assert sources.shard_set_dirs(str(d)) == [str(d)]
    assert sources.expand_paths(str(d)) == [str(d / "a.jsonl")]
    (d / "a.jsonl").unlink()
    (d / "notes").mkdir()  # a subdirectory that is not a shard set
    assert sources.shard_set_dirs(str(d)) == [str(d)]
    (d / "notes").rmdir()
    assert sources.shard_set_dirs(str(d)) == [str(d / "en")]


def test_beam_writes_the_same_sets(tmp_path, corpus):
    beam_mod = pytest.importorskip("flaxlm.data.beam")
    inp, _, tok = corpus
    over = [f"--config.tokenizer={tok}", "--config.clean.languages=en,fr,zh",
            "--config.split_languages=True"]  # fmt: skip
    ref = _run(tmp_path, "cli", inp, *over)
    got = beam_mod.main(["--input", inp, "--output", str(tmp_path / "beam"), *over,
                         "--num_shards=2", "--runner=DirectRunner"])  # fmt: skip
    assert got["split_languages"] == ref["split_languages"]
    for lang in ("en", "fr", "zh"):
        assert _records(tmp_path / "beam" / "tokens" / lang) == _records(
            tmp_path / "cli" / "tokens" / lang)  # fmt: skip
        meta = json.loads((tmp_path / "beam" / "tokens" / lang / "meta.json").read_text())
        assert meta["tokenizer"] == "../../tokenizer.model"
    assert (
        len(got["shards"]) == 6 and got["shards"][0] == "tokens/en/shard-00000-of-00002.arrayrecord"
    )
    assert "## Languages" in (tmp_path / "beam" / "report.md").read_text()


def test_sample_counts_take_languages_by_temperature():
    # by hand: weights 1000^.3, 50^.3, 10^.3 want (120.6, 49.1, 30.3) of 200: zh has 10, so
    # 190 go to en and fr, (135.1, 54.9): fr has 50, so en takes the other 140
    assert preprocess.sample_counts({"en": 1000, "fr": 50, "zh": 10}, 200, 0.3) == {
        "en": 140, "fr": 50, "zh": 10}  # fmt: skip
    assert preprocess.sample_counts({"en": 300, "fr": 100}, 100, 1.0) == {"en": 75, "fr": 25}
    assert preprocess.sample_counts({"en": 300, "fr": 100}, 100, 0.0) == {"en": 50, "fr": 50}
    assert preprocess.sample_counts({"en": 3, "fr": 2}, 100, 0.3) == {"en": 3, "fr": 2}
    rng = np.random.default_rng(0)
    for _ in range(200):  # never more than a language has, and min(size, documents) in all
        seen = {f"l{i}": int(n) for i, n in enumerate(rng.integers(0, 500, rng.integers(1, 6)))}
        size, alpha = int(rng.integers(1, 400)), float(rng.uniform(0, 1))
        got = preprocess.sample_counts(seen, size, alpha)
        assert sum(got.values()) == min(size, sum(seen.values()))
        assert all(0 < got[k] <= min(seen[k], size) for k in got)


def test_the_tokenizer_sample_balances_languages(tmp_path, corpus):
    inp, _, _ = corpus
    common = ["--config.train_tokenizer_vocab=700", "--config.clean.languages=en,fr,zh",
              "--config.tokenizer_sample_docs=12"]  # fmt: skip
    got = _run(tmp_path, "flat", inp, *common, "--config.tokenizer_language_alpha=0")
    # 12 documents, 4 a language (α = 0: every language alike; each has more than 4)
    assert got["tokenizer_sample"] == {"en": 4, "fr": 4, "zh": 4}
    assert "drawn per language: en 4, fr 4, zh 4" in (tmp_path / "flat" / "report.md").read_text()
    own = _run(tmp_path, "own", inp, *common)  # α = 1: one reservoir, as before
    assert "tokenizer_sample" not in own
    with pytest.raises(SystemExit, match=r"tokenizer_language_alpha must be a number in \[0, 1\]"):
        _run(tmp_path, "bad", inp, *common, "--config.tokenizer_language_alpha=1.5")
