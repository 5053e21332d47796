"""Random-access sources for the loader: ``len`` + ``__getitem__`` for grain's ``MapDataset``.

``open_source`` opens matching files as one source, which the loader (data/pipeline.py) uses to
shuffle, shard and resume by index: jsonl through a byte-offset index of its good lines,
parquet and Arrow IPC files (.arrow/.feather, HF ``datasets``' format) as an Arrow column of
their good rows (``_good_text``), ArrayRecord shards through grain (their records decode to
``str`` or ``np.int32`` token ids, as their ``meta.json`` says), compressed jsonl, a .json file
of one JSON array and plain text held in memory. Bad records are reported to the
``BadInputLog`` at open time, so they never reach training.

ArrayRecord shards written by ``flaxlm.data.preprocess`` hold token ids without BOS/EOS
(``"bos_eos": false`` in ``meta.json``) and the loader adds them; shards from other tools whose
records are already framed say ``"bos_eos": true`` and get none added.

Separate from the streaming readers (data/source_readers.py), which it builds on: those read
every record once in order, these are indexed and read many times, from grain's threads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from flaxlm.data.source_codecs import compression
from flaxlm.data.source_errors import BadInputLog, DataError
from flaxlm.data.source_paths import META_FILE, expand_paths, file_format, shard_meta
from flaxlm.data.source_readers import (
    _open_arrayrecord,
    _parse_jsonl_line,
    _text_column,
    _text_type,
    arrow_batches,
    field_index,
    holds_json_array,
    iter_documents,
    open_arrow,
    open_parquet,
    valid_batches,
)


class JsonlSource:
    """Random access to a jsonl file through a byte-offset index of its good lines.

    The index is built in one pass that also validates every line (so bad lines are reported once,
    at open time, and never reach training); only 8 bytes per document stay in memory.
    """

    def __init__(self, path: str, text_field: str, log: BadInputLog):
        self.path, self.text_field = path, text_field
        offsets = []
        with open(path, "rb") as f:
            pos = 0
            for i, raw in enumerate(f):
                if raw.strip() and _parse_jsonl_line(raw, f"{path}:{i + 1}", text_field, log):
                    offsets.append(pos)
                pos += len(raw)
        self._offsets = np.asarray(offsets, np.int64)
        self._file = None

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i: int) -> str:
        # One handle per process; pread keeps concurrent reads from grain's threads independent.
        if self._file is None:
            self._file = os.open(self.path, os.O_RDONLY)
        pos, pieces = int(self._offsets[i]), []
        while True:  # pieces until the line's end: each searched once (a 32 MB line took 9 s)
            more = os.pread(self._file, 1 << 16, pos)
            nl = more.find(b"\n")
            pieces.append(more if nl < 0 else more[:nl])
            if nl >= 0 or not more:
                break
            pos += len(more)
        return json.loads(b"".join(pieces))[self.text_field]

    def __getstate__(self):
        return {**self.__dict__, "_file": None}


def _good_text(col, path: str, field: str, log: BadInputLog):
    """The good rows of text column ``field`` of ``path`` (an Arrow array or chunked array, as
    read from a parquet or Arrow file) as one contiguous string/large_string array; a null row
    is logged as "missing_field", a blank one as "empty", at ``path:row`` (1-based, as the
    streaming reader counts rows). A column that does not hold strings is a ``DataError``
    (``_text_column``: dictionary-encoded and string_view columns are cast to large_string)."""
    import pyarrow.compute as pc

    col = _text_column(col, path, field)
    ok = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0), False)
    for row in np.flatnonzero(~np.asarray(ok)):
        reason = "missing_field" if col[int(row)].as_py() is None else "empty"
        log.add(reason, f"{path}:{row + 1}")
    return col.filter(ok).combine_chunks()


class _TextColumnSource:
    """``len`` + ``__getitem__`` over ``_col``, the good rows of one text column (``_good_text``),
    shared by the parquet and Arrow sources (neither is a kind of the other)."""

    _col = None  # set by the subclass's __init__

    def __len__(self) -> int:
        return len(self._col)

    def __getitem__(self, i: int) -> str:
        return self._col[i].as_py()


class ParquetSource(_TextColumnSource):
    """Random access to one text column of a parquet file (held as an Arrow array, not objects).

    A file that cannot be read, a missing, repeated or non-string column (checked from the
    footer, before any row is read), a corrupt row group and invalid UTF-8 are ``DataError``s
    naming the file, as the streaming reader's (and an Arrow file's) are."""

    def __init__(self, path: str, text_field: str, log: BadInputLog):
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = open_parquet(path).schema_arrow
        _text_type(schema.field(field_index(schema, path, text_field)).type, path, text_field)
        try:  # pyarrow's errors do not name the file
            # the text column alone: the others (images, metadata) may be most of the file
            col = pq.read_table(path, columns=[text_field]).column(text_field)
        except Exception as e:
            raise DataError(f"{path}: not a readable parquet file ({e})") from e
        # Each chunk validated before the string kernels see it (``valid_batches``): parquet
        # reading does not check string bytes, and invalid UTF-8 was an ArrowInvalid from
        # ``_good_text`` naming no file.
        chunks = list(valid_batches(path, iter(col.chunks), "parquet", rows=None))
        col = pa.chunked_array(chunks, type=col.type)
        self._col = _good_text(col, path, text_field, log)


class ArrowSource(_TextColumnSource):
    """Random access to one text column of an Arrow IPC file (.arrow/.feather: the stream format
    of HF ``datasets``, or the file format), held as an Arrow array like a parquet file's.

    Only that column is read (``open_arrow``), batch by batch (``arrow_batches``: each
    validated, a damaged one a ``DataError`` naming its first row); the good rows are copied
    out of the memory map (``_good_text``), so the source pickles to grain's workers without
    the file."""

    def __init__(self, path: str, text_field: str, log: BadInputLog):
        import pyarrow as pa

        reader = open_arrow(path, text_field)
        chunks = [b.column(0) for b in arrow_batches(path, reader, rows=None)]
        col = pa.chunked_array(chunks, type=reader.schema.field(0).type)
        self._col = _good_text(col, path, text_field, log)


def _count_records(path: str) -> int:
    reader = _open_arrayrecord(path)
    try:
        return reader.num_records()
    finally:
        reader.close()


class ArrayRecordSource:
    """Shards written by preprocess: records decode to ``str`` or ``np.int32`` token arrays.

    A shard that cannot be opened (truncated, not ArrayRecord) or a record that cannot be read
    or decoded (corrupt chunk, a byte count that is not whole int32 ids, ids outside the
    ``vocab_size`` of ``meta.json``, text that is not UTF-8) raises ``DataError`` naming
    ``shard:record`` (1-based); nothing is skipped."""

    def __init__(self, paths: list[str]):
        import concurrent.futures

        import grain

        metas = {json.dumps(shard_meta(p), sort_keys=True) for p in paths}
        if len(metas) != 1:
            raise DataError(f"shards {paths[0]}... mix formats/tokenizers: {sorted(metas)}")
        self.meta = shard_meta(paths[0])
        self.tokens = self.meta.get("format") == "tokens"
        self._vocab = self.meta.get("vocab_size") if self.tokens else None
        self.paths = list(paths)
        with concurrent.futures.ThreadPoolExecutor(min(16, len(paths))) as pool:
            counts = list(pool.map(_count_records, self.paths))
        self._ends = np.cumsum(counts)
        # "path[0:n]": grain takes the counts from here instead of opening every shard again.
        self._src = grain.sources.ArrayRecordDataSource(
            [f"{p}[0:{n}]" for p, n in zip(self.paths, counts)]
        )

    def __len__(self) -> int:
        return len(self._src)

    def _loc(self, i: int) -> str:
        k = int(np.searchsorted(self._ends, i, side="right"))
        return f"{self.paths[k]}:{i - (int(self._ends[k - 1]) if k else 0) + 1}"

    def __getitem__(self, i: int):
        try:
            raw = self._src[i]
        except Exception as e:
            raise DataError(f"{self._loc(i)}: cannot read the record ({e})") from e
        if not self.tokens:
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{self._loc(i)}: invalid UTF-8 in a text shard ({str(e)[:80]}); token-id "
                    f"shards need the {META_FILE} preprocess wrote beside them"
                ) from e
        if len(raw) % 4:
            raise DataError(f"{self._loc(i)}: {len(raw)} bytes is not a whole number of int32 ids")
        ids = np.frombuffer(raw, np.int32)
        if self._vocab and ids.size and (ids.min() < 0 or ids.max() >= self._vocab):
            raise DataError(
                f"{self._loc(i)}: token id {int(ids.min() if ids.min() < 0 else ids.max())} is "
                f"outside the shards' vocab_size {self._vocab}"
            )
        return ids


class ListSource:
    """In-memory documents (the built-in corpus, tests, plain text files)."""

    def __init__(self, docs: Sequence):
        self._docs = list(docs)

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, i: int):
        return self._docs[i]


class ConcatSource:
    """Several random-access sources seen as one."""

    def __init__(self, parts: list):
        self.parts = parts
        self._ends = np.cumsum([len(p) for p in parts])

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, i: int):
        k = int(np.searchsorted(self._ends, i, side="right"))
        return self.parts[k][i - (int(self._ends[k - 1]) if k else 0)]


def open_source(
    patterns: str | Sequence[str],
    *,
    text_field: str = "text",
    txt_mode: str = "file",
    log: BadInputLog | None = None,
):
    """Random-access source over matching files; bad records are reported to ``log`` at open."""
    log = log if log is not None else BadInputLog()
    paths = expand_paths(patterns)
    fmts = {file_format(p) for p in paths}
    if fmts == {"arrayrecord"}:
        return ArrayRecordSource(paths)
    parts = []
    for p in paths:
        fmt = file_format(p)
        if fmt == "jsonl" and compression(p) is None and not holds_json_array(p):
            parts.append(JsonlSource(p, text_field, log))
        elif fmt == "parquet":
            parts.append(ParquetSource(p, text_field, log))
        elif fmt == "arrow":
            parts.append(ArrowSource(p, text_field, log))
        # compressed, a JSON array or WARC (extracted text): no record offsets; in memory
        elif fmt in ("text", "jsonl", "warc"):
            docs = iter_documents(p, text_field=text_field, txt_mode=txt_mode, log=log)
            parts.append(ListSource([d.text for d in docs]))
        else:
            raise DataError(f"{p}: ArrayRecord shards cannot be mixed with {fmts - {fmt}} here")
    return parts[0] if len(parts) == 1 else ConcatSource(parts)
