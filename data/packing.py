"""Packing token documents into fixed rows: `PackedBatchIterator`, exact to resume.

The pretraining stream's last stage (data/pipeline.py builds what feeds it): documents are cut
into rows of `seq_len` (input, target) pairs, one packed piece per segment id, positions
restarting in every piece, `pack_mode` "split" (rows filled) or "pad" (a document starts a fresh
row). Its state is the document iterator's state before the document being cut, plus how many of
that document's pairs are already placed, so `set_state` resumes on exactly the next pair; with
several processes the state goes through global positions (data/process_state.py). `PairCheck`
turns data with no (input, target) pair into a DataError instead of a stream that never yields.
With ``fingerprint`` (data/source_fingerprint.py) the state also records what each source held
(``"sources"``), and ``set_state`` refuses (or warns about) data that changed since.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence

import grain
import numpy as np

from flaxlm.data import process_state, source_fingerprint
from flaxlm.data import sources as S
from flaxlm.data.lookahead import Lookahead

STATE_VERSION = 1


class PairCheck:
    """Whether any document of the sources has the 2 tokens one (input, target) pair needs.

    One unshuffled pass over every process's documents (``framed``: (pattern, one epoch of that
    source, framed) pairs), stopping at the first such document; the answer is kept. The packer
    asks only when a process has found no pair for a while, so normal data costs nothing.
    ``local()``: the same for this process's first ``local_docs`` documents (``local``, its
    stream from the start: a pass's worth of its share, whatever position it resumed at).
    """

    def __init__(
        self,
        framed: Sequence[tuple[str, grain.MapDataset]],
        what: str = "data.sources",
        local: grain.MapDataset | None = None,
        local_docs: int = 0,
    ):
        self.names = f"{what} " + ", ".join(p or "<built-in>" for p, _ in framed)
        self._framed, self._any = framed, None
        self._local, self._local_docs, self._any_local = local, local_docs, None

    def __call__(self) -> bool:
        if self._any is None:
            self._any = any(len(ds[i]) >= 2 for _, ds in self._framed for i in range(len(ds)))
        return self._any

    def local(self) -> bool:
        if self._any_local is None:
            ds, n = self._local, self._local_docs
            if ds is None:  # no stream to look at: the sources' answer
                self._any_local = self()
            else:
                n = min(len(ds), n)
                self._any_local = self() and any(len(ds[i]) >= 2 for i in range(n))
        return self._any_local


class PackedBatchIterator(Lookahead):
    """Packs token documents into fixed rows and batches them; exact ``get_state``/``set_state``.

    The state is the document iterator's state *before* the document being cut was read, plus
    how many of its (input, target) pairs are already in earlier rows. ``finite``: whether the
    documents end (``num_epochs > 0``); ``prefetch(n)`` packs batches ahead (data/lookahead.py).
    ``pairs`` (a ``PairCheck``) turns data without a pair into a ``DataError``: asked after
    ``pass_docs`` documents in a row had none (else ``num_epochs=0`` read on forever), and when
    the first batch of a finite stream read from its start is empty (else the data "ended").
    An endless stream also fails when this process's own first ``pass_docs`` documents have
    none: whether other processes' have is no help to it (it read on forever).
    ``fingerprint`` (one record per source, data/source_fingerprint.py) goes into the state as
    ``"sources"``; ``set_state`` checks it against the saved one, per ``on_changed_sources``.
    """

    state_name = "pretrain"

    def __init__(
        self,
        docs,
        *,
        seq_len: int,
        batch: int,
        pad_id: int,
        mode: str = "split",
        process_index: int = 0,
        process_count: int = 1,
        finite: bool = False,
        pairs: PairCheck | None = None,
        pass_docs: int = 0,
        sources: int = 1,
        fingerprint: list[dict] | None = None,
        on_changed_sources: str = "error",
    ):
        if mode not in ("split", "pad"):
            raise ValueError(f"pack_mode must be split|pad, got {mode!r}")
        self._docs, self.seq_len, self.batch, self.pad_id, self.mode = (
            docs,
            seq_len,
            batch,
            pad_id,
            mode,
        )
        self.process_index, self.process_count = process_index, process_count
        self.finite = finite
        self.sources = sources  # mixed in the document stream (a resharded resume: set_state)
        self._carry: np.ndarray | None = None  # document being placed
        self._carry_state: dict | None = None  # doc iterator state before it was read
        self._offset = 0  # pairs of _carry already placed
        self._done = False
        self._pairs, self._pass_docs = pairs, pass_docs
        self._packed = False  # whether a row was filled: an empty batch then is the end
        self._resumed = False  # set_state: an empty first batch may then be the data's end
        self.fingerprint, self.on_changed_sources = fingerprint, on_changed_sources

    def _fetch(self) -> bool:
        state = self._docs.get_state()
        short = 0
        for doc in self._docs:
            if len(doc) >= 2:  # fewer than 2 tokens make no (input, target) pair
                self._carry, self._carry_state, self._offset = doc, state, 0
                return True
            short += 1
            if short == self._pass_docs and self._pairs is not None:
                # A finite stream ends (its first empty batch says why); an endless one would
                # be read forever, for want of a pair anywhere or in this process's share.
                if not self._pairs() or (not self.finite and not self._pairs.local()):
                    raise self._no_pairs_error()
            state = self._docs.get_state()
        self._done = True
        return False

    def _no_pairs_error(self) -> S.DataError:
        need = "the 2 tokens one (input, target) pair needs"
        if not self._pairs():
            return S.DataError(
                f"{self._pairs.names}: no document has {need}, so there is nothing to train on "
                "(one-token documents with data.add_bos and data.add_eos off?)"
            )
        return S.DataError(
            f"{self._pairs.names}: no document of process {self.process_index} of "
            f"{self.process_count} has {need}: too few such documents for "
            f"{self.process_count} processes"
        )

    def _row(self, out: dict, r: int) -> bool:
        """Fills row ``r`` of ``out``; False if no document was left to start it."""
        fill, seg = 0, 0
        while fill < self.seq_len:
            if self._carry is None and (self._done or not self._fetch()):
                break
            doc, off = self._carry, self._offset
            remaining = len(doc) - 1 - off
            space = self.seq_len - fill
            if remaining > space and self.mode == "pad" and fill > 0:
                break  # pad: start this document in the next row
            n = min(remaining, space)
            seg += 1
            sl = slice(fill, fill + n)
            out["tokens"][r, sl] = doc[off : off + n]
            out["targets"][r, sl] = doc[off + 1 : off + n + 1]
            out["segment_ids"][r, sl] = seg
            out["positions"][r, sl] = np.arange(n)
            fill += n
            if n == remaining:
                self._carry = None
            else:
                self._offset += n
        out["loss_mask"][r, :fill] = 1.0
        self._packed = self._packed or fill > 0
        return fill > 0

    def _next_batch(self) -> dict[str, np.ndarray]:
        b, t = self.batch, self.seq_len
        out = {
            "tokens": np.full((b, t), self.pad_id, np.int32),
            "targets": np.full((b, t), self.pad_id, np.int32),
            "loss_mask": np.zeros((b, t), np.float32),
            "segment_ids": np.zeros((b, t), np.int32),
            "positions": np.zeros((b, t), np.int32),
        }
        rows = 0
        while rows < b and self._row(out, rows):
            rows += 1
        if rows == 0:
            if self.finite and self._pairs is not None and not (self._packed or self._resumed):
                raise self._no_pairs_error()  # not the end of the data: it never began
            raise StopIteration  # end of the last epoch; a partial last batch keeps zero rows
        return out

    def get_state(self) -> dict:
        """Lookahead's state plus, with a fingerprint, what each source held (``"sources"``:
        the same on every process, so recorded once, beside the processes' positions)."""
        return source_fingerprint.with_records(super().get_state(), self.fingerprint)

    def set_state(self, state: dict) -> None:
        super().set_state(
            source_fingerprint.checked_state(
                state, self.fingerprint, self.on_changed_sources, self.state_name
            )
        )

    def _local_state(self) -> dict:
        """This process's position (``get_state`` gathers every process's; Lookahead)."""
        carrying = self._carry is not None
        docs_state = self._carry_state if carrying else self._docs.get_state()
        state = {
            "version": STATE_VERSION,
            "docs": docs_state,
            "carry": carrying,
            "offset": self._offset if carrying else 0,
        }
        if carrying:  # which document was being cut, for the resume to recognise it
            state["carry_doc"] = _doc_digest(self._carry)
        return state

    def _reshard(self, saved: list[dict], process_index: int, process_count: int):
        """This process's position from the states of a run with another process count
        (data/process_state.py): the document shards differ, so go through global positions.
        The document a process was cutting (``carry``) is read again whole."""
        for st in saved:
            if st.get("version") != STATE_VERSION:
                raise ValueError(f"data iterator state version {st.get('version')} unsupported")
        index = process_state.shard_index(
            [int(st["docs"]["next_index"]) for st in saved], process_index, process_count
        )
        local = {
            "version": STATE_VERSION,
            "docs": {**saved[0]["docs"], "next_index": index},
            "carry": False,
            "offset": 0,
        }
        if self.sources == 1:
            note = (
                "the document shards differ, so resuming from the first document some saved "
                "process had not finished; none is skipped, and the few the other processes "
                "had finished past it are trained again"
            )
        else:  # the saved index counts the mixed stream: each source's share is only near it
            note = (
                f"the document shards differ; the {self.sources} sources' documents are mixed "
                "per process, so resuming near the first mixed document some saved process had "
                "not finished: a few documents of each source will be repeated or skipped"
            )
        return local, note, False

    def _set_local_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')} unsupported")
        self._docs.set_state(state["docs"])
        self._carry, self._done, self._offset = None, False, 0
        self._resumed = True
        if state["carry"]:
            if not self._fetch():
                raise ValueError("data iterator state points past the end of the data")
            offset, saved = int(state["offset"]), state.get("carry_doc")
            if (
                saved is not None
                and saved != _doc_digest(self._carry)
                or (offset >= len(self._carry) - 1)
            ):
                # Another document stands where the saved one was being cut (a resume with a
                # changed seed, mixture, source or tokenizer: warned about as a new data
                # order). Its own start is read, not the saved document's offset into it: that
                # failed in numpy's broadcast when it was shorter, and skipped its beginning.
                logging.getLogger(__name__).warning(
                    "data: the document the checkpoint was cutting (%d of its pairs trained) is "
                    "not the one at that position now; starting that one from its beginning",
                    offset,
                )
                offset = 0
            self._offset = offset


def _doc_digest(doc) -> str:
    """A document's length and CRC-32 of its ids: which document a saved state was cutting."""
    ids = np.ascontiguousarray(doc)
    return f"{len(ids)}:{zlib.crc32(ids.tobytes()):08x}"
