"""Which files a data pattern names: globs, directories, preprocess outputs, and their formats.

``expand_paths`` turns patterns (files, globs, directories) into the sorted files to read. A
directory that is a ``flaxlm.data.preprocess`` output reads as its corpus
(``preprocess_corpus``); any other as its data files (``is_data_file``: a README, ``_SUCCESS``
or hidden ``.crc`` beside them is skipped). ``file_format`` says which reader a file's name
calls for, and ``shard_meta`` reads the ``meta.json`` written beside ArrayRecord shards.

Separate from the readers because these rules are about names and directories, not content:
the preprocess CLI, the Beam pipeline and the loader (data/pipeline.py) call them before
reading anything. ``_WARNED_DIRS`` (directories whose skipped files were already logged) lives
here only; ``flaxlm.data.sources`` re-exports the same set.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections.abc import Sequence

from flaxlm.data.source_codecs import _codec_suffix
from flaxlm.data.source_errors import DataError

META_FILE = "meta.json"


def expand_paths(patterns: str | Sequence[str]) -> list[str]:
    """Globs (``*``, ``**``) and directories → sorted files; an unmatched pattern is an error.

    A preprocess output directory is its corpus (``preprocess_corpus``), not its report files;
    a directory of shard sets (``split_languages``' ``tokens/en/``, ``tokens/fr/``) is all of
    their files (``shard_set_dirs``).
    Any other directory is its data files (``is_data_file``): hidden and ``_``-prefixed names
    (``.part-0.jsonl.crc``, ``_SUCCESS``) are skipped silently, other names no reader knows
    (``README.md``) with a warning naming them; were they all there is, the error names them.

    An existing file is itself, whatever its name: ``part[1].jsonl`` read as a glob matched
    ``part1.jsonl`` (or nothing), never the file named. A glob keeps files only (``**`` also
    matches directories) and, like a directory, skips shards' ``meta.json`` and ``_``-prefixed
    markers (``_SUCCESS``) unless its last part starts with ``_``. A file that several
    patterns match is read once, where it first appears (reading it twice made its documents
    exact duplicates of themselves).

    Files a directory or glob gives that are named as one of N shards (``NAME-00003-of-00008``)
    must have all N beside them (``check_shard_sets``): a write that was killed, or a copy cut
    short, left a few and trained on part of the corpus without a word. A file named itself is
    read as it is.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    out: dict[str, str] = {}  # real path -> the path as matched, in first-seen order
    for pat in patterns:
        if os.path.isfile(pat):
            hits = [pat]
        elif os.path.isdir(pat):
            hits = []
            for folder in shard_set_dirs(preprocess_corpus(pat)):
                files = _directory_files(folder)
                check_shard_sets(files, folder)
                hits += files
        else:
            hits = sorted(
                p
                for p in glob.glob(pat, recursive=True)
                if os.path.isfile(p) and _glob_keeps(pat, os.path.basename(p))
            )
            check_shard_sets(hits, pat)
        if not hits:
            raise FileNotFoundError(f"no files match {pat!r}")
        for h in hits:
            out.setdefault(os.path.realpath(h), h)
    return list(out.values())


_SHARD_NAME = re.compile(r"^(?P<stem>.*)-(?P<index>\d+)-of-(?P<count>\d+)(?P<rest>(\.[^-]*)?)$")


def check_shard_sets(files: Sequence[str], pattern: str) -> None:
    """A DataError naming the missing members when one of `files` is named as shard i of N
    (``shard-00003-of-00008.arrayrecord``, ``train-00000-of-00004.parquet``; numbered from 0
    or from 1) and its directory lacks some of the other N − 1 (a glob may pick some of a
    complete set on purpose)."""
    sets: set[tuple] = set()  # (folder, stem, index width, count, suffix) of each set named
    for f in files:
        m = _SHARD_NAME.match(os.path.basename(f))
        if m and 0 < int(m["count"]) and int(m["index"]) <= int(m["count"]):
            sets.add((os.path.dirname(f), m["stem"], len(m["index"]), m["count"], m["rest"]))
    for folder, stem, width, count, rest in sorted(sets):
        present = set()
        for name in os.listdir(folder or "."):
            m = _SHARD_NAME.match(name)
            if (m and (m["stem"], len(m["index"]), m["count"], m["rest"]) == (stem, width, count,
                                                                                rest)
                    and os.path.isfile(os.path.join(folder, name))):  # fmt: skip
                present.add(int(m["index"]))
        # numbered from 0 (Beam, HF datasets) or from 1 (HF's model-00001-of-00003): whichever
        # the present ones fit better
        missing = min(([i for i in range(first, int(count) + first) if i not in present]
                       for first in (0, 1)), key=len)  # fmt: skip
        if missing and _listed_by_report(folder, present, stem, width, count, rest):
            continue  # a finished run that wrote no file for its empty shards (Beam, < 12-06)
        if missing:
            shown = ", ".join(f"{stem}-{i:0{width}d}-of-{count}{rest}" for i in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DataError(
                f"{pattern}: {len(missing)} of the {int(count)} shards {stem}-*-of-{count}{rest} "
                f"are missing from {folder or '.'}: {shown}{more} (a write that was interrupted, "
                "or a copy cut short?); to read the others anyway, name those files"
            )


def _listed_by_report(folder, present, stem, width, count, rest) -> bool:
    """Whether the preprocess `report.json` beside `folder` (written last, when the run
    finished) lists exactly the shards of this set that are present: its producer wrote no file
    for a shard no document went to (data/beam.py before 2026-12-06)."""
    report = os.path.join(os.path.dirname(os.path.abspath(folder or ".")), "report.json")
    try:
        with open(report) as f:
            listed = json.load(f).get("shards")
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(listed, list):
        return False
    mine = {f"{stem}-{i:0{width}d}-of-{count}{rest}" for i in present}
    names = {os.path.basename(str(x)) for x in listed}
    return bool(mine) and mine == {n for n in names if _SHARD_NAME.match(n)}


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
_DATA_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet", ".arrow", ".feather", ".array_record",
                  ".txt", ".text", ".warc", ".wet", ".wat")  # fmt: skip
# The metadata HF `datasets` writes beside its .arrow shards (save_to_disk), not records.
_HF_DATASET_META = ("dataset_info.json", "state.json", "dataset_dict.json")
_WARNED_DIRS: set[str] = set()  # directories whose skipped files were logged (once a process)


def is_data_file(name: str) -> bool:
    """Whether a file a directory holds is data: not hidden or ``_``-prefixed (checksums, Spark's
    and Hadoop's ``_SUCCESS`` and ``_committed_*`` markers), not ``meta.json``, and named as a
    format the readers know (jsonl/json/ndjson, parquet, Arrow, ArrayRecord, .txt/.text,
    WARC/WET/WAT, compressed or not)."""
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
    if any(file_format(f) == "arrow" for f in data):
        # An HF `datasets` save_to_disk directory: its JSON files describe the .arrow shards
        # (read as jsonl data, they were bad records, and fatal with strict)
        data = [f for f in data if f not in _HF_DATASET_META]
    other = [f for f in names if f not in data and f != META_FILE and f[:1] not in "._"
             and f not in _HF_DATASET_META]  # fmt: skip
    # not read: a directory is its own files, not its subdirectories' (say so, and how to)
    subdirs = sorted(
        f + "/" for f in os.listdir(path)
        if f[:1] not in "._" and os.path.isdir(os.path.join(path, f))
    )  # fmt: skip
    if subdirs and path not in _WARNED_DIRS:
        logging.warning(
            "data: %s: subdirectories are not read (%s); to read them, match them with a glob "
            "such as %r",
            path,
            ", ".join(subdirs[:10]) + (", ..." if len(subdirs) > 10 else ""),
            os.path.join(path, "**", "*"),
        )
    if not data:
        raise FileNotFoundError(
            f"no data files in directory {path!r}"
            + (f" (skipped {other}: not {'/'.join(_DATA_SUFFIXES)}/.arrayrecord)" if other else "")
            + (f" (subdirectories are not read: {subdirs})" if subdirs else "")
            + "; name the files, or match them with a glob such as "
            + repr(os.path.join(path, "**", "*") if subdirs else os.path.join(path, "*"))
        )
    if other and path not in _WARNED_DIRS:
        logging.warning(
            "data: %s: skipped %d file(s) that are not data (%s); data files end in %s or "
            "contain .arrayrecord, optionally compressed",
            path,
            len(other),
            ", ".join(other[:10]) + (", ..." if len(other) > 10 else ""),
            "/".join(_DATA_SUFFIXES),
        )
    _WARNED_DIRS.add(path)
    return [os.path.join(path, f) for f in data]


def shard_set_dirs(path: str) -> list[str]:
    """The directories whose files directory ``path`` stands for: its subdirectories, sorted,
    when it holds no files of its own and every one of them is a shard set (has a ``meta.json``:
    the per-language sets ``split_languages`` writes, ``out/tokens/en/``, ``out/tokens/fr/``);
    else ``path`` alone (a directory is its own files, and says so of its subdirectories)."""
    entries = [e for e in os.listdir(path) if e[:1] not in "._"]
    subdirs = sorted(e for e in entries if os.path.isdir(os.path.join(path, e)))
    sets = [d for d in subdirs if os.path.isfile(os.path.join(path, d, META_FILE))]
    if not sets or len(sets) != len(entries):  # (a file of its own, or a subdirectory that is not)
        return [path]
    return [os.path.join(path, d) for d in sets]


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


def file_format(path: str) -> str:
    """'jsonl' | 'text' | 'parquet' | 'arrow' | 'arrayrecord' | 'warc' from the file name
    (``x.jsonl.gz`` and ``x.jsonl.zst`` are jsonl: see ``open_bytes``). A "jsonl" file named .json
    may hold one JSON array instead of lines: the readers tell by its first character
    (``holds_json_array`` in data/source_readers.py). "arrow" is an Arrow IPC file, ``.arrow`` or
    ``.feather``: the stream format HF ``datasets`` writes (``save_to_disk``, its cache) or the
    file format (Feather v2); the readers tell which by its first bytes (``open_arrow``). Read as
    text, such a file was trained on as binary garbage. "warc" is a WARC file
    (data/source_warc.py): ``.warc``, Common Crawl's ``.warc.wet`` text and ``.warc.wat``
    metadata (whose records are all skipped)."""
    name = path.lower()
    name = name[: len(name) - len(_codec_suffix(name))]
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".arrow", ".feather")):
        return "arrow"
    if ".arrayrecord" in name or name.endswith(".array_record"):
        return "arrayrecord"
    if name.endswith((".warc", ".wet", ".wat")):
        return "warc"
    return "text"


def shard_meta(path: str) -> dict:
    """The ``meta.json`` beside an ArrayRecord shard, or ``{"format": "text"}`` if there is none."""
    meta_path = os.path.join(os.path.dirname(path), META_FILE)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            return json.load(f)
    return {"format": "text"}
