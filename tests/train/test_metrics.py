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
