"""The precision policy: in which dtype jaxactv computes, and in which it answers.

* Half-precision inputs (bfloat16, float16) are computed in float32 and the
  activations return the caller's dtype; losses always return float32 (or
  float64 for float64 inputs).
* float32 and float64 inputs are computed in their own precision.

The choice is made from the dtypes' widths alone, never with ``jnp.promote_types``:
that consults the dtype-promotion mode and raises under
``jax.numpy_dtype_promotion("strict")`` for bfloat16 and float16. Every cast jaxactv
makes is explicit, so its ops run in strict mode too.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def compute_dtype(*dtypes) -> np.dtype:
  """The dtype jaxactv computes in for inputs of ``dtypes``: the widest, at least float32.

  float64 appears only when an input is float64 (so only with x64 enabled).
  """
  if any(jnp.dtype(d) == jnp.float64 for d in dtypes):
    return jnp.dtype(jnp.float64)
  return jnp.dtype(jnp.float32)


def loss_dtype(*dtypes) -> np.dtype:
  """The dtype a loss is returned in for logits (and targets) of ``dtypes``."""
  return compute_dtype(*dtypes)
