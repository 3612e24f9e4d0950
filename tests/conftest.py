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
