"""The preprocess stages on Apache Beam, for corpora one machine cannot handle.

    python -m flaxlm.data.beam --input 'raw/*.jsonl' --output out/ \\
        [--config.tokenizer=tok.model] [--runner DirectRunner | DataflowRunner | FlinkRunner ...]

Without ``--runner`` the pipeline runs on Beam's in-process ``FnApiRunner``. Beam's own default,
``DirectRunner``, first tries its Prism runner, which downloads a binary from GitHub on first use
(on a machine without that access it fails and falls back to the same FnApiRunner); name it to
get that behaviour.

The same stage functions as ``flaxlm.data.preprocess`` (readers, ``Cleaner``, ``exact_key``,
``shingles``/``MinHasher``/``band_keys``, ``Decontaminator``, ``Tokenizer``) run inside Beam
transforms; where the streaming CLI keeps a table, Beam groups by key instead:

* exact dedup: group by normalized-text hash, keep the smallest document key;
* near dedup: emit (band key → document key); in every band group all but the smallest key are
  duplicates; a document is dropped if any group marks it. This is exactly the streaming rule
  ("a band key already produced by an earlier document"), so both keep the same documents.

Document keys are (file index in the sorted input list, record index), the same as
``Document.key``. Output shards are ``shard-XXXXX-of-YYYYY.arrayrecord`` (documents assigned by a
hash of their key, sorted by key inside a shard; every one of the YYYYY written, empty or not,
each renamed into place when complete, so a killed job leaves an incomplete set the loader
refuses) plus ``meta.json``, ``report.json`` and
``report.md`` as the CLI writes them; on a cluster ``--output`` must be a filesystem every worker
can write (ArrayRecord writes local paths). Tokenizer training is not done here: pass a tokenizer
(e.g. one the CLI trained on a sample), or get cleaned text shards; ``train_tokenizer_vocab``
is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import zlib

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.window import GlobalWindows

from flaxlm.data import preprocess as P
from flaxlm.data import sources as S
from flaxlm.data.clean import Cleaner
from flaxlm.data.dedup import (
    Decontaminator,
    Deduper,
    band_keys,
    check_config,
    exact_key,
    lsh_params,
)
from flaxlm.data.quality_classifier import ScoreHistogram
from flaxlm.data.tokenizer import Tokenizer, open_tokenizer, text_encoder

MAX_EXAMPLES = 5


def merge_stats(a: dict, b: dict) -> dict:
    """Adds numbers, merges dicts, concatenates example lists (sorted, capped) — recursively."""
    out = dict(a)
    for k, v in b.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict):
            out[k] = merge_stats(out[k], v)
        elif isinstance(v, list):
            out[k] = sorted(out[k] + v)[:MAX_EXAMPLES]
        else:
            out[k] = out[k] + v
    return out


class _MergeStats(beam.CombineFn):
    def create_accumulator(self):
        return {}

    def add_input(self, acc, x):
        return merge_stats(acc, x)

    def merge_accumulators(self, accs):
        out = {}
        for a in accs:
            out = merge_stats(out, a)
        return out

    def extract_output(self, acc):
        return acc


def _stats(x: dict):
    return beam.pvalue.TaggedOutput("stats", x)


class _ReadFile(beam.DoFn):
    """(file index, path) → (key, loc, text, url) documents; bad records go to the stats
    output."""

    def __init__(self, cfg):
        self.cfg = cfg

    def process(self, item):
        fi, path = item
        log = S.BadInputLog(strict=self.cfg.strict)
        n, nbytes = 0, 0
        fields = (self.cfg.text_field, self.cfg.txt_mode, log, self.cfg.url_field)
        for ri, loc, text, url in S._iter_file(path, fi, *fields):
            if text is not None:
                n += 1
                nbytes += len(text.encode())
                yield (fi, ri), loc, text, url
        yield _stats({"read": {"in": n + log.total, "out": n, "bytes": nbytes, **log.to_dict()}})


class _Clean(beam.DoFn):
    """One ``Cleaner`` per bundle; its counters leave as one stats record per bundle. With
    ``split``, a kept document's key gains its language: (file, record, language)."""

    def __init__(self, cfg, split: bool = False):
        self.cfg, self.split = cfg, split

    def start_bundle(self):
        self.cleaner = Cleaner(self.cfg)

    def process(self, doc):
        key, loc, text, url = doc
        out, lang = self.cleaner.clean(text, loc, url)
        if out is not None:
            yield ((*key, lang) if self.split else key), loc, out

    def finish_bundle(self):
        rep = self.cleaner.report()
        if self.cleaner.scores is not None:  # (merge_stats adds numbers: bins, not percentiles)
            rep["classifier"] = {"bins": self.cleaner.scores.sparse()}
        yield beam.pvalue.TaggedOutput("stats", GlobalWindows.windowed_value({"clean": rep}))


def _first_of_group(item):
    """Exact dedup: the smallest key of a normalized-text group survives."""
    _, docs = item
    docs = sorted(docs)
    yield docs[0]
    for _key, loc, text in docs[1:]:
        yield _stats(_removed("exact_duplicate", loc, text))


def _removed(reason, loc, text):
    return {"dedup": {"removed": {reason: 1}, "examples": {reason: [f"{loc}: {text[:200]!r}"]}}}


class _Decontaminate(beam.DoFn):
    def __init__(self, cfg, eval_texts):
        self.cfg, self.eval_texts = cfg, eval_texts

    def setup(self):
        self.d = Decontaminator(self.eval_texts, self.cfg.decontam_ngram)

    def process(self, doc):
        key, loc, text = doc
        if self.d.hits(text):
            # named eval sets (benchmarks): the documents each matched, summed by merge_stats
            found = self.d.found(loc, text)
            sets = {"decontam_sets": found} if found else {}
            if self.cfg.decontam_mode == "drop":
                stats = _removed("contaminated", loc, text)
                yield _stats({"dedup": {**stats["dedup"], **sets}})
                return
            yield _stats({"dedup": {"flagged_contaminated": 1, **sets}})
        yield doc


class _BandKeys(beam.DoFn):
    """doc → (band key, doc key) for each LSH band, with the streaming Deduper's signatures."""

    def __init__(self, cfg):
        self.cfg = cfg

    def setup(self):
        self.dd = Deduper(self.cfg)

    def process(self, doc):
        key, _, text = doc
        sig = self.dd.signatures([text])
        # int64 view: Beam's integer coder takes signed 64-bit values.
        for k in band_keys(sig, self.dd.bands, self.dd.rows)[0].view(np.int64).tolist():
            yield k, key


def _later_members(item):
    _, keys = item
    keys = sorted(set(keys))
    for k in keys[1:]:
        yield k, True


def _drop_marked(item):
    key, groups = item
    docs, marks = groups["doc"], groups["dup"]
    for loc, text in docs:
        if marks:
            yield _stats(_removed("near_duplicate", loc, text))
        else:
            yield key, loc, text


class _Tokenize(beam.DoFn):
    """doc → (key, record bytes); with ``split`` the per-language counts of the report (the
    language is the key's third part)."""

    def __init__(self, tok: Tokenizer | None, split: bool = False):
        self.tok = None if tok is None else text_encoder(tok)  # (HF: specials' strings as text)
        self.split = split

    def process(self, doc):
        key, _, text = doc
        ids = None if self.tok is None else self.tok.encode(text)
        if self.split:
            n = 0 if ids is None else len(ids)
            yield _stats({"split_languages": {key[2]: {"documents": 1, "tokens": n}}})
        if ids is None:
            yield key, text.encode("utf-8")
            return
        yield _stats({"tokens": len(ids)})
        yield key, np.asarray(ids, np.int32).tobytes()


def _write_json_atomic(obj, path):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _write_shard(item, out_dir, num_shards, meta=None):
    """Writes shard `item` = (shard, records) into `out_dir`, or with ``split_languages``
    ((language, shard), records) into ``out_dir/<language>/`` with its ``meta.json``."""
    from array_record.python.array_record_module import ArrayRecordWriter

    shard, records = item
    if isinstance(shard, tuple):
        lang, shard = shard
        out_dir = os.path.join(out_dir, lang)
        os.makedirs(out_dir, exist_ok=True)
        _write_json_atomic(meta, os.path.join(out_dir, S.META_FILE))  # (the same from each)
    name = f"shard-{shard:05d}-of-{num_shards:05d}.arrayrecord"
    path = os.path.join(out_dir, name)
    # Written under a hidden name, renamed when complete: a worker killed mid-write leaves no
    # shard that looks whole (a retried bundle rewrites the same name).
    tmp = os.path.join(out_dir, f".{name}.tmp-{os.getpid()}")
    w = ArrayRecordWriter(tmp, "group_size:1")
    for _, rec in sorted(records):
        w.write(rec)
    w.close()
    os.replace(tmp, path)
    return path


def _dedup_stage(docs, cfg, eval_texts):
    """Exact → decontaminate → near, by group-by-key; returns (survivors, [stats pcollections]).
    With ``decontam_mode="flag"`` the flags are counted after the near stage, on the kept ones."""
    stats = []
    if cfg.exact:
        res = (
            docs
            | "ExactKey" >> beam.Map(lambda d: (exact_key(d[2]), d))
            | "ExactGroup" >> beam.GroupByKey()
            | "ExactFirst" >> beam.FlatMap(_first_of_group).with_outputs("stats", main="docs")
        )
        docs = res.docs
        stats.append(res.stats)
    if eval_texts and cfg.decontam_mode == "drop":
        res = docs | "Decontam" >> beam.ParDo(_Decontaminate(cfg, eval_texts)).with_outputs(
            "stats", main="docs"
        )
        docs = res.docs
        stats.append(res.stats)
    if cfg.near:
        dups = (
            docs
            | "BandKeys" >> beam.ParDo(_BandKeys(cfg))
            | "BandGroup" >> beam.GroupByKey()
            | "LaterMembers" >> beam.FlatMap(_later_members)
            | "DistinctDups" >> beam.CombinePerKey(lambda marks: True)
        )
        keyed = docs | "ByKey" >> beam.Map(lambda d: (d[0], (d[1], d[2])))
        res = (
            {"doc": keyed, "dup": dups}
            | "Join" >> beam.CoGroupByKey()
            | "DropDups" >> beam.FlatMap(_drop_marked).with_outputs("stats", main="docs")
        )
        docs = res.docs
        stats.append(res.stats)
    if eval_texts and cfg.decontam_mode != "drop":
        # Flagged documents are counted among the kept ones, after the near stage (as the
        # streaming Deduper counts them): a flagged near-duplicate is not in the output.
        res = docs | "Flag" >> beam.ParDo(_Decontaminate(cfg, eval_texts)).with_outputs(
            "stats", main="docs"
        )
        docs = res.docs
        stats.append(res.stats)
    return docs, stats


def build(p, inputs: list[str], out_dir: str, cfg, num_shards: int, eval_texts=None,
          meta: dict | None = None):  # fmt: skip
    """Adds the preprocess graph to pipeline ``p``; stats land in ``out_dir/_stats.json``.
    ``eval_texts``: the decontamination texts when the caller loaded them (``run`` does).
    ``meta``: with ``split_languages``, the ``meta.json`` each language's shard set gets."""
    files = S.expand_paths(inputs)
    check_config(cfg.dedup)  # here, not in a worker's setup after the input was read
    Cleaner(cfg.clean)  # the same for the cleaning settings
    tok = open_tokenizer(cfg.tokenizer, "tokenizer") if cfg.tokenizer else None
    if eval_texts is None:  # cleaned like the training text (placeholders too)
        eval_texts = P.load_eval_sets(cfg) or []
    read = (
        p
        | "Files" >> beam.Create(list(enumerate(files)))
        | "Read" >> beam.ParDo(_ReadFile(cfg)).with_outputs("stats", main="docs")
    )
    stats = [read.stats]
    docs = read.docs
    split = bool(cfg.split_languages)
    if cfg.do_clean:
        cleaned = docs | "Clean" >> beam.ParDo(_Clean(cfg.clean, split)).with_outputs(
            "stats", main="docs"
        )
        docs = cleaned.docs
        stats.append(cleaned.stats)
    elif split:  # passed through unjudged: the language as the cleaner would name it
        docs = docs | "Language" >> beam.Map(
            lambda d: ((*d[0], P.document_language(d[2])), d[1], d[2])
        )
    else:
        docs = docs | "NoUrl" >> beam.Map(lambda d: d[:3])
    docs, dedup_stats = _dedup_stage(docs, cfg.dedup, eval_texts)
    stats += dedup_stats
    stats.append(docs | "One" >> beam.Map(lambda _: {"out": 1}))
    records = docs | "Tokenize" >> beam.ParDo(_Tokenize(tok, split)).with_outputs("stats", main="r")
    stats.append(records.stats)
    # The shard from the (file, record) key, the same with and without a language in it
    sharded = records.r | "Shard" >> beam.Map(lambda kr: (_shard_of(kr[0], num_shards), kr))
    # Every shard key, so a shard no document hashed to is written too (empty): a set of N
    # shards is complete, and the loader refuses one that is not (source_paths.check_shard_sets)
    if split:  # N shards for each language some document has
        every = (
            records.r
            | "Languages" >> beam.Map(lambda kr: kr[0][2])
            | "DistinctLanguages" >> beam.Distinct()
            | "EveryShard" >> beam.FlatMap(lambda g: [((g, i), None) for i in range(num_shards)])
        )
    else:
        every = p | "EveryShard" >> beam.Create([(i, None) for i in range(num_shards)])
    _ = (
        {"docs": sharded, "every": every}
        | "ShardGroup" >> beam.CoGroupByKey()
        | "Docs" >> beam.Map(lambda kv: (kv[0], list(kv[1]["docs"])))
        | "Write"
        >> beam.Map(
            _write_shard, os.path.join(out_dir, "tokens" if tok else "text"), num_shards, meta
        )  # fmt: skip
    )
    _ = (
        stats
        | "AllStats" >> beam.Flatten()
        | "Merge" >> beam.CombineGlobally(_MergeStats())
        | "Save" >> beam.Map(_save_json, os.path.join(out_dir, "_stats.json"))
    )
    return tok


def _shard_of(key: tuple, num_shards: int):
    """A document's shard: a hash of its (file, record) key; with a language (``split``), the
    language's shard set too."""
    shard = zlib.crc32(repr(tuple(key[:2])).encode()) % num_shards
    return (key[2], shard) if len(key) > 2 else shard


def _save_json(x, path):
    with open(path, "w") as f:
        json.dump(x, f)


def check_settings(inputs: list[str], cfg):
    """What can be refused before anything is written: ``preprocess.check_settings`` (inputs,
    cleaning, dedup and tokenizer settings, decontamination files), and ``train_tokenizer_vocab
    > 0`` (this pipeline trains no tokenizer: it ran and wrote text shards without one, without
    a word). Returns (the tokenizer or None, the decontamination texts, their Decontaminator
    or None). A ValueError or FileNotFoundError names the setting or file."""
    if cfg.train_tokenizer_vocab > 0:
        raise ValueError(
            f"train_tokenizer_vocab={cfg.train_tokenizer_vocab}: the Beam pipeline trains no "
            "tokenizer; train one with the preprocess CLI (python -m flaxlm.data.preprocess "
            "--config.train_tokenizer_vocab=N, on a sample of the corpus if need be) and pass "
            "it here as --config.tokenizer=OUT/tokenizer.model, or leave train_tokenizer_vocab "
            "at 0 to write cleaned text shards"
        )
    if cfg.quality.model:
        raise ValueError(
            f"quality.model={cfg.quality.model}: the reference-model perplexity filter runs in "
            "the preprocess CLI (python -m flaxlm.data.preprocess, on the accelerators of one "
            "host), not on Beam; filter the Beam output with it, or leave quality.model empty"
        )
    # What the CLI checks before it writes anything (else `run` wrote meta.json before a
    # worker met a misspelt txt_mode at the first file, and the corrected rerun found an
    # output folder already begun).
    # (the tokenizer it loads: cfg.tokenizer's; its Deduper read the decontamination texts,
    # decontam_paths and decontam_benchmarks, once, and warned as the CLI's does: they are the
    # report's eval-set counts and what the pipeline's Decontaminate stage gets)
    _, deduper, tok = P.check_settings(inputs, cfg)
    decontam = deduper.decontam
    return tok, (deduper.eval_texts if decontam is not None else []), decontam


def pipeline_options(beam_args) -> PipelineOptions:
    """``beam_args`` as Beam's options, with the in-process FnApiRunner unless they name a runner
    (see the module docstring: Beam's DirectRunner reaches for a download first)."""
    args = list(beam_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append("--runner=FnApiRunner")
    return PipelineOptions(args)


@contextlib.contextmanager
def _private_tempdir():
    """Python's temporary files go to a directory of this run's own, removed afterwards.

    The portable runners' job server makes a ``beam-temp*`` directory in the temp dir when it
    starts and removes it only when stopped, which a fallback from Prism never does: every
    DirectRunner run left one behind (hundreds in /tmp after a few test runs)."""
    saved = tempfile.tempdir
    own = tempfile.mkdtemp(prefix="flaxlm-beam-")
    tempfile.tempdir = own
    try:
        yield own
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(own, ignore_errors=True)


def run(inputs: list[str], out_dir: str, cfg, *, num_shards: int = 8, beam_args=(),
        checked=None) -> dict:  # fmt: skip
    """Runs the pipeline (in process unless ``beam_args`` name a runner); returns the report.
    ``checked``: what ``check_settings(inputs, cfg)`` returned (``main`` calls it first), else
    it is called here, before anything is written."""
    t0 = time.time()
    tok, eval_texts, decontam = checked if checked is not None else check_settings(inputs, cfg)
    sub = "tokens" if tok else "text"
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    meta = P.token_meta(out_dir, tok) if tok is not None else {"format": "text"}  # (saves tok)
    # meta.json here, or (split_languages) checks that no earlier run's shards are here; each
    # language's set gets its meta.json from the worker that writes its shards
    sets = P.ShardSets(os.path.join(out_dir, sub), 1, meta, bool(cfg.split_languages))
    sets.close()
    meta = sets.set_meta  # (what each language's meta.json says: the same, or one level down)
    with _private_tempdir(), beam.Pipeline(options=pipeline_options(beam_args)) as p:
        build(p, inputs, out_dir, cfg, num_shards, eval_texts, meta)
    with open(os.path.join(out_dir, "_stats.json")) as f:
        st = json.load(f)
    os.remove(os.path.join(out_dir, "_stats.json"))
    read = st.get("read", {})
    empty = {
        "in": 0,
        "out": 0,
        "removed": {},
        "examples": {},
        "pii_redacted": {},
        "boilerplate_lines_stripped": 0,
        "languages": {},
    }
    clean = merge_stats(empty, st["clean"]) if "clean" in st else {**empty, "in": read["out"]}
    clean["out"] = clean["in"] - sum(clean["removed"].values())
    if cfg.clean.classifier:  # its section from the bundles' merged bins (as the CLI's)
        bins = ScoreHistogram.from_sparse(clean.get("classifier", {}).get("bins", {}))
        clean["classifier"] = Cleaner(cfg.clean).classifier_section(bins)
    dedup_in = clean["in"] - sum(clean["removed"].values())
    dedup = merge_stats(
        {"removed": {}, "examples": {}, "flagged_contaminated": 0}, st.get("dedup", {})
    )
    dedup = {"in": dedup_in, "out": st.get("out", 0), **dedup}
    bands, rows = lsh_params(cfg.dedup)
    dedup["lsh"] = {"bands": bands, "rows": rows, "threshold": cfg.dedup.threshold}
    found = dedup.pop("decontam_sets", {})  # (named eval sets: the documents each matched)
    if decontam is not None:
        dedup["decontam"] = decontam.summary(found)
    removed = {**read.get("counts", {}), **clean["removed"], **dedup["removed"]}
    shards = sorted(
        os.path.relpath(os.path.join(d, f), os.path.join(out_dir, sub))
        for d in S.shard_set_dirs(os.path.join(out_dir, sub))
        for f in os.listdir(d)
        if f.endswith(".arrayrecord")
    )
    report = {
        "inputs": S.expand_paths(inputs),
        "output": out_dir,
        "runner": "beam",
        "documents_in": read.get("in", 0),
        "documents_out": st.get("out", 0),
        "removed": removed,
        "bytes_in": read.get("bytes", 0),
        "tokens": st.get("tokens", 0),
        "tokenizer": tok.name if tok is not None else None,
        # as data/preprocess.py's report (this pipeline trains no tokenizer: none asked)
        "vocab_size": tok.vocab_size if tok is not None else None,
        "train_tokenizer_vocab": None,
        "shards": [f"{sub}/{s}" for s in shards],
        "seconds": round(time.time() - t0, 3),
        "stages": [
            {"stage": "read", "seconds": 0.0, **{k: v for k, v in read.items() if k != "bytes"}},
            {"stage": "clean", "seconds": 0.0, **clean},
            {"stage": "dedup", "seconds": 0.0, **dedup},
            {"stage": "tokenize", "seconds": 0.0, "tokens": st.get("tokens", 0)},
        ],
    }
    if cfg.split_languages:  # as the CLI's report ({language: {"documents", "tokens"}})
        report["split_languages"] = dict(sorted(st.get("split_languages", {}).items()))
    if report["documents_in"] != report["documents_out"] + sum(removed.values()):
        raise AssertionError(f"document accounting does not add up: {report}")
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(P.format_report(report))
    return report


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="flaxlm preprocess on Apache Beam")
    ap.add_argument("--input", nargs="+", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--config", help="python file whose get_config() returns the settings")
    ap.add_argument("--num_shards", type=int, default=8)
    args, rest = ap.parse_known_args(argv)
    cfg = P.load_config_file(args.config) if args.config else P.preprocess_config()
    ours = [a for a in rest if a.startswith("--config.")]
    P.apply_overrides(cfg, ours)
    beam_args = [a for a in rest if not a.startswith("--config.")]
    try:  # a setting or file named in one line, as the preprocess CLI says it (not a traceback)
        checked = check_settings(args.input, cfg)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from None
    try:
        report = run(args.input, args.output, cfg, num_shards=args.num_shards,
                     beam_args=beam_args, checked=checked)  # fmt: skip
    except S.DataError as e:  # bad input (file:line): one line, as the preprocess CLI says it
        raise SystemExit(str(e)) from None
    sys.stdout.write(P.format_report(report))
    return report


if __name__ == "__main__":
    main()
