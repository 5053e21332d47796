"""flaxlm.train."""
