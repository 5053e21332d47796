"""Checks training files against benchmarks' test sets; writes the records that do not overlap.

    python -m flaxlm.data.decontaminate --against mmlu:~/datasets/mmlu,gsm8k:~/datasets/gsm8k \\
        sft.jsonl prefs.jsonl [--out clean.jsonl] [--report report.json] [--ngram 13]

``--against``: comma-separated benchmarks, PRESET:DIR (evaluation/benchmarks.py's presets over
their downloaded directories; each evaluated example one item, data/benchmark_texts.py), and
eval files (jsonl/parquet records' ``--eval_field``, or plain text one item a line), each file
pattern a set of its own. A record is contaminated when it shares a ``--ngram``-word n-gram
(13, as preprocess's ``dedup.decontam_ngram``) with an item of a set: the Decontaminator of
data/dedup.py, the preprocess CLI's (same words: NFKC, case-folded, invisible characters
removed). Nothing is cleaned first: records are checked as training will read them.

A record's text is everything training reads from it, joined (an n-gram may run from a question
into its answer, as a leaked solved example does): a pretraining record's ``--field`` (jsonl,
.json arrays, parquet, Arrow; plain text, WARC and text shards are read as the preprocess CLI
reads them, ``--txt_mode``), and a chat, preference or prompt record's message contents (and
reasoning), ``prompt``, ``completion``, ``chosen`` and ``rejected``, each a text or messages
(data/chat_records.py's field names): SFT, DPO / reward, KTO and RL prompt records
({"prompt", "meta"}: the meta, what the reward reads, is not trained on) alike.

The report (stdout; ``--report`` as JSON) gives per set the contaminated records, with the
file:line and the shared n-gram of a few, and what each set gave (items, n-grams, items too short
to have one). A file none of whose records holds text to check (a text field under another name)
is an error naming it.

``--out`` writes every record that overlaps no set, in input order, to a temporary file renamed
into place once every input is read:
  * line records (jsonl, or plain text with ``--txt_mode line``): the bytes of each line as read
    (a jsonl of chats stays one; a last line without its newline gets one). Lines that are no
    record (malformed JSON, invalid UTF-8) are counted, not written;
  * table records (parquet, Arrow: an HF ``datasets`` download or ``save_to_disk``) to an
    ``--out`` named ``*.parquet``: the kept rows, every column as read, under the inputs' schema
    (its metadata too: HF's ``features`` survive), which must be the same in every input.
Other inputs (.json arrays, WARC, text files as documents) are checked without ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator

from flaxlm.data import sources as S
from flaxlm.data.benchmark_texts import benchmark_texts, preset_names
from flaxlm.data.chat_records import DataReport, fields_config, read_records
from flaxlm.data.dedup import Decontaminator, add_found
from flaxlm.data.source_codecs import _codec_suffix, numbered_lines
from flaxlm.data.source_readers import (
    arrow_batches,
    check_txt_mode,
    holds_json_array,
    open_arrow,
    open_parquet,
    parquet_batches,
)

# (What training reads: chat_records' default field names, less `meta`, which it does not.)
_FIELDS = fields_config()
_CHAT_KEYS = (_FIELDS.messages, _FIELDS.prompt, _FIELDS.completion, _FIELDS.chosen,
              _FIELDS.rejected)  # fmt: skip


def load_against(value: str, eval_field: str = "text") -> dict[str, list[str]]:
    """{set name: its items} of ``--against``: a PRESET:DIR item is that benchmark (named by
    the preset), anything else an eval file pattern (named as given). ValueError naming
    ``--against`` for an unknown name, a missing directory or file, a set given twice."""
    sets: dict[str, list[str]] = {}
    presets = preset_names()
    for item in (i.strip() for i in value.split(",")):
        if not item:
            continue
        name, sep, root = item.partition(":")
        if sep and name in presets:
            if not root.strip():
                raise ValueError(f"--against: {item!r} is not PRESET:DIR (its directory?)")
            label, texts = name, benchmark_texts(name, os.path.expanduser(root.strip()),
                                                 "--against")  # fmt: skip
        else:
            label, texts = item, _eval_file_texts(item, eval_field, presets if sep else None)
        if label in sets:
            raise ValueError(f"--against: {label!r} is given twice")
        sets[label] = texts
    if not sets:
        raise ValueError("--against: no benchmark or eval file given")
    return sets


def _eval_file_texts(pattern: str, field: str, presets: list[str] | None) -> list[str]:
    """The items of eval file(s) ``pattern``: records' ``field``, or a plain-text file's lines
    (as preprocess's decontam_paths reads them, uncleaned). An unreadable record is an error
    (left out, its n-grams would be missing); ``presets``: the hint for "NAME:DIR" that named
    no preset."""
    try:
        S.expand_paths([pattern])
    except FileNotFoundError:
        hint = f" nor a benchmark PRESET:DIR (presets: {', '.join(presets)})" if presets else ""
        raise ValueError(f"--against: {pattern!r} is no file{hint}") from None
    log = S.BadInputLog()
    texts = [d.text for d in S.iter_documents([pattern], text_field=field, txt_mode="line",
                                              log=log)]  # fmt: skip
    lost = {k: v for k, v in log.counts.items() if k != "empty"}
    if lost:
        first = next(e for k in lost for e in log.examples[k])
        raise S.DataError(f"{first}: {sum(lost.values())} eval record(s) unreadable ({lost}); "
                          "fix them or leave the file out of --against")  # fmt: skip
    return texts


def record_text(obj, field: str = "text") -> str:
    """Everything training reads from a record, joined by blank lines: its ``field`` and its
    chat fields' texts (the module docstring); "" when it has none."""
    if not isinstance(obj, dict):
        return ""
    parts = [obj[field]] if isinstance(obj.get(field), str) else []
    for key in _CHAT_KEYS:
        parts += _contents(obj.get(key))
    return "\n\n".join(p for p in parts if p.strip())


def _contents(value) -> list[str]:
    """A chat field's texts: the text itself, or each message's content and reasoning."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        return []
    keys = (_FIELDS.content, "reasoning_content", "reasoning", "thinking")
    return [m[k] for m in value if isinstance(m, dict) for k in keys if isinstance(m.get(k), str)]


def iter_records(path: str, field: str, txt_mode: str,
                 report: DataReport) -> Iterator[tuple[str, str, bytes | None]]:  # fmt: skip
    """(loc, text, the line's bytes or None) of each record of ``path``; what cannot be read
    goes to ``report``'s log. Line records (jsonl, plain text in line mode) carry their bytes
    (what ``--out`` writes)."""
    fmt = S.file_format(path)
    if fmt == "jsonl" and not holds_json_array(path):
        for i, raw in numbered_lines(path):
            if raw.strip():
                loc = f"{path}:{i + 1}"
                report.read += 1
                ok, obj = S.jsonl_record(raw, loc, report.log)
                if ok:
                    yield loc, record_text(obj, field), raw
    elif fmt in ("jsonl", "parquet", "arrow"):  # (a .json array; columns of any name)
        for obj, loc in read_records([path], report):
            yield loc, record_text(obj, field), None
    elif fmt == "text" and txt_mode == "line":
        yield from _text_lines(path, report)
    else:  # other text layouts, WARC, text shards: as the preprocess CLI reads them
        for _, loc, text, _ in S._iter_file(path, 0, field, txt_mode, report.log):
            report.read += 1
            if text is not None:
                yield loc, text, None


def _text_lines(path: str, report: DataReport) -> Iterator[tuple[str, str, bytes]]:
    """A plain-text file's non-blank lines as records (``txt_mode`` line, with its BOM and CRLF
    rules: data/source_readers.py), each with its bytes."""
    for i, raw in numbered_lines(path):
        loc = f"{path}:{i + 1}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            report.read += 1
            report.bad("invalid_utf8", loc, str(e)[:80])
            continue
        line = line.removeprefix("\ufeff") if i == 0 else line
        if line.strip():
            report.read += 1
            yield loc, line.rstrip("\r\n"), raw


class Checker:
    """Counts the records checked, the contaminated ones per set (``add_found``), and those
    without text; ``summary()`` is the report."""

    def __init__(self, sets: dict[str, list[str]], ngram: int):
        self.decontam = Decontaminator(sets, ngram, ngram_key="--ngram", cleaned=False)
        self.decontam.warn()
        self.found: dict = {}
        self.records = self.contaminated = self.no_text = 0
        self.no_text_example = ""

    def clean(self, loc: str, text: str) -> bool:
        """Whether the record at ``loc`` overlaps no set (counted either way)."""
        self.records += 1
        if not text.strip():
            self.no_text += 1
            self.no_text_example = self.no_text_example or loc
            return True
        found = self.decontam.found(loc, text) if self.decontam.hits(text) else {}
        add_found(self.found, found)
        self.contaminated += bool(found)
        return not found

    def summary(self) -> dict:
        sets = self.decontam.summary(self.found)["sets"]
        return {name: {"records": s.pop("documents"), **s} for name, s in sets.items()}


def check(
    inputs: list[str],
    against: str,
    *,
    out: str = "",
    ngram: int = 13,
    field: str = "text",
    txt_mode: str = "file",
    eval_field: str = "text",
) -> dict:
    """Checks ``inputs`` (files, globs, directories) against ``against`` (``load_against``);
    with ``out``, writes the clean line records there. Returns the report (the module
    docstring). The options, the input names and every set are checked before a record is
    read or anything written: ValueError / FileNotFoundError naming the option."""
    paths = _check_options(inputs, out, ngram, txt_mode)
    checker = Checker(load_against(against, eval_field), ngram)
    report = DataReport()
    tmp = out + ".tmp" if out else ""
    sink = (_TableSink if _is_table_out(out) else _LineSink)(tmp) if out else None
    try:
        for path in paths:
            _check_file(path, field, txt_mode, checker, report, sink)
    except BaseException:
        if sink is not None:
            sink.close()
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    if sink is not None:
        sink.close()
        os.replace(tmp, out)
    return {
        "inputs": paths,
        "against": checker.summary(),
        "ngram": ngram,
        "records": checker.records,
        "contaminated": checker.contaminated,
        "clean": checker.records - checker.contaminated,
        "no_text": checker.no_text,
        "bad_input": report.log.to_dict(),
        "out": out or None,
    }


def _check_file(path, field, txt_mode, checker: Checker, report: DataReport, sink) -> None:
    """Checks one file's records, writing the clean ones' bytes to ``sink``; a file with
    records but no text in any is an error naming it (its text field under another name)."""
    before, no_text = checker.records, checker.no_text
    kept = []  # (a table's rows: whether each is clean, in row order)
    for loc, text, raw in iter_records(path, field, txt_mode, report):
        clean = checker.clean(loc, text)
        if isinstance(sink, _LineSink) and clean:
            sink.write(raw if raw.endswith(b"\n") else raw + b"\n")
        kept.append(clean)
    if isinstance(sink, _TableSink):
        sink.write_rows(path, kept)
    n = checker.records - before
    if n and checker.no_text - no_text == n:
        raise S.DataError(f"{path}: none of its {n} record(s) holds text to check (no "
                          f"{field!r} field, nor {', '.join(_CHAT_KEYS)}); name its text "
                          "field with --field")  # fmt: skip


def _check_options(inputs: list[str], out: str, ngram: int, txt_mode: str) -> list[str]:
    """The input files; errors for what would fail (or write a wrong ``--out``) later."""
    if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 1:
        raise ValueError(f"--ngram must be an integer >= 1, got {ngram!r}")
    check_txt_mode(txt_mode, "--txt_mode")
    paths = S.expand_paths(inputs)  # FileNotFoundError naming the pattern
    if not out:
        return paths
    if _codec_suffix(out.lower()):
        raise ValueError(f"--out {out}: written uncompressed; name it without {_codec_suffix(out)}")
    schema, first = None, None
    for p in paths:
        if os.path.realpath(p) == os.path.realpath(out):
            raise ValueError(f"--out {out} is an input; write elsewhere")
        fmt = S.file_format(p)
        if _is_table_out(out):
            if fmt not in ("parquet", "arrow"):
                raise ValueError(f"--out {out} writes table records (parquet, Arrow); {p} is "
                                 f"{fmt}: write its clean records to a .jsonl")  # fmt: skip
            this = _table(p)[0]
            if schema is None:
                schema, first = this, p
            elif not this.equals(schema):  # (metadata too: one file's is written for all)
                raise ValueError(f"--out {out}: {p}'s columns or their types differ from "
                                 f"{first}'s ({this} vs {schema}); check them apart")  # fmt: skip
            continue
        lines = (fmt == "jsonl" and not holds_json_array(p)) or (
            fmt == "text" and txt_mode == "line")  # fmt: skip
        if not lines:
            what = "a JSON array" if fmt == "jsonl" else f"{fmt} (--txt_mode {txt_mode})"
            table = (
                " (parquet or Arrow: name --out *.parquet)" if fmt in ("parquet", "arrow") else ""
            )
            raise ValueError(f"--out copies line records (jsonl, or text with --txt_mode line) "
                             f"byte for byte; {p} is {what}: check it without --out"
                             f"{table}")  # fmt: skip
    return paths


def _is_table_out(out: str) -> bool:
    return out.lower().endswith(".parquet")


def _table(path: str):
    """(schema, its record batches) of a parquet or Arrow file, as read_records reads it."""
    if S.file_format(path) == "parquet":
        pf = open_parquet(path)
        return pf.schema_arrow, parquet_batches(path, pf)
    reader = open_arrow(path)
    return reader.schema, arrow_batches(path, reader)


class _LineSink:
    """--out of line records: each kept line's bytes."""

    def __init__(self, path: str):
        self.f = open(path, "wb")

    def write(self, raw: bytes) -> None:
        self.f.write(raw)

    def close(self) -> None:
        self.f.close()


class _TableSink:
    """--out *.parquet: each input's kept rows, read again batch by batch (a file may be far
    larger than memory) and written under the first input's schema."""

    def __init__(self, path: str):
        self.path, self.writer = path, None

    def write_rows(self, path: str, kept: list[bool]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema, batches = _table(path)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, schema)
        start = 0
        for batch in batches:
            mask = kept[start : start + batch.num_rows]
            start += batch.num_rows
            if any(mask):
                self.writer.write_batch(batch.filter(pa.array(mask, pa.bool_())))
        if start != len(kept):  # (read_records yields every row: the two reads must agree)
            raise S.DataError(f"{path}: {start} rows on the second read, {len(kept)} checked")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_report(r: dict) -> str:
    """The report as the CLI prints it."""
    names = ", ".join(f"{k} ({v['eval_texts']} items)" for k, v in r["against"].items())
    lines = [f"decontaminate: {r['records']} record(s) in {len(r['inputs'])} file(s) against "
             f"{names}, {r['ngram']}-word n-grams: {r['contaminated']} contaminated, "
             f"{r['clean']} clean"]  # fmt: skip
    for name, s in r["against"].items():
        short = f"; {s['too_short']} items too short to match" if s["too_short"] else ""
        lines.append(f"  {name}: {s['records']} record(s){short}")
        lines += [f"    {e}" for e in s["examples"]]
    if r["no_text"]:
        lines.append(f"  {r['no_text']} record(s) without text (kept)")
    if bad := r["bad_input"]["counts"]:
        lines.append(f"  unreadable, not checked nor written: {bad}")
    if r["out"]:
        lines.append(f"  -> {r['out']}: {r['clean']} record(s)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m flaxlm.data.decontaminate",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("files", nargs="+", help="training files, globs or directories")
    ap.add_argument(
        "--against",
        required=True,
        help="PRESET:DIR benchmarks and eval files, "
        "comma-separated (mmlu:~/datasets/mmlu,gsm8k:~/datasets/gsm8k,eval.jsonl)",
    )
    ap.add_argument(
        "--out",
        default="",
        help="write the clean records here (line records; parquet/Arrow rows to *.parquet)",
    )
    ap.add_argument("--report", default="", help="write the report here (JSON)")
    ap.add_argument("--ngram", type=int, default=13, help="shared n-gram length in words")
    ap.add_argument("--field", default="text", help="pretraining records' text field")
    ap.add_argument("--txt_mode", default="file", help="plain text: a record per file|line|blank")
    ap.add_argument("--eval_field", default="text", help="eval files' text field")
    args = ap.parse_args(argv)
    try:
        rep = check(args.files, args.against, out=args.out, ngram=args.ngram, field=args.field,
                    txt_mode=args.txt_mode, eval_field=args.eval_field)  # fmt: skip
    except (ValueError, FileNotFoundError) as e:  # (DataError: file:line) one line, no traceback
        raise SystemExit(str(e)) from None
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(rep, f, indent=1, ensure_ascii=False)
    sys.stdout.write(format_report(rep))
    return rep


if __name__ == "__main__":
    main()
