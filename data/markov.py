"""A synthetic token stream from a fixed random Markov chain, with known entropies.

Used by tests and benchmarks that need data with a known answer: a model that learns the chain
reaches the entropy rate, far below the unigram entropy (the loss of a model that ignores
context). Batches are a pure function of (seed, batch index, row), so the iterator state is one
integer and resume is exact; each process generates only its own rows.
"""

from __future__ import annotations

import bisect

import numpy as np

from flaxlm.data.chat_batches import order_seed


class MarkovStream:
    """Infinite iterator of packed batches (tokens/targets/loss_mask/segment_ids/positions).

    Args:
      vocab_size: number of token ids.
      seq_len: row length.
      global_batch: rows per global batch (all processes together).
      seed: chooses the chain and the sample stream.
      branching: successors per token (the chain is sparse, so context is informative).
      doc_len: (min, max) document length; documents are packed into rows.
      process_index, process_count: this process's share of the rows.
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        global_batch: int,
        seed: int = 0,
        branching: int = 4,
        doc_len: tuple[int, int] = (16, 96),
        process_index: int = 0,
        process_count: int = 1,
        chain_seed: int | None = None,
    ):
        # (A zero made no row: numpy's IndexError at the first batch, or rows without a token.)
        for name, value, least in (("global_batch", global_batch, 1), ("seq_len", seq_len, 1),
                                   ("branching", branching, 1)):  # fmt: skip
            if value < least:
                raise ValueError(f"MarkovStream: {name}={value} must be >= {least}")
        if branching > vocab_size:  # every successor is another token
            raise ValueError(f"MarkovStream: branching={branching} must be <= vocab_size="
                             f"{vocab_size}")  # fmt: skip
        if global_batch % process_count:
            raise ValueError(f"global_batch={global_batch} not divisible by {process_count} procs")
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.global_batch, self.seed, self.doc_len = global_batch, seed, doc_len
        self.rows = global_batch // process_count
        self.row0 = process_index * self.rows
        rng = np.random.default_rng(order_seed(seed if chain_seed is None else chain_seed))
        self.successors = np.stack(
            [rng.choice(vocab_size, size=branching, replace=False) for _ in range(vocab_size)]
        )
        self.probs = rng.dirichlet(np.ones(branching), size=vocab_size)
        self.cum = np.cumsum(self.probs, axis=1)
        # The sampler's copies as Python lists: `bisect_left` on a row is numpy's
        # `searchsorted(side="left")` on the same float64 values, so the stream is unchanged.
        self._successors_list, self._cum_list = self.successors.tolist(), self.cum.tolist()
        self.index = 0

    # --- entropies (nats) ----------------------------------------------------------------------
    def stationary(self) -> np.ndarray:
        """The chain's stationary distribution (computed once, then cached).

        Power iteration on the lazy chain (½ I + ½ P converges even where P is periodic),
        applying P sparsely, O(vocab · branching) a step rather than a dense vocab² product,
        and stopping once a step moves π by less than 1e-14 in L1.
        """
        if getattr(self, "_stationary", None) is None:
            flat_successors = self.successors.ravel()
            pi = np.full(self.vocab_size, 1.0 / self.vocab_size)
            for _ in range(100_000):
                moved = np.bincount(flat_successors, weights=(pi[:, None] * self.probs).ravel(),
                                    minlength=self.vocab_size)  # fmt: skip
                new = 0.5 * pi + 0.5 * moved
                done = np.abs(new - pi).sum() < 1e-14
                pi = new
                if done:
                    break
            self._stationary = pi / pi.sum()
        return self._stationary

    def unigram_entropy(self) -> float:
        pi = self.stationary()
        return float(-(pi[pi > 0] * np.log(pi[pi > 0])).sum())

    def entropy_rate(self) -> float:
        pi = self.stationary()
        h = -(self.probs * np.log(self.probs)).sum(axis=1)
        return float((pi * h).sum())

    # --- iteration ---------------------------------------------------------------------------
    def _row(self, batch_index: int, row: int):
        rng = np.random.default_rng([order_seed(self.seed), batch_index, row])
        successors, cum = self._successors_list, self._cum_list
        T = self.seq_len
        tokens = np.zeros(T + 1, np.int32)
        seg = np.zeros(T + 1, np.int32)
        pos = np.zeros(T + 1, np.int32)
        t, doc = 0, 0
        while t < T + 1:
            n = min(int(rng.integers(self.doc_len[0], self.doc_len[1] + 1)), T + 1 - t)
            doc += 1
            x = int(rng.integers(self.vocab_size))
            doc_tokens = []
            for u in rng.random(n).tolist():  # Python scalars: numpy's per-call cost dominated
                doc_tokens.append(x)
                x = successors[x][bisect.bisect_left(cum[x], u * cum[x][-1])]
            tokens[t : t + n] = doc_tokens
            seg[t : t + n] = doc
            pos[t : t + n] = np.arange(n)
            t += n
        same_doc = seg[1:] == seg[:-1]
        return {
            "tokens": tokens[:-1],
            "targets": np.where(same_doc, tokens[1:], 0).astype(np.int32),
            "loss_mask": same_doc.astype(np.float32),
            "segment_ids": seg[:-1],
            "positions": pos[:-1],
        }

    def batch(self, batch_index: int) -> dict:
        rows = [self._row(batch_index, self.row0 + r) for r in range(self.rows)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        out = self.batch(self.index)
        self.index += 1
        return out

    def get_state(self) -> dict:
        return {"index": self.index, "seed": self.seed}

    def set_state(self, state: dict):
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data state is for seed {state['seed']}, this stream has {self.seed}")
        self.index = int(state["index"])
