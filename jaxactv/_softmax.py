"""softmax, log_softmax and logsumexp over one or more axes, with masks and infinities.

All three share one normaliser, :func:`normalize`, and share one edge-case policy:

* ``where=False`` entries take no part: they are treated as ``-inf`` logits.
* A ``-inf`` logit has probability 0 and its probability has gradient 0.
* A row with no finite entry to normalise (all ``-inf`` or all masked) has
  softmax 0, log_softmax ``-inf``, logsumexp ``-inf`` and gradient 0, never NaN.
* A row holding ``+inf`` logits gives the limit: probability ``1/k`` on each of its
  ``k`` ``+inf`` entries and 0 elsewhere (``jax.nn`` answers NaN for the whole row);
  its logsumexp is ``+inf``.
* A NaN logit turns its own row into NaN and no other.

Every rule keeps at most one residual the size of its input: softmax and
log_softmax keep their output; logsumexp keeps its input ``x``. A ``where`` mask,
when given, is the caller's own array and is kept as it is; the rest is per row.

The reductions' inputs are plain arithmetic (``min``, ``exp``): XLA fuses those
into its reduction kernels, where a per-element select would break the fusion on
XLA:CPU. Selects appear only in elementwise outputs, where they cost nothing.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxactv import _dtypes
from jaxactv._validation import Axis, as_activation_input, as_mask, canonical_axes


def mask_logits(x: jax.Array, where: jax.Array | None) -> jax.Array:
  """``x`` with masked-out entries replaced by ``-inf`` (a NaN there is dropped too)."""
  return x if where is None else jnp.where(where, x, -jnp.inf)


def row_offset(row_max: jax.Array) -> jax.Array:
  """The per-row shift ``c`` that makes ``min(x - c, 0)`` the max-shifted logits.

  It is the row max when finite. A ``+inf`` row is shifted by the largest finite
  float, so its ``+inf`` entries land on 0 and all others on ``-inf`` after the
  exponential (``inf - inf`` would be NaN); a finite logit equal to that largest
  float would count as ``+inf`` too. A row with no finite max is not shifted.
  """
  big = jnp.finfo(row_max.dtype).max
  return jnp.where(jnp.isfinite(row_max), row_max, jnp.where(row_max == jnp.inf, big, 0.0))


def shifted_logits(x: jax.Array, offset: jax.Array) -> jax.Array:
  """``x - max``, ready for ``exp``: 0 on a ``+inf`` row's ``+inf`` entries.

  Clamping ``x`` at the largest float first is a no-op on finite rows and pins a
  ``+inf`` row's ``+inf`` entries at 0 (its other entries land at ``-finfo.max``
  or ``-inf``, which ``exp`` maps to 0 alike). Clamping ``x`` rather than the
  difference keeps the derivative 1 at the row max, so reverse-over-reverse is
  exact. Only arithmetic: XLA fuses it into the reduction, a select it would not.
  """
  return jnp.minimum(x, jnp.finfo(x.dtype).max) - offset


class Normalized(NamedTuple):
  """The shared forward pass: everything softmax, log_softmax and logsumexp need."""

  x: jax.Array  # the masked logits in the compute dtype
  row_max: jax.Array  # max over the axes (keepdims); -inf on an empty row, NaN on a NaN row
  offset: jax.Array  # row_offset(row_max)
  sum_exp: jax.Array  # sum of exp(shifted_logits) (keepdims): >= 1, or 0 on an empty row

  @property
  def safe_sum_exp(self) -> jax.Array:
    # An empty row (sum 0) must give softmax 0 and log_softmax -inf, not NaN.
    return jnp.where(self.sum_exp == 0.0, 1.0, self.sum_exp)

  @property
  def logsumexp(self) -> jax.Array:
    # -inf on an empty row (-inf + log 0), +inf on a +inf row (inf + log k).
    return self.row_max + jnp.log(self.sum_exp)

  def probs(self) -> jax.Array:
    return jnp.exp(shifted_logits(self.x, self.offset)) / self.safe_sum_exp

  def log_probs(self) -> jax.Array:
    log_sum = jnp.log(self.safe_sum_exp)
    # (x - max) - log_sum: both differences small, so the result keeps an ulp of
    # itself; x - (max + log_sum) would round at the scale of max.
    finite_rows = shifted_logits(self.x, self.offset) - log_sum
    # A +inf row: log(1/k) on its +inf entries, log 0 elsewhere (exactly -inf).
    inf_rows = jnp.where(self.x == jnp.inf, -log_sum, -jnp.inf)
    return jnp.where(self.row_max == jnp.inf, inf_rows, finite_rows)


def normalize(x: jax.Array, axes: tuple[int, ...]) -> Normalized:
  """One max pass and one sum-of-exp pass over ``x`` (masked, in the compute dtype)."""
  row_max = lax.stop_gradient(jnp.max(x, axes, keepdims=True, initial=-jnp.inf))
  offset = row_offset(row_max)
  sum_exp = jnp.sum(jnp.exp(shifted_logits(x, offset)), axes, keepdims=True)
  return Normalized(x, row_max, offset, sum_exp)


def _prepare(x, axis, where):
  x = as_activation_input(x)
  axes = canonical_axes(axis, x.ndim)
  return x, axes, as_mask(where, x.shape)


# ----------------------------------------------------------------------------- softmax


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _softmax(x, where, axes):
  ct = _dtypes.compute_dtype(x.dtype)
  return normalize(mask_logits(x.astype(ct), where), axes).probs().astype(x.dtype)


def _softmax_fwd(x, where, axes):
  y = _softmax(x, where, axes)
  return y, (y,)


def _softmax_bwd(axes, res, g):
  (y,) = res
  ct = _dtypes.compute_dtype(y.dtype)
  y, g = y.astype(ct), g.astype(ct)
  dx = y * (g - jnp.sum(g * y, axes, keepdims=True))
  return dx.astype(res[0].dtype), None


_softmax.defvjp(_softmax_fwd, _softmax_bwd)
# The public functions check their arguments in Python (axes become a sorted tuple,
# so a list or None is fine) and call these, compiled once per shape and axes.
_jit_softmax = jax.jit(_softmax, static_argnums=(2,))


def softmax(x: ArrayLike, axis: Axis = -1, where: ArrayLike | None = None) -> jax.Array:
  r"""Softmax over ``axis``, safe at infinities and masks, with an exact gradient.

  .. math::
    \mathrm{softmax}(x)_i = \frac{e^{x_i - m}}{\sum_j e^{x_j - m}}, \quad m = \max_j x_j,
    \qquad \frac{\partial\,\mathrm{softmax}}{\partial x} = \mathrm{diag}(s) - s s^\top

  Edge cases (see the module docs): masked and ``-inf`` entries get probability 0 and
  gradient 0; a row with nothing left to normalise gives 0 everywhere, gradient 0;
  a row with ``+inf`` entries shares probability 1 equally among them (``jax.nn``
  gives NaN); NaN poisons its own row only. bfloat16/float16 inputs are computed
  in float32 and returned in the input dtype.

  The rule keeps one residual, the output. It is a ``jax.custom_vjp``: forward mode
  (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) is unavailable; use
  :func:`jaxactv.reference.softmax` for it. Reverse-over-reverse works.

  Args:
    x: logits, ``[..., num_classes, ...]``.
    axis: the axis, or a tuple (or list) of axes, to normalise over; None for all.
    where: optional boolean mask broadcastable to ``x``; ``False`` entries are left
      out (as in ``jax.nn.softmax``) and get probability 0.

  Returns:
    Probabilities of ``x``'s shape and dtype, summing to 1 over ``axis`` (or to 0 on
    a row with nothing to normalise).

  Examples:
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> print(jaxactv.softmax(jnp.log(jnp.array([1.0, 3.0]))))
    [0.25 0.75]
    >>> print(jaxactv.softmax(jnp.array([1.0, jnp.inf, jnp.inf])))  # jax.nn: NaN
    [0.  0.5 0.5]
    >>> print(jaxactv.softmax(jnp.zeros(3), where=jnp.array([True, True, False])))
    [0.5 0.5 0. ]
  """
  x, axes, where = _prepare(x, axis, where)
  return _jit_softmax(x, where, axes)


# ------------------------------------------------------------------------- log_softmax


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _log_softmax(x, where, axes):
  ct = _dtypes.compute_dtype(x.dtype)
  return normalize(mask_logits(x.astype(ct), where), axes).log_probs().astype(x.dtype)


def _log_softmax_fwd(x, where, axes):
  y = _log_softmax(x, where, axes)
  return y, (y, where)


def _log_softmax_bwd(axes, res, g):
  y, where = res
  ct = _dtypes.compute_dtype(y.dtype)
  y, g = y.astype(ct), g.astype(ct)
  if where is not None:
    # A masked entry's output is the constant -inf: its cotangent goes nowhere.
    g = jnp.where(where, g, 0.0)
  dx = g - jnp.exp(y) * jnp.sum(g, axes, keepdims=True)
  # A -inf log-probability (a -inf logit, an empty row, a logit beaten by +inf) stays
  # -inf under any finite change of x: gradient 0. The select sits on the output, where
  # XLA fuses it; NaN rows stay NaN.
  return jnp.where(y == -jnp.inf, 0.0, dx).astype(res[0].dtype), None


_log_softmax.defvjp(_log_softmax_fwd, _log_softmax_bwd)
_jit_log_softmax = jax.jit(_log_softmax, static_argnums=(2,))


def log_softmax(x: ArrayLike, axis: Axis = -1, where: ArrayLike | None = None) -> jax.Array:
  r"""Log-softmax over ``axis``, safe at infinities and masks, with an exact gradient.

  .. math::
    \log\mathrm{softmax}(x)_i = x_i - m - \log \sum_j e^{x_j - m},
    \qquad \frac{\partial \log\mathrm{softmax}(x)_i}{\partial x_j}
      = \delta_{ij} - \mathrm{softmax}(x)_j

  Accuracy: within a few ulp of the float64 value, except that a log-probability
  near 0 (a dominant logit) carries an absolute error of about one ulp of 1.0
  (6e-8 in float32), as in ``jax.nn``: the sum it comes from is rounded near 1.

  Edge cases: masked entries and ``-inf`` logits give ``-inf`` with gradient 0 (the
  value stays ``-inf`` under any finite change); a row with nothing to normalise
  gives ``-inf`` everywhere with gradient 0; a row with ``k`` ``+inf`` entries gives
  ``-log k`` on them and ``-inf`` elsewhere; NaN poisons its own row only. The
  other entries' gradient is ``g_i - softmax_i * sum_j g_j`` over the unmasked
  entries (the cotangent of a ``-inf`` entry is 0 whenever the loss built on it is
  finite). bfloat16/float16 inputs are computed in float32 and returned in the
  input dtype.

  The rule keeps the output (and the caller's mask, when given). Forward
  mode is unavailable on this ``jax.custom_vjp``; use
  :func:`jaxactv.reference.log_softmax`. Reverse-over-reverse works.

  Args:
    x: logits, ``[..., num_classes, ...]``.
    axis: the axis, or a tuple (or list) of axes, to normalise over; None for all.
    where: optional boolean mask broadcastable to ``x``; ``False`` entries are left
      out and give ``-inf``.

  Returns:
    Log-probabilities of ``x``'s shape and dtype.

  Examples:
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> print(jaxactv.log_softmax(jnp.zeros(2)))  # log(1/2)
    [-0.6931 -0.6931]
    >>> print(jaxactv.log_softmax(jnp.zeros(2), where=jnp.array([True, False])))
    [  0. -inf]
  """
  x, axes, where = _prepare(x, axis, where)
  return _jit_log_softmax(x, where, axes)


# --------------------------------------------------------------------------- logsumexp


def _squeeze(a: jax.Array, axes: tuple[int, ...], keepdims: bool) -> jax.Array:
  return a if keepdims else jnp.squeeze(a, axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _logsumexp(x, where, axes, keepdims):
  return _logsumexp_fwd(x, where, axes, keepdims)[0]


def _logsumexp_fwd(x, where, axes, keepdims):
  ct = _dtypes.compute_dtype(x.dtype)
  n = normalize(mask_logits(x.astype(ct), where), axes)
  # Residuals: x and the caller's mask (no copies) and two per-row numbers.
  out = _squeeze(n.logsumexp, axes, keepdims).astype(x.dtype)
  return out, (x, where, n.offset, n.safe_sum_exp)


def _logsumexp_bwd(axes, keepdims, res, g):
  x, where, offset, safe_sum_exp = res
  ct = _dtypes.compute_dtype(x.dtype)
  probs = jnp.exp(shifted_logits(mask_logits(x.astype(ct), where), offset)) / safe_sum_exp
  g = g.astype(ct) if keepdims else jnp.expand_dims(g.astype(ct), axes)
  return (g * probs).astype(x.dtype), None


_logsumexp.defvjp(_logsumexp_fwd, _logsumexp_bwd)
_jit_logsumexp = jax.jit(_logsumexp, static_argnums=(2, 3))


def logsumexp(
    x: ArrayLike, axis: Axis = -1, where: ArrayLike | None = None, keepdims: bool = False
) -> jax.Array:
  r"""``log(sum(exp(x)))`` over ``axis``, stable, with gradient ``softmax(x)``.

  .. math::
    \mathrm{LSE}(x) = m + \log \sum_j e^{x_j - m}, \quad m = \max_j x_j

  Edge cases: masked and ``-inf`` entries contribute nothing and get gradient 0; a
  row with nothing to sum gives ``-inf`` with gradient 0; a row with ``+inf`` gives
  ``+inf`` with gradient ``1/k`` on its ``k`` ``+inf`` entries; NaN poisons its own
  row only. Unlike ``jax.nn.logsumexp`` the default ``axis`` is ``-1`` (matching
  :func:`softmax`); pass ``axis=None`` to reduce everything. There
  is no ``b``/``return_sign`` scaling. bfloat16/float16 inputs are computed in
  float32 and returned in the input dtype.

  The rule keeps its input ``x`` (and the mask, both the caller's own arrays) and
  two per-row numbers; the backward pass recomputes ``exp(x - lse)`` in one fused
  sweep. Forward mode is unavailable; use :func:`jaxactv.reference.logsumexp`.

  Args:
    x: input array.
    axis: the axis, or a tuple (or list) of axes, to reduce; None for all.
    where: optional boolean mask broadcastable to ``x``; ``False`` entries are left out.
    keepdims: keep the reduced axes with size 1.

  Returns:
    ``x``'s dtype, with ``axis`` reduced.

  Examples:
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> print(f"{jaxactv.logsumexp(jnp.zeros(2)):.4f}")  # log 2
    0.6931
    >>> print(jaxactv.logsumexp(jnp.array([-jnp.inf, -jnp.inf])))  # nothing to sum
    -inf
  """
  x, axes, where = _prepare(x, axis, where)
  return _jit_logsumexp(x, where, axes, bool(keepdims))
