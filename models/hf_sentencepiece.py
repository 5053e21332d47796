"""A SentencePiece model as an HF `tokenizer.json` that encodes text exactly as SentencePiece does.

The export of a run with a SentencePiece tokenizer (models/hf.py `export_run`) writes this file
beside `tokenizer.model`. Without it, transformers builds a Llama tokenizer from the bare model,
and transformers 5's has one fixed pipeline: Metaspace(prepend_scheme="first") leaves out
SentencePiece's dummy "▁" when the text already starts with a space (" x": ['▁x'], where the
model was trained on ['▁', '▁x']), and `legacy` no longer changes that. This file spells out
SentencePiece's own steps instead, read from the model proto:

  normalizer   the precompiled character map (none for "identity"), remove_extra_whitespaces
               (strip leading and trailing spaces, collapse runs), the dummy "▁" prepended to
               every non-empty segment (add_dummy_prefix), spaces escaped as "▁";
  model        BPE: merges ranked by the merged piece's score (SentencePiece merges the
               adjacent pair whose piece scores highest), only into NORMAL pieces; Unigram: the
               pieces' scores; byte fallback and fused unknowns as SentencePiece;
  decoder      "▁" back to spaces, byte pieces to bytes, one leading space dropped (the dummy);
  added tokens the CONTROL / UNKNOWN / USER_DEFINED pieces, matched whole before normalizing.

Segments are cut at added tokens before normalizing, so each segment gets its own "▁": the same
ids as SentencePiece encoding each segment alone (how flaxlm's chat template encodes a turn's
content after its role token). Text that spells an added token's string differs by design:
transformers reads it as that token, flaxlm's encode spells it out (data/tokenizer.py). A
Unigram model can differ in two corners: text spelling a byte piece's name ("<0x41>") with a
character the model has no piece for (tokenizers' Unigram matches the name, SentencePiece never
does), and a run of one character whose splits score exactly alike (SentencePiece adds float32
scores, tokenizers float64, and they break the tie differently). Models of type WORD or CHAR,
or with whitespace as a suffix, get no tokenizer.json (`tokenizer_json` returns None).

The proto is read with a small protobuf wire reader: sentencepiece's generated
`sentencepiece_model_pb2` needs a newer protobuf runtime than the one this venv pins.
"""

from __future__ import annotations

import json
import struct

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece.Type
UNIGRAM, BPE = 1, 2  # TrainerSpec.ModelType
SPACE = "▁"


def field_spans(buf: bytes):
    """(field number, value, end offset) of each field of a protobuf message: ints for varints,
    bytes for length-delimited fields, raw 4/8 bytes for fixed-width ones; the end offset is
    just past the field (models/hf_extend.py inserts pieces there). A message cut short is a
    ValueError (a slice past the end was silently shorter)."""
    i, n = 0, len(buf)

    def varint():
        nonlocal i
        shift = value = 0
        while True:
            if i >= n:
                raise ValueError("truncated varint")
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value

    while i < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire in (1, 2, 5):
            size = varint() if wire == 2 else 8 if wire == 1 else 4
            if i + size > n:
                raise ValueError(f"truncated field {field}")
            value, i = buf[i : i + size], i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {field})")
        yield field, value, i


def _fields(buf: bytes):
    """(field number, value) of each field of a protobuf message (``field_spans``)."""
    for field, value, _ in field_spans(buf):
        yield field, value


def parse_model(proto: bytes) -> dict:
    """The parts of a SentencePiece ModelProto the conversion needs, with the proto's defaults:
    pieces [(piece, score, type)], model_type, byte_fallback, treat_whitespace_as_suffix, and
    the normalizer's charsmap, add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces."""
    out = {"pieces": [], "model_type": UNIGRAM, "byte_fallback": False, "suffix": False,
           "charsmap": b"", "add_dummy_prefix": True, "remove_extra_whitespaces": True,
           "escape_whitespaces": True}  # fmt: skip
    for field, value in _fields(proto):
        if field == 1:  # pieces
            piece, score, kind = "", 0.0, NORMAL
            for f, v in _fields(value):
                if f == 1:
                    piece = v.decode("utf-8")
                elif f == 2:
                    score = struct.unpack("<f", v)[0]
                elif f == 3:
                    kind = v
            out["pieces"].append((piece, score, kind))
        elif field == 2:  # trainer_spec
            for f, v in _fields(value):
                if f == 3:
                    out["model_type"] = v
                elif f == 35:
                    out["byte_fallback"] = bool(v)
                elif f == 24:
                    out["suffix"] = bool(v)
        elif field == 3:  # normalizer_spec
            for f, v in _fields(value):
                if f == 2:
                    out["charsmap"] = bytes(v)
                elif f in (3, 4, 5):
                    key = ("add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces")
                    out[key[f - 3]] = bool(v)
    return out


def _bpe_merges(pieces) -> list[tuple[str, str]]:
    """Every split of a NORMAL piece into two mergeable pieces, best-scoring piece first:
    SentencePiece's BPE merges the adjacent pair whose concatenation is the highest-scoring
    piece (leftmost on ties), HF's BPE the pair of lowest rank (leftmost on ties)."""
    mergeable = {p for p, _, kind in pieces if kind in (NORMAL, USER_DEFINED)}
    ranked = []
    for i, (piece, score, kind) in enumerate(pieces):
        if kind != NORMAL:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in mergeable and right in mergeable:
                ranked.append((-score, i, k, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def tokenizer_json(proto: bytes, special: set[int], bos_id: int = -1) -> dict | None:
    """tokenizer.json (as a dict) for the SentencePiece model `proto`: the CONTROL and UNKNOWN
    pieces and ids `special` (e.g. chat tokens) are added as special tokens, the other
    USER_DEFINED pieces as plain added tokens; `bos_id` >= 0: the post-processor starts every
    encoding with it. None for a model it cannot express."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

    m = parse_model(proto)
    pieces = m["pieces"]
    if m["model_type"] not in (BPE, UNIGRAM) or m["suffix"]:
        return None
    unk = next((i for i, (_, _, kind) in enumerate(pieces) if kind == UNKNOWN), None)
    if m["model_type"] == BPE:
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        model = models.BPE(vocab=vocab, merges=_bpe_merges(pieces), fuse_unk=True,
                           byte_fallback=m["byte_fallback"],
                           unk_token=None if unk is None else pieces[unk][0])  # fmt: skip
    else:
        # SentencePiece never matches a byte (or unused) piece's name in text ("<0x41>");
        # tokenizers' Unigram would, at the byte piece's score 0, the best there is. Priced
        # below any spelling of the name in known characters instead. (Only the unknown
        # token's score follows the lowest score, and every segmentation of a text has the
        # same unknown tokens: nothing else can cover a character without a piece.)
        normal = [s for _, s, kind in pieces if kind == NORMAL]
        floor = 10 * min(normal, default=0.0) - 10
        vocab = [(p, floor if kind in (BYTE, UNUSED) else s) for p, s, kind in pieces]
        model = models.Unigram(vocab, unk, m["byte_fallback"])
    tok = Tokenizer(model)
    space = SPACE if m["escape_whitespaces"] else " "
    steps = [normalizers.Precompiled(m["charsmap"])] if m["charsmap"] else []
    if m["remove_extra_whitespaces"]:
        strip, collapse = Regex("^ +| +$"), Regex(" {2,}")
        steps += [normalizers.Replace(strip, ""), normalizers.Replace(collapse, " ")]
    if m["add_dummy_prefix"]:
        steps.append(normalizers.Prepend(space))  # (a no-op on an empty segment, as in SP)
    if m["escape_whitespaces"]:
        steps.append(normalizers.Replace(" ", SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        ([decoders.Replace(SPACE, " ")] if m["escape_whitespaces"] else [])
        + [decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if m["add_dummy_prefix"] else [])
    )
    kinds = [kind for _, _, kind in pieces]
    special = set(special) | {i for i, kind in enumerate(kinds) if kind in (CONTROL, UNKNOWN)}
    plain = [i for i, kind in enumerate(kinds) if kind == USER_DEFINED and i not in special]
    tok.add_tokens([AddedToken(pieces[i][0], normalized=False) for i in plain])
    tok.add_special_tokens([AddedToken(pieces[i][0], special=True, normalized=False)
                            for i in sorted(special)])  # fmt: skip
    if bos_id >= 0:
        bos = pieces[bos_id][0]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)],
        )  # fmt: skip
    return json.loads(tok.to_str())
