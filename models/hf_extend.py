"""Vocabulary extension of an HF checkpoint: new tokens in its tokenizer, grown embeddings.

    python -m flaxlm.models.hf extend-vocab SRC OUT --tokens '<tool_call>,</tool_call>'
        [--special] [--tokens_file FILE] [--pad_to_multiple_of 64] [--init mean|mean_noise]
        [--seed 0] [--overwrite]

What transformers users do with `tokenizer.add_tokens` + `model.resize_token_embeddings`:
continued pretraining of an open checkpoint on a new language (its frequent words as tokens),
or fine-tuning a base model with tokens it lacks (tool-call markers, ChatML's
<|im_start|>/<|im_end|>). OUT is a new HF checkpoint directory that every stage starts from with
`init_from=hf:OUT`. SRC is an HF checkpoint directory or a flaxlm run (exported first, by
models/hf.py `export_run`, into a temporary directory beside OUT).

Tokenizer. tokenizer.json: each new token is appended to its `added_tokens` (special with
--special, else a normal added token; `normalized: false`, so it is matched in the raw text as
written), with the ids after the largest there is, and tokenizer_config.json's
`added_tokens_decoder` (and, with --special, `additional_special_tokens`) lists it where the file
keeps that key. The JSON is edited rather than re-serialised by the `tokenizers` package, whose
newer format older readers cannot load; the result is loaded back and checked. tokenizer.model
(SentencePiece): each token is a USER_DEFINED piece (always one token wherever its text occurs)
appended to the model proto; the proto is written with a few lines of protobuf encoding because
sentencepiece's generated `sentencepiece_model_pb2` needs a newer protobuf runtime than this venv
pins (as models/hf_sentencepiece.py reads it). With --special a piece stays USER_DEFINED (a
CONTROL piece never comes out of `encode`); the tokenizer.json a flaxlm export generated from the
model (tokenizer_config.json `flaxlm_sentencepiece`) is generated again, the new pieces special
there. An HF directory with both files (Llama 2's) gets the token in both when their ids agree;
else tokenizer.model is copied as it was, with a warning (transformers' fast tokenizer reads
tokenizer.json only). A token already in the vocabulary is reported and not added again; an
empty or whitespace-only token is an error naming it, and so is a SentencePiece token holding
whitespace (the model matches pieces after turning spaces into "▁": it would never match). Note
that text data never produces a *special* token of a tokenizer.json (pretraining encodes documents
with `text_only()`): special tokens are a chat template's; normal ones come from text.

Weights. Only the tensors that change are read and written: the input embedding and an untied
output matrix (`lm_head.weight`), each in the shard that holds it; the other shards are copied
byte for byte, so dtype, names and layout stay the source's. `vocab_size` grows to cover the new
ids (rounded up to --pad_to_multiple_of; never shrunk). A checkpoint whose vocab_size already
exceeds its tokenizer (padding rows, never trained) places the new ids inside that padding. The
rows of the new ids, and the rows the growth adds, are initialised; the checkpoint's other rows
are kept, so the logits of the old tokens do not change (a new column can only add mass to the
softmax). `mean` (default): the mean of the real tokens' rows (ids below the tokenizer's old
size), of each matrix — a new input row is an average token, and a new output row gives each new
token about the average logit, so the distribution over the old tokens barely moves (Hewitt 2021,
"Initializing new word embeddings for pretrained language models": the change in their
probability is bounded by the new logits' size against the old partition function, smallest at
the mean). `mean_noise`: that mean plus Gaussian noise whose covariance is the rows' covariance
scaled by 1e-5 (Hewitt's recipe), which sets the new rows apart from each other; seeded by --seed.
Tied embeddings: one matrix. config.json's vocab_size (a multimodal checkpoint's text_config's)
changes; generation_config.json, special_tokens_map.json, chat templates, README and the other
small files are copied as they are. Other weight formats beside the safetensors (a
pytorch_model.bin, a consolidated original/) would hold the old vocabulary: not copied, named.

OUT is written into a temporary sibling directory and renamed into place (models/hf.py
`atomic_directory`), so it is never half-written; an existing non-empty OUT needs --overwrite.
Bad input (SRC missing or no checkpoint, no tokenizer, a token list that adds nothing) raises
`HFError` naming the file or the token.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import struct
import tempfile

import numpy as np

from flaxlm.models.hf_arch import MULTIMODAL, load_hf_json
from flaxlm.models.hf_config import load_config
from flaxlm.models.hf_tokenizer import (
    _NAMED_TEMPLATES_DIR,
    HFError,
    _check_inside,
    load_tokenizer,
    tokenizer_file,
)
from flaxlm.models.hf_weights import _shard_files

log = logging.getLogger("flaxlm")

INITS = ("mean", "mean_noise")
NOISE_SCALE = 1e-5  # mean_noise: the new rows' covariance, as a fraction of the old rows'
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5",
                    ".onnx", ".index.json")  # fmt: skip
_USER_DEFINED = 4  # SentencePiece ModelProto.SentencePiece.Type


@dataclasses.dataclass
class Extension:
    """What `extend_vocab` did: the tokens added (token -> new id), those already there (token ->
    their id), the tokenizer's id range and the model's vocab_size before and after, and the
    embedding rows it initialised."""

    src: str
    out: str
    added: dict[str, int]
    present: dict[str, int]
    special: bool
    tokenizer_size: tuple[int, int]
    vocab_size: tuple[int, int]
    initialised: list[int]
    init: str

    def summary(self) -> str:
        kind = "special " if self.special else ""
        lines = [f"extend-vocab: {self.src} -> {self.out}",
                 f"  added {len(self.added)} {kind}token(s): "
                 + ", ".join(f"{t!r} = {i}" for t, i in self.added.items())]  # fmt: skip
        if self.present:
            lines.append("  already in the vocabulary (not added): "
                         + ", ".join(f"{t!r} = {i}" for t, i in self.present.items()))  # fmt: skip
        (t0, t1), (v0, v1) = self.tokenizer_size, self.vocab_size
        lines.append(f"  tokenizer: {t0} -> {t1} ids; vocab_size: {v0} -> {v1}")
        lines.append(f"  rows initialised ({self.init}): {_ranges(self.initialised)}")
        return "\n".join(lines)


def _ranges(ids: list[int]) -> str:
    """1, 2, 3, 7 -> "1..3, 7"."""
    out, start = [], None
    for k, i in enumerate(ids):
        if start is None:
            start = i
        if k + 1 == len(ids) or ids[k + 1] != i + 1:
            out.append(str(i) if i == start else f"{start}..{i}")
            start = None
    return ", ".join(out) or "none"


# ----------------------------------------------------------------------------------------------
# Tokens


def cli_tokens(tokens: str | None, tokens_file: str | None) -> list[str]:
    """The tokens of the command line: `--tokens` split at commas, each stripped of the spaces
    around it ('<a>, <b>'), then `--tokens_file`'s lines, one token each, as written (a token may
    start with a space); empty lines there are skipped, a line of whitespace is an error naming
    it. An empty --tokens item is an error naming its position."""
    out = []
    if tokens:
        for k, t in enumerate(tokens.split(","), 1):
            if not t.strip():
                raise HFError(f"extend-vocab: token {k} of --tokens {tokens!r} is empty")
            out.append(t.strip())
    if tokens_file:
        try:
            with open(tokens_file, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise HFError(f"extend-vocab: cannot read --tokens_file {tokens_file}: {e}") from None
        for k, line in enumerate(lines, 1):
            line = line.removesuffix("\r")
            if line and not line.strip():
                raise HFError(f"extend-vocab: {tokens_file}:{k}: token {line!r} is whitespace "
                              "only")  # fmt: skip
            if line:
                out.append(line)
    if not out:
        raise HFError("extend-vocab: no tokens given (--tokens or --tokens_file)")
    return out


def _checked_tokens(tokens) -> list[str]:
    """`tokens` in order, each once; an empty or whitespace-only one (or no string) is an
    error naming it."""
    if isinstance(tokens, str):
        raise HFError(f"extend-vocab: tokens must be a list of strings, got the string {tokens!r}")
    out = []
    for k, t in enumerate(tokens, 1):
        if not isinstance(t, str):
            raise HFError(f"extend-vocab: token {k} ({t!r}) is not a string")
        if not t.strip():
            what = "empty" if not t else f"whitespace only ({t!r})"
            raise HFError(f"extend-vocab: token {k} is {what}")
        if t in out:
            log.warning("extend-vocab: token %r is given twice; added once", t)
            continue
        out.append(t)
    if not out:
        raise HFError("extend-vocab: no tokens given")
    return out


def _known_id(tok, token: str) -> int | None:
    """The id of `token` in the loaded tokenizer, None when it has none."""
    try:
        return tok.token_id(token)
    except KeyError:
        return None


# ----------------------------------------------------------------------------------------------
# Tokenizer files


def _tokenizer_json_added(path: str, ids: dict[str, int], special: bool) -> str:
    """The text of tokenizer.json `path` with `ids` (token -> id) appended to its added tokens,
    checked by loading it: each token has its id and encodes to it alone."""
    from tokenizers import Tokenizer as RawTokenizer

    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise HFError(f"{path}: cannot read tokenizer: {e}") from None
    added = obj.get("added_tokens") or [] if isinstance(obj, dict) else None
    if not isinstance(added, list):
        raise HFError(f"{path}: 'added_tokens' is not a list")
    for t, i in ids.items():
        added.append({"id": i, "content": t, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": special})  # fmt: skip
    obj["added_tokens"] = added
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    try:
        raw = RawTokenizer.from_str(text)
    except Exception as e:
        raise HFError(f"{path}: the tokenizer with the new tokens does not load: {e}") from e
    for t, i in ids.items():
        got = raw.token_to_id(t), raw.encode(t, add_special_tokens=False).ids
        if got != (i, [i]):
            raise HFError(f"{path}: token {t!r} was given id {i} but the tokenizer reads it as "
                          f"id {got[0]} and encodes it as {got[1]}")  # fmt: skip
    return text


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _after_last_piece(proto: bytes) -> int:
    """The offset just past the last `pieces` field (1) of a SentencePiece ModelProto (0 when
    there is none): where new pieces go, after the others."""
    from flaxlm.models.hf_sentencepiece import field_spans

    end = 0
    for field, _, stop in field_spans(proto):
        if field == 1:
            end = stop
    return end


def _sentencepiece_added(path: str, proto: bytes, tokens: list[str]) -> bytes:
    """SentencePiece model `proto` with `tokens` appended as USER_DEFINED pieces (score 0, as
    SentencePiece's trainer gives them), checked by loading it."""
    import sentencepiece as spm

    pieces = b""
    for t in tokens:
        text = t.encode("utf-8")
        msg = (b"\x0a" + _varint(len(text)) + text  # piece
               + b"\x15" + struct.pack("<f", 0.0)  # score
               + b"\x18" + _varint(_USER_DEFINED))  # type  # fmt: skip
        pieces += b"\x0a" + _varint(len(msg)) + msg
    try:
        at = _after_last_piece(proto)
    except (ValueError, IndexError) as e:
        raise HFError(f"{path}: not a SentencePiece model ({e})") from None
    out = proto[:at] + pieces + proto[at:]
    try:
        sp = spm.SentencePieceProcessor(model_proto=out)
    except RuntimeError as e:
        raise HFError(f"{path}: the model with the new pieces does not load: {e}") from None
    n = sp.get_piece_size() - len(tokens)
    for k, t in enumerate(tokens):
        ids = sp.encode(t)
        rest = [sp.id_to_piece(j) for j in ids if j != n + k]
        if sp.piece_to_id(t) != n + k or ids.count(n + k) != 1 or any(set(p) - {"▁"} for p in rest):
            raise HFError(f"{path}: the new piece {t!r} (id {n + k}) does not encode as itself "
                          f"(its text encodes to {[sp.id_to_piece(j) for j in ids]}: the model's "
                          "normaliser changes it?)")  # fmt: skip
    return out


def _settings_with(path: str, ids: dict[str, int], special: bool) -> dict | None:
    """tokenizer_config.json / special_tokens_map.json `path` with the new tokens where the file
    lists added tokens: `added_tokens_decoder` (id -> token) and, for special tokens,
    `additional_special_tokens`. None when the file has neither (copied as it is)."""
    if not os.path.exists(path):
        return None
    obj = load_hf_json(os.path.dirname(path), os.path.basename(path))
    changed = False
    decoder = obj.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for t, i in ids.items():
            decoder[str(i)] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                               "single_word": False, "special": special}  # fmt: skip
        changed = True
    extra = obj.get("additional_special_tokens")
    if special and isinstance(extra, list):
        obj["additional_special_tokens"] = extra + list(ids)
        changed = True
    return obj if changed else None


def _regenerated_tokenizer_json(proto: bytes, name: str, new_ids: list[int], special: bool):
    """A flaxlm export's tokenizer.json (models/hf_tokenizer.py `sentencepiece_hf_files`),
    generated again from the extended model `proto`."""
    from flaxlm.data.tokenizer import Tokenizer
    from flaxlm.models.hf_sentencepiece import tokenizer_json

    tok = Tokenizer(proto, name=name)
    specials = {i for i in tok.special_ids().values() if i >= 0}
    return tokenizer_json(proto, specials | (set(new_ids) if special else set()), tok.bos_id)


def _tokenizer_files(src: str, primary: str, old_size: int, ids: dict[str, int],
                     special: bool) -> dict[str, bytes]:  # fmt: skip
    """The tokenizer files of OUT that differ from SRC's (name -> content)."""
    out: dict[str, bytes] = {}
    tokens, new_ids = list(ids), list(ids.values())
    model = os.path.join(src, "tokenizer.model")
    json_file = os.path.join(src, "tokenizer.json")
    if primary.endswith(".model"):
        with open(primary, "rb") as f:
            proto = _sentencepiece_added(primary, f.read(), tokens)
        out["tokenizer.model"] = proto
        # a tokenizer.json beside the model flaxlm reads is one a flaxlm export generated from
        # it (`tokenizer_file`: tokenizer_config.json's SENTENCEPIECE_KEY), generated again
        if os.path.exists(json_file):
            fast = _regenerated_tokenizer_json(proto, primary, new_ids, special)
            if fast is not None:
                out["tokenizer.json"] = json.dumps(fast, indent=2, ensure_ascii=False).encode()
    else:
        out["tokenizer.json"] = _tokenizer_json_added(primary, ids, special).encode()
        if os.path.exists(model):  # (Llama 2's: the slow tokenizer's model, beside the fast one)
            with open(model, "rb") as f:
                proto = f.read()
            try:
                import sentencepiece as spm

                pieces = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
            except RuntimeError:
                pieces = -1
            if pieces == old_size:
                out["tokenizer.model"] = _sentencepiece_added(model, proto, tokens)
            else:
                log.warning("extend-vocab: %s (%d pieces) does not number its ids as %s (%d): "
                            "copied without the new tokens (transformers' fast tokenizer reads "
                            "tokenizer.json)", model, pieces, primary, old_size)  # fmt: skip
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        obj = _settings_with(os.path.join(src, name), ids, special)
        if obj is not None:
            out[name] = json.dumps(obj, indent=2, ensure_ascii=False).encode()
    return out


# ----------------------------------------------------------------------------------------------
# Embedding rows


def grown_matrix(w: np.ndarray, n_real: int, vocab_size: int, fresh: list[int], init: str,
                 rng: np.random.Generator | None = None) -> np.ndarray:  # fmt: skip
    """`w` (V, D) grown to `vocab_size` rows, its rows `fresh` (new ids, grown padding) set to
    the mean of rows [0, n_real) (`init="mean"`), or that mean plus Gaussian noise with their
    covariance times NOISE_SCALE (`"mean_noise"`, drawn from `rng`); every other row kept. The
    dtype stays `w`'s; the mean and noise are computed in float64/float32."""
    if init not in INITS:
        raise HFError(f"extend-vocab: init {init!r} is not one of {INITS}")
    V, D = w.shape
    out = np.empty((vocab_size, D), w.dtype)
    out[:V] = w
    mean = np.mean(w[:n_real], axis=0, dtype=np.float64)
    rows = np.broadcast_to(mean, (len(fresh), D))
    if init == "mean_noise" and fresh:
        rows = rows + _noise(w[:n_real], mean, len(fresh), rng or np.random.default_rng(0))
    out[fresh] = rows.astype(w.dtype)
    return out


def _noise(rows: np.ndarray, mean: np.ndarray, k: int, rng, chunk: int = 8192) -> np.ndarray:
    """`k` draws of N(0, NOISE_SCALE * C), C the covariance of `rows` (n, D) about `mean`:
    g (k, n) standard normal times (rows - mean) / sqrt(n) has exactly that covariance, with no
    D x D matrix to factor (C is singular when n < D). Over row chunks, to bound memory."""
    n, D = rows.shape
    out = np.zeros((k, D), np.float64)
    center = mean.astype(np.float32)
    for s in range(0, n, chunk):
        block = rows[s : s + chunk].astype(np.float32) - center
        g = rng.standard_normal((k, len(block)), dtype=np.float32)
        out += g @ block
    return out * math.sqrt(NOISE_SCALE / n)


# ----------------------------------------------------------------------------------------------
# The checkpoint


def _check_apart(src: str, out: str) -> None:
    a, b = os.path.realpath(src), os.path.realpath(out)
    common = os.path.commonpath([a, b])
    if common in (a, b):
        where = "is" if a == b else "holds" if common == b else "is inside"
        raise HFError(f"extend-vocab: OUT {out} {where} SRC {src}; write a new directory "
                      "elsewhere")  # fmt: skip


def _is_run(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints")) and not os.path.exists(
        os.path.join(path, "config.json"))  # fmt: skip


def extend_vocab(src: str, out: str, tokens, *, special: bool = False,
                 pad_to_multiple_of: int = 0, init: str = "mean", seed: int = 0,
                 overwrite: bool = False) -> Extension:  # fmt: skip
    """Writes OUT: HF checkpoint SRC (or a flaxlm run, exported first) with `tokens` added to
    its tokenizer and its embeddings grown to match (see the module docstring). Returns what
    it did (`Extension.summary()` says it)."""
    if init not in INITS:
        raise HFError(f"extend-vocab: init {init!r} is not one of {INITS}")
    if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or (
            pad_to_multiple_of < 0):  # fmt: skip
        raise HFError(f"extend-vocab: pad_to_multiple_of={pad_to_multiple_of!r} is not a whole "
                      "number >= 0")  # fmt: skip
    tokens = _checked_tokens(tokens)
    if not os.path.exists(src):
        raise HFError(f"extend-vocab: SRC {src} does not exist")
    if not os.path.isdir(src):
        raise HFError(f"extend-vocab: SRC {src} is not a directory (an HF checkpoint directory "
                      "or a flaxlm run)")  # fmt: skip
    _check_apart(src, out)
    out_abs = os.path.abspath(out)
    if os.path.exists(out_abs) and (not os.path.isdir(out_abs) or os.listdir(out_abs)) and (
            not overwrite):  # fmt: skip
        raise HFError(f"extend-vocab: OUT {out} exists and is not empty (pass --overwrite to "
                      "replace it)")  # fmt: skip
    kw = dict(special=special, multiple=pad_to_multiple_of, init=init, seed=seed,
              overwrite=overwrite)  # fmt: skip
    if not _is_run(src):
        return _extend(src, out, tokens, shown=src, **kw)
    from flaxlm.models.hf import export_run  # (models/hf.py imports this module in its CLI)

    parent = os.path.dirname(out_abs)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_abs)}.run-export-", dir=parent)
    try:
        export_run(src, os.path.join(tmp, "hf"))
        return _extend(os.path.join(tmp, "hf"), out, tokens, shown=src, **kw)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extend(src, out, tokens, *, shown, special, multiple, init, seed, overwrite) -> Extension:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from flaxlm.models.hf import atomic_directory

    cfg = load_config(src)  # (no config.json: "not an HF checkpoint directory")
    config = load_hf_json(src)
    primary = tokenizer_file(src)
    if primary is None:
        raise HFError(f"extend-vocab: {shown}: no tokenizer.json or tokenizer.model to add "
                      "tokens to")  # fmt: skip
    tok = load_tokenizer(primary, cfg.vocab_size)
    n_tok, V = tok.vocab_size, cfg.vocab_size
    present = {t: i for t in tokens if (i := _known_id(tok, t)) is not None}
    new = [t for t in tokens if t not in present]
    if not new:
        raise HFError(f"extend-vocab: every token given is already in {primary}: "
                      + ", ".join(f"{t!r} = {i}" for t, i in present.items()))  # fmt: skip
    if primary.endswith(".model"):
        spaced = [t for t in new if any(c.isspace() for c in t)]
        if spaced:
            raise HFError(f"extend-vocab: {primary} is a SentencePiece model, which matches "
                          "pieces after turning spaces into '▁': token(s) "
                          f"{spaced} hold whitespace and would never be produced")  # fmt: skip
    ids = {t: n_tok + k for k, t in enumerate(new)}
    need = n_tok + len(new)
    V_new = max(V, -(-need // multiple) * multiple if multiple > 1 else need)
    fresh = sorted(set(ids.values()) | set(range(V, V_new)))
    tok_files = _tokenizer_files(src, primary, n_tok, ids, special)

    arch = config.get("model_type")
    prefix = MULTIMODAL[arch][1] if arch in MULTIMODAL else ""
    shards = _shard_files(src)
    index = None
    if shards != ["model.safetensors"]:
        index = load_hf_json(src, "model.safetensors.index.json")
        where = index["weight_map"]
    else:
        with safe_open(os.path.join(src, shards[0]), framework="numpy") as f:
            where = dict.fromkeys(f.keys(), shards[0])
    grow = [prefix + "model.embed_tokens.weight"]
    if not cfg.tie_embeddings or prefix + "lm_head.weight" in where:
        grow.append(prefix + "lm_head.weight")  # (a tied checkpoint that stores it: grown too)
    for name in grow:
        if name not in where:
            raise HFError(f"{src}: no tensor {name} (the weights' files name no such tensor)")
    rng = np.random.default_rng(seed)
    extra_bytes = extra_params = 0
    with atomic_directory(out, overwrite) as tmp:
        for fname in shards:
            full = os.path.join(src, fname)
            if not os.path.exists(full):
                raise HFError(f"{src}: shard {fname} listed in the index is missing")
            _check_inside(full, src)
            here = [n for n in grow if where[n] == fname]
            if not here:
                shutil.copyfile(full, os.path.join(tmp, fname))
                continue
            with safe_open(full, framework="numpy") as f:
                meta = f.metadata()
                arrays = {n: f.get_tensor(n) for n in f.keys()}
            for name in here:
                w = arrays[name]
                if w.ndim != 2 or w.shape[0] != V:
                    raise HFError(f"{full}: tensor {name} has shape {tuple(w.shape)}, expected "
                                  f"({V}, hidden) from config.json's vocab_size")  # fmt: skip
                arrays[name] = grown_matrix(w, n_tok, V_new, fresh, init, rng)
                extra_params += (V_new - V) * w.shape[1]
                extra_bytes += (V_new - V) * w.shape[1] * w.dtype.itemsize
            save_file(arrays, os.path.join(tmp, fname), metadata=meta)
            del arrays
        if index is not None:
            meta = index.setdefault("metadata", {})
            for key, more in (("total_size", extra_bytes), ("total_parameters", extra_params)):
                if isinstance(meta.get(key), int):
                    meta[key] += more
            _write_json(os.path.join(tmp, "model.safetensors.index.json"), index)
        text = config.get("text_config") if prefix else None
        if isinstance(text, dict) or prefix:
            config["text_config"] = {**(text or {}), "vocab_size": V_new}
        if "vocab_size" in config or not prefix:
            config["vocab_size"] = V_new
        _write_json(os.path.join(tmp, "config.json"), config)
        _copy_other_files(src, tmp, written=set(tok_files) | set(shards))
        for name, data in tok_files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        _check_written(tmp, ids, V_new)
    return Extension(src=shown, out=out, added=ids, present=present, special=special,
                     tokenizer_size=(n_tok, need), vocab_size=(V, V_new), initialised=fresh,
                     init=init)  # fmt: skip


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _copy_other_files(src: str, dst: str, written: set[str]) -> None:
    """Copies SRC's other files into `dst`: the top-level ones but weights (other formats would
    hold the old vocabulary: named in a warning) and hidden ones, and the named chat templates
    (additional_chat_templates/NAME.jinja); a link out of SRC is refused (`_check_inside`)."""
    skipped = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if name in written or name in ("config.json", "model.safetensors.index.json"):
            continue
        if name.startswith("."):
            continue
        if os.path.isdir(path):
            if name == _NAMED_TEMPLATES_DIR:
                _check_inside(path, src)
                os.makedirs(os.path.join(dst, name), exist_ok=True)
                for t in sorted(os.listdir(path)):
                    if t.endswith(".jinja") and os.path.isfile(os.path.join(path, t)):
                        _check_inside(os.path.join(path, t), path)
                        shutil.copyfile(os.path.join(path, t), os.path.join(dst, name, t))
            else:
                skipped.append(name + "/")
            continue
        if name.endswith(_WEIGHT_SUFFIXES):
            skipped.append(name)
            continue
        _check_inside(path, src)
        shutil.copyfile(path, os.path.join(dst, name))
    if skipped:
        log.warning("extend-vocab: not copied from %s (other weights, which keep the old "
                    "vocabulary, or subdirectories): %s", src, ", ".join(skipped))  # fmt: skip


def _check_written(d: str, ids: dict[str, int], vocab_size: int) -> None:
    """OUT as written reads back: config.json's vocab_size, and its tokenizer (through flaxlm's
    loader, fitting that vocab_size) has each new token as its id."""
    cfg = load_config(d)
    if cfg.vocab_size != vocab_size:
        raise HFError(f"extend-vocab: the written config.json reads vocab_size {cfg.vocab_size}, "
                      f"expected {vocab_size}")  # fmt: skip
    tok = load_tokenizer(d, vocab_size)
    wrong = {t: _known_id(tok, t) for t, i in ids.items() if _known_id(tok, t) != i}
    if wrong:
        raise HFError(f"extend-vocab: the written tokenizer {tok.name} reads the new tokens as "
                      f"{wrong}, expected {ids}")  # fmt: skip
