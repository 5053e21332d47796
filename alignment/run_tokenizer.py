"""The tokenizer of an alignment run: which one it uses, where it is kept, and whether another
model (a reference, a reward model, a teacher) reads token ids the same way.

  * `resolve_tokenizer(config, meta)`: data.tokenizer, else the init_from run's, else an HF
    directory's, else the one trained on the built-in corpus; with its chat-template variables;
  * `tokenizer_meta` / `save_tokenizer`: the copy in the workdir that checkpoints name;
  * `check_same_tokenizer`: refuses a second model whose ids mean other pieces.

Re-exported by flaxlm.alignment.common, where callers have always found these names.
"""

from __future__ import annotations

import filecmp
import hashlib
import logging
import os

import jax

from flaxlm.train import checkpoint as ckpt_lib

HF_PREFIX = "hf:"
log = logging.getLogger("flaxlm")


def source_meta(init_from: str) -> dict:
    """The checkpoint meta of a flaxlm run ({} for no source or an HF directory)."""
    if not init_from or init_from.startswith(HF_PREFIX):
        return {}
    return ckpt_lib.read_meta(init_from)[1]


def resolve_tokenizer(config, meta: dict):
    """data.tokenizer, else the init_from run's tokenizer, else HF's, else the built-in one;
    with data.chat_template_kwargs, else the init_from run's, as its template variables."""
    from flaxlm.models.hf_tokenizer import set_template_kwargs

    tok = _resolve_tokenizer(config, meta)
    return set_template_kwargs(tok, config.data.get("chat_template_kwargs", ""),
                               meta.get("chat_template_kwargs"),
                               "data.chat_template_kwargs")  # fmt: skip


def tokenizer_meta(tok, workdir: str | None) -> dict:
    """The checkpoint meta that names a stage's tokenizer (copied into the workdir) and the
    chat-template variables it trained with, for generation and evaluation to render alike."""
    out = {"tokenizer": save_tokenizer(tok, workdir)}
    if getattr(tok, "template_kwargs", None):
        out["chat_template_kwargs"] = dict(tok.template_kwargs)
    return out


def _resolve_tokenizer(config, meta: dict):
    from flaxlm.models.hf_tokenizer import load_tokenizer  # .model or HF tokenizer.json

    d = config.data
    if d.tokenizer:
        path = os.path.expanduser(d.tokenizer)
        src = meta.get("tokenizer", "")
        if os.path.isfile(path) and os.path.isfile(src) and not filecmp.cmp(path, src, False):
            log.warning(
                "data.tokenizer=%s is not the tokenizer init_from=%s was trained with (%s): "
                "token ids will mean other pieces than the model learnt",
                path, config.init_from, src,
            )  # fmt: skip
        return load_tokenizer(path)
    if meta.get("tokenizer"):
        if not os.path.exists(meta["tokenizer"]):
            raise FileNotFoundError(
                f"init_from={config.init_from}: its tokenizer {meta['tokenizer']} is gone; "
                "set data.tokenizer"
            )
        return load_tokenizer(meta["tokenizer"])
    if config.init_from.startswith(HF_PREFIX):
        return load_tokenizer(config.init_from[len(HF_PREFIX) :])
    from flaxlm.alignment.common import world  # (common imports this module)
    from flaxlm.data import pipeline

    texts = [r["text"] for r in world(d.world, d.world_seed).pretrain]
    pcfg = pipeline.data_config()
    pcfg.builtin_vocab_size, pcfg.cache_dir = d.builtin_vocab_size, d.cache_dir
    return pipeline.load_tokenizer(pcfg, docs=texts)


# Text that tells tokenizers with the same pieces apart by their normalisers and pre-tokenisers
# (words, digits, punctuation, spaces, non-ASCII).
TOKENIZER_PROBE = "The quick brown fox, 42 times: does Kavo live in Brel? Yes.  ünïcödé €!"


def source_tokenizer_path(source: str) -> str:
    """Where the tokenizer of another model lives: a flaxlm run's meta, or the HF directory of
    "hf:DIR" ("" when the run records none)."""
    if source.startswith(HF_PREFIX):
        return source[len(HF_PREFIX) :]
    return source_meta(source).get("tokenizer", "")


def check_same_tokenizer(tok, source: str, key: str, advice: str = "") -> None:
    """Refuses a second model (`key`=`source`: a DPO/KTO reference, a reward model, a
    distillation teacher) whose tokenizer is not this run's `tok`: it would read this run's
    token ids as other pieces — log-probabilities of another text, a score of another text —
    and nothing downstream would notice. Same means the same size, the same piece for every id
    and the same ids for a probe text (normalisers). An error names the key, both tokenizers,
    their sizes and the first differing id; a run that records no tokenizer is assumed to share
    this one (with a warning)."""
    from flaxlm.models.hf_tokenizer import load_tokenizer

    try:
        path = source_tokenizer_path(source)
    except ckpt_lib.CheckpointError as e:  # (a missing run: "no checkpoint under ...")
        raise ckpt_lib.CheckpointError(f"{key}={source}: {e}") from e
    if not path:
        log.warning("%s=%s records no tokenizer; assuming this run's", key, source)
        return
    if not os.path.exists(path):
        raise FileNotFoundError(f"{key}={source}: its tokenizer {path} is gone")
    theirs = load_tokenizer(path)
    if tok.vocab_size != theirs.vocab_size:
        why = f"{theirs.vocab_size} pieces against {tok.vocab_size}"
    else:
        # Every piece, not a sample: two tokenizers trained on similar text share most pieces,
        # and one differing piece is enough to score another text wherever it occurs.
        ours, their_pieces = tok.pieces(), theirs.pieces()
        diff = next((i for i, (a, b) in enumerate(zip(ours, their_pieces)) if a != b), None)
        if diff is not None:
            why = f"id {diff} is {their_pieces[diff]!r} there, {ours[diff]!r} here"
        elif tok.encode(TOKENIZER_PROBE) != theirs.encode(TOKENIZER_PROBE):
            why = f"the same pieces, but {TOKENIZER_PROBE!r} encodes differently"
        else:
            return
    raise ValueError(
        f"{key}={source}: its tokenizer {path} ({theirs.vocab_size} pieces) is not this run's "
        f"{getattr(tok, 'name', '?')} ({tok.vocab_size} pieces): {why}, so the same ids mean "
        f"different pieces to the two models{'. ' + advice if advice else ''}"
    )


def _template_of(tok) -> tuple[str, dict]:
    """(the tokenizer's Jinja chat template, "" for flaxlm's own; its template variables)."""
    return getattr(tok, "chat_template", "") or "", dict(getattr(tok, "template_kwargs", {}) or {})


def _describe_template(template: str, kwargs: dict) -> str:
    if not template:
        return "flaxlm's own chat template"
    digest = hashlib.sha256(template.encode()).hexdigest()[:12]
    return f"the Jinja chat template sha256:{digest}" + (f" with {kwargs}" if kwargs else "")


def check_same_chat_template(tok, source: str, key: str) -> None:
    """Refuses a reward model (`key`=`source`) that learnt chats rendered otherwise than this
    run renders them: another template (a base tokenizer's flaxlm template against an instruct
    one's Jinja, with the same pieces) or other template variables (`chat_template_kwargs`,
    e.g. enable_thinking). It scores this run's token rows, and would score text laid out unlike
    anything it was trained on, silently. `check_same_tokenizer` checks the pieces first."""
    from flaxlm.models.hf_tokenizer import load_tokenizer, set_template_kwargs

    path = source_tokenizer_path(source)
    if not path or not os.path.exists(path):
        return  # (check_same_tokenizer has warned or refused)
    theirs = set_template_kwargs(load_tokenizer(path), None,
                                 source_meta(source).get("chat_template_kwargs"))  # fmt: skip
    if _template_of(theirs) == _template_of(tok):
        return
    raise ValueError(
        f"{key}={source} learnt chats rendered with {_describe_template(*_template_of(theirs))}; "
        f"this run renders them with {_describe_template(*_template_of(tok))}, so it would "
        "score text laid out unlike anything it was trained on. Train it with this run's "
        "tokenizer and data.chat_template_kwargs, or give this run its (data.tokenizer, "
        "data.chat_template_kwargs)"
    )


def save_tokenizer(tok, workdir: str | None) -> str:
    """Copies the tokenizer into the workdir (process 0) and returns its path there, so the
    run's checkpoints name a tokenizer that lives with them."""
    if workdir is None:
        return getattr(tok, "name", "")
    workdir = os.path.abspath(workdir)
    if hasattr(tok, "save"):  # SentencePiece
        path = os.path.join(workdir, "tokenizer.model")
        if jax.process_index() == 0:
            tok.save(path)
        return path
    from flaxlm.models.hf_tokenizer import copy_tokenizer  # HF tokenizer.json + its configs

    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        copy_tokenizer(os.path.dirname(tok.name), workdir)
    return os.path.join(workdir, os.path.basename(tok.name))
