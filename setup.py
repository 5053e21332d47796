"""flaxlm: the whole LLM recipe (data → pretrain → SFT → RM → RLHF/DPO/GRPO → eval) in JAX/Flax.

The code lives in top-level folders (models/, train/, data/, ...) that are mapped into the single
import namespace ``flaxlm.<folder>`` by ``package_dir``; nothing imports them bare.
"""

from setuptools import setup

# Top-level folders that become flaxlm.<folder>. `flaxlm/` itself holds only the package root and
# the small command-line entry points that belong to no folder (flaxlm.generate).
CODE_FOLDERS = ["models", "train", "data", "alignment", "configs", "evaluation", "bench"]

setup(
    name="flaxlm",
    version="0.1.0",
    description="End-to-end LLM research codebase in JAX/Flax: data, pretraining, alignment, eval.",
    python_requires=">=3.10",
    packages=["flaxlm"] + [f"flaxlm.{f}" for f in CODE_FOLDERS],
    package_dir={"flaxlm": "flaxlm", **{f"flaxlm.{f}": f for f in CODE_FOLDERS}},
    package_data={"flaxlm.data": ["resources/*"]},
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "sentencepiece>=0.2",
        "ml_collections>=1.0",
        "absl-py",
        "numpy",
        "scipy",
        "datasketch>=1.6",
        "tensorboardX",
        "matplotlib",
        "tqdm",
        "safetensors",
        "tokenizers>=0.15.1",  # (Tokenizer.encode_special_tokens: HFTokenizer.text_only)
        "jinja2",  # HF checkpoints' chat templates (models/hf_tokenizer.py)
        "pyarrow",
        "brotli>=1.2",  # WARC responses sent with Content-Encoding: br (data/source_warc.py)
        "threadpoolctl",
        "array-record>=0.5",  # ArrayRecord shards (data/preprocess.py, data/sources.py)
        # Distributed preprocess (data/beam.py); installs beside jax/numpy 2 (pulls protobuf 6).
        "apache-beam>=2.60",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist", "ruff", "nbclient", "nbformat", "ipykernel"],
    },
)
