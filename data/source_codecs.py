"""Compression of jsonl and plain-text input: which codec a file has, and reading it decompressed.

jsonl and plain text may be gzip (``.gz``) or zstd (``.zst``, with the ``zstandard`` package)
compressed; the codec is read from the file's first bytes (``compression``), and other codecs,
or a ``.gz`` that is not gzip, are a ``DataError`` naming the file. ``open_bytes`` is the one
way the readers open a jsonl/text file (data/source_readers.py; data/chat_records.py too).

Separate because it is about bytes, not records or paths: the directory rules use only
``_codec_suffix`` (a compressed data file is still data), and the random-access loader only
``compression`` (compressed jsonl has no byte offsets).
"""

from __future__ import annotations

import gzip
import io
import os
import zlib

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
