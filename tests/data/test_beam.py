"""The preprocess stages on Beam (its DirectRunner, and the in-process FnApiRunner the CLI
defaults to) keep exactly what the streaming CLI keeps."""

import json
import string

import numpy as np
import pytest

from flaxlm.data import preprocess, sources
from flaxlm.data.tokenizer import train

beam_mod = pytest.importorskip("flaxlm.data.beam")  # apache-beam is in install_requires

STOP = ["the", "of", "and", "to", "that", "with", "have", "be"]


def en_doc(rng, n=100, stop=STOP):
    letters = np.array(list(string.ascii_lowercase))
    words = ["".join(rng.choice(letters, rng.integers(3, 9))) for _ in range(n)]
    for i in range(0, n, 6):
        words[i] = stop[i % len(stop)]
    return " ".join(words)


def test_beam_matches_streaming_cli(tmp_path):
    rng = np.random.default_rng(0)
    base = [en_doc(rng) for _ in range(60)]
    rows = []
    for i, d in enumerate(base):
        rows.append({"text": d})
        w = d.split()
        if i % 5 == 0:  # near duplicate: one swap
            w[10], w[11] = w[11], w[10]
            rows.append({"text": " ".join(w)})
        if i % 7 == 0:
            rows.append({"text": d.upper()})  # exact duplicate
        if i % 11 == 0:
            rows.append({"text": d + " call 415-555-2671 you idiot"})  # toxic
    rows.append({"text": "short"})
    french = ["le", "la", "les", "et", "est", "que", "des", "pour"]
    rows += [{"text": en_doc(rng, stop=french)} for _ in range(3)]  # dropped as "language"
    for k in range(2):  # two files, so keys span files
        with open(tmp_path / f"in{k}.jsonl", "w") as f:
            for r in rows[k::2]:
                f.write(json.dumps(r) + "\n")
            f.write("{oops\n")
    evalf = tmp_path / "eval.jsonl"
    evalf.write_text(json.dumps({"text": " ".join(base[3].split()[20:40])}) + "\n")
    tok = str(tmp_path / "tok.model")
    train(base, 500, model_path=tok)
    inputs = [str(tmp_path / "in*.jsonl")]
    over = [f"--config.tokenizer={tok}", f"--config.dedup.decontam_paths={evalf}"]
    ref = preprocess.main(["--input", *inputs, "--output", str(tmp_path / "cli"), *over])
    got = beam_mod.main(
        [
            "--input",
            *inputs,
            "--output",
            str(tmp_path / "beam"),
            *over,
            "--num_shards=3",
            "--runner=DirectRunner",
        ]
    )
    for k in ("documents_in", "documents_out", "removed", "tokens"):
        assert got[k] == ref[k], k
    assert set(ref["removed"]) >= {
        "exact_duplicate",
        "near_duplicate",
        "toxic",
        "contaminated",
        "malformed_json",
        "too_short",
        "language",
    }
    assert len(got["shards"]) == 3
    for a, b in zip(got["stages"][:3], ref["stages"][:3]):
        assert (a["stage"], a["in"], a["out"]) == (b["stage"], b["in"], b["out"])
    kept = ref["stages"][1]["out"]  # every document cleaning kept is English here
    assert got["stages"][1]["languages"] == ref["stages"][1]["languages"] == {"en": kept}
    assert ref["removed"]["language"] == got["removed"]["language"] == 3

    def docs(d):
        src = sources.open_source(str(tmp_path / d / "tokens"))
        return sorted(src[i].tobytes() for i in range(len(src)))

    assert docs("beam") == docs("cli")
    assert "| dedup |" in open(tmp_path / "beam" / "report.md").read()


def test_a_bad_setting_is_refused_before_anything_is_written(tmp_path):
    """A misspelt txt_mode (found by the CLI before it writes) stops the Beam pipeline by name
    before meta.json or a shard folder exists: the corrected rerun starts clean."""
    (tmp_path / "in.txt").write_text("some plain text\n" * 3)
    out = tmp_path / "beam"
    with pytest.raises(ValueError, match="txt_mode"):
        beam_mod.run([str(tmp_path / "in.txt")], str(out), _config("txt_mode=paragraphz"))
    assert not out.exists() or not any(out.iterdir())


def _config(*overrides):
    cfg = preprocess.preprocess_config()
    preprocess.apply_overrides(cfg, [f"--config.{o}" for o in overrides])
    return cfg


@pytest.mark.parametrize("bad, says", [
    ("txt_mode=paragraphz", "txt_mode must be"),
    ("dedup.bands=500", "dedup.bands must be in"),
    ("dedup.decontam_paths=nope.jsonl", "dedup.decontam_paths: no files match"),
])  # fmt: skip
def test_the_cli_names_a_bad_setting_in_one_line(tmp_path, bad, says):
    """The Beam CLI stops on a bad setting or a missing eval file with the line the preprocess
    CLI gives (it was a traceback), before anything is written."""
    (tmp_path / "in.txt").write_text("some plain text\n" * 3)
    out = tmp_path / "beam"
    with pytest.raises(SystemExit, match=says) as e:
        beam_mod.main(["--input", str(tmp_path / "in.txt"), "--output", str(out),
                       f"--config.{bad}", "--runner=DirectRunner"])  # fmt: skip
    assert "\n" not in str(e.value) and (not out.exists() or not any(out.iterdir()))


def test_flagged_count_is_of_the_kept_documents_as_in_the_cli(tmp_path):
    """decontam_mode="flag": a flagged document that the near stage drops is not counted as
    flagged (kept), in Beam as in the streaming CLI."""
    question = "the quick brown fox jumps over the lazy dog"
    base = " ".join(f"filler{k}" for k in range(40)) + " "
    rows = [base + question, base + question.replace("dog", "cat"), "other words " * 20]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    ev = tmp_path / "eval.jsonl"
    ev.write_text(json.dumps({"text": question}) + "\n")
    over = [f"--config.dedup.decontam_paths={ev}", "--config.dedup.decontam_mode=flag",
            "--config.dedup.decontam_ngram=5", "--config.do_clean=false"]  # fmt: skip
    args = ["--input", str(tmp_path / "in.jsonl"), *over]
    ref = preprocess.main([*args, "--output", str(tmp_path / "cli")])
    got = beam_mod.main([*args, "--output", str(tmp_path / "beam")])
    for rep in (ref, got):
        dd = next(s for s in rep["stages"] if s["stage"] == "dedup")
        assert (rep["documents_out"], dd["flagged_contaminated"]) == (2, 1), rep


def test_every_shard_is_written_and_a_set_missing_some_is_refused(tmp_path):
    """A killed Beam job left the shards its finished workers wrote under their final names,
    and training read `tokens/` (3 of 8 shards) with no warning. Shards are now renamed into
    place when complete, all N are written (empty ones too: a complete job's set is whole),
    and the loader refuses a directory or glob whose N-shard set lacks members."""
    import os
    import shutil

    from flaxlm.data.source_errors import DataError

    rng = np.random.default_rng(1)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": en_doc(rng)}) + "\n" for _ in range(2)))
    out = tmp_path / "beam"
    beam_mod.main(["--input", str(src), "--output", str(out), "--num_shards=8"])
    text = out / "text"
    names = sorted(os.listdir(text))
    assert names == ["meta.json"] + [f"shard-{i:05d}-of-00008.arrayrecord" for i in range(8)]
    assert len(sources.open_source(str(text))) == 2  # 2 documents, 6 shards empty

    cut = tmp_path / "cut"
    shutil.copytree(text, cut)
    for i in (0, 3):
        os.remove(cut / f"shard-{i:05d}-of-00008.arrayrecord")
    for pattern in (str(cut), str(cut / "shard-*")):
        with pytest.raises(DataError, match=r"2 of the 8 shards shard-\*-of-00008.arrayrecord "
                           r"are missing from .*cut: shard-00000-of-00008.arrayrecord, "
                           r"shard-00003-of-00008.arrayrecord"):  # fmt: skip
            sources.expand_paths(pattern)
    # A finished run's report.json listing exactly the shards present: Beam before 2026-12-06
    # wrote no file for an empty shard, and such a complete output still reads
    listed = sorted(f"cut/{n}" for n in os.listdir(cut) if n.startswith("shard-"))
    (tmp_path / "report.json").write_text(json.dumps({"shards": listed}))
    assert len(sources.expand_paths(str(cut))) == 6
    (tmp_path / "report.json").write_text(json.dumps({"shards": listed + ["cut/x"]}))
    assert len(sources.expand_paths(str(cut))) == 6  # (not a shard name: ignored)
    (tmp_path / "report.json").write_text(json.dumps({"shards": listed[1:]}))
    with pytest.raises(DataError, match="2 of the 8 shards"):  # one present it never wrote
        sources.expand_paths(str(cut))
    one = str(cut / "shard-00001-of-00008.arrayrecord")  # a file named itself: read as it is
    assert sources.expand_paths(one) == [one]
    assert sources.expand_paths(str(text / "shard-0000[0-2]-*")) == [  # a subset, on purpose
        str(text / f"shard-{i:05d}-of-00008.arrayrecord") for i in range(3)
    ]
    hf = tmp_path / "hf"  # HF numbers its shards from 1: model-00001-of-00002 is complete
    hf.mkdir()
    for i in (1, 2):
        (hf / f"model-{i:05d}-of-00002.jsonl").write_text('{"text": "x"}\n')
    assert len(sources.expand_paths(str(hf))) == 2


@pytest.mark.parametrize("runner", [None, "DirectRunner"])
def test_a_run_leaves_nothing_in_the_temp_dir_and_defaults_to_the_in_process_runner(
    tmp_path, monkeypatch, runner
):
    """Every DirectRunner run left an empty beam-temp* directory in /tmp (the job server made for
    Prism is never stopped when Prism cannot start): hundreds piled up. Without --runner the
    CLI runs on the FnApiRunner (DirectRunner first tries to download Prism from GitHub)."""
    import tempfile

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert beam_mod.pipeline_options([]).get_all_options()["runner"] == "FnApiRunner"
    for named in (["--runner=DirectRunner"], ["--runner", "DataflowRunner"]):
        got = beam_mod.pipeline_options(named).get_all_options()["runner"]
        assert got == named[-1].split("=")[-1]
    rng = np.random.default_rng(2)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": en_doc(rng)}) + "\n" for _ in range(3)))
    args = ["--input", str(src), "--output", str(tmp_path / "beam")]
    rep = beam_mod.main(args + ([f"--runner={runner}"] if runner else []))
    assert rep["documents_in"] == 3
    assert list(temp.iterdir()) == []
    assert tempfile.tempdir == str(temp)  # (restored)
