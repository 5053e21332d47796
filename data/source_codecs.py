"""Compression of jsonl and plain-text input: which codec a file has, and reading it decompressed.

jsonl and plain text may be gzip (``.gz``) or zstd (``.zst``, with the ``zstandard`` package)
compressed; the codec is read from the file's first bytes (``compression``), and other codecs,
or a ``.gz`` that is not gzip, are a ``DataError`` naming the file. ``open_bytes`` is the one
way the readers open a jsonl/text file (data/source_readers.py; data/chat_records.py too);
``numbered_lines`` and ``read_all`` read one by lines or whole, naming the line
(``path:<line>: cannot decompress``) where a truncated or corrupt stream breaks off.

Separate because it is about bytes, not records or paths: the directory rules use only
``_codec_suffix`` (a compressed data file is still data), and the random-access loader only
``compression`` (compressed jsonl has no byte offsets).
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from collections.abc import Iterator

from flaxlm.data.source_errors import DataError

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
    stem_ext = os.path.splitext(os.path.splitext(path.lower())[0])[1]
    if bad == "tar" or stem_ext == ".tar":  # .tar.gz/.tgz too: gzip outside, an archive inside
        raise _tar_archive(path)
    if codec is None and bad:
        raise DataError(
            f"{path}: {bad}-compressed input is not supported; decompress it, or recompress it "
            "with gzip (.gz) or zstd (.zst)"
        )
    if codec is None and suffix in _CODEC_SUFFIX:
        raise DataError(f"{path}: named {suffix} but is not {_CODEC_SUFFIX[suffix]}-compressed")
    return codec


class DecompressError(DataError):
    """A corrupt or truncated compressed stream (``path: cannot decompress (cause)``); a reader
    that counts lines re-raises it as ``at_line(n)``, naming the line it could not read."""

    def __init__(self, path: str, cause: BaseException):
        super().__init__(f"{path}: cannot decompress ({cause})")
        self.path, self.cause = path, cause

    def at_line(self, line: int) -> DataError:
        return DataError(f"{self.path}:{line}: cannot decompress ({self.cause})")


class _Decompressed(io.RawIOBase):
    """A decompressing reader whose corrupt or truncated stream is a ``DecompressError`` naming
    the file (gzip's "Compressed file ended before the end-of-stream marker was reached" and
    zstd's errors name nothing). The records before the damage have been read; the rest cannot
    be counted, so this is an error in lenient mode too (as a corrupt parquet row group is).

    It reads with ``read1`` (one decompressed chunk at a time): gzip's ``read(n)`` collects n
    bytes before returning any, so a truncated stream raised before the lines that were intact,
    and the error could not say how far the file was good."""

    def __init__(self, path: str, raw, errors: tuple[type[BaseException], ...]):
        self.path, self._raw, self._errors = path, raw, errors
        self._read = getattr(raw, "read1", raw.read)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            data = self._read(len(b))
        except self._errors as e:
            raise DecompressError(self.path, e) from e
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _ZstdFrames:
    """The decompressed bytes of a zstd file of one or more frames, whose truncation is an
    ``EOFError`` as gzip's is. (``zstandard``'s ``stream_reader`` returns a clean end of file
    where a cut file's bytes run out: half a corpus read as if whole, without a word.)"""

    def __init__(self, path: str, decompressor):
        self._file, self._decompressor = open(path, "rb"), decompressor
        self._frame, self._frame_started, self._ready = decompressor.decompressobj(), False, b""
        self._at = 0  # how much of `_ready` has been handed out

    def read(self, n: int) -> bytes:
        while self._at == len(self._ready):
            compressed = self._file.read(1 << 16)
            if not compressed:
                if self._frame_started:  # bytes of a frame that never reached its end
                    raise EOFError("zstd stream ended before the end of its last frame")
                return b""
            self._ready, self._at = self._decompress(compressed), 0
        # A position, not `_ready[n:]`: 64 KB of a highly compressible file can decode to
        # hundreds of MB, and re-slicing the rest at every read was quadratic (139 s for a
        # 12 KB file of 128 MB of repeated lines, against 3 s as .gz).
        out = self._ready[self._at : self._at + n]
        self._at += len(out)
        return out

    def _decompress(self, compressed: bytes) -> bytes:
        """What ``compressed`` decodes to, starting a new frame where one ends (a file may be
        several frames: ``zstd`` of concatenated files, or a file written in pieces)."""
        pieces = []
        while compressed:
            self._frame_started = True
            pieces.append(self._frame.decompress(compressed))
            if not self._frame.eof:
                break
            compressed = self._frame.unused_data
            self._frame, self._frame_started = self._decompressor.decompressobj(), False
        return b"".join(pieces)

    def close(self) -> None:
        self._file.close()


def _tar_archive(path: str) -> DataError:
    return DataError(
        f"{path}: a tar archive is not read (its headers and padding would become text); "
        "extract it and give its files"
    )


def _starts_a_tar(reader) -> bool:
    """Whether the (decompressed) stream begins with a tar header: "ustar" at byte 257. Read
    from its own reader, so a damaged stream is left for the line-counting reads to name."""
    head = b""
    try:
        while len(head) < 262 and (more := reader.read(262 - len(head))):
            head += more
    except Exception:  # damage is reported where the lines are read, with its line
        return False
    finally:
        reader.close()
    return head[257:262] == b"ustar"


def open_bytes(path: str):
    """A binary reader of ``path``'s content, decompressed when it is gzip or zstd; a tar
    archive (by its name or, under any name, by its header) is a ``DataError``."""
    codec = compression(path)
    if _starts_a_tar(_open_raw(path, codec)[0]):
        raise _tar_archive(path)
    raw, errors = _open_raw(path, codec)
    if codec is None:
        return raw
    return io.BufferedReader(_Decompressed(path, raw, errors), 1 << 16)


def _open_raw(path: str, codec: str | None):
    """(reader, its decompression errors) of ``path`` by ``codec``: the file itself for None."""
    if codec is None:
        return open(path, "rb"), ()
    if codec == "gzip":
        return gzip.open(path, "rb"), (OSError, EOFError, zlib.error)
    try:
        import zstandard  # not a declared dependency of flaxlm (apache-beam installs it)
    except ImportError:
        raise DataError(
            f"{path}: is zstd-compressed; reading it needs the zstandard package "
            "(pip install zstandard), or decompress it first"
        ) from None
    return _ZstdFrames(path, zstandard.ZstdDecompressor()), (
        OSError, EOFError, zstandard.ZstdError,
    )  # fmt: skip


def numbered_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(0-based line index, raw line) of ``path``'s content, decompressed; a corrupt or
    truncated stream is a ``DataError`` naming ``path:<line>``, the line after the last one
    read (the first that could not be)."""
    with open_bytes(path) as f:
        i, lines = -1, iter(f)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except DecompressError as e:
                raise e.at_line(i + 2) from e.cause
            i += 1
            yield i, raw


def read_all(path: str) -> bytes:
    """``path``'s whole content, decompressed; a corrupt or truncated stream is a ``DataError``
    naming ``path:<line>``, the line it broke off in (1 + the newlines read before)."""
    chunks: list[bytes] = []
    with open_bytes(path) as f:
        while True:
            try:
                chunk = f.read1(1 << 16)  # read(n) would lose the chunks before the damage
            except DecompressError as e:
                raise e.at_line(1 + sum(c.count(b"\n") for c in chunks)) from e.cause
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
