"""`python -m flaxlm.generate`: bad flags fail before any checkpoint is read (the model
directory here does not exist, so reaching the loader would fail differently)."""

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
    ],
)
def test_bad_flags_are_usage_errors(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([str(tmp_path / "no_such_run"), "--prompt", "hi", *flags])
    assert e.value.code == 2  # argparse's usage error, not a traceback from generate
    assert re.search(message, capsys.readouterr().err)
