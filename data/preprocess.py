"""Preprocess CLI: raw text → clean → dedup → tokenize → ArrayRecord shards + report.

    python -m flaxlm.data.preprocess --input 'raw/*.jsonl' more.parquet --output out/ \\
        [--config my_cfg.py] [--config.clean.min_words=20] [--config.tokenizer=tok.model]

``--config.tokenizer``: a SentencePiece .model, or an HF tokenizer.json / HF directory (the
tokenizer of a checkpoint to continue pretraining; a special token's string in a document is
encoded as text).

Inputs: jsonl, plain text (either may be .gz / .zst compressed), parquet, Arrow IPC files
(.arrow / .feather: HF ``datasets``' save_to_disk and cache files) (data/sources.py); a .json
file is JSON lines or one JSON array of records (read whole). WARC files (.warc, .warc.gz,
Common Crawl's .warc.wet.gz; data/source_warc.py): WET text records and the main text of HTML
pages, each with its URL (clean.blocked_domains needs no url_field for them).

Output layout::

    out/tokens/shard-00000.arrayrecord ... + meta.json   int32 ids (when there is a tokenizer)
    out/text/shard-00000.arrayrecord ...   + meta.json   cleaned text (no tokenizer, or training)
    out/tokenizer.model                                   the tokenizer the ids belong to (HF:
                                                          tokenizer.json + its settings files)
    out/report.json, out/report.md                        documents in/out per stage and reason,
                                                          the tokenizer's vocab_size, what the
                                                          decontamination eval set gave

The loader reads ``out/tokens`` directly (``--config.data.sources=out/tokens``).

``--config.split_languages=True`` writes one shard set per language instead (``out/tokens/en/``,
``out/tokens/fr/``, ... and ``und/`` for text of no language the cleaner knows, each with its
``meta.json``; the text shards likewise), by the language the cleaner judged each document by.
``data.sources=out/tokens/en:0.7,out/tokens/fr:0.3`` weights them; ``out`` or ``out/tokens``
reads them all. report.md gives each language's documents and tokens and the weights of a
temperature-sampled mix (``language_mix``). One tokenizer serves every language; its training
sample is drawn in the corpus's own proportions, or with ``tokenizer_language_alpha < 1`` each
language ∝ its documents^alpha (``TokenizerSample``; split or not).

It streams: documents flow through in batches of ``batch_docs``, so memory holds one batch of text
plus the dedup tables (~90 bytes per document, not text: ``Deduper``). With
``train_tokenizer_vocab > 0`` and no tokenizer, the first pass writes cleaned text shards and keeps
a reservoir sample to train SentencePiece on; a second pass tokenizes the text shards. The sample
is bounded in documents (``tokenizer_sample_docs``), not bytes: its text stays in memory (~0.5 GB
for 200k documents of 2.4 KB), and SentencePiece training on it took another ~1.3 GB (peak RSS
2.4 GB for 1 GB / 440k documents on 2 cores, 28 min with ``workers=1``). A corpus too small for
``train_tokenizer_vocab`` pieces gets fewer (a warning; report.md's vocab_size is the one to
train with). ``workers > 1`` cleans
in a process pool (order is preserved; dedup and writing stay in this process because they are
sequential, so dedup's ~0.6 ms per document bounds the rate whatever the workers).

Every document read ends up either in the output or in exactly one "removed" reason:
``documents_in == documents_out + sum(removed)`` is checked before the report is written. Each
stage reports its own in/out (``do_clean=False``: the clean stage passes every document through),
and ``flaxlm.data.beam`` writes the same report for the same input.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import multiprocessing as mp
import os
import random
import runpy
import sys
import time

import ml_collections
import numpy as np

from flaxlm.data import preprocess_aside as aside_mod
from flaxlm.data import sources as S
from flaxlm.data.benchmark_texts import load_benchmarks
from flaxlm.data.clean import (
    Cleaner,
    clean_config,
    normalize_text,
    redact_pii,
    strip_boilerplate,
)
from flaxlm.data.clean_stats import DocStats
from flaxlm.data.clean_url import load_domain_list
from flaxlm.data.clean_wordlist import load_word_list
from flaxlm.data.dedup import Deduper, dedup_config
from flaxlm.data.quality import QualityFilter, quality_config
from flaxlm.data.quality import check_config as check_quality
from flaxlm.data.quality_classifier import ClassifierError, load_classifier, report_lines
from flaxlm.data.source_readers import check_txt_mode
from flaxlm.data.tokenizer import Tokenizer, fixed_pieces, open_tokenizer, text_encoder, train

logger = logging.getLogger("flaxlm")  # (`log` is each run's BadInputLog)


def preprocess_config() -> ml_collections.ConfigDict:
    """Defaults for the CLI (``--config FILE.py`` returns one from ``get_config()``)."""
    c = ml_collections.ConfigDict()
    c.text_field = "text"  # jsonl/parquet/Arrow field holding the document
    # jsonl/parquet/Arrow field holding its URL ("url"; "" = none): clean.blocked_domains reads it
    # (WARC/WET records always carry theirs, WARC-Target-URI: not needed for them)
    c.url_field = ""
    c.txt_mode = "file"  # plain text: one document per "file", "line" or "blank"-separated block
    c.strict = False  # True: the first bad record raises with file:line
    c.clean = clean_config()  # quality filters + PII (see flaxlm.data.clean)
    c.do_clean = True  # False: skip the filters (dedup/tokenize only)
    c.dedup = dedup_config()  # exact/near dedup + decontamination (see flaxlm.data.dedup)
    # a reference model's perplexity filter after dedup (see flaxlm.data.quality; off: no model)
    c.quality = quality_config()
    c.tokenizer = ""  # SentencePiece .model to tokenize with; "" = train one or write text only
    c.train_tokenizer_vocab = 0  # > 0 and no tokenizer: train a tokenizer of this size
    c.tokenizer_model_type = "bpe"  # "bpe" or "unigram" when training
    c.tokenizer_sample_docs = 200_000  # reservoir sample (documents) to train the tokenizer on
    # < 1: the sample draws each language's documents ∝ its document count^alpha (one reservoir
    # per language, each up to tokenizer_sample_docs), so a small language gets pieces of its
    # own (mT5 sampled its SentencePiece corpus at 0.3); 1: the corpus's own mix, one reservoir
    c.tokenizer_language_alpha = 1.0
    c.shard_docs = 100_000  # documents per ArrayRecord shard
    # True: one shard set per language the cleaner names (out/tokens/en/, out/tokens/fr/, ...,
    # "und" for text of no language it knows), to weight languages in data.sources; report.md
    # gives each one's documents and tokens and a temperature-sampled mix (language_mix)
    c.split_languages = False
    c.batch_docs = 512  # documents per processing batch (memory is bounded by one batch)
    c.workers = 1  # processes for cleaning
    c.seed = 0  # seed of the tokenizer's samples: documents (reservoir), then their lines
    return c


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a python config file; a file without one is an error naming it."""
    get = runpy.run_path(path).get("get_config")
    if not callable(get):
        raise SystemExit(f"--config {path}: defines no get_config()")
    return get()


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """``--config.a.b=v`` → ``cfg.a.b = v`` typed like the default; unknown keys are errors."""
    for ov in overrides:
        if not ov.startswith("--config.") or "=" not in ov:
            raise SystemExit(f"unrecognised argument {ov!r} (expected --config.KEY=VALUE)")
        key, raw = ov[len("--config.") :].split("=", 1)
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            if p not in node:
                raise SystemExit(f"unknown config key {key!r}")
            node = node[p]
        if leaf not in node:
            raise SystemExit(f"unknown config key {key!r}")
        old = node[leaf]
        if isinstance(old, str):
            val = raw
        elif isinstance(old, tuple):
            val = _tuple_value(key, raw)
        elif isinstance(old, bool):
            if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise SystemExit(f"config key {key!r}: expected a boolean, got {raw!r}")
            val = raw.lower() in ("1", "true", "yes")
        else:
            try:
                val = ast.literal_eval(raw)
                # An int key takes whole numbers only: int(1.5) and int(True) silently gave 1.
                if isinstance(old, int) and (
                    isinstance(val, bool) or not isinstance(val, (int, float)) or val != int(val)
                ):
                    raise ValueError
                val = type(old)(val) if isinstance(old, (int, float)) else val
            except (ValueError, TypeError, SyntaxError, OverflowError):
                raise SystemExit(
                    f"config key {key!r}: cannot read {raw!r} as {type(old).__name__}"
                ) from None
        node[leaf] = val


def _tuple_value(key: str, raw: str) -> tuple:
    """A tuple key's value: a Python literal ("('en', 'fr')", "(0.2, 0.1)", "()"), or bare
    comma-separated words ("en,fr"); one value is a tuple of one ("fr" and "'fr'" are ('fr',),
    where tuple('fr') was ('f', 'r'))."""
    try:
        val = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        words = [w.strip() for w in raw.split(",")]
        if not all(w and w.replace("_", "").replace("-", "").isalnum() for w in words):
            raise SystemExit(f"config key {key!r}: cannot read {raw!r} as tuple") from None
        return tuple(words)
    return tuple(val) if isinstance(val, (tuple, list)) else (val,)


class ShardWriter:
    """Writes records into numbered ArrayRecord shards plus a ``meta.json`` describing them."""

    def __init__(self, out_dir: str, per_shard: int, meta: dict):
        from array_record.python.array_record_module import ArrayRecordWriter

        self._cls, self.dir, self.per_shard = ArrayRecordWriter, out_dir, per_shard
        os.makedirs(out_dir, exist_ok=True)
        stale = sorted(f for f in os.listdir(out_dir) if f.endswith(".arrayrecord"))
        if stale:  # new shards would mix with (or overwrite only some of) an earlier run's
            raise S.DataError(
                f"{out_dir} already holds {len(stale)} shard(s) ({stale[0]}, ...) from an "
                "earlier (possibly interrupted) run; remove them first (preprocess: --overwrite)"
            )
        with open(os.path.join(out_dir, S.META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        self.paths: list[str] = []
        self._w, self._n = None, 0

    def write(self, record: bytes) -> None:
        if self._w is None or self._n == self.per_shard:
            self._close_current()
            self.paths.append(os.path.join(self.dir, f"shard-{len(self.paths):05d}.arrayrecord"))
            self._w, self._n = self._cls(self.paths[-1], "group_size:1"), 0
        self._w.write(record)
        self._n += 1

    def _close_current(self):
        if self._w is not None:
            self._w.close()

    def close(self) -> list[str]:
        self._close_current()
        self._w = None
        return self.paths


class TokenizerSample:
    """The documents the tokenizer trains on: a uniform reservoir sample (Algorithm R, bounded
    by ``size`` documents) of every document written; with ``alpha < 1`` one reservoir per
    language, drawn from at the end in proportion to each language's documents^alpha
    (``sample_counts``). ``composition``: {language: documents drawn} once drawn that way."""

    def __init__(self, size: int, alpha: float, seed: int):
        self.size, self.alpha, self.rng = size, alpha, random.Random(seed)
        self.pools: dict[str, list[str]] = {}
        self.seen: dict[str, int] = {}
        self.composition: dict[str, int] = {}

    def add(self, text: str, language: str | None) -> None:
        key = (language or "und") if self.alpha != 1 else ""
        n = self.seen[key] = self.seen.get(key, 0) + 1
        pool = self.pools.setdefault(key, [])
        if len(pool) < self.size:
            pool.append(text)
        elif (j := self.rng.randrange(n)) < self.size:
            pool[j] = text

    def documents(self) -> list[str]:
        if self.alpha == 1:
            return self.pools.get("", [])
        self.composition = sample_counts(self.seen, self.size, self.alpha)
        return [t for k in sorted(self.composition)
                for t in self.rng.sample(self.pools[k], self.composition[k])]  # fmt: skip


def sample_counts(seen: dict[str, int], size: int, alpha: float) -> dict[str, int]:
    """How many documents of each language a sample of ``size`` takes when languages are drawn
    ∝ documents^alpha: ``min(size, documents)`` in all, none more than a language has (nor than
    its reservoir of ``size`` holds; what a capped language cannot give goes to the others in
    the same proportions), rounded by largest remainder so they add up."""
    free = {k: min(n, size) for k, n in seen.items() if n > 0}
    left = min(size, sum(seen.values()))
    counts: dict[str, int] = {}
    while free and left > 0:
        weight = {k: seen[k] ** alpha for k in free}
        norm = sum(weight.values())
        want = {k: left * weight[k] / norm for k in free}
        capped = [k for k in free if want[k] >= free[k]]
        if capped:
            for k in capped:
                counts[k] = free.pop(k)
                left -= counts[k]
            continue
        floors = {k: int(want[k]) for k in free}
        extra = sorted(free, key=lambda k: (floors[k] - want[k], k))[: left - sum(floors.values())]
        counts.update({k: floors[k] + (k in extra) for k in free})
        break
    return {k: v for k, v in sorted(counts.items()) if v}


class ShardSets:
    """The output's shards: one set in ``root`` (``out/tokens``, ``out/text``), or with
    ``split_languages`` one set per language in ``root/<language>/``, each opened at the
    language's first document (a language no document has gets no directory). Counts the
    documents and tokens written per language.

    Each language's set is a complete shard directory with its own ``meta.json`` (its
    ``tokenizer`` path one level further up), so ``data.sources=out/tokens/fr`` reads one
    language and ``out/tokens`` (or ``out``) all of them (``source_paths.expand_paths``).
    """

    def __init__(self, root: str, per_shard: int, meta: dict, split: bool):
        self.root, self.per_shard, self.split = root, per_shard, split
        self.documents: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self._writers: dict[str, ShardWriter] = {}
        if not split:
            self.set_meta = meta
            self._writers[""] = ShardWriter(root, per_shard, meta)
            return
        # each language's meta.json: its tokenizer path is one level further up
        self.set_meta = (
            {**meta, "tokenizer": "../" + meta["tokenizer"]} if "tokenizer" in meta else meta
        )
        os.makedirs(root, exist_ok=True)
        # An earlier (interrupted) unsplit run's shards here would be what reading `root` finds
        # (a directory's own files come before its subdirectories'), not the languages.
        stale = sorted(
            f for f in os.listdir(root) if f.endswith(".arrayrecord") or f == S.META_FILE
        )
        if stale:
            raise S.DataError(
                f"{root} already holds {stale[0]} from an earlier (possibly interrupted) run; "
                "remove it first (preprocess: --overwrite)"
            )

    def write(self, record: bytes, language: str | None, tokens: int = 0) -> None:
        key = (language or "und") if self.split else ""
        w = self._writers.get(key)
        if w is None:
            w = self._writers[key] = ShardWriter(os.path.join(self.root, key), self.per_shard,
                                                 self.set_meta)  # fmt: skip
        w.write(record)
        lang = language or "und"
        self.documents[lang] = self.documents.get(lang, 0) + 1
        self.tokens[lang] = self.tokens.get(lang, 0) + tokens

    def languages(self) -> list[str]:
        """The languages written, sorted (split output only)."""
        return sorted(k for k in self._writers if k)

    def close(self) -> list[str]:
        return [p for k in sorted(self._writers) for p in self._writers[k].close()]


def language_mix(languages: dict, alpha: float = 0.3) -> dict[str, dict]:
    """Weights for ``data.sources`` that sample each language's tokens in proportion to its
    token count to the power ``alpha`` (temperature sampling: 1 is the corpus's own mix, 0 every
    language equally; 0.3 is what mT5 and XLM-R chose, raising small languages without
    repeating them as often as a uniform mix would).

    ``languages``: report.json's ``split_languages`` ({language: {"documents", "tokens"}}).
    Returns {language: {"token_share", "sampled_share", "weight"}}. grain mixes sources by
    documents, not tokens (data/pipeline.py), so a language's weight is its sampled token share
    divided by its mean document length, scaled to sum to 1. Languages with no tokens are left
    out (text output has none)."""
    langs = {k: v for k, v in languages.items() if v.get("tokens", 0) > 0 and v["documents"] > 0}
    total = sum(v["tokens"] for v in langs.values())
    powered = {k: v["tokens"] ** alpha for k, v in langs.items()}
    norm = sum(powered.values())
    raw = {k: powered[k] / norm * v["documents"] / v["tokens"] for k, v in langs.items()}
    raw_sum = sum(raw.values())
    return {
        k: {
            "token_share": v["tokens"] / total,
            "sampled_share": powered[k] / norm,
            "weight": raw[k] / raw_sum,
        }
        for k, v in langs.items()
    }


def document_language(text: str) -> str:
    """A document's language as the cleaner names it (``DocStats.language``), for
    ``split_languages`` when ``do_clean=False`` passes documents through unjudged."""
    return DocStats(normalize_text(text)).language


def decontam_paths(cfg: ml_collections.ConfigDict) -> list[str]:
    """The patterns of ``dedup.decontam_paths`` (comma-separated files, globs or directories),
    spaces around a comma ignored ("eval.jsonl, eval2.jsonl" looked for " eval2.jsonl"). One
    that matches nothing is a ``FileNotFoundError`` naming the key."""
    patterns = [p for p in (p.strip() for p in cfg.dedup.decontam_paths.split(",")) if p]
    try:
        S.expand_paths(patterns)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"dedup.decontam_paths: {e}") from None
    return patterns


def load_eval_texts(cfg: ml_collections.ConfigDict) -> list[str | tuple[str, ...]]:
    """The decontamination texts, in the form training text has when it reaches dedup.

    Training text is cleaned first, PII included: an eval item holding an IP address or a phone
    number appears in a training document as "... <IP> ... <PHONE> ...", so the eval side gets the
    same normalisation and placeholders, or no n-gram spanning them could ever match. Likewise
    the lines the cleaner strips (separator lines such as "***", banners, footers): an eval
    item holding one was never found in a training document that held the item, since the
    n-grams spanning that line were in the eval text only. Whether a line is boilerplate depends
    on its context, though, so an item that loses lines that way is a tuple of both forms, the
    stripped one first (``_with_stripped``; ``Decontaminator`` looks for the n-grams of
    either). The steps run in ``Cleaner``'s order.

    An eval record that cannot be read (malformed JSON, no text field, invalid UTF-8) is a
    ``DataError`` naming file:line, whatever ``strict`` says for the training input: skipped, as
    the reader's default log did without a word, its n-grams were left out of decontamination.
    Empty eval texts are skipped (they hold no n-gram).
    """
    paths = decontam_paths(cfg)
    if not paths:
        return []
    log = S.BadInputLog()
    txt_mode = check_txt_mode(cfg.dedup.decontam_txt_mode, "dedup.decontam_txt_mode")
    docs = S.iter_documents(paths, text_field=cfg.dedup.decontam_field, txt_mode=txt_mode,
                            log=log)  # fmt: skip
    texts = [d.text for d in docs]
    lost = {k: v for k, v in log.counts.items() if k != "empty"}
    if lost:
        first = next(e for k in lost for e in log.examples[k])
        raise S.DataError(
            f"{first}: {sum(lost.values())} decontamination record(s) unreadable ({lost}); "
            "fix them or remove them from dedup.decontam_paths"
        )
    return clean_eval_texts(cfg, texts)


def load_eval_sets(cfg: ml_collections.ConfigDict) -> list | dict | None:
    """What decontamination checks documents against: None when neither
    ``dedup.decontam_paths`` nor ``dedup.decontam_benchmarks`` is set (no decontamination, no
    report entry); ``load_eval_texts`` alone (a list: one set, the report as before) without
    benchmarks; else {set: texts}, one set per benchmark (data/benchmark_texts.py) and
    "decontam_paths" for the files, so the report counts the documents each set matched. The
    benchmarks' texts are cleaned as the files' are (``clean_eval_texts``). A benchmark that
    cannot be read is a ValueError naming ``dedup.decontam_benchmarks``."""
    benches = load_benchmarks(cfg.dedup.get("decontam_benchmarks", ""),
                              "dedup.decontam_benchmarks")  # fmt: skip
    files = load_eval_texts(cfg) if decontam_paths(cfg) else None
    if not benches:
        return files
    sets = {"decontam_paths": files} if files is not None else {}
    return {**sets, **{name: clean_eval_texts(cfg, t) for name, t in benches.items()}}


def clean_eval_texts(cfg: ml_collections.ConfigDict, texts: list[str]) -> list:
    """Eval texts in the form training text has when it reaches dedup (``load_eval_texts``
    says why): normalised, each with its boilerplate-stripped form, PII replaced by the
    placeholders, as ``cfg``'s cleaning does to documents; as they are without cleaning."""
    if cfg.do_clean:
        texts = [normalize_text(t) for t in texts]
        if cfg.clean.strip_boilerplate_lines:
            texts = [_with_stripped(t) for t in texts]
        if cfg.clean.redact_pii:
            texts = [
                redact_pii(t)[0] if isinstance(t, str) else tuple(redact_pii(f)[0] for f in t)
                for t in texts
            ]
    return texts


def _with_stripped(text: str) -> str | tuple[str, ...]:
    """An eval text, and its form with the lines ``strip_boilerplate`` strips, when they differ.

    Whether a line is stripped depends on its context (a phrase such as "privacy policy" only
    on a short line), and an eval item's lines are not those of the training document that
    quotes it: a one-line quiz question naming a privacy policy was stripped to nothing, and
    the document holding it inside a paragraph was kept. Both forms' n-grams are looked for
    (``Decontaminator``); the stripped one finds a document that lost the item's lines too.
    """
    stripped = strip_boilerplate(text)[0]
    forms = tuple(f for f in (stripped, text) if f)
    return forms if stripped != text and len(forms) > 1 else text


def _clean_batch(args):
    """(the cleaned texts or None, their languages, the batch's Cleaner with its counts)."""
    cfg, batch = args
    c = Cleaner(cfg)
    texts, langs = zip(*(c.clean(d.text, d.loc, d.url) for d in batch)) if batch else ((), ())
    return list(texts), list(langs), c


def _batches(it, n):
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _stage(name, seconds, rep):
    return {"stage": name, "seconds": round(seconds, 3), **rep}


def check_settings(
    inputs: list[str], cfg: ml_collections.ConfigDict
) -> tuple[Cleaner, Deduper, Tokenizer | None]:
    """Everything that can be checked before the first pass, and the stages it builds: (the
    cleaner, the deduper with its decontamination texts, the tokenizer or None).

    An input pattern that matches nothing, ``txt_mode``, ``shard_docs`` and ``batch_docs``, the
    cleaning and dedup settings (``Cleaner``, ``Deduper``) and the word lists, the
    decontamination files and benchmarks (each benchmark's files read), the tokenizer's path,
    a ``train_tokenizer_vocab`` too small to train, a ``tokenizer_model_type`` SentencePiece
    has not: ``main`` calls this before ``--overwrite`` sets the earlier output aside (a typo
    then lost it), ``run`` before it writes anything (output written first made the corrected
    rerun refuse, "already holds a preprocess run"; a misspelt model type failed after the
    whole clean/dedup pass). Every error but an unmatched input (``FileNotFoundError``) is a
    ``ValueError`` naming the key.
    """
    S.expand_paths(inputs)  # FileNotFoundError naming an unmatched pattern
    check_txt_mode(cfg.txt_mode)  # (found by the first plain-text file, after meta.json)
    # 0 put every document in one shard, or the whole corpus in one batch (memory: one batch)
    for key in ("shard_docs", "batch_docs"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise S.DataError(f"{key} must be an integer >= 1, got {value!r}")
    if cfg.tokenizer_model_type not in ("bpe", "unigram"):
        raise ValueError(
            f"tokenizer_model_type must be bpe|unigram, got {cfg.tokenizer_model_type!r}"
        )
    cleaner = Cleaner(cfg.clean)
    check_quality(cfg.quality)  # (the model itself is loaded by run)
    if cfg.do_clean and cfg.clean.toxic_lists:  # read at the first document that gets that far
        try:
            load_word_list(cfg.clean.toxic_lists)
        except OSError as e:
            raise S.DataError(_unreadable("clean.toxic_lists", e, cfg.clean.toxic_lists)) from None
    if cfg.do_clean and cfg.clean.blocked_domains:
        # (every document would pass unchecked, "no_url"; a WARC file's records name their URL)
        unnamed = [p for p in S.expand_paths(inputs) if S.file_format(p) != "warc"]
        if not cfg.url_field and unnamed:
            raise S.DataError(
                "clean.blocked_domains needs url_field: the records' field that holds each "
                f"document's URL (e.g. --config.url_field=url) in {unnamed[0]}"
                + (f" and {len(unnamed) - 1} more input(s)" if len(unnamed) > 1 else "")
                + " (WARC/WET files carry their own)"
            )
        try:  # read here, once: a bad line is found before the first pass, naming file:line
            load_domain_list(cfg.clean.blocked_domains)
        except OSError as e:
            raise S.DataError(
                _unreadable("clean.blocked_domains", e, cfg.clean.blocked_domains)
            ) from None
        except S.DataError as e:
            raise S.DataError(f"clean.blocked_domains: {e}") from None
    if cfg.clean.classifier:  # read and checked here, once (cleaning uses the cached copy)
        try:
            load_classifier(cfg.clean.classifier)
        except OSError as e:
            raise S.DataError(_unreadable("clean.classifier", e, cfg.clean.classifier)) from None
        except ClassifierError as e:
            raise S.DataError(f"clean.classifier: {e}") from None
    # None without decontam_paths or decontam_benchmarks: no decontamination (and no eval-set
    # counts in the report).
    deduper = Deduper(cfg.dedup, load_eval_sets(cfg))
    # a SentencePiece .model, an HF tokenizer.json or an HF directory
    tok = open_tokenizer(cfg.tokenizer, "tokenizer") if cfg.tokenizer else None
    sample = cfg.tokenizer_sample_docs  # (0: an empty reservoir, found after the whole pass)
    if tok is None and cfg.train_tokenizer_vocab > 0 and (
            isinstance(sample, bool) or not isinstance(sample, int) or sample < 1):  # fmt: skip
        raise S.DataError(f"tokenizer_sample_docs must be an integer >= 1, got {sample!r}")
    alpha = cfg.tokenizer_language_alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise S.DataError(f"tokenizer_language_alpha must be a number in [0, 1], got {alpha!r}")
    if tok is None and 0 < cfg.train_tokenizer_vocab <= (n_fixed := fixed_pieces()):
        raise ValueError(
            f"train_tokenizer_vocab={cfg.train_tokenizer_vocab} is too small: it must be more "
            f"than the {n_fixed} fixed pieces (special ids, chat tokens, 256 byte pieces), by one "
            "per distinct character of the text (hundreds; thousands with Chinese)"
        )
    return cleaner, deduper, tok


def _unreadable(key: str, e: OSError, value: str) -> str:
    """One line for a file named by config ``key`` (set to ``value``) that cannot be read: it
    was a bare "[Errno 2] No such file or directory" traceback."""
    path = e.filename if e.filename is not None else value
    return f"{key}: cannot read {path!r} ({e.strerror or e})"


def run(inputs: list[str], out_dir: str, cfg: ml_collections.ConfigDict, *, checked=None) -> dict:
    """Runs the whole pipeline; returns (and writes) the report.

    ``checked``: what ``check_settings(inputs, cfg)`` returned (main calls it first), else it
    is called here, before anything is written.
    """
    t_start = time.time()
    cleaner, deduper, tok = checked if checked is not None else check_settings(inputs, cfg)
    log = S.BadInputLog(strict=cfg.strict)
    training = tok is None and cfg.train_tokenizer_vocab > 0
    split = bool(cfg.split_languages)
    # languages named for documents the cleaner does not judge (do_clean=False)
    named = split or (training and cfg.tokenizer_language_alpha != 1)
    os.makedirs(out_dir, exist_ok=True)
    if tok is None:  # text shards: the output, or the input of the second (tokenizing) pass
        text_out = ShardSets(os.path.join(out_dir, "text"), cfg.shard_docs, {"format": "text"},
                             split)  # fmt: skip
    else:
        text_out, tok_out = None, _token_writer(out_dir, tok, cfg)
    sample = TokenizerSample(cfg.tokenizer_sample_docs, cfg.tokenizer_language_alpha, cfg.seed)
    times = {"read": 0.0, "clean": 0.0, "dedup": 0.0, "quality": 0.0, "tokenize": 0.0}
    quality = QualityFilter(cfg.quality) if cfg.quality.model else None
    counts = {"read_records": 0, "bytes_in": 0, "tokens": 0, "out": 0}
    pool = mp.get_context("spawn").Pool(cfg.workers) if cfg.workers > 1 else None

    docs = S.iter_documents(inputs, text_field=cfg.text_field, txt_mode=cfg.txt_mode, log=log,
                            url_field=cfg.url_field)  # fmt: skip

    def counted(it):  # documents read, counted here and not derived from the stage counters
        for d in it:
            counts["read_records"] += 1
            yield d

    def write(kept):  # the documents every stage kept, (document, text, language), in order
        survivors = [t for _, t, _ in kept]
        survivor_langs = [g for _, _, g in kept]
        counts["out"] += len(survivors)
        if text_out is not None:
            for t, g in zip(survivors, survivor_langs):
                text_out.write(t.encode("utf-8"), g)
            for t, g in zip(survivors, survivor_langs) if training else ():
                sample.add(t, g)
        else:
            t0 = time.time()
            counts["tokens"] += _write_tokens(tok_out, tok, survivors, survivor_langs)
            times["tokenize"] += time.time() - t0

    batches = _batches(counted(docs), cfg.batch_docs)
    group = max(1, cfg.workers) * 2  # batches in flight per pool round
    while True:
        t0 = time.time()
        round_batches = [b for _, b in zip(range(group), batches)]
        times["read"] += time.time() - t0
        if not round_batches:
            break
        t0 = time.time()
        if not cfg.do_clean:  # passed through: the clean stage counts them in and out
            cleaned = [
                ([d.text for d in b],
                 [document_language(d.text) for d in b] if named else [None] * len(b),
                 Cleaner(cfg.clean, seen=len(b)))
                for b in round_batches
            ]  # fmt: skip
        elif pool is not None:
            cleaned = pool.map(_clean_batch, [(cfg.clean, b) for b in round_batches])
        else:
            cleaned = [_clean_batch((cfg.clean, b)) for b in round_batches]
        for *_, part in cleaned:
            cleaner.merge(part)
        times["clean"] += time.time() - t0
        for batch, (texts, langs, _) in zip(round_batches, cleaned):
            counts["bytes_in"] += sum(len(d.text.encode()) for d in batch)
            kept = [(d, t, g) for d, t, g in zip(batch, texts, langs) if t is not None]
            t0 = time.time()
            keep = deduper.keep_batch([t for _, t, _ in kept], [d.loc for d, _, _ in kept])
            kept = [doc for doc, k in zip(kept, keep) if k]
            times["dedup"] += time.time() - t0
            if quality is not None and kept:
                t0 = time.time()
                # (with percentile thresholds, held back until calibrated: released later)
                kept = quality.push([(t, d.loc, (d, t, g)) for d, t, g in kept])
                times["quality"] += time.time() - t0
            write(kept)
    if quality is not None:  # what percentile calibration still holds
        t0 = time.time()
        kept = quality.flush()
        times["quality"] += time.time() - t0
        write(kept)
    if pool is not None:
        pool.close()
    shards = text_out.close() if text_out is not None else tok_out.close()
    written = text_out if text_out is not None else tok_out

    # No document survived: nothing to train on (SentencePiece raised with no report). The
    # report is written and main() fails naming it, as it does without training.
    training = training and counts["out"] > 0
    if training:  # second pass: train on the sample, tokenize the text shards
        t0 = time.time()
        sampled = sample.documents()
        try:
            tok = train(
                sampled,
                cfg.train_tokenizer_vocab,
                model_type=cfg.tokenizer_model_type,
                seed=cfg.seed,
                model_path=os.path.join(out_dir, "tokenizer.model"),
            )
        except ValueError as e:  # e.g. fewer pieces than the sample's distinct characters
            raise ValueError(f"train_tokenizer_vocab={cfg.train_tokenizer_vocab}: {e}") from None
        del sampled
        warn_smaller_vocab(tok, cfg.train_tokenizer_vocab)
        tok_out = _token_writer(out_dir, tok, cfg)
        n_tokenized = 0
        text_dir = os.path.join(out_dir, "text")
        for lang in text_out.languages() if split else [None]:  # each language's set in turn
            texts = S.iter_documents(os.path.join(text_dir, lang) if lang else text_dir)
            for batch in _batches(texts, cfg.batch_docs):
                counts["tokens"] += _write_tokens(tok_out, tok, [d.text for d in batch],
                                                  [lang] * len(batch))  # fmt: skip
                n_tokenized += len(batch)
        shards = tok_out.close()
        written = tok_out
        if n_tokenized != counts["out"]:
            raise AssertionError(
                f"{n_tokenized} documents tokenized from the text shards, {counts['out']} written"
            )
        times["tokenize"] += time.time() - t0

    read_in = log.total
    # Documents read: counted as they left the reader. Were it derived from the stage counters
    # (out + removed), the check below could not catch a document that a stage lost uncounted.
    n_in = counts["read_records"]
    stages = [
        _stage("read", times["read"], {"in": n_in + read_in, "out": n_in, **log.to_dict()}),
        _stage("clean", times["clean"], cleaner.report()),
        _stage("dedup", times["dedup"], deduper.report()),
        *([_stage("quality", times["quality"], quality.report())] if quality else []),
        _stage("tokenize", times["tokenize"], {"tokens": counts["tokens"]}),
    ]
    removed = {**log.counts, **cleaner.removed, **deduper.removed,
               **(quality.removed if quality else {})}  # fmt: skip
    report = {
        "inputs": S.expand_paths(inputs),
        "output": out_dir,
        "documents_in": n_in + read_in,
        "documents_out": counts["out"],
        "removed": removed,
        "bytes_in": counts["bytes_in"],
        "tokens": counts["tokens"],
        "tokenizer": tok.name if tok is not None else None,
        # the ids' range: what --config.model.vocab_size must be at least; and what was asked
        "vocab_size": tok.vocab_size if tok is not None else None,
        "train_tokenizer_vocab": cfg.train_tokenizer_vocab if training else None,
        # {language: documents} of the tokenizer's training sample (tokenizer_language_alpha < 1)
        **({"tokenizer_sample": sample.composition} if training and sample.composition else {}),
        "shards": [os.path.relpath(p, out_dir) for p in shards],
        "seconds": round(time.time() - t_start, 3),
        "stages": stages,
    }
    if split:  # {language: {"documents", "tokens"}} of the output (tokens 0: text shards)
        report["split_languages"] = {
            k: {"documents": written.documents[k], "tokens": written.tokens.get(k, 0)}
            for k in sorted(written.documents)
        }
    if report["documents_in"] != report["documents_out"] + sum(removed.values()):
        raise AssertionError(f"document accounting does not add up: {report}")
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(format_report(report))
    return report


def warn_smaller_vocab(tok: Tokenizer, asked: int) -> bool:
    """Logs a warning when the trained tokenizer has fewer pieces than `train_tokenizer_vocab`
    asked (SentencePiece trains with `hard_vocab_limit=False`: a small corpus stops it early,
    32000 asked, 1384 made) and returns whether it did: the model's vocab_size is then this
    tokenizer's, not the number asked for (report.md states both)."""
    if tok.vocab_size >= asked:
        return False
    logger.warning(
        "train_tokenizer_vocab=%d: the corpus supported only %d pieces, so the tokenizer %s has "
        "%d; pretrain with --config.model.vocab_size=%d (report.md's vocab_size)",
        asked, tok.vocab_size, tok.name, tok.vocab_size, tok.vocab_size,
    )  # fmt: skip
    return True


def _tokenizer_files(path: str) -> set[str]:
    """The real paths of the files tokenizer `path` is read from: a SentencePiece .model
    alone; an HF tokenizer.json (or directory) with the settings files beside it."""
    if not path:
        return set()
    path = os.path.expanduser(path)
    if os.path.isfile(path) and not path.endswith(".json"):
        return {os.path.realpath(path)}
    d = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return {os.path.realpath(os.path.join(d, f)) for f in aside_mod.TOKENIZER_OUTPUTS}


def _save_tokenizer(out_dir: str, tok) -> str:
    """Copies the tokenizer into `out_dir` (unless that copy is already it); returns the copy's
    file name. SentencePiece: tokenizer.model. HF: tokenizer.json with the settings files beside
    it (its BOS/EOS and pad ids, which the loader frames the documents with)."""
    if hasattr(tok, "save"):
        model_path = os.path.join(out_dir, "tokenizer.model")
        if not os.path.exists(model_path) or Tokenizer.load(model_path).sha256 != tok.sha256:
            tok.save(model_path)
        return "tokenizer.model"
    from flaxlm.models.hf_tokenizer import copy_tokenizer

    src = os.path.dirname(os.path.abspath(tok.name))
    if os.path.realpath(src) != os.path.realpath(out_dir):
        copy_tokenizer(src, out_dir)
    return os.path.basename(tok.name)


def token_meta(out_dir: str, tok: Tokenizer) -> dict:
    """Saves the tokenizer into `out_dir` (``_save_tokenizer``) and returns the ``meta.json``
    of token shards in ``out_dir/tokens`` (one level further down: ``ShardSets`` adds it)."""
    name = _save_tokenizer(out_dir, tok)
    return {
        "format": "tokens",
        "dtype": "int32",
        "bos_eos": False,  # ids only; the loader adds BOS/EOS
        "tokenizer": f"../{name}",
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
    }


def _token_writer(out_dir: str, tok: Tokenizer, cfg) -> ShardSets:
    meta = token_meta(out_dir, tok)
    return ShardSets(os.path.join(out_dir, "tokens"), cfg.shard_docs, meta,
                     bool(cfg.split_languages))  # fmt: skip


def _write_tokens(writer: ShardSets, tok: Tokenizer, texts: list[str], langs: list) -> int:
    n = 0
    # (HF: a special's string stays text)
    for ids, lang in zip(text_encoder(tok).encode_batch(texts), langs):
        writer.write(np.asarray(ids, np.int32).tobytes(), lang, len(ids))
        n += len(ids)
    return n


def format_report(r: dict) -> str:
    """A human-readable summary of ``report.json``."""
    lines = [
        "# Preprocess report",
        "",
        f"inputs: {len(r['inputs'])} file(s) · output: {r['output']} · {r['seconds']:.1f} s",
        f"documents: {r['documents_in']} in → {r['documents_out']} out · "
        # bytes_in: the UTF-8 text of every document read, dropped ones too (beam's likewise),
        # once labelled "kept text".
        f"{r['bytes_in'] / 1e6:.2f} MB text read · {r['tokens']} tokens out"
        + (f" ({r['tokenizer']})" if r["tokenizer"] else ""),
    ]
    if r.get("vocab_size"):  # (none without a tokenizer)
        asked = r.get("train_tokenizer_vocab")
        lines.append(
            f"vocab_size: {r['vocab_size']} (--config.model.vocab_size for this data)"
            + (f" · train_tokenizer_vocab asked {asked}" if asked else "")
            + (": the corpus supported no more pieces" if asked and asked > r["vocab_size"] else "")
        )
    if sample := r.get("tokenizer_sample"):  # (tokenizer_language_alpha < 1)
        drawn = ", ".join(f"{k} {v}" for k, v in sorted(sample.items(), key=lambda kv: -kv[1]))
        lines.append(f"tokenizer trained on documents drawn per language: {drawn} "
                     "(tokenizer_language_alpha)")  # fmt: skip
    lines += [
        "",
        "| stage | in | out | removed (reason: count) | seconds |",
        "|---|---|---|---|---|",
    ]
    for s in r["stages"]:
        removed = s.get("removed", s.get("counts", {}))
        why = ", ".join(f"{k}: {v}" for k, v in sorted(removed.items())) or "-"
        if s["stage"] == "tokenize":
            why = f"{s['tokens']} tokens written"
        lines.append(
            f"| {s['stage']} | {s.get('in', '')} | {s.get('out', '')} | {why} | "
            f"{s['seconds']:.2f} |"
        )
    lines += ["", "## Examples of removed documents", ""]
    for s in r["stages"]:
        for reason, exs in sorted(s.get("examples", {}).items()):
            lines.append(f"- **{s['stage']} / {reason}**")
            lines += [f"  - {e}" for e in exs]
    clean = next((s for s in r["stages"] if s["stage"] == "clean"), {})
    if pii := clean.get("pii_redacted"):
        lines += ["", "PII redacted: " + ", ".join(f"{k}: {v}" for k, v in sorted(pii.items()))]
    if stripped := clean.get("boilerplate_lines_stripped"):  # (report.json only, before)
        why = "navigation, cookie notices, separator lines; clean.strip_boilerplate_lines"
        lines += ["", f"Boilerplate lines stripped from kept documents: {stripped} ({why})"]
    read = next((s for s in r["stages"] if s["stage"] == "read"), {})
    if skipped := read.get("skipped"):  # (WARC records that are not documents)
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items(), key=lambda kv: -kv[1]))
        lines += ["", f"Records read that are not documents (skipped, not bad input): {kinds} "
                  "(data/source_warc.py SKIPS)"]  # fmt: skip
    if (urls := clean.get("urls")) is not None:  # (clean.blocked_domains)
        blocked = clean.get("removed", {}).get("blocked_domain", 0)
        lines += ["", f"URLs checked against clean.blocked_domains: {urls.get('checked', 0)}, "
                  f"{blocked} of them blocked; documents without a URL (not checked): "
                  f"{urls.get('no_url', 0)}"]  # fmt: skip
    if section := clean.get("classifier"):  # (clean.classifier)
        dropped = clean.get("removed", {}).get("classifier_low", 0)
        lines += ["", *report_lines(section, dropped)]
    if langs := clean.get("languages"):  # (report.json only, before)
        counts = ", ".join(
            f"{k}: {v}" for k, v in sorted(langs.items(), key=lambda kv: (-kv[1], kv[0]))
        )
        lines += ["", f"Languages of the documents cleaning kept: {counts} (clean.languages)"]
    lines += _split_lines(r)
    lines += _decontam_lines(next((s for s in r["stages"] if s["stage"] == "dedup"), {}))
    if q := next((s for s in r["stages"] if s["stage"] == "quality"), None):
        dist = ", ".join(f"{k} {v}" for k, v in q["perplexity"].items()) or "none scored"
        lines += ["", f"Perplexity under {q['model']} (first {q['max_tokens']} tokens) of the "
                  f"documents dedup kept: {dist}; {q['unscored']} too short to score "
                  "(quality.min_ppl / max_ppl drop below / above)"]  # fmt: skip
        th = q.get("thresholds", {})
        if n := th.get("calibrated_on"):
            sides = [
                f"{name} {th[name]:.4g} (p{th[pct]:g})"
                for name, pct in (
                    ("max_ppl", "max_ppl_percentile"),
                    ("min_ppl", "min_ppl_percentile"),
                )
                if th[pct]
            ]
            lines.append(f"Thresholds from the percentiles of the first {n} documents scored: "
                         + ", ".join(sides))  # fmt: skip
    return "\n".join(lines) + "\n"


MIX_ALPHA = 0.3  # the report's suggested mix (language_mix): mT5's and XLM-R's temperature


def _split_lines(r: dict) -> list[str]:
    """report.md's table of a ``split_languages`` output: each language's shard set, documents
    and tokens, and the ``data.sources`` weights of a temperature-sampled mix of them."""
    langs = r.get("split_languages")
    if not langs:
        return []
    sub = "tokens" if r.get("tokens") else "text"
    mix = language_mix(langs, MIX_ALPHA)
    lines = ["", "## Languages (split_languages: one shard set each)", "",
             f"| shard set | documents | tokens | share of tokens | sampled ∝ tokens^{MIX_ALPHA} "
             "| passes over it in a run of the corpus's size |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for k, v in sorted(langs.items(), key=lambda kv: (-kv[1]["documents"], kv[0])):
        m = mix.get(k)
        share = (f"{m['token_share']:.1%} | {m['sampled_share']:.1%} | "
                 f"{m['sampled_share'] / m['token_share']:.2f}" if m else "- | - | -")  # fmt: skip
        lines.append(f"| {sub}/{k} | {v['documents']} | {v['tokens']} | {share} |")
    if len(mix) > 1:
        out = r["output"].rstrip("/")
        spec = ",".join(f"{out}/{sub}/{k}:{m['weight']:.4g}" for k, m in sorted(mix.items()))
        lines += ["", f"To sample languages ∝ tokens^{MIX_ALPHA} (grain mixes documents, so each "
                  "weight is the sampled share over the language's mean document length; "
                  "preprocess.language_mix(report['split_languages'], alpha) for another alpha; "
                  f"{out} or {out}/{sub} alone reads every language in the corpus's own mix):",
                  "", f"    --config.data.sources={spec}"]  # fmt: skip
    return lines


def _decontam_lines(dedup: dict) -> list[str]:
    """report.md's decontamination lines: what the eval set gave (an item shorter than
    ``decontam_ngram`` words once cleaned can never match), and the documents
    ``decontam_mode=flag`` kept."""
    out = []
    if dc := dedup.get("decontam"):
        n, short = dc["ngram"], dc["too_short"]
        never = (
            f"; {short} shorter than {n} words after cleaning (no n-gram), which can never match"
        )
        out.append(
            f"decontamination: {dc['eval_texts']} eval text(s) → {dc['ngrams']} distinct "
            f"{n}-word n-grams" + (never if short else "")
        )
        out += [_decontam_set_line(name, st, n) for name, st in dc.get("sets", {}).items()]
    if flagged := dedup.get("flagged_contaminated"):
        out.append(f"flagged as contaminated (decontam_mode=flag, kept): {flagged}")
    return ["", *out] if out else []


def _decontam_set_line(name: str, st: dict, n: int) -> str:
    """report.md's line for one named eval set (a benchmark): the documents it matched
    (dropped, or flagged and kept) with an example, and its eval texts."""
    short = f", {st['too_short']} shorter than {n} words" if st["too_short"] else ""
    example = f" (e.g. {st['examples'][0]})" if st["examples"] else ""
    return (f"- {name}: {st['documents']} document(s) matched{example}; {st['eval_texts']} "
            f"eval text(s) → {st['ngrams']} n-grams{short}")  # fmt: skip


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="files, globs or directories")
    ap.add_argument("--output", required=True, help="output directory")
    ap.add_argument("--config", help="python file whose get_config() returns the settings")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args, rest = ap.parse_known_args(argv)
    cfg = load_config_file(args.config) if args.config else preprocess_config()
    apply_overrides(cfg, rest)
    try:  # before anything is written or deleted (a typo left out/text/meta.json behind)
        S.expand_paths(args.input)
    except FileNotFoundError as e:
        raise SystemExit(f"--input: {e}") from None
    try:  # likewise: --overwrite deleted the earlier output before this failed
        decontam_paths(cfg)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    try:  # every other setting, too (a typo such as dedup.bands=500 lost the earlier output)
        checked = check_settings(args.input, cfg)
    except ValueError as e:  # a setting's key (or a decontamination record's file:line) says it
        raise SystemExit(str(e)) from None
    aside_mod.recover(args.output)  # an earlier --overwrite killed part way: its run goes back
    subs = [os.path.join(args.output, s) for s in ("text", "tokens")]
    aside = None
    if os.path.exists(os.path.join(args.output, "report.json")) or any(map(os.path.isdir, subs)):
        if not args.overwrite:
            raise SystemExit(f"{args.output} already holds a preprocess run (use --overwrite)")
        doomed = [os.path.realpath(sub) + os.sep for sub in subs]
        for p in S.expand_paths(args.input):  # never replace what this run is about to read
            if os.path.realpath(p).startswith(tuple(doomed)):
                raise SystemExit(f"--overwrite would delete input {p}; write elsewhere")
        # Set aside, not deleted, until this run has finished (preprocess_aside.py). The
        # earlier reports and tokenizer go too: left, they described shards that were gone and
        # the directory read as its report.json. A tokenizer.model this run tokenizes with
        # stays (it is loaded; the same bytes).
        aside = aside_mod.set_aside(args.output, _tokenizer_files(cfg.tokenizer))
    try:
        report = run(args.input, args.output, cfg, checked=checked)
        if aside and report["documents_out"] == 0:
            sys.stdout.write(format_report(report))
            aside_mod.put_back(args.output, aside)  # an empty result replaces nothing
            aside = None
            raise SystemExit(
                f"{args.output}: none of the {report['documents_in']} documents read from "
                f"{args.input} survived (why: the report above); the earlier run there is kept"
            )
    except S.DataError as e:  # bad input (file:line, a truncated .gz): one line, not a traceback
        if aside:
            aside_mod.put_back(args.output, aside)
        raise SystemExit(str(e)) from None
    except BaseException:  # anything else (Ctrl-C too): the earlier run goes back
        if aside:
            aside_mod.put_back(args.output, aside)
        raise
    if aside:
        aside_mod.discard(aside)
    sys.stdout.write(format_report(report))
    if report["documents_out"] == 0:  # never what was meant: fail loudly (--overwrite: above)
        raise SystemExit(
            f"{args.output}: none of the {report['documents_in']} documents read from "
            f"{args.input} survived (why: {args.output}/report.md)"
        )
    return report


if __name__ == "__main__":
    main()
