"""`python -m flaxlm.generate` against references written here: prompts rendered by hand from
the chat template's definition, `models.decode.generate` called directly on each prompt repeated
K times with per-sample keys fold_in(fold_in(PRNGKey(seed), i), k) (the CLI: one prefill per
prompt, `num_samples=K`), and a LoRA run's weights merged in float64 numpy.

* --chat --system --num_samples K --json: every record (prompt, sample, completion, n_tokens,
  stopped) equals the direct call's tokens; the text output prints the same completions;
  --top_logprobs adds each generated token with the direct call's logprobs and top lists;
* plain prompts: BOS unless --no_bos, EOS stops (not `<|end|>`); a run's tokenizer named
  relative to the run directory is found there;
* bad flags and paths fail before generating, with a message naming the flag, file or prompt
  (argparse's exit 2 for flags, a one-line SystemExit otherwise — never a traceback).
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm import generate as cli
from flaxlm.models import lora as L
from flaxlm.models.config import get_variant
from flaxlm.models.decode import generate, prompt_keys
from flaxlm.models.stop_strings import token_texts
from flaxlm.train.checkpoint import Checkpointer
from flaxlm.train.pretrain import model_fns
from flaxlm.train.state import unbox

CFG = get_variant("tiny", vocab_size=512, n_layers=1, max_seq_len=64)
SPEC = L.LoraSpec(rank=2, alpha=4.0, targets="attn/(q|v)")
TEXTS = ["where does Kavo live", "the city of 42"]
SYSTEM = "say yes or no"


def _save(path, params, meta):
    ck = Checkpointer(str(path), keep=1, async_save=False)
    ck.save(3, {"params": params}, {}, {"model_config": CFG.to_dict(), "head": "lm", **meta})
    ck.close()


def ending_params(tok, rng, cfg=CFG) -> dict:
    """Random weights of `cfg` (numpy, drawn from `rng`) whose `<|end|>` logit is raised: every
    embedding shares a direction c and lm_head's `<|end|>` column is 0.7·c, so that greedy and
    sampled answers end, at varied lengths (also tests/test_serve.py's run)."""
    abstract = unbox(jax.eval_shape(model_fns(cfg)[0], jax.random.PRNGKey(0)))
    params = jax.tree_util.tree_map_with_path(
        lambda p, s: np.ones(s.shape, s.dtype) if p[-1].key == "scale"
        else (0.05 * rng.standard_normal(s.shape)).astype(s.dtype),
        abstract,
    )  # fmt: skip
    c = rng.standard_normal(cfg.d_model)
    c /= np.linalg.norm(c)
    params["embed"]["embedding"] = (params["embed"]["embedding"] + c).astype(np.float32)
    params["lm_head"]["kernel"][:, tok.special_ids()["<|end|>"]] = 0.7 * c
    return params


@pytest.fixture(scope="module")
def run(tmp_path_factory, chat_tokenizer):
    """(run dir, tokenizer, float64-merged params): a LoRA SFT-like run whose `<|end|>` logit
    is raised (every embedding shares a direction c; lm_head's `<|end|>` column is 0.7·c) so
    that samples stop at varied lengths."""
    tok_path, tok = chat_tokenizer
    rng = np.random.default_rng(0)
    base = ending_params(tok, rng)
    lora = jax.tree.map(
        lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype),
        L.abstract_adapters(base, SPEC),
    )
    root = tmp_path_factory.mktemp("generate_cli")
    (root / "run").mkdir()
    shutil.copy(tok_path, root / "run" / "tokenizer.model")
    # The tokenizer named relative to the run directory (a moved run still finds it).
    meta = {"tokenizer": "tokenizer.model", "lora": SPEC.to_dict(), "task": "sft"}
    _save(root / "run", {"base": base, "lora": lora}, meta)
    merged = jax.tree.map(lambda x: np.asarray(x, np.float64), base)
    for name in ("q", "v"):
        ab = lora["layers_0"]["attn"][name]["kernel"]
        w = merged["layers_0"]["attn"][name]["kernel"]
        d = np.asarray(ab["a"], np.float64) @ np.asarray(ab["b"], np.float64)
        merged["layers_0"]["attn"][name]["kernel"] = w + SPEC.alpha / SPEC.rank * d.reshape(w.shape)
    merged = jax.tree.map(lambda x: x.astype(np.float32), merged)
    return str(root / "run"), tok, merged


def _main(args, capsys):
    cli.main(args)
    return capsys.readouterr().out


def test_chat_samples_equal_a_direct_generate_call(run, capsys):
    run_dir, tok, merged = run
    sp = tok.special_ids()
    end, K, seed = sp["<|end|>"], 3, 3
    # [BOS] <|system|> system <|end|> <|user|> text <|end|> <|assistant|>
    ids = [[tok.bos_id, sp["<|system|>"], *tok.encode(SYSTEM), end, sp["<|user|>"],
            *tok.encode(t), end, sp["<|assistant|>"]] for t in TEXTS]  # fmt: skip
    assert cli.encode_prompts(tok, TEXTS, True, SYSTEM) == (ids, (end, tok.eos_id))
    args = [run_dir, "--chat", "--system", SYSTEM, "--prompt", TEXTS[0], "--prompt", TEXTS[1],
            "--num_samples", str(K), "--temperature", "1", "--seed", str(seed),
            "--max_new_tokens", "8", "--batch", "3"]  # fmt: skip
    recs = [json.loads(ln) for ln in _main(args + ["--json"], capsys).splitlines()]
    jobs = [(i, k) for i in range(len(TEXTS)) for k in range(K)]
    key = jax.random.PRNGKey(seed)
    keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(key, i), k) for i, k in jobs])
    out = generate(
        CFG, merged, [ids[i] for i, _ in jobs], max_new_tokens=8,
        rng=keys,
        temperature=1.0, stop_tokens=(end, tok.eos_id), pad_id=0,
    )  # fmt: skip
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    assert len(recs) == len(jobs)
    for rec, (i, k), row, n in zip(recs, jobs, tokens, lengths):
        gen = [int(t) for t in row[:n]]
        stopped = gen[-1] in (end, tok.eos_id)
        # with --system, the prompt is the conversation rendered (evaluation/winrate.py reads it)
        prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TEXTS[i]}]
        want = {"prompt": prompt, "completion": tok.decode(gen[:-1] if stopped else gen),
                "n_tokens": int(n), "stopped": stopped, "sample": k}  # fmt: skip
        assert rec == want
    assert {r["stopped"] for r in recs} == {True, False}  # both endings are exercised
    plain = [r["completion"] for r in recs]
    # Text output: the same completions under "### prompt (sample k/K)" headers.
    text = _main(args, capsys)
    want = "".join(
        f"### {r['prompt'][-1]['content']} (sample {r['sample'] + 1}/{K})\n{r['completion']}\n\n"
        for r in recs
    )
    assert text == want
    # --min_p reaches the sampler: the same draws as a direct call with it
    lines = _main(args + ["--json", "--min_p", "0.3"], capsys).splitlines()
    recs = [json.loads(ln) for ln in lines]
    out = generate(
        CFG, merged, [ids[i] for i, _ in jobs], max_new_tokens=8, min_p=0.3,
        rng=keys,
        temperature=1.0, stop_tokens=(end, tok.eos_id), pad_id=0,
    )  # fmt: skip
    assert [r["n_tokens"] for r in recs] == np.asarray(out.lengths).tolist()
    # --cache_dtype int8 reaches the decoder: the draws of a direct call with an int8 cache
    lines = _main(args + ["--json", "--cache_dtype", "int8"], capsys).splitlines()
    out = generate(
        CFG, merged, [ids[i] for i, _ in jobs], max_new_tokens=8, rng=keys, temperature=1.0,
        stop_tokens=(end, tok.eos_id), pad_id=0, cache_dtype="int8",
    )  # fmt: skip
    got = [json.loads(ln)["n_tokens"] for ln in lines]
    assert got == np.asarray(out.lengths).tolist()
    # the penalties reach the decoder: a direct call's completions with them, not without (a
    # presence penalty of -1000 repeats a row's first token to the end: this random model's
    # logits are too small for positive penalties to move its samples)
    pen = {"repetition_penalty": 1.8, "frequency_penalty": 0.5, "presence_penalty": -1000.0}
    flags = [x for k, v in pen.items() for x in (f"--{k}", str(v))]
    penalized = [json.loads(ln) for ln in _main(args + ["--json", *flags], capsys).splitlines()]
    out = generate(
        CFG, merged, [ids[i] for i, _ in jobs], max_new_tokens=8, rng=keys, temperature=1.0,
        stop_tokens=(end, tok.eos_id), pad_id=0, **pen,
    )  # fmt: skip
    for rec, row, n in zip(penalized, np.asarray(out.tokens), np.asarray(out.lengths)):
        gen = [int(t) for t in row[:n]]
        assert rec["completion"] == tok.decode(gen[:-1] if rec["stopped"] else gen)
        assert gen[1:] == [gen[0]] * (n - 1)  # (stop tokens are never penalized: none ends)
    assert [r["completion"] for r in penalized] != plain


def test_top_logprobs_list_a_direct_calls_alternatives(run, capsys):
    """--json --top_logprobs 3: a record's "tokens" are its generated ids, the stop token
    included, each with its text in mid-text (`stop_strings.token_texts`) and the logprob and
    top-3 list of a direct `generate(..., num_samples=K, top_logprobs=3)` call with the CLI's
    keys; the rest of the record is the record without the flag. (The arguments of
    test_chat_samples_equal_a_direct_generate_call: its program, compiled once.)"""
    run_dir, tok, merged = run
    end, K, seed = tok.special_ids()["<|end|>"], 3, 3
    args = [run_dir, "--chat", "--system", SYSTEM, "--prompt", TEXTS[0], "--prompt", TEXTS[1],
            "--num_samples", str(K), "--temperature", "1", "--seed", str(seed),
            "--max_new_tokens", "8", "--batch", "3", "--json"]  # fmt: skip
    plain = [json.loads(ln) for ln in _main(args, capsys).splitlines()]
    recs = [json.loads(ln) for ln in _main(args + ["--top_logprobs", "3"], capsys).splitlines()]
    assert [{k: v for k, v in r.items() if k != "tokens"} for r in recs] == plain
    ids, stops = cli.encode_prompts(tok, TEXTS, True, SYSTEM)
    out = generate(CFG, merged, ids, max_new_tokens=8, rng=prompt_keys(jax.random.PRNGKey(seed),
                   [0, 1]), temperature=1.0, stop_tokens=stops, pad_id=max(tok.pad_id, 0),
                   num_samples=K, top_logprobs=3)  # fmt: skip
    toks, lps, top_ids, top_lps = (np.asarray(x) for x in (out.tokens, out.logprobs, out.top_ids,
                                                           out.top_logprobs))  # fmt: skip
    texts = token_texts(tok, CFG.vocab_size)[0]
    for r, rec in enumerate(recs):
        n, tokens = rec["n_tokens"], rec["tokens"]
        assert len(tokens) == n and [t["id"] for t in tokens] == toks[r, :n].tolist()
        assert rec["stopped"] == (tokens[-1]["id"] in (end, tok.eos_id))
        np.testing.assert_allclose([t["logprob"] for t in tokens], lps[r, :n], atol=1e-5)
        for j, t in enumerate(tokens):
            assert [e["id"] for e in t["top"]] == top_ids[r, j].tolist()
            got = [e["logprob"] for e in t["top"]]
            np.testing.assert_allclose(got, top_lps[r, j], atol=1e-5)
            assert got == sorted(got, reverse=True)
            assert all(e["token"] == texts[e["id"]] for e in [t, *t["top"]])
            listed = [e["logprob"] for e in t["top"] if e["id"] == t["id"]]
            assert listed in ([], [pytest.approx(t["logprob"], abs=1e-6)])
    assert {r["stopped"] for r in recs} == {True, False}  # the stop token is listed too


def test_stop_strings_end_and_cut_the_completions(run, capsys):
    """--stop (typed with a shell escape): each completion is the free one cut before the
    string's first occurrence (and counted as stopped, with no more tokens than the free one);
    completions without it are unchanged."""
    run_dir, _, _ = run
    args = [run_dir, "--prompt", TEXTS[0], "--prompt", TEXTS[1], "--num_samples", "3",
            "--temperature", "1", "--seed", "2", "--max_new_tokens", "12", "--json"]  # fmt: skip
    free = [json.loads(ln) for ln in _main(args, capsys).splitlines()]
    stop = next(r["completion"] for r in free if len(r["completion"]) > 6)[3:5]
    typed = stop.replace("\\", "\\\\").replace("\n", "\\n")
    recs = [json.loads(ln) for ln in _main(args + ["--stop", typed], capsys).splitlines()]
    assert len(recs) == len(free) == 6
    cut = 0
    for f, r in zip(free, recs):
        if stop in f["completion"]:
            cut += 1
            assert r["completion"] == f["completion"][: f["completion"].index(stop)]
            assert r["stopped"] and r["n_tokens"] <= f["n_tokens"]
        else:
            assert r == f
    assert cut >= 1


def test_prompt_records_carry_their_meta(run, tmp_path, capsys):
    """A .jsonl --prompts_file of RL prompt records: each --json line carries its record's
    meta unchanged (none for a record without one, or a null one); each record samples as the
    same line of a text file does (the same ids, the same key), a record's messages being its
    prompt (their trailing assistant turn, a reference answer, dropped)."""
    run_dir, tok, _ = run
    meta = {"answer": "Brel", "task": "mine", "ok": [1, 2.5, None, {"é": True}]}
    conv = [{"role": "user", "content": TEXTS[1]}, {"role": "assistant", "content": "42"}]
    recs = [{"prompt": TEXTS[0], "meta": meta}, {"prompt": TEXTS[1], "meta": None},
            {"messages": conv, "meta": {"answer": 42}}]  # fmt: skip
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs) + "\n")
    (tmp_path / "p.txt").write_text("\n".join([*TEXTS, TEXTS[1]]) + "\n")
    flags = ["--chat", "--json", "--num_samples", "2", "--temperature", "1",
             "--max_new_tokens", "6"]  # fmt: skip
    read = lambda path: [json.loads(ln) for ln in _main(  # noqa: E731
        [run_dir, "--prompts_file", str(path), *flags], capsys).splitlines()]  # fmt: skip
    got, text = read(jsonl), read(tmp_path / "p.txt")
    metas = [meta, None, {"answer": 42}]
    assert [r.get("meta", "absent") for r in got] == [meta, meta, *["absent"] * 2, *metas[2:] * 2]
    assert got[4]["prompt"] == got[5]["prompt"] == conv[:1]
    plain = [{**r, "prompt": text[i]["prompt"]} for i, r in enumerate(got)]
    assert [{k: v for k, v in r.items() if k != "meta"} for r in plain] == text
    assert len({r["completion"] for r in got}) > 2  # (the samples differ)
    # the lines are best_of_n's input: judged by their meta; the line without one is named
    from flaxlm.evaluation import best_of_n as bon

    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in got))
    with pytest.raises(ValueError, match=rf'{samples}:3: reward exact_match .* no "meta"'):
        bon.best_of_n("exact_match", [str(samples)])
    samples.write_text("".join(json.dumps(r) + "\n" for r in got[:2] + got[4:]))
    sel = bon.best_of_n("exact_match", [str(samples)])
    assert (sel.summary["prompts"], sel.summary["samples"]) == (2, 4)
    # --system goes first, before a record's messages as before a text prompt
    system = {"role": "system", "content": SYSTEM}
    assert cli.json_prompt(conv[:1], True, SYSTEM) == [system, conv[0]]
    assert cli.encode_prompts(tok, [conv[:1]], True, SYSTEM) == cli.encode_prompts(
        tok, [TEXTS[1]], True, SYSTEM)  # fmt: skip


def test_plain_prompts_bos_and_stop_tokens(run):
    _, tok, _ = run
    ids, stops = cli.encode_prompts(tok, TEXTS, chat=False)
    assert ids == [[tok.bos_id, *tok.encode(t)] for t in TEXTS] and stops == (tok.eos_id,)
    ids, _ = cli.encode_prompts(tok, TEXTS, chat=False, bos=False)
    assert ids == [tok.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def bad_dirs(run, tmp_path_factory, chat_tokenizer, byte_chat_tokenizer):
    """{name: directory}: a run whose tokenizer is gone, a reward-model run, an HF directory
    (the run's merged weights and tokenizer), one with another tokenizer (byte-level)."""
    from flaxlm.models import hf

    _, _, merged = run
    root = tmp_path_factory.mktemp("bad")
    _save(root / "lost", merged, {"tokenizer": str(root / "gone.model")})
    _save(root / "rm", {"x": np.zeros(2, np.float32)},
          {"head": "scalar", "tokenizer": chat_tokenizer[0]})  # fmt: skip
    hf.save_pretrained(CFG, merged, str(root / "hf"), tokenizer=chat_tokenizer[0])
    hf.save_pretrained(CFG, merged, str(root / "bytes"))
    byte_chat_tokenizer(str(root / "bytes"), "{{ messages[0]['content'] }}")
    byte_chat_tokenizer(str(root / "strict"), STRICT)  # a tokenizer only: --tokenizer
    names = ("lost", "rm", "hf", "bytes")
    return {"run": run[0], **{k: str(root / k) for k in names}, "root": str(root)}


def test_speculative_draft_keeps_the_greedy_completions(bad_dirs, capsys):
    """--draft (here the run's own weights, exported to HF): the same greedy records as
    without it, every draft token accepted (printed on stderr); so with --draft ngram."""
    args = [bad_dirs["run"], "--prompt", TEXTS[0], "--prompt", TEXTS[1], "--temperature", "0",
            "--max_new_tokens", "9", "--json"]  # fmt: skip
    plain = _main(args, capsys)
    assert min(json.loads(r)["n_tokens"] for r in plain.splitlines()) == 9  # none stops early
    cli.main(args + ["--draft", bad_dirs["hf"], "--draft_tokens", "3"])
    out, err = capsys.readouterr()
    assert out == plain
    assert "3 draft tokens per forward, acceptance 1.000, 4.00 tokens per target forward" in err
    cli.main(args + ["--draft", "ngram", "--ngram", "2"])  # prompt lookup: no draft model
    assert capsys.readouterr().out == plain


HI = ["--prompt", "hi", "--max_new_tokens", "2"]
# a chat template refusing system turns (Gemma's, Mistral's) and using an undefined value
STRICT = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
          "supported') }}{% endif %}{{ messages[0]['content'] }}{{ missing.key }}")  # fmt: skip
BAD = {
    # flags: argparse usage errors (exit 2), before anything is loaded
    "dtype": ("run", [*HI, "--dtype", "int8"], 2, "--dtype: invalid choice: 'int8'"),
    "prompts_file": ("run", ["--prompts_file", "{root}/prompts.txt"], 2,
                     "--prompts_file {root}/prompts.txt: cannot read it"),
    # paths: a one-line SystemExit naming what is wrong
    "tokenizer": ("run", [*HI, "--tokenizer", "no_such.model"],
                  "tokenizer no_such.model (from --tokenizer) does not exist", None),
    "meta_tokenizer": ("lost", HI, "tokenizer {root}/gone.model (from the checkpoint meta of "
                       "{lost}) does not exist", None),
    "step": ("run", [*HI, "--step", "7"], None, "checkpoints/7: FileNotFoundError"),
    "reward_run": ("rm", HI, None, "a reward-model run (scalar head), not a language model"),
    # a mesh the weights do not split over (2 kv heads, tensor=4): it was blamed on the
    # checkpoint ("cannot read the params ... read one with --step N or move it aside")
    "mesh": ("run", [*HI, "--mesh", "tensor=4", "--sharding", "fsdp_tp"], None,
             "{run}: parameter ['layers_0']['attn']['k']['kernel'] (64, 2, 16): its dim 1 "
             "('kv_heads', size 2) does not split over mesh axes tensor=4 = 4; read it under "
             "another mesh or sharding (python -m flaxlm.generate: --mesh, --sharding)"),
    "hf_step": ("hf", [*HI, "--step", "3"], None, "--step is for flaxlm runs"),
    # the index among all prompts (generate would name the row within its batch)
    "draft_tokenizer": ("run", [*HI, "--draft", "{bytes}"],
                        "--draft {bytes}: its tokenizer (259 pieces) is not {run}'s (374 "
                        "pieces): the draft must share MODEL's tokenizer", None),
    "draft_tokens": ("run", [*HI, "--draft", "ngram", "--draft_tokens", "0"], 2,
                     "--draft_tokens must be >= 1"),
    # flags that would be ignored (they were, silently): a draft's without --draft, the plain
    # decoder's kernels with it
    "draft_tokens_alone": ("run", [*HI, "--draft_tokens", "3"], 2, "--draft_tokens needs --draft"),
    "ngram_alone": ("run", [*HI, "--ngram", "2"], 2, "--ngram needs --draft ngram"),
    "draft_attention": ("run", [*HI, "--draft", "ngram", "--decode_attention", "pallas"], 2,
                        "--decode_attention/--decode_gemm/--decode_mlp/--decode_norm do not "
                        "apply with --draft"),
    "draft_gemm": ("run", [*HI, "--draft", "ngram", "--decode_gemm", "cublas"], 2,
                   "do not apply with --draft"),
    # a kernel the weights cannot take: one line once they are loaded (it was a traceback)
    "mlp_t_int8": ("run", [*HI, "--decode_mlp", "pallas_t", "--quantize", "int8"], None,
                   "{run}: generate: decode_mlp='pallas_t' streams a dense model's float gate|up "
                   "(not with quantize or experts): use 'pallas'"),
    "ngram": ("run", [*HI, "--draft", "ngram", "--ngram", "0"], 2, "--ngram must be >= 1"),
    # --top_logprobs: JSON only, not speculative, at most the model's vocabulary
    "top_logprobs_text": ("run", [*HI, "--top_logprobs", "2"], 2, "--top_logprobs needs --json"),
    "top_logprobs_negative": ("run", [*HI, "--json", "--top_logprobs", "-1"], 2,
                              "--top_logprobs must be >= 0"),
    "top_logprobs_draft": ("run", [*HI, "--json", "--top_logprobs", "2", "--draft", "ngram"], 2,
                           "--top_logprobs does not apply with --draft"),
    "top_logprobs_vocab": ("run", [*HI, "--json", "--top_logprobs", "513"], None,
                           "--top_logprobs: {run}: generate: top_logprobs must be an int in "
                           "[0, vocab_size=512]"),
    "empty_prompt": ("run", ["--prompt", "hi", "--prompt", "", "--no_bos", "--batch", "1"],
                     "prompt 1 ('') encodes to no tokens (--no_bos)", None),
    # the chat template's own errors (they were tracebacks): one line naming the tokenizer
    "chat_raise": ("bytes", [*HI, "--chat", "--system", "be brief", "--tokenizer", "{root}/strict"],
                   None, "--chat: {root}/strict/tokenizer.json: chat template: System role not "
                   "supported"),
    "chat_undefined": ("bytes", [*HI, "--chat", "--tokenizer", "{root}/strict"], None,
                       "--chat: {root}/strict/tokenizer.json: chat template: UndefinedError: "
                       "'missing' is undefined"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_flags_and_paths_are_clear_errors(case, bad_dirs, capsys):
    model, args, code, message = BAD[case]
    fill = lambda x: x.format(**bad_dirs) if isinstance(x, str) else x  # noqa: E731
    with pytest.raises(SystemExit) as e:
        cli.main([bad_dirs[model], *map(fill, args)])
    if code == 2:
        assert e.value.code == 2 and fill(message) in capsys.readouterr().err
    elif code is not None:
        assert e.value.code == fill(code)
    else:
        assert isinstance(e.value.code, str) and fill(message) in e.value.code
