"""flaxlm.data."""
