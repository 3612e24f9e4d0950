"""Elementwise helpers for losses: ``0 * inf = 0``, and one select that shapes fusion.

A loss often needs ``t * d`` where ``t`` may be 0 exactly where ``d`` is infinite
(``0 * log 0``: a label of 0 at a logit of ``-inf``) and wants 0 there, not NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def times_allowing_inf(t: ArrayLike, d: jax.Array) -> jax.Array:
  """``t * d`` with ``0 * inf = 0``; NaN in either operand stays NaN."""
  return jnp.where(t == 0, jnp.zeros_like(d * t), t * d)


def as_one_buffer(losses: jax.Array) -> jax.Array:
  """``losses`` unchanged (NaN stays NaN), behind a select XLA:CPU cannot fuse into a sum.

  Without it XLA:CPU pulls the cheap pieces of an elementwise loss into its
  reduction kernel and writes each of the other pieces out as a buffer of its
  own; with it the loss is computed in one loop and summed from one buffer. Use it
  inside a custom_vjp forward only, where autodiff never sees the select (its
  transpose would need the loss values in the backward pass). Other backends fuse
  the select away.
  """
  return jnp.where(losses == losses, losses, jnp.nan)
