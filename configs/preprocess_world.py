"""Preprocessing settings for the built-in world's corpus (used by `make demo`).

    python -m flaxlm.data.preprocess --input runs/demo/world/pretrain.jsonl \
        --output runs/demo/data --config configs/preprocess_world.py \
        --config.clean.toxic_lists=default,runs/demo/world/unsafe_words.txt \
        --config.dedup.decontam_paths=runs/demo/world/heldout_text.jsonl

The world's documents are short, formulaic synthetic texts (biographies of 3–5 sentences,
arithmetic drills, spelled-out words), so web-tuned Gopher thresholds would discard most clean
documents: the length, word-length, stop-word and n-gram-repetition limits are relaxed here.
Everything aimed at noise stays on: boilerplate/symbol-line stripping and the boilerplate page
filter, the word-list filter (the world's own unsafe words are added on the command line),
PII redaction, exact and MinHash near-duplicate removal, and decontamination against the
held-out text used for perplexity (its path is given on the command line too).
"""

from flaxlm.data.preprocess import preprocess_config


def get_config(arg=None):
    c = preprocess_config()
    c.clean.min_words = 8  # biographies can be one short paragraph
    c.clean.min_mean_word_len = 1.0  # arithmetic ("7 + 3 = 10") and spelled words ("l a m p")
    c.clean.min_stop_words = 0  # Gopher's 8 English stop words are rare in 30-word bios
    c.clean.min_alpha_words = 0.3  # arithmetic drills are mostly numbers
    c.clean.max_symbol_ratio = 0.05  # but '#' banners are noise
    c.clean.max_top_ngram_char_frac = (0.4, 0.35, 0.3)  # drills repeat their templates
    c.clean.max_dup_ngram_char_frac = (0.6,) * 6  # text in repeated 5..10-grams: templates again
    c.dedup.threshold = 0.7  # the world's near-duplicates are ≥ 0.75 word-5-gram Jaccard
    # Held-out text comes from the same templates, so shared 13-grams are expected: flag them
    # (counted in the report) rather than drop facts the evaluation asks about.
    c.dedup.decontam_mode = "flag"
    c.train_tokenizer_vocab = 2048  # SentencePiece BPE with byte fallback and chat tokens
    c.shard_docs = 1000  # documents per ArrayRecord shard (the world's corpus: several, not one)
    c.batch_docs = 256  # documents per processing batch (memory holds one)
    c.lock()
    return c
