"""Test setup: 8 simulated CPU devices, set before JAX initialises its backends.

A persistent compilation cache (in the temp dir) lets the many tests that compile the same
tiny programs — and the subprocesses they start, which inherit the environment — skip XLA
compilation after the first time: the suite runs about twice as fast on 2 cores.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "flaxlm-test-jax-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def chat_tokenizer(tmp_path_factory):
    """(path, Tokenizer): a small SentencePiece model with flaxlm's chat tokens (vocab 400),
    trained once per session on a few generated sentences."""
    import random

    from flaxlm.data import tokenizer

    rng = random.Random(0)
    words = "where does Kavo live in Brel the city of 42 yes no a number say or".split()
    texts = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(1000)]
    path = str(tmp_path_factory.mktemp("chat_tokenizer") / "tokenizer.model")
    return path, tokenizer.train(texts, 400, model_path=path)
