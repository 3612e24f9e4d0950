"""The logistic sigmoid and its logarithm, with gradients that stay exact in the tails.

``jax.nn.sigmoid`` differentiates as ``s * (1 - s)``: once ``s`` rounds to 1 (from
``x`` ~ 17 in float32) the gradient is 0 or off by tens of percent although the true
value ``e^-|x|`` is far above float32's smallest number. Both rules here keep the
input ``x`` as their only residual (but for the sigmoid of half-precision inputs on
CPU, which keeps ``s`` itself: ``_backend``) and rebuild the gradient from
``s = sigmoid(-|x|)``, which lies in ``(0, 1/2]``: it keeps full relative precision
down to ``|x|`` ~ 87 and ``1 - s`` never cancels.

The ``_fwd`` rules compute their output with plain code rather than by calling the
custom_vjp, so forward-over-reverse (``jax.hessian``) differentiates through them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxactv import _dtypes
from jaxactv._backend import keep_sigmoid_of_minus_abs
from jaxactv._validation import as_activation_input


def _sigmoid_of_minus_abs(x: jax.Array) -> jax.Array:
  # sigmoid(-|x|) lies in (0, 1/2]: full relative precision however small it is, and
  # 1 - it never cancels. One exp and one division, shared by value and gradient.
  return lax.logistic(-jnp.abs(x))


def stable_sigmoid(x: jax.Array) -> jax.Array:
  """sigmoid(x) for an array already in the compute dtype, accurate to a few ulp everywhere."""
  s = _sigmoid_of_minus_abs(x)
  return jnp.where(x >= 0, 1.0 - s, s)


def stable_log_sigmoid(x: jax.Array) -> jax.Array:
  """log(sigmoid(x)) = -log(1 + e^-x), exact at +-inf and for large |x|.

  ``jnp.logaddexp`` computes ``max + log1p(exp(-|diff|))`` and, unlike the same
  formula spelled out, differentiates correctly at ``x = 0``.
  """
  return -jnp.logaddexp(0.0, -x)


def sigmoid_derivative(x: jax.Array) -> jax.Array:
  """sigmoid'(x) = sigmoid(x) sigmoid(-x) = s (1 - s) with s = sigmoid(-|x|): exact in the tails."""
  # min(x, -x) is -|x| spelled differently from the forward's, so that XLA recomputes
  # s inside the gradient's loop rather than writing the forward's s out for it.
  s = lax.logistic(jnp.minimum(x, -x))
  return s * (1.0 - s)


# ----------------------------------------------------------------------------- sigmoid


def _sigmoid_value(x: jax.Array) -> jax.Array:
  return stable_sigmoid(x.astype(_dtypes.compute_dtype(x.dtype))).astype(x.dtype)


@jax.custom_vjp
def _sigmoid(x: jax.Array) -> jax.Array:
  return _sigmoid_value(x)


def _sigmoid_fwd(x):
  # Plain code, not _sigmoid itself: an outer jvp (jax.hessian) must see through it.
  if not keep_sigmoid_of_minus_abs(x.dtype):
    return _sigmoid_value(x), (x,)
  # Half precision on CPU: keep s = sigmoid(-|x|), in float32, so that the backward
  # needs no second exponential (see _backend).
  xc = x.astype(_dtypes.compute_dtype(x.dtype))
  s = _sigmoid_of_minus_abs(xc)
  return jnp.where(xc >= 0, 1.0 - s, s).astype(x.dtype), (s,)


def _sigmoid_bwd(res, g):
  (r,) = res
  ct = _dtypes.compute_dtype(g.dtype)
  if keep_sigmoid_of_minus_abs(g.dtype):  # g has x's dtype; r is s = sigmoid(-|x|)
    dx = g.astype(ct) * (r * (1.0 - r))
  else:  # r is x
    dx = g.astype(ct) * sigmoid_derivative(r.astype(ct))
  return (dx.astype(g.dtype),)


_sigmoid.defvjp(_sigmoid_fwd, _sigmoid_bwd)


@jax.jit
def sigmoid(x: ArrayLike) -> jax.Array:
  r"""Logistic sigmoid, elementwise, with a gradient that is accurate in the tails.

  .. math::
    \sigma(x) = \frac{1}{1 + e^{-x}}, \qquad
    \sigma'(x) = \sigma(x)\,\sigma(-x) = s (1 - s), \quad s = \sigma(-|x|)

  The value is ``s`` for ``x < 0`` and ``1 - s`` for ``x >= 0``; ``s`` lies in
  ``(0, 1/2]``, so both tails keep full relative precision and the gradient's
  ``1 - s`` never cancels: ``jax.grad(jax.nn.sigmoid)(17.0)`` is 0 in float32,
  ``jax.grad(jaxactv.sigmoid)(17.0)`` is 4.14e-8, the true value.

  Edge cases: ``sigmoid(+inf) = 1`` and ``sigmoid(-inf) = 0``, both with gradient 0;
  NaN stays NaN. bfloat16/float16 inputs are computed in float32 and returned in the
  input dtype; integer inputs are promoted to the default float dtype.

  The rule keeps one residual, the input ``x`` itself (on CPU, for half-precision
  inputs, ``s = sigmoid(-|x|)`` in float32 instead, which spares the backward pass an
  exponential; see ``jaxactv._backend``). It is a ``jax.custom_vjp``:
  reverse mode, reverse-over-reverse and forward-over-reverse (``jax.hessian``,
  ``jax.jvp`` of ``jax.grad``) work; pure forward mode (``jax.jvp``, ``jax.jacfwd``
  of the op itself) does not: use :func:`jaxactv.reference.sigmoid` for that.

  Args:
    x: input array of any shape.

  Returns:
    An array of ``x``'s shape and dtype.

  Examples:
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> print(jaxactv.sigmoid(jnp.array([-1.0, 0.0, 1.0])))
    [0.2689 0.5    0.7311]
    >>> print(f"{jax.grad(jaxactv.sigmoid)(17.0):.3g}")  # e**-17; jax.nn.sigmoid: 0
    4.14e-08
  """
  return _sigmoid(as_activation_input(x))


# ------------------------------------------------------------------------- log_sigmoid


def _log_sigmoid_value(x: jax.Array) -> jax.Array:
  return stable_log_sigmoid(x.astype(_dtypes.compute_dtype(x.dtype))).astype(x.dtype)


@jax.custom_vjp
def _log_sigmoid(x: jax.Array) -> jax.Array:
  return _log_sigmoid_value(x)


def _log_sigmoid_fwd(x):
  # Plain code, not _log_sigmoid itself: an outer jvp (jax.hessian) must see through it.
  return _log_sigmoid_value(x), (x,)


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

  The rule keeps one residual, the input ``x``. Reverse mode and forward-over-reverse
  (``jax.hessian``) work on this ``jax.custom_vjp``; pure forward mode does not: use
  :func:`jaxactv.reference.log_sigmoid`.

  Args:
    x: input array of any shape.

  Returns:
    An array of ``x``'s shape and dtype.

  Examples:
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> print(jaxactv.log_sigmoid(jnp.array([-1000.0, 0.0])))  # x, -log 2
    [-1000.        -0.6931]
    >>> print(jax.grad(jaxactv.log_sigmoid)(-1000.0))  # sigmoid(1000)
    1.0
  """
  return _log_sigmoid(as_activation_input(x))
