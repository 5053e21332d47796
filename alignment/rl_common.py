"""What the alignment tasks beyond SFT/RM share (PPO, GRPO, DPO): the `rollout` config section,
RL prompts, frozen reference / reward models placed like the trained params, and a held-out
evaluation by greedy generation.

Prompts (`load_prompts`): records with a `prompt` (text or messages) and an optional `meta`
(the built-in world's judge needs it), rendered with the chat template up to the assistant
header. Bad input: prompts longer than `rollout.max_prompt_len` tokens follow `data.overlength`
— truncate_left (oldest tokens cut, BOS and the generation header kept; counted in the data
report) or drop (counted); malformed records are dropped and counted (strict mode raises with
file:line).

Frozen models (`frozen_lm`, `frozen_scalar`: alignment/rl_frozen.py, re-exported here): the
reference policy and the reward model, loaded from a run directory and placed like the trained
params, optionally in bfloat16 or int8; each read at the step the run started with, also on a
resume (`FrozenSources`).

Held-out evaluation (alignment/rl_eval.py: `make_policy_eval`, `heldout_sets`): greedy (and
optionally sampled) answers to held-out prompts, scored by the built-in world's judge and by a
reward model when one is given, and the RL prompt sets' answers by the run's reward functions
(GRPO, online DPO: `rl_eval.reward_metrics`); never measured on trained questions.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from flaxlm.alignment import common
from flaxlm.alignment.rl_frozen import (  # noqa: F401  (callers and tests use rl_common.<name>)
    FROZEN_DTYPES,
    FrozenSources,
    frozen_lm,
    frozen_scalar,
    load_scalar_params,
    reward_from_ema,
)
from flaxlm.alignment.sft import eval_gen_config
from flaxlm.data import formats as F
from flaxlm.data.chat_batches import order_seed
from flaxlm.data.chat_examples import prompt_turns
from flaxlm.models.heads import sequence_values


def size_rollout_rows(c: ml_collections.ConfigDict, seq_cap: int) -> None:
    """Sets the prompt and response caps within `seq_cap` (64 and 32 tokens at most: the
    built-in world's questions and answers) and `seq_len` to their sum. A rollout row holds one
    prompt and its response, so a wider row would be pure padding in every score and train pass
    (80-90% of the compute at 512-1024). Raising a cap on the command line needs seq_len raised
    with it (the rollout checks)."""
    c.rollout.max_prompt_len = min(64, seq_cap // 2)
    c.rollout.max_new_tokens = min(32, seq_cap - c.rollout.max_prompt_len)
    c.seq_len = c.rollout.max_prompt_len + c.rollout.max_new_tokens


def rollout_config(batch: int, max_new_tokens: int = 24) -> ml_collections.ConfigDict:
    """The `rollout` section shared by PPO and GRPO."""
    c = ml_collections.ConfigDict()
    c.batch = batch  # sequences generated per rollout (GRPO: prompts × group size)
    c.epochs = 1  # passes over each rollout, in minibatches of `batch_size` rows
    c.max_prompt_len = 64  # prompts beyond this are cut from the left or dropped (data.overlength)
    c.max_new_tokens = max_new_tokens  # response budget (the decode loop's bound)
    c.temperature = 1.0  # sampling T; RL logprobs are of softmax(logits / T) too (0: greedy, at 1)
    c.top_k = 0  # 0 = off
    c.top_p = 1.0  # 1 = off
    c.min_p = 0.0  # drop tokens below min_p × the most likely one's probability; 0 = off
    c.check_every = 1  # test "all responses stopped" every this many tokens (GPU: a host read each)
    # strings that also end a response once its text holds one, e.g. ("</answer>",): inside
    # the decode loop (models/stop_strings.py); the string stays in the text rewards judge
    c.stop_strings = ()
    # auto | xla | pallas: each decode step's attention as one Pallas kernel ("auto": on CUDA
    # GPUs, where it is faster; XLA's elsewhere — models/decode.py `generate`)
    c.decode_attention = "auto"
    # auto | xla | cublas: the decoder's matmuls on GPUs ("auto": cuBLAS calls with q|k|v and
    # gate|up concatenated once per rollout, on CUDA GPUs for float weights — 11% faster per
    # 1.1B step on the H200; XLA's Triton gemms otherwise — models/decode.py `generate`)
    c.decode_gemm = "auto"
    # xla | pallas | pallas:BN:BK:W:S: each decode step's silu(gate)·up as one Pallas kernel
    # (models/decode_mlp.py; GPUs; a candidate: slower in the step on the H200) — and auto |
    # xla | fold: the pre-norms folded into the projections, divided out inside the attention
    # (and gate|up) kernels; "auto" folds where it measured faster (`generate`'s decode_norm)
    c.decode_mlp = "xla"
    c.decode_norm = "auto"
    # KV cache dtype of the decoder: "" = the model's compute dtype; "int8" stores keys and
    # values as int8 with a scale per token and head (53% of bf16's bytes at head dim 64: longer
    # responses or more rows in the same memory; the decoder's logprobs then drift from the
    # trainer's, logged as rollout/logprob_gap)
    c.cache_dtype = ""
    c.empty_reward = -1.0  # reward of an empty response (the stop token alone)
    c.nonstop_penalty = 0.0  # subtracted from responses that hit max_new_tokens without stopping
    c.heldout_prompts = 0  # prompts of data.train kept out of training, evaluated as rl_heldout
    # dtype of the frozen reference / reward models: bfloat16 halves their bytes; int8 keeps
    # their projection matrices in int8 (bf16 compute, models/quant.py): a quarter of float32
    c.frozen_dtype = "float32"
    # scoring and training see rows cut to the narrowest of seq_len·k/4 (k = 1..4) that holds
    # the rollout's (minibatch's) tokens: less padding computed, 4 programs at most; 1 = off
    c.trim_buckets = 4
    return c


def rl_run_config(c: ml_collections.ConfigDict, lr: float, runlocal: bool) -> None:
    """What the RL configs (PPO, GRPO, online DPO) share after their own sections: held-out
    greedy and sampled accuracy (`eval_gen`, the world's held-out questions, prompts cut as
    the rollouts' — `eval_gen.max_prompt_len` follows `rollout.max_prompt_len` unless set
    itself; `rollout.heldout_prompts` RL prompts kept out), a constant learning rate after a
    short warmup with Adam's β2 = 0.999 (its second moment in float32 whatever the weights'
    dtype: a bfloat16 one cannot carry that decay) and no weight decay, and the evaluation /
    checkpoint cadence."""
    c.eval_gen = eval_gen_config("builtin:sft_heldout")  # held-out greedy accuracy
    # Follows rollout.max_prompt_len, also when that is set on the command line (identity(): a
    # reference of its own, so setting eval_gen.max_prompt_len leaves the rollout's alone).
    c.eval_gen.max_prompt_len = c.rollout.get_ref("max_prompt_len").identity()
    c.eval_gen.sample_temperature = 1.0  # also report the accuracy of samples (0: off)
    c.eval_gen.samples = 1  # ...this many per prompt
    # pass@k and maj@k of the held-out reward sets at these k < samples too ("1,4,16"), each
    # estimated from all the samples: does RL narrow what the policy can reach (pass@k at large
    # k falling while pass@1 rises)?
    c.eval_gen.at_k = ""
    c.rollout.heldout_prompts = 0 if runlocal else 200  # evaluated as eval/rl_heldout/...
    c.opt.lr = lr
    c.opt.schedule = "constant"
    c.opt.warmup_steps = max(c.total_steps // 20, 1)
    c.opt.weight_decay = 0.0
    c.opt.b2 = 0.999
    # With float32 weights this is what optax keeps anyway (the same state and updates, bit
    # for bit); with bfloat16 ones it costs 2 bytes a weight and makes b2 = 0.999 trainable
    # (a bfloat16 second moment freezes at that decay: refused by train/optim.py).
    c.opt.nu_dtype = "float32"
    c.eval_every = c.total_steps // 2 if runlocal else 64
    c.ckpt_every = c.total_steps if runlocal else 256
    c.log_every = 4
    if runlocal:
        c.eval_gen.examples = 32
        c.eval_gen.batch = 32
        c.eval_gen.max_new_tokens = 16


# ---------------------------------------------------------------------------------------------
# Prompts


def load_prompts(spec: str, config, template, report: F.DataReport) -> list[dict]:
    """Rendered generation prompts {"ids", "meta", "loc", "messages" (the prompt as chat turns)}
    of every record in `spec`."""
    d, fields = config.data, config.data.fields
    max_len = config.rollout.max_prompt_len
    out = []
    for obj, loc in common.iter_records(spec, d, report):
        try:
            _, prompt, tools, meta = F.prompt_record(obj, fields)
            with F.naming_record(loc):
                full, _ = F.render_prompt(prompt, template, 1 << 30, tools=tools)
                if len(full) > max_len and d.overlength == "drop":
                    raise F.FormatError("too_long", f"{len(full)} prompt tokens > {max_len}")
                # Rendered again (cut to max_len) only when over it: a prompt that fits is its
                # uncut render (fit_length cuts nothing), and rendering every prompt twice
                # doubled the tokenizing of 1M RL prompts.
                ids, cut = ((full, 0) if len(full) <= max_len else
                            F.render_prompt(prompt, template, max_len, tools=tools))  # fmt: skip
        except F.FormatError as e:
            report.bad(e.reason, loc, str(e))
            continue
        if cut:
            report.truncation(loc, cut)
        report.used += 1
        report.tokens += len(ids)
        # the turns the policy was prompted with, for rewards' `prompt=`: not the reference
        # answer an SFT chat reused as a prompt ends in (render_prompt drops it too)
        out.append({"ids": np.asarray(ids, np.int32), "meta": meta, "loc": loc,
                    "messages": prompt_turns(prompt)})  # fmt: skip
    return out


class PromptCursor:
    """Prompt indices in a per-epoch shuffled order; state is (epoch, position). The same on
    every process: a rollout is drawn whole by each (alignment/rl_rollout.py)."""

    def __init__(self, n: int, seed: int):
        self.idx = np.arange(n)
        if not n:
            raise ValueError("no prompts")
        self.seed, self.epoch, self.pos = seed, 0, 0
        self._made = (None, None)  # (epoch, its order)

    def _order(self):
        # The epoch's permutation, drawn once per epoch: drawn at every `take`, a rollout of a
        # few prompts cost a permutation of all N (1M prompts: ~20 ms per rollout, N²/k over
        # an epoch of k-prompt rollouts).
        if self._made[0] != self.epoch:
            rng = np.random.default_rng([order_seed(self.seed), self.epoch])
            self._made = (self.epoch, rng.permutation(self.idx))
        return self._made[1]

    def take(self, k: int) -> list[int]:
        out, order = [], self._order()
        while len(out) < k:
            if self.pos == len(order):
                self.epoch, self.pos = self.epoch + 1, 0
                order = self._order()
            out.append(int(order[self.pos]))
            self.pos += 1
        return out

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def set_state(self, st: dict) -> None:
        self.epoch, self.pos = int(st["epoch"]), int(st["pos"])


# ---------------------------------------------------------------------------------------------
# Rows of prompt + response, decoding


def rollout_rows(prompts: Sequence[np.ndarray], tokens, lengths, seq_len: int, pad_id: int,
                 width_name: str = "seq_len"):  # fmt: skip
    """Rows of prompts + their generated tokens (B, N): `tokens` = prompt + response,
    right-padded to `seq_len`; `loss_mask` marks the targets that are response tokens (see
    alignment/rl_rollout.py). `width_name`: what set `seq_len`, for the error."""
    B = len(prompts)
    out = F.empty_rows(B, seq_len, pad_id)
    for b, (p, n) in enumerate(zip(prompts, lengths)):
        ids = np.concatenate([p, tokens[b, :n]])
        L = len(ids)
        if L > seq_len:
            raise ValueError(f"rollout row {b}: {len(p)} prompt + {n} response tokens = {L} > "
                             f"the row width {seq_len} ({width_name})")  # fmt: skip
        out["tokens"][b, :L] = ids
        out["targets"][b, : L - 1] = ids[1:]
        out["segment_ids"][b, :L] = 1
        out["positions"][b, :L] = np.arange(L)
        out["loss_mask"][b, len(p) - 1 : L - 1] = 1.0
    return out


def stop_string_tuple(value, key: str = "rollout.stop_strings") -> tuple:
    """`rollout.stop_strings` as a tuple of non-empty strings (one string is a 1-tuple)."""
    strings = (value,) if isinstance(value, str) else tuple(value or ())
    if any(not isinstance(x, str) or not x for x in strings):
        raise ValueError(f"{key}={strings!r}: non-empty strings expected")
    return strings


def decode_responses(tok, tokens, lengths, stop_tokens, stop_strings=()
                     ) -> tuple[list[str], np.ndarray]:  # fmt: skip
    """Response texts (stop token removed) and whether each row stopped: at a stop token, or
    holding one of `stop_strings` (kept in the text)."""
    stops, texts, stopped = set(stop_tokens), [], []
    for row, n in zip(tokens, lengths):
        ids = [int(t) for t in row[:n]]
        ended = bool(ids) and ids[-1] in stops
        texts.append(tok.decode(ids[:-1] if ended else ids))
        stopped.append(ended or any(s in texts[-1] for s in stop_strings))
    return texts, np.asarray(stopped, bool)


def reward_scorer(rm_apply):
    """jit (rm params, rows) -> (B,) reward-model score at each row's last real token."""

    def score(params, rows):
        values = rm_apply(params, rows["tokens"], rows["positions"], rows["segment_ids"])
        return sequence_values(values, rows["segment_ids"])

    return jax.jit(score)
