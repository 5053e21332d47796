"""flaxlm.evaluation."""
