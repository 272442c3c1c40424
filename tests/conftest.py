import atexit
import os
import shutil
import tempfile

# 8 simulated CPU devices for mesh tests, compiled fast (helpers.FAST_COMPILE); set before JAX is imported anywhere
from helpers import xla_flags  # noqa: E402

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a persistent compilation cache per test process (and the softgrpo commands it starts), in a temporary folder,
# never the user's: tests that build the same programs again (resumed runs, seeds, a second process) read them back
# instead of compiling them. Set, not setdefault, as below.
_JAX_CACHE = tempfile.mkdtemp(prefix="softgrpo-test-jax-cache-")
os.environ["SOFTGRPO_COMPILATION_CACHE"] = _JAX_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the test models' programs compile fast
atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
# each test process (pytest-xdist worker) prepares its TFDS data sets in its own folder: no build races
# (set, not setdefault: xdist workers inherit the controller's environment)
os.environ["SOFTGRPO_DATA_DIR"] = tempfile.mkdtemp(prefix="softgrpo-test-data-")
atexit.register(shutil.rmtree, os.environ["SOFTGRPO_DATA_DIR"], ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", _JAX_CACHE)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def restore_tuning():
    """Tests may change softgrpo_jax.ops.tuning; each starts from, and leaves behind, the tuning it found."""
    from softgrpo_jax.ops.tuning import set_tuning, tuning

    before = tuning()
    yield
    set_tuning(before)
