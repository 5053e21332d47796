"""Pretraining batches with grain: read → shuffle → epochs → shard → tokenize → mix → pack → batch.

``make_pretrain_iterator(data_cfg, seq_len=..., global_batch=..., seed=...)`` returns this
process's iterator; each ``next()`` gives ``global_batch // process_count`` rows::

    tokens      int32   (b, seq_len)  input ids
    targets     int32   (b, seq_len)  next token of the same document (already shifted)
    loss_mask   float32 (b, seq_len)  1 where the target counts, 0 on padding
    segment_ids int32   (b, seq_len)  1, 2, ... per packed piece; 0 = padding
    positions   int32   (b, seq_len)  0, 1, ... restarting in every piece

Documents are ``[bos] + ids + [eos]`` (each configurable); a document of n+1 tokens contributes n
(input, target) pairs, so the EOS is predicted from the last token and no target ever crosses a
document. ``pack_mode="split"`` fills rows completely: a document that does not fit the rest of a
row is cut there and continues in the next row as a new piece (new segment id, positions from 0).
``pack_mode="pad"`` starts a document in a fresh row instead (only documents longer than a row are
cut). Either way every pair of every document appears exactly once per epoch.

Order of operations per source: grain ``MapDataset`` → ``shuffle(seed)`` (re-shuffled every
epoch) → ``repeat(num_epochs)`` → ``[process_index::process_count]`` → tokenize. Sources are then
interleaved by ``MapDataset.mix`` in proportion to their weights, counted in documents, not
tokens (a source of longer documents gets a larger share of the tokens). The interleave is
deterministic: every prefix of the stream holds each source's share to within a couple of
documents, at the weights grain keeps (integers, the smallest scaled to 100: 1:1.0099 mixes
1:1). A weight must be > 0 and finite (leave a source out rather than weighting it 0). With
``num_epochs > 0`` a mixture ends when its first source runs out, so the other sources are used
only in part (logged as a warning when more than one document per source goes unread). Weights
proportional to the sources' sizes do not use every document either: grain truncates the other
weights once the smallest is scaled to 100, so the source of the smallest weight runs out first,
with up to 1% of the others' documents unread. Measured (grain 0.2.18): for 11252 of the 14161
pairs of sizes 1..119, 1 document is never read; sizes 12345 and 678 leave 6, 173943 and 178924
leave 1503; each process's mixture ends on its own, so 4 processes leave 4 of 70 documents of a
47 + 23 mixture unread per epoch. Every step is index arithmetic, so the whole state is the next
document index plus the packer's position inside the document it was cutting: ``get_state()``
returns a small JSON dict and ``set_state`` resumes exactly (the tests check it in a fresh
process). The state also records what each source held (its files' names and sizes, its
document count: data/source_fingerprint.py), so a resume onto files that changed since is an
error naming the source, or with ``data.on_changed_sources="warn"`` a warning.

Each process packs its own documents: its rows are not a slice of what one process would pack
(the global batch is the processes' rows together), and their positions differ, so with several
processes ``get_state`` gathers every process's position (a collective: all processes call it at
the same step, as the training loop does when it saves) and ``set_state`` takes its own
(data/process_state.py); a state saved by another process count goes through global positions:
resumed at the first document a saved process had not finished, none skipped, a few read again
(only near it per source, with a mixture). With ``num_epochs > 0`` the processes' streams end
after different numbers of batches (their documents differ in length): the training loop has
every process pack the batches up to its next sync step ahead (``prefetch(n)``,
data/lookahead.py; ``get_state`` still names the next batch trained) and stops all of them
after the fewest
(train/stopping.py). A source too small to give every process a document is an error, and so
is data with no document of the 2 tokens one (input, target) pair needs (one-token documents
without BOS/EOS): all of it, found once a process has read a pass's worth of documents without
one (``num_epochs=0`` used to wait forever), or one process's share: with ``num_epochs > 0`` when
its first batch would be empty (that used to end the data there, silently), with
``num_epochs=0`` when its first pass's worth of documents has none, found once it has read that
many in a row without one (it used to wait forever while other processes trained). ``seq_len``
and ``global_batch`` must be > 0.

The packer and its state are data/packing.py's (re-exported here).

With no ``sources`` the built-in corpus is used: a function registered with
``register_builtin_corpus`` returns its documents, and a small tokenizer is trained on them once
and cached.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence

import grain
import ml_collections
import numpy as np

from flaxlm.data import source_fingerprint
from flaxlm.data import sources as S
from flaxlm.data.packing import STATE_VERSION as STATE_VERSION
from flaxlm.data.packing import PackedBatchIterator as PackedBatchIterator
from flaxlm.data.packing import PairCheck as PairCheck
from flaxlm.data.source_errors import DataError
from flaxlm.data.source_readers import check_txt_mode
from flaxlm.data.tokenizer import Tokenizer, open_tokenizer, text_encoder, train_or_load

PACK_MODES = ("split", "pad")  # data/packing.py's


def data_config() -> ml_collections.ConfigDict:
    """Defaults of the ``data`` section of the pretraining configs (configs/pretrain.py and
    configs/scaling.py call this)."""
    c = ml_collections.ConfigDict()
    # Comma-separated "PATTERN[:WEIGHT]" entries: jsonl, parquet, Arrow (.arrow/.feather, HF
    # datasets' files), text files or ArrayRecord shard directories from flaxlm.data.preprocess.
    # "" = the built-in corpus. Weights count documents.
    c.sources = ""
    c.text_field = "text"  # jsonl/parquet/Arrow field that holds the document
    c.txt_mode = "file"  # plain text: one document per "file", "line" or "blank"-separated block
    # SentencePiece .model, HF tokenizer.json or HF directory; "" = the shards' own (pretraining
    # from init_from: its tokenizer), or one trained on the built-in text
    c.tokenizer = ""
    c.builtin_vocab_size = 2048  # vocab of the tokenizer trained for the built-in corpus
    c.cache_dir = "~/.cache/flaxlm"  # where that tokenizer is cached
    c.add_bos = True  # start every document with BOS (if the tokenizer has one)
    c.add_eos = True  # end every document with EOS (so the model learns to stop)
    # "split": rows full, documents may continue in the next row; "pad": a document that does
    # not fit the rest of a row starts the next one (only documents longer than a row are cut)
    c.pack_mode = "split"
    # passes over each source (a mixture stops at its first); 0 = forever. Training stops, with
    # a checkpoint, when the data ends before total_steps (on any process: all stop together)
    c.num_epochs = 0
    c.shuffle = True  # shuffle documents (by the run's seed), differently every epoch
    c.read_threads = 4  # grain threads that read and tokenize
    c.prefetch = 256  # documents grain reads ahead
    c.strict = False  # True: bad input raises with file:line; False: counted, logged, skipped
    # On resume, a source whose files or document count changed since the checkpoint (a new
    # file under a glob, one edited to another size or truncated; a same-size edit is not
    # seen) would repeat and skip documents: "error"
    # stops, naming the source and what changed; "warn" resumes anyway at the saved position
    # (data/source_fingerprint.py)
    c.on_changed_sources = "error"
    return c


# ---------------------------------------------------------------------------------------------
# Built-in corpus hook (data/synthetic.py registers itself; tests register their own).

_BUILTIN: Callable[[], Sequence[str]] | None = None


def register_builtin_corpus(fn: Callable[[], Sequence[str]] | None) -> None:
    """Sets the function that returns the built-in documents (used when ``sources`` is empty)."""
    global _BUILTIN
    _BUILTIN = fn


def builtin_corpus() -> list[str]:
    if _BUILTIN is None:
        raise RuntimeError(
            "data.sources is empty and no built-in corpus is registered: set "
            "--config.data.sources=PATH or call flaxlm.data.pipeline.register_builtin_corpus(fn)"
        )
    return list(_BUILTIN())


# ---------------------------------------------------------------------------------------------


def parse_sources(spec: str, key: str = "data.sources") -> list[tuple[str, float]]:
    """ "a/*.jsonl:0.7,b:0.3" → [("a/*.jsonl", 0.7), ("b", 0.3)]; weight defaults to 1.

    What follows an entry's last ':' is its weight when it reads as a number, else part of the
    path (``a:b.jsonl``), unless the entry matches no file and the part before the ':' does:
    then it is a weight that is not a number (``tokens:0.3x``, reported as "no files match
    'tokens:0.3x'"), a ``DataError`` naming ``key`` (the config key ``spec`` comes from), as is
    a weight not > 0 and finite. Only such an entry is looked up on disk."""
    out = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        path, _, w = entry.rpartition(":")
        try:
            out.append((path, float(w)) if path else (entry, 1.0))
        except ValueError:
            if not _matches(entry) and _matches(path):
                raise DataError(
                    f"{key}: the weight {w!r} of {path!r} is not a number (PATTERN:WEIGHT)"
                ) from None
            out.append((entry, 1.0))  # a ':' that is part of the path
    for path, w in out:
        if not 0 < w < float("inf"):  # also NaN, which grain's mix fails on without a name
            raise DataError(f"{key}: weight of {path!r} must be > 0 and finite, got {w}")
    return out


def _matches(pattern: str) -> bool:
    try:
        return bool(S.expand_paths(pattern))
    except FileNotFoundError:
        return False


def source_entries(spec: str, key: str = "data.sources") -> list[tuple[str, float]]:
    """``parse_sources(spec, key)``, every pattern checked to match a file: a ``DataError``
    naming ``key`` and the pattern, before any tokenizer or source is opened (it was the
    reader's FileNotFoundError traceback, naming no key)."""
    entries = parse_sources(spec, key)
    for pattern, _ in entries:
        try:
            S.expand_paths(pattern)
        except FileNotFoundError as e:
            raise DataError(f"{key}: {e}") from None
    return entries


def shuffle_seed(seed: int, source: int) -> int:
    """Grain's shuffle seed for source ``source`` of a run with ``seed``: ``seed * 1000 + source``
    where that fits grain's [0, 2**32) (the order runs have always had), else a hash of both (a
    run seed of 4294968 or more, or a negative one, used to stop with grain's error)."""
    s = seed * 1000 + source
    if 0 <= s < 2**32:
        return s
    digest = hashlib.sha256(f"flaxlm-shuffle:{seed}:{source}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def load_tokenizer(data_cfg: ml_collections.ConfigDict, docs: Sequence[str] | None = None):
    """The tokenizer the config implies (see ``data_config``'s ``tokenizer`` comment)."""
    if data_cfg.tokenizer:
        return open_tokenizer(data_cfg.tokenizer)
    for pattern, _ in parse_sources(data_cfg.sources):
        for path in S.expand_paths(pattern)[:1]:
            meta = S.shard_meta(path)
            tok_path = os.path.join(os.path.dirname(path), meta.get("tokenizer", ""))
            if meta.get("format") == "tokens" and os.path.isfile(tok_path):
                return open_tokenizer(tok_path, f"{pattern}: {S.META_FILE} tokenizer")
    if data_cfg.sources:
        raise DataError(
            "data.tokenizer is empty and the sources carry no tokenizer (a SentencePiece "
            ".model, an HF tokenizer.json or HF directory; pretraining from init_from takes "
            "its tokenizer)"
        )
    docs = builtin_corpus() if docs is None else docs
    digest = hashlib.sha256("\x00".join(docs).encode()).hexdigest()[:16]
    cache = os.path.expanduser(data_cfg.cache_dir)
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"builtin-{digest}-{data_cfg.builtin_vocab_size}.model")
    return train_or_load(path, docs, data_cfg.builtin_vocab_size)


def _shards_have_bos_eos(pattern: str, meta: dict) -> bool:
    """``meta.json``'s ``bos_eos``: True when token records already start/end with BOS/EOS."""
    value = meta.get("bos_eos", False) if meta.get("format") == "tokens" else False
    if not isinstance(value, bool):
        raise S.DataError(
            f"{pattern}: {S.META_FILE} has bos_eos={value!r}; it must be true or false"
        )
    return value


class _Tokenize(grain.transforms.Map):
    """str → int32 ids with BOS/EOS; pre-tokenized arrays only get BOS/EOS added."""

    def __init__(self, tok: Tokenizer, bos: bool, eos: bool):
        # An HF tokenizer encodes a special token's string in a document as text (text_only)
        self.tok, self.bos, self.eos = text_encoder(tok), bos, eos

    def map(self, doc):
        ids = self.tok.encode(doc) if isinstance(doc, str) else doc
        # A tokenizer without BOS or EOS (id -1: Qwen2's has no BOS) gets none: -1 would embed
        # as the table's last row, an arbitrary token.
        parts = [[self.tok.bos_id]] if self.bos and self.tok.bos_id >= 0 else []
        parts.append(ids)
        if self.eos and self.tok.eos_id >= 0:
            parts.append([self.tok.eos_id])
        return np.concatenate([np.asarray(p, np.int32) for p in parts])


def _check_shape(seq_len: int, batch: int) -> None:
    """Rows of ``seq_len`` tokens, ``batch`` of them: a 0 used to end the data at once (an empty
    batch), a negative one to fail in numpy naming neither."""
    for name, value in (("seq_len", seq_len), ("global_batch (config.batch_size)", batch)):
        if not (isinstance(value, (int, np.integer)) and value > 0):
            raise DataError(f"{name} must be a positive integer, got {value!r}")


def _check_read_settings(data_cfg) -> None:
    """``data.num_epochs``, ``read_threads`` and ``prefetch`` as non-negative integers: grain's
    own errors for them ("num_epochs must be positive", "'float' object cannot be interpreted as
    an integer") name no config key. ``data.pack_mode`` and ``txt_mode`` too: a misspelt mode
    was refused by the packer or the first plain-text file, after every source was opened."""
    for key in ("num_epochs", "read_threads", "prefetch"):
        value = data_cfg[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise DataError(f"data.{key} must be an integer >= 0, got {value!r}")
    if data_cfg.pack_mode not in PACK_MODES:
        raise DataError(f"data.pack_mode must be {'|'.join(PACK_MODES)}, got "
                        f"{data_cfg.pack_mode!r}")  # fmt: skip
    check_txt_mode(data_cfg.txt_mode, "data.txt_mode")


def _skipped(log: S.BadInputLog, counts: dict, examples: dict, text_field: str) -> str:
    """What ``log`` counted beyond ``counts`` (its counts before a source was opened) and
    ``examples`` (its example list lengths then), for the error of a source with no documents:
    the warning that lists bad records comes only after every source has opened."""
    new = {k: n - counts.get(k, 0) for k, n in log.counts.items() if n > counts.get(k, 0)}
    if not new:
        return ""
    parts = []
    for reason, n in new.items():
        ex = log.examples.get(reason, [])[examples.get(reason, 0) :]
        parts.append(f"{reason} x{n}" + (f", e.g. {ex[0]}" if ex else ""))
    hint = f" -- check data.text_field ({text_field!r})" if "missing_field" in new else ""
    return f": all {sum(new.values())} records were skipped ({'; '.join(parts)}){hint}"


def _source_dataset(
    pattern: str, data_cfg, log: S.BadInputLog, builtin: Sequence[str] | None, what: str
):
    """The random-access documents of one source; a ``DataError`` naming it (and the bad records
    that left it empty) when it has none."""
    if builtin is not None:
        src = S.ListSource(builtin)
    else:
        counts, examples = dict(log.counts), {k: len(v) for k, v in log.examples.items()}
        src = S.open_source(
            pattern, text_field=data_cfg.text_field, txt_mode=data_cfg.txt_mode, log=log
        )
    if len(src) == 0:
        why = "" if builtin is not None else _skipped(log, counts, examples, data_cfg.text_field)
        raise S.DataError(f"{what} {pattern or '<built-in>'} has no documents{why}")
    return src


def open_framed_source(
    pattern: str,
    data_cfg,
    tok: Tokenizer,
    log: S.BadInputLog,
    builtin: Sequence[str] | None = None,
    what: str = "data source",
):
    """(documents, their ``_Tokenize``) of one source, framed with BOS/EOS as ``data_cfg`` and the
    shards' ``meta.json`` say; training and the held-out loss (train/pretrain.py) both use it, so
    they frame alike. Token shards of another tokenizer are a ``DataError``."""
    src = _source_dataset(pattern, data_cfg, log, builtin, what)
    meta = getattr(src, "meta", {})
    if meta.get("format") == "tokens" and meta.get("tokenizer_sha256") != tok.sha256:
        raise S.DataError(
            f"{what} {pattern}: shards were tokenized with tokenizer sha256 "
            f"{meta.get('tokenizer_sha256')}, but {tok.name} is {tok.sha256}"
        )
    # Token shards whose meta.json says their records already carry BOS/EOS (written by
    # another tool) get none added again.
    framed = _shards_have_bos_eos(pattern, meta)
    bos, eos = data_cfg.add_bos and not framed, data_cfg.add_eos and not framed
    return src, _Tokenize(tok, bos, eos)


def make_pretrain_iterator(
    data_cfg: ml_collections.ConfigDict,
    *,
    seq_len: int,
    global_batch: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    vocab_size: int | None = None,
    tokenizer: Tokenizer | None = None,
) -> PackedBatchIterator:
    """This process's iterator of packed batches (see the module docstring).

    Args:
      data_cfg: the ``data`` section (``data_config()`` has every key).
      seq_len: row length T.
      global_batch: rows per step over all processes; must divide by ``process_count``.
      seed: shuffling seed (the run's seed; same seed → same batches).
      process_index, process_count: default to ``jax.process_index()/process_count()``.
      vocab_size: the model's vocab; the tokenizer must fit it.
      tokenizer: use this instead of the one ``data_cfg`` implies.
    """
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    _check_shape(seq_len, global_batch)
    _check_read_settings(data_cfg)
    # (configs older than the key: "error")
    on_changed = source_fingerprint.valid_policy(data_cfg.get("on_changed_sources", "error"))
    if global_batch % process_count:
        raise DataError(f"global_batch {global_batch} does not divide over {process_count} hosts")
    entries = source_entries(data_cfg.sources) or [("", 1.0)]
    builtin = builtin_corpus() if not data_cfg.sources else None
    tok = tokenizer or load_tokenizer(data_cfg, builtin)
    if vocab_size is not None:
        tok.check_fits(vocab_size)
    log = S.BadInputLog(strict=data_cfg.strict)
    datasets, passes, prints = [], [], []
    for i, (pattern, _) in enumerate(entries):
        src, frame = open_framed_source(pattern, data_cfg, tok, log, builtin)
        prints.append(source_fingerprint.fingerprint(pattern, len(src), builtin))
        passes.append((pattern, grain.MapDataset.source(src).map(frame)))  # for PairCheck
        ds = grain.MapDataset.source(src)
        if data_cfg.shuffle:
            ds = ds.shuffle(seed=shuffle_seed(seed, i))
        ds = ds.repeat(data_cfg.num_epochs or None)
        ds = ds[process_index::process_count]
        if len(ds) == 0:  # grain would end this process's stream at once (or fail to mix)
            raise S.DataError(
                f"data source {pattern or '<built-in>'}: {len(src)} documents x "
                f"{data_cfg.num_epochs} epoch(s) leave none for process {process_index} of "
                f"{process_count}"
            )
        datasets.append(ds.map(frame))
    if log.total:
        logging.warning("data: skipped %d bad records: %s", log.total, log.to_dict())
    weights = [w for _, w in entries]
    ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
    if len(datasets) > 1 and data_cfg.num_epochs:
        # grain's mix ends at the first exhausted source: the others are silently cut short.
        have = [len(d) for d in datasets]
        used = [min(h, round(len(ds) * w / sum(weights))) for h, w in zip(have, weights)]
        if sum(used) < sum(have) - len(have):  # beyond the rounding of the interleave
            logging.warning(
                "data: num_epochs=%d with a weighted mixture stops when the first source runs "
                "out; documents used per source (this process): %s of %s. Weights proportional "
                "to the source sizes use nearly all (grain truncates weights to integers, the "
                "smallest scaled to 100).",
                data_cfg.num_epochs,
                used,
                have,
            )
    read = grain.ReadOptions(
        num_threads=data_cfg.read_threads, prefetch_buffer_size=data_cfg.prefetch
    )
    pass_docs = max(1, sum(len(d) for _, d in passes) // process_count)  # one epoch's share
    it = PackedBatchIterator(
        iter(ds.to_iter_dataset(read)),
        seq_len=seq_len,
        batch=global_batch // process_count,
        pad_id=tok.pad_id,
        mode=data_cfg.pack_mode,
        process_index=process_index,
        process_count=process_count,
        finite=bool(data_cfg.num_epochs),
        pairs=PairCheck(passes, local=ds, local_docs=pass_docs),
        pass_docs=pass_docs,
        sources=len(datasets),
        fingerprint=prints,
        on_changed_sources=on_changed,
    )
    it.tokenizer, it.bad_input = tok, log  # for the trainer's logs and generation
    return it


def make_global(batch: dict[str, np.ndarray], sharding) -> dict:
    """Process-local rows → global ``jax.Array``s laid out by ``sharding`` (batch over data)."""
    import jax

    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
