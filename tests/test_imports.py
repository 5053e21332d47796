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


def test_a_second_checkout_imports_its_own_subpackages(tmp_path):
    """With the root of another checkout first on sys.path (a notebook started there), its
    `flaxlm/__init__.py` was imported but every subpackage came from the checkout the editable
    install maps to: two versions of the code mixed, silently."""
    import shutil
    import subprocess
    import sys

    other = tmp_path / "other"
    (other / "flaxlm").mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "flaxlm", "__init__.py"), other / "flaxlm")
    shutil.copy(os.path.join(REPO, "setup.py"), other)
    for folder in ("models", "train"):
        (other / folder).mkdir()
        (other / folder / "__init__.py").write_text(f'WHERE = "other {folder}"\n')
    code = "import flaxlm.models, flaxlm.train; print(flaxlm.models.WHERE, flaxlm.train.WHERE)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=other, env=env, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert out.split() == ["other", "models", "other", "train"]


def test_importing_the_checkpoints_logs_no_warning():
    """orbax warned "Type handler registry type ... overriding jax.Array" for the handler flaxlm
    registers on purpose: a WARNING line at the top of every CLI's output and notebook."""
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", "import flaxlm.train.checkpoint"], env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert "overriding" not in out.stderr + out.stdout, out.stderr
