"""The trainer's command line: a `--config.KEY` flag the config has no KEY for is one line naming
the flag, the dotted key and the closest one (ml_collections' traceback named only the leaf,
or for SFT's `data.sources` nothing but "'sources'")."""

import os
import subprocess
import sys

from flaxlm.train.main import bad_override

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRETRAIN = os.path.join(REPO, "configs/pretrain.py") + ":variant=tiny,data=markov"
SFT = os.path.join(REPO, "configs/sft.py") + ":variant=tiny"


def test_bad_override_names_the_dotted_key_and_the_closest_one():
    argv = ["main", "--config", PRETRAIN, "--workdir", "w", "--config.model.d_modle=32"]
    assert bad_override(argv) == (
        "--config.model.d_modle: config has no key 'model.d_modle' (did you mean 'model.d_model'?)"
    )
    spaced = ["main", f"--config={PRETRAIN}", "--config.opt.lrr", "3"]
    assert "did you mean 'opt.lr'?" in bad_override(spaced)
    assert "config has no key 'data.sources'" in bad_override(
        ["main", "--config", SFT, "--config.data.sources=a.jsonl"]
    )
    good = ["main", "--config", PRETRAIN, "--config.model.d_model=32", "--config.opt.lr", "3"]
    assert bad_override(good) is None
    # A bare boolean flag is True (absl's): the misspelt key after it is the one named.
    bare = ["main", "--config", PRETRAIN, "--config.progress_bar", "--config.model.d_modle=32"]
    assert bad_override(bare).startswith("--config.model.d_modle: config has no key")
    assert bad_override(["main", "--config", PRETRAIN, "--config.progress_bar"]) is None


def test_the_trainer_stops_with_one_line_not_a_traceback(tmp_path):
    cmd = [sys.executable, "-m", "flaxlm.train.main", "--config", PRETRAIN,
           "--workdir", str(tmp_path), "--config.model.d_modle=32"]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "--config.model.d_modle: config has no key 'model.d_modle'" in out.stderr


def test_a_negative_value_after_a_space_is_the_value_and_the_misspelt_key_is_named():
    """absl takes the argument after a non-boolean flag as its value, `-1` too: the space form
    of a negative seed used to leave seed without one (blamed: "invalid literal for int()"),
    not the misspelt flag after it."""
    spaced = ["main", "--config", PRETRAIN, "--config.seed", "-1", "--config.opt.lrr=1e-3"]
    assert bad_override(spaced) == (
        "--config.opt.lrr: config has no key 'opt.lrr' (did you mean 'opt.lr'?)"
    )
    assert bad_override(["main", "--config", PRETRAIN, "--config.seed", "-1"]) is None
    assert bad_override(["main", "--config", PRETRAIN, "--config.opt.lr", "-1e-3"]) is None
    # a misspelt key taking the negative value is still the one named
    assert bad_override(["main", "--config", PRETRAIN, "--config.sed", "-1"]).startswith(
        "--config.sed: config has no key 'sed'"
    )
    # a flag after a valueless one is a flag, not the value (the key without one is named)
    assert bad_override(
        ["main", "--config", PRETRAIN, "--config.seed", "--config.opt.lr=1"]
    ).startswith("--config.seed: ")


def test_bad_input_during_the_run_is_one_line_naming_the_file(tmp_path):
    """A DataError (here: a chat file that is not JSON lines) stops the trainer with one line,
    its kind and the file:line it names, not a traceback through the batch iterator."""
    bad = tmp_path / "chat.jsonl"
    bad.write_text('{"prompt": "hi", "completion": "there"}\n{not json\n')
    from flaxlm.train import main

    config = __import__("flaxlm.configs.sft", fromlist=["get_config"]).get_config("variant=tiny")
    config.data.train = str(bad)
    config.data.strict = True
    try:
        main.run_task(main.TASKS["sft"], config, str(tmp_path / "run"))
    except SystemExit as e:
        message = str(e.code)
    else:
        raise AssertionError("the run did not stop")
    assert message.startswith("DataError: ") and f"{bad}:2" in message, message


def test_a_config_value_the_trainer_refuses_is_one_line_with_a_traceback_on_request(
    tmp_path, monkeypatch
):
    """The trainers refuse a bad config value with a ValueError naming the key (here pretrain's
    `check_sizes`): it was a traceback with that line at its end; now it is the line and how to
    get the traceback, which FLAXLM_TRACEBACK=1 gives."""
    import pytest

    from flaxlm.train import main

    config = __import__("flaxlm.configs.pretrain", fromlist=["get_config"]).get_config(
        "variant=tiny,runlocal=True,data=markov"
    )
    config.batch_size = 0
    monkeypatch.delenv(main.TRACEBACK_ENV, raising=False)
    with pytest.raises(SystemExit) as e:
        main.run_task(main.TASKS["pretrain"], config, str(tmp_path / "run"))
    first, hint = str(e.value.code).split("\n")
    assert first.startswith("ValueError: ") and "batch_size=0" in first, first
    assert hint == "(FLAXLM_TRACEBACK=1 shows where it was raised)"
    monkeypatch.setenv(main.TRACEBACK_ENV, "1")
    with pytest.raises(ValueError, match="batch_size=0"):
        main.run_task(main.TASKS["pretrain"], config, str(tmp_path / "run"))


def test_an_unknown_sharding_preset_is_one_line_before_anything_is_written(tmp_path):
    """--config.sharding=zero3: a 25-line KeyError traceback naming no key, after SFT had written
    its data report; now one line naming config.sharding, and no workdir."""
    import pytest

    from flaxlm.train import main

    config = __import__("flaxlm.configs.sft", fromlist=["get_config"]).get_config("variant=tiny")
    config.sharding = "zero3"
    with pytest.raises(SystemExit) as e:
        main.run_task(main.TASKS["sft"], config, str(tmp_path / "run"))
    first = str(e.value.code).split("\n")[0]
    assert first.startswith("ValueError: config.sharding='zero3': unknown sharding preset; "
                            "known: dp, fsdp, fsdp_tp"), first  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_a_data_path_that_matches_nothing_is_one_line_naming_its_key(tmp_path, monkeypatch):
    """data.eval='nothere.jsonl': one line naming the pattern and the key that holds it (it was
    a 34-line FileNotFoundError traceback naming no key)."""
    import pytest

    from flaxlm.train import main

    config = __import__("flaxlm.configs.sft", fromlist=["get_config"]).get_config("variant=tiny")
    config.data.eval = "nothere.jsonl"
    monkeypatch.delenv(main.TRACEBACK_ENV, raising=False)
    with pytest.raises(SystemExit) as e:
        main.run_task(main.TASKS["sft"], config, str(tmp_path / "run"))
    message = str(e.value.code)
    assert message.startswith("FileNotFoundError: ") and "nothere.jsonl" in message, message
    assert message.endswith("(data.eval)") and "\n" not in message, message
    assert main.keys_naming(config, "nothere.jsonl") == ["data.eval"]


def test_a_misspelt_config_arg_is_one_line(tmp_path):
    """`configs/sft.py:varient=tiny` (the part after the file) was a 35-line traceback ending
    in configs/common.py's KeyError; now that message as absl's one-line flag error."""
    config = os.path.join(REPO, "configs/sft.py") + ":varient=tiny"
    cmd = [sys.executable, "-m", "flaxlm.train.main", "--config", config,
           "--workdir", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "FATAL Flags parsing error: --config: config arg: unknown key 'varient'" in out.stderr


def test_a_reward_failing_on_every_sample_is_one_line_naming_where_it_raised(tmp_path, monkeypatch):
    """A rollout with no valid sample (every reward call raised) was a RuntimeError traceback
    through the loop; its message already says which reward raised what, and where: one line."""
    import sys
    import types

    import pytest

    from flaxlm.alignment import rl_rollout
    from flaxlm.train import main

    def broken(meta, text):
        return 1 / 0

    _, valid, errors = rl_rollout.call_reward_fns([broken], [1.0], [{}], ["x"])
    assert not valid.any() and len(errors) == 1
    assert errors[0].startswith("reward broken raised ZeroDivisionError: division by zero")
    assert errors[0].endswith(
        f"(test_main_flags.py:{broken.__code__.co_firstlineno + 1} in broken)"
    )

    task = types.ModuleType("fake_rl_task")

    def run(config, workdir):
        raise rl_rollout.RewardError(
            f"rollout 0: no valid sample (1 bad rewards here; first: {errors[0]})"
        )

    task.run = run
    monkeypatch.setitem(sys.modules, "fake_rl_task", task)
    with pytest.raises(SystemExit) as e:
        main.run_task("fake_rl_task", {}, str(tmp_path / "run"))
    message = str(e.value.code)
    assert message.startswith("RewardError: rollout 0: no valid sample") and "\n" not in message
