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
        ({"fields": {"context": 5}}, r"task 't': fields key paths must be strings"),
    ],
)
def test_spec_values_of_the_wrong_type_name_the_key(tmp_path, extra, match):
    (tmp_path / "mc.jsonl").write_text(json.dumps(ROW) + "\n")
    spec = {"name": "t", "type": "multiple_choice", "file": "mc.jsonl", **extra}
    with pytest.raises(ValueError, match=match):
        load_spec_file(_spec_file(tmp_path, spec))


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
