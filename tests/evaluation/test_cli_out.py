"""--out of the evaluation command lines is checked before any work: an unusable one is a
one-line error naming --out, not a traceback after the model loaded and a task ran."""

import json

import pytest

from flaxlm.evaluation import passkey as P
from flaxlm.evaluation.__main__ import main


def _tasks(tmp_path) -> str:
    (tmp_path / "ok.jsonl").write_text(
        json.dumps({"context": "Kavo lives in", "choices": [" Paris", " Lima"], "answer": 0})
    )
    spec = [{"name": "ok", "type": "multiple_choice", "file": "ok.jsonl"}]
    (tmp_path / "s.json").write_text(json.dumps(spec))
    return str(tmp_path / "s.json")


def test_an_unusable_out_fails_before_the_model_loads(
    run_dir, tok_path, tmp_path, monkeypatch, capsys
):
    """--out naming an existing directory ran the first task and then failed writing it
    (IsADirectoryError), leaving OUT.tmp behind; a parent that is a file failed the same way
    (NotADirectoryError). Both are now a one-line exit before the checkpoint is read."""
    from flaxlm.train import checkpoint

    def never(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(checkpoint, "load_model", never)
    argv = ["--checkpoint", run_dir, "--tokenizer", tok_path, "--tasks", _tasks(tmp_path)]
    (tmp_path / "outdir").mkdir()
    with pytest.raises(SystemExit, match=r"^--out .*outdir: is a directory"):
        main([*argv, "--out", str(tmp_path / "outdir")])
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match=r"^--out .*afile/sub/o\.json: .*afile is not a dir"):
        main([*argv, "--out", str(tmp_path / "afile" / "sub" / "o.json")])
    assert "[eval]" not in capsys.readouterr().err  # no task ran
    assert not (tmp_path / "outdir.tmp").exists()


def test_out_parents_are_created_and_a_file_is_replaced(run_dir, tok_path, tmp_path):
    """What the check lets through still works: missing parent directories are made, an
    existing results file is overwritten."""
    argv = ["--checkpoint", run_dir, "--tokenizer", tok_path, "--tasks", _tasks(tmp_path),
            "--batch_tokens", "128"]  # fmt: skip
    out = tmp_path / "new" / "deeper" / "o.json"
    main([*argv, "--out", str(out)])
    assert json.loads(out.read_text())["tasks"]["ok"]["n"] == 1
    out.write_text("old")
    main([*argv, "--out", str(out)])
    assert json.loads(out.read_text())["tasks"]["ok"]["n"] == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.json"]  # no o.json.tmp left


def test_passkey_out_that_is_a_file_names_out(tok_path, tmp_path):
    """passkey --out EXISTING_FILE ended in a FileExistsError traceback from os.makedirs after
    every row was built; it is a one-line error naming --out, before the tokenizer loads (the
    missing tokenizer here is not what is reported)."""
    (tmp_path / "afile").write_text("")
    argv = ["--tokenizer", str(tmp_path / "nope.model"), "--lengths", "128"]
    with pytest.raises(SystemExit, match=r"^--out .*afile: not a directory"):
        P.main(["--out", str(tmp_path / "afile"), *argv])
    with pytest.raises(SystemExit, match=r"^--out .*afile/pk: .*afile is not a directory"):
        P.main(["--out", str(tmp_path / "afile" / "pk"), *argv])
    # an existing directory (and one to create) is fine: the tokenizer is what fails then
    for ok in (tmp_path, tmp_path / "new" / "pk"):
        with pytest.raises(SystemExit, match="--tokenizer .*nope.model: no such file"):
            P.main(["--out", str(ok), *argv])
