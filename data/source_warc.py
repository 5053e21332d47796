"""Streaming reader of WARC 1.0/1.1 files: Common Crawl's WARC (HTML responses) and WET (text).

``iter_records`` reads a file's records in order, one at a time: the version line, the header
fields (``WarcRecord.headers``, names lower-cased), exactly ``Content-Length`` bytes of block and
the CRLF CRLF after it; only the part of a block that is used is held (``keep``), the rest is read
past in chunks, so neither a file nor a large record is ever in memory. Files are ``.warc``,
``.wet`` or ``.wat``, plain, gzip (one member per record, as Common Crawl writes them, or one
member for the file) or zstd (plain frames; not the IIPC ``.warc.zst`` with a dictionary):
data/source_codecs.py's ``open_bytes``, which tells the codec by the first bytes.

``iter_warc`` is what the pretraining readers call (``_iter_file``, data/source_readers.py): a
record's index (0-based, skipped records counted) orders its document, its loc is
``path:<record number>`` (1-based, as a jsonl line's), and its URL (``WARC-Target-URI``) is the
document's: WARC files always carry one, so ``url_field`` is not needed for them. Documents:

* ``conversion`` records (WET): the block is UTF-8 text, taken as it is;
* ``response`` records of an HTTP 200 whose payload is HTML (Content-Type text/html or
  application/xhtml+xml, or HTML by its first bytes when there is none): the payload is
  de-chunked and its Content-Encoding undone (gzip, deflate, br, zstd) when its headers say
  so, decoded (``decode_html``) and its main text
  extracted (data/html_text.py).

The damage policy is the other readers' (data/source_errors.py). A file whose records cannot be
framed (no version line, a missing or invalid Content-Length, a header or block cut short, a
corrupt gzip member, a block not followed by its empty lines) is a ``DataError`` naming
``path:<record number>`` and the byte offset of the record (in the decompressed stream): the
records after it cannot be found. A conversion record that is not UTF-8 is a bad record
(``invalid_utf8`` in the ``BadInputLog``; raises with ``strict``). Every other record read is
not a document and is counted by kind in ``BadInputLog.skipped`` (``SKIPS``), never bad input:
a crawl holds requests, metadata, redirects, 404s, images and broken server responses by design,
and ``strict`` must be able to read one.
"""

from __future__ import annotations

import codecs
import dataclasses
import re
import zlib
from collections.abc import Callable, Iterator

from flaxlm.data.html_text import html_to_text
from flaxlm.data.source_codecs import DecompressError, compression, open_bytes
from flaxlm.data.source_errors import BadInputLog, DataError

MAX_HEADER_BYTES = 1 << 16  # a WARC or HTTP header longer than this is not a header
MAX_HTML_BYTES = 2 << 20  # of an HTML payload, decoded and parsed (the rest is read past)
MAX_TEXT_BYTES = 64 << 20  # of a conversion (WET) record's text: a longer one is skipped
_CHUNK = 1 << 20  # bytes read at a time past a block's kept part

# Why a record is not a document (``BadInputLog.skipped``): the record types that never are one,
# then what kept a response or a conversion record from being one
SKIPS = {
    "warcinfo": "the file's own description",
    "request": "the crawler's HTTP request",
    "metadata": "crawl metadata (WAT files hold only these)",
    "revisit": "a page seen before, with no payload",
    "resource": "a resource record (not an HTTP response)",
    "continuation": "the rest of a segmented record",
    "other_type": "a WARC-Type this reader does not know",
    "response_not_http": "a response record that is not HTTP (dns:, ftp:)",
    "response_bad_http": "an HTTP response whose status line or headers do not parse",
    "response_not_200": "an HTTP status other than 200 (redirects, 404s, errors)",
    "response_not_html": "a payload that is not HTML (images, PDF, JSON, plain text...)",
    "response_bad_encoding": "a Content-Encoding that is corrupt or unknown (not gzip, deflate, "
    "br or zstd; zstd without the zstandard package)",
    "too_large": f"a conversion record of more than {MAX_TEXT_BYTES >> 20} MB",
    "no_text": "a page or WET record with no text",
}
_KNOWN_TYPES = ("warcinfo", "request", "metadata", "revisit", "resource", "continuation")
_VERSION = re.compile(rb"WARC/1\.[01]\r?\n")
_BLANK = (b"\r\n", b"\n")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_STATUS = re.compile(rb"HTTP/\d(?:\.\d)?[ \t]+(\d{3})(?:[ \t]|\r?$)")
_HTML_TYPES = ("text/html", "application/xhtml+xml")
_SNIFF = (b"<!doctype html", b"<html", b"<head", b"<body", b"<!--")
_META_CHARSET = re.compile(rb"<meta[^>]+charset\s*=\s*[\"']?\s*([A-Za-z0-9_.:-]+)", re.IGNORECASE)
_CHARSET = re.compile(r"charset\s*=\s*[\"']?\s*([A-Za-z0-9_.:-]+)", re.IGNORECASE)
# Labels that browsers read as windows-1252 (the WHATWG Encoding Standard): a page declared
# latin-1 uses cp1252's curly quotes and dashes in 0x80-0x9F, which latin-1 makes C1 controls.
_AS_CP1252 = {"iso-8859-1", "iso8859-1", "latin-1", "latin1", "l1", "us-ascii", "ascii",
              "cp819", "ibm819", "iso-ir-100", "windows-1252", "cp1252", "x-cp1252"}  # fmt: skip


@dataclasses.dataclass
class WarcRecord:
    """One record: its 1-based number and byte offset in the (decompressed) file, its header
    fields (names lower-cased), its Content-Length, and the first ``keep`` bytes of its block."""

    number: int
    offset: int
    headers: dict[str, str]
    length: int
    block: bytes

    @property
    def type(self) -> str:
        return self.headers.get("warc-type", "").strip().lower()

    @property
    def url(self) -> str | None:
        """WARC-Target-URI; WARC 1.0's grammar wrote it in <>, as some writers still do."""
        url = self.headers.get("warc-target-uri", "").strip().removeprefix("<").removesuffix(">")
        return url or None

    @property
    def languages(self) -> tuple[str, ...]:
        """WARC-Identified-Content-Language (Common Crawl's CLD2 guess, "eng,fra"), or ()."""
        value = self.headers.get("warc-identified-content-language", "")
        return tuple(x.strip() for x in value.split(",") if x.strip())

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").strip()

    @property
    def cut(self) -> bool:
        """Whether ``block`` holds less than the whole block (``keep``)."""
        return len(self.block) < self.length


class _Stream:
    """A file's decompressed bytes read by line or count, with the offset reached; damage is a
    ``DataError`` naming the record being read (``where``)."""

    def __init__(self, path: str, f, compressed: bool):
        self.path, self.f, self.pos = path, f, 0
        self.number, self.start = 0, 0  # the record being read, and its offset
        self.of = " of the decompressed data" if compressed else ""

    def where(self) -> str:
        return f"{self.path}:{self.number}: WARC record at byte {self.start}{self.of}"

    def _io(self, read, n: int) -> bytes:
        try:
            data = read(n)
        except DecompressError as e:
            raise DataError(
                f"{self.where()}: cannot decompress it, or the data after it ({e.cause})"
            ) from e.cause
        self.pos += len(data)
        return data

    def line(self) -> bytes:
        return self._io(self.f.readline, MAX_HEADER_BYTES + 1)

    def read(self, n: int) -> bytes:
        return self._io(self.f.read, n)


def _header(stream: _Stream) -> dict[str, str] | None:
    """The header fields of the next record (after its version line), or None at the end of the
    file. Blank lines before a version line are allowed (some writers add a few)."""
    stream.number += 1  # (the record a damaged stream here is named by)
    line = b"\r\n"
    while line in _BLANK:
        stream.start = stream.pos
        line = stream.line()
        if not line:
            return None
    if not _VERSION.fullmatch(line):
        raise DataError(f"{stream.where()}: not a WARC 1.0/1.1 record: its first line is "
                        f"{line[:40]!r}, not b'WARC/1.0' or b'WARC/1.1'")  # fmt: skip
    headers: dict[str, str] = {}
    name, size = None, 0
    while (line := stream.line()) not in _BLANK:
        size += len(line)
        if size > MAX_HEADER_BYTES:
            raise DataError(f"{stream.where()}: its header runs past {MAX_HEADER_BYTES} bytes "
                            "(not a WARC file?)")  # fmt: skip
        if not line.endswith(b"\n"):
            raise DataError(f"{stream.where()}: the file ends inside its header (truncated?)")
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        if text[:1] in (" ", "\t") and name:  # a folded line continues the field before it
            headers[name] += " " + text.strip()
            continue
        key, colon, value = text.partition(":")
        if not colon or not key.strip():
            raise DataError(f"{stream.where()}: header line {text[:60]!r} is not 'Name: value'")
        name = key.strip().lower()
        headers[name] = value.strip()
    return headers


def _length(stream: _Stream, headers: dict[str, str]) -> int:
    value = headers.get("content-length")
    if value is None:
        raise DataError(f"{stream.where()}: has no Content-Length")
    if not value.isascii() or not value.isdigit():
        raise DataError(f"{stream.where()}: Content-Length {value[:40]!r} is not a byte count")
    return int(value)


def _block(stream: _Stream, length: int, keep: int) -> bytes:
    """The first ``keep`` bytes of a ``length``-byte block; the rest is read past in chunks."""
    head = stream.read(min(length, keep))
    done = len(head)
    while done < length and (chunk := stream.read(min(length - done, _CHUNK))):
        done += len(chunk)
    if done < length:
        raise DataError(f"{stream.where()}: the file ends {done} bytes into its {length}-byte "
                        "block (truncated?)")  # fmt: skip
    return head


def _trailer(stream: _Stream, length: int) -> None:
    """The two line ends after a block (the end of the file may come instead)."""
    for _ in range(2):
        line = stream.line()
        if not line:
            return
        if line not in _BLANK:
            raise DataError(
                f"{stream.where()}: its {length}-byte block is followed by {line[:40]!r}, not an "
                "empty line (a wrong Content-Length?)"
            )


def iter_records(path: str, keep: int | Callable[[dict], int] = MAX_TEXT_BYTES
                 ) -> Iterator[WarcRecord]:  # fmt: skip
    """The records of WARC file ``path`` in order (the module docstring). ``keep``: how many
    bytes of a block to hold, or a function of the record's header fields that says."""
    with open_bytes(path) as f:
        stream = _Stream(path, f, compression(path) is not None)
        while (headers := _header(stream)) is not None:
            length = _length(stream, headers)
            block = _block(stream, length, keep(headers) if callable(keep) else keep)
            _trailer(stream, length)
            yield WarcRecord(stream.number, stream.start, headers, length, block)


def _keep(headers: dict[str, str]) -> int:
    """Bytes of a block that ``iter_warc`` uses: none of a record that is not a document."""
    kind = headers.get("warc-type", "").strip().lower()
    if kind == "conversion":
        return MAX_TEXT_BYTES  # (a longer one is skipped, "too_large")
    return MAX_HEADER_BYTES + MAX_HTML_BYTES if kind == "response" else 0


def iter_warc(path: str, log: BadInputLog):
    """(record index, loc, text or None, url) of each document of WARC file ``path``, as
    ``_iter_file`` yields them: text None for a bad record (counted in ``log``); records that
    are not documents are counted in ``log.skipped`` and not yielded."""
    for rec in iter_records(path, _keep):
        loc = f"{path}:{rec.number}"
        if rec.type == "conversion":
            text, skip = _conversion_text(rec, loc, log)
        elif rec.type == "response":
            text, skip = response_text(rec)
        else:
            text, skip = None, (rec.type if rec.type in _KNOWN_TYPES else "other_type")
        if skip:
            log.skip(skip)
        else:
            yield rec.number - 1, loc, text, rec.url


def _conversion_text(rec: WarcRecord, loc: str, log: BadInputLog) -> tuple[str | None, str]:
    """(text, "") of a WET record, (None, "") when it is not UTF-8 (counted as bad), or
    (None, why) when it is not a document."""
    if rec.cut:
        return None, "too_large"
    try:
        text = rec.block.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        log.add("invalid_utf8", loc, str(e)[:80])
        return None, ""
    return (text, "") if text.strip() else (None, "no_text")


def response_text(rec: WarcRecord) -> tuple[str | None, str]:
    """(main text, "") of a response record holding an HTML page, else (None, why: ``SKIPS``)."""
    ctype = rec.content_type.lower()
    if ctype and not ctype.startswith("application/http"):
        return None, "response_not_http"
    parsed = parse_http(rec.block)
    if parsed is None:
        return None, "response_bad_http"
    status, headers, payload = parsed
    if status != 200:
        return None, "response_not_200"
    mime = headers.get("content-type", "").split(";")[0].strip().lower()
    if mime and mime not in _HTML_TYPES:
        return None, "response_not_html"
    if "chunked" in headers.get("transfer-encoding", "").lower():
        payload = _dechunk(payload)
    payload = _decompress(payload, headers.get("content-encoding", "").strip().lower())
    if payload is None:
        return None, "response_bad_encoding"
    if not mime and not sniff_html(payload):
        return None, "response_not_html"
    text = html_to_text(decode_html(payload[:MAX_HTML_BYTES], headers.get("content-type", "")))
    return (text, "") if text.strip() else (None, "no_text")


def parse_http(block: bytes) -> tuple[int, dict[str, str], bytes] | None:
    """(status, header fields with lower-cased names, payload) of an HTTP response message, or
    None when its status line or header does not parse."""
    end = _HEAD_END.search(block, 0, MAX_HEADER_BYTES)
    head, payload = (block[: end.start()], block[end.end() :]) if end else (block, b"")
    lines = head.split(b"\n")
    status = _STATUS.match(lines[0])
    if status is None or (end is None and len(block) > MAX_HEADER_BYTES):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        key, colon, value = line.decode("latin-1").partition(":")
        if colon:
            headers[key.strip().lower()] = value.strip()
    return int(status[1]), headers, payload


def _dechunk(data: bytes) -> bytes:
    """A ``Transfer-Encoding: chunked`` payload's content: the chunks that are whole (a payload
    cut short keeps what it has). A payload whose first line is not a chunk size was stored
    de-chunked by the crawler: it is its content."""
    out, pos = [], 0
    while pos < len(data):
        eol = data.find(b"\n", pos)
        if eol < 0:
            break
        try:
            size = int(data[pos:eol].split(b";")[0].strip(), 16)
        except ValueError:
            return data if pos == 0 else b"".join(out)
        if size == 0:
            break
        out.append(data[eol + 1 : eol + 1 + size])
        pos = eol + 1 + size
        pos += 2 if data.startswith(b"\r\n", pos) else 1 if data.startswith(b"\n", pos) else 0
    return b"".join(out)


def _decompress(data: bytes, encoding: str) -> bytes | None:
    """A payload under its ``Content-Encoding`` decoded (at most ``MAX_HTML_BYTES``), None when it
    cannot be. Codings: gzip, deflate, br (brotli) and zstd (with the ``zstandard`` package,
    which apache-beam installs), several in the order the server applied them ("gzip, br": br
    undone first). A crawler may store the payload decoded (Common Crawl renames the header
    X-Crawler-Content-Encoding, others leave it): a gzip payload without gzip's magic is taken
    as it is. A payload cut short (a record truncated at the crawler's size limit) gives what it
    holds. No coding expands past the limit (a small br or zstd payload can stand for
    gigabytes)."""
    for coding in reversed([c.strip() for c in encoding.split(",") if c.strip()]):
        data = _undo_coding(data, coding)
        if data is None:
            return None
    return data


def _undo_coding(data: bytes, coding: str) -> bytes | None:
    if coding in ("identity", "none"):
        return data
    if coding in ("gzip", "x-gzip") and not data.startswith(b"\x1f\x8b"):
        return data
    if coding == "br":
        return _unbrotli(data)
    if coding == "zstd":
        return _unzstd(data)
    if coding not in ("gzip", "x-gzip", "deflate"):
        return None
    # gzip; deflate is zlib-wrapped by the standard, raw in some servers
    for wbits in (47,) if coding != "deflate" else (15, -15):  # (47: gzip or zlib header)
        try:
            d = zlib.decompressobj(wbits)
            return d.decompress(data, MAX_HTML_BYTES)  # (a payload cut short: what it holds)
        except zlib.error:
            continue
    return None


def _unbrotli(data: bytes) -> bytes | None:
    import brotli

    try:
        return brotli.Decompressor().process(data, output_buffer_limit=MAX_HTML_BYTES)
    except brotli.error:  # (br has no magic bytes: a page stored decoded is known by its look)
        return data if sniff_html(data) else None


def _unzstd(data: bytes) -> bytes | None:
    if not data.startswith(b"\x28\xb5\x2f\xfd"):  # (zstd's magic: a payload stored decoded)
        return data
    try:
        import zstandard
    except ImportError:  # (not a dependency of flaxlm's own: counted as a coding it cannot read)
        return None
    try:
        with zstandard.ZstdDecompressor().stream_reader(data) as r:
            out = bytearray()
            while len(out) < MAX_HTML_BYTES:  # (read in pieces: a frame cut short ends early)
                piece = r.read(MAX_HTML_BYTES - len(out))
                if not piece:
                    break
                out += piece
            return bytes(out)
    except zstandard.ZstdError:
        return None


def sniff_html(payload: bytes) -> bool:
    """Whether a payload with no Content-Type starts as HTML does."""
    head = payload[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith(_SNIFF) or b"<html" in head


def _codec(label: str | None) -> str | None:
    """The Python codec of a charset label, None for one it does not know; latin-1 and ASCII are
    read as windows-1252, as browsers do (``_AS_CP1252``)."""
    label = (label or "").strip().lower()
    if label in _AS_CP1252:
        return "cp1252"
    try:
        return codecs.lookup(label).name if label else None
    except LookupError:
        return None


def decode_html(payload: bytes, content_type: str = "") -> str:
    """An HTML payload's text: by its byte-order mark, else the charset of its HTTP Content-Type,
    else one a ``<meta charset>`` or ``http-equiv`` in its first 2 KB declares, else UTF-8, or
    windows-1252 when it is not UTF-8. Never raises: bytes a declared charset cannot decode
    become U+FFFD, as in a browser."""
    for bom, name in ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
                      (codecs.BOM_UTF16_BE, "utf-16-be")):  # fmt: skip
        if payload.startswith(bom):
            return payload[len(bom) :].decode(name, "replace")
    m = _CHARSET.search(content_type)
    codec = _codec(m[1]) if m else None
    if codec is None and (m := _META_CHARSET.search(payload[:2048])):
        codec = _codec(m[1].decode("ascii"))
        # a page read as ASCII-compatible bytes cannot be UTF-16 (the HTML standard: UTF-8)
        codec = "utf-8" if codec and codec.startswith("utf-16") else codec
    if codec is not None:
        return payload.decode(codec, "replace")
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as e:
        # a page cut short (MAX_HTML_BYTES, a crawler's limit) may end inside a character: not
        # a reason for cp1252 when the characters before it are UTF-8's
        if e.reason == "unexpected end of data" and not payload[: e.start].isascii():
            return payload[: e.start].decode("utf-8")
        return payload.decode("cp1252", "replace")
