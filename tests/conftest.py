import atexit
import os
import shutil
import tempfile

# 8 simulated CPU devices for mesh tests; must be set before JAX is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# no persistent compilation cache in the user's cache folder from tests (test_cli covers the cache in a temp folder)
os.environ.setdefault("SOFTGRPO_COMPILATION_CACHE", "off")
# each test process (pytest-xdist worker) prepares its TFDS data sets in its own folder: no build races
# (set, not setdefault: xdist workers inherit the controller's environment)
os.environ["SOFTGRPO_DATA_DIR"] = tempfile.mkdtemp(prefix="softgrpo-test-data-")
atexit.register(shutil.rmtree, os.environ["SOFTGRPO_DATA_DIR"], ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def restore_tuning():
    """Tests may change softgrpo_jax.ops.tuning; each starts from, and leaves behind, the tuning it found."""
    from softgrpo_jax.ops.tuning import set_tuning, tuning

    before = tuning()
    yield
    set_tuning(before)
