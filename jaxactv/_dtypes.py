"""The precision policy: in which dtype jaxactv computes, and in which it answers.

* Half-precision inputs (bfloat16, float16) are computed in float32 and the
  activations return the caller's dtype; losses always return float32 (or
  float64 for float64 inputs).
* float32 and float64 inputs are computed in their own precision.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def compute_dtype(dtype: np.dtype) -> np.dtype:
  """The dtype jaxactv computes in for inputs of ``dtype`` (at least float32)."""
  return jnp.promote_types(dtype, jnp.float32)


def loss_dtype(dtype: np.dtype) -> np.dtype:
  """The dtype a loss is returned in for logits of ``dtype``."""
  return compute_dtype(dtype)
