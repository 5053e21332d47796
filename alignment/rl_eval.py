"""Held-out evaluation of the alignment tasks: greedy (and optionally sampled) answers to
held-out prompts, scored by the built-in world's judge and by a reward model when one is given,
and — the RL prompt sets — by the run's own reward functions (`reward_metrics`: a verifier's
held-out accuracy on math or code prompts, whose worked answers never match meta.answer exactly).

The RL tasks hold out whole questions of their own prompt set (`rollout.heldout_prompts`,
`split_prompts`: every paraphrase of a held-out question stays out of training), and any
evaluation example asking a training question is removed (counted), so the metric is never
measured on trained questions (`heldout_sets`). `make_policy_eval` builds the eval_fn the loop
calls; `policy_eval_and_report` puts it together for an RL run.
"""

from __future__ import annotations

import inspect
import json

import jax
import numpy as np

from flaxlm.alignment import common
from flaxlm.alignment.rl_common import (
    decode_responses,
    load_prompts,
    reward_scorer,
    rollout_rows,
    stop_string_tuple,
)
from flaxlm.alignment.rl_rollout import call_reward_fns
from flaxlm.data import formats as F
from flaxlm.data.chat_batches import order_seed
from flaxlm.data.chat_examples import prompt_turns
from flaxlm.data.formats import split_reasoning
from flaxlm.data.source_errors import DataError
from flaxlm.data.synthetic_judge import is_world_meta
from flaxlm.evaluation.generate_tasks import pass_at_k_estimate, votes_majority_at_k
from flaxlm.models.decode import generate, prompt_keys
from flaxlm.models.sharding import fetch, global_batch, use_mesh


def question_key(prompt: dict) -> str:
    """Prompts with equal built-in-world `meta` ask the same question (the world's meta names
    the task, the entity or word and the answer: paraphrases share it); any other prompt is the
    question of its ids — your own meta may hold just the reference answer, which different
    questions share ("2 plus 5" and "3 plus 4")."""
    meta = prompt.get("meta") or {}
    if is_world_meta(meta):  # (a task name alone is no mark: your own records may use one)
        return json.dumps(meta, sort_keys=True)
    return " ".join(map(str, prompt["ids"].tolist()))


def gen_report_section(report: F.DataReport) -> dict:
    """`{"eval_gen": ...}` for a stage's data report when its generation sets read records
    (their drops and prompt cuts), else `{}`. A section of its own: a file that is both
    `data.eval` and a set is read by both readers, and one section would count it twice."""
    return {"eval_gen": report.to_dict()} if report.read else {}


def split_prompts(prompts: list[dict], n_heldout: int, seed: int):
    """(train, held-out) prompts: whole questions (`question_key`), drawn with a fixed seed,
    are held out until at least `n_heldout` prompts are, so no paraphrase of a held-out question
    is ever trained on."""
    if n_heldout <= 0:
        return prompts, []
    if n_heldout >= len(prompts):
        raise DataError(f"rollout.heldout_prompts={n_heldout} >= {len(prompts)} prompts")
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(question_key(p), []).append(i)
    keys = sorted(groups)
    held: set[int] = set()
    for k in np.random.default_rng([order_seed(seed), 7]).permutation(len(keys)):
        if len(held) >= n_heldout:
            break
        held.update(groups[keys[k]])
    train = [p for i, p in enumerate(prompts) if i not in held]
    return train, [prompts[i] for i in sorted(held)]


def training_prompts(config, template):
    """(train prompts, held-out prompts, data report) of an RL run: `data.train` loaded and
    checked, and `rollout.heldout_prompts` whole questions set aside (`split_prompts`)."""
    report = F.DataReport(strict=config.data.strict)
    prompts = load_prompts(config.data.train, config, template, report)
    if not prompts:  # (the drops, with file:line: the report is written only later)
        raise common.no_usable(config, "prompts", report)
    usable = len(prompts)
    prompts, held = split_prompts(prompts, config.rollout.heldout_prompts, config.seed)
    if not prompts:
        raise DataError(
            f"data.train={config.data.train!r}: its {usable} usable prompts all ask what the "
            f"rollout.heldout_prompts={config.rollout.heldout_prompts} held-out ones ask (whole "
            "questions are held out): lower it or add other questions"
        )
    return prompts, held, report


def policy_eval_and_report(config, cfg, template, prompts, held, report, mesh, rules, workdir,
                           rm=None, reasoning_end="", rewards=None,
                           empty_reward: float = -1.0):  # fmt: skip
    """(eval_fn(policy params) or None, data report) of an RL run: the `eval_gen` sets plus the
    held-out RL prompts and as many training prompts (a fixed sample, for comparison); the
    report (prompts kept/dropped, eval sets) is also written to the workdir. `reasoning_end`:
    the run's end-of-thinking marker (`grpo.reasoning_end`), so answers are judged after it as
    the rollouts judge them (`make_policy_eval`). `rewards`: the run's reward functions
    [(name, fn, weight)] (GRPO's, online DPO's), which also judge the two RL prompt sets'
    answers, and those of every eval_gen set whose records carry what they judge by
    (`reward_judged_sets`; `make_policy_eval`'s reward metrics; an empty answer scores
    `empty_reward`, the run's rollout.empty_reward)."""
    eval_report = F.DataReport(strict=config.data.strict)
    eval_fn = None
    if config.eval_every and (config.eval_gen.sets or held):
        extra = {"rl_heldout": held, "rl_train": prompts[: len(held)]} if held else None
        sets = heldout_sets(config, template, prompts, eval_report, extra)
        eval_fn = make_policy_eval(cfg, template, sets, config.eval_gen, mesh, rules, rm=rm,
                                   stop_strings=config.rollout.get("stop_strings", ()),
                                   reasoning_end=reasoning_end, rewards=rewards,
                                   reward_sets=reward_judged_sets(rewards, sets, extra),
                                   empty_reward=empty_reward)  # fmt: skip
    data_report = {
        "prompts": {**report.to_dict(), "train_prompts": len(prompts), "heldout": len(held)},
        "eval": eval_report.to_dict(),
    }
    common.write_report(workdir, data_report)
    return eval_fn, data_report


def reward_judged_sets(rewards, sets: dict, rl_sets=None) -> tuple[str, ...]:
    """The eval sets the run's reward functions also judge: the RL prompt sets (`rl_sets`,
    drawn from the prompts the rewards were checked against) and every eval_gen set whose
    examples all carry what each function judges by (`grpo_rewards.missing_references`: a
    prompt file of math problems with meta.answer, under math_verify). A set that does not is
    named in the log, with the reward and an example that lacks its reference."""
    from flaxlm.alignment.grpo_rewards import missing_references

    judges = [(name, fn) for name, fn, _ in (rewards or ()) if fn is not None]
    if not judges:
        return ()
    out = []
    for set_name, examples in sets.items():
        lacking = [(name, missing_references(fn, examples)) for name, fn in judges]
        lacking = [(name, locs) for name, locs in lacking if locs]
        if set_name in (rl_sets or ()) or not lacking:
            out.append(set_name)
        else:
            name, locs = lacking[0]
            common.log.info("eval %s: not judged by the rewards (%d examples, e.g. %s, lack "
                            "the reference %s judges by)", set_name, len(locs), locs[0],
                            name)  # fmt: skip
    return tuple(out)


def heldout_sets(config, template, train_prompts, report: F.DataReport, extra=None) -> dict:
    """{set name: examples {"ids", "meta", "answer", "loc"}}, the first `eval_gen.examples` of
    each of `extra` ({name: prompts}, e.g. the held-out RL prompts) and the first
    `eval_gen.examples` usable records of every source in `eval_gen.sets` (named by
    `common.eval_set_names`): conversations — `messages`, or `prompt` + `completion` — whose
    last assistant turn is the reference answer, or prompt records, whose meta["answer"] is.
    Every stage's generation eval reads its sets here (SFT and distillation too). Bad records
    are counted in `report` by reason with file:line; so are examples asking a training
    question (`question_key`; "eval_dropped_trained_question"), and prompts cut from the left
    to `eval_gen.max_prompt_len` (`truncated`). A set left with no example is
    an error naming it (its metrics would be NaN or missing)."""
    gen, fields = config.eval_gen, config.data.fields
    if gen.sets.strip() and gen.max_prompt_len < 1:  # (it follows seq_len in most configs)
        raise ValueError(
            f"eval_gen.max_prompt_len={gen.max_prompt_len}: a prompt needs >= 1 token (SFT, DPO, "
            "KTO and distillation default it to seq_len − eval_gen.max_new_tokens: raise "
            "seq_len, lower eval_gen.max_new_tokens or set eval_gen.max_prompt_len)"
        )
    seen = {question_key(p) for p in train_prompts}
    out = {name: [{"ids": p["ids"], "meta": p["meta"], "answer": str(p["meta"].get("answer", "")),
                   "loc": p.get("loc", ""), "messages": p.get("messages")}
                  for p in prompts[: gen.examples]]
           for name, prompts in (extra or {}).items()}  # fmt: skip
    parts = [p for p in (q.strip() for q in gen.sets.split(",")) if p]
    taken = {name: f"the {name} prompts of rollout.heldout_prompts" for name in out}
    for name, part in zip(common.eval_set_names(parts, taken), parts):
        kept, dropped = [], {}  # (dropped: reason -> [count, first file:line])
        for obj, loc in common.records(part, config.data, report):
            if len(kept) == gen.examples:
                break
            bad = None
            try:
                if not isinstance(obj, dict):
                    raise F.FormatError("bad_record", "record is not a JSON object")
                meta = F.record_meta(obj, fields)
                if F.has(obj, fields.messages) or F.has(obj, fields.completion):  # a chat
                    msgs = F.sft_messages(obj, fields)
                    last = msgs[-1]
                    answer = (last["content"] or "") if last["role"] == "assistant" else ""
                else:
                    msgs = F.prompt_messages(obj.get(fields.prompt), fields)
                    answer = str(meta.get("answer", ""))
                with F.naming_record(loc):
                    ids, cut = F.render_prompt(msgs, template, gen.max_prompt_len,
                                               tools=F.record_tools(obj, fields))  # fmt: skip
            except F.FormatError as e:
                bad = (e.reason, str(e))
            except (TypeError, KeyError) as e:
                bad = ("bad_record", f"{type(e).__name__}: {e}")
            else:
                ex = {"ids": np.asarray(ids, np.int32), "meta": meta, "answer": answer,
                      "loc": loc, "messages": prompt_turns(msgs)}  # fmt: skip
                if question_key(ex) in seen:
                    bad = ("eval_dropped_trained_question", "asked in training")
            if bad:
                report.bad(bad[0], loc, bad[1])
                dropped.setdefault(bad[0], [0, f"{loc}: {bad[1]}"])[0] += 1
                continue
            kept.append(ex)
            report.used += 1
            if cut:  # cut from the left to eval_gen.max_prompt_len: counted, as RL prompts are
                report.truncation(loc, cut)
        if not kept:
            what = ", ".join(f"{n} {r} (e.g. {e})" for r, (n, e) in dropped.items())
            raise ValueError(f"eval_gen.sets: {part} has no usable example (dropped: "
                             f"{what or 'none, it holds no records'}); fix it or leave it out "
                             "of eval_gen.sets")  # fmt: skip
        no_ref = sum(not ex["answer"].strip() for ex in kept)
        if no_ref:
            common.log.warning(
                "eval_gen.sets %s: %d of %d examples have no reference answer (no completion "
                "or meta.answer): their accuracy is 0", part, no_ref, len(kept),
            )  # fmt: skip
        out[name] = kept
    return out


def sets_eval(config, template, cfg, mesh, rules, report: F.DataReport):
    """The generation eval of `eval_gen.sets` for an offline stage (DPO, KTO), or None
    without sets; their drops and cuts counted in `report`."""
    if not config.eval_gen.sets:
        return None
    sets = heldout_sets(config, template, [], report)
    return make_policy_eval(cfg, template, sets, config.eval_gen, mesh, rules)


def _vote_fn(vote):
    """`vote` as a function of (meta, answer): a reward's vote may take the answer alone."""
    try:
        params = inspect.signature(vote).parameters.values()
    except (TypeError, ValueError):  # (a builtin without a signature: called as given)
        return vote
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                and p.default is p.empty]  # fmt: skip
    if len(required) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params):
        return vote
    return lambda meta, answer: vote(answer)


def reward_metrics(rewards, examples, texts, reasoning_end="", empty_reward=-1.0,
                   samples: int = 1, prefix: str = "", ks=()) -> dict:  # fmt: skip
    """The reward functions' verdicts on `texts`, `samples` consecutive ones per example (the
    examples' meta, and their prompt turns for a function that takes `prompt`), judged as the
    rollouts judge theirs (alignment/grpo.py `_judged`): each function once per answer — the
    text after `reasoning_end` when one is given — through `call_reward_fns` (several at once
    for code rewards, shared out over processes). An answer that is empty or a reasoning that
    never ended is not judged: each function's value 0, the sum `empty_reward`. A function that
    raises or gives no finite number leaves its answer out of that function's mean and of the
    sum's, counted in "reward_invalid". {prefix + "reward": mean Σ weight·fn, prefix +
    "reward/<name>": each function's mean, [prefix + "reward_invalid"], and with samples > 1
    prefix + "pass@k/<name>" for a function whose values were all 0 or 1: the share of
    examples with a sample that scored 1, and for such a function that names the answer a
    sample gives (`fn.vote(meta, answer)` or `fn.vote(answer)`, None for no answer, and
    `fn.same_answer(u, v)`: math_verify's and exact_match's) prefix + "maj@k/<name>", the share
    whose majority answer (`verify_math.majority_sample`) is right}. `ks`: smaller k to report
    too (`eval_gen.at_k`), each from all `samples` samples of an example: pass@j by Chen et al.'s
    unbiased estimator and maj@j as the expected majority of a uniformly drawn j-subset
    (evaluation/generate_tasks.py `pass_at_k_estimate`, `votes_majority_at_k`, as the
    evaluation CLI's --pass_at_k / --maj_at_k; "maj@j_estimated/<name>": the share of examples
    whose answers form no classes, their maj@j estimated from drawn subsets)."""
    if not rewards:
        return {}
    n = len(texts)
    owner = [examples[j // samples] for j in range(n)]
    answers, reasonings = list(texts), None
    no_answer = np.asarray([not t.strip() for t in texts], bool)
    if reasoning_end:
        split = [split_reasoning(t, reasoning_end) for t in texts]
        reasonings, answers = [r for r, _, _ in split], [a for _, a, _ in split]
        no_answer = np.asarray([unf or not a.strip() for _, a, unf in split], bool)
    judged = np.flatnonzero(~no_answer)
    pick = lambda xs: None if xs is None else [xs[j] for j in judged]  # noqa: E731
    messages = [ex.get("messages") for ex in owner]
    prompts = None if any(m is None for m in messages) else messages
    total, valid, out = np.zeros(n), np.ones(n, bool), {}
    for name, fn, w in rewards:
        got, ok, _ = call_reward_fns([fn], [1.0], pick([ex["meta"] for ex in owner]),
                                     pick(answers), pick(prompts), pick(reasonings))  # fmt: skip
        vals, fine = np.zeros(n), np.ones(n, bool)
        vals[judged], fine[judged] = got, ok
        out[f"{prefix}reward/{name}"] = vals[fine].mean() if fine.any() else float("nan")
        if samples > 1 and fine.all() and np.isin(vals, (0.0, 1.0)).all():
            hits, at = vals.reshape(-1, samples), sorted({*ks, samples})
            for j in at:  # (j = samples: 1 when any sample hits)
                out[f"{prefix}pass@{j}/{name}"] = np.mean(
                    [pass_at_k_estimate(samples, c, j) for c in hits.sum(1)])  # fmt: skip
            if hasattr(fn, "vote"):  # an answer to vote on: self-consistency
                vote = _vote_fn(fn.vote)
                votes = [None if no_answer[j] else vote(owner[j]["meta"], answers[j])
                         for j in range(n)]  # fmt: skip
                maj = [votes_majority_at_k(fn.same_answer, votes[e * samples : (e + 1) * samples],
                                           hits[e], at, seed=e)
                       for e in range(len(hits))]  # fmt: skip
                for j in at:
                    out[f"{prefix}maj@{j}/{name}"] = np.mean([m[j][0] for m in maj])
                    if estimated := np.mean([m[j][1] for m in maj]):
                        out[f"{prefix}maj@{j}_estimated/{name}"] = estimated
        total, valid = total + w * vals, valid & fine
    total = np.where(no_answer, empty_reward, total)
    out[f"{prefix}reward"] = total[valid].mean() if valid.any() else float("nan")
    if not valid.all():
        out[f"{prefix}reward_invalid"] = 1.0 - valid.mean()
    return out


def smaller_ks(text, samples: int) -> tuple[int, ...]:
    """`eval_gen.at_k` ("1,4": the k < eval_gen.samples to report pass@k and maj@k at, besides
    k = samples) as sorted ints; a ValueError naming the key for a value that is not an int
    in [1, samples], or any value when no samples are drawn (`samples` 0)."""
    parts = [p.strip() for p in str(text or "").split(",") if p.strip()]
    if parts and samples < 2:
        raise ValueError(f"eval_gen.at_k={text!r} needs eval_gen.samples > 1 and "
                         "eval_gen.sample_temperature > 0")  # fmt: skip
    try:
        ks = sorted({int(p) for p in parts})
    except ValueError:
        raise ValueError(f"eval_gen.at_k={text!r}: want comma-separated ints, e.g. '1,4'") from None
    if any(not 1 <= k <= samples for k in ks):
        raise ValueError(f"eval_gen.at_k={text!r}: each k must be in [1, eval_gen.samples="
                         f"{samples}]")  # fmt: skip
    return tuple(ks)


def make_policy_eval(cfg, template, sets: dict, gen_cfg, mesh, rules, rm=None, stop_strings=(),
                     reasoning_end="", rewards=None, reward_sets=(),
                     empty_reward=-1.0):  # fmt: skip
    """policy params -> {"<set>/accuracy", "/judge", "/stopped", "/response_len"
    [, "/rm_score"]} from greedy answers (one decoder call per `gen_cfg.batch` prompts), and
    with `gen_cfg.sample_temperature` > 0 also "<set>/sampled_accuracy": `gen_cfg.samples`
    samples per prompt at that temperature (sample k of example j from fold_in(fold_in(
    PRNGKey(1), j), k), whatever `gen_cfg.batch`; what on-policy RL optimises), each prompt
    prefilled once for its samples (`generate(..., num_samples=)`, `gen_cfg.batch` //
    samples prompts per call). `stop_strings` (the rollouts' `rollout.stop_strings`) end
    answers as they end rollouts. `reasoning_end` (a reasoning model's end-of-thinking marker,
    `grpo.reasoning_end`): the answer after it is judged, as the rollouts' rewards judge it; a
    reasoning that never ended is no answer (accuracy and judge 0), and
    "<set>/reasoning_unfinished" (greedy) and "/sampled_reasoning_unfinished" count how often.
    (Judged whole, "<think>…</think>42" was wrong here and right in rollout/accuracy.)

    `rewards` ([(name, fn, weight)], the run's; the reward model's entry, fn None, is left out)
    judge the answers to the sets named in `reward_sets` (`reward_judged_sets`: the RL prompt
    sets, and eval sets whose records carry the meta the functions read) as the rollouts judge
    theirs (`reward_metrics`):
    "<set>/reward" (Σ weight·fn) and "<set>/reward/<name>" of the greedy answers, and with
    samples "/sampled_reward", "/sampled_reward/<name>" and, for a function whose values were
    all 0 or 1 (a verifier: math_verify, exact_match, code_tests), "/sampled_pass@k/<name>"
    (and math_verify's "/sampled_maj@k/<name>": the majority answer of the k samples), and
    the same at each smaller k of `gen_cfg.at_k` ("1,4"; `reward_metrics`' `ks`).
    Accuracy is exact match with the reference, which a worked solution never is: on math or
    code prompts the verifier's "reward/<name>" is the held-out accuracy to watch."""
    from flaxlm.alignment import sft
    from flaxlm.models.stop_strings import StopStrings

    strings = stop_string_tuple(stop_strings)
    tables = StopStrings.build(template.tok, strings, cfg.vocab_size) if strings else None

    score = reward_scorer(rm[1]) if rm is not None else None
    # The reward model's rows hold the longest prompt of the sets and a whole answer: one
    # width (one compile). Not eval_gen.max_prompt_len: the held-out RL prompts are cut to
    # rollout.max_prompt_len when loaded, which may be longer.
    longest = max((len(ex["ids"]) for exs in sets.values() for ex in exs), default=0)
    width = longest + gen_cfg.max_new_tokens
    width_name = f"longest held-out prompt {longest} + eval_gen.max_new_tokens"
    pad_id = max(template.tok.pad_id, 0)
    temp = float(gen_cfg.get("sample_temperature", 0.0))
    n_samples = int(gen_cfg.get("samples", 1))
    at_k = smaller_ks(gen_cfg.get("at_k", ""), n_samples if temp > 0 else 0)
    judges = [(name, fn, w) for name, fn, w in (rewards or ()) if fn is not None]

    def judge(ex, text) -> tuple[float, float, bool]:
        """(correct, judge score, reasoning unfinished) of one response to example `ex`."""
        if not reasoning_end:
            return (*sft.score(ex["meta"], text, ex["answer"]), False)
        _, answer, unfinished = split_reasoning(text, reasoning_end)
        if unfinished:  # no answer: wrong, even if the reasoning spells the reference
            return 0.0, 0.0, True
        return (*sft.score(ex["meta"], answer, ex["answer"]), False)

    def run_set(policy, examples, judged_by_rewards: bool) -> dict:
        acc, jud, stopped, lens, scores, sampled = [], [], [], [], [], []
        unfinished, sampled_unfinished = [], []
        greedy_texts, sampled_texts = [], []  # (for the reward functions)
        bs = gen_cfg.batch
        for i in range(0, len(examples), bs):
            chunk = examples[i : i + bs]
            prompts = [ex["ids"] for ex in chunk]
            prompts += [prompts[-1]] * (bs - len(prompts))  # one shape: one compile
            out = jax.device_get(generate(
                cfg, policy, prompts, max_new_tokens=gen_cfg.max_new_tokens,
                rng=jax.random.PRNGKey(0), temperature=0.0, stop_tokens=template.stop_tokens,
                pad_id=pad_id, mesh=mesh, rules=rules, stop_strings=tables,
            ))  # fmt: skip
            texts, stop = decode_responses(template.tok, out.tokens, out.lengths,
                                           template.stop_tokens, strings)  # fmt: skip
            if score is not None:
                rows = rollout_rows(prompts, out.tokens, out.lengths, width, pad_id,
                                    width_name)  # fmt: skip
                with use_mesh(mesh, rules):
                    s = fetch(score(rm[2], global_batch(rows, mesh)))
                scores += list(s[: len(chunk)])
            greedy_texts += texts[: len(chunk)]
            for ex, text in zip(chunk, texts):
                ok, j, unf = judge(ex, text)
                acc.append(ok)
                jud.append(j)
                unfinished.append(unf)
            stopped += list(stop[: len(chunk)])
            lens += list(out.lengths[: len(chunk)])
            per = max(1, bs // n_samples)  # prompts per sampling call: ~bs rows
            for s in range(0, len(chunk) if temp > 0 else 0, per):
                part = chunk[s : s + per]
                ids = [ex["ids"] for ex in part]
                ids += [ids[-1]] * (per - len(ids))  # one shape: one compile
                out = jax.device_get(generate(
                    cfg, policy, ids, max_new_tokens=gen_cfg.max_new_tokens,
                    rng=prompt_keys(jax.random.PRNGKey(1), range(i + s, i + s + per)),
                    temperature=temp, stop_tokens=template.stop_tokens, pad_id=pad_id,
                    mesh=mesh, rules=rules, stop_strings=tables, num_samples=n_samples,
                ))  # fmt: skip
                texts, _ = decode_responses(template.tok, out.tokens, out.lengths,
                                            template.stop_tokens)  # fmt: skip
                sampled_texts += texts[: len(part) * n_samples]
                judged = [judge(ex, texts[r * n_samples + g])
                          for r, ex in enumerate(part) for g in range(n_samples)]  # fmt: skip
                sampled += [ok for ok, _, _ in judged]
                sampled_unfinished += [unf for _, _, unf in judged]
        res = {"accuracy": np.mean(acc), "judge": np.mean(jud), "stopped": np.mean(stopped),
               "response_len": np.mean(lens)}  # fmt: skip
        if scores:
            res["rm_score"] = np.mean(scores)
        if sampled:
            res["sampled_accuracy"] = np.mean(sampled)
        if reasoning_end:
            res["reasoning_unfinished"] = np.mean(unfinished)
            if sampled:
                res["sampled_reasoning_unfinished"] = np.mean(sampled_unfinished)
        if judged_by_rewards:
            res.update(reward_metrics(judges, examples, greedy_texts, reasoning_end,
                                      empty_reward))  # fmt: skip
            if sampled_texts:
                res.update(reward_metrics(judges, examples, sampled_texts, reasoning_end,
                                          empty_reward, n_samples, "sampled_", at_k))  # fmt: skip
        return {k: float(v) for k, v in res.items()}

    def eval_fn(policy) -> dict:
        out = {}
        for name, examples in sets.items():
            if examples:
                got = run_set(policy, examples, bool(judges) and name in reward_sets)
                out.update({f"{name}/{k}": v for k, v in got.items()})
        return out

    return eval_fn
