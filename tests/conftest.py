"""Test configuration shared by every test module.

Eight host CPU devices are requested before jax is imported so that the sharded
code paths (vocab-parallel losses) can be tested on a machine without accelerators.
"""

from __future__ import annotations

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

# One XLA compilation cache per test run, shared by the pytest-xdist workers (and the
# example subprocesses), which inherit these variables from the run that starts them.
# Compiling is most of the suite's time, and many tests compile a program another test
# has already compiled: the same op at the same shapes, traced again after
# ``jax.clear_caches()`` or under a fresh ``jax.jit``. The cache only skips a compile
# of an identical program (the key covers the HLO, the flags, jaxlib and the devices).
# It starts empty on every run, so a run still compiles everything once, as CI does
# on a clean clone. A cache directory set by the caller is used and left in place.
_OWN_XLA_CACHE = None
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_XLA_CACHE = tempfile.mkdtemp(prefix="jaxactv-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_XLA_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, print_blob=True
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(params=[True, False], ids=["keep x", "keep y"])
def log_softmax_keeps_x(request, monkeypatch):
  """Force log_softmax's residual form (``_backend.reuse_forward_exponentials``).

  True: keep ``x`` and rebuild the forward in the backward (CPU); False: keep the
  output ``y`` and take ``exp(y)`` (accelerators). The public op is jitted, so the
  caches are cleared for it to trace again under the patch and after it.
  """
  from jaxactv import _softmax

  monkeypatch.setattr(_softmax, "reuse_forward_exponentials", lambda dtype: request.param)
  jax.clear_caches()
  yield request.param
  jax.clear_caches()


def pytest_unconfigure(config):
  """Remove this run's compilation cache (only the run that made it does)."""
  if _OWN_XLA_CACHE is not None:
    shutil.rmtree(_OWN_XLA_CACHE, ignore_errors=True)
