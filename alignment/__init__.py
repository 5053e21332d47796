"""flaxlm.alignment."""
