"""The SFT, preference and unpaired batches' data state records what their files held
(data/source_fingerprint.py, as pretraining's does): a data file that gained, lost or changed
records between the save and the resume is refused by name (or, with
on_changed_sources="warn", warned about). The state is an index into a shuffle of every
example, so such a resume used to train some examples twice and others never, silently."""

import json
import logging
import re

import numpy as np
import pytest

from flaxlm.data import formats as F
from flaxlm.data.source_errors import DataError

KINDS = {"sft": F.SFTBatches, "pref": F.PreferenceBatches, "unpaired": F.UnpairedBatches}
KW = dict(seq_len=8, pad_id=0, seed=3)


def _write(path, ks, mode="w"):
    with open(path, mode) as f:
        f.writelines(json.dumps({"k": k}) + "\n" for k in ks)
    return str(path)


def _items(kind, spec):
    """One example per record of `spec`'s files, each with the "loc" the readers give it."""
    report = F.DataReport()
    out = []
    for part in spec.split(","):
        for obj, loc in F.read_records(part, report):
            k = obj["k"]
            ids, mask = (np.arange(4) + k % 50 + 1).astype(np.int32), np.ones(4, np.float32)
            out.append({
                "sft": {"ids": ids, "mask": mask},
                "pref": {"chosen": (ids, mask), "rejected": (ids[::-1].copy(), mask),
                         "margin": float(k)},
                "unpaired": {"ids": ids, "mask": mask, "split": 2, "head": 1, "label": k % 2},
            }[kind] | {"loc": loc})  # fmt: skip
    return out


def _make(kind, spec, pi=0, pc=1, batch=4, **kw):
    return KINDS[kind](_items(kind, spec), batch=batch // pc, process_index=pi,
                       process_count=pc, **KW, **kw)  # fmt: skip


def _saved(it, steps=3):
    for _ in range(steps):
        next(it)
    return json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize(
    "change,expect",
    [
        ("append", r"bytes \d+ -> \d+, documents 40 -> 60\).*train some documents again"),
        ("truncate", r"bytes \d+ -> \d+, documents 40 -> 30\)"),
        ("edit", r"bytes \d+ -> \d+\): the document count is the same"),
    ],
)
def test_a_changed_file_is_refused_by_name_and_warn_resumes_at_the_saved_position(
    tmp_path, kind, change, expect, caplog
):
    path = _write(tmp_path / "chat.jsonl", range(40))
    state = _saved(_make(kind, path))
    assert path not in json.dumps(state)  # a position and digests, not the config
    {"append": lambda: _write(path, range(40, 60), "a"), "truncate": lambda: _write(
        path, range(30)), "edit": lambda: _write(path, range(1000, 1040))}[change]()  # fmt: skip
    with pytest.raises(DataError, match=re.escape(path) + ": " + expect):
        _make(kind, path).set_state(state)
    with pytest.raises(DataError, match=r"data\.train changed.*on_changed_sources=warn"):
        _make(kind, path).set_state(state)
    warn = _make(kind, path, on_changed_sources="warn")
    with caplog.at_level(logging.WARNING):
        warn.set_state(state)
    assert "resuming anyway" in caplog.text and path in caplog.text
    assert warn.order.get_state() == {k: state[k] for k in ("epoch", "pos")}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_unchanged_files_and_older_states_resume_exactly_and_quietly(tmp_path, kind, caplog):
    a = _write(tmp_path / "a.jsonl", range(40))
    b = _write(tmp_path / "b.json", [])  # a .json array: its records' locs are "file[i]"
    with open(b, "w") as f:
        json.dump([{"k": k} for k in range(100, 110)], f)
    spec = f"{a},{b}"
    ref = _make(kind, spec)
    want = [next(ref) for _ in range(8)][3:]
    state = _saved(_make(kind, spec))
    assert [s["docs"] for s in state["sources"]] == [40, 10]
    older = {k: v for k, v in state.items() if k != "sources"}  # saved before the field
    for st in (state, older):
        it = _make(kind, spec)
        with caplog.at_level(logging.WARNING):
            it.set_state(st)
        assert not caplog.records, caplog.text
        assert all(_same(next(it), w) for w in want)


def test_the_configured_spec_also_catches_a_file_added_under_a_glob(tmp_path):
    """Given the data.train spec (`sources`), a glob's record counts its files: one that
    gains a file changes it. Without it the records are the examples' own files."""
    (tmp_path / "d").mkdir()
    _write(tmp_path / "d" / "part-0.jsonl", range(40))
    spec = str(tmp_path / "d" / "*.jsonl")
    state = _saved(_make("sft", spec, sources=spec))
    _write(tmp_path / "d" / "part-1.jsonl", range(40, 50))
    with pytest.raises(DataError, match=re.escape(spec) + r": files 1 -> 2, .*documents 40 -> 50"):
        _make("sft", spec, sources=spec).set_state(state)


@pytest.mark.parametrize("kind", ["sft", "pref"])
@pytest.mark.parametrize("resumed", [1, 2, 4])
def test_processes_record_the_sources_once_and_every_layout_checks_them(tmp_path, kind, resumed):
    """The records are the same on every process and sit once beside the processes' positions,
    so a resume onto another process count (the reshard path) checks them too, and resumes
    exactly onto unchanged files."""
    path = _write(tmp_path / "chat.jsonl", range(37))
    ref = _make(kind, path)
    want = [next(ref) for _ in range(7)][3:]
    old = [_make(kind, path, p, 2) for p in (0, 1)]
    states = [_saved(it) for it in old]
    assert states[0]["sources"] == states[1]["sources"]
    assert all("sources" not in s["processes"][str(p)] for p, s in enumerate(states))
    # the checkpoint of the two (simulated) processes: both entries, the records once
    state = {**states[0], "processes": {**states[0]["processes"], **states[1]["processes"]}}
    new = [_make(kind, path, q, resumed) for q in range(resumed)]
    for it in new:
        it.set_state(state)
    for w in want:
        parts = [next(it) for it in new]
        assert _same({k: np.concatenate([p[k] for p in parts]) for k in w}, w)
    _write(path, range(37, 40), "a")
    for q in range(resumed):
        with pytest.raises(DataError, match=re.escape(path) + r": .*documents 37 -> 40"):
            _make(kind, path, q, resumed).set_state(state)


def test_examples_without_files_keep_the_plain_position_and_policies_are_checked(tmp_path):
    """Examples that name no file (built in memory) save the position alone, as before; an
    unknown policy is refused when the iterator is built, not at the first resume."""
    items = [{"ids": np.arange(1, 5, dtype=np.int32), "mask": np.ones(4, np.float32)}] * 9
    it = F.SFTBatches(items, batch=2, **KW)
    next(it)
    assert set(it.get_state()) == {"epoch", "pos"}
    path = _write(tmp_path / "chat.jsonl", range(5))
    with pytest.raises(ValueError, match="data.on_changed_sources must be one of"):
        _make("sft", path, on_changed_sources="ignore")


def test_each_file_and_built_in_split_of_the_examples_is_its_own_source(tmp_path):
    """An example's "loc" is "file:line" or "builtin:split:i": its source is all but the last
    ':' part, so a directory with a ':' in its name ("run:1/") and a built-in split keep
    their whole names."""
    from flaxlm.data.chat_batches import source_fingerprints

    d = tmp_path / "run:1"
    d.mkdir()
    path = d / "chat.jsonl"
    path.write_text("{}\n{}\n")
    items = [{"loc": f"{path}:{i + 1}"} for i in range(2)] + [{"loc": "builtin:sft_train:0"}]
    recs = source_fingerprints(items)
    assert [(r["pattern"], r["docs"], r["files"]) for r in recs] == [
        (str(path), 2, 1), ("builtin:sft_train", 1, 0)]  # fmt: skip
