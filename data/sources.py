"""Readers for raw and prepared text: jsonl, plain text, parquet and ArrayRecord.

jsonl and plain text may be gzip (``.gz``) or zstd (``.zst``, with the ``zstandard`` package)
compressed; the codec is read from the file's first bytes (``compression``), and other codecs,
or a ``.gz`` that is not gzip, are a ``DataError`` naming the file. A directory that is a
``flaxlm.data.preprocess`` output reads as its corpus (``preprocess_corpus``); any other as its
data files (``is_data_file``: a README, ``_SUCCESS`` or hidden ``.crc`` beside them is skipped).

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
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import json
import logging
import os
import re
import zlib
from collections.abc import Iterator, Sequence

import numpy as np

META_FILE = "meta.json"
MAX_EXAMPLES = 5  # bad-input examples kept per reason for the report


class DataError(ValueError):
    """Bad input; the message starts with ``file:line``."""


@dataclasses.dataclass
class Document:
    text: str
    loc: str  # "path:line" (1-based line or record number), for reports and errors
    key: tuple[int, int]  # (file index, record index): a total, deterministic order


@dataclasses.dataclass
class BadInputLog:
    """Counts bad records per reason; raises on the first one when ``strict``."""

    strict: bool = False
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def add(self, reason: str, loc: str, detail: str = "") -> None:
        msg = f"{loc}: {reason}" + (f" ({detail})" if detail else "")
        if self.strict:
            raise DataError(msg)
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(msg)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": dict(self.examples)}


def expand_paths(patterns: str | Sequence[str]) -> list[str]:
    """Globs (``*``, ``**``) and directories → sorted files; an unmatched pattern is an error.

    A preprocess output directory is its corpus (``preprocess_corpus``), not its report files.
    Any other directory is its data files (``is_data_file``): hidden and ``_``-prefixed names
    (``.part-0.jsonl.crc``, ``_SUCCESS``) are skipped silently, other names no reader knows
    (``README.md``) with a warning naming them; were they all there is, the error names them.

    An existing file is itself, whatever its name: ``part[1].jsonl`` read as a glob matched
    ``part1.jsonl`` (or nothing), never the file named. A glob keeps files only (``**`` also
    matches directories) and, like a directory, skips shards' ``meta.json`` and ``_``-prefixed
    markers (``_SUCCESS``) unless its last part starts with ``_``. A file that several
    patterns match is read once, where it first appears (reading it twice made its documents
    exact duplicates of themselves).
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    out: dict[str, str] = {}  # real path -> the path as matched, in first-seen order
    for pat in patterns:
        if os.path.isfile(pat):
            hits = [pat]
        elif os.path.isdir(pat):
            pat = preprocess_corpus(pat)
            hits = _directory_files(pat)
        else:
            hits = sorted(
                p
                for p in glob.glob(pat, recursive=True)
                if os.path.isfile(p) and _glob_keeps(pat, os.path.basename(p))
            )
        if not hits:
            raise FileNotFoundError(f"no files match {pat!r}")
        for h in hits:
            out.setdefault(os.path.realpath(h), h)
    return list(out.values())


def _glob_keeps(pattern: str, name: str) -> bool:
    """Whether a glob's match ``name`` is read: not a shards' ``meta.json``, and not a
    ``_``-prefixed marker (``_SUCCESS``, ``_committed_*``: ``out/*`` used to train on them as
    text) unless the pattern's own last part starts with ``_`` (the user asked for them). Python's
    glob already leaves hidden names to patterns that start with a dot."""
    if name == META_FILE:
        return False
    return not name.startswith("_") or os.path.basename(pattern).startswith("_")


# What a directory holds that is data: the formats ``file_format`` reads by name, each possibly
# compressed (``_codec_suffix``; an unsupported codec is kept, so that reading it names the file).
# Plain text is any name to ``file_format``, but a directory also holds text that is not data.
_DATA_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet", ".array_record", ".txt", ".text")
_WARNED_DIRS: set[str] = set()  # directories whose skipped files were logged (once a process)


def is_data_file(name: str) -> bool:
    """Whether a file a directory holds is data: not hidden or ``_``-prefixed (checksums, Spark's
    and Hadoop's ``_SUCCESS`` and ``_committed_*`` markers), not ``meta.json``, and named as a
    format the readers know (jsonl/json/ndjson, parquet, ArrayRecord, .txt/.text, compressed or
    not)."""
    if name.startswith((".", "_")) or name == META_FILE:
        return False
    low = name.lower()
    low = low[: len(low) - len(_codec_suffix(low))]
    return low.endswith(_DATA_SUFFIXES) or ".arrayrecord" in low


def _directory_files(path: str) -> list[str]:
    """The sorted data files of directory ``path`` (``is_data_file``).

    Its other files used to be trained on as text (a README, a ``_SUCCESS`` marker, a hidden
    ``.crc`` checksum as invalid UTF-8). A README beside the data is common and harmless, so
    names no reader knows are skipped with a warning rather than refused; hidden and
    ``_``-prefixed ones are conventionally not data and are skipped without one. A directory of
    nothing but skipped files is an error naming them: such names are read when given as files
    or matched by a glob.
    """
    names = sorted(f for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
    data = [f for f in names if is_data_file(f)]
    other = [f for f in names if f not in data and f != META_FILE and f[:1] not in "._"]
    if not data:
        raise FileNotFoundError(
            f"no data files in directory {path!r}"
            + (f" (skipped {other}: not {'/'.join(_DATA_SUFFIXES)}/.arrayrecord)" if other else "")
            + "; name the files, or match them with a glob such as "
            + repr(os.path.join(path, "*"))
        )
    if other and path not in _WARNED_DIRS:
        _WARNED_DIRS.add(path)
        logging.warning(
            "data: %s: skipped %d file(s) that are not data (%s); data files end in %s or "
            "contain .arrayrecord, optionally compressed",
            path,
            len(other),
            ", ".join(other[:10]) + (", ..." if len(other) > 10 else ""),
            "/".join(_DATA_SUFFIXES),
        )
    return [os.path.join(path, f) for f in data]


def preprocess_corpus(path: str) -> str:
    """The corpus inside a ``flaxlm.data.preprocess`` output directory, else ``path`` itself.

    Such a directory (``report.json`` beside ``tokens/`` or ``text/``) holds one corpus in its
    subdirectory and, at its top, files that are not data (report.md, report.json,
    tokenizer.model): read as the directory's files, those were trained on as text. The corpus is
    ``tokens/`` when there is one (what the loader trains on), else the text shards of a run
    without a tokenizer.
    """
    if not os.path.isfile(os.path.join(path, "report.json")):
        return path
    for sub in ("tokens", "text"):
        if os.path.isdir(os.path.join(path, sub)):
            return os.path.join(path, sub)
    return path


# Compressed jsonl/text is decompressed as it is read. Which codec: the file's first bytes, not
# its name (none of these magics is valid UTF-8 text, or even printable): a gzip file named
# .jsonl is read, and a file named .gz that is not gzip is an error, never text.
_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}
_CODEC_SUFFIX = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_UNSUPPORTED = {
    ".bz2": "bzip2", ".xz": "xz", ".lzma": "lzma", ".zip": "zip", ".7z": "7z", ".lz4": "lz4",
    ".br": "brotli", ".tar": "tar", ".tgz": "tar",
}  # fmt: skip
_UNSUPPORTED_MAGIC = {b"\xfd7zXZ\x00": "xz", b"PK\x03\x04": "zip", b"7z\xbc\xaf": "7z"}


def _codec_suffix(name: str) -> str:
    """The compression suffix of a (lower-case) file name, or ""."""
    ext = os.path.splitext(name)[1]
    return ext if ext in _CODEC_SUFFIX or ext in _UNSUPPORTED else ""


def file_format(path: str) -> str:
    """'jsonl' | 'text' | 'parquet' | 'arrayrecord' from the file name (``x.jsonl.gz`` and
    ``x.jsonl.zst`` are jsonl: see ``open_bytes``)."""
    name = path.lower()
    name = name[: len(name) - len(_codec_suffix(name))]
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if ".arrayrecord" in name or name.endswith(".array_record"):
        return "arrayrecord"
    return "text"


def compression(path: str) -> str | None:
    """'gzip' | 'zstd' for a compressed file (by its first bytes), None for an uncompressed one;
    ``DataError`` naming the file for a codec that is not read (bzip2, xz, zip, ...) or a file
    whose name says gzip/zstd but whose bytes are not."""
    with open(path, "rb") as f:
        head = f.read(8)
    codec = next((c for m, c in _MAGIC.items() if head.startswith(m)), None)
    suffix = _codec_suffix(path.lower())
    bad = _UNSUPPORTED.get(suffix) or next(
        (c for m, c in _UNSUPPORTED_MAGIC.items() if head.startswith(m)), None
    )
    if codec is None and bad:
        raise DataError(
            f"{path}: {bad}-compressed input is not supported; decompress it, or recompress it "
            "with gzip (.gz) or zstd (.zst)"
        )
    if codec is None and suffix in _CODEC_SUFFIX:
        raise DataError(f"{path}: named {suffix} but is not {_CODEC_SUFFIX[suffix]}-compressed")
    return codec


class _Decompressed(io.RawIOBase):
    """A decompressing reader whose corrupt or truncated stream is a ``DataError`` naming the
    file (gzip's "Compressed file ended before the end-of-stream marker was reached" and zstd's
    errors name nothing). The records before the damage have been read; the rest cannot be
    counted, so this is an error in lenient mode too (as a corrupt parquet row group is)."""

    def __init__(self, path: str, raw, errors: tuple[type[BaseException], ...]):
        self.path, self._raw, self._errors = path, raw, errors

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            data = self._raw.read(len(b))
        except self._errors as e:
            raise DataError(f"{self.path}: cannot decompress ({e})") from e
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_bytes(path: str):
    """A binary reader of ``path``'s content, decompressed when it is gzip or zstd."""
    codec = compression(path)
    if codec is None:
        return open(path, "rb")
    if codec == "gzip":
        raw, errors = gzip.open(path, "rb"), (OSError, EOFError, zlib.error)
    else:
        try:
            import zstandard  # not a declared dependency of flaxlm (apache-beam installs it)
        except ImportError:
            raise DataError(
                f"{path}: is zstd-compressed; reading it needs the zstandard package "
                "(pip install zstandard), or decompress it first"
            ) from None
        raw = zstandard.ZstdDecompressor().stream_reader(
            open(path, "rb"), read_across_frames=True, closefd=True
        )
        errors = (OSError, EOFError, zstandard.ZstdError)
    return io.BufferedReader(_Decompressed(path, raw, errors), 1 << 16)


def shard_meta(path: str) -> dict:
    """The ``meta.json`` beside an ArrayRecord shard, or ``{"format": "text"}`` if there is none."""
    meta_path = os.path.join(os.path.dirname(path), META_FILE)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            return json.load(f)
    return {"format": "text"}


def _check_text(text, loc: str, log: BadInputLog) -> bool:
    if text is None:
        log.add("missing_field", loc)
        return False
    if not isinstance(text, str):
        log.add("missing_field", loc, f"not a string: {type(text).__name__}")
        return False
    if not text.strip():
        log.add("empty", loc)
        return False
    return True


_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def lone_surrogate(value, where: str = "") -> str | None:
    """Where a JSON value (strings, keys and values of nested lists/objects) holds a lone
    surrogate, as a report detail; None when it holds none.

    A lone surrogate escape (``"\\ud83d"``, half an emoji cut by a truncating tool) makes text
    that cannot be written as UTF-8 nor encoded by SentencePiece: counted as ``invalid_utf8``
    where it is read, never a crash (with no location) where the text is used.
    """
    if isinstance(value, str):
        if m := _SURROGATE_RE.search(value):
            at = f" of {where}" if where else ""
            return f"lone surrogate {m.group()!a} at character {m.start()}{at}"
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for k, v in items:
        if isinstance(value, dict) and (found := lone_surrogate(k)):
            return f"{found} of a key in {where or 'the record'}"  # the key itself: not printable
        key = k if isinstance(value, list) else f".{k}" if where else str(k)
        if found := lone_surrogate(v, where + key):
            return found
    return None


def _json_value(raw: bytes, loc: str, log: BadInputLog) -> tuple[bool, object]:
    """(True, the JSON value of one jsonl line) or (False, None) with the reason logged under
    ``loc``. A UTF-8 byte-order mark before the record (a file saved by Notepad) is not part of
    it."""
    try:
        line = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        log.add("invalid_utf8", loc, str(e)[:80])
        return False, None
    try:
        return True, json.loads(line)
    except json.JSONDecodeError as e:
        log.add("malformed_json", loc, str(e)[:80])
        return False, None


def jsonl_record(raw: bytes, loc: str, log: BadInputLog) -> tuple[bool, object]:
    """(True, record) of one line of a chat/preference jsonl file, read as the pretraining reader
    reads a line (BOM, invalid UTF-8, malformed JSON), or (False, None) with the reason logged:
    a lone surrogate anywhere in the record is ``invalid_utf8`` (``lone_surrogate``). Any JSON
    value is a record here; the chat format says what a record must hold."""
    ok, obj = _json_value(raw, loc, log)
    if ok and (where := lone_surrogate(obj)):
        log.add("invalid_utf8", loc, where)
        return False, None
    return ok, obj


def _parse_jsonl_line(raw: bytes, loc: str, field: str, log: BadInputLog) -> str | None:
    """One jsonl record's text, or None (the reason logged under ``loc``): see ``_json_value``
    and ``lone_surrogate`` (only the text field is checked: nothing else is used)."""
    ok, obj = _json_value(raw, loc, log)
    if not ok:
        return None
    if not isinstance(obj, dict):
        log.add("missing_field", loc, f"not a JSON object: {type(obj).__name__}")
        return None
    if field not in obj:
        log.add("missing_field", loc, f"no {field!r}")
        return None
    text = obj[field]
    if isinstance(text, str) and (where := lone_surrogate(text)):
        log.add("invalid_utf8", loc, where)
        return None
    return text if _check_text(text, loc, log) else None


def _iter_file(path: str, fi: int, field: str, txt_mode: str, log: BadInputLog):
    fmt = file_format(path)
    if fmt == "jsonl":
        with open_bytes(path) as f:
            for i, raw in enumerate(f):
                if not raw.strip():  # blank separator lines are not records
                    continue
                loc = f"{path}:{i + 1}"
                text = _parse_jsonl_line(raw, loc, field, log)
                yield i, loc, text
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        # pyarrow's errors do not name the file ("Parquet magic bytes not found in footer").
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            raise DataError(f"{path}: not a readable parquet file ({e})") from e
        if field not in pf.schema_arrow.names:
            raise DataError(f"{path}: no column {field!r} (columns: {pf.schema_arrow.names})")
        row, batches = 0, pf.iter_batches(columns=[field], batch_size=1024)
        while True:
            try:
                batch = next(batches, None)
            except Exception as e:  # a corrupt row group: the rows after it cannot be counted
                raise DataError(f"{path}:{row + 1}: cannot read the parquet rows ({e})") from e
            if batch is None:
                break
            for text in batch.column(0).to_pylist():
                loc = f"{path}:{row + 1}"
                yield row, loc, (text if _check_text(text, loc, log) else None)
                row += 1
    elif fmt == "arrayrecord":
        if shard_meta(path).get("format") != "text":
            raise DataError(f"{path}: holds token ids, not text; read it with the loader")
        reader = _open_arrayrecord(path)
        try:
            for i in range(reader.num_records()):
                loc = f"{path}:{i + 1}"
                text = _decode(reader.read([i])[0], loc, log)
                yield i, loc, (text if text is not None and _check_text(text, loc, log) else None)
        finally:
            reader.close()
    else:
        yield from _iter_text_file(path, txt_mode, log)


def _decode(raw: bytes, loc: str, log: BadInputLog) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        log.add("invalid_utf8", loc, str(e)[:80])
        return None


def _iter_text_file(path: str, txt_mode: str, log: BadInputLog):
    """Plain text: one document per file, per line, or per blank-line-separated block."""
    if txt_mode == "file":
        with open_bytes(path) as f:
            loc = f"{path}:1"
            text = _decode(f.read(), loc, log)
        yield 0, loc, (text if text is not None and _check_text(text, loc, log) else None)
        return
    if txt_mode not in ("line", "blank"):
        raise ValueError(f"txt_mode must be file|line|blank, got {txt_mode!r}")
    block: list[str] = []
    # "blank" mode: a block with invalid UTF-8 is one document lost, counted once at its first
    # bad line (logging every bad line counted a block with two of them as two documents).
    start, bad = None, None  # first line of the current block; (loc, error) of its first bad line
    with open_bytes(path) as f:
        for i, raw in enumerate(f):
            loc = f"{path}:{i + 1}"
            if txt_mode == "line":
                line = _decode(raw, loc, log)
                if line is None or line.strip():  # empty lines are separators, not documents
                    # "\r\n" too: a CRLF file's lines ended in "\r", kept in the document
                    yield i, loc, (None if line is None else line.rstrip("\r\n"))
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                start = i if start is None else start
                bad = bad or (loc, str(e)[:80])
                continue
            if not line.strip():
                if start is not None:
                    yield start, f"{path}:{start + 1}", _end_block(block, bad, log)
                block, start, bad = [], None, None
                continue
            start = i if start is None else start
            block.append(line)
    if start is not None:
        yield start, f"{path}:{start + 1}", _end_block(block, bad, log)


def _end_block(block: list[str], bad: tuple[str, str] | None, log: BadInputLog) -> str | None:
    """The text of a finished blank-line block, or None after logging its first bad line."""
    if bad is None:
        return "".join(block).strip()
    log.add("invalid_utf8", *bad)
    return None


def iter_documents(
    patterns: str | Sequence[str],
    *,
    text_field: str = "text",
    txt_mode: str = "file",
    log: BadInputLog | None = None,
    file_index_offset: int = 0,
) -> Iterator[Document]:
    """Streams good documents in a deterministic order; bad records go to ``log``.

    Every record read is either yielded or counted in ``log`` (or raises when ``log.strict``).
    """
    log = log if log is not None else BadInputLog()
    for fi, path in enumerate(expand_paths(patterns)):
        for ri, loc, text in _iter_file(path, fi, text_field, txt_mode, log):
            if text is not None:
                yield Document(text=text, loc=loc, key=(fi + file_index_offset, ri))


# ---------------------------------------------------------------------------------------------
# Random access for the loader.


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
        off = int(self._offsets[i])
        chunk = b""
        while not chunk.endswith(b"\n"):
            more = os.pread(self._file, 1 << 16, off + len(chunk))
            if not more:
                break
            chunk += more
            nl = chunk.find(b"\n")
            if nl >= 0:
                chunk = chunk[: nl + 1]
        return json.loads(chunk)[self.text_field]

    def __getstate__(self):
        return {**self.__dict__, "_file": None}


class ParquetSource:
    """Random access to one text column of a parquet file (held as an Arrow array, not objects)."""

    def __init__(self, path: str, text_field: str, log: BadInputLog):
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        try:  # pyarrow's errors do not name the file
            table = pq.read_table(path)
        except Exception as e:
            raise DataError(f"{path}: not a readable parquet file ({e})") from e
        if text_field not in table.column_names:
            raise DataError(f"{path}: no column {text_field!r} (columns: {table.column_names})")
        col = table.column(text_field)
        # A dictionary-encoded column (pandas' categorical; what iter_documents reads as text)
        # holds strings too: decoded, to large_string so that repeated values cannot overflow
        # string's 32-bit offsets. string_view likewise, for the string compute kernels below.
        typ = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
        is_view = getattr(pa.types, "is_string_view", lambda t: False)(typ)
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or is_view):
            raise DataError(f"{path}: column {text_field!r} has type {col.type}, not string")
        if typ != col.type or is_view:
            col = col.cast(pa.large_string())
        ok = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0), False)
        for row in np.flatnonzero(~np.asarray(ok)):
            reason = "missing_field" if col[int(row)].as_py() is None else "empty"
            log.add(reason, f"{path}:{row + 1}")
        self._col = col.filter(ok).combine_chunks()

    def __len__(self) -> int:
        return len(self._col)

    def __getitem__(self, i: int) -> str:
        return self._col[i].as_py()


def _open_arrayrecord(path: str):
    """An ArrayRecordReader of ``path``; DataError naming it when the shard is truncated or not
    ArrayRecord (the reader then reports 0 records, and only ``close`` raises the cause)."""
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path)
    if reader.ok():
        return reader
    try:
        reader.close()
        cause = "unreadable"
    except Exception as e:
        cause = str(e) or "truncated or empty"
    raise DataError(f"{path}: not a readable ArrayRecord shard ({cause})")


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
        if fmt == "jsonl" and compression(p) is None:
            parts.append(JsonlSource(p, text_field, log))
        elif fmt == "parquet":
            parts.append(ParquetSource(p, text_field, log))
        elif fmt in ("text", "jsonl"):  # compressed jsonl has no byte offsets: held in memory
            docs = iter_documents(p, text_field=text_field, txt_mode=txt_mode, log=log)
            parts.append(ListSource([d.text for d in docs]))
        else:
            raise DataError(f"{p}: ArrayRecord shards cannot be mixed with {fmts - {fmt}} here")
    return parts[0] if len(parts) == 1 else ConcatSource(parts)
