"""Tokenizers of HF checkpoints: `tokenizer.json` (the `tokenizers` package) or a SentencePiece
`tokenizer.model` (flaxlm.data.tokenizer.Tokenizer), behind one small interface:

    encode(text, bos=False, eos=False) -> ids · decode(ids) -> str · bos_id · eos_id · pad_id
    vocab_size · special_ids() · token_id(piece) · check_fits(model_vocab_size)

`load_tokenizer(path, vocab_size)` picks the right one for a file or an HF directory and raises
if the tokenizer's ids would index past the model's embedding.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil

import numpy as np

CHAT_TEMPLATE_FILE = "chat_template.jinja"

# a message's reasoning, by each name templates read it under (transformers' aliases)
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


class HFError(ValueError):
    """An HF checkpoint or tokenizer flaxlm cannot use; the message names the file and key."""


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    # transformers >= 4.5x saves the chat template here, not in tokenizer_config.json, and
    # named templates other than the default as additional_chat_templates/NAME.jinja
    CHAT_TEMPLATE_FILE,
)
_NAMED_TEMPLATES_DIR = "additional_chat_templates"
log = logging.getLogger("flaxlm")
MAX_REPEAT = 1 << 20  # items a chat template's `x * n` may make (`_jinja_env`)


def copy_tokenizer(src: str, dst_dir: str) -> None:
    """Copies the tokenizer file `src`, or an HF directory's tokenizer files, into `dst_dir`.
    The stop ids an HF directory declares only in its config.json (`eos_token_id`, which
    `HFTokenizer.load` reads; a model config is not a tokenizer file) go into the copy's
    generation_config.json: an imported or fine-tuned run's tokenizer, and its export, lost
    them, and a model that ends its turns with <|im_end|> was never stopped there."""
    files = [src] if os.path.isfile(src) else [os.path.join(src, f) for f in _TOKENIZER_FILES]
    files = [f for f in files if os.path.exists(f)]
    if not files:
        raise HFError(f"export: no tokenizer files in {src} (looked for {_TOKENIZER_FILES})")
    for f in files:
        if f != src:  # (a file named itself is copied wherever it lives)
            _check_inside(f, src)
        shutil.copy(f, os.path.join(dst_dir, os.path.basename(f)))
    named = os.path.join(src, _NAMED_TEMPLATES_DIR)
    if os.path.isdir(named):  # its templates only: `name.jinja` files
        _check_inside(named, src)
        os.makedirs(os.path.join(dst_dir, _NAMED_TEMPLATES_DIR), exist_ok=True)
        for name in sorted(os.listdir(named)):
            path = os.path.join(named, name)
            if not name.endswith(".jinja") or not os.path.isfile(path):
                log.warning("%s: not copied (a named chat template is a NAME.jinja file)", path)
                continue
            _check_inside(path, named)
            shutil.copy(path, os.path.join(dst_dir, _NAMED_TEMPLATES_DIR, name))
    if os.path.isdir(src):
        _carry_config_stop_ids(src, dst_dir)


def _check_inside(path: str, directory: str) -> None:
    """Refuses to copy `path` when it is a link to a file outside `directory` (and outside the
    Hugging Face cache's blob store that a snapshot's files link to): a downloaded repository
    with `chat_template.jinja -> ~/.ssh/id_rsa` had that file copied into the run and into
    every export of it, ready to be uploaded."""
    real, home = os.path.realpath(path), os.path.realpath(directory)
    if real == home or real.startswith(home + os.sep):
        return
    parts = os.path.abspath(directory).split(os.sep)  # .../models--org--name/snapshots/<rev>
    if len(parts) >= 3 and parts[-2] == "snapshots":
        blobs = os.path.realpath(os.path.join(directory, os.pardir, os.pardir, "blobs"))
        if os.path.dirname(real) == blobs:
            return
    raise HFError(f"{path} links to {real}, outside {directory}: not copied (copy the file "
                  "itself into the directory if it is meant to be there)")  # fmt: skip


def _eos_list(settings: dict, where: str = "") -> list[int]:
    """The `eos_token_id` of a config (an id or a list of ids) as a list; a value that is no
    whole number ("x", [null], {}) is an HFError naming `where` (a raw int() error before)."""
    e = settings.get("eos_token_id")
    ids = e if isinstance(e, list) else [] if e is None else [e]
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, float)) or i != int(i):
            raise HFError(f"{where or 'tokenizer settings'}: eos_token_id {e!r} is not a token "
                          "id or a list of them")  # fmt: skip
    return [int(i) for i in ids]


def _json_object(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            obj = json.load(f)
    except (ValueError, RecursionError) as e:
        raise HFError(f"{path}: cannot read tokenizer settings: {e}") from None
    if not isinstance(obj, dict):
        raise HFError(f"{path}: cannot read tokenizer settings: not a JSON object")
    return obj


def _carry_config_stop_ids(src: str, dst_dir: str) -> None:
    config = os.path.join(src, "config.json")
    config_ids = _eos_list(_json_object(config), config)
    path = os.path.join(dst_dir, "generation_config.json")
    generation = _json_object(path)
    ids = _eos_list(generation, path)
    missing = [i for i in config_ids if i not in ids]
    if missing:
        merged = ids + missing
        generation["eos_token_id"] = merged if len(merged) > 1 else merged[0]
        with open(path, "w") as f:
            json.dump(generation, f, indent=2)


def _jinja_literal(value) -> str:
    """`value` (from JSON) as a Jinja expression: JSON's own text but for true/false/null."""
    if value is None or isinstance(value, bool):
        return {None: "none", True: "true", False: "false"}[value]
    if isinstance(value, list):
        return "[" + ", ".join(_jinja_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(str(k))}: {_jinja_literal(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    return json.dumps(value)


def template_with_defaults(template: str, kwargs: dict) -> str:
    """`template` with the variables `kwargs` set first unless the caller passes them: what a
    run trained with (`data.chat_template_kwargs`, e.g. Qwen3's enable_thinking=false) is
    then what transformers, vLLM or TGI render by default, and a caller can still override."""
    head = "".join(f"{{%- if {k} is not defined %}}{{%- set {k} = {_jinja_literal(v)} %}}"
                   "{%- endif %}" for k, v in kwargs.items())  # fmt: skip
    return head + template


def exported_template_files(tok_dir: str, kwargs: dict, files: dict) -> dict:
    """The files (name → JSON object or text) an export writes over the copied tokenizer
    files of `tok_dir` so that each chat template there (chat_template.jinja, the
    tokenizer_config.json `chat_template`, string or named list, and the named .jinja
    templates) defaults to the run's template variables `kwargs`; `files` are the files
    already to be written (a tokenizer_config.json there is the one changed)."""
    out = dict(files)
    if not kwargs:
        return out
    jinja = os.path.join(tok_dir, CHAT_TEMPLATE_FILE)
    if os.path.exists(jinja):
        out[CHAT_TEMPLATE_FILE] = template_with_defaults(_read_text(jinja), kwargs)
    named = os.path.join(tok_dir, _NAMED_TEMPLATES_DIR)
    for fname in sorted(os.listdir(named)) if os.path.isdir(named) else ():
        if fname.endswith(".jinja"):
            text = _read_text(os.path.join(named, fname))
            out[f"{_NAMED_TEMPLATES_DIR}/{fname}"] = template_with_defaults(text, kwargs)
    config = out.get("tokenizer_config.json")
    if config is None:
        config = _json_object(os.path.join(tok_dir, "tokenizer_config.json"))
    inline = config.get("chat_template")
    if isinstance(inline, str):
        config = {**config, "chat_template": template_with_defaults(inline, kwargs)}
    elif isinstance(inline, list):
        config = {**config, "chat_template": [
            {**t, "template": template_with_defaults(t["template"], kwargs)}
            if isinstance(t, dict) and isinstance(t.get("template"), str) else t
            for t in inline
        ]}  # fmt: skip
    if inline is not None:
        out["tokenizer_config.json"] = config
    return out


def run_tokenizer_path(recorded: str, run_dir: str) -> str:
    """Where the tokenizer a run's checkpoint meta names (`recorded`) is now: a relative path
    is relative to the run directory; an absolute one that no longer exists (the run was moved
    or copied and the original deleted) is looked up as run_dir/<its basename>, where import
    and training copy the tokenizer. Returns `recorded` as resolved even when nothing is
    there, for the caller's error to name."""
    if not recorded:
        return recorded
    if not os.path.isabs(recorded):
        here = os.path.join(run_dir, recorded)
        return here if os.path.exists(here) or not os.path.exists(recorded) else recorded
    if not os.path.exists(recorded):
        moved = os.path.join(run_dir, os.path.basename(recorded))
        if os.path.exists(moved):
            return moved
    return recorded


# tokenizer_config.json key of a flaxlm export: its tokenizer.json was written from this
# SentencePiece model for transformers; flaxlm reads the model itself (`tokenizer_file`)
SENTENCEPIECE_KEY = "flaxlm_sentencepiece"


def tokenizer_file(d: str) -> str | None:
    """The tokenizer file flaxlm reads in HF directory `d`: tokenizer.json, else
    tokenizer.model; but tokenizer.model where tokenizer_config.json names it as the source of
    the tokenizer.json (a flaxlm export, `sentencepiece_hf_files`), so that importing an export
    gives back the run's own SentencePiece tokenizer. None when neither file is there."""
    model = os.path.join(d, "tokenizer.model")
    try:
        with open(os.path.join(d, "tokenizer_config.json")) as f:
            source = json.load(f).get(SENTENCEPIECE_KEY)
    except (OSError, ValueError, AttributeError, RecursionError):  # absent, malformed, not
        source = None  # an object (HFTokenizer.load names a malformed file)
    if source == "tokenizer.model" and os.path.exists(model):
        return model
    for f in ("tokenizer.json", "tokenizer.model"):
        if os.path.exists(os.path.join(d, f)):
            return os.path.join(d, f)
    return None


def sentencepiece_hf_files(tok) -> dict[str, dict]:
    """`tokenizer.json`, `tokenizer_config.json` and `generation_config.json` for exporting a
    flaxlm SentencePiece tokenizer (flaxlm.data.tokenizer.Tokenizer) next to its
    `tokenizer.model`.

    With them transformers' AutoTokenizer encodes text as SentencePiece does (leading, trailing
    and repeated spaces included: models/hf_sentencepiece.py says why the file is needed), adds
    BOS, keeps the special and chat tokens whole, and its `apply_chat_template` gives exactly
    the ids of data/chat_template.py `render_chat`: the template puts each turn's content right
    after its role token, and tokenizer.json gives every segment after a special token its own
    "▁", as our turns encode their content on its own. `generate` stops at `<|end|>` as well as
    at EOS. tests/fixtures/make_hf_fixtures.py --check verifies both against transformers live.
    A tokenizer without the chat tokens gets no chat template (its turns use text headers that
    a string template cannot reproduce token for token). A model tokenizer.json cannot express
    (WORD or CHAR type) gets the Llama tokenizer settings instead, whose template puts a space
    after each role token (transformers gives a segment after a special token no "▁").
    """
    from flaxlm.data.tokenizer import CHAT_TOKENS
    from flaxlm.models.hf_sentencepiece import tokenizer_json

    ids = tok.special_ids()
    piece = tok.sp.id_to_piece
    specials = sorted({i for i in ids.values() if i >= 0})  # pad/unk/bos/eos + chat tokens
    fast = tokenizer_json(tok.proto, set(specials), tok.bos_id)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast" if fast else "LlamaTokenizer",
        "add_bos_token": tok.bos_id >= 0,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {
                "content": piece(i),
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for i in specials
        },
    }
    if fast:
        config[SENTENCEPIECE_KEY] = "tokenizer.model"
    else:
        config["legacy"] = False  # a segment after a special token gets no "▁"
    for name in ("bos", "eos", "unk", "pad"):
        if ids[name] >= 0:
            config[f"{name}_token"] = piece(ids[name])
    generation = {f"{k}_token_id": ids[k] for k in ("bos", "pad") if ids[k] >= 0}
    eos = [ids["eos"]] if ids["eos"] >= 0 else []
    if all(t in ids for t in CHAT_TOKENS):
        bos = "{{ bos_token }}" if tok.bos_id >= 0 else ""
        close = "{{ eos_token }}" if tok.eos_id >= 0 else ""
        space = "" if fast else " "
        config["chat_template"] = (
            bos + "{% for m in messages %}<|{{ m['role'] }}|>" + space + "{{ m['content'] }}"
            "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% else %}" + close +
            "{% endif %}"
        )  # fmt: skip
        eos = [ids["<|end|>"], *eos]
    if eos:
        generation["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    files = {"tokenizer_config.json": config, "generation_config.json": generation}
    return {"tokenizer.json": fast, **files} if fast else files


class HFTokenizer:
    """An HF `tokenizer.json` (via the `tokenizers` package) behind our Tokenizer's interface:
    encode(text, bos=, eos=) / decode(ids) / bos_id / eos_id / pad_id / vocab_size.

    Special ids come from tokenizer_config.json / special_tokens_map.json (bos_token, ...),
    else config.json (bos_token_id, ...); -1 when absent. Two BOS ids, kept apart:
    `bos_token_id` is the BOS token the files declare (-1 for `bos_token: null`); `bos_id` is
    the BOS the tokenizer *adds* — what encode(bos=True), document framing (data/pipeline.py),
    evaluation's prefix_ids and generate's plain prompts prepend: that token when
    tokenizer.json's post-processor starts an encoding with it (as transformers'
    tokenizer(text) does; GPT-2-style byte-level tokenizers such as SmolLM2's and Phi-4's
    declare a bos_token their post-processor never adds), else -1; also -1 when
    tokenizer_config.json says `add_bos_token: false` or `bos_token: null` (Qwen2.5).
    A Jinja chat template writes its BOS itself, from `special_tokens["bos_token"]`, either
    way. `pad_id` falls back to eos (HF's usual choice), then 0 — padding is always masked,
    so it only has to be a valid id.
    `stop_ids` adds every eos id of generation_config.json (Llama 3 ends turns with <|eot_id|>);
    `chat_template` is the Jinja template of chat_template.jinja, else of tokenizer_config.json
    ("" if none; a list of named templates: `named_templates`, the default here); `special_tokens`
    the named special token strings the configs declare (bos_token, eos_token, unk_token,
    pad_token, ...), the variables transformers passes a chat template.
    """

    def __init__(self, tok, bos_id: int = -1, eos_id: int = -1, pad_id: int = -1, name="",
                 stop_ids=(), chat_template: str = "", special_tokens=None,
                 named_templates=None, bos_token_id: int | None = None):  # fmt: skip
        self.tok, self.name = tok, name
        self.bos_id, self.eos_id = bos_id, eos_id
        self.bos_token_id = bos_id if bos_token_id is None else bos_token_id
        self._pad = pad_id
        self.stop_ids = tuple(dict.fromkeys([i for i in (eos_id, *stop_ids) if i >= 0]))
        self.chat_template = chat_template
        # a tokenizer_config.json `chat_template` list of named templates ({} for one template):
        # `render_chat_text` picks "tool_use" when given tools, else "default" (as transformers)
        self.named_templates = dict(named_templates or {})
        # extra variables every render passes the template (`enable_thinking`: Qwen3's switch;
        # set from `data.chat_template_kwargs` / the run's meta / `--chat_template_kwargs`)
        self.template_kwargs: dict = {}
        self._compiled = {}  # template source -> compiled: rendering is per record
        self._id_range = None  # `vocab_size`, computed once
        self._sha256 = None  # `sha256`, read once
        self._text_only = None  # `text_only()`, built once
        if special_tokens is None:  # built in code: the BOS/EOS ids' pieces
            pieces = {"bos_token": self.bos_token_id, "eos_token": eos_id}
            special_tokens = {k: tok.id_to_token(i) for k, i in pieces.items() if i >= 0}
        self.special_tokens = dict(special_tokens)

    @classmethod
    def load(cls, path: str) -> HFTokenizer:
        from tokenizers import Tokenizer as RawTokenizer

        d = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        try:
            tok = RawTokenizer.from_file(file)
        except Exception as e:
            raise HFError(f"{file}: cannot load tokenizer: {e}") from e
        specials, stops, tokenizer_side = {}, [], {}
        for meta in ("config.json", "generation_config.json", "special_tokens_map.json",
                     "tokenizer_config.json"):  # fmt: skip
            p = os.path.join(d, meta)
            if os.path.exists(p):
                try:
                    with open(p) as f:
                        settings = json.load(f)
                    specials.update(settings)
                except (ValueError, TypeError, RecursionError) as e:  # malformed, or not an object
                    raise HFError(f"{p}: cannot read tokenizer settings: {e}") from None
                if meta in ("special_tokens_map.json", "tokenizer_config.json"):
                    tokenizer_side.update(settings)
                stops += _eos_list(specials, p)

        def special(kind):
            t = specials.get(f"{kind}_token")
            t = t.get("content") if isinstance(t, dict) else t
            i = tok.token_to_id(t) if isinstance(t, str) else None
            if i is None:
                i = specials.get(f"{kind}_token_id")
                i = i[0] if isinstance(i, list) and i else i
            if i is not None and (isinstance(i, bool) or not isinstance(i, int)):
                raise HFError(f"{d}: {kind}_token_id {i!r} is not a token id")
            return -1 if i is None else int(i)

        named = {}  # what transformers' special_tokens_map holds: the declared strings
        for kind in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
            t = specials.get(f"{kind}_token")
            t = t.get("content") if isinstance(t, dict) else t
            if isinstance(t, str):
                named[f"{kind}_token"] = t
        # An explicit `bos_token: null` (Qwen2.5) declares none, whatever config.json's
        # bos_token_id (every Qwen2 config has one) says; that id is used only when the
        # tokenizer's files say nothing (an imported run has no config.json: it would differ).
        no_bos = "bos_token" in tokenizer_side and tokenizer_side["bos_token"] is None
        bos_token = -1 if no_bos else special("bos")
        # Added only when the tokenizer adds it: tokenizer.json's post-processor decides, as it
        # decides transformers' tokenizer(text) (5.x ignores add_bos_token; a Llama tokenizer
        # saved by 4.x carries the post-processor its add_bos_token made); an explicit
        # `add_bos_token: false` still means none (4.x's Llama tokenizers rebuild the
        # post-processor from it).
        adds = tokenizer_side.get("add_bos_token") is not False and _adds_bos(tok, bos_token)
        template, templates = _chat_templates(d, specials.get("chat_template"))
        return cls(tok, bos_token if adds else -1, special("eos"), special("pad"), name=file,
                   stop_ids=[int(i) for i in stops], chat_template=template,
                   special_tokens=named, named_templates=templates,
                   bos_token_id=bos_token)  # fmt: skip

    @property
    def vocab_size(self) -> int:
        """The ids' range, the largest id + 1: a vocabulary with gaps in its ids (a hand-made
        WordLevel {..., "world": 5000}) counts fewer tokens than that (the count passed
        `check_fits` and id 5000 indexed past a 64-row embedding: NaN logits)."""
        if self._id_range is None:
            ids = self.tok.get_vocab(with_added_tokens=True).values()
            count = self.tok.get_vocab_size(with_added_tokens=True)
            self._id_range = max(count, max(ids, default=-1) + 1)
        return self._id_range

    @property
    def pad_id(self) -> int:
        return self._pad if self._pad >= 0 else max(self.eos_id, 0)

    @property
    def unk_id(self) -> int:
        return -1

    def special_ids(self) -> dict[str, int]:
        from flaxlm.data.tokenizer import CHAT_TOKENS

        out = {"pad": self.pad_id, "bos": self.bos_id, "eos": self.eos_id}
        for t in CHAT_TOKENS:
            i = self.tok.token_to_id(t)
            if i is not None:
                out[t] = i
        return out

    def pieces(self) -> list[str]:
        """Every id's token string, in id order ("" for an id the vocabulary skips)."""
        out = [""] * self.vocab_size
        for piece, i in self.tok.get_vocab(with_added_tokens=True).items():
            if 0 <= i < len(out):
                out[i] = piece
        return out

    def token_id(self, piece: str) -> int:
        i = self.tok.token_to_id(piece)
        if i is None:
            raise KeyError(f"{self.name}: no token {piece!r}")
        return i

    def check_fits(self, vocab_size: int) -> None:
        """Raises when an id the tokenizer makes, or a special id its settings declare (bos,
        eos, pad, generation_config.json's stop ids), indexes past the model's embedding:
        `jnp.take` reads such a row as NaN, and one NaN id poisons every position of its
        sequence (an eos_token_id of 100000 in config.json gave perplexity nan, silently)."""
        if self.vocab_size > vocab_size:
            raise HFError(
                f"tokenizer {self.name} has ids up to {self.vocab_size - 1} but the model's "
                f"vocab_size is {vocab_size}: they would index past the embedding"
            )
        specials = {"bos": self.bos_token_id, "eos": self.eos_id, "pad": self._pad,
                    **{f"stop id {i}": i for i in self.stop_ids if i != self.eos_id}}  # fmt: skip
        past = {k: i for k, i in specials.items() if i >= vocab_size}
        if past:
            said = ", ".join(f"{k} {i}" if not k.startswith("stop") else k for k, i in past.items())
            raise HFError(
                f"tokenizer {self.name}: the settings beside it (config.json, "
                f"generation_config.json, tokenizer_config.json, special_tokens_map.json) declare "
                f"{said}, past the model's vocab_size {vocab_size}"
            )

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return (
            ([self.bos_id] if bos and self.bos_id >= 0 else [])
            + ids
            + ([self.eos_id] if eos and self.eos_id >= 0 else [])
        )

    def encode_batch(self, texts, *, bos: bool = False, eos: bool = False, num_threads: int = 0):
        """`encode` of each text (the `tokenizers` batch call: its own threads)."""
        head = [self.bos_id] if bos and self.bos_id >= 0 else []
        tail = [self.eos_id] if eos and self.eos_id >= 0 else []
        encs = self.tok.encode_batch(list(texts), add_special_tokens=False)
        return [head + e.ids + tail for e in encs]

    @property
    def sha256(self) -> str:
        """What token shards and runs record to name this tokenizer (`meta.json`
        `tokenizer_sha256`, data/pipeline.py): the sha256 of its tokenizer.json bytes (a copy
        made with `copy_tokenizer` keeps them), or of its serialisation when built in code."""
        if self._sha256 is None:
            try:
                with open(self.name, "rb") as f:
                    data = f.read()
            except OSError:
                data = self.tok.to_str().encode()
            self._sha256 = hashlib.sha256(data).hexdigest()
        return self._sha256

    def text_only(self) -> HFTokenizer:
        """This tokenizer for document text (pretraining data, token shards): a special
        token's string inside the text ("<|endoftext|>" on a web page about tokenizers) is
        encoded as the text it is, never as the special id — one such string used to end a
        document, or start a forged chat turn, in the middle of its text. (`encode` keeps
        them special: a rendered chat template writes its role and end-of-turn tokens as text.)
        flaxlm's SentencePiece Tokenizer always encodes text so (data/tokenizer.py)."""
        if self._text_only is None:
            from tokenizers import Tokenizer as RawTokenizer

            raw = RawTokenizer.from_str(self.tok.to_str())
            raw.encode_special_tokens = True
            twin = copy.copy(self)
            twin.tok, twin._text_only, twin._compiled = raw, twin, {}
            twin._sha256 = self.sha256
            self._text_only = twin
        return self._text_only

    def __setstate__(self, state):  # (Beam workers): `tokenizers` pickles drop the flag
        self.__dict__.update(state)
        if state.get("_text_only") is self:
            self.tok.encode_special_tokens = True

    def render_chat_text(self, messages, add_generation_prompt: bool = True, tools=None) -> str:
        """`messages` rendered as text with the checkpoint's own Jinja chat template, as
        transformers 5.24 apply_chat_template renders them (see `render_chat_template`): a
        message's keys whose value is None are dropped first (OpenAI-style `tool_calls=None`:
        `{% if message.tool_calls is defined %}` must be false, not print "None"), a message's
        reasoning (`reasoning_content`, `reasoning` or `thinking`) is given as both
        `reasoning_content` and `thinking` (what Qwen3's and gpt-oss's templates read), and `tools`
        and `documents` are defined (`tools` as given: tool schemas, else None).
        `template_kwargs` are passed as variables too
        (transformers' apply_chat_template(**kwargs)). The caller's messages are not modified."""
        if not self.chat_template:
            raise HFError(f"{self.name}: tokenizer_config.json has no chat_template")
        import jinja2

        source = self._template_for(tools)

        msgs = []
        for m in messages:
            if not isinstance(m, dict):
                raise HFError(f"{self.name}: chat messages must be dicts, got {m!r}")
            msg = {k: v for k, v in m.items() if v is not None}
            # transformers' aliases: the reasoning under every name a template may read
            # (gpt-oss's reads `thinking`, Qwen3's `reasoning_content`)
            said = next((msg[k] for k in REASONING_KEYS if k in msg), None)
            if said is not None:
                msg = {"thinking": said, **msg, "reasoning_content": said}
            msgs.append(msg)
        try:  # the template's own `raise_exception` is an HFError already (_jinja_env)
            if source not in self._compiled:  # compiled once per template text
                self._compiled[source] = _jinja_env(self.name).from_string(source)
            return self._compiled[source].render(
                **self.special_tokens,
                **self.template_kwargs,
                messages=msgs,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
            )
        except jinja2.TemplateError as e:  # a syntax error, an undefined value used
            raise HFError(f"{self.name}: chat template: {type(e).__name__}: {e}") from None
        except (RecursionError, MemoryError) as e:  # a macro calling itself; a huge string
            raise HFError(
                f"{self.name}: chat template: {type(e).__name__} while rendering "
                "(a macro that recurses without end, or a string too large)"
            ) from None

    def _template_for(self, tools) -> str:
        """The template source to render: with named templates, "tool_use" when tools are
        given and there is one, else "default" (`chat_template`); without a default, an error
        naming the templates there are (transformers' choice, and its refusal)."""
        named = self.named_templates
        if not named:
            return self.chat_template
        if tools is not None and "tool_use" in named:
            return named["tool_use"]
        if "default" in named:
            return self.chat_template
        raise HFError(
            f"{self.name}: the chat templates are named {sorted(named)} and none is 'default'"
            + (" (nor 'tool_use', for the tools given)" if tools is not None else "")
            + "; rename the one to use to 'default' in tokenizer_config.json"
        )

    def render_chat_template(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """Ids of `messages` rendered with the checkpoint's own Jinja chat template, as
        transformers' apply_chat_template(tokenize=True) gives them: the same Jinja environment
        (sandboxed, trim_blocks, lstrip_blocks, loop controls `{% break %}`/`{% continue %}`, a
        `tojson` that does not HTML-escape, `strftime_now`, `raise_exception`, the
        `{% generation %}` block), the named
        special tokens as variables, and the text encoded without adding special tokens (the
        template writes BOS itself). tests/data/test_chat_audit.py checks it against
        transformers. Training renders through the same text (data/formats.py
        `JinjaChatTemplate`)."""
        return self.encode(self.render_chat_text(messages, add_generation_prompt))

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, (start, end) character offsets of each id in `text`), no special tokens added."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in np.asarray(ids).ravel()], skip_special_tokens=True)

    def decode_batch(self, batch) -> list[str]:
        return [self.decode(r) for r in batch]


def _adds_bos(tok, bos: int) -> bool:
    """Whether the `tokenizers` Tokenizer `tok` starts an encoding with the id `bos` when
    adding special tokens (its post-processor: a TemplateProcessing "<bos> $A" does, GPT-2's
    ByteLevel none): encodes the empty text with special tokens, which gives exactly what the
    post-processor adds — no word of a probe sentence can fail a word-level vocabulary without
    an unknown token."""
    if bos < 0:
        return False
    return tok.encode("", add_special_tokens=True).ids[:1] == [bos]


def _chat_templates(d: str, inline) -> tuple[str, dict[str, str]]:
    """(default chat template, named templates or {}) of an HF tokenizer directory `d`:
    `chat_template.jinja` (what transformers >= 4.5x saves) wins over tokenizer_config.json's
    `chat_template` (`inline`: a string, or a list of {"name", "template"}), and
    additional_chat_templates/NAME.jinja add named ones beside it. Without a "default" among
    named templates the first stands in as `chat_template` (so chat paths reach
    `render_chat_text`, which refuses unless tools pick "tool_use")."""
    named = {}
    if isinstance(inline, list):
        for t in inline:
            if not isinstance(t, dict) or not isinstance(t.get("template"), str):
                raise HFError(f"{os.path.join(d, 'tokenizer_config.json')}: chat_template list "
                              f"entry {t!r} is not a {{'name', 'template'}} object")  # fmt: skip
            named[str(t.get("name"))] = t["template"]
        inline = named.get("default", "")
    elif inline is not None and not isinstance(inline, str):
        raise HFError(f"{os.path.join(d, 'tokenizer_config.json')}: chat_template is a "
                      f"{type(inline).__name__}, expected a string or a list of named "
                      "templates")  # fmt: skip
    template = inline or ""
    extra = os.path.join(d, _NAMED_TEMPLATES_DIR)
    for fname in sorted(os.listdir(extra)) if os.path.isdir(extra) else ():
        if fname.endswith(".jinja"):
            named[fname[: -len(".jinja")]] = _read_text(os.path.join(extra, fname))
    file = os.path.join(d, CHAT_TEMPLATE_FILE)
    if os.path.exists(file):
        template = _read_text(file)
        if named:
            named["default"] = template
    if named and "default" not in named:
        template = next(iter(named.values()))
    return template, named


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise HFError(f"{path}: cannot read the chat template: {e}") from None


def _generation_tag():
    """A Jinja extension for `{% generation %}...{% endgeneration %}`, the block templates
    written for assistant-only losses (TRL's `assistant_only_loss`) wrap each answer in:
    transformers registers it and renders the body as it is. Without it such a template does
    not compile. The loss mask here is located from the rendered turns (data/chat_template.py),
    so the block only has to render its body."""
    import jinja2.ext
    import jinja2.nodes

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    return Generation


def _jinja_env(name: str):
    """transformers' chat-template environment (utils/chat_template_utils.py): without its
    `tojson` override Jinja's own escapes <, >, & and ' (a tool schema or JSON content renders
    differently), without loopcontrols a template using `{% break %}` does not compile, without
    `strftime_now` Llama 3.1+ templates print their fallback date, and without the
    `generation` block (`_generation_tag`) templates made for assistant-only losses fail."""
    import datetime
    import json as json_lib

    import jinja2.ext
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def fail(msg):
        raise HFError(f"{name}: chat template: {msg}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json_lib.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                              separators=separators, sort_keys=sort_keys)  # fmt: skip

    class Sandbox(ImmutableSandboxedEnvironment):
        """Also bounds `*` and `**`: jinja's sandbox caps range() at 100,000 but let
        `{{ 'a' * 10**9 }}` take gigabytes (a downloaded template is untrusted input)."""

        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            sized = lambda x: isinstance(x, (str, list, tuple))  # noqa: E731
            count = right if sized(left) else left if sized(right) else None
            seq = left if sized(left) else right
            if operator == "*" and isinstance(count, int) and len(seq) * count > MAX_REPEAT:
                raise SecurityError(f"a repetition of {len(seq) * count} items (the limit is "
                                    f"{MAX_REPEAT})")  # fmt: skip
            if operator == "**" and isinstance(right, int) and abs(right) > 1000:
                raise SecurityError(f"an exponent of {right} (the limit is 1000)")
            return super().call_binop(context, operator, left, right)

    env = Sandbox(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _generation_tag()],
    )  # fmt: skip
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = fail
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


def set_template_kwargs(tok, given=None, inherited=None, where: str = "chat_template_kwargs"):
    """Sets the extra chat-template variables of `tok` (`HFTokenizer.template_kwargs`, e.g.
    Qwen3's `{"enable_thinking": false}`): `given` (a JSON object as text, or a dict; from a
    config key or a flag, named by `where` in errors) wins over `inherited` (the dict a run's
    checkpoint meta recorded, so generation and evaluation render as training did). Given for
    a tokenizer without a Jinja chat template it is an error; inherited, it is ignored (another
    tokenizer was chosen). Returns `tok`."""
    if isinstance(given, str):
        if not given.strip():
            given = None
        else:
            try:
                given = json.loads(given)
            except json.JSONDecodeError as e:
                raise HFError(f"{where}={given!r} is not valid JSON ({e})") from None
    if given is not None and not isinstance(given, dict):
        example = '{"enable_thinking": false}'
        raise HFError(f"{where}={given!r}: expected a JSON object, e.g. '{example}'")
    kwargs = given if given is not None else dict(inherited or {})
    if not kwargs:
        return tok
    if not getattr(tok, "chat_template", ""):
        if given is None:
            return tok
        raise HFError(f"{where}: tokenizer {getattr(tok, 'name', tok)} has no Jinja chat template "
                      "to pass variables to")  # fmt: skip
    reserved = {"messages", "add_generation_prompt", "tools", "documents"}
    if reserved & set(kwargs):
        raise HFError(f"{where}: {sorted(reserved & set(kwargs))} are set by the renderer")
    # (a name such as "enable-thinking" rendered here, but the exported template that sets
    # it as a default did not compile: `template_with_defaults`)
    if bad := [k for k in kwargs if not (isinstance(k, str) and k.isidentifier())]:
        raise HFError(f"{where}: {bad} are not template variable names (letters, digits, _)")
    tok.template_kwargs = dict(kwargs)
    return tok


def load_tokenizer(path: str, vocab_size: int | None = None):
    """A tokenizer from a file or HF directory: tokenizer.json (HF `tokenizers`) or a
    SentencePiece tokenizer.model (flaxlm.data.tokenizer.Tokenizer). With `vocab_size`, raises
    if its ids could index past the model's embedding."""
    from flaxlm.data.tokenizer import Tokenizer

    if os.path.isdir(path):
        if f := tokenizer_file(path):
            return load_tokenizer(f, vocab_size)
        raise HFError(f"{path}: no tokenizer.json or tokenizer.model")
    if not os.path.exists(path):
        raise HFError(f"tokenizer {path} does not exist")
    try:
        tok = HFTokenizer.load(path) if path.endswith(".json") else Tokenizer.load(path)
    except ValueError as e:  # Tokenizer.load: not a SentencePiece model (names the file)
        raise HFError(str(e)) from None
    if vocab_size is not None:
        try:
            tok.check_fits(vocab_size)
        except ValueError as e:
            raise HFError(str(e)) from None
    return tok
