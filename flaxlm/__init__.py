"""flaxlm: one JAX/Flax codebase from raw text to an aligned, evaluated language model.

Subpackages (each a top-level folder of the repository): ``flaxlm.models``, ``flaxlm.train``,
``flaxlm.data``, ``flaxlm.alignment``, ``flaxlm.configs``, ``flaxlm.evaluation``, ``flaxlm.bench``.
"""

__version__ = "0.1.0"
