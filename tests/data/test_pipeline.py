"""Packed grain batches: format, no cross-document targets, no token lost over an epoch,
mixture proportions, per-process sharding, exact resume in a fresh process, built-in fallback."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flaxlm.data import pipeline
from flaxlm.data import tokenizer as T
from flaxlm.data.sources import DataError

WORDS = "the river runs past old mill into green valley where farmers grow wheat".split()


def corpus(seed, n, lo=3, hi=120, prefix=""):
    rng = np.random.default_rng(seed)
    return [prefix + " ".join(rng.choice(WORDS, rng.integers(lo, hi))) + f" {i}." for i in range(n)]


def write_jsonl(path, docs):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tok.model")
    T.train(corpus(0, 300) + ["apple banana"] * 20, 400, model_path=path)
    return path


def cfg_for(sources, tok, **kw):
    c = pipeline.data_config()
    c.sources, c.tokenizer = sources, tok
    c.read_threads = 2
    c.update(kw)
    return c


def make(cfg, pi=0, pc=1, seq_len=64, batch=4, seed=0):
    return pipeline.make_pretrain_iterator(
        cfg,
        seq_len=seq_len,
        global_batch=batch * pc,
        seed=seed,
        process_index=pi,
        process_count=pc,
    )


def check_row_invariants(b, bos, eos):
    """Targets are the next token within a piece; positions restart; padding only at the end."""
    tok, tgt, seg, pos, m = (
        b[k] for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask")
    )
    assert tok.dtype == tgt.dtype == seg.dtype == pos.dtype == np.int32
    assert m.dtype == np.float32
    for r in range(tok.shape[0]):
        n = int((seg[r] > 0).sum())
        if n == 0:  # an all-padding row (the last batch of a finite epoch)
            assert (m[r] == 0).all()
            continue
        assert (seg[r, n:] == 0).all() and (m[r, :n] == 1).all() and (m[r, n:] == 0).all()
        assert (np.diff(seg[r, :n]) >= 0).all() and (np.diff(seg[r, :n]) <= 1).all()
        same = seg[r, 1:n] == seg[r, : n - 1]
        # Inside a piece, the target of t is the input at t+1: nothing is predicted across pieces.
        assert (tgt[r, : n - 1][same] == tok[r, 1:n][same]).all()
        assert (pos[r, 1:n][same] == pos[r, : n - 1][same] + 1).all()
        assert (pos[r, 1:n][~same] == 0).all() and (n == 0 or pos[r, 0] == 0)
        # BOS is only ever an input at a document start; EOS only ever a target.
        assert bos not in tgt[r, :n] and eos not in tok[r, :n]


def collect_documents(batches, eos):
    """Rebuilds (input, target) sequences of whole documents from packed rows."""
    docs, cur = [], []
    for b in batches:
        for r in range(b["tokens"].shape[0]):
            seg = b["segment_ids"][r]
            for s in range(1, int(seg.max()) + 1):
                sel = seg == s
                cur.extend(zip(b["tokens"][r][sel].tolist(), b["targets"][r][sel].tolist()))
                if cur[-1][1] == eos:
                    docs.append(tuple(cur))
                    cur = []
    assert cur == []
    return docs


def expected_documents(texts, tokpath):
    t = T.Tokenizer.load(tokpath)
    out = []
    for ids in t.encode_batch(texts, bos=True, eos=True):
        out.append(tuple(zip(ids[:-1], ids[1:])))
    return out


def test_batch_format_and_shift(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", corpus(1, 200))
    it = make(cfg_for(path, tok))
    t = it.tokenizer
    for _ in range(10):
        b = next(it)
        assert set(b) == {"tokens", "targets", "loss_mask", "segment_ids", "positions"}
        assert all(v.shape == (4, 64) for v in b.values())
        assert (b["segment_ids"] > 0).all()  # split mode: rows are full
        check_row_invariants(b, t.bos_id, t.eos_id)


@pytest.mark.parametrize("mode", ["split", "pad"])
def test_epoch_loses_and_duplicates_nothing(tmp_path, tok, mode):
    texts = corpus(2, 150, hi=200)  # some documents longer than a row
    path = write_jsonl(tmp_path / "a.jsonl", texts)
    cfg = cfg_for(path, tok, num_epochs=1, pack_mode=mode)
    got = []
    for pi in range(2):  # two processes share the epoch
        batches = list(make(cfg, pi=pi, pc=2, seq_len=48, batch=3))
        eos = T.Tokenizer.load(tok).eos_id
        for b in batches:
            check_row_invariants(b, T.Tokenizer.load(tok).bos_id, eos)
            assert b["tokens"].shape == (3, 48)
            if mode == "pad":  # mid-row pieces are whole documents: they start with BOS
                mid = (b["positions"] == 0) & (b["segment_ids"] > 1)
                assert (b["tokens"][mid] == T.Tokenizer.load(tok).bos_id).all()
        got += collect_documents(batches, eos)
    assert sorted(got) == sorted(expected_documents(texts, tok))


def test_mixture_proportions(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [f"apple {'apple ' * (i % 7)}" for i in range(300)])
    b = write_jsonl(tmp_path / "b.jsonl", [f"banana {'banana ' * (i % 5)}" for i in range(50)])
    # pad mode keeps these short documents whole, so each piece names its source.
    it = make(cfg_for(f"{a}:0.75,{b}:0.25", tok, pack_mode="pad"), seq_len=128, batch=8)
    t = it.tokenizer
    apple, banana = t.encode("apple")[-1], t.encode("banana")[-1]
    counts = collections.Counter()
    for _ in range(40):
        x = next(it)
        for r in range(8):
            for s in range(1, int(x["segment_ids"][r].max()) + 1):
                toks = set(x["tokens"][r][x["segment_ids"][r] == s].tolist())
                counts["a" if apple in toks else "b" if banana in toks else "?"] += 1
    total = counts["a"] + counts["b"]
    assert total > 800 and counts["?"] == 0
    assert abs(counts["a"] / total - 0.75) < 0.02, counts


def test_processes_get_disjoint_documents(tmp_path, tok):
    texts = corpus(3, 120)
    path = write_jsonl(tmp_path / "a.jsonl", texts)
    cfg = cfg_for(path, tok, num_epochs=1)
    eos = T.Tokenizer.load(tok).eos_id
    per = [set(collect_documents(list(make(cfg, pi=i, pc=3)), eos)) for i in range(3)]
    assert not (per[0] & per[1]) and not (per[1] & per[2]) and not (per[0] & per[2])
    assert abs(len(per[0]) - len(per[2])) <= 1


def test_seed_determinism(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", corpus(4, 100))
    a, b, c = (make(cfg_for(path, tok), seed=s) for s in (1, 1, 2))
    xa, xb, xc = next(a), next(b), next(c)
    assert all(np.array_equal(xa[k], xb[k]) for k in xa)
    assert not np.array_equal(xa["tokens"], xc["tokens"])


RESUME_SCRIPT = r"""
import json, sys
import numpy as np
from flaxlm.data import pipeline
cfg = pipeline.data_config()
cfg.update(json.loads(sys.argv[1]))
it = pipeline.make_pretrain_iterator(cfg, seq_len=40, global_batch=6, seed=5, process_index=1,
                                     process_count=2)
mode, path = sys.argv[2], sys.argv[3]
if mode == "save":
    for _ in range(7):
        next(it)
    json.dump(it.get_state(), open(path, "w"))
else:
    it.set_state(json.load(open(path)))
    batches = [next(it) for _ in range(6)]
    np.savez(path + ".npz", **{f"{i}_{k}": v for i, b in enumerate(batches) for k, v in b.items()})
"""


def test_resume_in_fresh_process_equals_uninterrupted(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", corpus(5, 80, hi=150))
    b = write_jsonl(tmp_path / "b.jsonl", corpus(6, 30, prefix="apple "))
    over = {"sources": f"{a}:2,{b}:1", "tokenizer": tok, "num_epochs": 0, "read_threads": 2}
    cfg = cfg_for(over["sources"], tok)
    ref = make(cfg, pi=1, pc=2, seq_len=40, batch=3, seed=5)
    ref_batches = [next(ref) for _ in range(13)][7:]
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    state = str(tmp_path / "state.json")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for mode in ("save", "load"):
        subprocess.run(
            [sys.executable, str(script), json.dumps(over), mode, state],
            check=True,
            env=env,
            timeout=120,
        )
    st = json.load(open(state))["processes"]["1"]  # process 1 of 2 (simulated: its own only)
    assert st["carry"] and st["offset"] > 0  # resumes mid-document
    got = np.load(state + ".npz")
    for i, rb in enumerate(ref_batches):
        for k, v in rb.items():
            np.testing.assert_array_equal(got[f"{i}_{k}"], v, err_msg=f"batch {i} {k}")


def test_state_is_json_and_resumes_across_epoch_boundary(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", corpus(7, 20))
    cfg = cfg_for(path, tok, num_epochs=3)
    ref = list(make(cfg))
    it = make(cfg)
    for _ in range(len(ref) // 2):
        next(it)
    st = json.loads(json.dumps(it.get_state()))
    fresh = make(cfg)
    fresh.set_state(st)
    rest = list(fresh)
    assert len(rest) == len(ref) - len(ref) // 2
    for x, y in zip(rest, ref[len(ref) // 2 :]):
        assert all(np.array_equal(x[k], y[k]) for k in x)


def test_bad_input_strict_and_lenient(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok doc here"}\n{"text": broken\n{"text": "another ok"}\n')
    it = make(cfg_for(str(path), tok))
    assert it.bad_input.counts == {"malformed_json": 1}
    next(it)
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed_json"):
        make(cfg_for(str(path), tok, strict=True))


def test_vocab_fit_and_global_batch_checks(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", corpus(8, 10))
    with pytest.raises(ValueError, match="vocab_size is 64"):
        pipeline.make_pretrain_iterator(
            cfg_for(path, tok),
            seq_len=8,
            global_batch=2,
            seed=0,
            process_index=0,
            process_count=1,
            vocab_size=64,
        )
    with pytest.raises(ValueError, match="does not divide"):
        pipeline.make_pretrain_iterator(
            cfg_for(path, tok), seq_len=8, global_batch=4, seed=0, process_index=0, process_count=3
        )


def test_builtin_corpus_fallback(tmp_path):
    cfg = pipeline.data_config()
    cfg.cache_dir, cfg.builtin_vocab_size = str(tmp_path), 300
    pipeline.register_builtin_corpus(None)
    with pytest.raises(RuntimeError, match="register_builtin_corpus"):
        make(cfg)
    pipeline.register_builtin_corpus(lambda: corpus(9, 100))
    try:
        it = make(cfg)
        b = next(it)
        check_row_invariants(b, it.tokenizer.bos_id, it.tokenizer.eos_id)
        assert len(os.listdir(tmp_path)) == 1  # the trained tokenizer is cached
        assert make(cfg).tokenizer.sha256 == it.tokenizer.sha256
    finally:
        pipeline.register_builtin_corpus(None)


def test_make_global_over_8_devices(tmp_path, tok):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    path = write_jsonl(tmp_path / "a.jsonl", corpus(10, 50))
    it = make(cfg_for(path, tok), batch=8, seq_len=16)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    g = pipeline.make_global(next(it), NamedSharding(mesh, PartitionSpec("data")))
    assert g["tokens"].shape == (8, 16) and len(g["tokens"].addressable_shards) == 8


def test_parse_sources():
    assert pipeline.parse_sources("a/*.jsonl:0.7, b:0.3,c") == [
        ("a/*.jsonl", 0.7),
        ("b", 0.3),
        ("c", 1.0),
    ]
    assert pipeline.parse_sources("") == []
    with pytest.raises(ValueError, match="must be > 0"):
        pipeline.parse_sources("a:0")


def test_finite_mixture_warns_that_it_stops_at_the_first_exhausted_source(tmp_path, tok, caplog):
    # grain's mix ends when one source runs out: with num_epochs=1 and equal weights only 10 of
    # the 40 documents of `a` are ever read. That used to happen silently.
    a = write_jsonl(tmp_path / "a.jsonl", corpus(8, 40))
    b = write_jsonl(tmp_path / "b.jsonl", corpus(9, 10))
    with caplog.at_level("WARNING"):
        it = make(cfg_for(f"{a}:1,{b}:1", tok, num_epochs=1))
    assert "[10, 10] of [40, 10]" in caplog.text
    assert sum(1 for _ in it._docs) == 20
    caplog.clear()
    with caplog.at_level("WARNING"):  # weights proportional to the sizes use every document
        it = make(cfg_for(f"{a}:4,{b}:1", tok, num_epochs=1))
    assert "mixture" not in caplog.text and sum(1 for _ in it._docs) == 50


def test_documents_get_no_bos_or_eos_the_tokenizer_lacks():
    """A tokenizer without BOS (Qwen2's) or EOS has id -1 for it: not written into documents
    (the embedding would wrap -1 to the last row, an arbitrary token)."""
    from flaxlm.data.pipeline import _Tokenize

    class Tok:
        bos_id, eos_id = -1, 7

        def encode(self, text):
            return [ord(c) for c in text]

    np.testing.assert_array_equal(_Tokenize(Tok(), True, True).map("ab"), [97, 98, 7])
    Tok.bos_id, Tok.eos_id = 5, -1
    np.testing.assert_array_equal(_Tokenize(Tok(), True, True).map(np.array([1, 2])), [5, 1, 2])


def test_a_source_of_only_bad_records_says_why_it_has_no_documents(tmp_path, tok):
    """Every line with another field name: the error said only "has no documents" (the warning
    that counts bad records comes after every source has opened, so it was never logged)."""
    good = write_jsonl(tmp_path / "good.jsonl", corpus(8, 5))
    bad = tmp_path / "wrongfield.jsonl"
    lines = [json.dumps({"content": f"the river {i}"}) for i in range(100)] + ['{"text": broken']
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        make(cfg_for(f"{good}:1,{bad}:1", tok))
    msg = str(e.value)
    assert f"data source {bad} has no documents: all 101 records were skipped" in msg
    assert f"missing_field x100, e.g. {bad}:1: missing_field (no 'text')" in msg
    assert "malformed_json x1" in msg and "check data.text_field ('text')" in msg


def _next_or_error(it, seconds=120):
    """next(it) in a thread: what it raised or returned, or "hung" after ``seconds``."""
    import threading

    box = []

    def run():
        try:
            box.append(next(it))
        except BaseException as e:  # the test inspects it
            box.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    return box[0] if box else "hung"


def test_data_without_a_single_pair_is_an_error_not_a_hang(tmp_path, tok):
    """One-token documents (no BOS/EOS) make no (input, target) pair: with num_epochs=0 next()
    read the endless stream forever; with num_epochs=1 the data silently "ended" at once."""
    path = write_jsonl(tmp_path / "oneword.jsonl", ["river"] * 50)
    assert len(T.Tokenizer.load(tok).encode("river")) == 1
    for epochs in (0, 1):
        it = make(cfg_for(path, tok, add_bos=False, add_eos=False, num_epochs=epochs), batch=2)
        got = _next_or_error(it)
        assert isinstance(got, DataError), (epochs, got)
        assert f"data.sources {path}: no document has the 2 tokens" in str(got)
    # With BOS and EOS the same documents train.
    next(make(cfg_for(path, tok, num_epochs=1), batch=2))


def test_a_process_whose_documents_hold_no_pair_is_an_error(tmp_path, tok):
    """Process 1 of 2 got only one-token documents: its first batch was the end of its data, and
    the run (which stops at the fewest batches of any process) trained nothing. A resumed
    iterator's empty batch is still the end of the data."""
    path = write_jsonl(tmp_path / "a.jsonl", ["the river runs past", "river"] * 4)
    cfg = cfg_for(path, tok, add_bos=False, add_eos=False, num_epochs=1, shuffle=False)
    with pytest.raises(DataError, match=r"no document of process 1 of 2 has the 2 tokens"):
        next(make(cfg, pi=1, pc=2, batch=1))
    assert sum(1 for _ in make(cfg, pi=0, pc=2, batch=1)) == 1  # process 0 has the pairs
    done = make(cfg, batch=1)
    assert sum(1 for _ in done) == 1
    resumed = make(cfg, batch=1)
    resumed.set_state(done.get_state())  # at the end of the data
    with pytest.raises(StopIteration):
        next(resumed)


def test_an_endless_stream_whose_process_share_holds_no_pair_is_an_error_not_a_hang(tmp_path, tok):
    """num_epochs=0: process 1 of 2 got only one-token documents while process 0's had pairs, so
    its next() read its endless share forever (only data without any pair was an error)."""
    path = write_jsonl(tmp_path / "a.jsonl", ["the river runs past", "river"] * 4)
    cfg = cfg_for(path, tok, add_bos=False, add_eos=False, num_epochs=0, shuffle=False)
    got = _next_or_error(make(cfg, pi=1, pc=2, batch=1), seconds=30)
    assert isinstance(got, DataError), got
    assert "no document of process 1 of 2 has the 2 tokens" in str(got)
    assert next(make(cfg, pi=0, pc=2, batch=1))["loss_mask"].all()  # process 0 trains


def test_an_endless_stream_reads_on_past_runs_without_a_pair_when_its_first_pass_had_one(
    tmp_path, tok
):
    """Only process 1's share of the first pass is checked: with 9 documents (one with pairs)
    over 2 processes its stream is documents 1 3 5 7 | 0 2 4 6 8 | 1 ..., so after document 1
    come 8 without a pair (a pass's worth is 4) before document 1 comes again."""
    docs = ["river"] * 9
    docs[1] = "the river runs past"
    path = write_jsonl(tmp_path / "a.jsonl", docs)
    cfg = cfg_for(path, tok, add_bos=False, add_eos=False, num_epochs=0, shuffle=False)
    it = make(cfg, pi=1, pc=2, seq_len=16, batch=1)
    b = _next_or_error(it, seconds=30)
    assert isinstance(b, dict), b
    assert b["loss_mask"].all() and b["segment_ids"].max() > 1  # document 1, again and again


@pytest.mark.parametrize(
    "seq_len,batch,message",
    [(0, 2, "seq_len must be a positive integer, got 0"),
     (-5, 2, "seq_len must be a positive integer, got -5"),
     (8, 0, r"global_batch \(config.batch_size\) must be a positive integer, got 0")],
)  # fmt: skip
def test_rows_of_no_tokens_or_no_rows_are_refused(tmp_path, tok, seq_len, batch, message):
    """seq_len=0 or global_batch=0 ended the data at the first batch (StopIteration, no
    message); seq_len=-5 failed in numpy with "negative dimensions are not allowed"."""
    path = write_jsonl(tmp_path / "a.jsonl", corpus(8, 10))
    with pytest.raises(ValueError, match=rf"^{message}$"):
        pipeline.make_pretrain_iterator(
            cfg_for(path, tok), seq_len=seq_len, global_batch=batch, seed=0,
            process_index=0, process_count=1,
        )  # fmt: skip


@pytest.mark.parametrize(
    "key,value",
    [("num_epochs", -1), ("read_threads", -1), ("prefetch", -2),
     ("num_epochs", True)],
)  # fmt: skip
def test_read_settings_are_checked_by_key(tmp_path, tok, key, value):
    """grain refused these with messages naming no config key ("num_epochs must be positive",
    "num_threads must be non-negative"; a bool passed as an epoch count)."""
    path = write_jsonl(tmp_path / "a.jsonl", corpus(8, 10))
    cfg = cfg_for(path, tok)
    cfg[key] = value
    with pytest.raises(ValueError, match=rf"^data\.{key} must be an integer >= 0, got {value!r}$"):
        pipeline.make_pretrain_iterator(
            cfg, seq_len=8, global_batch=2, seed=0, process_index=0, process_count=1
        )


def test_weights_proportional_to_sizes_leave_documents_unread_as_documented():
    """The module docstring said such weights "use every document"; grain truncates the weights
    (the smallest scaled to 100) and ends the mixture at its first exhausted source. These are
    the docstring's figures: if grain changes, so must the docstring."""
    import grain

    def unread(*sizes):
        mixed = grain.MapDataset.mix([grain.MapDataset.range(n) for n in sizes], list(sizes))
        return sum(sizes) - len(mixed)

    assert (unread(12345, 678), unread(173943, 178924), unread(40, 10)) == (6, 1503, 0)
    lost = [unread(a, b) for a in range(1, 120) for b in range(1, 120)]
    assert (sum(n == 1 for n in lost), max(lost)) == (11252, 1)


class _Recorder:
    """The document iterator of a packer, noting every document read (its token bytes)."""

    def __init__(self, it, seen):
        self.it, self.seen = it, seen

    def __iter__(self):
        return self

    def __next__(self):
        doc = next(self.it)
        self.seen.append(doc.tobytes())
        return doc

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


@pytest.mark.parametrize("saved_count,resumed_count", [(2, 1), (1, 2), (2, 3)])
def test_resuming_on_another_process_count_skips_no_document(
    tmp_path, tok, saved_count, resumed_count
):
    """The saved shard indices are converted through global positions (data/process_state.py):
    the resumed processes start at the first document a saved process had not finished, so no
    document of the global stream is skipped and only the few the faster processes had finished
    past it are read again (it used to hand each shard index over unchanged: half of what 2
    processes trained read again on 1, a checkpoint's worth skipped going from 1 to 2)."""
    cfg = cfg_for(write_jsonl(tmp_path / "a.jsonl", corpus(7, 200, hi=40)), tok, read_threads=1)

    def packer(p, count, seen):
        it = make(cfg, p, count, seq_len=32, batch=2)
        it._docs = _Recorder(it._docs, seen)
        return it

    before, entries = [], {}
    for p in range(saved_count):
        it = packer(p, saved_count, before)
        for _ in range(3):
            next(it)
        state = it.get_state()
        entries.update(state.get("processes", {str(p): state}))
    state = (
        {"process_count": saved_count, "processes": entries} if saved_count > 1 else entries["0"]
    )
    after, firsts = [], []
    for p in range(resumed_count):
        seen = []
        it = packer(p, resumed_count, seen)
        it.set_state(state)
        for _ in range(3):
            next(it)
        after += seen
        firsts.append(seen[0])
    stream = []  # the global order of the documents (one process reads them all)
    whole = packer(0, 1, stream)._docs
    for _ in range(len(before) + len(after) + 20):
        next(whole)
    position = {doc: i for i, doc in enumerate(stream)}
    # The resumed processes start at consecutive global positions, every one before them read.
    starts = sorted(position[d] for d in firsts)
    assert starts == list(range(starts[0], starts[0] + resumed_count)), starts
    assert sorted(set(range(starts[0])) - {position[d] for d in before}) == []
    again = set(before) & set(after)
    assert len(again) <= max(3, len(set(before)) // 8), (len(again), len(set(before)))


def test_a_resume_where_another_document_stands_starts_that_one_whole(tmp_path, tok, caplog):
    """A state saved mid-document holds how many of its pairs were trained. Resumed with a
    changed seed (or mixture, sources, tokenizer: warned about as a new data order), another
    document stands at that position: the offset into it failed in numpy ("could not
    broadcast input array") when it was shorter, and skipped its beginning when not. That
    document is now read from its start (its BOS first); the same order still resumes
    exactly."""
    import logging

    path = write_jsonl(tmp_path / "long.jsonl", corpus(3, 40, lo=5, hi=300))
    cfg = cfg_for(path, tok)
    bos = T.Tokenizer.load(tok).bos_id
    it = make(cfg, seq_len=64, batch=2)
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    ref = make(cfg, seq_len=64, batch=2)
    next(ref)
    same = make(cfg, seq_len=64, batch=2)
    same.set_state(state)
    want = next(ref)
    assert all(np.array_equal(v, want[k]) for k, v in next(same).items())
    moved = 0
    for seed in range(1, 13):
        other = make(cfg, seq_len=64, batch=2, seed=seed)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            other.set_state(state)
            b = next(other)
        if "not the one at that position now" in caplog.text:
            moved += 1
            assert b["tokens"][0, 0] == bos  # the document from its start
    assert moved >= 6


def test_a_two_token_document_is_a_pair():
    """Two tokens are one (input, target) pair: data whose only such documents have exactly
    two tokens has something to train on (`PairCheck` with `> 2` called it pairless)."""
    two, one = [np.asarray([5, 6], np.int32)], [np.asarray([5], np.int32)]
    check = pipeline.PairCheck([("two.jsonl", two)], local=two, local_docs=1)
    assert check() and check.local()
    assert not pipeline.PairCheck([("one.jsonl", one)])()


def test_a_process_without_pairs_fails_after_its_own_pass_of_documents(tmp_path, tok):
    """An endless stream gives up after one pass's worth of this process's share (8 documents
    over 2 processes: 4), not after every process's documents (8) read in a row."""
    path = write_jsonl(tmp_path / "a.jsonl", ["the river runs past", "river"] * 4)
    cfg = cfg_for(path, tok, add_bos=False, add_eos=False, num_epochs=0, shuffle=False)
    it = make(cfg, pi=1, pc=2, batch=1)
    with pytest.raises(DataError, match="no document of process 1 of 2"):
        next(it)
    (local,) = it.get_state()["processes"].values()
    assert local["docs"]["next_index"] == 4


class _ListDocs:
    """A document iterator over a list with grain's get_state/set_state."""

    def __init__(self, docs):
        self.docs, self.i = [np.asarray(d, np.int32) for d in docs], 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.i >= len(self.docs):
            raise StopIteration
        self.i += 1
        return self.docs[self.i - 1]

    def get_state(self):
        return {"next_index": self.i}

    def set_state(self, st):
        self.i = int(st["next_index"])


def test_a_saved_offset_past_the_documents_pairs_starts_it_whole():
    """A state without the cut document's digest (saved before it was recorded) whose offset
    is the whole of the document now at that position (a changed data order): that document
    is read from its start, not skipped as fully trained."""
    from flaxlm.data.packing import PackedBatchIterator

    kw = dict(seq_len=4, batch=1, pad_id=0)
    it = PackedBatchIterator(_ListDocs([range(10, 20)]), **kw)
    next(it)
    state = it.get_state()
    assert state["carry"] and state["offset"] == 4
    del state["carry_doc"]
    other = PackedBatchIterator(_ListDocs([[30, 31, 32, 33, 34], [40, 41, 42]]), **kw)
    other.set_state(state)  # offset 4: every pair of the 5-token document now there
    b = next(other)
    np.testing.assert_array_equal(b["tokens"][0], [30, 31, 32, 33])
    np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 1])
