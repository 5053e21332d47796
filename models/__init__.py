"""flaxlm.models."""
