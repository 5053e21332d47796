"""The demo's evaluation of every checkpoint and its report (report.md + PNG plots).

Every policy checkpoint (pretrain, SFT, DPO, PPO, GRPO) is evaluated the same way with the
evaluation harness on the world's held-out tasks (the two students of the distillation stages
on held-out text and multiple choice); responses to held-out instructions are also
scored by the demo's reward model and, for the chat models, sampled (temperature 1, SAMPLES per
prompt: what preference tuning changes shows in samples, while greedy answers take the SFT
model's mode); the post-SFT policies' KL to the SFT model is estimated on samples:
    KL(π ‖ π_SFT) ≈ mean over prompts of Σ_t [log π(y_t | ·) − log π_SFT(y_t | ·)],  y ~ π
(the k1 estimator per sequence, nats).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import numpy as np

POLICIES = ("pretrain", "sft", "dpo", "ppo", "grpo")
TASKS = ("ppl_heldout_text", "mc_facts_heldout", "gen_facts_heldout", "gen_instructions_heldout")
# The half-width students, pretrained alone and by distillation from "pretrain": base models,
# evaluated on held-out text and multiple choice (the teacher's column is "pretrain"'s).
STUDENTS = ("student", "distill")
STUDENT_TASKS = ("ppl_heldout_text", "mc_facts_heldout")
SAMPLED = "gen_instructions_sampled"  # gen_instructions_heldout at temperature 1
SAMPLES = 4


# ---------------------------------------------------------------------------------------------
# Evaluation


def sequence_kl(
    cfg,
    params,
    ref_params,
    prompts: list[list[int]],
    stop_tokens,
    pad_id,
    max_new_tokens: int = 24,
    seed: int = 0,
    batch: int = 64,
) -> float:
    """Mean per-sequence KL(π ‖ π_ref) in nats from one sample of π per prompt (k1).

    π's log-probs are the sampler's; π_ref scores every prompt + sample in right-padded batches
    of `batch` rows through one jitted forward per model config (causal attention: the padding
    after a sequence never reaches its tokens)."""
    from flaxlm.models.decode import generate

    out = generate(cfg, params, prompts, max_new_tokens=max_new_tokens,
                   rng=jax.random.PRNGKey(seed), temperature=1.0, stop_tokens=stop_tokens,
                   pad_id=pad_id)  # fmt: skip
    toks, logp, mask, lengths = jax.device_get(tuple(out))
    seqs = [list(p) + list(t[:n]) for p, t, n in zip(prompts, toks, lengths)]
    longest = max(len(s) for s in seqs) - 1
    width = max(longest, min(_pow2_at_least(longest), cfg.max_seq_len))  # shared by policies
    rows = min(batch, _pow2_at_least(len(seqs)))
    score = _ref_logprobs(cfg)
    kls = []
    for i in range(0, len(seqs), rows):
        tokens, targets = np.zeros((2, rows, width), np.int32)  # (B, T); padding: id 0
        for j, s in enumerate(seqs[i : i + rows]):
            tokens[j, : len(s) - 1], targets[j, : len(s) - 1] = s[:-1], s[1:]
        ref_BT = np.asarray(score(ref_params, tokens, targets))
        for j, k in enumerate(range(i, min(i + rows, len(seqs)))):
            start, n = len(prompts[k]) - 1, lengths[k]  # the sample's targets
            ref = ref_BT[j, start : start + n]
            kls.append(float(((logp[k][:n] - ref) * mask[k][:n]).sum()))
    return float(np.mean(kls))


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=4)
def _ref_logprobs(cfg):
    """log p(targets | tokens) (B, T) of a parameter pytree, jitted once per model config (the
    KL of every post-SFT policy reuses it)."""
    from flaxlm.models.transformer import forward
    from flaxlm.train.losses import token_logprobs

    return jax.jit(lambda p, tokens, targets: token_logprobs(forward(cfg, p, tokens), targets))


def evaluate_all(dirs: dict, limit: int) -> dict:
    """{policy: {metric: value}} for every policy (and student) run in `dirs` that has a
    checkpoint; a student's row also holds its parameter count ("params")."""
    from tqdm.auto import tqdm

    from flaxlm.alignment.common import load_policy
    from flaxlm.data.formats import ChatTemplate, render_chat
    from flaxlm.data.tokenizer import Tokenizer
    from flaxlm.evaluation.harness import Evaluator
    from flaxlm.evaluation.tasks import read_examples, world_tasks

    specs = world_tasks(dirs["world"])
    results, sft_params, rm, teacher = {}, None, None, None
    bar = tqdm(POLICIES + STUDENTS, desc="eval")
    for name in bar:
        bar.set_postfix_str(name)
        if not os.path.isdir(os.path.join(dirs[name], "checkpoints")):
            continue
        cfg, params, meta = load_policy(dirs[name])
        tok = Tokenizer.load(meta["tokenizer"])
        if rm is None and os.path.isdir(os.path.join(dirs["reward"], "checkpoints")):
            from flaxlm.evaluation.winrate import load_reward_scorer

            rm = load_reward_scorer(dirs["reward"], tok, batch_size=64)
        ev = Evaluator(cfg, params, tok, gen_batch_size=64)
        chat = name in POLICIES[1:]  # post-trained models answer in the chat template
        row = {"params": cfg.param_counts()["total"]}
        for task in STUDENT_TASKS if name in STUDENTS else TASKS:
            spec = specs[task]
            if spec.type == "generation" and chat:
                spec = dataclasses.replace(spec, chat=True, num_fewshot=0)
            r = ev.run(spec, limit=None if spec.type == "perplexity" else limit)
            for k, v in r["metrics"].items():
                row[f"{task}/{k}"] = v
            if task == "gen_instructions_heldout" and rm is not None:
                questions = [ex.fields["prompt"] for ex in read_examples(spec, limit=limit)]
                responses = [s["response"] for s in r["samples"]]
                row["rm_score"] = float(np.mean(rm(questions, responses)))
        if chat:
            spec = dataclasses.replace(specs["gen_instructions_heldout"], name=SAMPLED,
                                       chat=True, num_fewshot=0, temperature=1.0,
                                       num_samples=SAMPLES)  # fmt: skip
            r = ev.run(spec, limit=limit)
            row.update({f"{SAMPLED}/{k}": v for k, v in r["metrics"].items()})
        if name == "pretrain":
            teacher = (cfg, params)
        elif name in STUDENTS and teacher is not None:
            row.update(draft_acceptance(*teacher, cfg, params, tok, dirs["world"], limit))
        if name == "sft":
            sft_params = params
        elif chat and sft_params is not None:
            template = ChatTemplate(tok)
            spec = specs["gen_instructions_heldout"]
            prompts = [render_chat([{"role": "user", "content": ex.fields["prompt"]}], template,
                                   add_generation_prompt=True)[0]
                       for ex in read_examples(spec, limit=limit)]  # fmt: skip
            row["kl_to_sft"] = sequence_kl(cfg, params, sft_params, prompts,
                                           (template.end_id,), tok.pad_id)  # fmt: skip
        results[name] = row
    return results


DRAFT_TOKENS = 4  # k of the students' speculative-decoding check


def draft_acceptance(cfg, params, draft_cfg, draft_params, tok, world_dir: str, limit: int
                     ) -> dict:  # fmt: skip
    """How well a student serves as the teacher's speculative draft (models/speculative.py):
    greedy continuations of the first 16 tokens of `limit` held-out texts, 32 new tokens,
    DRAFT_TOKENS drafts per teacher forward. {"draft/alpha": the probability that a judged
    draft is kept,
    "draft/tokens_per_forward": generated tokens per teacher forward}."""
    import jax

    from flaxlm.models.speculative import speculative_generate

    texts = []
    with open(os.path.join(world_dir, "heldout_text.jsonl")) as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) == limit:
                break
    prompts = [tok.encode(t, bos=True)[:16] for t in texts]
    out = speculative_generate(cfg, params, draft_cfg, draft_params, prompts, max_new_tokens=32,
                               rng=jax.random.PRNGKey(0), temperature=0.0,
                               draft_tokens=DRAFT_TOKENS)  # fmt: skip
    return {"draft/alpha": out.alpha(),
            "draft/tokens_per_forward": out.tokens_per_iteration()}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Report


def _records(run_dir: str) -> list[dict]:
    from flaxlm.train.metrics import read_metrics

    path = os.path.join(run_dir, "metrics.jsonl")
    return read_metrics(path) if os.path.exists(path) else []


def _curve(recs, key):
    pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
    return list(zip(*pts)) if pts else ([], [])


def _moving_average(values, window: int) -> np.ndarray:
    """Trailing mean over up to `window` points (GRPO rollouts hold few prompts: noisy)."""
    v = np.asarray(values, np.float64)
    c = np.concatenate([[0.0], np.cumsum(v)])
    lo = np.maximum(np.arange(1, len(v) + 1) - window, 0)
    return (c[1:] - c[lo]) / (np.arange(1, len(v) + 1) - lo)


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plots(workdir: str, dirs: dict, results: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    pt = _records(dirs["pretrain"])
    axes[0].plot(*_curve(pt, "loss"), label="train loss")
    axes[0].plot(*_curve(pt, "eval/nll"), "o-", label="held-out nll")
    for stage, label in (("student", "student alone"), ("distill", "student distilled")):
        if os.path.isdir(dirs[stage]):
            axes[0].plot(*_curve(_records(dirs[stage]), "eval/nll"), "o--",
                         label=f"{label}: held-out nll")  # fmt: skip
    axes[0].set_title("pretraining (and the half-width students)")
    for stage in ("sft", "reward", "dpo", "ppo", "grpo"):
        axes[1].plot(*_curve(_records(dirs[stage]), "loss"), label=stage)
    axes[1].set_title("post-training losses")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    paths.append(_save(fig, os.path.join(workdir, "losses.png")))

    ppo, grpo = _records(dirs["ppo"]), _records(dirs["grpo"])
    fig, ax = plt.subplots(1, 3, figsize=(15, 3.6))
    steps, score = _curve(ppo, "rollout/score_mean")
    _, penalty = _curve(ppo, "rollout/non_score_reward")  # −β·KL per response
    ax[0].plot(steps, score, label="reward-model score")
    if len(penalty) == len(score):
        ax[0].plot(steps, np.add(score, penalty), label="score − β·KL")
    ax[0].set_title("PPO rollouts")
    for key, color, label in (("rollout/accuracy", "C2", "exact match"),
                              ("rollout/reward_mean", "C4", "reward")):  # fmt: skip
        steps, vals = _curve(grpo, key)
        ax[1].plot(steps, vals, color=color, alpha=0.3)
        ax[1].plot(steps, _moving_average(vals, 6), color=color, label=f"{label} (mean of 6)")
    ax[1].set_title("GRPO rollouts (training prompts)")
    ax[2].plot(*_curve(ppo, "rollout/kl"), color="C3", label="PPO")
    ax[2].plot(*_curve(grpo, "rollout/kl"), color="C2", label="GRPO")
    ax[2].set_title("KL to the reference (nats / response)")
    for a in ax:
        a.set_xlabel("step")
        a.legend()
    paths.append(_save(fig, os.path.join(workdir, "rl.png")))

    panels = [
        ("greedy answers", [n for n in POLICIES if n in results], [
            ("mc_facts_heldout/acc", "MC facts (held-out people)"),
            ("gen_facts_heldout/correct", "facts from pretraining only"),
            ("gen_instructions_heldout/correct", "held-out instructions")]),
        (f"sampled answers to held-out instructions (T=1, {SAMPLES}/prompt)",
         [n for n in POLICIES if f"{SAMPLED}/judge" in results.get(n, {})], [
            (f"{SAMPLED}/judge", "judge score"),
            (f"{SAMPLED}/well_formed", "well-formed"),
            (f"{SAMPLED}/correct", "accuracy")]),
    ]  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(14, 3.8))
    for ax, (title, names, metrics) in zip(axes, panels):
        width = 0.8 / len(metrics)
        for i, (key, label) in enumerate(metrics):
            vals = [results[n].get(key, 0.0) for n in names]
            ax.bar(np.arange(len(names)) + i * width, vals, width, label=label)
        ax.set_xticks(np.arange(len(names)) + width, names)
        ax.set_ylim(0, 1.3)
        ax.set_title(title)
        ax.legend(fontsize=8, ncol=3, loc="upper center")
    axes[0].set_ylabel("rate / score")
    paths.append(_save(fig, os.path.join(workdir, "accuracy.png")))
    return paths


ROWS = [
    ("ppl_heldout_text/ppl", "held-out text perplexity", "{:.2f}"),
    ("mc_facts_heldout/acc", "multiple choice, held-out people's facts (chance 0.25)", "{:.3f}"),
    ("gen_facts_heldout/correct", "answers about people seen only in pretraining", "{:.3f}"),
    ("gen_instructions_heldout/correct", "held-out instructions: accuracy", "{:.3f}"),
    ("gen_instructions_heldout/judge", "held-out instructions: judge score", "{:.3f}"),
    ("rm_score", "held-out instructions: reward-model score", "{:.2f}"),
    (f"{SAMPLED}/judge", f"sampled (T=1, {SAMPLES}/prompt): judge score", "{:.3f}"),
    (f"{SAMPLED}/correct", "sampled: accuracy", "{:.3f}"),
    (f"{SAMPLED}/well_formed", 'sampled: well-formed ("The answer is X.")', "{:.3f}"),
    (f"{SAMPLED}/unsafe", "sampled: unsafe", "{:.3f}"),
    (f"{SAMPLED}/pass@{SAMPLES}", f"sampled: pass@{SAMPLES}", "{:.3f}"),
    ("kl_to_sft", "KL to the SFT model (nats / response)", "{:.3f}"),
]


def _deltas(results: dict) -> list[str]:
    """One line per preference-tuned policy: its change over SFT on the sampled metrics."""
    if "sft" not in results:
        return []
    keys = [("judge", "judge"), ("well_formed", "well-formed"), ("correct", "accuracy")]
    out = ["", "Change over SFT on sampled answers:", ""]
    for name in ("dpo", "ppo", "grpo"):
        if name not in results:
            continue
        key = lambda k: f"{SAMPLED}/{k}"  # noqa: E731
        parts = [f"{label} {results[name][key(k)] - results['sft'][key(k)]:+.3f}"
                 for k, label in keys if key(k) in results[name]]  # fmt: skip
        kl = results[name].get("kl_to_sft")
        out.append(f"- {name}: " + ", ".join(parts)
                   + (f" at KL {kl:.2f} nats/response" if kl is not None else ""))  # fmt: skip
    return out if len(out) > 3 else []


def _distillation(results: dict, dirs: dict) -> list[str]:
    """The distillation table: the teacher (the pretrained model), the half-width student
    pretrained alone and the one distilled from the teacher, same corpus, steps and lr."""
    cols = [("pretrain", "teacher (pretrain)"), ("student", "student alone"),
            ("distill", "student distilled")]  # fmt: skip
    cols = [(n, label) for n, label in cols if n in results]
    if len(cols) < 2:
        return []
    steps = [r["step"] for r in _records(dirs["distill"]) if "loss" in r]
    out = ["", f"Distillation (students of half the width, {steps[-1] if steps else '?'} steps "
                "on the pretraining corpus; the distilled one learns the teacher's next-token "
                "distributions, forward KL):", "",
           "| metric | " + " | ".join(label for _, label in cols) + " |",
           "|---|" + "---|" * len(cols)]  # fmt: skip
    rows = [("params", "parameters", "{:,}")] + ROWS[:2] + [
        ("draft/alpha", f"as the teacher's speculative draft (greedy, {DRAFT_TOKENS} per "
                        "teacher forward): drafts accepted", "{:.2f}"),
        ("draft/tokens_per_forward", "as the teacher's draft: tokens per teacher forward",
         "{:.2f}"),
    ]  # fmt: skip
    for key, label, fmt in rows:
        cells = [fmt.format(results[n][key]) if key in results[n] else "–" for n, _ in cols]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    kd = _last_eval(dirs["distill"])
    if "eval/agreement" in kd:
        out.append(f"\nThe distilled student's top-1 token agrees with the teacher's on "
                   f"{kd['eval/agreement']:.3f} of held-out positions (divergence "
                   f"{kd['eval/kd']:.3f} nats/token at the end).")  # fmt: skip
    return out


def _last_eval(run_dir: str) -> dict:
    evals = [r for r in _records(run_dir) if any(k.startswith("eval/") for k in r)]
    return {**evals[0], **evals[-1]} if evals else {}


def write_report(workdir: str, dirs: dict, commands: dict, times: dict, small: bool) -> str:
    with open(os.path.join(dirs["eval"], "results.json")) as f:
        results = json.load(f)
    names = [n for n in POLICIES if n in results]
    lines = ["# flaxlm demo report", ""]
    if small:
        lines += ["**runlocal** run (shrunk sizes for tests): numbers are not meaningful.", ""]
    lines += ["Every column is a checkpoint of this run, evaluated the same way on held-out data",
              "(greedy answers scored by the world's judge unless marked sampled; the pretrained",
              "model is prompted with 3 worked examples, the others with the chat template).",
              "Perplexity is on raw held-out text, so it also shows what chat tuning forgets.",
              "",
              "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]  # fmt: skip
    for key, label, fmt in ROWS:
        cells = [fmt.format(results[n][key]) if key in results[n] else "–" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += _deltas(results)
    lines += _distillation(results, dirs)
    rm = _last_eval(dirs["reward"])
    dpo = _last_eval(dirs["dpo"])
    ppo = _records(dirs["ppo"])
    kl = [r["rollout/kl"] for r in ppo if "rollout/kl" in r]
    score = [r["rollout/score_mean"] for r in ppo if "rollout/score_mean" in r]
    lines += ["", "Stage-specific:", ""]
    pt = [r for r in _records(dirs["pretrain"]) if "eval/nll" in r]
    if pt:
        ppl = [float(np.exp(r["eval/nll"])) for r in pt]
        lines.append(f"- pretraining: held-out perplexity {ppl[0]:.1f} (step {pt[0]['step']}) → "
                     f"{ppl[-1]:.2f} (step {pt[-1]['step']}), by the training loop's "
                     "evaluation on held-out text")  # fmt: skip
    if rm:
        lines.append(f"- reward model: held-out pairwise accuracy {rm.get('eval/accuracy', 0):.3f}"
                     f" (correct vs wrong {rm.get('eval/acc_correct_vs_wrong', 0):.2f}, "
                     f"well-formed vs rambling {rm.get('eval/acc_formed_vs_rambling', 0):.2f}, "
                     f"safe vs unsafe {rm.get('eval/acc_safe_vs_unsafe', 0):.2f})")  # fmt: skip
    if dpo:
        lines.append(f"- DPO: held-out preference accuracy (implicit reward) "
                     f"{dpo.get('eval/accuracy', 0):.3f}")  # fmt: skip
    if score:
        lines.append(f"- PPO: reward-model score of rollouts {score[0]:.2f} → {score[-1]:.2f}; "
                     f"KL to the reference at the end {kl[-1]:.3f} nats/response")  # fmt: skip
    grpo = [r for r in _records(dirs["grpo"]) if "eval/rl_train/sampled_accuracy" in r]
    if grpo:
        g0, g1 = grpo[0], grpo[-1]
        pair = lambda k: f"{g0[k]:.3f} → {g1[k]:.3f}"  # noqa: E731
        gkl = [r["rollout/kl"] for r in _records(dirs["grpo"]) if "rollout/kl" in r]
        lines.append(f"- GRPO: sampled exact-match accuracy on its training prompts "
                     f"{pair('eval/rl_train/sampled_accuracy')}, on unseen RL prompts "
                     f"{pair('eval/rl_heldout/sampled_accuracy')} (greedy: "
                     f"{pair('eval/rl_train/accuracy')}, {pair('eval/rl_heldout/accuracy')}); "
                     f"KL to the reference at the end {gkl[-1]:.3f} nats/response")  # fmt: skip
    report_path = os.path.join(dirs["data"], "report.json")
    if os.path.exists(report_path):
        with open(report_path) as f:
            data = json.load(f)
        lines += ["", "Data (documents in → out per stage, with the reasons for removal):", ""]
        for st in data.get("stages", []):
            if st.get("in") is None:
                continue
            removed = ", ".join(f"{k} {v}" for k, v in st.get("removed", {}).items())
            lines.append(f"- {st['stage']}: {st.get('in')} → {st.get('out')}"
                         + (f" ({removed})" if removed else ""))  # fmt: skip
        pii = next((st.get("pii_redacted") for st in data["stages"] if st["stage"] == "clean"), {})
        lines.append(f"- {data.get('tokens', 0):,} tokens written; PII redacted: {pii}")
    lines += ["", "![losses](losses.png)", "![rl](rl.png)", "![accuracy](accuracy.png)", "",
              "## Commands (each stage alone)", ""]  # fmt: skip
    lines += [f"- **{k}**: `{v}`" for k, v in commands.items()]
    lines += ["", "## Wall time (s)", "", json.dumps({k: round(v) for k, v in times.items()})]
    _plots(workdir, dirs, results)
    path = os.path.join(workdir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
