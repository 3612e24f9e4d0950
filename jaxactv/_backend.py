"""The one place jaxactv looks at the backend: a speed trade-off, never a numeric one.

A softmax backward needs ``exp(x - max)`` again. Written as the forward's very
expression, XLA keeps the forward's exponentials alive and reuses them (a
logits-sized float32 buffer); written differently (``exp(x - lse)``) it recomputes
them inside the gradient's single loop. Accelerators are bound by memory, so the
recomputation is free and saves a buffer plus two passes over it (for bfloat16
logits, more than half the traffic). XLA:CPU is bound by the exponential itself
at cache-sized logits and runs the recomputing form up to 1.5x slower than
optax. Half-precision logits tip the balance back even on CPU: the kept buffer
is float32, twice their size, and the recomputing form ran 0.4-0.85x optax where
the reusing one ran 1.0-1.2x. Both forms give the same numbers to rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reuse_forward_exponentials(logits_dtype) -> bool:
  """True for float32/64 logits on CPU (reuse the forward's ``exp``), else False (recompute)."""
  return jax.default_backend() == "cpu" and jnp.dtype(logits_dtype).itemsize >= 4


def keep_sigmoid_of_minus_abs(input_dtype) -> bool:
  """True for half-precision inputs on CPU: the sigmoid rule keeps ``sigmoid(-|x|)``.

  The sigmoid's exact gradient needs ``s = sigmoid(-|x|)``, an exponential. Kept from
  the forward pass (a float32 array), the backward is two multiplies: bfloat16
  forward + backward then ran in about half of ``jax.nn``'s time on XLA:CPU, where
  recomputing the exponential ran at 0.95-1.0x. For float32 inputs XLA:CPU writes the
  kept ``s`` out and reads it back twice (it does not feed one producer to two loops),
  which ran slower than the second exponential. Accelerators are bound by memory:
  recomputing is free there, and the rule keeps only ``x``.
  """
  return jax.default_backend() == "cpu" and jnp.dtype(input_dtype).itemsize < 4
