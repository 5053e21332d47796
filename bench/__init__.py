"""flaxlm.bench."""
