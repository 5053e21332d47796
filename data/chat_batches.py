"""Batch iterators of rendered chat data: packed SFT rows (`SFTBatches`), one preference
pair per row (`PreferenceBatches`), one unpaired example per row with its mismatched KL row
(`UnpairedBatches`), and the per-epoch orders they draw from.

Separate from rendering (data/chat_examples.py gives them fitted examples): these are the data
iterators of CONTRIBUTING.md — this process's rows of each global batch, exact
get_state/set_state, `finite`/`prefetch` when they end. `data/formats.py` re-exports every name.

SFT examples are packed first-fit into fixed rows (segment ids 1, 2, ... per example, positions
restarting at 0, no example split across rows), so attention never crosses examples. Preference
pairs are one pair per row: `chosen_*` and `rejected_*` fields plus `margin` (B,) and `valid`
(B,); both responses share the prompt, truncated identically.

Unpaired examples (KTO) are one per row, each with a mismatched row for KTO's KL estimate: its
completion after the prompt of another row of the batch (`kl_partners`, `mismatched`).

A state is an index into a shuffle of every example, so it means other examples once the data
files gained, lost or changed records. The state therefore also records what the examples'
files held (`source_fingerprints`, the records pretraining keeps: data/source_fingerprint.py),
and `set_state` refuses a resume onto files that changed since, naming each (or, with
`on_changed_sources="warn"`, resumes anyway with a warning).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence

import numpy as np

from flaxlm.data import source_fingerprint
from flaxlm.data.chat_examples import fit_length
from flaxlm.data.lookahead import Lookahead
from flaxlm.data.source_paths import expand_paths


def empty_rows(b: int, t: int, pad_id: int, prefix: str = "") -> dict[str, np.ndarray]:
    return {
        f"{prefix}tokens": np.full((b, t), pad_id, np.int32),
        f"{prefix}targets": np.full((b, t), pad_id, np.int32),
        f"{prefix}loss_mask": np.zeros((b, t), np.float32),
        f"{prefix}segment_ids": np.zeros((b, t), np.int32),
        f"{prefix}positions": np.zeros((b, t), np.int32),
    }


def place(out: dict, r: int, start: int, seg: int, ids, mask, prefix: str = "") -> int:
    """Writes one example's (tokens, targets, mask) at row r from `start`; returns its length."""
    n = len(ids) - 1
    sl = slice(start, start + n)
    out[f"{prefix}tokens"][r, sl] = ids[:-1]
    out[f"{prefix}targets"][r, sl] = ids[1:]
    out[f"{prefix}loss_mask"][r, sl] = mask[1:]
    out[f"{prefix}segment_ids"][r, sl] = seg
    out[f"{prefix}positions"][r, sl] = np.arange(n)
    return n


def order_seed(seed: int) -> int:
    """The entropy numpy's generators get for a run ``seed``: the seed itself when it is >= 0
    (the orders runs have always had), a negative one mapped past every 64-bit seed (numpy
    takes only non-negative entropy: ``seed=-1`` used to stop with "expected non-negative
    integer"), so no two seeds share an order. Pretraining maps its seeds likewise
    (data/pipeline.py ``shuffle_seed``)."""
    seed = int(seed)
    return seed if seed >= 0 else 2**64 - seed


def _item_source(loc: str) -> str:
    """The file (or built-in split) an example was read from, by the location the readers gave
    its record (data/chat_records.py): "file:line" (jsonl, parquet), "file[i]" (the i-th
    element of a .json array), "builtin:split:i"."""
    if loc.endswith("]") and "[" in loc:
        head, _, index = loc[:-1].rpartition("[")
        if index.isdigit():
            return head
    return loc.rpartition(":")[0] or loc


def _source_record(part: str, examples: collections.Counter) -> dict:
    """``part``'s fingerprint; its ``docs``: the examples read from its files."""
    if part.startswith("builtin:"):  # the built-in world's split: made by the config, no files
        return source_fingerprint.fingerprint(part, examples[part], builtin=())
    return source_fingerprint.fingerprint(part, sum(examples[f] for f in expand_paths(part)))


def source_fingerprints(items: Sequence[dict], spec: str | None = None) -> list[dict] | None:
    """What the files the examples were read from hold (data/source_fingerprint.py): a record
    per part of ``spec`` (data.train's comma-separated patterns), or without one per file the
    examples' "loc" names, in reading order; its ``docs`` counts the examples from it, what a
    saved position indexes. Only a spec's record of a glob sees a file added under it (by the
    examples, that is another source). None when the examples name no file there is (examples
    built in memory, with made-up locations): their state is the position alone."""
    locs = [ex.get("loc") if isinstance(ex, dict) else None for ex in items]
    if not locs or not all(isinstance(loc, str) for loc in locs):
        return None
    examples = collections.Counter(_item_source(loc) for loc in locs)  # (first-seen order)
    if spec:
        parts = [p.strip() for p in spec.split(",") if p.strip()]
    else:
        parts = [s for s in examples if s.startswith("builtin:") or os.path.isfile(s)]
    return [_source_record(part, examples) for part in parts] or None


class _EpochOrder:
    """Every example in a per-epoch shuffled order (the same on every process); state is
    (epoch, position)."""

    def __init__(self, n, *, seed, shuffle, num_epochs):
        self.idx = np.arange(n)
        if n == 0:
            raise ValueError("no examples")
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        self.epoch, self.pos = 0, 0
        self._order = self._make(0)

    def _make(self, epoch):
        if not self.shuffle:
            return self.idx
        return np.random.default_rng([order_seed(self.seed), epoch]).permutation(self.idx)

    def peek(self) -> int | None:
        if self.pos == len(self._order):
            if self.num_epochs and self.epoch + 1 >= self.num_epochs:
                return None
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._make(self.epoch)
        return int(self._order[self.pos])

    def advance(self) -> None:
        self.pos += 1

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def set_state(self, st: dict) -> None:
        self.epoch, self.pos = int(st["epoch"]), int(st["pos"])
        self._order = self._make(self.epoch)


class _GlobalOrder:
    """Items for one-item-per-row batches of `chunk` rows per process: the global order is each
    epoch's permutation of all items, back to back, the same on every process; global batch k
    holds its items k·C … (k + 1)·C − 1 (C = chunk × process_count), and process p takes the
    p-th `chunk` of them. So the global batches are the ones a single process draws, whatever
    the number of processes (one process: the `_EpochOrder` of every item). State (epoch, pos):
    where this process's next item sits in the global order."""

    def __init__(self, n, *, seed, shuffle, num_epochs, process_index, process_count, chunk):
        if n == 0:
            raise ValueError("no examples")
        self.n, self.seed, self.shuffle, self.num_epochs = n, seed, shuffle, num_epochs
        self.p, self.chunk, self.width = process_index, chunk, chunk * process_count
        self.taken = 0  # items this process has taken
        self._perm_epoch, self._perm = -1, None

    def _at(self) -> tuple[int, int]:  # (epoch, position) of this process's next item
        k, r = divmod(self.taken, self.chunk)
        return divmod(k * self.width + self.p * self.chunk + r, self.n)

    def peek(self) -> int | None:
        epoch, pos = self._at()
        if self.num_epochs and epoch >= self.num_epochs:
            return None
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([order_seed(self.seed), epoch])
            self._perm = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
            self._perm_epoch = epoch
        return int(self._perm[pos])

    def advance(self) -> None:
        self.taken += 1

    def get_state(self) -> dict:
        epoch, pos = self._at()
        return {"epoch": epoch, "pos": pos}

    def set_state(self, st: dict) -> None:
        # A state this layout saved sits in this process's chunk of a global batch (or at its
        # end); another one (an older per-process order) resumes at the nearest chunk.
        k, r = divmod(int(st["epoch"]) * self.n + int(st["pos"]), self.width)
        self.taken = k * self.chunk + min(max(r - self.p * self.chunk, 0), self.chunk)


class _Batches(Lookahead):
    """Shared by the batch iterators: this process's rows of each global batch, exact
    get_state/set_state. `num_epochs=0` repeats forever, else StopIteration at the end
    (`finite`; `prefetch(n)` draws batches ahead, data/lookahead.py). A subclass builds a
    batch of `rows` rows in `_build(rows)`.

    The global batches do not depend on the number of processes: with one item per row
    (`ONE_PER_ROW`) each process draws just its part of each global batch (`_GlobalOrder`);
    otherwise (packed rows, rows that refer to each other) every process builds the whole
    global batch from the same global order and keeps its rows, as pretraining does.

    The state records what the items' files held (`source_fingerprints`: per part of
    `sources`, data.train's spec, else per file the items' "loc" names), once beside the
    processes' positions; `set_state` checks it per `on_changed_sources` ("error" | "warn")."""

    ONE_PER_ROW = False  # each row holds one item, built independently of the others

    def __init__(self, items, *, seq_len, batch, pad_id, seed=0, shuffle=True, num_epochs=0,
                 process_index=0, process_count=1, with_index=False, sources=None,
                 on_changed_sources="error"):  # fmt: skip
        source_fingerprint.valid_policy(on_changed_sources)
        # Taken as the iterator is built, just after its items were read: a file edited
        # later (while the run trains) is not what they hold
        self.fingerprint = source_fingerprints(items, sources)
        self.on_changed_sources = on_changed_sources
        self.items, self.seq_len, self.batch, self.pad_id = items, seq_len, batch, pad_id
        # with_index: rows carry `index` (B,) int32, the item each row holds (-1: none), so an
        # evaluation can group rows gathered from every process by their items' metadata
        self.with_index = with_index
        self.process_index, self.process_count = process_index, process_count
        kw = dict(seed=seed, shuffle=shuffle, num_epochs=num_epochs)
        if self.ONE_PER_ROW:
            self.order = _GlobalOrder(len(items), chunk=batch, process_index=process_index,
                                      process_count=process_count, **kw)  # fmt: skip
            self.build_rows = batch
        else:  # the whole global batch, this process's rows kept (`_next_batch`)
            self.order = _EpochOrder(len(items), **kw)
            self.build_rows = batch * process_count
        self.finite = bool(num_epochs)

    def _next_batch(self) -> dict[str, np.ndarray]:
        out = self._build(self.build_rows)
        if self.build_rows == self.batch:
            return out
        lo = self.process_index * self.batch
        return {k: v[lo : lo + self.batch] for k, v in out.items()}

    def _build(self, rows: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def get_state(self) -> dict:
        """Lookahead's state plus, with a fingerprint, what each source held (``"sources"``:
        the same on every process, so recorded once, beside the processes' positions)."""
        return source_fingerprint.with_records(super().get_state(), self.fingerprint)

    def set_state(self, state: dict) -> None:
        # The records are taken out before the positions are read (resharded or not): they
        # describe the data, which no process count changes.
        name = self.state_name or type(self).__name__
        super().set_state(
            source_fingerprint.checked_state(
                state, self.fingerprint, self.on_changed_sources, name, key="data.train"
            )
        )

    def _local_state(self) -> dict:
        return self.order.get_state()

    def _set_local_state(self, state: dict) -> None:
        self.order.set_state(state)

    def _reshard(self, saved: list[dict], process_index: int, process_count: int):
        """This process's position from the states of a run with another process count
        (data/process_state.py): the global order does not depend on it, so the lowest saved
        process's position is where the next global batch starts, and every process of this
        layout resumes from it (``_GlobalOrder.set_state`` finds its own part). Each saved
        process's own entry used to be reused, which with more processes than were saved put
        them at different global batches (pairs skipped and repeated)."""
        first = saved[0]
        at = f"epoch {first['epoch']}, item {first['pos']}"
        if not self.ONE_PER_ROW:  # every process packed the whole global batch: one position
            if all(st == first for st in saved):
                return first, f"one global position ({at}): resumed exactly", True
            note = f"the saved processes stand at different positions {saved}: resuming at {at}"
            return first, note, False
        width = self.order.width  # this run's global batch
        if (int(first["epoch"]) * self.order.n + int(first["pos"])) % width == 0:
            note = f"the global batches do not depend on it: resumed exactly ({at})"
            return first, note, True
        note = (
            f"process 0's position ({at}) is not the start of one of this run's global batches "
            f"of {width} rows (another batch size?): resuming near it, a few items repeated "
            "or skipped"
        )
        return first, note, False


class SFTBatches(_Batches):
    """Packed SFT batches: each example goes into the first of the `batch` rows it fits (never
    split); the batch is done when the next example fits no row."""

    def __init__(self, examples, **kw):
        super().__init__(examples, **kw)
        longest = max((len(ex["ids"]) - 1 for ex in examples), default=0)
        if longest > self.seq_len:
            raise ValueError(f"an example has {longest} tokens > seq_len {self.seq_len}")

    def blank(self, rows: int | None = None) -> dict[str, np.ndarray]:
        """A batch with no example (no tokens, no loss weight)."""
        return empty_rows(rows or self.batch, self.seq_len, self.pad_id)

    def _build(self, rows: int) -> dict[str, np.ndarray]:
        out = self.blank(rows)
        fill = np.zeros(rows, np.int64)
        segs = np.zeros(rows, np.int64)
        while (i := self.order.peek()) is not None:
            ex = self.items[i]
            rows = np.flatnonzero(fill + len(ex["ids"]) - 1 <= self.seq_len)
            if len(rows) == 0:
                break
            r = rows[0]
            segs[r] += 1
            fill[r] += place(out, r, fill[r], segs[r], ex["ids"], ex["mask"])
            self.order.advance()
        if not fill.any():
            raise StopIteration
        return out


class PreferenceBatches(_Batches):
    """One preference pair per row: `chosen_*`, `rejected_*` (B, T), `margin` and `valid` (B,);
    a final partial batch has `valid = 0` rows (evaluation)."""

    ONE_PER_ROW = True

    def blank(self, rows: int | None = None) -> dict[str, np.ndarray]:
        """A batch with no pair (`valid` 0 everywhere)."""
        b, t = rows or self.batch, self.seq_len
        out = {**empty_rows(b, t, self.pad_id, "chosen_"), **empty_rows(b, t, self.pad_id,
               "rejected_")}  # fmt: skip
        out["margin"] = np.zeros(b, np.float32)
        out["valid"] = np.zeros(b, np.float32)
        return {**out, "index": np.full(b, -1, np.int32)} if self.with_index else out

    def _build(self, rows: int) -> dict[str, np.ndarray]:
        out, b = self.blank(rows), rows
        index = np.full(b, -1, np.int32)
        r = 0
        while r < b and (i := self.order.peek()) is not None:
            p = self.items[i]
            place(out, r, 0, 1, *p["chosen"], prefix="chosen_")
            place(out, r, 0, 1, *p["rejected"], prefix="rejected_")
            out["margin"][r], out["valid"][r], index[r] = p["margin"], 1.0, i
            self.order.advance()
            r += 1
        if r == 0:
            raise StopIteration
        return {**out, "index": index} if self.with_index else out


def kl_partners(prompt_keys: Sequence) -> list[int]:
    """For each row k, the row whose prompt its KL row takes: the next row after k (cyclically)
    whose prompt differs from k's — row k + 1 when prompts are distinct, a shift by one, so the
    mismatched rows hold the batch's own completions, each once — or -1 when no other row has
    another prompt (one row; all rows one prompt). A completion after its own prompt again
    (the two halves of a preference pair, adjacent in an unshuffled order) would estimate
    nothing but the matched reward."""
    n, out = len(prompt_keys), []
    for k in range(n):
        j = next((j % n for j in range(k + 1, k + n) if prompt_keys[j % n] != prompt_keys[k]), -1)
        out.append(j)
    return out


def mismatched(prompt_ex: dict, completion_ex: dict, seq_len: int):
    """(ids, mask) of `completion_ex`'s completion after `prompt_ex`'s prompt (its ids[:split]),
    the prompt cut from the left (its BOS head kept) until the row fits: the completion is
    always whole (it fitted after its own prompt, whose head is as long). None if it cannot."""
    p = prompt_ex["ids"][: prompt_ex["split"]]
    c = completion_ex["ids"][completion_ex["split"] :]
    ids = np.concatenate([p, c]).astype(np.int32)
    mask = np.concatenate([np.zeros(len(p), np.float32), completion_ex["mask"][completion_ex[
        "split"] :]]).astype(np.float32)  # fmt: skip
    ids, mask, cut = fit_length(ids, mask, len(p), seq_len + 1, prompt_ex["head"])
    return None if cut < 0 else (ids, mask)


class UnpairedBatches(_Batches):
    """One unpaired example per row: `tokens`, `targets`, `loss_mask`, `segment_ids`,
    `positions` (B, T), `label` (1 desirable, 0 undesirable), `valid` (B,); and per row its
    mismatched row for KTO's KL estimate, `kl_*` (B, T) — its completion after the prompt of
    row `kl_partners(...)[k]` of the same global batch — with `kl_valid` (B,) 1 where there
    is one. A final partial batch has `valid = 0` rows (evaluation)."""

    def blank(self, rows: int | None = None) -> dict[str, np.ndarray]:
        """A batch with no example (`valid` 0 everywhere)."""
        b, t = rows or self.batch, self.seq_len
        out = {**empty_rows(b, t, self.pad_id), **empty_rows(b, t, self.pad_id, "kl_")}
        for k in ("label", "valid", "kl_valid"):
            out[k] = np.zeros(b, np.float32)
        return {**out, "index": np.full(b, -1, np.int32)} if self.with_index else out

    def _build(self, n_rows: int) -> dict[str, np.ndarray]:
        out, b, t = self.blank(n_rows), n_rows, self.seq_len
        rows, index = [], np.full(b, -1, np.int32)
        while len(rows) < b and (i := self.order.peek()) is not None:
            index[len(rows)] = i
            rows.append(self.items[i])
            self.order.advance()
        if not rows:
            raise StopIteration
        partners = kl_partners([ex["ids"][: ex["split"]].tobytes() for ex in rows])
        for r, (ex, j) in enumerate(zip(rows, partners)):
            place(out, r, 0, 1, ex["ids"], ex["mask"])
            out["label"][r], out["valid"][r] = float(ex["label"]), 1.0
            kl = mismatched(rows[j], ex, t) if j >= 0 else None
            if kl is not None:
                place(out, r, 0, 1, *kl, prefix="kl_")
                out["kl_valid"][r] = 1.0
        return {**out, "index": index} if self.with_index else out
