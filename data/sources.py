"""Readers for raw and prepared text: jsonl, plain text, parquet, Arrow, WARC and ArrayRecord.

The front door: callers import ``from flaxlm.data import sources as S`` (the loader, preprocess,
Beam, the chat records, the tests), and this module re-exports the names of the five modules
that hold the code (each imports only the ones listed before it):

  * data/source_errors.py — the bad-input policy: ``DataError``, ``BadInputLog``,
    ``MAX_EXAMPLES``.
  * data/source_codecs.py — compression: ``compression`` (the codec from the file's first
    bytes), ``open_bytes`` (a decompressing reader).
  * data/source_paths.py — which files a pattern names: ``expand_paths``, ``is_data_file``,
    ``preprocess_corpus``, ``shard_set_dirs``, ``file_format``, ``shard_meta``, ``META_FILE``.
  * (data/source_warc.py — WARC/WET records and their documents, with data/html_text.py's
    HTML → main text: what ``_iter_file`` reads a WARC file with; not re-exported here.)
  * data/source_readers.py — streaming: ``iter_documents`` / ``Document``, the per-format
    readers (``_iter_file``; Arrow IPC files through ``open_arrow`` and ``arrow_batches``),
    ``jsonl_record`` and ``lone_surrogate``.
  * data/source_access.py — random access for the loader: ``open_source`` and the
    ``JsonlSource``, ``ParquetSource``, ``ArrowSource``, ``ArrayRecordSource``, ``ListSource``
    and ``ConcatSource`` it builds.

jsonl and plain text may be gzip (``.gz``) or zstd (``.zst``) compressed. Arrow means Arrow IPC
files named .arrow or .feather: the stream format HF ``datasets`` writes (``save_to_disk``, its
cache) or the file format (Feather v2), read one column at a time as parquet is. A directory that
is a ``flaxlm.data.preprocess`` output reads as its corpus; any other as its data files. WARC
files (.warc, .warc.gz, Common Crawl's .warc.wet.gz) give their WET text and HTML pages' main
text, each with its URL.

Two access patterns share one error policy:

* ``iter_documents`` streams documents in a fixed order (sorted files, then record order); the
  preprocess CLI and the Beam pipeline use it, so memory does not grow with the input.
* ``open_source`` gives random access (``len`` + ``__getitem__``) for grain's ``MapDataset``; the
  loader uses it to shuffle, shard and resume by index.

Bad input (malformed JSON, invalid UTF-8, a missing or non-string text field, an empty document)
is never dropped silently. In lenient mode (the default) it is counted per reason in a
``BadInputLog`` with a few ``file:line`` examples for the report; with ``strict=True`` the first
bad record raises ``DataError`` naming ``file:line``.

ArrayRecord shards written by ``flaxlm.data.preprocess`` hold either UTF-8 text or int32 token ids
(little-endian bytes); a ``meta.json`` beside the shards says which. Preprocess writes ids without
BOS/EOS (``"bos_eos": false``) and the loader adds them; shards from other tools whose records
are already framed say ``"bos_eos": true`` and get none added.

The private helpers are re-exported too (data/beam.py uses ``_iter_file``), and the module-level
state is the same object here and where it is defined (``S._WARNED_DIRS is
source_paths._WARNED_DIRS``). A monkeypatch of ``S.<name>`` reaches only callers that look the
name up through this module; code inside the five modules calls its neighbours directly, so
patch a name in the module that holds its caller to change what that module calls.
"""

from __future__ import annotations

from flaxlm.data.source_access import (
    ArrayRecordSource,
    ArrowSource,
    ConcatSource,
    JsonlSource,
    ListSource,
    ParquetSource,
    _count_records,
    _good_text,
    open_source,
)
from flaxlm.data.source_codecs import (
    _CODEC_SUFFIX,
    _MAGIC,
    _UNSUPPORTED,
    _UNSUPPORTED_MAGIC,
    _codec_suffix,
    _Decompressed,
    compression,
    open_bytes,
)
from flaxlm.data.source_errors import MAX_EXAMPLES, BadInputLog, DataError
from flaxlm.data.source_paths import (
    _DATA_SUFFIXES,
    _WARNED_DIRS,
    META_FILE,
    _directory_files,
    _glob_keeps,
    expand_paths,
    file_format,
    is_data_file,
    preprocess_corpus,
    shard_meta,
    shard_set_dirs,
)
from flaxlm.data.source_readers import (
    _SURROGATE_RE,
    ARROW_BATCH_ROWS,
    Document,
    _check_text,
    _decode,
    _end_block,
    _iter_file,
    _iter_text_file,
    _json_value,
    _open_arrayrecord,
    _parse_jsonl_line,
    _text_column,
    _text_type,
    arrow_batches,
    iter_documents,
    jsonl_record,
    lone_surrogate,
    open_arrow,
)

__all__ = [
    # source_errors
    "MAX_EXAMPLES",
    "BadInputLog",
    "DataError",
    # source_codecs
    "_CODEC_SUFFIX",
    "_MAGIC",
    "_UNSUPPORTED",
    "_UNSUPPORTED_MAGIC",
    "_Decompressed",
    "_codec_suffix",
    "compression",
    "open_bytes",
    # source_paths
    "META_FILE",
    "_DATA_SUFFIXES",
    "_WARNED_DIRS",
    "_directory_files",
    "_glob_keeps",
    "expand_paths",
    "file_format",
    "is_data_file",
    "preprocess_corpus",
    "shard_meta",
    "shard_set_dirs",
    # source_readers
    "ARROW_BATCH_ROWS",
    "Document",
    "_SURROGATE_RE",
    "_check_text",
    "_decode",
    "_end_block",
    "_iter_file",
    "_iter_text_file",
    "_json_value",
    "_open_arrayrecord",
    "_parse_jsonl_line",
    "_text_column",
    "_text_type",
    "arrow_batches",
    "iter_documents",
    "jsonl_record",
    "lone_surrogate",
    "open_arrow",
    # source_access
    "ArrayRecordSource",
    "ArrowSource",
    "ConcatSource",
    "JsonlSource",
    "ListSource",
    "ParquetSource",
    "_count_records",
    "_good_text",
    "open_source",
]
