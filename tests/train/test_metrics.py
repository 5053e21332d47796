"""metrics.jsonl reading: a run killed mid-write still reads (notebooks, sweep tables)."""

import json

from flaxlm.train.metrics import read_metrics


def test_read_metrics_skips_a_line_cut_short_by_a_kill(tmp_path):
    recs = [{"step": 10, "loss": 3.0}, {"step": 10, "eval/nll": 2.9}]
    text = "".join(json.dumps(r) + "\n" for r in recs) + '{"step": 20, "lo'  # SIGKILL mid-write
    (tmp_path / "metrics.jsonl").write_text(text)
    assert read_metrics(str(tmp_path)) == recs
    assert read_metrics(str(tmp_path / "metrics.jsonl")) == recs


def test_peak_table_tells_pcie_and_nvl_cards_from_sxm(monkeypatch):
    """MFU's peak per device kind: the PCIe and NVL cards' device_kind contains "H100"/"H200"
    too, and used to get the SXM module's 989 TFLOP/s (datasheet dense bf16: 756 and 835)."""
    import jax

    from flaxlm.train import metrics

    class Device:
        def __init__(self, kind):
            self.device_kind = kind

    for kind, tflops in (("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
                         ("NVIDIA H200 NVL", 835), ("NVIDIA H100 80GB HBM3", 989),
                         ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312)):  # fmt: skip
        monkeypatch.setattr(jax, "devices", lambda kind=kind: [Device(kind)])
        assert metrics.peak_flops_per_device() == tflops * 1e12, kind
        assert metrics.peak_flops_for_kind(kind) == tflops * 1e12, kind
    assert metrics.peak_flops_for_kind("cpu") is None


def test_tokens_in_batch_counts_every_row_the_model_reads():
    """Throughput's token count (tokens_per_s, MFU): every row of tokens a step runs through the
    model, B·T each, whatever the task prefixes them with — a preference batch's chosen and
    rejected rows, KTO's matched and mismatched (kl_) ones — and nothing else (targets, masks,
    per-row scalars)."""
    import numpy as np

    from flaxlm.data.chat_batches import empty_rows
    from flaxlm.train.metrics import tokens_in_batch

    B, T = 3, 8
    sft = empty_rows(B, T, 0)
    assert tokens_in_batch(sft) == B * T
    pairs = {**empty_rows(B, T, 0, "chosen_"), **empty_rows(B, T, 0, "rejected_"),
             "margin": np.zeros(B), "valid": np.ones(B)}  # fmt: skip
    assert tokens_in_batch(pairs) == 2 * B * T
    kto = {**empty_rows(B, T, 0), **empty_rows(B, T, 0, "kl_"), "label": np.ones(B),
           "valid": np.ones(B), "kl_valid": np.ones(B)}  # fmt: skip
    assert tokens_in_batch(kto) == 2 * B * T
