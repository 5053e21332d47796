"""Data-path throughput: cleaning, MinHash dedup (numpy vs datasketch), preprocess, loader.

    .venv/bin/python -m flaxlm.bench.data_throughput [--docs 100000] [--workers 2] [--out DIR]

Generates English-like documents (Zipf word frequencies over a 20k-word vocabulary, stop words,
50-400 words) plus 10% Chinese documents, then 10% exact and 10% near duplicates (word swaps,
insertions, truncation), and measures:

1. cleaning alone (one process), docs/s and MB/s;
2. MinHash signatures, numpy (multiply-shift, vectorised) vs datasketch, same shingles/perms;
3. exact + MinHash-LSH dedup alone (one process);
4. the preprocess CLI end to end (clean with ``--workers`` processes, dedup, tokenize, write);
5. the grain loader: packed tokens/s from pre-tokenized shards and with on-the-fly tokenization,
   next to what the tiny/mini models consume in a train step on this CPU.

Prints the results as JSON and writes them to OUT/results.json (`--out`; a temp dir without it),
beside the generated corpus and the preprocess output.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import string
import tempfile
import time

import numpy as np

from flaxlm.data import dedup, pipeline, preprocess
from flaxlm.data.clean import Cleaner
from flaxlm.data.tokenizer import train

STOP = ["the", "of", "and", "to", "a", "in", "is", "that", "with", "have", "be", "for"]


def generate(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = np.array(list(string.ascii_lowercase))
    vocab = np.array(
        STOP + ["".join(rng.choice(letters, rng.integers(2, 11))) for _ in range(20000)]
    )
    p = 1 / np.arange(1, len(vocab) + 1) ** 1.05
    p /= p.sum()
    # Frequent function characters first, so Zipf sampling gives Chinese its stop words.
    han = np.array(
        list("的了是在和有不这也就都我他们") + [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    )
    ph = 1 / np.arange(1, len(han) + 1)
    ph /= ph.sum()
    n_base = int(n * 0.8)
    docs = []
    for i in range(n_base):
        if i % 10 == 9:
            docs.append("".join(rng.choice(han, rng.integers(100, 600), p=ph)) + "。")
        else:
            words = rng.choice(vocab, rng.integers(50, 400), p=p)
            docs.append(" ".join(words).capitalize() + ".")
    for i in range(n - n_base):
        src = docs[int(rng.integers(0, n_base))]
        if i % 2:
            docs.append(src.upper())  # exact after normalisation
        else:
            w = src.split()
            if len(w) > 20:
                k = int(rng.integers(0, len(w) - 2))
                w[k], w[k + 1] = w[k + 1], w[k]
                w.insert(int(rng.integers(0, len(w))), "inserted")
                w = w[: int(len(w) * 0.97)]
            docs.append(" ".join(w))
    order = rng.permutation(len(docs))
    return [docs[i] for i in order]


def rate(n_docs, n_bytes, seconds):
    return {"docs_s": n_docs / seconds, "mb_s": n_bytes / 1e6 / seconds, "seconds": seconds}


def bench_clean(docs):
    c = Cleaner()
    t = time.perf_counter()
    for d in docs:
        c(d)
    return rate(len(docs), sum(len(d.encode()) for d in docs), time.perf_counter() - t)


def bench_minhash(docs, n=5, perms=128):
    nbytes = sum(len(d.encode()) for d in docs)
    t = time.perf_counter()
    h = dedup.MinHasher(perms)
    for i in range(0, len(docs), 512):
        h.signatures([dedup.shingles(d, n) for d in docs[i : i + 512]])
    numpy_r = rate(len(docs), nbytes, time.perf_counter() - t)
    t = time.perf_counter()
    dedup.datasketch_signatures(docs, n, perms)
    ds_r = rate(len(docs), nbytes, time.perf_counter() - t)
    return numpy_r, ds_r


def bench_dedup(docs):
    d = dedup.Deduper()
    t = time.perf_counter()
    for i in range(0, len(docs), 512):
        d.keep_batch(docs[i : i + 512])
    r = rate(len(docs), sum(len(x.encode()) for x in docs), time.perf_counter() - t)
    r["removed"] = dict(d.removed)
    return r


def bench_loader(data_dir, tok_path, jsonl, seq_len=256, batch=32, steps=200):
    out = {}
    for name, src, tok in (
        ("pretokenized", f"{data_dir}/tokens", ""),
        ("on_the_fly", jsonl, tok_path),
    ):
        cfg = pipeline.data_config()
        cfg.sources, cfg.tokenizer, cfg.read_threads = src, tok, 2
        it = pipeline.make_pretrain_iterator(
            cfg, seq_len=seq_len, global_batch=batch, seed=0, process_index=0, process_count=1
        )
        next(it)
        t = time.perf_counter()
        toks = sum(int(next(it)["loss_mask"].sum()) for _ in range(steps))
        out[name] = toks / (time.perf_counter() - t)
    return out


def bench_model(variant, seq_len=256, batch=32, steps=5):
    """Tokens/s of a jitted forward+backward of the model (what a train step consumes)."""
    try:
        import jax

        from flaxlm.models.config import VARIANTS
        from flaxlm.models.transformer import Transformer
        from flaxlm.train.losses import lm_loss_fn
    except ImportError as e:  # the model code is written by another issue
        return f"n/a ({e})"
    cfg = VARIANTS[variant]
    model = Transformer(cfg)
    tokens = np.zeros((batch, seq_len), np.int32)
    params = model.init(jax.random.PRNGKey(0), tokens[:1, :8])["params"]
    apply = lambda p, t, pos, seg: model.apply({"params": p}, t, pos, seg)
    loss = lm_loss_fn(apply)
    grad = jax.jit(jax.value_and_grad(lambda p, b: loss(p, b, None)[0]))
    b = {
        "tokens": tokens,
        "targets": tokens,
        "loss_mask": np.ones_like(tokens, np.float32),
        "segment_ids": np.ones_like(tokens),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape),
    }
    jax.block_until_ready(grad(params, b))
    t = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(grad(params, b))
    return batch * seq_len * steps / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    work = args.out or tempfile.mkdtemp(prefix="flaxlm-bench-")
    os.makedirs(work, exist_ok=True)
    t = time.perf_counter()
    docs = generate(args.docs)
    mb = sum(len(d.encode()) for d in docs) / 1e6
    print(f"generated {len(docs)} docs, {mb:.1f} MB in {time.perf_counter() - t:.1f}s")
    jsonl = os.path.join(work, "raw.jsonl")
    with open(jsonl, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    res = {"docs": len(docs), "mb": mb}
    res["clean_1proc"] = bench_clean(docs[:20000])
    res["minhash_numpy"], res["minhash_datasketch"] = bench_minhash(docs[:10000])
    res["dedup_1proc"] = bench_dedup(docs)
    tok_path = os.path.join(work, "tok.model")
    train(docs[:20000], 8000, model_path=tok_path, input_sentence_size=200_000)
    cfg = preprocess.preprocess_config()
    cfg.workers, cfg.tokenizer, cfg.batch_docs = args.workers, tok_path, 1024
    t = time.perf_counter()
    rep = preprocess.run([jsonl], os.path.join(work, "out"), cfg)
    res["preprocess"] = rate(len(docs), mb * 1e6, time.perf_counter() - t)
    res["preprocess"]["report"] = {k: rep[k] for k in ("documents_out", "removed", "tokens")}
    res["preprocess"]["stage_seconds"] = {s["stage"]: s["seconds"] for s in rep["stages"]}
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["loader_tokens_s"] = bench_loader(os.path.join(work, "out"), tok_path, jsonl)
    res["model_tokens_s"] = {v: bench_model(v) for v in ("tiny", "mini")}
    print(json.dumps(res, indent=1, default=str))
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
