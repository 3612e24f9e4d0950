"""Plain twins of jaxactv's ops, differentiated by ordinary JAX autodiff.

Every function here has the same signature and, on finite inputs, the same values
as its namesake in :mod:`jaxactv`, but is written as the textbook formula with no
custom gradient rule. Two uses:

* Forward-mode autodiff. ``jax.custom_vjp`` rules cannot be pushed forward, so
  ``jax.jvp``, ``jax.jacfwd`` and ``jax.hessian`` of a jaxactv op raise. Call the
  twin instead: ``jax.hessian(lambda x: jaxactv.reference.logsumexp(x).sum())``.
* Testing. jaxactv's tests compare every fast path with its twin, values and
  gradients.

The twins are numerically stable for finite inputs (they shift by the maximum and
use ``exp(-|x|)``), but they do not promise the fast ops' edge-case policy: at
``+inf`` logits, rows with nothing to normalise, and bfloat16 accumulation they
behave like ``jax.nn``. They also cost what autodiff costs: more memory and time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxactv._validation import Axis, canonical_axes

__all__ = ["log_sigmoid", "log_softmax", "logsumexp", "sigmoid", "softmax"]


def _float(x: ArrayLike) -> jax.Array:
  x = jnp.asarray(x)
  return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))


def sigmoid(x: ArrayLike) -> jax.Array:
  """``1 / (1 + exp(-x))``, written so that neither branch overflows."""
  x = _float(x)
  e = jnp.exp(-jnp.abs(x))
  return jnp.where(x >= 0, 1 / (1 + e), e / (1 + e))


def log_sigmoid(x: ArrayLike) -> jax.Array:
  """``log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|))``."""
  x = _float(x)
  return jnp.minimum(x, 0) - jnp.log1p(jnp.exp(-jnp.abs(x)))


def _shifted(x: jax.Array, axes: tuple[int, ...], where) -> jax.Array:
  if where is not None:
    x = jnp.where(where, x, -jnp.inf)
  m = lax.stop_gradient(jnp.max(x, axes, keepdims=True, initial=-jnp.inf))
  return x - jnp.where(jnp.isfinite(m), m, 0)


def softmax(x: ArrayLike, axis: Axis = -1, where: ArrayLike | None = None) -> jax.Array:
  """``exp(x - max) / sum(exp(x - max))`` over ``axis``; masked entries get 0."""
  x = _float(x)
  axes = canonical_axes(axis, x.ndim)
  e = jnp.exp(_shifted(x, axes, where))
  return e / jnp.sum(e, axes, keepdims=True)


def log_softmax(x: ArrayLike, axis: Axis = -1, where: ArrayLike | None = None) -> jax.Array:
  """``(x - max) - log(sum(exp(x - max)))`` over ``axis``; masked entries get ``-inf``."""
  x = _float(x)
  axes = canonical_axes(axis, x.ndim)
  z = _shifted(x, axes, where)
  return z - jnp.log(jnp.sum(jnp.exp(z), axes, keepdims=True))


def logsumexp(
    x: ArrayLike, axis: Axis = -1, where: ArrayLike | None = None, keepdims: bool = False
) -> jax.Array:
  """``max + log(sum(exp(x - max)))`` over ``axis``; masked entries are left out."""
  x = _float(x)
  axes = canonical_axes(axis, x.ndim)
  masked = x if where is None else jnp.where(where, x, -jnp.inf)
  m = lax.stop_gradient(jnp.max(masked, axes, keepdims=True, initial=-jnp.inf))
  m = jnp.where(jnp.isfinite(m), m, 0)
  out = m + jnp.log(jnp.sum(jnp.exp(masked - m), axes, keepdims=True))
  return out if keepdims else jnp.squeeze(out, axes)
