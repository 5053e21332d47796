"""Command line: sample completions from a flaxlm run or an HF checkpoint directory.

    python -m flaxlm.generate runs/sft --prompt "What is the capital of France?" --chat
    python -m flaxlm.generate ~/Llama-3.2-1B --prompts_file prompts.txt --temperature 0.7 \
        --top_p 0.9 --max_new_tokens 256 --json > out.jsonl

MODEL is a flaxlm run directory (holds checkpoints/; read with train/checkpoint.load_model: a
LoRA run's adapters are merged into its base weights, a PPO run gives its policy) or an HF
directory (config.json + safetensors; --step and --ema, the run's EMA weights, are for runs
only). The tokenizer is --tokenizer,
else the run's meta["tokenizer"] (a relative path is looked up in the run directory, and so is
an absolute one that no longer exists, by its file name: a moved or copied run), else
the HF directory's tokenizer.json / tokenizer.model. --dtype (float32 | bfloat16 | float16)
casts the weights and computes in that dtype.

--chat renders each prompt as a user turn (after --system, if given) with a generation prompt:
an HF tokenizer's own Jinja chat template when it has one (chat_template.jinja, else
tokenizer_config.json's), else flaxlm's
chat template (data/formats.py), whose end-of-turn token stops generation. Plain prompts start
with the BOS the tokenizer adds, as transformers' tokenizer(text) (an HF tokenizer.json whose
post-processor adds none, SmolLM2's, gets none; models/hf_tokenizer.py); --no_bos drops it.

Output: per prompt "### PROMPT" then the completion (stop token removed); with --json one JSON
object per line, in prompt order: {"prompt" (the text; with --system the messages rendered,
[{"role": "system", ...}, {"role": "user", ...}], so that evaluation/winrate.py scores the
conversation answered; a record's messages likewise), "completion", "n_tokens" (generated,
the stop token included), "stopped" (ended at a stop token or --stop string rather than
--max_new_tokens), and a prompt record's "meta" (below)};
with --num_samples K, K in a row per prompt (and "sample": k in 0..K-1). --top_logprobs K (with
--json) adds "tokens": per generated token (the stop token included) {"id", "token" (its text
in mid-text, " Paris"), "logprob", "top": the K most likely tokens at its position, [{"id",
"token", "logprob"}, ...] most likely first} — the model's distribution at temperature 1,
whatever the sampler drew from (models/decode.py, "Logprobs"), for calibration and
token-level analysis. --stop STR (repeatable)
ends a completion inside the decode loop once its text contains STR (models/stop_strings.py),
and the completion is cut before it. Blank lines of --prompts_file are skipped. Prompts are
not truncated: one that with --max_new_tokens runs past the model's max_seq_len generates
anyway, with a warning (models/decode.py). Prompt i (counting from 0, blank lines skipped)
samples with its own key, fold_in(PRNGKey(--seed), i) — sample k of K with
fold_in(fold_in(PRNGKey(--seed), i), k), from one prefill of the prompt
(`generate(..., num_samples=K)`): its samples depend on --seed, i, k and its ids only, not on
--batch or the other prompts, and for K > 1 not on K (more samples keep the first ones). Stop
tokens: with --chat the template's (flaxlm's `<|end|>` and EOS, or an HF tokenizer's eos ids);
else the tokenizer's stop ids or its EOS.

A --prompts_file named .jsonl or .json (compressed too: .jsonl.gz, .zst; or .parquet, .arrow)
holds RL prompt records, what GRPO/PPO read (alignment/rl_common.py `load_prompts`), checked by
the same data/chat_records.py functions: {"prompt": text or messages (or "messages"), "meta":
{...}}. A text prompt is used as a line of a text file is; messages need --chat (trailing
assistant turns, a chat reused as a prompt, are dropped, as the rollouts drop them; --system is
put first unless the record has a system turn of its own, then it is an error); a record with
"tools" is refused (not rendered here). With --json each line of a record's samples carries its
"meta" unchanged (none when the record has none), for evaluation/best_of_n.py's verifiable
rewards (--rewards exact_match judges by meta.answer). A bad record (malformed JSON, no prompt,
a blank one, a non-object meta) is a usage error naming file:line.

--draft DRAFT (a run or HF directory of a smaller model with the same tokenizer, e.g. a student
distilled from MODEL) decodes speculatively (models/speculative.py): the draft proposes
--draft_tokens tokens, MODEL checks them in one forward. The completions follow MODEL's
distribution (greedy: the same tokens as without --draft, up to float rounding), drawn with
other random numbers than without it; the draft's acceptance rate is printed on stderr. With
--draft, rows run on past a --stop string (the text is cut all the same) and each of
--num_samples samples prefills its prompt on its own. --draft ngram needs no draft model
(prompt lookup: the tokens that followed the latest earlier occurrence of the last --ngram
tokens, or fewer, in the prompt or output): it pays where completions copy their context.

A model too big for one device: `--mesh fsdp=-1` (or tensor=8 --sharding fsdp_tp, ...) splits it
over the local devices, read straight into its shards; across hosts, the same command on each
with --coordinator/--num_processes/--process_id or --distributed (flaxlm/cli_mesh.py). The
samples do not depend on the mesh (up to float rounding); with several processes, process 0
prints.

Bad input fails before any generation with a message, not a traceback: sampling flags, --dtype,
an unreadable --prompts_file or a bad record of one (usage errors, exit 2); a missing model
directory, checkpoint step or tokenizer, a reward-model run, --step with an HF directory, a
prompt that encodes to no tokens (--no_bos with an empty prompt), a --chat template that fails
on the prompts (its own raise_exception, e.g. "System role not supported"; an undefined value)
(exit 1, the message naming the path, prompt or tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from flaxlm.cli_mesh import add_mesh_args, is_writer, setup_mesh

DTYPES = ("float32", "bfloat16", "float16")  # --dtype: what HF import accepts too


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flaxlm.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("model", help="flaxlm run directory or HF checkpoint directory")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts_file", default="",
                   help="one prompt per line ('-' = stdin); .jsonl / .json: RL prompt records "
                   "{prompt, meta}, each --json line carrying its record's meta")  # fmt: skip
    p.add_argument("--tokenizer", default="", help="tokenizer file or directory (default: auto)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--ema", action="store_true",
                   help="the run's EMA weights (trained with ema.decay > 0)")  # fmt: skip
    p.add_argument("--dtype", default="", choices=("", *DTYPES),
                   help="compute/param dtype (default: the checkpoint's)")  # fmt: skip
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    p.add_argument(
        "--min_p",
        type=float,
        default=0.0,
        help="drop tokens below min_p x the top token's probability (0 = off)",
    )
    p.add_argument(
        "--repetition_penalty",
        type=float,
        default=1.0,
        help="> 0; 1 = off: a token already in the prompt or the completion has its "
        "logit divided by this where positive, multiplied where negative (HF's)",
    )
    p.add_argument(
        "--frequency_penalty",
        type=float,
        default=0.0,
        help="subtracted from a token's logit per time the completion holds it (OpenAI's; 0 = off)",
    )
    p.add_argument(
        "--presence_penalty",
        type=float,
        default=0.0,
        help="subtracted from a token's logit once the completion holds it (OpenAI's; 0 = off)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="prompt i samples with key fold_in(PRNGKey(seed), i): the same seed and prompt "
        "list give the same samples, whatever --batch",
    )
    p.add_argument(
        "--num_samples",
        type=int,
        default=1,
        help="samples per prompt (sample k of prompt i: key fold_in(fold_in(PRNGKey(seed), i), "
        "k)), each prompt's prefill shared by its samples",
    )
    p.add_argument("--stop", action="append", default=[],
                   help="a stop string (repeatable; escapes like \\n are read): a completion "
                   "ends once its text contains one, cut before it")  # fmt: skip
    p.add_argument("--batch", type=int, default=8,
                   help="prompts per generate call (times --num_samples rows)")  # fmt: skip
    p.add_argument("--chat", action="store_true", help="apply the chat template")
    p.add_argument("--system", default="", help="system message (with --chat)")
    p.add_argument("--chat_template_kwargs", default="",
                   help='JSON object of chat-template variables, e.g. \'{"enable_thinking": '
                        'false}\' (default: what the run trained with)')  # fmt: skip
    p.add_argument("--no_bos", action="store_true", help="do not prepend BOS (plain prompts)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of text")
    p.add_argument("--top_logprobs", type=int, default=0,
                   help="with --json: each record's \"tokens\", every generated token's id, "
                   "text and logprob with the K most likely tokens at its position (the "
                   "model's distribution at temperature 1); 0 = off")  # fmt: skip
    p.add_argument("--decode_attention", default="auto",
                   help="decode-step attention: one Pallas kernel per layer "
                   "(models/decode_attention.py; for GPUs, slow elsewhere; pallas:BK:W:S sets "
                   "its key block, warps and stages), xla (XLA's), or auto: the kernel on CUDA "
                   "GPUs, XLA's elsewhere")  # fmt: skip
    p.add_argument("--decode_gemm", default="auto", choices=("auto", "xla", "cublas"),
                   help="GPU matmuls: cuBLAS calls with the projections concatenated once per "
                   "call (faster on the H200, holds the concatenated copy), XLA's Triton gemm "
                   "fusions, or auto: cuBLAS on CUDA GPUs for float weights")  # fmt: skip
    p.add_argument("--decode_mlp", default="xla",
                   help="decode-step silu(gate)·up: xla, or one Pallas kernel per layer "
                   "(models/decode_mlp.py; for GPUs, slow elsewhere; pallas:BN:BK:W:S sets its "
                   "tiling) — a candidate, not the default")  # fmt: skip
    p.add_argument("--decode_norm", default="auto", choices=("auto", "xla", "fold"),
                   help="fold: each layer's pre-norm scales folded into the projections once "
                   "per call and the division by rms done inside the Pallas attention and "
                   "gate|up kernels, so no norm kernels run per step (pre-norm models, no "
                   "q|k|v biases, q/k norms or experts); auto: fold with the attention kernel "
                   "and cuBLAS gemms on CUDA GPUs, where it measured faster")  # fmt: skip
    p.add_argument("--quantize", default="none", choices=("none", "int8"),
                   help="int8: projection weights in int8 with a scale per output channel "
                   "(models/quant.py; half the weight bytes a decode step reads; the quantized "
                   "model's tokens)")  # fmt: skip
    p.add_argument("--cache_dtype", default="", choices=("", "int8", "bfloat16", "float32"),
                   help="KV cache dtype ('' = the model's compute dtype); int8: keys and values "
                   "in int8 with a scale per token and head (53%% of bf16's bytes at head dim "
                   "64; decode steps attend over the quantized cache)")  # fmt: skip
    p.add_argument("--full_cache", action="store_true",
                   help="sliding-window layers keep full KV caches, not rings of W slots "
                   "(the same tokens; more memory)")  # fmt: skip
    p.add_argument(
        "--draft",
        default="",
        help="speculative decoding: a smaller model (run or HF directory) with the "
        "same tokenizer proposes tokens that MODEL verifies (models/speculative.py); "
        "'ngram': prompt lookup, the tokens that followed the last --ngram tokens earlier "
        "in the prompt or output",
    )
    # (None when not given: each is refused without the --draft it applies to, then takes
    # its default in _check)
    p.add_argument("--ngram", type=int, default=None,
                   help="with --draft ngram: the longest n-gram looked up (default 3)")  # fmt: skip
    p.add_argument(
        "--draft_tokens",
        type=int,
        default=None,
        help="tokens the draft proposes per MODEL forward (with --draft; default 4)",
    )
    add_mesh_args(p)
    return p


def _tokenizer_path(given: str, meta: dict, model_dir: str) -> str:
    """--tokenizer, else the run's meta["tokenizer"] (as read_meta found it: a relative path
    in the run directory; an absolute one that is gone, e.g. the run was moved, as
    run_dir/<basename>); a relative --tokenizer that does not exist here is looked up in
    the run directory. A missing file is an error naming the path as given."""
    path = given or meta.get("tokenizer", "")
    if not path:
        raise SystemExit(f"{model_dir}: checkpoint meta has no 'tokenizer'; pass --tokenizer")
    if not os.path.exists(path) and os.path.exists(os.path.join(model_dir, path)):
        path = os.path.join(model_dir, path)
    if not os.path.exists(path):
        where = "--tokenizer" if given else f"the checkpoint meta of {model_dir}"
        raise SystemExit(f"tokenizer {path} (from {where}) does not exist")
    return path


def load(model_dir: str, tokenizer: str = "", step=None, dtype: str = "",
         template_kwargs: str = "", ema: bool = False, mesh=None, rules=None):  # fmt: skip
    """(cfg, params, tokenizer) of a flaxlm run or an HF directory. A run whose checkpoint,
    step or tokenizer cannot be read (or, with `ema`, that has no EMA weights), or an unusable
    HF directory, raises SystemExit with the reader's message (it names the file). The
    tokenizer's chat-template variables: `template_kwargs` (JSON object text), else those the
    run trained with (its meta). `mesh`, `rules`: params read straight into their shards."""
    import jax
    import jax.numpy as jnp

    from flaxlm.models import hf
    from flaxlm.train.checkpoint import CheckpointError
    from flaxlm.train.checkpoint_read import MeshError

    meta = {}
    try:
        if os.path.isdir(os.path.join(model_dir, "checkpoints")):
            from flaxlm.train.checkpoint import load_model, read_meta

            # One step for both: "latest" could move between the two reads while a run trains.
            step, meta = read_meta(model_dir, step)
            tok_path = _tokenizer_path(tokenizer, meta, model_dir)
            cfg, params, _ = load_model(model_dir, step, mesh, rules, ema=ema)
            if dtype:
                cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
                params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)
        elif os.path.exists(os.path.join(model_dir, "config.json")):
            if step is not None or ema:
                raise SystemExit(
                    f"{model_dir}: --{'step' if step is not None else 'ema'} is for flaxlm "
                    "runs; an HF directory holds one set of weights"
                )
            cfg, params = hf.load_pretrained(model_dir, dtype or None, mesh=mesh, rules=rules)
            tok_path = tokenizer or model_dir
        else:
            raise SystemExit(
                f"{model_dir}: neither a flaxlm run (checkpoints/) nor an HF directory"
            )
        tok = hf.load_tokenizer(tok_path, cfg.vocab_size)
        hf.set_template_kwargs(tok, template_kwargs, meta.get("chat_template_kwargs"),
                               "--chat_template_kwargs")  # fmt: skip
        return cfg, params, tok
    except (CheckpointError, MeshError, hf.HFError) as e:
        raise SystemExit(str(e)) from None


def chat_messages(prompt: str | list[dict], system: str = "") -> list[dict]:
    """The conversation --chat renders for a prompt (a text: the user's turn; or a record's
    messages): the --system turn, if any, first."""
    head = [{"role": "system", "content": system}] if system else []
    return head + ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)


def encode_prompts(tok, texts, chat: bool, system: str = "", bos: bool = True):
    """(prompt ids per prompt, stop token ids). A prompt is a text, or (with `chat`) a list of
    messages."""
    if not chat:
        if any(not isinstance(t, str) for t in texts):
            raise ValueError("a prompt of messages needs the chat template (--chat)")
        stops = getattr(tok, "stop_ids", None) or ((tok.eos_id,) if tok.eos_id >= 0 else ())
        return [tok.encode(t, bos=bos and tok.bos_id >= 0) for t in texts], tuple(stops)
    from flaxlm.data.formats import generation_prompt

    rendered = [generation_prompt(chat_messages(t, system), tok) for t in texts]
    return [ids for ids, _ in rendered], rendered[0][1] if rendered else ()


def json_prompt(text: str | list[dict], chat: bool, system: str = ""):
    """--json's "prompt": the text, or with --system (or a record's messages) the messages
    rendered (a list), so that a reader of the file (evaluation/winrate.py, which takes a text
    as one user turn) has the conversation that was answered, not one without its system
    turn."""
    return chat_messages(text, system) if chat and (system or not isinstance(text, str)) else text


def prompt_text(prompt: str | list[dict]) -> str:
    """A prompt as the text output's "### " header shows it: a record's messages by the last."""
    return prompt if isinstance(prompt, str) else str(prompt[-1].get("content") or "")


def _check(p: argparse.ArgumentParser, args) -> None:
    """Bad sampling flags fail here, before a checkpoint is loaded; so does a flag that would
    be ignored (a draft's flags without --draft, kernel choices with it)."""
    inf = float("inf")
    draft_flags_bad = [
        (args.ngram is not None and args.draft != "ngram", "--ngram needs --draft ngram"),
        (args.draft_tokens is not None and not args.draft, "--draft_tokens needs --draft"),
    ]
    args.ngram = 3 if args.ngram is None else args.ngram
    args.draft_tokens = 4 if args.draft_tokens is None else args.draft_tokens
    bad = draft_flags_bad + [
        (args.max_new_tokens < 1, "--max_new_tokens must be >= 1"),
        # (NaN fails this test, not `< 0`: it used to decode token 0s)
        (not 0 <= args.temperature < float("inf"), "--temperature must be >= 0 and finite"),
        (args.top_k < 0, "--top_k must be >= 0"),
        (not 0 < args.top_p <= 1, "--top_p must be in (0, 1]"),
        (not 0 <= args.min_p < 1, "--min_p must be in [0, 1)"),
        (not 0 < args.repetition_penalty < inf, "--repetition_penalty must be > 0 and finite"),
        (not -inf < args.frequency_penalty < inf, "--frequency_penalty must be finite"),
        (not -inf < args.presence_penalty < inf, "--presence_penalty must be finite"),
        (
            bool(args.draft) and penalized(args),
            "--repetition_penalty/--frequency_penalty/--presence_penalty do not apply with "
            "--draft (speculative decoding samples the model's own distribution)",
        ),
        (args.batch < 1, "--batch must be >= 1"),
        (args.num_samples < 1, "--num_samples must be >= 1"),
        (
            args.num_samples > 1 and args.temperature == 0,
            "--num_samples > 1 needs --temperature > 0 (greedy samples are all the same)",
        ),
        (bool(args.system) and not args.chat, "--system needs --chat"),
        (any(not s for s in args.stop), "--stop needs a non-empty string"),
        (args.draft_tokens < 1, "--draft_tokens must be >= 1"),
        (
            bool(args.draft)
            and (
                args.decode_mlp != "xla"
                or args.decode_norm not in ("xla", "auto")
                or args.decode_attention not in ("xla", "auto")
                or args.decode_gemm not in ("xla", "auto")
            ),
            "--decode_attention/--decode_gemm/--decode_mlp/--decode_norm do not apply with "
            "--draft (speculative decoding runs its own programs, XLA's attention and gemms)",
        ),
        (args.ngram < 1, "--ngram must be >= 1"),
        (args.top_logprobs < 0, "--top_logprobs must be >= 0"),
        (args.top_logprobs > 0 and not args.json, "--top_logprobs needs --json"),
        (
            args.top_logprobs > 0 and bool(args.draft),
            "--top_logprobs does not apply with --draft (speculative decoding reports no "
            "alternatives)",
        ),
    ]
    for is_bad, msg in bad:
        if is_bad:
            p.error(msg)
    if args.decode_attention not in ("auto", "xla"):  # a kernel name: its variant checked
        from flaxlm.models.decode_attention import variant_options

        try:
            variant_options(args.decode_attention)
        except ValueError as e:
            p.error(f"--decode_attention: {e}")
    if args.decode_mlp != "xla":
        from flaxlm.models.decode_mlp import variant_options as mlp_variant_options

        try:
            mlp_variant_options(args.decode_mlp)
        except ValueError as e:
            p.error(f"--decode_mlp: {e}")


def token_records(out, text_of) -> list[list[dict]]:
    """--top_logprobs' "tokens" of each output row: per generated token (the stop token
    included, as n_tokens counts it; tokens past a --stop string too, which the completion
    cuts) {"id", "token" (its text in mid-text: `stop_strings.token_text`), "logprob", "top":
    the K most likely at its position as [{"id", "token", "logprob"}, ...], most likely
    first}. Logprobs are the model's at temperature 1, written as the shortest decimals that
    read back as the same float32."""
    import jax
    import numpy as np

    toks, lps, n_gen, top_ids, top_lps = jax.device_get(
        (out.tokens, out.logprobs, out.lengths, out.top_ids, out.top_logprobs))  # fmt: skip

    def entry(i, lp) -> dict:
        return {"id": int(i), "token": text_of(int(i)), "logprob": float(str(np.float32(lp)))}

    return [[{**entry(row[j], lp[j]), "top": [entry(a, b) for a, b in zip(ids[j], tlp[j])]}
             for j in range(int(n))]
            for row, lp, n, ids, tlp in zip(toks, lps, n_gen, top_ids, top_lps)]  # fmt: skip


def penalized(args) -> bool:
    """Whether the flags ask for any repetition, frequency or presence penalty."""
    return (args.repetition_penalty != 1 or args.frequency_penalty != 0
            or args.presence_penalty != 0)  # fmt: skip


def _unescape(s: str) -> str:
    """--stop '\\n\\n' as typed in a shell: backslash escapes read as in a Python string."""
    try:
        return s.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError:
        return s


def _read_prompts(p: argparse.ArgumentParser, path: str, args) -> list[tuple]:
    """(prompt, meta) of each prompt of --prompts_file: its non-blank lines ('-' = stdin),
    meta None, or its RL prompt records (`_read_prompt_records`, by the file's name); an
    unreadable file is a usage error naming it."""
    from flaxlm.data.source_paths import file_format

    if path != "-" and file_format(path) != "text":
        return _read_prompt_records(p, path, args)
    try:
        if path == "-":
            lines = sys.stdin.readlines()
        else:
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        p.error(f"--prompts_file {path}: cannot read it ({e})")
    return [(ln.rstrip("\n"), None) for ln in lines if ln.strip()]


def _read_prompt_records(p: argparse.ArgumentParser, path: str, args) -> list[tuple]:
    """(prompt, meta) of each record of an RL prompt file, read and checked as `load_prompts`
    (alignment/rl_common.py) reads one: the text, or the messages less trailing assistant
    turns; the record's "meta" object as it is, None when it has none. A bad record, or one
    these flags cannot render (messages without --chat, a system turn besides --system, tool
    schemas), is a usage error naming file:line; so is a file that cannot be read."""
    from flaxlm.data.chat_examples import prompt_turns
    from flaxlm.data.chat_records import (
        DataReport,
        FormatError,
        fields_config,
        has,
        prompt_record,
        read_records,
    )
    from flaxlm.data.source_errors import DataError

    if not os.path.isfile(path):
        p.error(f"--prompts_file {path}: cannot read it (no such file)")
    fields, out = fields_config(), []
    try:
        for obj, loc in read_records(path, DataReport(strict=True)):
            try:
                key, prompt, tools, meta = prompt_record(obj, fields)
                turns = prompt_turns(prompt)
                meta = meta if has(obj, fields.meta) else None
                if not turns:
                    raise FormatError("bad_messages", "the prompt has only assistant turns")
                if tools:
                    raise FormatError("bad_tools", "tool schemas are not rendered by generate")
                if isinstance(obj[key], list) and not args.chat:
                    raise FormatError("bad_messages", "a prompt of messages needs --chat")
                if isinstance(obj[key], list) and args.system and turns[0]["role"] == "system":
                    raise FormatError("bad_messages", "the prompt has a system turn of its own; "
                                      "--system would be a second one")  # fmt: skip
            except FormatError as e:
                p.error(f"--prompts_file {loc}: {e.reason} ({e})")
            out.append((obj[key] if isinstance(obj[key], str) else turns, meta))
    except DataError as e:  # (strict: the first line that is no JSON, names file:line)
        hint = ""
        if "malformed_json" in str(e):
            hint = ('; a .jsonl or .json prompts file holds {"prompt", "meta"} records: name a '
                    "file of text prompts otherwise, e.g. .txt")  # fmt: skip
        p.error(f"--prompts_file {e}{hint}")
    except OSError as e:
        p.error(f"--prompts_file {path}: cannot read it ({e})")
    return out


def _load_draft(args, tok, texts, mesh, rules):
    """(cfg, params) of --draft, whose tokenizer must encode the prompts as MODEL's does; ()
    for prompt lookup (--draft ngram)."""
    if args.draft == "ngram":
        return ()
    try:
        dcfg, dparams, dtok = load(args.draft, args.tokenizer, None, args.dtype, "", False,
                                   mesh, rules)  # fmt: skip
    except SystemExit as e:  # `load` names the directory; say which flag gave it
        raise SystemExit(f"--draft {e.code}" if isinstance(e.code, str) else e.code) from None
    probe = [*map(prompt_text, texts), "The quick brown fox, 1234."]
    if dtok.vocab_size != tok.vocab_size or any(dtok.encode(t) != tok.encode(t) for t in probe):
        raise SystemExit(
            f"--draft {args.draft}: its tokenizer ({dtok.vocab_size} pieces) is not "
            f"{args.model}'s ({tok.vocab_size} pieces): the draft must share MODEL's tokenizer"
        )
    if dcfg.vocab_size < tok.vocab_size:
        raise SystemExit(f"--draft {args.draft}: vocab_size {dcfg.vocab_size} is smaller than "
                         f"the tokenizer's {tok.vocab_size} pieces")  # fmt: skip
    return dcfg, dparams


def _speculate(cfg, params, draft, args, prompts, keys, K, sampler, writer):
    """`generate`'s output for a chunk, by speculative decoding: K samples of a prompt are K
    rows with keys fold_in(key, k) (as `generate(num_samples=K)` keys them; each row prefills
    on its own). Stop strings are cut from the text afterwards (rows run on past them).
    Prints the draft's acceptance rate to stderr."""
    import jax

    from flaxlm.models.speculative import speculative_generate

    if K > 1:
        keys = jax.vmap(
            lambda key: jax.vmap(lambda k: jax.random.fold_in(key, k))(
                jax.numpy.arange(K, dtype=jax.numpy.uint32)
            )
        )(keys).reshape(-1, *keys.shape[1:])
        prompts = [p for p in prompts for _ in range(K)]
    out = speculative_generate(cfg, params, *(draft or (None, None)), prompts, rng=keys,
                               draft_tokens=args.draft_tokens, ngram=args.ngram,
                               **sampler)  # fmt: skip
    if writer:
        print(f"speculative: {args.draft_tokens} draft tokens per forward, acceptance "
              f"{out.acceptance_rate(args.draft_tokens):.3f}, "
              f"{out.tokens_per_iteration():.2f} tokens per target forward",
              file=sys.stderr, flush=True)  # fmt: skip
    return out


def main(argv=None) -> None:
    p = _parser()
    args = p.parse_args(argv)
    _check(p, args)
    mesh, rules = setup_mesh(p, args)  # (first: connects the processes of a multi-host job)
    given = [(t, None) for t in args.prompt]  # (prompt: text or messages, meta or None)
    if args.prompts_file:
        given += _read_prompts(p, args.prompts_file, args)
    texts, metas = [t for t, _ in given], [m for _, m in given]
    if not texts:
        raise SystemExit("no prompts: pass --prompt TEXT or --prompts_file FILE")

    import jax
    import numpy as np

    from flaxlm.models import quant
    from flaxlm.models.decode import generate, prompt_keys
    from flaxlm.models.decode_options import check_weight_options, checked_top_logprobs
    from flaxlm.models.stop_strings import StopStrings, token_text

    cfg, params, tok = load(args.model, args.tokenizer, args.step, args.dtype,
                            args.chat_template_kwargs, args.ema, mesh, rules)  # fmt: skip
    if not args.draft:  # the kernel options this model's weights cannot take: one line, now
        try:
            norm = "xla" if args.decode_norm == "auto" else args.decode_norm  # (as generate)
            check_weight_options(cfg, args.decode_mlp, args.quantize, norm,
                                 quant.is_quantized(params))  # fmt: skip
        except ValueError as e:
            raise SystemExit(f"{args.model}: {e}") from None
    try:  # (more than the model's vocabulary: one line, not generate's traceback)
        checked_top_logprobs(args.top_logprobs, cfg.vocab_size)
    except ValueError as e:
        raise SystemExit(f"--top_logprobs: {args.model}: {e}") from None
    writer = is_writer()  # (several processes: each decodes every batch; process 0 prints)
    try:
        prompts, stops = encode_prompts(tok, texts, args.chat, args.system, not args.no_bos)
    except ValueError as e:  # --chat: the template's raise_exception or a failed render (an
        # HFError naming the tokenizer), a tokenizer with neither chat tokens nor EOS
        raise SystemExit(f"--chat: {e}") from None
    for i, ids in enumerate(prompts):
        if not ids:  # generate would name its row in the batch, not the prompt
            raise SystemExit(f"prompt {i} ({texts[i]!r}) encodes to no tokens (--no_bos)")
    draft = _load_draft(args, tok, texts, mesh, rules) if args.draft else None
    rng = jax.random.PRNGKey(args.seed)
    strings = [_unescape(s) for s in args.stop]
    stop_strings = StopStrings.build(tok, strings, cfg.vocab_size) if strings else None
    K = args.num_samples
    text_of = token_text(tok) if args.top_logprobs else None
    for start in range(0, len(prompts), args.batch):
        chunk = list(range(start, min(start + args.batch, len(prompts))))
        # Fill the last batch up to the batch size (one compiled program for every chunk).
        chunk_full = chunk + [chunk[-1]] * (min(args.batch, len(prompts)) - len(chunk))
        sampler = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, stop_tokens=stops,
                       pad_id=max(tok.pad_id, 0), mesh=mesh, rules=rules,
                       cache_dtype=args.cache_dtype or None, quantize=args.quantize)  # fmt: skip
        if draft is None:  # (--draft ngram gives (), not None)
            out = generate(
                cfg, params, [prompts[i] for i in chunk_full], rng=prompt_keys(rng, chunk_full),
                num_samples=K, decode_attention=args.decode_attention,
                decode_gemm=args.decode_gemm, decode_mlp=args.decode_mlp,
                decode_norm=args.decode_norm, window_cache=not args.full_cache,
                stop_strings=stop_strings, repetition_penalty=args.repetition_penalty,
                frequency_penalty=args.frequency_penalty,
                presence_penalty=args.presence_penalty, top_logprobs=args.top_logprobs,
                **sampler,
            )  # fmt: skip
        else:
            out = _speculate(cfg, params, draft, args, [prompts[i] for i in chunk_full],
                             prompt_keys(rng, chunk_full), K, sampler, writer)  # fmt: skip
        toks, lengths = jax.device_get((out.tokens, out.lengths))
        per_token = token_records(out, text_of) if text_of else None
        jobs = [(i, k) for i in chunk for k in range(K)]  # rows i·K + k of this call
        for r, ((i, k), row, n) in enumerate(zip(jobs, toks, lengths) if writer else ()):
            ids = [int(t) for t in np.asarray(row)[: int(n)]]
            stopped = bool(ids) and ids[-1] in stops
            completion = tok.decode(ids[:-1] if stopped else ids)
            cut = min((i for i in (completion.find(s) for s in strings) if i >= 0), default=-1)
            if cut >= 0:  # ended at a stop string: the text before it
                completion, stopped = completion[:cut], True
            if args.json:
                rec = {"prompt": json_prompt(texts[i], args.chat, args.system),
                       "completion": completion, "n_tokens": len(ids),
                       "stopped": stopped, **({"sample": k} if K > 1 else {}),
                       **({} if metas[i] is None else {"meta": metas[i]}),
                       **({} if per_token is None else {"tokens": per_token[r]})}  # fmt: skip
                print(json.dumps(rec, ensure_ascii=False), flush=True)
            else:
                head = f"### {prompt_text(texts[i])}" + (f" (sample {k + 1}/{K})" if K > 1 else "")
                print(f"{head}\n{completion}\n", flush=True)


if __name__ == "__main__":
    main()
