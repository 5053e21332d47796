"""Command line: evaluate a checkpoint on tasks, print a table, write JSON.

    python -m flaxlm.evaluation --checkpoint runs/pt --world runs/demo/world \
        --tasks mc_facts_heldout,gen_facts_heldout,ppl_heldout_text --out runs/pt/eval.json

Tasks are names of the built-in world's tasks (with --world), registered names (a module of
--tasks_module registers them, evaluation/tasks.py `register`), paths to JSON spec files
(evaluation/tasks.py), or benchmark presets with their downloaded data, e.g. mmlu:~/data/mmlu
(evaluation/benchmarks.py; `python -m flaxlm.evaluation.benchmarks list`). The tokenizer is
--tokenizer or the checkpoint's meta["tokenizer"]: a SentencePiece .model or an HF
tokenizer.json (an imported HF checkpoint's).
Every task file and template is checked before the first task runs: every evaluated row is read
and its prompt built with its shots (a placeholder a row lacks names file:line; too few shots,
an empty choice, a generation budget that leaves no room for the prompt within the model's
max_seq_len, a perplexity stride wider than its window, all-empty texts), before the model's
weights are loaded; so is --out (not a directory; its parent a directory that can be written,
or one to create). --out is written once every task has run; until then the finished tasks'
results are in OUT.partial, rewritten after each task (removed at the end), so a run killed or
failing part way keeps them and never replaces an earlier complete OUT. Should a task still fail
when it runs, the command exits with a one-line message after writing OUT.partial with the
finished tasks' results (and "failed": the task and the error). Both files record the tasks
asked for (`tasks_requested`) and whether all of them ran (`complete`). --code_limits
(timeout=20,memory_mb=4096,...: alignment/verify_code.py's Limits) goes over the code_limits of
every code-scored task (HumanEval, MBPP), the programs' time, memory and what they may touch;
the results' specs record the limits each task ran with. --pass_at_k 1,10 reports pass@1 and
pass@10 of every generation task, each estimated from all its --num_samples samples (n >= 10;
Chen et al.'s unbiased estimator, as HumanEval reports them); --maj_at_k 1,4,8 reports maj@1,
maj@4 and maj@8 of every task that votes (scoring math, regex or exact_match: self-consistency's
majority answer), each the exact mean over the k-subsets of its samples. --num_fewshot and
--chat override every task's setting; by default a checkpoint of a post-training task (SFT,
DPO, ...) is prompted with the chat template, and a base model as each task says: a pretrained
or imported HF one (meta task hf_import), or a run of any task on pretraining data (its
config's data.kind text or markov, e.g. a configs/distill.py:text=True student), which never
saw the chat template; a merged run (python -m flaxlm.train.merge) as any of its inputs was.

Tasks whose specs name a `group` (the MMLU preset's subjects: evaluation/benchmarks.py) are
also averaged into it, weighted by examples and unweighted (`<metric>_macro`): the table's
"group" rows and the JSON's "groups" (harness.group_results).

The JSON records what reproduces the run: the checkpoint, step, tokenizer and task files as
absolute paths, each task file's sha256 and row count, --limit, --seed, --batch_tokens,
--gen_batch_size, the chat mode (--chat and what it resolved to) and the chat-template variables
used, besides each task's spec as run.

A model too big for one device: `--mesh fsdp=-1` (or tensor=8 --sharding fsdp_tp, ...) splits it
over the local devices; across hosts, the same command on each with --coordinator/--num_processes/
--process_id or --distributed (flaxlm/cli_mesh.py). Results do not depend on the mesh (up to
float rounding); with several processes, process 0 prints and writes --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

from flaxlm.cli_mesh import add_mesh_args, is_writer, setup_mesh
from flaxlm.evaluation.cli_types import int_at_least

# --limit 0 read no row and then said the task file had "no examples".
_positive = int_at_least(1, " (omit it for every example)")
_at_least_0 = int_at_least(0)


def _temperature(text: str) -> float:
    try:
        t = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not t >= 0:  # (NaN fails >= 0 too)
        raise argparse.ArgumentTypeError(f"{t}: must be >= 0 (0 = greedy)")
    return t


def _ks(text: str) -> tuple[int, ...]:
    """--pass_at_k's "1,10" (--maj_at_k's): positive integers."""
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected k values, e.g. 1,10") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected k values >= 1, e.g. 1,10")
    return ks


def _code_limits(text: str) -> dict:
    from flaxlm.alignment.verify_code import parse_limits

    try:
        return parse_limits(text, "--code_limits")
    except ValueError as e:  # (argparse puts "argument --code_limits: " first itself)
        why = str(e).removeprefix("--code_limits: ").removeprefix("--code_limits.")
        raise argparse.ArgumentTypeError(why) from None


def _with_code_limits(specs, limits: dict, flag: str):
    """`specs` with `limits` laid over each code-scored task's code_limits; no such task to
    apply them to is an error naming the flag (they would silently change nothing)."""
    if not any(s.scoring == "code" for s in specs if s.type == "generation"):
        raise SystemExit(f'{flag}: none of the tasks scores code ("scoring": "code")')
    return [s.replace(code_limits={**s.code_limits, **limits})
            if s.type == "generation" and s.scoring == "code" else s for s in specs]  # fmt: skip


def _replaced(specs, flags: str, only: str | None = None, *, when=None, **values):
    """`specs` with `values` set (those of type `only`, when given, and for which `when(spec)`
    holds); a spec the values make invalid is a one-line error naming the flags that set them
    (`flags`: "--chat on")."""
    try:
        return [s.replace(**values) if only in (None, s.type) and (when is None or when(s))
                else s for s in specs]  # fmt: skip
    except ValueError as e:
        raise SystemExit(f"{e} ({flags})") from None


def _import_task_modules(spec: str) -> None:
    """Imports each module of `--tasks_module` (installed, on PYTHONPATH or in the working
    directory): a plug-in that registers its tasks. Without it the command line's registry
    was always empty, whatever the docstring said of registered names."""
    import importlib
    import sys

    if "" not in sys.path:  # the working directory, as `python -m` puts it first
        sys.path.insert(0, "")
    for name in filter(None, (n.strip() for n in spec.split(","))):
        try:
            importlib.import_module(name)
        except Exception as e:  # (ImportError, a relative name, the module's own error)
            why = f"{type(e).__name__}: {e}"
            raise SystemExit(f"--tasks_module: cannot import {name!r} ({why}); name a module, "
                             "not a file path") from None  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flaxlm.evaluation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--checkpoint", required=True, help="run directory (holds checkpoints/)")
    p.add_argument("--tasks", required=True,
                   help="comma-separated task names, spec .json files or PRESET:DATA_DIR "
                        "(python -m flaxlm.evaluation.benchmarks list)")  # fmt: skip
    p.add_argument("--world", default="", help="built-in world directory (its manifest.json)")
    p.add_argument("--tasks_module", default="",
                   help="comma-separated modules to import first, which register tasks "
                        "(evaluation/tasks.py `register`) that --tasks names")  # fmt: skip
    p.add_argument("--tokenizer", default="", help="SentencePiece .model (default: from meta)")
    p.add_argument("--out", default="", help="write results JSON here")
    p.add_argument("--limit", type=_positive, default=None, help="first N examples of each task")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--ema", action="store_true",
                   help="evaluate the run's EMA weights (trained with ema.decay > 0)")  # fmt: skip
    p.add_argument("--num_fewshot", type=_at_least_0, default=None, help="shots for every task")
    p.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                   help="chat-template prompts for every task (on/off); auto: on for a "
                   "checkpoint post-trained here on chats (meta task not pretrain or "
                   "hf_import, config data.kind not text or markov), else per task")  # fmt: skip
    p.add_argument(
        "--temperature",
        type=_temperature,
        default=None,
        help="generation tasks: sample at this temperature (default: each task's)",
    )
    p.add_argument(
        "--num_samples",
        type=_positive,
        default=None,
        help="generation tasks: samples per prompt (needs --temperature > 0)",
    )
    p.add_argument("--top_p", type=float, default=None,
                   help="generation tasks: nucleus mass in (0, 1] (with --temperature > 0; "
                   "default: each task's)")  # fmt: skip
    p.add_argument(
        "--top_k",
        type=_at_least_0,
        default=None,
        help="generation tasks: sample among the k most likely tokens (0 = off)",
    )
    p.add_argument(
        "--min_p",
        type=float,
        default=None,
        help="generation tasks: drop tokens below min_p x the top one's probability",
    )
    p.add_argument("--pass_at_k", type=_ks, default=None,
                   help="generation tasks: also pass@k for these k (e.g. 1,10), each "
                        "estimated from all --num_samples samples (unbiased)")  # fmt: skip
    p.add_argument("--maj_at_k", type=_ks, default=None,
                   help="generation tasks that vote (scoring math, regex, exact_match): also "
                        "maj@k for these k (e.g. 1,4,8), the exact mean over the k-subsets "
                        "of all --num_samples samples")  # fmt: skip
    p.add_argument("--chat_template_kwargs", default="",
                   help='JSON object of chat-template variables, e.g. \'{"enable_thinking": '
                        'false}\' (default: what the run trained with)')  # fmt: skip
    p.add_argument("--reasoning_end", default=None,
                   help='generation tasks: score the text after this end-of-thinking marker, '
                        'e.g. "</think>" (default: each task\'s reasoning_end)')  # fmt: skip
    p.add_argument("--code_limits", type=_code_limits, default=None,
                   help="code-scored tasks: verify_code's Limits for their programs, over "
                        "each spec's code_limits, e.g. timeout=20,memory_mb=4096")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch_tokens", type=_positive, default=8192, help="tokens per scoring batch")
    p.add_argument("--gen_batch_size", type=_positive, default=32,
                   help="prompts per generation batch (samples do not depend on it)")  # fmt: skip
    p.add_argument("--samples", action="store_true", help="include per-example outputs in JSON")
    add_mesh_args(p)
    return p


# Checkpoint meta tasks that are not post-training in flaxlm's chat template: a pretrained run,
# and an imported HF checkpoint (base or instruct, tuned on its own template if at all).
NOT_CHAT_TUNED = ("pretrain", "hf_import")
# data.kind of pretraining's `data` section (train/pretrain.py; the chat tasks' sections have no
# `kind`): documents or synthetic token streams, never a chat-template conversation.
PRETRAINING_DATA = ("text", "markov")


def trained_on_chats(meta: dict) -> bool:
    """Whether the checkpoint's run tuned it on flaxlm's chat template: a post-training task
    (SFT, DPO, ...) on conversations. Not a pretrained or imported HF one, nor a run of any task
    on pretraining data (its config's data.kind, which train/loop.py stores in the meta; e.g. a
    configs/distill.py:text=True student): that is a base model, whatever the task."""
    if meta.get("task", "pretrain") in NOT_CHAT_TUNED:
        return False
    if meta.get("task") == "merge":  # (python -m flaxlm.train.merge: whether any input was)
        return bool((meta.get("merge") or {}).get("trained_on_chats"))
    data = (meta.get("config") or {}).get("data") or {}
    return not (isinstance(data, dict) and data.get("kind") in PRETRAINING_DATA)


def chat_mode(arg: str, meta: dict) -> bool | None:
    """--chat on/off, or for auto: on for a checkpoint tuned on chats here (`trained_on_chats`),
    None (each task's own setting) for a base model (pretrained, imported HF, or trained on
    pretraining text)."""
    if arg != "auto":
        return arg == "on"
    return True if trained_on_chats(meta) else None


def tokenizer_path(arg: str, meta: dict, run_dir: str) -> str:
    path = arg or meta.get("tokenizer", "")
    if not path:
        raise SystemExit(
            f"no tokenizer: checkpoint meta of {run_dir} has no 'tokenizer'; pass --tokenizer"
        )
    if not os.path.exists(path) and os.path.exists(os.path.join(run_dir, path)):
        path = os.path.join(run_dir, path)
    if not os.path.exists(path):
        raise SystemExit(f"tokenizer {path!r} not found")
    return path


def format_table(results: dict) -> str:
    """One line per (task, metric)."""
    lines = [f"{'task':<28} {'type':<16} {'n':>6}  {'metric':<14} {'value':>10}"]
    for name, r in results.items():
        first = True
        for k, v in r["metrics"].items():
            if k == "n":
                continue
            head = f"{name:<28} {r['type']:<16} {r['n']:>6}" if first else " " * 52
            val = f"{v:>10.4f}" if isinstance(v, float) else f"{v:>10}"
            lines.append(f"{head}  {k:<14} {val}")
            first = False
    return "\n".join(lines)


def file_record(path: str) -> dict:
    """{"path" (absolute), "sha256", "rows" (non-blank lines; a parquet file's rows)} of a task
    file."""
    digest, rows = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for line in f:
            digest.update(line)
            rows += bool(line.strip())
    if path.endswith(".parquet"):  # (read already: the footer is sound)
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(path).metadata.num_rows
    return {"path": os.path.abspath(path), "sha256": digest.hexdigest(), "rows": rows}


def _absolute(spec):
    """`spec` with its task files as absolute paths (results name them whatever the cwd)."""
    few = spec.fewshot_file and os.path.abspath(spec.fewshot_file)
    return spec.replace(file=os.path.abspath(spec.file), fewshot_file=few)


def _message(e: Exception) -> str:
    return str(e.args[0]) if e.args else str(e)  # (str(KeyError) adds quotes)


def check_out(path: str) -> None:
    """A one-line SystemExit naming --out unless `_write` can write `path`: checked before the
    model loads (an existing directory there failed only once the first task had run, leaving
    `path`.tmp behind). Missing parent directories are fine, `_write` makes them."""
    where = os.path.abspath(path)
    if os.path.isdir(where):
        raise SystemExit(f"--out {path}: is a directory (name the results JSON file)")
    parent = os.path.dirname(where)
    while not os.path.exists(parent):  # the nearest existing ancestor
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise SystemExit(f"--out {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SystemExit(f"--out {path}: cannot write in {parent}")


def _write(path: str, out: dict) -> None:
    """`out` as JSON at `path`, replaced whole (a kill mid-write leaves the previous file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:  # (a full disk, Ctrl-C): no half-written .tmp beside the results
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise


def _check_tasks(specs, limit: int | None, meta: dict) -> None:
    """Every task's rows, shots and templates, and the budgets the model config sets: a
    SystemExit naming file:line or the task before any task runs (harness.check_task)."""
    from flaxlm.evaluation.harness import check_task
    from flaxlm.evaluation.tasks import read_examples
    from flaxlm.models.config import ModelConfig

    try:  # without a readable config, load_model says why
        max_seq_len = ModelConfig.from_dict(meta["model_config"]).max_seq_len
    except (KeyError, TypeError, ValueError, AttributeError):
        max_seq_len = None
    for spec in specs:
        try:
            examples = read_examples(spec, limit=limit)
            pool = read_examples(spec, fewshot=True) if spec.num_fewshot else []
            if max_seq_len is not None:
                check_task(spec, examples, pool, max_seq_len)
        except (KeyError, ValueError) as e:  # TaskFileError is a ValueError
            raise SystemExit(_message(e)) from None


def main(argv: list[str] | None = None) -> dict:
    p = _parser()
    args = p.parse_args(argv)
    mesh, rules = setup_mesh(p, args)  # (first: connects the processes of a multi-host job)
    from flaxlm.evaluation.harness import Evaluator, group_results
    from flaxlm.evaluation.tasks import resolve_tasks
    from flaxlm.models.hf_tokenizer import HFError, load_tokenizer, set_template_kwargs
    from flaxlm.train.checkpoint import CheckpointError, load_model, read_meta

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:  # an empty $TASKS in a script would run nothing, print a bare table, exit 0
        raise SystemExit(f"--tasks: no task names given ({args.tasks!r})")
    if args.out and is_writer():  # now, not after the model loaded and a task ran (only
        check_out(args.out)  # process 0 writes it, maybe on a disk of its own)
    _import_task_modules(args.tasks_module)
    try:  # an unknown name, a missing or bad spec file: a one-line usage error
        specs = [_absolute(s) for s in resolve_tasks(names, args.world or None)]
    except (KeyError, ValueError) as e:  # TaskFileError is a ValueError
        raise SystemExit(f"--tasks: {_message(e)}") from None
    try:  # no run there, no such step, an unreadable meta: a one-line usage error
        step, meta = read_meta(args.checkpoint, args.step)
    except CheckpointError as e:
        raise SystemExit(str(e)) from None
    # Each flag's values in turn, so that an error names the flag at fault (`_replaced`).
    if args.num_fewshot is not None:
        specs = _replaced(specs, f"--num_fewshot {args.num_fewshot}", num_fewshot=args.num_fewshot)
    chat = chat_mode(args.chat, meta)
    if chat is not None:  # e.g. on for a task whose chat-mode user turn would hide its choices
        specs = _replaced(specs, f"--chat {args.chat}", chat=chat)
    given = (("temperature", args.temperature), ("num_samples", args.num_samples),
             ("top_p", args.top_p), ("top_k", args.top_k), ("min_p", args.min_p),
             ("reasoning_end", args.reasoning_end))  # fmt: skip
    sampling = {k: v for k, v in given if v is not None}
    if sampling:  # e.g. --num_samples 4 over a greedy task's temperature 0
        flags = " ".join(f"--{k} {v!r}" if k == "reasoning_end" else f"--{k} {v}"
                         for k, v in sampling.items())  # fmt: skip
        specs = _replaced(specs, flags, "generation", **sampling)
    if args.pass_at_k is not None:  # (after --num_samples: each k must be <= it)
        flag = f"--pass_at_k {','.join(map(str, args.pass_at_k))}"
        specs = _replaced(specs, flag, "generation", pass_at_k=args.pass_at_k)
    if args.maj_at_k is not None:  # the tasks whose samples state an answer to vote for
        from flaxlm.evaluation.tasks import VOTED

        flag = f"--maj_at_k {','.join(map(str, args.maj_at_k))}"

        def votes(spec) -> bool:
            return spec.type == "generation" and spec.scoring in VOTED

        if not any(votes(s) for s in specs):
            raise SystemExit(f"{flag}: none of the tasks votes for an answer (a generation "
                             f"task scored {' | '.join(VOTED)})")  # fmt: skip
        specs = _replaced(specs, flag, when=votes, maj_at_k=args.maj_at_k)
    if args.code_limits is not None:
        specs = _with_code_limits(specs, args.code_limits, "--code_limits")
    _check_tasks(specs, args.limit, meta)  # fails now, not after earlier tasks ran

    tok_path = os.path.abspath(tokenizer_path(args.tokenizer, meta, args.checkpoint))
    try:
        cfg, params, _ = load_model(args.checkpoint, step, mesh, rules, ema=args.ema)
    except CheckpointError as e:  # a reward-model run, no EMA with --ema, a broken step: the
        raise SystemExit(str(e)) from None  # message says it all, a traceback adds nothing
    try:  # SentencePiece .model or HF tokenizer.json; its ids must fit the embedding
        tok = load_tokenizer(tok_path, cfg.vocab_size)
        set_template_kwargs(tok, args.chat_template_kwargs, meta.get("chat_template_kwargs"),
                            "--chat_template_kwargs")  # fmt: skip
    except HFError as e:
        raise SystemExit(str(e)) from None
    ev = Evaluator(cfg, params, tok, batch_tokens=args.batch_tokens, seed=args.seed, mesh=mesh,
                   rules=rules, gen_batch_size=args.gen_batch_size)  # fmt: skip
    writer = is_writer()  # (several processes: each runs every task; process 0 reports)

    results = {}
    out = {"checkpoint": os.path.abspath(args.checkpoint), "step": step, "ema": args.ema,
           "tokenizer": tok_path, "limit": args.limit, "seed": args.seed,
           "batch_tokens": args.batch_tokens, "gen_batch_size": args.gen_batch_size,
           "chat": args.chat,
           "chat_mode": {True: "on", False: "off", None: "per task"}[chat],
           "chat_template_kwargs": dict(getattr(tok, "template_kwargs", None) or {}),
           "tasks_requested": [spec.name for spec in specs], "complete": False,
           "tasks": results}  # fmt: skip
    partial = f"{args.out}.partial" if args.out else ""
    for spec in specs:
        try:
            r = ev.run(spec, limit=args.limit)
        except (KeyError, ValueError) as e:  # what the checks could not foresee
            out["failed"] = {"task": spec.name, "error": _message(e)}
            saved = ""
            if writer:
                if results:
                    print(format_table(results))
                if args.out:
                    _write(partial, out)
                    saved = f"; the {len(results)} finished task(s) are in {partial}"
            raise SystemExit(f"task {spec.name!r} failed: {_message(e)}{saved}") from None
        if not args.samples:
            r.pop("samples")
        r["files"] = {k: file_record(getattr(spec, k)) for k in ("file", "fewshot_file")
                      if getattr(spec, k) and (k == "file" or spec.num_fewshot)}  # fmt: skip
        results[spec.name] = r
        if writer:
            print(f"[eval] {spec.name}: {r['n']} examples in {r['seconds']:.1f}s",
                  file=sys.stderr)  # fmt: skip
            if args.out:  # after each task: a later failure or kill keeps these
                _write(partial, out)
    out["complete"] = True
    groups = group_results(results)  # e.g. MMLU's subjects averaged into "mmlu"
    if groups:
        out["groups"] = groups
    if writer:
        print(format_table({**results, **groups}))
        if args.out:  # (an earlier OUT stands until this run has every result)
            _write(args.out, out)
            if os.path.exists(partial):
                os.remove(partial)
    return out


if __name__ == "__main__":
    main()
