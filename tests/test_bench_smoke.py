"""CPU smoke tests of the GPU benchmarks' drivers (bench/train_throughput.py, bench/decode.py):
every case kind the GPU suite runs — plans, XLA flag sets, generate options — goes through the
same subprocess driver and lands in the JSON and the markdown table. No figure is compared
with a threshold (timings belong to benchmarks, not tests); the records must be sane."""

import json

from flaxlm.bench import decode, train_throughput


def test_train_throughput_driver(tmp_path):
    cases = ["tiny:flax", "tiny:flax:cpu:no_triton_gemm"]
    argv = ["--out", str(tmp_path), "--cases", ",".join(cases), "--steps", "2", "--warmup", "1"]
    train_throughput.main(argv)
    lines = (tmp_path / "train_throughput.jsonl").read_text().splitlines()
    recs = {r["case"]: r for r in map(json.loads, lines)}
    assert set(recs) == set(cases)
    for r in recs.values():
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["mfu_causal"] < r["mfu"]
        assert r["tokens_per_s"] * r["step_time_s"] == r["batch"] * r["seq_len"]  # same clock
        assert r["plan"] == "cpu" and r["loss"] > 0
    md = (tmp_path / "train_throughput.md").read_text()
    assert all(f"| {c} |" in md for c in cases)


def test_decode_driver(tmp_path):
    cases = ["tiny:flax:b4", "tiny:flax:b4:unfused", "tiny:flax:b4:while8"]
    decode.main(["--tiny", "--out", str(tmp_path), "--cases", ",".join(cases), "--runs", "1"])
    recs = {r["case"]: r for r in json.loads((tmp_path / "decode.json").read_text())}
    assert set(recs) == set(cases)
    for r in recs.values():
        assert "error" not in r, r
        assert r["new_tokens"] == 32 and r["batch"] == 4
        assert r["tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert 0 < r["hbm_fraction"] < 1
    md = (tmp_path / "decode.md").read_text()
    assert all(f"| {c} |" in md for c in cases)
