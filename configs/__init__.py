"""flaxlm.configs."""
