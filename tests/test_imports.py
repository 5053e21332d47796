"""Code imports its own modules only as `flaxlm.<folder>`, never bare (`import models`)."""

import ast
import glob
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = {"models", "train", "data", "alignment", "configs", "evaluation", "bench", "notebooks"}


def _python_files():
    for folder in sorted(FOLDERS | {"tests", "flaxlm"}):
        yield from glob.glob(os.path.join(REPO, folder, "**", "*.py"), recursive=True)


def test_no_bare_imports_of_project_folders():
    offenders = []
    for path in _python_files():
        tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                offenders.append(f"{path}:{node.lineno}: relative import")
            for name in names:
                if name.split(".")[0] in FOLDERS:
                    offenders.append(f"{path}:{node.lineno}: import {name}")
    assert not offenders, "\n".join(offenders)


def test_every_folder_imports_under_flaxlm():
    import importlib

    for folder in FOLDERS - {"notebooks"}:
        mod = importlib.import_module(f"flaxlm.{folder}")
        assert os.path.dirname(mod.__file__) == os.path.join(REPO, folder)
