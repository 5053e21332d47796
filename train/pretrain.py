"""Pretraining task: next-token loss on packed batches, held-out loss/perplexity as eval.

`build_task(config, mesh, workdir)` returns the loop's Task; `run(config, workdir)` trains it.
Data (`config.data.kind`): "text" — the grain pipeline (data/pipeline.py) over `data.sources`,
or the built-in world's corpus when no source is given; "markov" — a synthetic chain with known
entropy (tests, benchmarks). With text data the tokenizer is copied into the workdir and named
in every checkpoint's meta, so a checkpoint alone is enough to generate from it.
"""

from __future__ import annotations

import logging
import math
import os

import jax
import numpy as np

from flaxlm.config_values import is_int
from flaxlm.configs.common import to_model_config
from flaxlm.models.config import check_trainable_dtypes, rows_past_max_seq_len
from flaxlm.models.moe import COLLECTION as MOE_STATS
from flaxlm.models.moe import collect_stats
from flaxlm.models.sharding import check_batch_divides, make_mesh, shard_batch
from flaxlm.models.transformer import Transformer
from flaxlm.train import loop
from flaxlm.train.losses import chunked_lm_loss_fn, lm_loss_fn, router_coefs
from flaxlm.train.step import jit_eval_step


def model_fns(cfg):
    """(init_params, apply) for a Transformer: init is rng -> boxed params."""
    model = Transformer(cfg)

    def init_params(rng):
        tokens = np.zeros((1, 8), np.int32)
        return model.init(rng, tokens)["params"]

    def apply(params, tokens, positions=None, segment_ids=None, method=None, moe_stats=False):
        """Logits; `method="backbone"` gives the final hidden states (and None), `"logits"`
        applies the LM head to hidden states given as `tokens`. `moe_stats=True` returns
        (that, {router statistic: mean over layers}) (models/moe.py; {} for a dense model)."""
        if method == "logits":
            return model.apply({"params": params}, tokens, method="logits")
        args = (tokens, positions, segment_ids)
        if not moe_stats:
            return model.apply({"params": params}, *args, method=method)
        out, state = model.apply({"params": params}, *args, method=method,
                                 mutable=[MOE_STATS])  # fmt: skip
        return out, collect_stats(state.get(MOE_STATS, {}))

    return init_params, apply


def init_loader(init_params):
    """`Task.load_init_params` for an LM: refuses (naming the parameters) an `init_from` run
    whose model config has other parameter shapes or layers, before anything is read; `ema`
    (`init_from_ema`): the run's EMA weights. Any language-model run reads as every alignment
    stage reads it (alignment/common.py `load_lm_params`): plain, LoRA (adapters merged), PPO
    (its policy), or a reward model's backbone where the LM head is the embedding."""
    from flaxlm.train import checkpoint as ckpt_lib
    from flaxlm.train.state import unbox

    def load(run_dir, target, ema=False):
        from flaxlm.alignment.common import load_lm_params  # (alignment imports train)

        if run_dir.startswith(HF_PREFIX):  # (its architecture is this run's: model_config)
            return load_lm_params(run_dir, target, ema=ema)
        step, meta = ckpt_lib.read_meta(run_dir)  # then that step, not a newer latest
        if meta.get("model_config"):
            init = model_fns(to_model_config(meta["model_config"]))[0]
            stored = unbox(jax.eval_shape(init, jax.random.PRNGKey(0)))
            diff = ckpt_lib.shape_diff(target, stored)
            if diff:
                more = f" (and {len(diff) - 5} more)" if len(diff) > 5 else ""
                raise ckpt_lib.CheckpointError(
                    f"init_from={run_dir}: its checkpoint does not fit config.model; it has "
                    f"{'; '.join(diff[:5])}{more}"
                )
        if meta.get("head") == "scalar" and "lm_head" in target:
            raise ckpt_lib.CheckpointError(
                f"init_from={run_dir}: a reward-model run (scalar head): its backbone has no LM "
                "head (lm_head), which this model has (model.tie_embeddings=False); start from "
                "the language model it was trained from (its init_from) instead"
            )
        return load_lm_params(run_dir, target, step, ema=ema)

    return load


def lm_loss(apply, loss_cfg, prepare=None, moe: bool = False):
    """The next-token loss `config.loss` asks for: over full logits, or chunked over tokens
    when `loss.chunk_tokens` > 0 (train/losses.py `chunked_cross_entropy`). `apply` is
    model_fns' apply; `prepare` maps the train params to the model's (LoRA merge). `moe`
    (a model with experts) adds the router losses, `loss.moe_aux` × load balance +
    `loss.moe_z` × router z-loss, and logs the router statistics as `moe/...`."""
    chunk = loss_cfg.get("chunk_tokens", 0)
    router = router_coefs(loss_cfg, moe)
    if chunk:
        return chunked_lm_loss_fn(apply, chunk, loss_cfg.z_loss, prepare, router)
    if prepare is not None:
        inner = apply
        apply = lambda params, *a, **kw: inner(prepare(params), *a, **kw)  # noqa: E731
    return lm_loss_fn(apply, z_loss=loss_cfg.z_loss, router=router)


def _least(key: str, value, least: int, most: int | None = None, why: str = "") -> None:
    """Refuses, naming the key, a `value` that is not an integer in [least, most]."""
    if not (is_int(value) and value >= least and (most is None or value <= most)):
        what = f"an integer >= {least}" + (f" and <= {most}" if most is not None else "")
        raise ValueError(f"config: {key}={value!r} must be {what}{why}")


def check_sizes(config) -> None:
    """Refuses, naming the key, a batch the data cannot make, before anything is built: a
    markov `batch_size=0` failed in numpy (IndexError) at the first batch, `seq_len=0` trained
    on rows without a token (loss 0.0), `data.markov_branching=0` failed in the sampler
    (IndexError; one above `model.vocab_size` in numpy's rng). `data.eval_batches` < 1 made
    every text eval pack the whole held-out set, and a markov eval average nothing (KeyError
    'nll')."""
    _least("batch_size", config.batch_size, 1)
    _least("seq_len", config.seq_len, 1, why=" (tokens per row; one makes one next-token pair)")
    _least("data.eval_batches", config.data.eval_batches, 1, why=" (held-out batches per eval)")
    if config.data.kind == "markov":
        why = " (model.vocab_size: the successors of each token)"
        _least("data.markov_branching", config.data.markov_branching, 1, config.model.vocab_size,
               why)  # fmt: skip


HF_PREFIX = "hf:"


def model_config(config):
    """The model pretraining builds: config.model, or with `init_from=hf:DIR` (continued
    pretraining of an HF checkpoint) that checkpoint's architecture from its config.json, with
    the `model.` keys this run sets over it (the execution ones, the context ones: as every
    alignment stage, `alignment.common.with_model_keys_set`, which refuses one that would change
    what the weights compute). A flaxlm run as init_from keeps config.model (the variant's
    shapes, checked against the run's before anything is read: loop_resume)."""
    if config.get("init_from", "").startswith(HF_PREFIX):
        from flaxlm.alignment.common import with_model_keys_set  # (alignment imports train)
        from flaxlm.models import hf

        return with_model_keys_set(config, hf.load_config(config.init_from[len(HF_PREFIX) :]))
    return to_model_config(config.model)


def source_tokenizer(config):
    """The tokenizer of text data when data.tokenizer is empty and init_from names a model:
    the HF directory's, or the flaxlm run's (its checkpoint meta); None otherwise (the shards'
    own tokenizer, or the built-in one, as before). Token shards made with another tokenizer
    are then refused by the pipeline (their tokenizer_sha256) rather than read as the model's
    ids. With data.tokenizer set and the source's differing, a warning (as the alignment
    stages'): its ids mean other pieces than the model learnt."""
    source = config.get("init_from", "")
    if config.data.kind != "text" or not source:
        return None
    from flaxlm.alignment.run_tokenizer import source_tokenizer_path
    from flaxlm.data import pipeline
    from flaxlm.data.source_errors import DataError

    path = source_tokenizer_path(source)
    if not config.data.tokenizer:
        if not path:
            return None
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"init_from={source}: its tokenizer {path} is gone; set data.tokenizer"
            )
        return pipeline.open_tokenizer(path, f"init_from={source}: tokenizer")
    ours = pipeline.open_tokenizer(config.data.tokenizer)
    try:  # (a source without a readable tokenizer: nothing to compare)
        theirs = pipeline.open_tokenizer(path, "init_from") if path else None
    except DataError:
        theirs = None
    if theirs is not None and ours.sha256 != theirs.sha256:
        logging.getLogger("flaxlm").warning(
            "data.tokenizer=%s is not the tokenizer init_from=%s was trained with (%s): token "
            "ids will mean other pieces than the model learnt", config.data.tokenizer, source,
            path,
        )  # fmt: skip
    return ours


def _builtin_world_texts(split: str = "pretrain") -> list[str]:
    from flaxlm.data import synthetic

    world = synthetic.build_world("demo", seed=0)
    return [d["text"] for d in getattr(world, split)]


def make_batches(config, *, seed: int, tokenizer=None, vocab_size: int | None = None):
    """The training batch iterator named by `config.data.kind`; the tokenizer must fit
    `vocab_size` (default `config.model.vocab_size`)."""
    vocab_size = vocab_size or config.model.vocab_size
    d = config.data
    if d.kind == "markov":
        from flaxlm.data.markov import MarkovStream

        return MarkovStream(
            vocab_size,
            config.seq_len,
            config.batch_size,
            seed=seed,
            branching=d.markov_branching,
            chain_seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    if d.kind == "text":
        from flaxlm.data import pipeline

        if not d.sources and pipeline._BUILTIN is None:
            pipeline.register_builtin_corpus(_builtin_world_texts)
        return pipeline.make_pretrain_iterator(
            d,
            seq_len=config.seq_len,
            global_batch=config.batch_size,
            seed=seed,
            vocab_size=vocab_size,
            tokenizer=tokenizer,
        )
    raise ValueError(f"config.data.kind={d.kind!r}; expected 'text' or 'markov'")


def eval_order(sizes: list[int], weights: list[float]) -> np.ndarray:
    """The order held-out documents are read in: indices into the sources concatenated, the
    sources interleaved by weight (counted in documents, as training's mixture is), each in its
    own order, deterministically: document j of source k comes at (j + 1) / weight_k, ties to
    the earlier source, so every prefix holds each source's share to within a document, and
    once a source runs out the others go on. One source: its documents in order."""
    keys = np.concatenate([(np.arange(n) + 1) / w for n, w in zip(sizes, weights)])
    source = np.concatenate([np.full(n, k) for k, n in enumerate(sizes)])
    return np.lexsort((source, keys))  # by key, then by source (stable within a source)


class _Reordered:
    """Random access to `docs` in `order` (a grain source)."""

    def __init__(self, docs, order: np.ndarray):
        self.docs, self.order = docs, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        return self.docs[int(self.order[i])]


class _Counted:
    """A document iterator that counts what the packer took (data/packing.py reads it)."""

    def __init__(self, it):
        self.it, self.taken = it, 0

    def __iter__(self):
        return self

    def __next__(self):
        doc = next(self.it)
        self.taken += 1
        return doc

    def get_state(self) -> dict:
        return self.it.get_state()

    def set_state(self, state: dict) -> None:
        self.it.set_state(state)


def _warn_short_eval_sources(entries, sizes, order, taken: int, batches: int) -> None:
    """Logs a warning when a held-out source ran out before the batches were full (the packer
    took `taken` documents of `order`), so it weighs less in the held-out loss than its weight
    says; names it, with the documents measured per source."""
    source = np.searchsorted(np.cumsum(sizes), order[:taken], side="right")
    counts = np.bincount(source, minlength=len(sizes))
    total = sum(w for _, w in entries)
    short = [p for (p, w), c in zip(entries, counts) if c < taken * w / total - 1]
    if short:
        logging.warning(
            "data.eval_sources: %s ran out before the held-out batches (data.eval_batches=%d) "
            "were full, so the held-out loss weighs it below its weight; documents measured "
            "per source: %s of %s (weights %s)",
            ", ".join(short),
            batches,
            counts.tolist(),
            list(sizes),
            [w for _, w in entries],
        )


def text_eval_batches(config, tokenizer) -> list[dict]:
    """Held-out text packed into at most `eval_batches` global batches (this process's rows).

    Framed and packed as training is (data/pipeline.py `open_framed_source`, `data.pack_mode`):
    token shards whose meta.json says `bos_eos: true` used to get a second BOS and EOS here, and
    every eval was packed in split mode. Bad held-out records follow `data.strict` (raise, or
    counted and logged; they used to be dropped without a line). Documents are tokenized as the
    packer reaches them: only those the batches hold (and grain's read-ahead), not every one.
    Several `data.eval_sources` are interleaved by their weights (`eval_order`; no weights: one
    document of each in turn), so each is measured: they were read one after the other, and the
    batches held only the first source's documents. A source that runs out before the batches
    are full is logged. The loss is a mean over tokens, so a source of longer documents weighs
    more than its document share. One source gives the batches it always did.
    """
    import grain

    from flaxlm.data import pipeline, sources

    d = config.data
    # (Also distillation's held-out set, which is built here without `check_sizes`.)
    _least("data.eval_batches", d.eval_batches, 1, why=" (held-out batches per eval)")
    log = sources.BadInputLog(strict=d.strict)
    if d.eval_sources:
        what, where = "data.eval_sources", f"data.eval_sources {d.eval_sources}"
        # (a pattern matching nothing, or a weight that is not a number: named by its key)
        entries = pipeline.source_entries(d.eval_sources, "data.eval_sources")
        parts = [pipeline.open_framed_source(p, d, tokenizer, log, what=what)
                 for p, _ in entries]  # fmt: skip
    elif d.sources:
        # The built-in world's held-out text says nothing about a model of other data (and is
        # scored with another tokenizer than the one it was made for): refuse, name the keys
        # (a DataError: one line from the trainer).
        raise sources.DataError(
            f"data.sources={d.sources!r} but data.eval_sources is empty: the held-out loss "
            "would be measured on the built-in demo world's text. Set "
            "--config.data.eval_sources=HELDOUT (jsonl/parquet/text, or token shards from "
            "flaxlm.data.preprocess with --config.tokenizer=<the training tokenizer>) or "
            "--config.eval_every=0"
        )
    else:
        what = where = "built-in held-out text"
        texts = _builtin_world_texts("heldout_text")
        entries = [("", 1.0)]
        parts = [pipeline.open_framed_source("", d, tokenizer, log, texts, what)]
    if log.total:
        logging.warning("%s: skipped %d bad records: %s", where, log.total, log.to_dict())
    # One random-access source of framed documents, the sources interleaved by weight.
    sizes = [len(s) for s, _ in parts]
    order = eval_order(sizes, [w for _, w in entries])
    framed = sources.ConcatSource([grain.MapDataset.source(s).map(f) for s, f in parts])
    read = grain.ReadOptions(num_threads=d.read_threads, prefetch_buffer_size=d.prefetch)
    docs = grain.MapDataset.source(_Reordered(framed, order)).to_iter_dataset(read)
    counted = _Counted(iter(docs))
    packer = pipeline.PackedBatchIterator(
        counted,
        seq_len=config.seq_len,
        batch=config.batch_size,
        pad_id=tokenizer.pad_id,
        mode=d.pack_mode,
    )
    rows = config.batch_size // jax.process_count()
    lo = jax.process_index() * rows
    out = []
    for batch in packer:
        out.append({k: v[lo : lo + rows] for k, v in batch.items()})
        if len(out) == d.eval_batches:
            break
    if not out:  # the held-out loss would be 0 over no tokens
        raise sources.DataError(
            f"{where}: no held-out document has the 2 tokens one (input, target) pair needs"
        )
    if len(parts) > 1:
        _warn_short_eval_sources(entries, sizes, order, counted.taken, d.eval_batches)
    return out


def make_eval_fn(config, mesh, loss_fn, tokenizer=None):
    """Held-out loss over a fixed set of batches (text: held-out documents; markov: the same
    chain, a different seed), each in `opt.grad_accum` micro-batches as training splits its
    batches (train/step.py `eval_step`): it jitted the whole batch at once, so a run sized with
    grad_accum could run out of memory in the eval at step 0 (`eval_at_start`)."""
    if config.data.kind == "text":
        host_batches = text_eval_batches(config, tokenizer)
    else:
        it = make_batches(config, seed=config.seed + 10_000)
        host_batches = [next(it) for _ in range(config.data.eval_batches)]
    batches = [shard_batch(b, mesh) for b in host_batches]
    step = jit_eval_step(loss_fn, config.opt.grad_accum)

    def eval_fn(params):
        sums, weight = {}, 0.0
        # every batch dispatched before the one fetch: the device runs them back to back
        for m in jax.device_get([step(params, b) for b in batches]):
            w = float(m["weight"])
            weight += w
            for k, v in m.items():
                if k != "weight":
                    sums[k] = sums.get(k, 0.0) + w * float(v)
        out = {k: v / max(weight, 1.0) for k, v in sums.items()}
        out["perplexity"] = math.exp(min(out["nll"], 50.0))
        return out

    return eval_fn


def build_task(config, mesh, workdir: str | None = None) -> loop.Task:
    """The pretraining Task; with a workdir the text tokenizer is saved there for the meta."""
    check_sizes(config)
    cfg = model_config(config)
    check_trainable_dtypes(cfg)
    if why := rows_past_max_seq_len(cfg, config.seq_len):
        logging.getLogger("flaxlm").warning("%s", why)
    check_batch_divides(config.batch_size, mesh)
    init_params, apply = model_fns(cfg)
    loss_fn = lm_loss(apply, config.loss, moe=cfg.n_experts > 0)
    batches = make_batches(config, seed=config.seed, tokenizer=source_tokenizer(config),
                           vocab_size=cfg.vocab_size)  # fmt: skip
    tokenizer = getattr(batches, "tokenizer", None)
    meta = {"model_config": cfg.to_dict()}
    if tokenizer is not None and workdir is not None:
        from flaxlm.alignment.run_tokenizer import save_tokenizer  # (alignment imports train)

        meta["tokenizer"] = save_tokenizer(tokenizer, workdir)  # .model, or HF's files
    return loop.Task(
        name="pretrain",
        init_params=init_params,
        loss_fn=loss_fn,
        train_batches=batches,
        eval_fn=make_eval_fn(config, mesh, loss_fn, tokenizer) if config.eval_every else None,
        flops_per_token=cfg.flops_per_token(config.seq_len),
        flops_per_token_causal=cfg.flops_per_token(config.seq_len, causal=True),
        load_init_params=init_loader(init_params),
        model_meta=meta,
    )


def run(config, workdir: str):
    loop.check_cadence(config)  # (again in loop.run) before the data and tokenizer are built
    loop.init_from_ema(config)  # (likewise) before an HF source's config.json is read
    mesh = make_mesh(dict(config.mesh))
    return loop.run(config, workdir, build_task(config, mesh, workdir), mesh=mesh)
