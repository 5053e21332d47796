"""Decontamination against standard benchmarks: preprocess's ``dedup.decontam_benchmarks``
(data/benchmark_texts.py, counted per benchmark in the report; Beam's stage from the same
pieces) and the standalone checker ``python -m flaxlm.data.decontaminate`` on SFT, preference and
RL prompt records and pretraining files. Benchmark directories are tiny files in the official
layouts (the hub's parquet split files, an original repo's jsonl); no model, no JAX."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flaxlm.data import benchmark_texts as BT
from flaxlm.data import decontaminate as D
from flaxlm.data import preprocess
from flaxlm.data import sources as S

HUB = "test-00000-of-00001.parquet"  # the hub's name of a one-file test split

ARM = ("Which of the following bones forms the upper part of the human arm and connects the "
       "shoulder to the elbow joint?")  # fmt: skip
PLANET = ("Which planet in our solar system has the shortest orbital period around the Sun and "
          "almost no atmosphere?")  # fmt: skip
# (in MMLU's dev split: a shot, never an item)
KIDNEY = ("Which organ of the human body is responsible for filtering the blood and producing "
          "urine every single day?")  # fmt: skip
MUFFINS = ("A baker makes forty-eight muffins every morning and sells three quarters of them "
           "before noon. How many muffins are left for the afternoon?")  # fmt: skip
MUFFINS_SOLUTION = ("She sells 48 * 3 / 4 = <<48*3/4=36>>36 muffins.\nSo 48 - 36 = <<48-36=12>>12 "
                    "muffins are left.\n#### 12")  # fmt: skip


def _parquet(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _mc(question, choices, answer, subject):
    return {"question": question, "subject": subject, "choices": choices, "answer": answer}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """MMLU as cais/mmlu's parquet files (two subjects, a dev split beside one), GSM8K as the
    original repo's jsonl (test only: the few-shot train split is not needed)."""
    root = tmp_path_factory.mktemp("bench")
    mmlu, gsm8k = str(root / "mmlu"), str(root / "gsm8k")
    _parquet(f"{mmlu}/anatomy/{HUB}", [
        _mc(ARM, ["Femur", "Humerus", "Tibia", "Fibula"], 1, "anatomy"),
        _mc("Where is the cornea?", ["Eye", "Ear", "Nose", "Skin"], 0, "anatomy"),  # too short
    ])  # fmt: skip
    _parquet(f"{mmlu}/anatomy/dev-00000-of-00001.parquet",
             [_mc(KIDNEY, ["Liver", "Kidney", "Heart", "Lung"], 1, "anatomy")])  # fmt: skip
    _parquet(f"{mmlu}/astronomy/{HUB}",
             [_mc(PLANET, ["Venus", "Mercury", "Mars", "Jupiter"], 1, "astronomy")])  # fmt: skip
    _jsonl(f"{gsm8k}/grade_school_math/data/test.jsonl", [
        {"question": MUFFINS, "answer": MUFFINS_SOLUTION},
        {"question": "Tom has 3 apples. How many?", "answer": "3\n#### 3"},
    ])  # fmt: skip
    return {"mmlu": mmlu, "gsm8k": gsm8k, "root": str(root)}


def test_items_are_the_evaluated_examples_question_and_answer(bench):
    """One item per evaluated example: MMLU's question and correct choice (subjects in the
    preset's order; the dev split left out), GSM8K's question and worked solution."""
    got = BT.load_benchmarks(f"mmlu:{bench['mmlu']}, gsm8k:{bench['gsm8k']}", "k")
    assert got == {
        "mmlu": [f"{ARM}\nHumerus", "Where is the cornea?\nEye", f"{PLANET}\nMercury"],
        "gsm8k": [f"{MUFFINS}\n{MUFFINS_SOLUTION}", "Tom has 3 apples. How many?\n3\n#### 3"],
    }
    assert BT.load_benchmarks("", "k") == {}


def test_item_text_per_task_type(tmp_path):
    """Through each preset's own row preprocessor: BoolQ's passage, question and answer;
    WinoGrande's sentence with the correct option; HellaSwag's cleaned context and ending; code
    tasks' prompt, canonical solution and tests."""
    d = str(tmp_path)
    _jsonl(
        f"{d}/boolq/dev.jsonl",
        [
            {
                "question": "is the sun a star",
                "answer": True,
                "passage": "Sun -- The Sun is the star at the centre.",
            }
        ],
    )
    _jsonl(f"{d}/winogrande/dev.jsonl", [{
        "sentence": "The trophy doesn't fit into the suitcase because the _ is too large.",
        "option1": "trophy", "option2": "suitcase", "answer": "1"}])  # fmt: skip
    _jsonl(f"{d}/hellaswag/hellaswag_val.jsonl", [{
        "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he", "endings": ["sings.", "[step] starts pulling up roofing."],
        "label": "1"}])  # fmt: skip
    he = {"task_id": "HumanEval/0", "prompt": "def neg(x):\n    \"\"\" -x \"\"\"\n",
          "canonical_solution": "    return -x\n", "entry_point": "neg",
          "test": "def check(candidate):\n    assert candidate(2) == -2\n"}  # fmt: skip
    _jsonl(f"{d}/humaneval/HumanEval.jsonl", [he])
    _jsonl(f"{d}/mbpp/full/test.jsonl", [{
        "task_id": 11, "text": "Write a function to negate a number.",
        "code": "def neg(x):\n    return -x", "test_list": ["assert neg(1) == -1",
                                                            "assert neg(0) == 0"]}])  # fmt: skip
    got = {name: BT.benchmark_texts(name, f"{d}/{name}")[0]
           for name in ("boolq", "winogrande", "hellaswag", "humaneval", "mbpp")}  # fmt: skip
    assert got == {
        "boolq": "Sun -- The Sun is the star at the centre.\nis the sun a star\nyes",
        "winogrande": "The trophy doesn't fit into the suitcase because the trophy is too large.",
        # (hellaswag_clean drops the tag, not the space after it)
        "hellaswag": "Roof shingle removal: A man is sitting on a roof. He\n starts pulling up "
        "roofing.",
        "humaneval": he["prompt"] + "\n" + he["canonical_solution"] + "\n" + he["test"],
        "mbpp": "Write a function to negate a number.\ndef neg(x):\n    return -x\n"
        "assert neg(1) == -1\nassert neg(0) == 0",
    }


# ---------------------------------------------------------------------------------------------
# preprocess: dedup.decontam_benchmarks

INTRO = "Here is a practice question that our study group used in the library last week. "
OUTRO = " We talked about it for a while and then went home for dinner with the whole family."
CORPUS = {
    "clean": "The garden was quiet in the early morning, and the old gardener walked slowly "
    "between the rows of roses while the birds sang in the trees above the small pond.",
    "eval_file": "The train left the station at noon and crossed the wide green valley before "
    "it reached the mountains, where the snow was still deep on the northern slopes.",
    "mmlu": INTRO + ARM + " The answer is the humerus, of course." + OUTRO,
    "gsm8k": "Math club notes for the week. " + MUFFINS + OUTRO,
    # shares runs of 5 and 6 words with ARM's item, not 13: kept
    "paraphrase": "Our quiz asked which bone forms the upper part of the arm, the one that "
    "connects the shoulder to the elbow, and most of the class said that it was the humerus.",
    "dev_split": INTRO + KIDNEY + " It is the kidney, of course." + OUTRO,  # a shot: kept
    # the end of one item and the start of the next: no n-gram runs across two items
    "two_items": INTRO + "Where is the cornea? Eye Which planet in our solar system has the "
    "largest moon? Nobody in the group knew the answer to that one." + OUTRO,
}
CONTAMINATED = {"mmlu", "gsm8k", "eval_file"}


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    _jsonl(str(path), [{"text": t} for t in CORPUS.values()])
    ev = tmp_path / "eval.jsonl"  # a decontam_paths file beside the benchmarks
    _jsonl(str(ev), [{"text": " ".join(CORPUS["eval_file"].split()[2:18])}])
    return str(path), str(ev)


def _preprocess(corpus, out, *over):
    path, _ = corpus
    return preprocess.main(["--input", path, "--output", str(out), "--config.dedup.near=False",
                            "--config.clean.min_words=1", *over])  # fmt: skip


def _first13(text):
    """The first 13-gram of an item, as the report shows a shared n-gram."""
    return " ".join(text.lower().split()[:13])


def test_preprocess_drops_the_contaminated_and_counts_per_benchmark(bench, corpus, tmp_path):
    out = tmp_path / "out"
    rep = _preprocess(corpus, out, f"--config.dedup.decontam_paths={corpus[1]}",
                      f"--config.dedup.decontam_benchmarks=mmlu:{bench['mmlu']}, "
                      f"gsm8k:{bench['gsm8k']}")  # fmt: skip
    assert rep["removed"] == {"contaminated": 3}
    kept = [d.text for d in S.iter_documents(str(out / "text"))]
    assert kept == [t for k, t in CORPUS.items() if k not in CONTAMINATED]
    sets = rep["stages"][2]["decontam"]["sets"]
    assert {k: v["documents"] for k, v in sets.items()} == {
        "decontam_paths": 1, "mmlu": 1, "gsm8k": 1}  # fmt: skip
    assert sets["mmlu"]["examples"] == [f"{corpus[0]}:3: {_first13(ARM)!r}"]
    assert sets["gsm8k"]["examples"] == [f"{corpus[0]}:4: {_first13(MUFFINS)!r}"]
    assert (sets["mmlu"]["eval_texts"], sets["mmlu"]["too_short"]) == (3, 1)
    assert (sets["gsm8k"]["eval_texts"], sets["gsm8k"]["too_short"]) == (2, 1)
    md = (out / "report.md").read_text()
    assert "- mmlu: 1 document(s) matched (e.g. " in md and "- gsm8k: 1 document(s)" in md, md
    saved = json.loads((out / "report.json").read_text())["stages"][2]["decontam"]["sets"]
    assert saved == sets


def test_flag_mode_keeps_them_and_counts_them(bench, corpus, tmp_path):
    rep = _preprocess(corpus, tmp_path / "out", "--config.dedup.decontam_mode=flag",
                      f"--config.dedup.decontam_benchmarks=mmlu:{bench['mmlu']},"
                      f"gsm8k:{bench['gsm8k']}")  # fmt: skip
    dedup = rep["stages"][2]
    assert rep["removed"] == {} and rep["documents_out"] == len(CORPUS)
    assert dedup["flagged_contaminated"] == 2
    assert {k: v["documents"] for k, v in dedup["decontam"]["sets"].items()} == {
        "mmlu": 1, "gsm8k": 1}  # fmt: skip


@pytest.mark.parametrize("value, says", [
    ("mmlx:{mmlu}", "dedup.decontam_benchmarks: unknown benchmark 'mmlx'"),
    ("gsm8k:{empty}", "dedup.decontam_benchmarks: gsm8k: no 'test' split under {empty}"),
    ("mmlu:{root}/nowhere", "dedup.decontam_benchmarks: mmlu: {root}/nowhere: no such directory"),
    ("mmlu", "dedup.decontam_benchmarks: 'mmlu' is not PRESET:DIR"),
    ("mmlu:{mmlu},mmlu:{mmlu}", "dedup.decontam_benchmarks: 'mmlu' is named twice"),
])  # fmt: skip
def test_a_bad_benchmark_is_refused_before_anything_is_written(bench, corpus, tmp_path, value,
                                                                says):  # fmt: skip
    empty = tmp_path / "empty"
    (empty / "main").mkdir(parents=True)
    names = {**bench, "empty": str(empty)}
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        _preprocess(corpus, out, f"--config.dedup.decontam_benchmarks={value.format(**names)}")
    assert says.format(**names) in str(e.value)
    assert not out.exists()


def test_beam_stage_counts_per_benchmark_as_the_cli(bench, corpus, monkeypatch):
    """Beam's decontamination stage and report (no pipeline: its DoFn, stats merge and
    summary) count what the streaming Deduper counts; the benchmarks are read once."""
    beam_mod = pytest.importorskip("flaxlm.data.beam")
    cfg = preprocess.preprocess_config()
    cfg.dedup.decontam_benchmarks = f"mmlu:{bench['mmlu']},gsm8k:{bench['gsm8k']}"
    reads = []
    load = preprocess.load_eval_sets
    monkeypatch.setattr(preprocess, "load_eval_sets", lambda c: reads.append(1) or load(c))
    _, eval_texts, decontam = beam_mod.check_settings([corpus[0]], cfg)
    assert set(eval_texts) == {"mmlu", "gsm8k"} and len(reads) == 1
    fn = beam_mod._Decontaminate(cfg.dedup, eval_texts)
    fn.setup()
    stats, kept = {}, []
    for i, text in enumerate(CORPUS.values()):
        for x in fn.process(((0, i), f"c:{i + 1}", text)):
            if isinstance(x, tuple):
                kept.append(x[1])
            else:
                stats = beam_mod.merge_stats(stats, x.value)
    assert kept == [f"c:{i + 1}" for i, k in enumerate(CORPUS) if k not in {"mmlu", "gsm8k"}]
    sets = decontam.summary(stats["dedup"]["decontam_sets"])["sets"]
    assert {k: (v["documents"], v["examples"][0].split(":")[1]) for k, v in sets.items()} == {
        "mmlu": (1, "3"), "gsm8k": (1, "4")}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# python -m flaxlm.data.decontaminate


def _msgs(*turns):
    return [{"role": r, "content": c} for r, c in zip(["user", "assistant"] * 3, turns)]


def _check(bench, files, *more):
    against = f"mmlu:{bench['mmlu']},gsm8k:{bench['gsm8k']}"
    return D.main([*map(str, files), "--against", against, *map(str, more)])


def test_sft_chats_clean_records_written_byte_for_byte(bench, tmp_path):
    lines = [
        json.dumps({"messages": _msgs(ARM, "The humerus.")}) + "\n",  # mmlu
        # kept as written: spacing, non-ASCII, CRLF
        '{ "messages" : [{"role": "user", "content": "Ça va ?"}, '
        '{"role": "assistant", "content": "Très bien !"}] }\r\n',
        json.dumps({"prompt": MUFFINS, "completion": "Twelve muffins."}) + "\n",  # gsm8k
        json.dumps({"messages": _msgs(CORPUS["paraphrase"], "Yes.")}) + "\n",
        "\n",
        '{"messages": [\n',  # malformed: counted, not written
        # the answer's side quotes the question; reasoning is read too
        json.dumps({"messages": [{"role": "user", "content": "Quiz me."},
                                 {"role": "assistant", "content": "Sure.",
                                  "reasoning_content": f"Ask: {PLANET}"}]}) + "\n",
        json.dumps({"prompt": "Name a red fruit.", "completion": "An apple."}),  # no newline
    ]  # fmt: skip
    sft = tmp_path / "sft.jsonl"
    sft.write_bytes("".join(lines).encode())
    out, report = tmp_path / "clean.jsonl", tmp_path / "report.json"
    rep = _check(bench, [sft], "--out", out, "--report", report)
    assert out.read_bytes() == (lines[1] + lines[3] + lines[7] + "\n").encode()
    assert (rep["records"], rep["contaminated"], rep["clean"]) == (6, 3, 3)
    assert rep["bad_input"]["counts"] == {"malformed_json": 1}
    assert {k: v["records"] for k, v in rep["against"].items()} == {"mmlu": 2, "gsm8k": 1}
    assert rep["against"]["mmlu"]["examples"] == [
        f"{sft}:1: {_first13(ARM)!r}",
        f"{sft}:7: {_first13(PLANET)!r}",
    ]
    assert rep["against"]["gsm8k"]["examples"] == [f"{sft}:3: {_first13(MUFFINS)!r}"]
    assert json.loads(report.read_text()) == rep


def test_preference_and_rl_prompt_records(bench, tmp_path):
    """Preference pairs (text or conversations, with or without a prompt) and RL prompts
    ({"prompt", "meta"}) in one run, an eval file as a set of its own beside the benchmarks."""
    prefs = [
        {"prompt": MUFFINS, "chosen": "Twelve.", "rejected": "Ten."},  # gsm8k
        {"prompt": "Say hi.", "chosen": _msgs("Say hi.", "Hi!")[1:],
         "rejected": _msgs("Say hi.", "No.")[1:]},
        {"chosen": _msgs(PLANET, "Mercury."), "rejected": _msgs(PLANET, "Mars.")},  # mmlu
    ]  # fmt: skip
    rl = [
        {"prompt": _msgs(CORPUS["eval_file"]), "meta": {"answer": "noon"}},  # the eval file
        {"prompt": "What is 2 + 2?", "meta": {"answer": "4"}},
    ]
    _jsonl(str(tmp_path / "prefs.jsonl"), prefs)
    _jsonl(str(tmp_path / "rl.jsonl"), rl)
    ev = tmp_path / "eval.txt"  # plain text: an item a line
    ev.write_text("Unrelated line.\n" + " ".join(CORPUS["eval_file"].split()[:14]) + "\n")
    out = tmp_path / "clean.jsonl"
    rep = D.main(
        [
            str(tmp_path / "prefs.jsonl"),
            str(tmp_path / "rl.jsonl"),
            "--against",
            f"gsm8k:{bench['gsm8k']},{ev},mmlu:{bench['mmlu']}",
            "--out",
            str(out),
        ]
    )
    lines = [json.dumps(r) + "\n" for r in prefs + rl]
    assert out.read_text() == lines[1] + lines[4]
    assert {k: v["records"] for k, v in rep["against"].items()} == {
        "gsm8k": 1, str(ev): 1, "mmlu": 1}  # fmt: skip
    assert rep["against"][str(ev)]["examples"][0].startswith(f"{tmp_path}/rl.jsonl:1: 'the train")


def test_pretraining_files(bench, tmp_path):
    """Plain text a line per record (--out) and parquet's --field column (checked only)."""
    txt = tmp_path / "corpus.txt"  # (a BOM, a CRLF: the lines' bytes are what is written)
    txt.write_bytes(b"\xef\xbb\xbf" + "\n".join(CORPUS.values()).encode() + b"\r\n")
    out = tmp_path / "clean.txt"
    rep = _check(bench, [txt], "--txt_mode", "line", "--out", out)
    want = "\n".join(t for k, t in CORPUS.items() if k not in {"mmlu", "gsm8k"})
    assert out.read_bytes() == b"\xef\xbb\xbf" + want.encode() + b"\r\n"
    assert rep["contaminated"] == 2
    _parquet(str(tmp_path / "c.parquet"), [{"body": t} for t in CORPUS.values()])
    rep = _check(bench, [tmp_path / "c.parquet"], "--field", "body")
    assert {k: v["records"] for k, v in rep["against"].items()} == {"mmlu": 1, "gsm8k": 1}


@pytest.mark.parametrize("against, says", [
    ("mmlx:{mmlu}", "--against: 'mmlx:{mmlu}' is no file nor a benchmark PRESET:DIR"),
    ("gsm8k:{empty}", "--against: gsm8k: no 'test' split under {empty}"),
    ("mmlu:{mmlu},mmlu:{mmlu}", "--against: 'mmlu' is given twice"),
])  # fmt: skip
def test_cli_errors_name_the_option_and_directory(bench, tmp_path, against, says):
    empty = tmp_path / "empty"
    empty.mkdir()
    names = {**bench, "empty": str(empty)}
    _jsonl(str(tmp_path / "a.jsonl"), [{"text": "x"}])
    with pytest.raises(SystemExit) as e:
        D.main([str(tmp_path / "a.jsonl"), "--against", against.format(**names)])
    assert says.format(**names) in str(e.value)


def test_cli_refuses_what_it_cannot_write_or_read(bench, tmp_path):
    _parquet(str(tmp_path / "c.parquet"), [{"text": "x"}])
    out = tmp_path / "clean.jsonl"
    with pytest.raises(SystemExit, match=r"--out copies line records.*name --out \*\.parquet"):
        _check(bench, [tmp_path / "c.parquet"], "--out", out)
    # records whose text is under another name: an error naming the file, and no --out left
    _jsonl(str(tmp_path / "a.jsonl"), [{"text": "fine"}])
    _jsonl(str(tmp_path / "b.jsonl"), [{"body": ARM}, {"body": "x"}])
    with pytest.raises(SystemExit, match=r"b\.jsonl: none of its 2 record\(s\).*--field"):
        _check(bench, [tmp_path / "a.jsonl", tmp_path / "b.jsonl"], "--out", out)
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "b.jsonl", "c.parquet"]


def _arrow(path, table):
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=2)  # (several batches, as HF's files hold)


def test_parquet_and_arrow_rows_written_to_a_parquet(bench, tmp_path):
    """HF datasets' layouts: kept rows, every column and the schema's metadata (HF's
    features) as read, across batches and files, in input order."""
    texts = list(CORPUS.values())
    rows = [{"body": t, "id": i, "tags": ["a", str(i)]} for i, t in enumerate(texts)]
    meta = {b"huggingface": b'{"info": {"features": {}}}'}
    table = pa.Table.from_pylist(rows).replace_schema_metadata(meta)
    pq.write_table(table.slice(0, 3), tmp_path / "a.parquet", row_group_size=2)
    _arrow(tmp_path / "b.arrow", table.slice(3))
    out = tmp_path / "clean.parquet"
    rep = _check(bench, [tmp_path / "a.parquet", tmp_path / "b.arrow"], "--field", "body",
                 "--out", out)  # fmt: skip
    got = pq.read_table(out)
    keys = list(CORPUS)
    assert got.to_pylist() == [r for k, r in zip(keys, rows) if k not in {"mmlu", "gsm8k"}]
    assert got.schema.metadata == meta and got.schema.equals(table.schema)
    assert rep["contaminated"] == 2 and rep["clean"] == len(rows) - 2
    assert sorted(os.listdir(tmp_path)) == ["a.parquet", "b.arrow", "clean.parquet"]


def test_table_out_refuses_mixed_inputs_before_writing(bench, tmp_path):
    _parquet(str(tmp_path / "a.parquet"), [{"text": "one"}])
    _parquet(str(tmp_path / "b.parquet"), [{"text": "two", "id": 1}])
    _jsonl(str(tmp_path / "c.jsonl"), [{"text": "three"}])
    out = tmp_path / "clean.parquet"
    with pytest.raises(SystemExit, match=r"b\.parquet's columns or their types differ"):
        _check(bench, [tmp_path / "a.parquet", tmp_path / "b.parquet"], "--out", out)
    with pytest.raises(SystemExit, match=r"writes table records.*c\.jsonl is jsonl"):
        _check(bench, [tmp_path / "a.parquet", tmp_path / "c.jsonl"], "--out", out)
    # a file whose records hold no text: an error naming it, and no --out left
    _parquet(str(tmp_path / "d.parquet"), [{"text": "fine"}])
    pq.write_table(pa.table({"text": pa.array([None], pa.string())}), tmp_path / "e.parquet")
    with pytest.raises(SystemExit, match=r"e\.parquet: none of its 1 record"):
        _check(bench, [tmp_path / "d.parquet", tmp_path / "e.parquet"], "--out", out)
    assert not any(n.startswith("clean") for n in os.listdir(tmp_path))
