"""Audit of the streaming loader (data/pipeline.py, data/sources.py, the batching of
data/formats.py) against references written here, not derived from the code under test.

* packing: batches equal those of a pair-by-pair reference packer over the documented document
  order (``repeat`` then ``[process_index::process_count]``), bit for bit, in both pack modes
  and with or without BOS/EOS; shuffled epochs hold every document once per epoch over the
  processes;
* mixing: realised document counts track the weights in every prefix (chi-square and a
  +-2-document bound), deterministically given the seed, whatever the read threads;
* resume: at every batch of a shuffled, mixed, two-epoch, 4-thread stream; and with two real
  JAX processes whose state goes through process 0's file only, as orbax's JsonSave writes it;
* bad input: truncated, empty or corrupt ArrayRecord shards, records that are not whole int32
  ids or hold ids past the vocab, token shards without meta.json, another tokenizer's shards,
  non-finite weights, sources too small for the processes, large run seeds.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from flaxlm.data import formats, pipeline
from flaxlm.data import sources as S
from flaxlm.data.sources import DataError

KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


@pytest.fixture(scope="module")
def tok(chat_tokenizer):
    return chat_tokenizer


def write_token_shards(d, docs, tok, per_shard=7, meta=True, raw=None):
    """Token-id ArrayRecord shards as preprocess writes them (int32 bytes, no BOS/EOS)."""
    os.makedirs(d)
    if meta:
        with open(os.path.join(d, "meta.json"), "w") as f:
            json.dump(
                {
                    "format": "tokens",
                    "dtype": "int32",
                    "bos_eos": False,
                    "tokenizer_sha256": tok.sha256,
                    "vocab_size": tok.vocab_size,
                },
                f,
            )
    records = [np.asarray(x, np.int32).tobytes() for x in docs] if raw is None else raw
    for k in range(0, len(records), per_shard):
        w = ArrayRecordWriter(
            os.path.join(d, f"shard-{k // per_shard:05d}.arrayrecord"), "group_size:1"
        )
        for r in records[k : k + per_shard]:
            w.write(r)
        w.close()
    return str(d)


def random_docs(seed, n, lo, hi, first=8):
    """Token documents of lengths in [lo, hi) over ids [first, 370) (no special ids; the test
    tokenizer has 374 pieces)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(first, 370, rng.integers(lo, hi)).astype(np.int32) for _ in range(n)]


def cfg_for(sources, tok_path, **kw):
    c = pipeline.data_config()
    c.sources, c.tokenizer, c.read_threads, c.prefetch = sources, tok_path, 2, 16
    c.update(kw)
    return c


def make(cfg, pi=0, pc=1, seq_len=24, batch=3, seed=0):
    return pipeline.make_pretrain_iterator(
        cfg, seq_len=seq_len, global_batch=batch * pc, seed=seed, process_index=pi, process_count=pc
    )


def assert_same_batches(got, ref, what=""):
    assert len(got) == len(ref), f"{what}: {len(got)} batches, reference {len(ref)}"
    for i, (x, y) in enumerate(zip(got, ref)):
        for k in KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"{what}: batch {i} {k}")


# ---------------------------------------------------------------------------------------------
# Packing against a reference packer


def reference_batches(docs, *, seq_len, batch, mode, pad_id):
    """Packs (input, target) pairs one at a time: a piece starts at every document and every row
    start; "pad" moves a document that does not fit the rest of a non-empty row to a new row."""
    rows, row = [], []
    for d in docs:
        pairs = list(zip(d[:-1], d[1:]))
        if not pairs:
            continue
        if mode == "pad" and row and len(pairs) > seq_len - len(row):
            rows.append(row)
            row = []
        pos = None
        for x, y in pairs:
            if len(row) == seq_len:
                rows.append(row)
                row, pos = [], None
            if pos is None:  # a new piece
                seg, pos = (row[-1][2] + 1) if row else 1, 0
            row.append((x, y, seg, pos))
            pos += 1
    if row:
        rows.append(row)
    out = []
    for b in range(0, len(rows), batch):
        arr = {k: np.zeros((batch, seq_len), np.float32 if k == "loss_mask" else np.int32)
               for k in KEYS}  # fmt: skip
        arr["tokens"][:] = arr["targets"][:] = pad_id
        for r, row in enumerate(rows[b : b + batch]):
            for t, (x, y, seg, pos) in enumerate(row):
                arr["tokens"][r, t], arr["targets"][r, t] = x, y
                arr["segment_ids"][r, t], arr["positions"][r, t] = seg, pos
                arr["loss_mask"][r, t] = 1.0
        out.append(arr)
    return out


@pytest.mark.parametrize("mode", ["split", "pad"])
@pytest.mark.parametrize("bos,eos", [(True, True), (True, False), (False, True), (False, False)])
def test_packing_equals_a_reference_packer(tmp_path, tok, mode, bos, eos):
    tok_path, t = tok
    # Lengths 0..70 ids: empty records, one-id documents (no pair without BOS/EOS), documents
    # longer than a row (seq_len 24) and than two rows.
    docs = random_docs(1, 61, 0, 70)
    src = write_token_shards(tmp_path / "tok", docs, t)
    cfg = cfg_for(src, tok_path, shuffle=False, num_epochs=2, pack_mode=mode, add_bos=bos,
                  add_eos=eos)  # fmt: skip
    stream = docs * 2  # the documented order: repeat, then every process_count-th document
    for pi in range(2):
        expect = [
            np.concatenate([[t.bos_id] * bos, d, [t.eos_id] * eos]).astype(np.int32)
            for d in stream[pi::2]
        ]
        ref = reference_batches(expect, seq_len=24, batch=3, mode=mode, pad_id=t.pad_id)
        assert_same_batches(list(make(cfg, pi=pi, pc=2)), ref, f"{mode} bos={bos} eos={eos}")


def test_shuffled_epochs_hold_every_document_once_per_epoch_over_the_processes(tmp_path, tok):
    tok_path, t = tok
    n, procs, epochs = 31, 3, 3  # 31 documents do not divide over 3 processes
    docs = [np.r_[10 + k, random_docs(k, 1, 1, 40)[0]].astype(np.int32) for k in range(n)]
    src = write_token_shards(tmp_path / "tok", docs, t)
    cfg = cfg_for(src, tok_path, num_epochs=epochs)
    per_epoch = [[] for _ in range(epochs)]
    for pi in range(procs):
        pairs = []
        for b in make(cfg, pi=pi, pc=procs):
            for r in range(b["tokens"].shape[0]):
                m = b["loss_mask"][r] > 0
                pairs += zip(b["tokens"][r][m].tolist(), b["targets"][r][m].tolist())
        # Whole documents in stream order: BOS starts one, EOS (a target) ends it.
        seq, cur = [], []
        for x, y in pairs:
            cur.append(x)
            if y == t.eos_id:
                seq.append(cur + [y])
                cur = []
        assert cur == []
        for j, d in enumerate(seq):  # its j-th document is document pi + procs*j of the stream
            assert d[0] == t.bos_id
            per_epoch[(pi + procs * j) // n].append(d)
    for e in range(epochs):
        got = sorted(tuple(d) for d in per_epoch[e])
        want = sorted(tuple([t.bos_id, *d.tolist(), t.eos_id]) for d in docs)
        assert got == want, f"epoch {e}"


# ---------------------------------------------------------------------------------------------
# Mixing


def source_sequence(batches, bos_id):
    """The source (0, 1, 2: ids 10-19, 20-29, 30-39 follow BOS) of each document, in order."""
    out = []
    for b in batches:  # rows in order are the document stream in order
        for r in range(b["tokens"].shape[0]):
            starts = b["tokens"][r] == bos_id  # BOS is input only at a document start
            out += ((b["targets"][r][starts] - 10) // 10).tolist()
    return np.asarray(out)


@pytest.fixture
def three_sources(tmp_path, tok):
    tok_path, t = tok
    paths = []
    for s in range(3):  # each document: a source marker, then ids past the markers
        docs = [np.r_[10 + 10 * s + k % 10, d] for k, d in enumerate(random_docs(s, 40, 1, 30, 40))]
        paths.append(write_token_shards(tmp_path / f"src{s}", docs, t))
    return paths


@pytest.mark.parametrize("weights", [(5, 3, 2), (0.7, 0.2, 0.1)])
def test_mixture_document_shares_converge_to_the_weights(three_sources, tok, weights):
    tok_path, t = tok
    spec = ",".join(f"{p}:{w}" for p, w in zip(three_sources, weights))
    it = make(cfg_for(spec, tok_path), seq_len=64, batch=4, seed=1)
    seq = source_sequence([next(it) for _ in range(60)], t.bos_id)
    w = np.asarray(weights, float) / sum(weights)
    n = len(seq)
    assert n > 500
    counts = np.bincount(seq, minlength=3)
    chi2 = float((((counts - n * w) ** 2) / (n * w)).sum())
    assert chi2 < 13.8, (counts, n * w)  # chi-square, 2 degrees of freedom, p = 0.001
    # grain interleaves deterministically: every prefix is within 2 documents of its share.
    cum = np.stack([np.cumsum(seq == s) for s in range(3)], 1)
    expect = np.arange(1, n + 1)[:, None] * w[None]
    assert np.abs(cum - expect).max() <= 2.0, np.abs(cum - expect).max()


def test_mixture_is_deterministic_given_the_seed_whatever_the_threads(three_sources, tok):
    tok_path, _ = tok
    spec = ",".join(f"{p}:{w}" for p, w in zip(three_sources, (2, 1, 1)))

    def stream(seed, threads):
        it = make(cfg_for(spec, tok_path, read_threads=threads), seed=seed)
        return [next(it) for _ in range(8)]

    a = stream(3, 1)
    assert_same_batches(stream(3, 4), a, "same seed, 4 threads")
    assert not np.array_equal(stream(4, 2)[0]["tokens"], a[0]["tokens"])


@pytest.mark.parametrize("w", ["0", "-1", "nan", "inf"])
def test_weights_must_be_positive_and_finite(w):
    # A zero weight is an error, not "never sample" (documented: drop the entry instead). NaN
    # and inf used to pass and fail inside grain ("cannot convert float NaN to integer").
    with pytest.raises(ValueError, match=r"weight of 'b.jsonl' must be > 0 and finite"):
        pipeline.parse_sources(f"a.jsonl:1,b.jsonl:{w}")


# ---------------------------------------------------------------------------------------------
# Resume


def test_resume_at_every_batch_with_threads_mixing_and_epochs(tmp_path, tok, three_sources):
    tok_path, t = tok
    rng = np.random.default_rng(2)
    words = "the river runs past old mill into green valley".split()
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, rng.integers(1, 50)))})
                            + "\n" for _ in range(30)))  # fmt: skip
    spec = f"{three_sources[0]}:2,{text}:1"
    cfg = cfg_for(spec, tok_path, num_epochs=2, read_threads=4, prefetch=64)
    ref, states, batches = make(cfg, pi=1, pc=2), [], []
    while True:
        states.append(json.loads(json.dumps(ref.get_state())))
        try:
            batches.append(next(ref))
        except StopIteration:
            break
    assert len(batches) > 8
    # a position, not data (plus each source's fingerprint: data/source_fingerprint.py)
    assert max(len(json.dumps({k: v for k, v in s.items() if k != "sources"}))
               for s in states) < 300  # fmt: skip
    assert max(len(json.dumps(s["sources"])) for s in states) < 120 * 2  # (two sources)
    for k in range(len(states)):
        it = make(cfg, pi=1, pc=2)
        it.set_state(states[k])
        assert_same_batches(list(it), batches[k:], f"resumed at {k}")


MULTIPROCESS = r"""
import json, sys
import numpy as np
import jax

cfg_json, coordinator, pid, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
jax.distributed.initialize(coordinator, num_processes=2, process_id=pid)
from jax.experimental import multihost_utils
from flaxlm.data import formats, pipeline

cfg = pipeline.data_config()
cfg.update(json.loads(cfg_json))
rng = np.random.default_rng(0)
items = [{"ids": np.arange(n, dtype=np.int32) + 10, "mask": np.ones(n, np.float32)}
         for n in rng.integers(3, 30, 41)]
makers = {
    # process_index/process_count default to jax's
    "pretrain": lambda: pipeline.make_pretrain_iterator(cfg, seq_len=24, global_batch=4, seed=7),
    "sft": lambda: formats.SFTBatches(items, seq_len=32, batch=2, pad_id=0, seed=3,
                                      process_index=pid, process_count=2),
}
result = {}
for name, make in makers.items():
    it = make()
    for _ in range(5):
        next(it)
    state = it.get_state()  # every process at the same step, as the training loop saves
    if pid == 0:  # orbax's JsonSave writes the data item on the primary host only
        json.dump(state, open(f"{out}/{name}.json", "w"))
    ref = [next(it) for _ in range(4)]
    multihost_utils.sync_global_devices(name)
    try:  # a failure is reported, never left to hang the other process at the next barrier
        fresh = make()
        fresh.set_state(json.load(open(f"{out}/{name}.json")))
        got = [next(fresh) for _ in range(4)]
        result[name] = all(np.array_equal(a[k], b[k]) for a, b in zip(ref, got) for k in a)
    except Exception as e:
        result[name] = repr(e)
json.dump(result, open(f"{out}/result-{pid}.json", "w"))
"""


def test_two_jax_processes_resume_from_the_state_process_0_saved(tmp_path, tok):
    """Each process packs its own pretraining documents, so after 5 steps the processes stand
    at different places (SFT's stand at one: data/formats.py `_Batches`); the checkpoint's data
    state is written by process 0 alone. It used to hold only
    process 0's place, and process 1 resumed there, in its own shard: documents skipped or
    repeated. Now the state holds every process's place (gathered) and each takes its own."""
    tok_path, t = tok
    src = write_token_shards(tmp_path / "tok", random_docs(3, 80, 1, 60), t)
    script = tmp_path / "mp.py"
    script.write_text(MULTIPROCESS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = json.dumps({"sources": src, "tokenizer": tok_path, "read_threads": 2})
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), cfg, f"127.0.0.1:{port}", str(pid), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    try:
        logs = [p.communicate(timeout=180)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0] for p in procs]
        pytest.fail("two-process run timed out:\n" + textwrap.shorten("\n".join(logs), 3000))
    for p, log in zip(procs, logs):
        assert p.returncode == 0, textwrap.shorten(log, 3000)
    # Before: process 0 fine; process 1 {"pretrain": "ValueError('could not broadcast input
    # array from shape (0,) into shape (21,)')" (process 0's offset into its own document),
    # "sft": False (other batches)}.
    for pid in range(2):
        got = json.load(open(tmp_path / f"result-{pid}.json"))
        assert got == {"pretrain": True, "sft": True}, (pid, got)
    for name in ("pretrain", "sft"):
        state = json.load(open(tmp_path / f"{name}.json"))
        assert state["process_count"] == 2 and set(state["processes"]) == {"0", "1"}, state
        if name == "pretrain":  # the test has teeth: the processes stand at different places
            assert state["processes"]["0"] != state["processes"]["1"], state
        else:  # SFT packs every global batch on each process (one global place)
            assert state["processes"]["0"] == state["processes"]["1"], state
        assert len(json.dumps(state)) < 400


def test_a_state_from_another_process_layout_resumes_with_a_warning(tmp_path, tok, caplog):
    tok_path, t = tok
    src = write_token_shards(tmp_path / "tok", random_docs(4, 30, 1, 40), t)
    cfg = cfg_for(src, tok_path)
    one = make(cfg)
    next(one)
    with caplog.at_level("WARNING"):
        two = make(cfg, pi=1, pc=2)
        two.set_state(one.get_state())  # a single-process state on 2 processes
    # (a single-process state is mapped onto the new shards: data/process_state.shard_index)
    assert "saved by 1 processes, this run has 2" in caplog.text
    assert "none is skipped" in caplog.text
    next(two)
    other = make(cfg, pi=0, pc=2)
    with pytest.raises(ValueError, match="no position for process 0"):
        other.set_state(two.get_state())  # simulated process 1 saved only its own
    sft = formats.SFTBatches(
        [{"ids": np.arange(5), "mask": np.ones(5)}] * 4, seq_len=8, batch=1, pad_id=0,
        process_index=0, process_count=2,
    )  # fmt: skip
    st = sft.get_state()
    assert st == {"process_count": 2, "processes": {"0": {"epoch": 0, "pos": 0}}}
    sft.set_state(st)


def test_shard_index_and_unwrap_against_a_brute_force_reference(caplog):
    """shard_index: shard index i of process p of P is global position i·P + p; each new process
    starts at the first of its positions at or past the first position no saved process had
    finished (enumerated here). unwrap with another process count: a state lacking some saved
    process's entry (simulated processes keep only their own) is not resharded — one saved
    position, the lowest process's, with a warning — and neither is one without `reshard`."""
    import itertools

    from flaxlm.data import process_state as PS

    for P in (1, 2, 3):
        for saved in itertools.product(range(4), repeat=P):
            finished = {i * P + p for p in range(P) for i in range(saved[p])}
            first = min(set(range(4 * P + 1)) - finished)
            for Q in (1, 2, 3, 4):
                for q in range(Q):
                    want = next(i for i in itertools.count() if i * Q + q >= first)
                    assert PS.shard_index(list(saved), q, Q) == want, (saved, q, Q)

    def reshard(entries, pi, pc):
        raise AssertionError("not every saved process's entry is there")

    partial = {"process_count": 2, PS.PROCESSES: {"0": {"pos": 5}}}
    with caplog.at_level("WARNING"):
        assert PS.unwrap(partial, 0, 3, "x", reshard) == {"pos": 5}
    assert "saved by 2 processes (holding ['0']), this run has 3" in caplog.text
    both = {"process_count": 2, PS.PROCESSES: {"0": {"pos": 5}, "1": {"pos": 7}}}
    assert PS.unwrap(both, 2, 3, "x") == {"pos": 5}


# ---------------------------------------------------------------------------------------------
# Bad input


def test_truncated_or_empty_arrayrecord_shard_is_named(tmp_path, tok):
    tok_path, t = tok
    for cut, name in ((lambda n: n // 2, "half"), (lambda n: n - 10, "tail"), (lambda n: 0, "0")):
        d = write_token_shards(tmp_path / name, random_docs(5, 21, 1, 40), t)
        bad = os.path.join(d, "shard-00001.arrayrecord")
        with open(bad, "r+b") as f:
            f.truncate(cut(os.path.getsize(bad)))
        with pytest.raises(DataError, match=rf"{bad}: not a readable ArrayRecord shard"):
            make(cfg_for(d, tok_path))
    text = tmp_path / "text"  # the streaming reader (preprocess) names it too
    text.mkdir()
    w = ArrayRecordWriter(str(text / "a.arrayrecord"), "group_size:1")
    w.write(b"some text")
    w.close()
    with open(text / "a.arrayrecord", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match="a.arrayrecord: not a readable ArrayRecord shard"):
        list(S.iter_documents(str(text)))


def test_corrupt_record_is_named_with_shard_and_record(tmp_path, tok):
    tok_path, t = tok
    d = write_token_shards(tmp_path / "c", random_docs(6, 14, 20, 40), t)
    bad = os.path.join(d, "shard-00001.arrayrecord")
    data = bytearray(open(bad, "rb").read())
    data[200] ^= 0xFF
    open(bad, "wb").write(bytes(data))
    failing = set()  # the records (1-based) that no longer read, one by one
    for i in range(7):
        reader = ArrayRecordReader(bad)
        try:
            reader.read([i])
        except RuntimeError:
            failing.add(i + 1)
        reader.close()
    assert len(failing) == 1, failing
    with pytest.raises(DataError, match=rf"{bad}:{failing.pop()}: cannot read the record"):
        list(make(cfg_for(d, tok_path, num_epochs=1)))


def test_record_that_is_not_whole_int32_ids_is_named(tmp_path, tok):
    tok_path, t = tok
    raw = [np.arange(8, 20, dtype=np.int32).tobytes()] * 9
    raw[8] = raw[8][:-1]  # shard 1 (7 per shard), record 2
    d = write_token_shards(tmp_path / "odd", None, t, raw=raw)
    with pytest.raises(DataError, match=r"shard-00001.arrayrecord:2: 47 bytes is not a whole"):
        list(make(cfg_for(d, tok_path, num_epochs=1)))


def test_token_ids_past_the_vocab_are_named(tmp_path, tok):
    tok_path, t = tok
    docs = random_docs(7, 9, 5, 20)
    docs[3][2] = t.vocab_size  # e.g. shards written on a machine of the other byte order
    d = write_token_shards(tmp_path / "v", docs, t)
    with pytest.raises(DataError, match=rf"shard-00000.arrayrecord:4: token id {t.vocab_size} "):
        list(make(cfg_for(d, tok_path, num_epochs=1)))


def test_token_shards_without_meta_fail_naming_the_record(tmp_path, tok):
    tok_path, t = tok
    d = write_token_shards(tmp_path / "nometa", random_docs(8, 9, 30, 60, 130), t, meta=False)
    with pytest.raises(DataError, match=r"shard-0000\d.arrayrecord:\d+: invalid UTF-8.*meta.json"):
        list(make(cfg_for(d, tok_path, num_epochs=1)))


def test_shards_of_another_tokenizer_are_refused(tmp_path, tok):
    tok_path, t = tok
    d = write_token_shards(tmp_path / "other", random_docs(9, 5, 3, 9), t)
    meta = json.load(open(os.path.join(d, "meta.json")))
    meta["tokenizer_sha256"] = "0" * 64
    json.dump(meta, open(os.path.join(d, "meta.json"), "w"))
    with pytest.raises(DataError, match=rf"{d}: shards were tokenized with tokenizer sha256 0000"):
        make(cfg_for(d, tok_path))


def test_missing_and_empty_sources_are_errors(tmp_path, tok):
    tok_path, t = tok
    with pytest.raises(DataError, match=r"^data\.sources: no files match"):
        make(cfg_for(str(tmp_path / "nope*.jsonl"), tok_path))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    good = write_token_shards(tmp_path / "g", random_docs(10, 5, 3, 9), t)
    with pytest.raises(DataError, match="empty.jsonl has no documents"):
        make(cfg_for(f"{good}:1,{empty}:1", tok_path))


def test_a_source_too_small_for_the_processes_is_an_error(tmp_path, tok):
    # With num_epochs=1, 2 documents over 4 processes left processes 2 and 3 an empty stream
    # (a single source: zero batches, so one host's StopIteration while the others train; a
    # mixture: grain's "All datasets must have positive length" naming no file).
    tok_path, t = tok
    small = write_token_shards(tmp_path / "small", random_docs(11, 2, 3, 9), t)
    big = write_token_shards(tmp_path / "big", random_docs(12, 40, 3, 9), t)
    for spec in (small, f"{big}:1,{small}:1"):
        assert sum(1 for _ in make(cfg_for(spec, tok_path, num_epochs=1), pi=1, pc=4)) > 0
        with pytest.raises(DataError, match=rf"{small}: 2 documents x 1 epoch\(s\) leave none "):
            make(cfg_for(spec, tok_path, num_epochs=1), pi=2, pc=4)


def test_large_and_negative_run_seeds_shuffle(tmp_path, tok):
    # grain takes shuffle seeds in [0, 2**32); seed * 1000 + source overflowed for run seeds from
    # 4294968 (and any negative one) and stopped with grain's error.
    tok_path, t = tok
    d = write_token_shards(tmp_path / "s", random_docs(13, 40, 3, 30), t)
    cfg = cfg_for(d, tok_path)
    firsts = {}
    for seed in (0, 4294967, 4294968, 20240101, 2**40, -1):
        firsts[seed] = next(make(cfg, seed=seed))["tokens"]
        np.testing.assert_array_equal(next(make(cfg, seed=seed))["tokens"], firsts[seed])
    assert len({v.tobytes() for v in firsts.values()}) == len(firsts)
    assert pipeline.shuffle_seed(7, 3) == 7003  # small seeds keep their order


def test_shuffle_seeds_at_the_edge_of_graines_range():
    """The largest seed grain takes, 2**32 - 1, is kept; 2**32 itself is out of its range."""
    assert pipeline.shuffle_seed(4294967, 295) == 2**32 - 1
    s = pipeline.shuffle_seed(4294967, 296)  # seed * 1000 + source == 2**32
    assert 0 <= s < 2**32


def test_sources_of_one_size_are_shuffled_in_different_orders(tmp_path, tok):
    """Each source is shuffled with its own seed: two sources of the same size read their
    documents in unrelated orders, not the same permutation side by side."""
    tok_path, t = tok
    paths = []
    for s in range(2):  # document k of source s: [source marker, 100 + k, 200 + k]
        docs = [np.asarray([10 + s, 100 + k, 200 + k], np.int32) for k in range(40)]
        paths.append(write_token_shards(tmp_path / f"src{s}", docs, t))
    it = make(cfg_for(f"{paths[0]}:1,{paths[1]}:1", tok_path), seq_len=64, batch=2, seed=3)
    stream = []
    for _ in range(4):
        b = next(it)
        for r in range(b["tokens"].shape[0]):
            stream += b["tokens"][r][b["segment_ids"][r] > 0].tolist()
    orders = {10: [], 11: []}
    for i, x in enumerate(stream[:-2]):
        if x == t.bos_id:
            orders[stream[i + 1]].append(stream[i + 2] - 100)
    n = min(len(orders[10]), len(orders[11]))
    assert n >= 20, orders
    assert orders[10][:n] != orders[11][:n], orders
