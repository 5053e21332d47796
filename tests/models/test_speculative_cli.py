"""flaxlm/generate.py's --draft (speculative decoding's draft model): a directory that holds
no model fails naming the flag, not only the path."""

import types

import pytest

from flaxlm import generate as cli


def test_missing_draft_directory_names_the_flag(tmp_path):
    missing = str(tmp_path / "no_such_run")
    args = types.SimpleNamespace(draft=missing, tokenizer="", dtype="")
    with pytest.raises(SystemExit) as e:
        cli._load_draft(args, None, [], None, None)
    assert str(e.value.code).startswith(f"--draft {missing}: neither a flaxlm run"), e.value.code
