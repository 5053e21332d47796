"""Deterministic HF tokenizer directories for the chat-template tests (not a test module):
a byte-level BPE tokenizer.json — optionally with merges spelling some words, so templates meet
multi-byte tokens — plus a tokenizer_config.json holding the chat template
(tests/conftest.py `byte_chat_tokenizer`, tests/data/test_chat_*.py); and `imported_qwen2_run`,
the Qwen2 fixture imported with a word-level tokenizer.json (`from tests.hf_tokenizers import`).
"""

import json
import os

CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def write_hf_tokenizer(d: str, chat_template: str, config: dict, *, specials=CHATML_SPECIALS,
                       merge_words=(), pre_tokenizer=None) -> str:  # fmt: skip
    """Writes `d`/tokenizer.json and `d`/tokenizer_config.json; returns `d`.

    Every byte is a token; each word of `merge_words` (byte-level spelling, "Ġthe") adds the
    merges that build it prefix by prefix. `pre_tokenizer` replaces the plain byte-level one;
    `config` holds the special-token names (eos_token, ...) beside the chat template; a
    `bos_token` among `specials` is added to every text by the post-processor, as Llama 3's and
    Gemma's tokenizers add theirs (what makes an HF tokenizer's `bos_id`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab, merges = {c: i for i, c in enumerate(alphabet)}, []
    for w in merge_words:
        for k in range(2, len(w) + 1):
            if w[:k] not in vocab:
                merges.append((w[: k - 1], w[k - 1]))
                vocab[w[:k]] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(list(specials))
    bos = config.get("bos_token")
    if bos and bos in specials:  # as Llama 3's and Gemma's: the post-processor adds the BOS
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tk.token_to_id(bos))],
        )
    os.makedirs(d, exist_ok=True)
    tk.save(os.path.join(d, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": chat_template, **config}
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return d


QWEN2_FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf", "qwen2")


def imported_qwen2_run(root, words=()) -> tuple[str, str]:
    """(run dir, tokenizer.json path): the Qwen2 test checkpoint, with a word-level HF
    tokenizer that (like Qwen2's) has an EOS (<|endoftext|>) and no BOS — ids 0 <unk>, 1 EOS,
    then `words`, then w0 … w39 — imported with `hf import` into `root`/run."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    from flaxlm.models import hf

    src = os.path.join(root, "src")
    shutil.copytree(QWEN2_FIXTURE, src)
    vocab = ["<unk>", "<|endoftext|>", *words] + [f"w{i}" for i in range(40)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(vocab[:2])
    tok.save(os.path.join(src, "tokenizer.json"))
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": None}, f)
    run = os.path.join(root, "run")
    hf.main(["import", src, run])
    return run, os.path.join(src, "tokenizer.json")
