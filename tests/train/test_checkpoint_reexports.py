"""train/checkpoint.py re-exports every function and class of the modules its docstring lists
(patching `checkpoint.read_meta` reaches the readers; notebooks import from one place)."""

import importlib
import inspect

from flaxlm.train import checkpoint

MODULES = ("checkpoint_compat", "checkpoint_inspect", "checkpoint_orbax", "checkpoint_read",
           "checkpointer")  # fmt: skip


def test_every_function_and_class_is_re_exported():
    missing = []
    for name in MODULES:
        module = importlib.import_module(f"flaxlm.train.{name}")
        for attr, value in vars(module).items():
            if (inspect.isfunction(value) or inspect.isclass(value)) and (
                value.__module__ == module.__name__
            ):
                if getattr(checkpoint, attr, None) is not value:
                    missing.append(f"{name}.{attr}")
    assert not missing, f"train/checkpoint.py does not re-export {missing}"
