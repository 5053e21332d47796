"""`generate_text`: text in, text out around `generate` (models/decode.py). It encodes the
prompts, takes the stop tokens, pad id and stop-string tables from the tokenizer, and decodes
and cuts each completion. Separate because nothing else in decoding knows about tokenizers;
it calls `generate` as models/decode.py's attribute, imported when called (decode.py imports
this module), so a patched `decode.generate` is the one it runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from flaxlm.models import stop_strings as stop_text
from flaxlm.models.config import ModelConfig
from flaxlm.models.decode_options import stop_token_ids


def generate_text(
    cfg: ModelConfig,
    params,
    tokenizer,
    texts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    rng=None,
    add_bos: bool = True,
    **kw,
) -> list[str]:
    """Encodes `texts`, generates, and decodes each completion (without its stop token).

    `tokenizer` has encode(text, bos=) / decode(ids) / eos_id / pad_id / bos_id (our
    SentencePiece Tokenizer and hf.HFTokenizer both do). Stops at eos (an HF tokenizer's
    `stop_ids`) unless `stop_tokens` is given; `stop_strings` may be plain strings here (the
    tables are built for `tokenizer`), each completion cut before the first; `rng` (a key, or
    an int seed) defaults to PRNGKey(0); other keywords go to `generate`.
    """
    if isinstance(texts, (str, bytes)):  # (iterated, it was one prompt per character)
        raise TypeError("generate_text: texts is one string; pass a list of prompts, [text]")
    strings = kw.get("stop_strings")
    if strings is not None and not isinstance(strings, stop_text.StopStrings):
        strings = [strings] if isinstance(strings, str) else list(strings)
        # An empty list is no stop strings (as None), not a bad one.
        kw["stop_strings"] = (
            stop_text.StopStrings.build(tokenizer, strings, cfg.vocab_size) if strings else None
        )
    cut_at = kw["stop_strings"].strings if kw.get("stop_strings") is not None else ()
    prompts = [tokenizer.encode(t, bos=add_bos and tokenizer.bos_id >= 0) for t in texts]
    eos = (tokenizer.eos_id,) if tokenizer.eos_id >= 0 else ()
    kw.setdefault("stop_tokens", tuple(getattr(tokenizer, "stop_ids", ()) or eos))
    kw["stop_tokens"] = stop_token_ids(kw["stop_tokens"])  # (an array of ids too)
    kw.setdefault("pad_id", max(tokenizer.pad_id, 0))
    rng = jax.random.PRNGKey(0 if rng is None else rng) if _is_seed(rng) else rng
    from flaxlm.models import decode  # (decode.py imports this module)

    out = decode.generate(cfg, params, prompts, max_new_tokens=max_new_tokens, rng=rng, **kw)
    toks, lengths = jax.device_get((out.tokens, out.lengths))
    stops = set(kw["stop_tokens"])
    texts_out = []
    for row, n in zip(toks, lengths):
        ids = [int(t) for t in row[:n]]
        if ids and ids[-1] in stops:
            ids = ids[:-1]
        text = tokenizer.decode(ids)
        cut = min((i for i in (text.find(s) for s in cut_at) if i >= 0), default=len(text))
        texts_out.append(text[:cut])
    return texts_out


def _is_seed(rng) -> bool:
    return rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool))
