"""Test configuration shared by every test module.

Eight host CPU devices are requested before jax is imported so that the sharded
code paths (vocab-parallel losses) can be tested on a machine without accelerators.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import hypothesis

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
