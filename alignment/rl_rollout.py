"""Rollouts for the on-policy RL tasks (PPO, GRPO) and the batch source that feeds them to the one
training loop.

A rollout is ONE call of the jitted decoder (models/decode.py: prefill + `lax.while_loop`, no
host round trip per token) with the *current* policy params, then one jitted scoring call.
Rows of a rollout (B rows, width T = seq_len), built on the host from the decoder's output
(`rl_common.rollout_rows`):

    tokens      prompt ids + response ids, right-padded          segment_ids 1 on real tokens
    targets     tokens shifted left (targets[t] = tokens[t + 1])  positions 0, 1, ...
    loss_mask   1 where targets[t] is a response token: t in [P_b − 1, P_b + n_b − 2]

so a logprob or a value at index t belongs to response token t − P_b + 1, and the last real
input token (the response's stop token `<|end|>`) is where a reward model reads its score, the
same place as on the rendered conversations it was trained on (models/heads.py).

`RolloutSource` is the loop's batch source. The loop calls `before_step(state)` before drawing
each batch; when the stored rollout is used up (`rollout.epochs` passes over it in `batch_size`
minibatches) the source generates and scores a new one from `state.params` — the live policy —
and then yields its minibatches. Per-rollout statistics (reward, KL, lengths, the time split
generate / score / train) ride along in every minibatch as constant (B,) arrays named
"rollout/<name>"; the loss returns their means (`passthrough_stats`), so they land in
metrics.jsonl and TensorBoard with the loss metrics. `rollout/gen_s` and `rollout/score_s`
time this rollout's decoder call and its scoring (reward, reference, values, advantages);
`rollout/row_width` is the width the minibatch's rows were cut to (see "Row width" below).
`rollout/train_s` is the wall time between the previous rollout and this one — the optimizer
steps on its minibatches, plus any evaluation or checkpoint the loop ran in between.

Temperature (TRL's convention, `_get_per_token_logps`): the responses are drawn from
π_T = softmax(logits / T), T = `rollout.temperature`, and π_T is the policy throughout — every
log-probability computed for training and scoring divides the logits by T first: the old
policy's (scoring), the reference's, the new policy's in the loss, the entropy, and so the
importance ratio and the KL estimators (`scoring_temperature`, `tempered`). Scoring at T = 1
while sampling at T ≠ 1 would make the ratio π/π_old and the KL refer to softmax(logits), a
distribution the samples were not drawn from, so the estimator would optimise neither policy
consistently. Greedy rollouts (T = 0) are scored at T = 1 (`scoring_temperature`). Top-k/top-p
truncation is not reflected in the logprobs (as in TRL). The decoder's own `sample_logprobs`
are the model's at T = 1 (models/decode.py); `logprob_gap` compares them with the scoring
forward's at T = 1, a check of the decoder's numerics at any temperature.

Row width: rows are built `seq_len` wide, but the scoring forward and each training minibatch
see them cut to the narrowest of `rollout.trim_buckets` widths (seq_len·k/n) that holds their
tokens (`trim_rows`, alignment/rl_rows.py): short responses cost less than the budget, with
the same logprobs, loss and gradients (tested), and at most n compiled programs per pass.

Several processes (a multi-host job): every process holds the whole rollout on its host, the
same on all. Each draws the same prompts (one cursor, the same everywhere), the decoder call
splits the rows over every device and hands each process the whole output (models/decode.py),
reward functions judge every P-th sample on each process and exchange the values
(`call_reward_fns`), the scoring forward runs on the devices and is read back whole (`score`);
advantages, statistics and the minibatch order are then computed alike everywhere, and process
p trains on the p-th part of each minibatch. So a P-process run trains on the minibatches a
one-process run on a mesh of the same shape would, up to the order of floating-point reductions
over processes (tests/alignment/test_rl_multiprocess.py: GRPO, PPO and online DPO on 2 × 4
devices against 1 × 8). The host work that is not split — decoding texts, advantages — is small
next to decoding.

Resume: a checkpoint stores the prompt cursor and the rollout count, not a rollout's unused
minibatches, so the loop saves only at rollout boundaries (`at_boundary`): a periodic save due
inside a rollout, and a SIGTERM, wait for its last minibatch (optimizer steps, no generation).
Every checkpoint then resumes bit for bit. A checkpoint that still holds unused minibatches
(written otherwise) is warned about on resume: a fresh rollout starts from the next prompts.

Bad input (a stated policy; each case is counted in the "rollout/..." metrics):
  * a reward function that raises, or a reward (or reward-model score) that is NaN/Inf: the
    sample gets loss weight 0 and enters no statistic ("rollout/bad_reward"); the first few
    errors are logged with their message and the line of the reward's code that raised. A
    rollout with no valid sample raises `RewardError` (a RuntimeError; the CLIs print it as one
    line), so a broken reward never turns into a silent no-op run, and NaN never reaches the
    loss;
  * an empty response (the stop token alone): its reward is `rollout.empty_reward`, the
    reward functions are not called on it ("rollout/empty");
  * a response that reaches `max_new_tokens` without a stop token is scored as it is, minus
    `rollout.nonstop_penalty` ("rollout/nonstop");
  * over-long prompts: see alignment/rl_common.py (truncated or dropped when loaded).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from flaxlm.alignment import common
from flaxlm.alignment.rl_common import (
    PromptCursor,
    decode_responses,
    rollout_rows,
    stop_string_tuple,
)
from flaxlm.alignment.rl_rows import (  # noqa: F401 (re-exported: the row layout)
    pad_columns,
    response_to_rows,
    row_buckets,
    trim_rows,
    trimmed_width,
)
from flaxlm.config_values import is_finite_real, is_int
from flaxlm.data import source_fingerprint
from flaxlm.data.chat_batches import order_seed, source_fingerprints
from flaxlm.models import lora as lora_lib
from flaxlm.models.decode import DECODE_GEMMS, DECODE_NORMS, generate, resolve_decode_attention
from flaxlm.models.decode_mlp import variant_options as mlp_variant_options
from flaxlm.models.sharding import fetch, global_batch, use_mesh
from flaxlm.models.stop_strings import StopStrings
from flaxlm.models.transformer import fold_norms_unsupported
from flaxlm.train.losses import token_logprobs

log = logging.getLogger("flaxlm")
STAT_PREFIX = "rollout/"
MAX_LOGGED_ERRORS = 5


class RewardError(RuntimeError):
    """A rollout none of whose samples has a valid reward: every reward call raised or returned
    no finite number. The message carries the first failure and where it was raised."""


def _raised_at(e: BaseException) -> str:
    """' (file.py:LINE in fn)': the innermost frame of `e`'s traceback, the line of a user's
    reward that raised (its traceback would otherwise be lost with the sample)."""
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    return f" ({os.path.basename(f.filename)}:{f.lineno} in {f.name})"


# ---------------------------------------------------------------------------------------------
# Log-probabilities, KL, rewards


def scoring_temperature(temperature) -> float:
    """The temperature T that every RL log-probability is computed at: the rollout's sampling
    temperature (`rollout.temperature`), so the policy being trained, scored and KL-penalised
    is the distribution the responses were drawn from, softmax(logits / T) (TRL's convention;
    the module docstring). Greedy decoding (T = 0) is scored at T = 1, the model's own
    distribution: the T → 0 limit is a point mass on the argmax (log-probability 0, no
    gradient, an infinite KL to anything else), and dividing by 0 gives inf/NaN; 1 is also
    TRL's default temperature."""
    t = float(temperature)
    if t < 0:
        raise ValueError(f"rollout.temperature={t} must be >= 0")
    return t if t > 0 else 1.0


def tempered(logits_BTV, temperature: float = 1.0):
    """float32 logits / T: the policy's logits at the rollout temperature (T = 1: unchanged,
    x / 1 is x exactly)."""
    return logits_BTV.astype(jnp.float32) / temperature


def entropy(logits_BTV, temperature: float = 1.0):
    """Per-token entropy of softmax(logits / temperature) (B, T), float32."""
    x = tempered(logits_BTV, temperature)
    lse = jax.nn.logsumexp(x, axis=-1)
    return lse - jnp.sum(jax.nn.softmax(x, axis=-1) * x, axis=-1)


def lm_logprobs(apply, params, batch, temperature: float = 1.0):
    """Log p(target) per token (B, T) of softmax(logits / temperature) of a language model over
    rollout rows."""
    logits = apply(params, batch["tokens"], batch["positions"], batch["segment_ids"])
    return token_logprobs(tempered(logits, temperature), batch["targets"])


def policy_logprobs(apply, params, batch, temperature: float):
    """(log π_T(target), log p(target)) per token (B, T) from one forward pass: the policy's at
    the rollout temperature (π_old: the ratio and the KL) and the model's at T = 1, which is
    what the decoder reports for its samples (models/decode.py `GenerateOutput.logprobs`) and
    so what `logprob_gap` compares them with."""
    logits = apply(params, batch["tokens"], batch["positions"], batch["segment_ids"])
    targets = batch["targets"]
    at_one = token_logprobs(logits, targets)
    if temperature == 1.0:  # the default: one pass over the (B, T, V) logits, not two
        return at_one, at_one
    return token_logprobs(tempered(logits, temperature), targets), at_one


def logprob_gap(sample_logprobs, logprobs_t1, mask) -> float:
    """Mean |decoder logprob − scoring-forward logprob| over the masked tokens, both at T = 1
    (the decoder reports the model's untempered logprobs, `policy_logprobs`): the same logits
    computed twice, so ~0 (float rounding; more in bfloat16) at any rollout temperature — a
    larger gap means the decoder and the training forward disagree (cache, masking, dtype)."""
    m = np.asarray(mask)
    d = np.where(m > 0, np.abs(np.asarray(sample_logprobs) - np.asarray(logprobs_t1)), 0.0)
    return float((d * m).sum() / max(m.sum(), 1.0))  # (where: a skipped row's NaN stays out)


KL_ESTIMATORS = ("k1", "k3")  # `kl_penalty`'s kinds


def kl_penalty(logp, ref_logp, kind: str):
    """Per-token KL(π‖π_ref) estimate from samples of π (Schulman's estimators).

    k1: log π − log π_ref (unbiased, can be negative); k3: (r − 1) − log r with r = π_ref/π
    (unbiased, always >= 0, lower variance)."""
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k3":
        return jnp.expm1(-d) + d
    raise ValueError(f"kl estimator {kind!r}; expected k1 | k3")


def wants_arg(fn, name: str) -> bool:
    """Whether a reward function takes `name` too: a parameter of that name (or **kwargs)
    after (meta, response)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: (meta, response) only
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def wants_prompt(fn) -> bool:
    """Whether a reward function takes the prompt too (`prompt=` or **kwargs)."""
    return wants_arg(fn, "prompt")


def reward_value(out) -> float | None:
    """A reward function's return value as a float: a number of any kind float() takes (Python,
    numpy, a bfloat16 scalar, a Decimal), a bool (a pass / fail check) or a one-element numeric
    array; None for anything else — None, a string (float("0.5") would take it), a list."""
    if out is None or isinstance(out, (str, bytes)):
        return None
    if isinstance(out, (np.ndarray, jax.Array)):
        numeric = jnp.issubdtype(out.dtype, jnp.number) or out.dtype == np.bool_
        return float(out.reshape(())) if out.size == 1 and numeric else None
    try:
        return float(out)
    except (TypeError, ValueError):
        return None


def concurrency(fn) -> int:
    """How many samples a reward function judges at once: its `max_workers` attribute (an int;
    alignment/verify_code.py's `code_tests` sets the CPU count: each call waits on a
    subprocess, so threads overlap them), else 1 — a plain function is called one sample at a
    time, in order, as always."""
    n = getattr(fn, "max_workers", 1)
    return n if is_int(n) and n > 1 else 1


def _start_calls(fns, metas, texts, samples, kwargs) -> tuple[list, dict]:
    """(pools, {i: {j: future}}): fn_i(meta_j, text_j, **kwargs(j, i)) started for every sample
    j of `samples`, for each function i that judges several at once (`concurrency`)."""
    pools, futures = [], {}
    for i, fn in enumerate(fns):
        if (n := min(concurrency(fn), len(samples))) > 1:
            pools.append(ThreadPoolExecutor(max_workers=n))
            futures[i] = {j: pools[-1].submit(fn, metas[j], texts[j], **kwargs(j, i))
                          for j in samples}  # fmt: skip
    return pools, futures


def call_reward_fns(
    fns, weights, metas, texts, prompts=None, reasonings=None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Σ_i w_i·fn_i(meta, text) per sample — fn_i(meta, text, prompt=messages) for a function
    that takes `prompt` (`wants_prompt`), `prompts` giving each sample's prompt as chat
    messages, and `reasoning=` its reasoning text for a function that takes `reasoning` when
    `reasonings` are given (a reasoning model's rollout, where `texts` are the answers);
    (rewards, valid, error messages). A function that raises, or returns anything but a finite
    number (`reward_value`: a bool counts, a string does not), invalidates the sample (the
    policy above).

    Several processes (each holding the whole rollout): process p judges samples p, p + P, ...
    and the values are exchanged, so a costly reward (running code, a judge) is computed once
    per sample, not once per process; the error messages are the process's own samples'.

    A function with a `max_workers` attribute > 1 (`concurrency`) is called on this process's
    samples from that many threads at once, started before the others run (so also on a
    sample an earlier function has already failed); the rewards, the validity and the errors,
    in sample order, are what one call at a time gives."""
    P, p = jax.process_count(), jax.process_index()
    rewards = np.zeros(len(texts), np.float64)
    valid = np.ones(len(texts), bool)
    errors = []
    takes_prompt = [wants_prompt(fn) for fn in fns]
    takes_reasoning = [reasonings is not None and wants_arg(fn, "reasoning") for fn in fns]
    if prompts is None and any(takes_prompt):
        raise ValueError("call_reward_fns: a reward function takes `prompt` but none was given")

    def kwargs(j, i):
        kw = {"prompt": prompts[j]} if takes_prompt[i] else {}
        if takes_reasoning[i]:
            kw["reasoning"] = reasonings[j]
        return kw

    mine = range(p, len(texts), P)
    pools, futures = _start_calls(fns, metas, texts, mine, kwargs)
    for j in mine:
        meta, text = metas[j], texts[j]
        for i, (fn, w) in enumerate(zip(fns, weights)):
            name = getattr(fn, "__name__", repr(fn))
            try:  # (a future's result() raises what the call raised, with its traceback)
                out = futures[i][j].result() if i in futures else fn(meta, text, **kwargs(j, i))
            except Exception as e:  # a user's function: any failure is that sample's
                valid[j] = False
                errors.append(f"reward {name} raised {type(e).__name__}: {e}{_raised_at(e)}")
                break
            r = reward_value(out)
            if r is None:  # None, a string ("0.5" was taken for 0.5), a list: not a reward
                valid[j] = False
                errors.append(f"reward {name} returned {out!r} ({type(out).__name__}), "
                              "not a number")  # fmt: skip
                break
            if not math.isfinite(r):
                valid[j] = False
                errors.append(f"reward {name} returned {r}")
                break
            rewards[j] += w * r
    for pool in pools:
        pool.shutdown()
    rewards = rewards.astype(np.float32)
    if P > 1:  # sample j from process j % P
        every = np.asarray(multihost_utils.process_allgather(np.stack([rewards, valid])))
        rows = np.arange(len(texts))
        rewards, valid = every[rows % P, 0, rows], every[rows % P, 1, rows] > 0
    return rewards, valid, errors


def stat_fields(stats: dict, rows: int) -> dict:
    """Per-rollout statistics as constant (rows,) float32 arrays "rollout/<name>"."""
    return {STAT_PREFIX + k: np.full((rows,), float(v), np.float32) for k, v in stats.items()}


def passthrough_stats(batch) -> dict:
    """The loss-side half of `stat_fields`: each "rollout/..." field's mean."""
    return {k: jnp.mean(v) for k, v in batch.items() if k.startswith(STAT_PREFIX)}


# ---------------------------------------------------------------------------------------------
# The batch source


def check_sampling(r) -> None:
    """Raises on a bad `rollout.*` pass count or sampling value, naming the key. PPO's and
    GRPO's build_task call it before anything is loaded (and `RolloutSource` again): epochs=0
    used to fail only after a whole rollout ("no rollout"), and top_p=1.5, top_k=-1, min_p=2 or
    max_new_tokens=0 at the first rollout, in `generate`'s words without the `rollout.` key."""
    checks = {
        "epochs": (lambda x: is_int(x) and x >= 1, "an integer >= 1 (passes over a rollout)"),
        "max_new_tokens": (lambda x: is_int(x) and x >= 1, "an integer >= 1"),
        "temperature": (lambda x: is_finite_real(x) and x >= 0, "finite and >= 0 (0: greedy)"),
        "top_k": (lambda x: is_int(x) and x >= 0, "an integer >= 0 (0: off)"),
        "top_p": (lambda x: is_finite_real(x) and 0 < x <= 1, "in (0, 1] (1: off)"),
        "min_p": (lambda x: is_finite_real(x) and 0 <= x < 1, "in [0, 1) (0: off)"),
    }
    for key, (ok, what) in checks.items():
        if key in r and not ok(r[key]):
            raise ValueError(f"rollout.{key}={r[key]!r} must be {what}")


class RolloutSource:
    """Iterator of rollout minibatches for the loop (see the module docstring).

    Subclasses implement `make_rollout(params, rng) -> (rows dict, stats dict)` from the live
    TrainState params: rows are numpy (B, ...) arrays of one rollout (the training fields),
    stats its scalar statistics. `cfg` and `template` are the policy's model config and chat
    template.
    """

    def __init__(self, config, mesh, rules, prompts: list[dict], *, cfg, template, spec=None):
        r = config.rollout
        check_sampling(r)
        if r.batch % config.batch_size:
            raise ValueError(
                f"rollout.batch={r.batch} is not a multiple of batch_size={config.batch_size}"
            )
        if r.max_prompt_len + r.max_new_tokens > config.seq_len:
            raise ValueError(
                f"rollout.max_prompt_len + rollout.max_new_tokens = "
                f"{r.max_prompt_len + r.max_new_tokens} > seq_len={config.seq_len}"
            )
        if r.get("check_every", 1) < 1:
            raise ValueError(f"rollout.check_every={r.check_every} must be >= 1")
        if r.get("cache_dtype", "") not in ("", "int8", "bfloat16", "float32"):
            raise ValueError(f"rollout.cache_dtype={r.cache_dtype!r}: '' (the model's dtype), "
                             "int8, bfloat16 or float32")  # fmt: skip
        try:
            resolve_decode_attention(r.get("decode_attention", "auto"))
        except ValueError:
            raise ValueError(f"rollout.decode_attention={r.decode_attention!r}: auto, xla, "
                             "pallas or pallas:BK:W:S") from None  # fmt: skip
        if r.get("decode_gemm", "auto") not in DECODE_GEMMS:
            raise ValueError(f"rollout.decode_gemm={r.decode_gemm!r}: one of {DECODE_GEMMS}")
        if r.get("decode_mlp", "xla") != "xla":
            try:
                mlp_variant_options(r.decode_mlp)
            except ValueError:
                raise ValueError(f"rollout.decode_mlp={r.decode_mlp!r}: xla, pallas or "
                                 "pallas:BN:BK:W:S") from None  # fmt: skip
        if r.get("decode_norm", "auto") not in DECODE_NORMS:
            raise ValueError(f"rollout.decode_norm={r.decode_norm!r}: one of {DECODE_NORMS}")
        if r.get("decode_norm", "auto") == "fold" and (why := fold_norms_unsupported(cfg)):
            raise ValueError(f"rollout.decode_norm='fold' does not apply to this model: {why}")
        # (configs older than the key: none)
        self.stop_strings = strings = stop_string_tuple(r.get("stop_strings", ()))
        self._stop_tables = (
            StopStrings.build(template.tok, strings, vocab_size=cfg.vocab_size) if strings else None
        )
        self.config, self.mesh, self.rules, self.prompts = config, mesh, rules, prompts
        self.cfg, self.template = cfg, template
        # LoRA (`spec`): the policy is {"base", "lora"}; the decoder gets the merged weights
        self.spec, self._merged = spec, None
        self.cursor = PromptCursor(len(prompts), config.seed)  # the same on every process
        # What data.train's files held as the prompts were read: the cursor indexes their
        # shuffled order, so a resume over changed files is checked (`set_state`) as the chat
        # batches' is (data/chat_batches.py), per data.on_changed_sources
        check = common.train_source_check(config)  # (the chat batches' own keywords)
        self.source_fingerprint = source_fingerprints(prompts, check["sources"])
        self.on_changed_sources = source_fingerprint.valid_policy(check["on_changed_sources"])
        # Rows are cut to one of these widths for scoring and training (`trim_rows`); configs
        # older than the key: never.
        self._buckets = row_buckets(config.seq_len, r.get("trim_buckets", 1))
        self.iteration = 0
        self.queue: list[dict] = []
        self.errors_logged = 0
        self._ready_at: float | None = None
        self._train_s = 0.0

    # -- loop interface ---------------------------------------------------------------------
    def __iter__(self):
        return self

    def before_step(self, state) -> None:
        if self.queue:
            return
        jax.block_until_ready(state.params)  # the previous rollout's updates are done
        if self._ready_at is not None:
            self._train_s = time.perf_counter() - self._ready_at
        rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed + 1), self.iteration)
        rows, stats = self.make_rollout(state.params, rng)
        stats["train_s"] = self._train_s  # (of the previous rollout's minibatches)
        stats["iteration"] = self.iteration
        self.iteration += 1
        self.queue = self._minibatches(rows, stats)
        self._ready_at = time.perf_counter()

    def __next__(self) -> dict:
        if not self.queue:
            raise RuntimeError("RolloutSource: no rollout; the loop must call before_step first")
        return self.queue.pop(0)

    def at_boundary(self) -> bool:
        """No minibatch of the current rollout is left: a checkpoint now resumes exactly."""
        return not self.queue

    def get_state(self) -> dict:
        # A resumed run starts a fresh rollout: the unused minibatches of an interrupted one
        # are not checkpointed (they are cheap to regenerate and depend on the old policy).
        state = {"cursor": self.cursor.get_state(), "iteration": self.iteration,
                 "unused_minibatches": len(self.queue)}  # fmt: skip
        return source_fingerprint.with_records(state, self.source_fingerprint)

    def set_state(self, st: dict) -> None:
        st = source_fingerprint.checked_state(st, self.source_fingerprint,
                                              self.on_changed_sources, "the RL prompts",
                                              key="data.train")  # fmt: skip
        self.cursor.set_state(st["cursor"])
        self.iteration = int(st["iteration"])
        self.queue = []
        if st.get("unused_minibatches"):
            log.warning(
                "resuming inside rollout %d: its %d unused minibatches were not checkpointed "
                "and are dropped; a fresh rollout starts (not bit for bit with an uninterrupted "
                "run; see alignment/rl_rollout.py)",
                self.iteration - 1, st["unused_minibatches"],
            )  # fmt: skip

    # -- helpers ------------------------------------------------------------------------------
    def _trim(self, rows: dict, width: int | None = None) -> dict:
        return trim_rows(rows, self.config.seq_len, self._buckets, width)

    def _minibatches(self, rows: dict, stats: dict) -> list[dict]:
        """This process's slices of the rollout's shuffled minibatches: with P processes,
        process p takes the p-th of P equal parts of each (the loop assembles them in process
        order, so the global minibatch is the one a single process would train on)."""
        B, mb = len(next(iter(rows.values()))), self.config.batch_size  # rows (or pairs)
        rng = np.random.default_rng([order_seed(self.config.seed), self.iteration])
        part, p = mb // jax.process_count(), jax.process_index()
        out = []
        for _ in range(self.config.rollout.epochs):
            perm = rng.permutation(B)
            for i in range(0, B, mb):
                # The width of the whole minibatch: every process cuts its part alike.
                whole = perm[i : i + mb]
                width = trimmed_width({k: v[whole] for k, v in rows.items()
                                       if k.endswith("segment_ids")}, self._buckets)  # fmt: skip
                sel = whole[p * part : (p + 1) * part]
                out.append({
                    **self._trim({k: v[sel] for k, v in rows.items()}, width),
                    **stat_fields({**stats, "row_width": min(width, self.config.seq_len)},
                                  len(sel)),
                })  # fmt: skip
        return out

    def decoding_params(self, policy):
        """The policy's weights for the decoder. A LoRA policy's adapters are merged in and the
        result cast to the compute dtype in one jitted call, so no full-precision merged copy
        of the model is ever held (the decoder casts to that dtype anyway)."""
        if self.spec is None:
            return policy
        if self._merged is None:
            dt, spec = jnp.dtype(self.cfg.dtype), self.spec
            cast = lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
            self._merged = jax.jit(lambda p: jax.tree.map(cast, lora_lib.merge(p, spec)))
        with use_mesh(self.mesh, self.rules):
            return self._merged(policy)

    def sample(self, params, prompt_idx: list[int], rng, num_samples: int = 1) -> dict:
        """One decoder call for the prompts `prompt_idx`, `num_samples` samples each (rows
        b·num_samples + g; one prefill per prompt), and its rows, texts and flags."""
        r, t = self.config.rollout, self.template
        prompts = [self.prompts[i]["ids"] for i in prompt_idx]
        pad_id = max(t.tok.pad_id, 0)
        t0 = time.perf_counter()
        out = generate(
            self.cfg, params, prompts, max_new_tokens=r.max_new_tokens, rng=rng,
            temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, min_p=r.get("min_p", 0.0),
            stop_tokens=t.stop_tokens, pad_id=pad_id, mesh=self.mesh, rules=self.rules,
            check_every=r.get("check_every", 1),  # configs older than the key: every token
            decode_attention=r.get("decode_attention", "auto"), num_samples=num_samples,
            decode_gemm=r.get("decode_gemm", "auto"), decode_mlp=r.get("decode_mlp", "xla"),
            decode_norm=r.get("decode_norm", "auto"),
            cache_dtype=r.get("cache_dtype", "") or None,
            stop_strings=self._stop_tables,
        )  # fmt: skip
        out = jax.device_get(out)
        prompt_idx = [i for i in prompt_idx for _ in range(num_samples)]  # one per row now
        prompts = [self.prompts[i]["ids"] for i in prompt_idx]
        gen_s = time.perf_counter() - t0
        rows = rollout_rows(prompts, out.tokens, out.lengths, self.config.seq_len, pad_id)
        texts, stopped = decode_responses(t.tok, out.tokens, out.lengths, t.stop_tokens,
                                          self.stop_strings)  # fmt: skip
        prompt_lens = np.asarray([len(p) for p in prompts])
        return {
            "rows": rows, "texts": texts, "stopped": stopped, "lengths": out.lengths,
            "empty": np.asarray([not x.strip() for x in texts]), "gen_s": gen_s,
            "metas": [self.prompts[i]["meta"] for i in prompt_idx], "prompt_lens": prompt_lens,
            "messages": [self.prompts[i].get("messages") for i in prompt_idx],
            "sample_logprobs": response_to_rows(out.logprobs, prompt_lens, self.config.seq_len),
        }  # fmt: skip

    def score(self, fn, *args):
        """Runs a jitted scoring function under the mesh on the rollout's rows (the whole
        rollout, split over the devices, cut to their width bucket: `trim_rows`); its whole
        results on the host of every process, per-token ones padded back to seq_len."""
        T, width = self.config.seq_len, self.config.seq_len
        placed = []
        for a in args:
            if isinstance(a, dict) and "tokens" in a:
                a = self._trim(a)
                width = a["tokens"].shape[1]
                a = global_batch(a, self.mesh)
            placed.append(a)
        with use_mesh(self.mesh, self.rules):
            out = fetch(fn(*placed))
        return jax.tree.map(lambda x: pad_columns(x, width, T), out)

    def log_errors(self, errors: list[str], n: int) -> None:
        for e in errors[: max(0, MAX_LOGGED_ERRORS - self.errors_logged)]:
            log.warning("rollout %d: %s (sample skipped)", self.iteration, e)
            self.errors_logged += 1
        if n == 0:  # (decided on the whole rollout: every process raises alike)
            first = errors[0] if errors else "judged on another process"
            raise RewardError(
                f"rollout {self.iteration}: no valid sample ({len(errors)} bad rewards here; "
                f"first: {first}). See the bad-input policy in flaxlm/alignment/rl_rollout.py."
            )

    def make_rollout(self, params, rng) -> tuple[dict, dict]:
        raise NotImplementedError


def sample_stats(s: dict, valid) -> dict:
    """Length / stop / empty / bad-reward statistics of one rollout (see `sample`)."""
    return {
        "response_len": float(np.mean(s["lengths"])),
        "stopped": float(np.mean(s["stopped"])),
        "nonstop": float(np.sum(~s["stopped"])),
        "empty": float(np.sum(s["empty"])),
        "bad_reward": float(np.sum(~valid)),
        "gen_s": s["gen_s"],
    }
