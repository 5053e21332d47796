"""`python -m flaxlm.generate`: bad flags fail before any checkpoint is read (the model
directory here does not exist, so reaching the loader would fail differently)."""

import json
import re

import pytest

from flaxlm import generate as cli


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--temperature", "nan"], "--temperature must be >= 0 and finite"),  # (decoded 0s)
        (["--temperature", "inf"], "--temperature must be >= 0 and finite"),
        (["--top_k", "-2"], "--top_k must be >= 0"),
        (["--top_p", "0"], r"--top_p must be in \(0, 1\]"),
        (["--top_p", "1.5"], r"--top_p must be in \(0, 1\]"),
        (["--min_p", "1"], r"--min_p must be in \[0, 1\)"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--num_samples", "0"], "--num_samples must be >= 1"),
        (["--num_samples", "2", "--temperature", "0"], "--num_samples > 1 needs --temperature"),
        (["--system", "Be brief."], "--system needs --chat"),
        (["--stop", ""], "--stop needs a non-empty string"),
        (["--draft", "ngram", "--decode_norm", "fold"], "--decode_mlp/--decode_norm do not apply"),
        (["--decode_mlp", "pallas:32"], "--decode_mlp: decode_mlp='pallas:32'"),
        (["--repetition_penalty", "0"], "--repetition_penalty must be > 0 and finite"),
        (["--repetition_penalty", "nan"], "--repetition_penalty must be > 0 and finite"),
        (["--frequency_penalty", "inf"], "--frequency_penalty must be finite"),
        (["--presence_penalty", "nan"], "--presence_penalty must be finite"),
        (["--draft", "ngram", "--presence_penalty", "1"], "do not apply with --draft"),
    ],
)
def test_bad_flags_are_usage_errors(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([str(tmp_path / "no_such_run"), "--prompt", "hi", *flags])
    assert e.value.code == 2  # argparse's usage error, not a traceback from generate
    assert re.search(message, capsys.readouterr().err)


USER = {"role": "user", "content": "2+2?"}
BAD_RECORDS = [  # (line 2 of p.jsonl, flags, what the error says after "p.jsonl:2: ")
    ("2+2?", [], "malformed_json"),  # a text line in a .jsonl file
    ('{"prompt": "  ", "meta": {"answer": "4"}}', [], "empty (empty prompt)"),
    ('{"meta": {"answer": "4"}}', [], "missing_field (no prompt field 'prompt')"),
    ('{"prompt": "2+2?", "meta": "4"}', [], "bad_meta (meta='4' is not a JSON object)"),
    ('["2+2?"]', [], "bad_record (record is not a JSON object)"),
    (json.dumps({"prompt": [USER]}), [], "a prompt of messages needs --chat"),
    (json.dumps({"prompt": [{"role": "system", "content": "be brief"}, USER]}),
     ["--chat", "--system", "say 4"], "a system turn of its own"),
    (json.dumps({"prompt": [{"role": "assistant", "content": "4"}]}), ["--chat"],
     "only assistant turns"),
    (json.dumps({"prompt": "2+2?", "tools": [{"name": "calc"}]}), [], "bad_tools"),
]  # fmt: skip


@pytest.mark.parametrize("line, flags, message", BAD_RECORDS)
def test_bad_prompt_records_are_usage_errors_naming_the_line(line, flags, message, tmp_path,
                                                             capsys):  # fmt: skip
    """A .jsonl --prompts_file holds RL prompt records ({"prompt", "meta"}); a record that is
    bad, or that these flags cannot render, fails before any checkpoint is read."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "1+1?", "meta": {"answer": "2"}}\n' + line + "\n")
    with pytest.raises(SystemExit) as e:
        cli.main([str(tmp_path / "no_such_run"), "--prompts_file", str(path), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--prompts_file {path}:2: " in err and message in err
    if message == "malformed_json":  # a file of text prompts named .jsonl: said so
        assert "name a file of text prompts otherwise, e.g. .txt" in err
