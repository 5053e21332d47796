"""Passkey retrieval ("needle in a haystack"): does a context-extended model use its context?

Mohtashami & Jaggi (2023) hide a random number in a long run of repeated filler sentences and
ask for it at the end; a model that attends over its whole context copies the number, one that
does not (RoPE positions it never learned, a window it cannot see past) guesses. This module
writes that test as ordinary generation tasks for the harness (evaluation/tasks.py), one task
per (length, depth), because the harness reports a mean per task: the per-task exact match IS
the length x depth accuracy grid, and `--table` prints it from the evaluation's results JSON.

    python -m flaxlm.evaluation.passkey --out runs/passkey --tokenizer runs/data/tokenizer.model \
        --lengths 512,1024,4096 --depths 0,0.25,0.5,0.75,1 --n 20 --seed 0
    python -m flaxlm.evaluation --checkpoint runs/long --tasks runs/passkey/spec.json \
        --out runs/long/passkey.json
    python -m flaxlm.evaluation.passkey --table runs/long/passkey.json

writes `passkey_L{length}_d{depth}.jsonl` (rows {"prompt", "answer", "meta": {"length",
"depth", "tokens", "needle_at"}}) and `spec.json` listing one generation task per file.

A prompt is filler sentences (FILLER, cycled from a random start, as the paper repeats its "The
grass is green. The sky is blue. ..."), with the needle "The pass key is 12345. Remember it."
between two of them at the requested depth, and the question "What is the pass key? The pass key
is" at the end; the answer is the key's digits. The filler words are ones the built-in world's
text uses (data/synthetic_vocab.py), so the demo's own tokenizer holds them as whole pieces and
any tokenizer spells them compactly.

Length is in tokens of the given tokenizer, counted as the harness feeds a plain-mode prompt:
the document prefix (`prompts.prefix_ids`: BOS, or EOS for a tokenizer without BOS) plus the
encoded text, the ids `prompts.encode_prompt` returns. A prompt never exceeds its length and
falls short of it by less than one filler sentence (~5 tokens with the built-in tokenizer); its
`meta.tokens` is the exact count and `meta.needle_at` the needle's token offset. The needle goes
on the sentence boundary whose filler-token fraction before it is nearest `depth` (0: first,
right after the prefix; 1: last, right before the question). For a model of max_seq_len S pick
lengths <= S - max_new_tokens: a longer prompt is cut from the left by the harness (counted in
the task's `truncated` metric, which `--table` flags). Chat mode (the evaluation CLI's default
for a post-trained checkpoint) adds the chat template's tokens to each prompt; `--chat off`
keeps the counts exact.

Scoring: `regex` with answer_regex "[0-9]+" (the first number of the response) and
normalize "number", so " 48213. Remember it." scores 1 for the key 48213 and a wrong or missing
number 0. Keys have `key_digits` digits and no leading zero (so "number" normalisation cannot
make a shorter number match), distinct within a task, drawn from a `random.Random` seeded by
(seed, length, depth): the same arguments give the same files. A max_new_tokens that cannot
spell the longest key (a space and its digits: 7 tokens of 5 digits with the built-in
tokenizer) is refused, since a perfect answer would score 0 there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys

from flaxlm.evaluation.prompts import prefix_ids

FILLER = (
    "The sky is blue.",
    "The sun is yellow.",
    "The door is green.",
    "Here is the house.",
    "The road is long.",
)
NEEDLE = "The pass key is {key}. Remember it."
QUESTION = "What is the pass key? The pass key is"
ANSWER_REGEX = "[0-9]+"
NAME_RE = re.compile(r"^passkey_L(\d+)_d([0-9.eE+-]+)$")


def task_name(length: int, depth: float) -> str:
    """`passkey_L1024_d0.25`: the task (and file stem) of one (length, depth) cell (the depth's
    shortest round-tripping repr, so distinct depths never share a name)."""
    d = repr(float(depth))
    return f"passkey_L{int(length)}_d{d[:-2] if d.endswith('.0') else d}"


def prompt_tokens(tok, text: str, *, bos: bool = True) -> int:
    """Tokens of `text` as the harness feeds it in plain mode: prefix (BOS) + encoded text."""
    return (len(prefix_ids(tok)) if bos else 0) + len(tok.encode(text))


def _check(length, depth, n, key_digits) -> None:
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive integer (tokens), got {length!r}")
    try:
        ok = 0.0 <= float(depth) <= 1.0  # (NaN fails too)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"depth {depth!r} is outside [0, 1] (0: first, 1: last sentence)")
    if isinstance(key_digits, bool) or not isinstance(key_digits, int) or key_digits < 1:
        raise ValueError(f"key_digits must be a positive integer, got {key_digits!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if n > 9 * 10 ** (key_digits - 1):
        raise ValueError(f"n={n} distinct keys do not exist with key_digits={key_digits}")


def make_examples(
    tok, length: int, depth: float, n: int, seed: int = 0, *, key_digits: int = 5,
    bos: bool = True,
) -> list[dict]:  # fmt: skip
    """`n` passkey rows of `length` tokens with the needle at `depth` (module docstring).

    Args:
      tok: a data/tokenizer.py Tokenizer or models/hf_tokenizer.py HFTokenizer (what the
        evaluated model uses; `hf_tokenizer.load_tokenizer(path)` loads either).
      length: the prompt's token budget: prefix (with `bos`) + encoded prompt <= length.
      depth: where the needle goes, 0 (start) .. 1 (just before the question).
      seed: with (length, depth), fixes the keys and filler rotations.
      bos: count the document prefix the harness adds (Evaluator's `bos`, default True).
    Returns:
      rows {"prompt", "answer", "meta": {"length", "depth", "tokens", "needle_at"}}, ready
      for a generation task (jsonl) or `tasks.Example(fields=row, ...)`.
    Raises:
      ValueError: a bad argument, or a length the needle and question do not fit in.
    """
    _check(length, depth, n, key_digits)
    depth = float(depth)
    rng = random.Random(f"passkey:{seed}:{length}:{depth!r}:{key_digits}")
    keys = rng.sample(range(10 ** (key_digits - 1), 10**key_digits), n)
    starts = [rng.randrange(len(FILLER)) for _ in range(n)]
    head = len(prefix_ids(tok)) if bos else 0
    sent = [len(tok.encode(s)) for s in FILLER]  # a sentence's tokens (~ its cost in context)
    guess = None  # sentences of the previous row: the next one needs about as many
    rows = []
    for key, start in zip(keys, starts):
        text, m, k, c = _fit(tok, length, depth, NEEDLE.format(key=key), start, sent, head,
                             guess, bos)  # fmt: skip
        guess = m
        before = " ".join(_filler(start, k))
        needle_at = prompt_tokens(tok, before, bos=bos) if k else head
        rows.append({"prompt": text, "answer": str(key),
                     "meta": {"length": length, "depth": depth, "tokens": c,
                              "needle_at": needle_at}})  # fmt: skip
    return rows


def _filler(start: int, m: int) -> list[str]:
    """m filler sentences, cycling FILLER from index `start`."""
    return [FILLER[(start + j) % len(FILLER)] for j in range(m)]


def _build(m: int, needle: str, depth: float, start: int, sent: list[int]) -> tuple[str, int]:
    """(prompt, k): m filler sentences with the needle after the k-th, the boundary whose
    filler-token fraction before it is nearest `depth` (ties: the earlier one)."""
    cum = [0]
    for j in range(m):
        cum.append(cum[-1] + sent[(start + j) % len(FILLER)])
    k = min(range(m + 1), key=lambda i: (abs(cum[i] - depth * cum[m]), i))
    filler = _filler(start, m)
    return " ".join(filler[:k] + [needle] + filler[k:] + [QUESTION]), k


def _fit(tok, length, depth, needle, start, sent, head, guess, bos):
    """(prompt, sentences m, needle boundary k, tokens): the most filler sentences that keep
    head + encoded prompt <= length, searched from `guess` (the previous row's m) in steps of
    about the remaining gap while far from it, then one sentence at a time."""
    count = lambda text: head + len(tok.encode(text))  # noqa: E731
    if guess is None:
        fixed = count(f"{needle} {QUESTION}")
        if fixed > length:
            raise ValueError(_too_short(tok, length, fixed, bos))
        guess = max(0, (length - fixed) * len(FILLER) // (sum(sent) + len(FILLER)))
    m = guess
    text, k = _build(m, needle, depth, start, sent)
    c = count(text)
    while c > length:  # too long: drop sentences (many at once while far over)
        if m == 0:
            raise ValueError(_too_short(tok, length, c, bos))
        m = max(0, m - max(1, math.ceil((c - length) / max(1, min(sent)))))
        text, k = _build(m, needle, depth, start, sent)
        c = count(text)
    step_max = max(sent) + 1
    step = max(1, (length - c) // step_max)
    while True:  # add sentences while the prompt stays within `length`
        t2, k2 = _build(m + step, needle, depth, start, sent)
        c2 = count(t2)
        if c2 <= length:
            m, text, k, c = m + step, t2, k2, c2
            step = max(1, (length - c) // step_max)
        elif step > 1:
            step = 1
        else:
            return text, m, k, c


def _too_short(tok, length: int, need: int, bos: bool) -> str:
    what = "prefix included" if bos else "no prefix"
    name = getattr(tok, "name", type(tok).__name__)
    return (f"length {length} is too short: the needle and question alone take {need} tokens "
            f"({what}) with tokenizer {name}")  # fmt: skip


class BudgetError(ValueError):
    """max_new_tokens too small for the keys' spelling (`write_tasks`)."""


def answer_tokens(tok, key: str) -> int:
    """Tokens of the key as the model continues "... The pass key is": a space, then digits
    (no BOS; a digit-per-piece tokenizer spells a 5-digit key in 6 or 7)."""
    return len(tok.encode(" " + key, bos=False))


def make_spec(name: str, file: str, max_new_tokens: int = 8) -> dict:
    """The harness's spec (tasks.TaskSpec.from_dict) of one passkey task file."""
    return {
        "name": name,
        "type": "generation",
        "file": file,
        "template": "{prompt}",
        "scoring": "regex",
        "answer_regex": ANSWER_REGEX,
        "normalize": "number",
        "stop": ["\n\n"],
        "max_new_tokens": int(max_new_tokens),
    }


def write_tasks(
    out_dir: str, tok, lengths, depths, n: int, seed: int = 0, *, max_new_tokens: int = 8,
    key_digits: int = 5,
) -> str:  # fmt: skip
    """Writes one jsonl per (length, depth) and `spec.json` listing their tasks into `out_dir`;
    returns the spec path. Every row is built before anything is written, so a bad length
    leaves no partial output."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    lengths = list(dict.fromkeys(int(x) for x in lengths))
    depths = list(dict.fromkeys(float(d) for d in depths))
    files = {}
    for length in lengths:
        for depth in depths:
            files[task_name(length, depth)] = make_examples(tok, length, depth, n, seed,
                                                            key_digits=key_digits)  # fmt: skip
    # A key the budget cannot spell scores 0 even when copied perfectly, and still looks
    # 'extracted' (a shorter number matches the regex): refused, naming the tokens it needs.
    answers = {r["answer"] for rows in files.values() for r in rows}
    need, longest = max((answer_tokens(tok, a), a) for a in answers)
    if need > max_new_tokens:
        raise BudgetError(f"max_new_tokens={max_new_tokens} cannot hold a pass key: ' {longest}' "
                          f"is {need} tokens of this tokenizer (key_digits={key_digits}); give "
                          f"max_new_tokens >= {need}")  # fmt: skip
    os.makedirs(out_dir, exist_ok=True)
    specs = []
    for name, rows in files.items():
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        specs.append(make_spec(name, f"{name}.jsonl", max_new_tokens))
    path = os.path.join(out_dir, "spec.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(specs, f, indent=1)
    return path


def accuracy_table(results: dict, metric: str = "exact_match") -> str:
    """Length x depth grid of `metric` from `python -m flaxlm.evaluation --out` JSON (or its
    "tasks" dict); tasks not named like passkey ones are ignored. A `mean` column averages each
    length over its depths; tasks whose prompts the harness cut are listed below the grid, and
    so, for an incomplete run's OUT.partial, are the tasks it never reached."""
    if not isinstance(results, dict):
        kind = type(results).__name__
        raise ValueError(f"not an evaluation --out JSON: its top level is a {kind} (a "
                         "spec.json? --table reads the results)")  # fmt: skip
    tasks = results.get("tasks", results)
    if not isinstance(tasks, dict):
        raise ValueError(f"not an evaluation --out JSON: 'tasks' is a {type(tasks).__name__}")
    cells, n, cut = {}, set(), []
    for name, r in tasks.items():
        m = NAME_RE.match(name)
        if m and not isinstance(r, dict):
            raise ValueError(f"not an evaluation --out JSON: task {name!r} is {r!r}, not a dict "
                             "with its metrics")  # fmt: skip
        if not m or metric not in r.get("metrics", {}):
            continue
        cells[(int(m.group(1)), float(m.group(2)))] = r["metrics"][metric]
        n.add(r.get("n"))
        if r["metrics"].get("truncated"):
            cut.append(f"{name} ({r['metrics']['truncated']})")
    if not cells:
        raise ValueError(f"no passkey tasks with metric {metric!r} in the results")
    lengths = sorted({k[0] for k in cells})
    depths = sorted({k[1] for k in cells})
    per = "/".join(str(x) for x in sorted(n, key=str))
    lines = [
        f"passkey {metric} (n={per} per cell; rows: length in tokens, columns: depth)",
        f"{'length':>8} " + " ".join(f"{d:>7g}" for d in depths) + f" {'mean':>7}",
    ]
    for length in lengths:
        row = [cells.get((length, d)) for d in depths]
        vals = [v for v in row if v is not None]
        cols = " ".join("      -" if v is None else f"{v:>7.3f}" for v in row)
        lines.append(f"{length:>8} {cols} {sum(vals) / len(vals):>7.3f}")
    if cut:
        lines.append("truncated (prompts longer than max_seq_len - max_new_tokens, cut from the "
                     "left): " + ", ".join(cut))  # fmt: skip
    if results.get("complete") is False:  # an OUT.partial: the run stopped before these ran
        never = [t for t in results.get("tasks_requested", ()) if t not in tasks]
        lines.append(f"incomplete run: {len(never)} requested task(s) have no results"
                     + (f" ({', '.join(never[:6])}{', ...' if len(never) > 6 else ''})"
                        if never else ""))  # fmt: skip
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------


def _ints(flag: str, s: str) -> list[int]:
    out = []
    for part in (p.strip() for p in s.split(",")):
        try:
            v = int(part)
        except ValueError:
            raise SystemExit(f"{flag}: {part!r} is not an integer (comma-separated token "
                             "counts, e.g. 512,1024,4096)") from None  # fmt: skip
        if v < 1:
            raise SystemExit(f"{flag}: {v} must be a positive number of tokens")
        out.append(v)
    return out


def _depths(s: str) -> list[float]:
    out = []
    for part in (p.strip() for p in s.split(",")):
        try:
            v = float(part)
        except ValueError:
            raise SystemExit(f"--depths: {part!r} is not a number (comma-separated, in [0, 1])"
                             ) from None  # fmt: skip
        if not 0.0 <= v <= 1.0:
            raise SystemExit(f"--depths: {part} is outside [0, 1] (0: first, 1: last sentence)")
        out.append(v)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flaxlm.evaluation.passkey", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", default="", help="directory for the jsonl files and spec.json")
    p.add_argument("--tokenizer", default="",
                   help="the model's tokenizer: SentencePiece .model, HF tokenizer.json or an "
                        "HF directory; lengths are counted in its tokens")  # fmt: skip
    p.add_argument("--lengths", default="512,1024,4096", help="prompt lengths in tokens (BOS "
                   "included), comma-separated")  # fmt: skip
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                   help="needle depths in [0, 1], comma-separated")  # fmt: skip
    p.add_argument("--n", type=int, default=20, help="examples per (length, depth)")
    p.add_argument("--seed", type=int, default=0, help="keys and filler rotations")
    p.add_argument("--max_new_tokens", type=int, default=8, help="generation budget per example")
    p.add_argument("--key_digits", type=int, default=5, help="digits of a pass key")
    p.add_argument(
        "--table",
        default="",
        metavar="RESULTS_JSON",
        help="instead: print the length x depth grid of an evaluation's --out JSON",
    )
    return p


def _check_out(path: str) -> None:
    """A one-line SystemExit naming --out unless `write_tasks` can make or use the directory
    `path`: checked before any row is built (a file there was a FileExistsError traceback from
    os.makedirs once the work was done)."""
    where = os.path.abspath(path)
    if os.path.exists(where) and not os.path.isdir(where):
        raise SystemExit(f"--out {path}: not a directory (the task files' directory)")
    parent = where
    while not os.path.exists(parent):  # the nearest existing ancestor: makedirs makes the rest
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise SystemExit(f"--out {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SystemExit(f"--out {path}: cannot write in {parent}")


def main(argv: list[str] | None = None) -> str:
    """Writes the tasks (returns the spec path), or with --table prints the grid (returns it)."""
    args = _parser().parse_args(argv)
    if args.table:
        try:
            with open(args.table, encoding="utf-8") as f:
                results = json.load(f)
            table = accuracy_table(results)
        except (OSError, ValueError) as e:  # (json.JSONDecodeError is a ValueError)
            raise SystemExit(f"--table {args.table}: {e}") from None
        print(table)
        return table
    for flag, value in (("--out", args.out), ("--tokenizer", args.tokenizer)):
        if not value:
            raise SystemExit(f"{flag} is required (or --table RESULTS_JSON)")
    _check_out(args.out)
    lengths, depths = _ints("--lengths", args.lengths), _depths(args.depths)
    for flag, v in (("--n", args.n), ("--max_new_tokens", args.max_new_tokens),
                    ("--key_digits", args.key_digits)):  # fmt: skip
        if v < 1:
            raise SystemExit(f"{flag}: {v} must be >= 1")
    if args.n > 9 * 10 ** (args.key_digits - 1):
        raise SystemExit(f"--n: {args.n} distinct keys do not exist with --key_digits "
                         f"{args.key_digits}")  # fmt: skip
    from flaxlm.models.hf_tokenizer import HFError, load_tokenizer

    if not os.path.exists(args.tokenizer):
        raise SystemExit(f"--tokenizer {args.tokenizer}: no such file or directory")
    try:
        tok = load_tokenizer(args.tokenizer)
    except HFError as e:
        raise SystemExit(f"--tokenizer {args.tokenizer}: {e}") from None
    try:
        path = write_tasks(args.out, tok, lengths, depths, args.n, args.seed,
                           max_new_tokens=args.max_new_tokens,
                           key_digits=args.key_digits)  # fmt: skip
    except BudgetError as e:
        raise SystemExit(f"--max_new_tokens: {e}") from None
    except ValueError as e:  # a length the needle does not fit in
        raise SystemExit(f"--lengths: {e}") from None
    except OSError as e:  # what _check_out could not foresee (a full disk, a race)
        raise SystemExit(f"--out {args.out}: {e}") from None
    print(f"{len(lengths) * len(depths)} passkey tasks x {args.n} examples -> {path}",
          file=sys.stderr)  # fmt: skip
    print(f"run: python -m flaxlm.evaluation --checkpoint RUN --tokenizer {args.tokenizer} "
          f"--tasks {path} --out RUN/passkey.json\n"
          f"then: python -m flaxlm.evaluation.passkey --table RUN/passkey.json",
          file=sys.stderr)  # fmt: skip
    return path


if __name__ == "__main__":
    main()
