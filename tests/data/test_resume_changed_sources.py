"""A pretraining data state records what each source held (data/source_fingerprint.py): files
added, edited or truncated between the save and the resume are refused by name (or, with
data.on_changed_sources=warn, warned about), where they used to repeat and skip documents."""

import json
import logging

import pytest

from flaxlm.data import pipeline
from flaxlm.data import tokenizer as T
from flaxlm.data.sources import DataError


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tok.model")
    T.train([f"apple banana cherry number {i}" for i in range(200)], 300, model_path=path)
    return path


def _cfg(sources, tok, **kw):
    c = pipeline.data_config()
    c.sources, c.tokenizer, c.read_threads, c.pack_mode = sources, tok, 0, "pad"
    c.update(kw)
    return c


def _make(cfg, pi=0, pc=1):
    return pipeline.make_pretrain_iterator(
        cfg, seq_len=8, global_batch=pc, seed=3, process_index=pi, process_count=pc
    )


def _saved(cfg, steps=10):
    it = _make(cfg)
    for _ in range(steps):
        next(it)
    return json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it


def test_a_file_added_under_a_glob_is_refused_by_name(tmp_path, tok):
    (tmp_path / "d").mkdir()
    _write(tmp_path / "d" / "part-0.jsonl", [f"apple {i}" for i in range(40)])
    cfg = _cfg(str(tmp_path / "d" / "*.jsonl"), tok)
    state = _saved(cfg)
    _write(tmp_path / "d" / "part-1.jsonl", [f"banana {i}" for i in range(40)])
    with pytest.raises(DataError, match=r"d/\*\.jsonl: files 1 -> 2, .*documents 40 -> 80"):
        _make(cfg).set_state(state)


@pytest.mark.parametrize(
    "change,expect",
    [
        ("append", r"documents 40 -> 80.*train some documents again and skip others"),
        ("truncate", r"documents 40 -> 20.*train some documents again"),
        ("edit", r"a\.jsonl: bytes \d+ -> \d+\): the document count is the same"),
    ],
)
def test_an_edited_file_is_refused_and_warn_resumes_at_the_saved_position(
    tmp_path, tok, change, expect, caplog
):
    path = tmp_path / "a.jsonl"
    apples = [f"apple {i}" for i in range(40)]
    cfg = _cfg(_write(path, apples), tok)
    state = _saved(cfg)
    new = {"append": apples + [f"banana {i}" for i in range(40)], "truncate": apples[:20],
           "edit": [f"cherry {i}" for i in range(40)]}[change]  # fmt: skip
    _write(path, new)
    with pytest.raises(DataError, match=expect + r".*on_changed_sources=warn"):
        _make(cfg).set_state(state)
    warn = _make(_cfg(str(path), tok, on_changed_sources="warn"))
    with caplog.at_level(logging.WARNING):
        warn.set_state(state)
    assert "resuming anyway" in caplog.text and str(path) in caplog.text
    assert warn._local_state()["docs"] == state["docs"]  # the saved position, as before


def test_unchanged_or_older_states_resume_exactly_and_quietly(tmp_path, tok, caplog):
    cfg = _cfg(_write(tmp_path / "a.jsonl", [f"apple {i}" for i in range(40)]), tok)
    ref = _make(cfg)
    want = [next(ref) for _ in range(14)][10:]
    state = _saved(cfg)
    assert [s["docs"] for s in state["sources"]] == [40]
    older = {k: v for k, v in state.items() if k != "sources"}  # saved before the field
    for st in (state, older):
        it = _make(cfg)
        with caplog.at_level(logging.WARNING):
            it.set_state(st)
        assert not caplog.records, caplog.text
        for a, b in zip([next(it) for _ in range(4)], want):
            assert all((a[k] == b[k]).all() for k in a)


def test_another_pattern_is_the_configs_change_and_state_holds_one_record(tmp_path, tok):
    """A changed data.sources is the trainer's loud config change (train/loop_resume.py), not
    refused here; the records sit once beside the processes' positions."""
    a = _write(tmp_path / "a.jsonl", [f"apple {i}" for i in range(40)])
    b = _write(tmp_path / "b.jsonl", [f"banana {i}" for i in range(30)])
    state = _saved(_cfg(a, tok))
    _make(_cfg(b, tok)).set_state(state)  # no error
    two = _make(_cfg(a, tok), pi=1, pc=2)
    next(two)
    wrapped = two.get_state()
    assert [r["docs"] for r in wrapped["sources"]] == [40]
    assert a not in json.dumps(wrapped)  # a position and a digest, not the config
    assert "sources" not in wrapped["processes"]["1"]
    with pytest.raises(ValueError, match="data.on_changed_sources must be one of"):
        _make(_cfg(a, tok, on_changed_sources="ignore"))


def test_a_repointed_symlink_is_the_same_source_and_its_change_is_refused(tmp_path, tok):
    """`data.sources=current/a.jsonl` with `current` a symlink moved to a new data version
    resolves elsewhere: the source was skipped as another pattern, which the config check did
    not see either (the pattern string is the same), so the run resumed on other data."""
    for version, n in (("v1", 40), ("v2", 55)):
        (tmp_path / version).mkdir()
        _write(tmp_path / version / "a.jsonl", [f"apple {version} {i}" for i in range(n)])
    (tmp_path / "current").symlink_to(tmp_path / "v1")
    cfg = _cfg(str(tmp_path / "current" / "a.jsonl"), tok)
    state = _saved(cfg)
    (tmp_path / "current").unlink()
    (tmp_path / "current").symlink_to(tmp_path / "v2")
    with pytest.raises(DataError, match=r"current/a\.jsonl: .*documents 40 -> 55"):
        _make(cfg).set_state(state)
