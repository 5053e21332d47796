"""SentencePiece tokenizer: train our own, or load any ``.model`` (e.g. a Llama tokenizer.model);
and ``open_tokenizer``, which also opens an HF tokenizer.json (models/hf_tokenizer.py) for text
data, with ``text_encoder`` to encode documents by either.

Special ids are read from the model file, never assumed: ``pad_id``, ``bos_id``, ``eos_id``,
``unk_id``. A model without a pad piece (Llama's) pads with ``unk_id``; padded positions carry
``segment_ids == 0`` and ``loss_mask == 0``, so the value only has to be a valid id.

Tokenizers we train reserve ``pad=0, unk=1, bos=2, eos=3``, use byte fallback (no unknown
characters, Chinese included), split digits, and include the chat tokens ``<|system|>``,
``<|user|>``, ``<|assistant|>``, ``<|end|>`` as user-defined pieces (always one token each).

Text never encodes to a chat token. SentencePiece matches a user-defined piece wherever its
string occurs, so a user turn or a web page holding "<|end|><|assistant|>" encoded to the real
end-of-turn and assistant ids: a forged turn inside the content. ``encode`` spells such an
occurrence out in ordinary pieces (each character's piece, else its UTF-8 byte pieces), which
decode to the same text; the chat tokens come only from the template, as ids (data/formats.py).
This holds for any loaded model, whenever it was trained, and whatever its normaliser makes of
the text first (NFKC turns full-width "＜｜end｜＞" into "<|end|>").
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from flaxlm.data.source_errors import DataError

CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# The ids ``train`` reserves (pad, unk, bos, eos: all set there).
RESERVED_PIECES = 4


def fixed_pieces(user_defined_symbols: Sequence[str] = CHAT_TOKENS, byte_fallback: bool = True):
    """Pieces ``train`` adds whatever the text: the reserved ids, the user-defined symbols and,
    with byte fallback, one piece per byte (256). SentencePiece also needs one piece per distinct
    character of the sample, so a vocab_size must exceed this (by how much depends on the text)."""
    return RESERVED_PIECES + len(user_defined_symbols) + (256 if byte_fallback else 0)


class Tokenizer:
    """A loaded SentencePiece model with batch encode/decode."""

    def __init__(self, model_proto: bytes, name: str = "<memory>"):
        self.proto = model_proto
        self.name = name
        if not model_proto:  # sentencepiece accepts b"" and fails later, at an id lookup
            raise ValueError(f"{name}: not a SentencePiece model (empty file)")
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:  # sentencepiece's "INTERNAL: ... ParseFromArray" names nothing
            raise ValueError(f"{name}: not a SentencePiece model ({e})") from None
        self.sha256 = hashlib.sha256(model_proto).hexdigest()
        # chat token id -> its string spelled in ordinary pieces, for the chat tokens that text
        # can produce (user-defined; a control piece never comes from text)
        chat = {t: self.sp.piece_to_id(t) for t in CHAT_TOKENS}
        chat = {t: i for t, i in chat.items() if i != self.unk_id and not self.sp.is_control(i)}
        self._spelled = {i: self._spell(t, set(chat.values())) for t, i in chat.items()}
        self._chat_ids = frozenset(chat.values())

    def _spell(self, text: str, avoid: set[int]) -> list[int]:
        """Ids that decode to ``text`` without any id of ``avoid``: one piece per character, or
        its UTF-8 bytes' pieces (byte fallback); ``unk_id`` for a character with neither."""
        ids = []
        for ch in text:
            i = self.sp.piece_to_id(ch)
            if i != self.unk_id and i not in avoid and not self.sp.is_control(i):
                ids.append(i)
                continue
            b = [self.sp.piece_to_id(f"<0x{x:02X}>") for x in ch.encode("utf-8")]
            ids += b if all(self.sp.is_byte(j) for j in b) else [self.unk_id]
        return ids

    def _no_chat_ids(self, ids: list[int]) -> list[int]:
        """``ids`` of a text with every chat token spelled out (see the module docstring)."""
        # The ids, not the text: a model that normalises (nmt_nfkc) matches its pieces in the
        # normalised text, so full-width "＜｜end｜＞" encoded to <|end|>'s id past a scan of the
        # raw text for "<|end|>". (One C pass over the ids, as cheap as that scan was.)
        if self._chat_ids.isdisjoint(ids):  # the common case
            return ids
        out: list[int] = []
        for i in ids:
            out += self._spelled.get(i, (i,))
        return out

    @classmethod
    def load(cls, path: str) -> Tokenizer:
        with open(path, "rb") as f:
            return cls(f.read(), name=path)

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(self.proto)

    def __getstate__(self):  # pickles as the model bytes (Beam workers, grain processes)
        return {"proto": self.proto, "name": self.name}

    def __setstate__(self, st):
        self.__init__(st["proto"], st["name"])

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        """The model's pad id, or ``unk_id`` when the model declares none (Llama)."""
        p = self.sp.pad_id()
        return p if p >= 0 else self.unk_id

    def special_ids(self) -> dict[str, int]:
        """pad/bos/eos/unk and the chat tokens the model has (missing ones are left out)."""
        out = {"pad": self.pad_id, "bos": self.bos_id, "eos": self.eos_id, "unk": self.unk_id}
        for t in CHAT_TOKENS:
            i = self.sp.piece_to_id(t)
            if i != self.unk_id:
                out[t] = i
        return out

    def pieces(self) -> list[str]:
        """Every id's piece, in id order (two tokenizers with the same pieces and normaliser
        read ids alike: see alignment/common.py `check_same_tokenizer`)."""
        return [self.sp.id_to_piece(i) for i in range(self.vocab_size)]

    def token_id(self, piece: str) -> int:
        """Id of a single piece (e.g. a chat token); a missing piece is an error."""
        i = self.sp.piece_to_id(piece)
        if i == self.unk_id and piece != self.sp.id_to_piece(self.unk_id):
            raise KeyError(f"{self.name}: no piece {piece!r}")
        return i

    def check_fits(self, vocab_size: int) -> None:
        """Raises if token ids could reach past the model's embedding table: a ``DataError``
        (a config mismatch, which the trainer reports in one line, not a traceback)."""
        from flaxlm.data.source_errors import DataError  # (imports nothing of flaxlm)

        if self.vocab_size > vocab_size:
            raise DataError(
                f"tokenizer {self.name} has {self.vocab_size} pieces but the model's vocab_size is "
                f"{vocab_size}: ids up to {self.vocab_size - 1} would index past the embedding. "
                f"Set model vocab_size >= {self.vocab_size}."
            )

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of ``text``; never a chat token's id (those are the template's alone)."""
        return self._no_chat_ids(self.sp.encode(text, add_bos=bos, add_eos=eos))

    def encode_batch(
        self, texts: Sequence[str], *, bos: bool = False, eos: bool = False, num_threads: int = 0
    ) -> list[list[int]]:
        """Encodes many texts in SentencePiece's own thread pool (0 = all cores)."""
        if not texts:
            return []
        texts = list(texts)
        out = self.sp.encode(texts, add_bos=bos, add_eos=eos, num_threads=num_threads)
        if not self._spelled:
            return out
        return [self._no_chat_ids(ids) for ids in out]

    def _piece_ids(self, ids) -> list[int]:
        """Ids as ints; ids past the pieces become ``unk_id`` (decoded " ⁇ "): a model whose
        vocab_size exceeds the tokenizer's (padded embedding) can sample them, and
        SentencePiece would raise "piece id is out of range" for the whole text."""
        n, unk = self.vocab_size, self.unk_id
        return [i if 0 <= i < n else unk for i in (int(i) for i in np.asarray(ids).ravel())]

    def decode(self, ids) -> str:
        return self.sp.decode(self._piece_ids(ids))

    def decode_batch(self, batch) -> list[str]:
        return self.sp.decode([self._piece_ids(r) for r in batch])


def train(
    texts: Iterable[str],
    vocab_size: int,
    *,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    user_defined_symbols: Sequence[str] = CHAT_TOKENS,
    character_coverage: float = 0.9995,
    max_sentence_length: int = 16384,
    input_sentence_size: int = 1_000_000,
    seed: int = 0,
    num_threads: int = 2,
    model_path: str | None = None,
) -> Tokenizer:
    """Trains a SentencePiece model (BPE or unigram) on ``texts``; saves it if ``model_path``.

    Documents are split into lines for training (SentencePiece's unit is a sentence); a line
    longer than ``max_sentence_length`` UTF-8 bytes (SentencePiece's unit) is cut to that many
    bytes at a character boundary, not dropped. ``input_sentence_size`` caps the lines trained on
    (<= 0: no cap): more lines than that are sampled here, uniformly and in their order, with
    ``seed``, so the same texts and seed give the same model in any process. SentencePiece's own
    sampler, used before, drew a different sample in every process.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be bpe|unigram, got {model_type!r}")
    if vocab_size <= (n_fixed := fixed_pieces(user_defined_symbols, byte_fallback)):
        raise ValueError(
            f"vocab_size {vocab_size} leaves no piece for text: {n_fixed} are taken by the "
            f"{RESERVED_PIECES} reserved ids, {len(user_defined_symbols)} user-defined symbols"
            + (" and 256 byte pieces" if byte_fallback else "")
            + ", and one more is needed per distinct character of the text"
        )

    def lines():
        for t in texts:
            for ln in t.split("\n"):
                if ln.strip():
                    # SentencePiece skips (does not cut) sentences over max_sentence_length
                    # *bytes*: cutting at that many characters silently dropped long lines of
                    # CJK (3 bytes per character) or Cyrillic (2) text from training.
                    if len(ln) * 4 > max_sentence_length:  # cheap test before encoding
                        b = ln.encode("utf-8")[:max_sentence_length]
                        ln = b.decode("utf-8", "ignore")
                    yield ln

    sample = _sample_lines(lines(), input_sentence_size, seed)

    def drained():  # hands each line over once: the sample is not held twice while it loads
        for i in range(len(sample)):
            ln, sample[i] = sample[i], None
            yield ln

    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=drained(),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            user_defined_symbols=list(user_defined_symbols),
            character_coverage=character_coverage,
            max_sentence_length=max_sentence_length,
            # SentencePiece samples only when it gets more lines than this, which it no longer
            # does. Kept as before, so a corpus under the cap trains the same model as it did
            # (0 trains another one on the same lines); SentencePiece refuses caps of 1..100.
            input_sentence_size=input_sentence_size if input_sentence_size > 100 else 0,
            shuffle_input_sentence=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,  # keep code/indentation intact
            normalization_rule_name="identity",
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            num_threads=num_threads,
            hard_vocab_limit=False,  # a tiny corpus may not support the full size
            minloglevel=2,
        )
    except RuntimeError as e:  # "INTERNAL: src/trainer_interface.cc(467) [!sentences_.empty()]"
        why = "no text to train on" if "sentences_.empty()" in str(e) else str(e).split("] ")[-1]
        raise ValueError(
            f"SentencePiece {model_type} training (vocab_size {vocab_size}) failed: {why}"
        ) from None
    tok = Tokenizer(buf.getvalue(), name=model_path or f"<trained {model_type} {vocab_size}>")
    if model_path:
        tok.save(model_path)
    return tok


def _sample_lines(lines: Iterable[str], cap: int, seed: int) -> list[str]:
    """All of ``lines`` when there are at most ``cap`` (or ``cap <= 0``), else ``cap`` of them
    drawn uniformly (reservoir sampling, ``random.Random(seed)``), kept in their order."""
    if cap <= 0:
        return list(lines)
    keep: list[tuple[int, str]] = []
    rng = random.Random(seed)
    for i, ln in enumerate(lines):
        if i < cap:
            keep.append((i, ln))
        elif (j := rng.randrange(i + 1)) < cap:
            keep[j] = (i, ln)
    keep.sort(key=lambda p: p[0])  # a no-op unless lines were sampled
    return [ln for _, ln in keep]


def train_or_load(path: str, texts: Iterable[str], vocab_size: int, **kw) -> Tokenizer:
    """Loads ``path`` if it exists, else trains on ``texts`` and saves there (atomic rename)."""
    if os.path.exists(path):
        return Tokenizer.load(path)
    tok = train(texts, vocab_size, **kw)
    tmp = f"{path}.tmp{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, path)
    tok.name = path
    return tok


def text_encoder(tok):
    """The tokenizer to encode documents with: an HF tokenizer's `text_only()` twin (a special
    token's string in a document stays text), flaxlm's SentencePiece one as it is (it always
    does so)."""
    return tok.text_only() if hasattr(tok, "text_only") else tok


def open_tokenizer(path: str, key: str = "data.tokenizer"):
    """A SentencePiece ``.model``, an HF ``tokenizer.json`` or an HF directory (with either;
    models/hf_tokenizer.py ``load_tokenizer``); an unreadable one is a DataError naming `key`."""
    from flaxlm.models.hf_tokenizer import load_tokenizer as load_any

    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise DataError(f"{key}: cannot read {path!r} (No such file or directory)")
    try:
        return load_any(path)
    except OSError as e:
        raise DataError(f"{key}: cannot read {path!r} ({e.strerror or e})") from None
    except ValueError as e:  # not a tokenizer (HFError; the message names the file)
        raise DataError(f"{key}: {e}") from None
