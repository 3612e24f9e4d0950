"""The logistic sigmoid and its logarithm, with gradients that stay exact in the tails.

``jax.nn.sigmoid`` differentiates as ``s * (1 - s)``: once ``s`` rounds to 1 (from
``x`` ~ 17 in float32) the gradient is 0 or off by tens of percent although the true
value ``e^-|x|`` is far above float32's smallest number. Both rules here keep the
input ``x`` as their only residual and rebuild the gradient from ``e = exp(-|x|)``,
which never overflows and keeps full relative precision down to ``|x|`` ~ 87.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxactv import _dtypes
from jaxactv._validation import as_activation_input


def _exp_neg_abs(x: jax.Array) -> jax.Array:
  # exp(-|x|) lies in [0, 1]: no overflow on either side, full precision in the tails.
  return jnp.exp(-jnp.abs(x))


def stable_sigmoid(x: jax.Array) -> jax.Array:
  """sigmoid(x) for an array already in the compute dtype, accurate to a few ulp everywhere."""
  e = _exp_neg_abs(x)
  # For x < 0, e / (1 + e) keeps the relative precision that 1 - 1 / (1 + e) would lose.
  return jnp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def stable_log_sigmoid(x: jax.Array) -> jax.Array:
  """log(sigmoid(x)) = -log(1 + e^-x), exact at +-inf and for large |x|.

  ``jnp.logaddexp`` computes ``max + log1p(exp(-|diff|))`` and, unlike the same
  formula spelled out, differentiates correctly at ``x = 0``.
  """
  return -jnp.logaddexp(0.0, -x)


def sigmoid_derivative(x: jax.Array) -> jax.Array:
  """sigmoid'(x) = sigmoid(x) * sigmoid(-x) = e / (1 + e)^2 with e = exp(-|x|)."""
  e = _exp_neg_abs(x)
  return e / jnp.square(1.0 + e)


# ----------------------------------------------------------------------------- sigmoid


@jax.custom_vjp
def _sigmoid(x: jax.Array) -> jax.Array:
  return stable_sigmoid(x.astype(_dtypes.compute_dtype(x.dtype))).astype(x.dtype)


def _sigmoid_fwd(x):
  return _sigmoid(x), (x,)


def _sigmoid_bwd(res, g):
  (x,) = res
  ct = _dtypes.compute_dtype(x.dtype)
  dx = g.astype(ct) * sigmoid_derivative(x.astype(ct))
  return (dx.astype(x.dtype),)


_sigmoid.defvjp(_sigmoid_fwd, _sigmoid_bwd)


@jax.jit
def sigmoid(x: ArrayLike) -> jax.Array:
  r"""Logistic sigmoid, elementwise, with a gradient that is accurate in the tails.

  .. math::
    \sigma(x) = \frac{1}{1 + e^{-x}}, \qquad
    \sigma'(x) = \sigma(x)\,\sigma(-x) = \frac{e^{-|x|}}{(1 + e^{-|x|})^2}

  The value is computed as ``1 / (1 + e)`` for ``x >= 0`` and ``e / (1 + e)`` for
  ``x < 0`` with ``e = exp(-|x|)``, so both tails keep full relative precision. The
  gradient uses the right-hand form above: ``jax.grad(jax.nn.sigmoid)(17.0)`` is 0 in
  float32, ``jax.grad(jaxactv.sigmoid)(17.0)`` is 4.14e-8, the true value.

  Edge cases: ``sigmoid(+inf) = 1`` and ``sigmoid(-inf) = 0``, both with gradient 0;
  NaN stays NaN. bfloat16/float16 inputs are computed in float32 and returned in the
  input dtype; integer inputs are promoted to the default float dtype.

  The rule keeps one residual, the input ``x`` itself. It is a ``jax.custom_vjp``, so
  forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) is not
  available; use :func:`jaxactv.reference.sigmoid` for that.

  Args:
    x: input array of any shape.

  Returns:
    An array of ``x``'s shape and dtype.
  """
  return _sigmoid(as_activation_input(x))


# ------------------------------------------------------------------------- log_sigmoid


@jax.custom_vjp
def _log_sigmoid(x: jax.Array) -> jax.Array:
  return stable_log_sigmoid(x.astype(_dtypes.compute_dtype(x.dtype))).astype(x.dtype)


def _log_sigmoid_fwd(x):
  return _log_sigmoid(x), (x,)


def _log_sigmoid_bwd(res, g):
  (x,) = res
  ct = _dtypes.compute_dtype(x.dtype)
  # d/dx log(sigmoid(x)) = sigmoid(-x), computed without the cancellation of 1 - sigmoid(x).
  dx = g.astype(ct) * stable_sigmoid(-x.astype(ct))
  return (dx.astype(x.dtype),)


_log_sigmoid.defvjp(_log_sigmoid_fwd, _log_sigmoid_bwd)


@jax.jit
def log_sigmoid(x: ArrayLike) -> jax.Array:
  r"""Logarithm of the logistic sigmoid, elementwise.

  .. math::
    \log \sigma(x) = \min(x, 0) - \log(1 + e^{-|x|}), \qquad
    \frac{d}{dx} \log \sigma(x) = \sigma(-x)

  Exact at large ``|x|``: ``log_sigmoid(1000) = 0`` (to within ``e^{-1000}``) and
  ``log_sigmoid(-1000) = -1000``, with gradients 0 and 1. ``log_sigmoid(+inf) = 0``
  and ``log_sigmoid(-inf) = -inf``, gradients 0 and 1; NaN stays NaN.
  bfloat16/float16 inputs are computed in float32 and returned in the input dtype.

  The rule keeps one residual, the input ``x``. Forward-mode autodiff is not
  available on this ``jax.custom_vjp``; use :func:`jaxactv.reference.log_sigmoid`.

  Args:
    x: input array of any shape.

  Returns:
    An array of ``x``'s shape and dtype.
  """
  return _log_sigmoid(as_activation_input(x))
