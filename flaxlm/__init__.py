"""flaxlm: one JAX/Flax codebase from raw text to an aligned, evaluated language model.

Subpackages (each a top-level folder of the repository): ``flaxlm.models``, ``flaxlm.train``,
``flaxlm.data``, ``flaxlm.alignment``, ``flaxlm.configs``, ``flaxlm.evaluation``, ``flaxlm.bench``.
"""

import os as _os

__version__ = "0.1.0"

# In a source checkout the subpackages are this folder's siblings (setup.py's package_dir).
# The editable install maps them to the checkout it was installed from; a second checkout
# imported first (its root on sys.path, a notebook started there) got its own `flaxlm` with
# the installed checkout's subpackages, silently mixing two versions of the code. Searching
# the root beside this file first keeps every subpackage from the checkout this file is in.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "setup.py")) and _os.path.isfile(
    _os.path.join(_root, "models", "__init__.py")
):
    __path__.append(_root)
