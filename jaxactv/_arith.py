"""Elementwise helpers: ``0 * inf = 0``, selects and sums that shape fusion, broadcast cotangents.

A loss often needs ``t * d`` where ``t`` may be 0 exactly where ``d`` is infinite
(``0 * log 0``: a label of 0 at a logit of ``-inf``) and wants 0 there, not NaN.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxactv._backend import long_row_piece, row_sum_as_matvec
from jaxactv._sharding import explicit_spec, same_layout_as
from jaxactv._vocab_parallel import cotangent_like


def times_allowing_inf(t: ArrayLike, d: jax.Array) -> jax.Array:
  """``t * d`` with ``0 * inf = inf * 0 = 0``; NaN in either operand stays NaN.

  The infinity is replaced before the product, never selected away after it, so no
  NaN is ever computed (``checkify``'s NaN checks look at every product).
  """
  return jnp.where((d == 0) & jnp.isinf(t), 0.0, t) * jnp.where((t == 0) & jnp.isinf(d), 0.0, d)


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


def row_sum(a: jax.Array, axes: tuple[int, ...], logits_dtype) -> jax.Array:
  """``sum(a, axes, keepdims=True)``; on CPU a product with ones, where nothing fuses.

  For a row sum whose consumer holds a select (``_backend.row_sum_as_matvec``), in a
  rule for logits of ``logits_dtype``. Only for trailing ``axes``, the layout of a
  logits array; other axes take ``jnp.sum``.
  """
  trailing = axes == tuple(range(a.ndim - len(axes), a.ndim))
  if not (row_sum_as_matvec(logits_dtype) and trailing and axes):
    return reduce_rows(jnp.sum, a, axes, keepdims=True)
  ones = jnp.ones(a.shape[a.ndim - len(axes):], a.dtype)
  dims = ((axes, tuple(range(len(axes)))), ((), ()))
  total = lax.dot_general(a, ones, dims, precision=lax.Precision.HIGHEST)
  return jnp.expand_dims(total, axes)


def reduce_rows(reduce, a: jax.Array, axes: tuple[int, ...], keepdims: bool = False):
  """``reduce(a, axes)`` (``jnp.sum``, ``jnp.max`` or :func:`max_at_least`), with on CPU
  long rows reduced a piece at a time (``_backend.long_row_piece``).

  Only a reduction over trailing axes that are not typed as split over devices takes
  the pieces: the rows become ``[..., n / piece, piece]``, the pieces are reduced, and
  then their results, behind an optimisation barrier (XLA merges two reductions in a
  row back into one). A max is the same; a sum differs in its order of additions
  only (two levels, no less accurate).
  """
  n = math.prod(a.shape[d] for d in axes)
  trailing = bool(axes) and axes == tuple(range(a.ndim - len(axes), a.ndim))
  piece = long_row_piece(n) if trailing else None
  spec = explicit_spec(a)
  if piece is None or (spec is not None and any(spec[d] is not None for d in axes)):
    out = reduce(a, axes)
  else:
    lead = a.shape[: a.ndim - len(axes)]
    parts = reduce(a.reshape(*lead, n // piece, piece), (len(lead) + 1,))
    out = reduce(lax.optimization_barrier(parts), (len(lead),))
  return jnp.expand_dims(out, axes) if keepdims else out


def max_at_least(floor: float):
  """A reducer for :func:`reduce_rows`: the max over ``axes`` and ``floor``.

  ``floor`` is the reduction's initial value, not a ``maximum`` with each element or
  with the result: XLA:CPU runs it as a plain max (an elementwise op inside slows it
  about 3x), and nothing per row sits between it and an op that broadcasts it back
  over the row. For a shift taken under ``stop_gradient``: its derivative is not one
  that any rule here uses. XLA may drop a non-identity start on a reduction over one
  element (``jnp.max`` of that element, ``-inf`` on an empty row), so callers reduce
  more than one: the soft-label loss's rows of more than 1024, pieces of at least 2.
  """

  def reduce(a, axes):
    return lax.reduce(a, np.asarray(floor, a.dtype), lax.max, axes)

  return reduce


def sum_to_operand(a: jax.Array, operand) -> jax.Array:
  """Sum a cotangent of a broadcast operand back down to the operand: its shape and,
  on a mesh, its type.

  Under ``jax.shard_map`` (``check_vma=True``) an operand replicated over the token
  shards (a per-class weight, ``alpha``) gets the sum over every shard; on an
  ``Explicit`` mesh the cotangent takes the operand's own layout.
  """
  shape = jnp.shape(operand)
  lead = a.ndim - len(shape)
  a = jnp.sum(a, tuple(range(lead))) if lead else a
  axes = tuple(i for i, n in enumerate(shape) if n == 1 and a.shape[i] != 1)
  a = jnp.sum(a, axes, keepdims=True) if axes else a
  if not isinstance(operand, jax.Array):
    return a
  return same_layout_as(cotangent_like(a, operand), operand)
