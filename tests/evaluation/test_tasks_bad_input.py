"""Task specs and task files with bad values: errors name the spec key or file:line."""

import json

import pytest

from flaxlm.evaluation.tasks import TaskFileError, load_spec_file, read_examples, world_tasks

ROW = {"context": "Q", "choices": ["a", "b"], "answer": 0}


def _spec_file(tmp_path, spec):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_invalid_utf8_row_names_file_and_line(tmp_path):
    (tmp_path / "mc.jsonl").write_bytes(
        json.dumps(ROW).encode() + b'\n{"context": "Q\xff", "choices": ["a", "b"], "answer": 1}\n'
    )
    spec = load_spec_file(
        _spec_file(tmp_path, {"name": "t", "type": "multiple_choice", "file": "mc.jsonl"})
    )[0]
    with pytest.raises(TaskFileError, match=r"mc\.jsonl:2: invalid UTF-8 \(task 't'\)"):
        read_examples(spec)


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"num_fewshot": "2"}, r"spec\.json\[0\]: num_fewshot='2' must be of type int"),
        ({"stop": "\n\n"}, r"spec\.json\[0\]: stop='\\n\\n' must be of type tuple"),  # was 2 x "\n"
        ({"chat": "yes"}, r"spec\.json\[0\]: chat='yes' must be of type bool"),
        ({"pass_at_k": ["1"]}, r"spec\.json\[0\]: pass_at_k=\['1'\] must be of type tuple"),
        (
            {"pass_at_k": [2]},
            r"spec\.json\[0\]: task 't': pass_at_k=\[2\] needs a generation "
            "task with num_samples >= 2",
        ),
        ({"fields": {"context": 5}}, r"task 't': fields key paths must be strings"),
    ],
)
def test_spec_values_of_the_wrong_type_name_the_key(tmp_path, extra, match):
    (tmp_path / "mc.jsonl").write_text(json.dumps(ROW) + "\n")
    spec = {"name": "t", "type": "multiple_choice", "file": "mc.jsonl", **extra}
    with pytest.raises(ValueError, match=match):
        load_spec_file(_spec_file(tmp_path, spec))


def test_code_limits_are_checked_when_the_spec_is_read(tmp_path):
    """A code task's code_limits (verify_code's Limits fields) fail on reading the spec, naming
    the spec entry, the task and the field; on a task that runs no code they are an error."""
    code = {"name": "t", "type": "generation", "file": "g.jsonl", "scoring": "code"}
    for limits, match in [
        (
            {"memory_mb": 0},
            r"spec\.json\[0\]: task 't': code_limits\.memory_mb=0: expected a "
            "positive integer",
        ),
        ({"timeot": 5}, r"spec\.json\[0\]: task 't': code_limits\.timeot: no such limit"),
        ({"network": "yes"}, r"code_limits\.network='yes': expected True or False"),
        (5, r"spec\.json\[0\]: code_limits=5 must be of type dict"),
    ]:
        with pytest.raises(ValueError, match=match):
            load_spec_file(_spec_file(tmp_path, {**code, "code_limits": limits}))
    spec = load_spec_file(_spec_file(tmp_path, {**code, "code_limits": {"timeout": 20}}))[0]
    assert spec.limits.timeout == 20 and spec.limits.memory_mb == 1024  # (the others: defaults)
    assert spec.to_dict()["code_limits"] == {"timeout": 20}  # (what results record)
    with pytest.raises(ValueError, match=r"task 't': code_limits is for scoring='code', not "
                                         r"'exact_match'"):  # fmt: skip
        load_spec_file(_spec_file(tmp_path, {**code, "scoring": "exact_match",
                                             "code_limits": {"timeout": 20}}))  # fmt: skip


def test_a_spec_list_of_non_objects_and_a_bad_manifest(tmp_path):
    with pytest.raises(ValueError, match=r"spec\.json\[0\]: a spec must be a JSON object"):
        load_spec_file(_spec_file(tmp_path, ["mc_facts"]))
    (tmp_path / "manifest.json").write_text('{"eval_tasks": {')
    with pytest.raises(TaskFileError, match=r"manifest\.json:1: invalid JSON manifest"):
        world_tasks(str(tmp_path))


def test_a_task_file_that_is_a_directory_is_named(tmp_path):
    """A task "file": "." was an IsADirectoryError traceback naming neither the task nor key."""
    (tmp_path / "mc.jsonl").write_text(json.dumps(ROW) + "\n")
    for key in ("file", "fewshot_file"):
        spec = {"name": "t", "type": "multiple_choice", "file": "mc.jsonl", key: "."}
        if key == "fewshot_file":
            spec["num_fewshot"] = 1
        spec = load_spec_file(_spec_file(tmp_path, spec))[0]
        with pytest.raises(TaskFileError, match=r": not a file \(task 't'\)$"):
            read_examples(spec, fewshot=key == "fewshot_file")


@pytest.mark.parametrize(
    "extra,match",
    [({"temperature": float("nan")}, "temperature must be >= 0"),
     ({"max_new_tokens": 1.5}, "max_new_tokens=1.5 must be of type int"),
     ({"num_fewshot": 2.0}, "num_fewshot=2.0 must be of type int")],
)  # fmt: skip
def test_a_nan_temperature_and_fractional_counts_are_refused(tmp_path, extra, match):
    spec = {"name": "g", "type": "generation", "file": "g.jsonl", **extra}
    with pytest.raises(ValueError, match=match):
        load_spec_file(_spec_file(tmp_path, spec))


@pytest.mark.parametrize("answer", [2, "2", "C"])
def test_a_multiple_choice_answer_one_past_the_choices_is_named(tmp_path, answer):
    (tmp_path / "mc.jsonl").write_text(json.dumps({**ROW, "answer": answer}) + "\n")
    (spec,) = load_spec_file(_spec_file(tmp_path, {"name": "mc", "type": "multiple_choice",
                                                   "file": "mc.jsonl"}))  # fmt: skip
    with pytest.raises(TaskFileError, match=r"mc.jsonl:1: .*answer index 2 out of range for 2"):
        read_examples(spec)


def test_rows_are_numbered_without_blank_lines_and_fewshot_files_join_the_spec_dir(tmp_path):
    rows = [json.dumps({**ROW, "context": q}) for q in ("A", "B", "C")]
    (tmp_path / "mc.jsonl").write_text(f"{rows[0]}\n\n{rows[1]}\n   \n{rows[2]}\n")
    (spec,) = load_spec_file(_spec_file(tmp_path, {
        "name": "mc", "type": "multiple_choice", "file": "mc.jsonl",
        "fewshot_file": "shots.jsonl", "num_fewshot": 1}))  # fmt: skip
    assert spec.fewshot_file == str(tmp_path / "shots.jsonl")
    got = read_examples(spec)
    assert [(e.fields["context"], e.index) for e in got] == [("A", 0), ("B", 1), ("C", 2)]
    assert [e.source.rsplit(":", 1)[1] for e in got] == ["1", "3", "5"]
