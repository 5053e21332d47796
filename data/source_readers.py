"""Streaming readers of raw and prepared text: jsonl, plain text, parquet, Arrow, WARC and
ArrayRecord.

``iter_documents`` streams documents in a fixed order (sorted files, then record order); the
preprocess CLI and the Beam pipeline use it (the Beam pipeline reads one file with
``_iter_file``), so memory does not grow with the input. Every record read is either yielded
or counted in the ``BadInputLog`` (data/source_errors.py: bad input, or ``skipped`` when it is
not a document). ``jsonl_record`` reads one jsonl line as this reader does, for the
chat/preference records (data/chat_records.py).

A .json file is JSON lines, or one JSON array of records (``holds_json_array``, from its first
character): an array is read whole (``read_json_array``) and its elements are the records,
counted by element index; the chat/preference reader shares both.

Arrow IPC files (.arrow/.feather: the stream format HF ``datasets`` writes with ``save_to_disk``
and in its cache, or the file format, Feather v2) are memory-mapped and read as parquet is, one
column batch by batch (``open_arrow``, ``arrow_batches``; the chat/preference reader reads whole
rows through them); a text column may be string, large_string, string_view or those
dictionary-encoded (``_text_type``). Parquet files go through the same checks (``open_parquet``,
``parquet_batches``): a missing, repeated (``field_index``) or non-string column is one
``DataError`` for the file, and every batch is validated (``valid_batches``), so a damaged file
or invalid UTF-8 is a ``DataError`` naming the file (and row), never a bare pyarrow error.

WARC files (``.warc``, Common Crawl's ``.warc.gz`` and ``.warc.wet.gz``) are read record by
record by data/source_warc.py: a WET conversion record's text, or the main text of an HTML
response (data/html_text.py), is a document, loc ``path:<record number>``, its URL the record's
WARC-Target-URI whatever ``url_field`` says; records that are not documents (requests,
metadata, redirects, images) are counted in ``BadInputLog.skipped``, not yielded.

ArrayRecord shards written by ``flaxlm.data.preprocess`` hold either UTF-8 text or int32 token ids
(little-endian bytes); a ``meta.json`` beside the shards says which. Only text shards are read
here; token-id shards are the loader's (data/source_access.py).

Separate from the random-access sources (data/source_access.py): those index files to read
records many times, in any order, and build on this module's per-record checks
(``_parse_jsonl_line``, ``_open_arrayrecord``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Sequence

from flaxlm.data.source_codecs import _codec_suffix, numbered_lines, open_bytes, read_all
from flaxlm.data.source_errors import BadInputLog, DataError
from flaxlm.data.source_paths import expand_paths, file_format, shard_meta
from flaxlm.data.source_warc import iter_warc


@dataclasses.dataclass
class Document:
    text: str
    loc: str  # "path:line" (1-based line or record number; "path[i]": a JSON array's element i)
    key: tuple[int, int]  # (file index, record index): a total, deterministic order
    # the record's ``url_field`` (iter_documents), None when not asked, absent or not a string;
    # a WARC record's WARC-Target-URI
    url: str | None = None


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
        # Without the line's end: a truncated record's error was about that newline ("Invalid
        # control character", or "line 2 column 1" beside the file's own line number).
        return True, json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        log.add("malformed_json", loc, f"{e.msg}: column {e.colno}"[:80])
        return False, None
    except RecursionError:  # nested past Python's recursion limit: a traceback ended the run
        log.add("malformed_json", loc, "nested too deeply to parse")
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
    and ``_record_text``."""
    ok, obj = _json_value(raw, loc, log)
    return _record_text(obj, loc, field, log) if ok else None


def _record_text(obj, loc: str, field: str, log: BadInputLog) -> str | None:
    """The text field of one JSON record (a jsonl line's, a JSON array's element), or None with
    the reason logged under ``loc``; a lone surrogate is ``invalid_utf8`` (``lone_surrogate``:
    only the text field is checked, nothing else is used)."""
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


def holds_json_array(path: str) -> bool:
    """Whether a .json file (gzip/zstd too) holds one JSON array (``json.dump(records)``, the
    Alpaca style): its first character after a BOM and whitespace is "[". A .json file of JSON
    lines (what `datasets` writes) starts with "{". Other names are never arrays (.jsonl and
    .ndjson are lines by definition), so only a .json file's first bytes are read."""
    name = path.lower()
    if not name[: len(name) - len(_codec_suffix(name))].endswith(".json"):
        return False
    with open_bytes(path) as f:
        while chunk := f.read(1 << 12):
            head = chunk.lstrip(b"\xef\xbb\xbf \t\r\n")
            if head:
                return head.startswith(b"[")
    return False


def read_json_array(path: str) -> list:
    """The elements of a file holding one JSON array (``holds_json_array``). The file is read
    and parsed whole: its records are not lines, so there is no streaming through it (a large
    corpus belongs in jsonl). ``DataError`` naming the file when it is not UTF-8 or does not
    parse (one error for the file, not one per line)."""
    raw = read_all(path)
    try:
        value = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: holds a JSON array that is not UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: holds a JSON array (it starts with '[') that does not "
                        f"parse: {e}") from None  # fmt: skip
    except RecursionError:
        raise DataError(f"{path}: holds a JSON array nested too deeply to parse") from None
    return value


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


def _text_type(typ, path: str, field: str) -> bool:
    """Whether column ``field`` of ``path``, of Arrow type ``typ``, must be cast to large_string
    for the string compute kernels (``_text_column``); ``DataError`` naming the column and its
    type when it does not hold strings. A dictionary-encoded column (pandas' categorical) holds
    strings too, and is cast so that repeated values cannot overflow string's 32-bit offsets;
    string_view likewise, as the kernels do not all take it."""
    import pyarrow as pa

    value = typ.value_type if pa.types.is_dictionary(typ) else typ
    # (an older pyarrow has no string_view, nor a test for it)
    is_view = getattr(pa.types, "is_string_view", lambda t: False)(value)
    if not (pa.types.is_string(value) or pa.types.is_large_string(value) or is_view):
        raise DataError(f"{path}: column {field!r} has type {typ}, not string")
    return value != typ or is_view


def _text_column(col, path: str, field: str):
    """Column ``field`` of ``path`` (an Arrow array or chunked array) as string or large_string
    (``_text_type``), or a ``DataError`` when it does not hold strings."""
    import pyarrow as pa

    return col.cast(pa.large_string()) if _text_type(col.type, path, field) else col


def field_index(schema, path: str, field: str) -> int:
    """The index of column ``field`` in ``schema``, the Arrow schema of ``path`` (an Arrow or
    parquet file); ``DataError`` naming the file and its columns when it has no such column, or
    has two of that name (which one is the text, or a record's value, is not ours to guess)."""
    if field not in schema.names:
        raise DataError(f"{path}: no column {field!r} (columns: {schema.names})")
    index = schema.get_field_index(field)
    if index < 0:  # (-1 for a name given twice as for a missing one)
        raise DataError(f"{path}: column {field!r} appears {schema.names.count(field)} times "
                        f"(columns: {schema.names})")  # fmt: skip
    return index


_ARROW_FILE_MAGIC = b"ARROW1"  # how the IPC file format starts (and ends); a stream does not
ARROW_BATCH_ROWS = 1024  # rows made Python objects at a time: a file may be one large batch


def _record_url(obj, url_field: str) -> str | None:
    """A JSON record's ``url_field`` when it is a non-empty string, else None (no URL: the
    record is not bad input, its text is what training needs)."""
    if not url_field or not isinstance(obj, dict):
        return None
    url = obj.get(url_field)
    return url if isinstance(url, str) and url.strip() else None


def _column_urls(batch, path: str, url_field: str) -> list:
    """A parquet / Arrow batch's ``url_field`` values (None where null or the file has no such
    column); a column that does not hold strings is the file's error, as the text column's is."""
    if not url_field or url_field not in batch.schema.names:
        return [None] * batch.num_rows
    col = batch.column(batch.schema.get_field_index(url_field))
    _text_type(col.type, path, url_field)
    return [u if u and u.strip() else None for u in col.to_pylist()]


def open_arrow(path: str, field: str | None = None, extra: str = ""):
    """A reader of the Arrow IPC file ``path``, memory-mapped (nothing is read into memory until
    a batch's values are used): the file format (Feather v2) when it opens as one, else the
    stream format (HF ``datasets``' .arrow files). With ``field``, the reader reads that column
    alone (``reader.schema`` is that one field): the others (images, token lists) may be most of
    the file, and a compressed file's would be decompressed for nothing. ``extra``: a second
    column read too when the file has it (the URL of ``iter_documents``' ``url_field``); the
    batches' columns are then in the file's order.

    ``DataError`` naming the file when it is neither (pyarrow's errors do not name it), or has
    no column ``field``. A damaged file-format file gets the file format's own error: read as a
    stream its magic is a meaningless message length."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    def reader(options=None):
        source = pa.memory_map(path)
        try:
            return ipc.open_file(source, options=options)
        except Exception:
            if source.read_at(len(_ARROW_FILE_MAGIC), 0) == _ARROW_FILE_MAGIC:
                raise
        source.seek(0)
        return ipc.open_stream(source, options=options)

    try:
        whole = reader()  # a stream's schema is its first message: cheap either way
    except Exception as e:
        raise DataError(f"{path}: not a readable Arrow file ({e})") from e
    if field is None:
        return whole
    index = [field_index(whole.schema, path, field)]
    if extra and extra != field and extra in whole.schema.names:
        index.append(whole.schema.get_field_index(extra))
    try:
        return reader(ipc.IpcReadOptions(included_fields=sorted(index)))
    except Exception as e:
        raise DataError(f"{path}: not a readable Arrow file ({e})") from e


def arrow_batches(path: str, reader, rows: int | None = ARROW_BATCH_ROWS):
    """The record batches of ``open_arrow``'s ``reader`` of ``path`` in file order, cut into at
    most ``rows`` rows each (None: as written), each validated (``valid_batches``): IPC reading
    checks little of what it maps."""
    import pyarrow.ipc as ipc

    if isinstance(reader, ipc.RecordBatchFileReader):
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    else:
        batches = iter(reader)
    yield from valid_batches(path, batches, "Arrow", rows)


def valid_batches(path: str, batches, kind: str, rows: int | None = ARROW_BATCH_ROWS):
    """The record batches (or arrays) of the iterator ``batches`` over the rows of ``path``, a
    ``kind`` ("Arrow", "parquet") file, in order, cut into at most ``rows`` rows each (None: as
    read). Each is validated in full before its rows are used: neither IPC nor parquet reading
    checks string bytes, and invalid UTF-8 (or a corrupt offset) would surface from ``to_pylist``
    as a ``UnicodeDecodeError`` (or from a compute kernel as ``ArrowInvalid``) naming no file.
    ``DataError`` naming ``path:row`` (1-based, the first row not read) where a batch cannot be
    read (a file cut short mid-batch, a corrupt row group) or is invalid: the rows after it
    cannot be counted."""
    row = 0
    while True:
        try:
            batch = next(batches, None)
            if batch is not None:
                batch.validate(full=True)
        except Exception as e:
            raise DataError(f"{path}:{row + 1}: cannot read the {kind} rows ({e})") from e
        if batch is None:
            return
        step = rows or max(len(batch), 1)
        for start in range(0, len(batch), step):
            yield batch.slice(start, step)
        row += len(batch)


def open_parquet(path: str):
    """A ``pyarrow.parquet.ParquetFile`` of ``path`` (its footer read, no rows); ``DataError``
    naming the file when it is not readable parquet (truncated, empty, not parquet): pyarrow's
    errors do not name it ("Parquet magic bytes not found in footer")."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from e


def parquet_batches(path: str, pf, columns: list[str] | None = None):
    """The record batches of ``open_parquet``'s ``pf`` of ``path`` (``columns`` alone, or all),
    ``ARROW_BATCH_ROWS`` rows at a time (batches run across row groups) and each validated
    (``valid_batches``): a corrupt row group or invalid UTF-8 is a ``DataError`` naming
    ``path:row``."""
    batches = pf.iter_batches(batch_size=ARROW_BATCH_ROWS, columns=columns)
    return valid_batches(path, batches, "parquet", rows=None)


def _iter_file(path: str, fi: int, field: str, txt_mode: str, log: BadInputLog,
               url_field: str = ""):  # fmt: skip
    """(record index, loc, text or None, url or None) of one file: the record index is what a
    document's key (and a resumed position) counts, a jsonl file's line index (blank lines
    skipped, not renumbered) or a JSON array's element index (loc ``path[index]``, 0-based as in
    data/chat_records.py). The URL is the record's ``url_field`` (jsonl, parquet, Arrow records;
    plain text and text shards have none), a WARC record's own (``iter_warc``: a WARC file's
    record index counts the records it skips too, which are not yielded)."""
    fmt = file_format(path)
    if fmt == "jsonl" and holds_json_array(path):
        for i, obj in enumerate(read_json_array(path)):
            loc = f"{path}[{i}]"
            yield i, loc, _record_text(obj, loc, field, log), _record_url(obj, url_field)
    elif fmt == "jsonl":
        for i, raw in numbered_lines(path):
            if not raw.strip():  # blank separator lines are not records
                continue
            loc = f"{path}:{i + 1}"
            ok, obj = _json_value(raw, loc, log)
            text = _record_text(obj, loc, field, log) if ok else None
            yield i, loc, text, (_record_url(obj, url_field) if ok else None)
    elif fmt == "parquet":
        pf = open_parquet(path)
        schema = pf.schema_arrow
        # A column that is not text is the file's error, before any row (it was each row's
        # "missing_field", a whole file of them counted as bad input), as an Arrow file's is.
        _text_type(schema.field(field_index(schema, path, field)).type, path, field)
        extra = (
            [url_field] if url_field and url_field != field and url_field in schema.names else []
        )
        row = 0
        for batch in parquet_batches(path, pf, [field, *extra]):
            urls = _column_urls(batch, path, url_field)
            for text, url in zip(batch.column(batch.schema.get_field_index(field)).to_pylist(),
                                 urls):  # fmt: skip
                loc = f"{path}:{row + 1}"
                yield row, loc, (text if _check_text(text, loc, log) else None), url
                row += 1
    elif fmt == "arrow":
        reader = open_arrow(path, field, url_field)
        text_col = reader.schema.get_field_index(field)
        # a column that is not text is the file's error, before any row (not each row's)
        _text_type(reader.schema.field(text_col).type, path, field)
        row = 0
        for batch in arrow_batches(path, reader):
            urls = _column_urls(batch, path, url_field)
            # (to_pylist gives str for dictionary-encoded and string_view values alike)
            for text, url in zip(batch.column(text_col).to_pylist(), urls):
                loc = f"{path}:{row + 1}"
                yield row, loc, (text if _check_text(text, loc, log) else None), url
                row += 1
    elif fmt == "warc":
        yield from iter_warc(path, log)
    elif fmt == "arrayrecord":
        if shard_meta(path).get("format") != "text":
            raise DataError(f"{path}: holds token ids, not text; read it with the loader")
        reader = _open_arrayrecord(path)
        try:
            for i in range(reader.num_records()):
                loc = f"{path}:{i + 1}"
                text = _decode(reader.read([i])[0], loc, log)
                ok = text is not None and _check_text(text, loc, log)
                yield i, loc, (text if ok else None), None
        finally:
            reader.close()
    else:
        for i, loc, text in _iter_text_file(path, txt_mode, log):
            yield i, loc, text, None


def _decode(raw: bytes, loc: str, log: BadInputLog) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        log.add("invalid_utf8", loc, str(e)[:80])
        return None


TXT_MODES = ("file", "line", "blank")  # plain text: one document per file, line or block


def check_txt_mode(txt_mode, key: str = "txt_mode") -> str:
    """``txt_mode`` if it is one of ``TXT_MODES``, else a ``DataError`` naming ``key`` (the
    preprocess CLI's ``txt_mode``, the trainer's ``data.txt_mode``). Both check it before they
    read or write anything: found by the first plain-text file, it left a preprocess output
    behind that the corrected rerun refused to overwrite."""
    if txt_mode not in TXT_MODES:
        raise DataError(f"{key} must be {'|'.join(TXT_MODES)}, got {txt_mode!r}")
    return txt_mode


def _iter_text_file(path: str, txt_mode: str, log: BadInputLog):
    """Plain text: one document per file, per line, or per blank-line-separated block. A
    leading UTF-8 BOM is not text, and a CRLF file's line ends are "\n" (as jsonl reads them:
    the BOM and the "\r"s were trained on when the text came straight to training)."""
    check_txt_mode(txt_mode)
    if txt_mode == "file":
        loc = f"{path}:1"
        text = _decode(read_all(path), loc, log)
        if text is not None:
            text = text.removeprefix("\ufeff").replace("\r\n", "\n")
        yield 0, loc, (text if text is not None and _check_text(text, loc, log) else None)
        return
    block: list[str] = []
    # "blank" mode: a block with invalid UTF-8 is one document lost, counted once at its first
    # bad line (logging every bad line counted a block with two of them as two documents).
    start, bad = None, None  # first line of the current block; (loc, error) of its first bad line
    for i, raw in numbered_lines(path):
        loc = f"{path}:{i + 1}"
        if txt_mode == "line":
            line = _decode(raw, loc, log)
            if i == 0 and line is not None:
                line = line.removeprefix("\ufeff")
            if line is None or line.strip():  # empty lines are separators, not documents
                # "\r\n" too: a CRLF file's lines ended in "\r", kept in the document
                yield i, loc, (None if line is None else line.rstrip("\r\n"))
            continue
        try:
            line = raw.decode("utf-8").replace("\r\n", "\n")
            line = line.removeprefix("\ufeff") if i == 0 else line
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
    url_field: str = "",
) -> Iterator[Document]:
    """Streams good documents in a deterministic order; bad records go to ``log``.

    Every record read is either yielded or counted in ``log`` (or raises when ``log.strict``).
    ``url_field``: the records' field each ``Document.url`` is read from (a record without one
    is a document without a URL, not bad input); a WARC record's URL is its own, always read.
    """
    log = log if log is not None else BadInputLog()
    for fi, path in enumerate(expand_paths(patterns)):
        for ri, loc, text, url in _iter_file(path, fi, text_field, txt_mode, log, url_field):
            if text is not None:
                yield Document(text=text, loc=loc, key=(fi + file_index_offset, ri), url=url)
