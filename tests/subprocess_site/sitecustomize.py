"""Imported at start-up by every Python process the tests start (tests/conftest.py puts this
folder on PYTHONPATH): lets each process of a multi-process jax job keep its compiled programs in
the persistent compilation cache, not only process 0.

jax writes cache entries from process 0 alone (`jax._src.compiler._cache_write`: on a shared
filesystem, N processes writing would contend). On CPU the cache key of the same program
differs between the processes (measured: none of process 1's 61 keys in the two-process decode
was process 0's), so process 1 never found an entry and compiled every program from scratch
on every run, warm cache or not: in tests/models/test_decode_multiprocess.py process 1 spent
47 s of CPU to process 0's 12 s. Here the processes share one local disk and write distinct
keys, so each may write its own.

The patch goes in when jax's compiler module is first imported (an import hook, so nothing is
imported earlier than the process itself would), and only if jax still has the private names
it relies on; without them the processes only compile more.
"""

import importlib.abc
import importlib.util
import sys

_MODULE = "jax._src.compiler"


def _let_every_process_write(compiler) -> None:
    write = getattr(compiler, "_cache_write", None)
    distributed = getattr(compiler, "distributed", None)
    state = getattr(distributed, "global_state", None)
    if write is None or state is None or not hasattr(state, "process_id"):
        return

    def cache_write(*args, **kwargs):
        process_id = state.process_id
        state.process_id = 0  # read by the write's "only the first process" check
        try:
            return write(*args, **kwargs)
        finally:
            state.process_id = process_id

    compiler._cache_write = cache_write


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)  # once; and the lookup below finds the real module
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _let_every_process_write(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if _MODULE in sys.modules:
    _let_every_process_write(sys.modules[_MODULE])
else:
    sys.meta_path.insert(0, _PatchOnImport())
