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

Every rule keeps at most one residual the size of its input: softmax keeps its
output; log_softmax its output, or on CPU its input (``_backend``); logsumexp keeps
its input ``x`` (and ``b``). A
``where`` mask, when given, is the caller's own array and is kept as it is; the
rest is per row.

Autodiff: each op is a ``jax.custom_vjp``. Reverse mode (``grad``, ``vjp``,
``jacrev``), reverse-over-reverse and forward-over-reverse (``jax.hessian``,
``jax.jvp`` of ``jax.grad``: Hessian-vector products) work. The last needs every
``_fwd`` rule to compute its output with plain JAX code, never by calling the
custom_vjp itself: an outer ``jvp`` then differentiates the forward pass and the
backward pass like any other code. Pure forward mode (``jax.jvp``, ``jax.jacfwd``
or ``jax.linearize`` of the op itself) is impossible on a custom_vjp; use the
twins in :mod:`jaxactv.reference`.

The reductions' inputs are plain arithmetic (``min``, ``exp``): XLA fuses those
into its reduction kernels, where a per-element select would break the fusion on
XLA:CPU. Selects appear only in elementwise outputs, where they cost nothing, and in
one place where the break is wanted: on CPU, rows of more than 1024 float32 or
float64 logits take their ``exp`` in a loop of its own
(``_backend.exponentials_in_own_loop``). On CPU the forward's max and sum over a row
of more than 32768 logits go a piece at a time (``_arith.reduce_rows``).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxactv import _dtypes
from jaxactv._arith import reduce_rows, row_sum, sum_to_operand
from jaxactv._backend import exponentials_in_own_loop, reuse_forward_exponentials
from jaxactv._sharding import like_logits
from jaxactv._validation import Axis, as_activation_input, as_mask, broadcasts_to, canonical_axes


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


class ShiftedRows(NamedTuple):
  """softmax's and log_softmax's forward pass, in arithmetic XLA fuses into one kernel.

  The row max ``m`` is taken over the raw logits; the shift is ``c = m`` clamped to
  ``[-big, big]``, ``big`` the largest finite value of the input's dtype (``x`` may be
  half precision, computed in float32), and the shifted logits are
  ``min(x - c, big - c)``. The edges need no select:

  * a ``+inf`` row: ``c = big``, so its ``+inf`` entries shift to ``min(inf, 0) = 0``
    and its other entries to at most ``-ulp(big)`` (``-2**104`` in float32, ``-32`` for
    float16), whose exponential rounds to 0 in the output; a finite logit equal to
    ``big`` itself also shifts to 0 there and counts as one of the ``+inf`` entries;
  * a finite row whose max is ``big`` is an ordinary row (``m = big`` is not ``+inf``),
    except that at ``x = big`` the cap ties with the shift, so second derivatives there
    take half the true value (the whole value on CPU's long rows, ``_exp_in_own_loop``);
  * an empty row (every entry ``-inf`` or masked): ``c = -big`` and every entry stays
    ``-inf`` (``-inf - -inf`` would be NaN), so the sum is 0;
  * a NaN propagates through the max to its own row.

  Only ``max``, ``min`` and arithmetic, on the logits and on per-row numbers: XLA:CPU
  fuses them with both reductions and the output into one kernel at rows of 1024
  (as it does ``jax.nn.softmax``), where a select, a ``clamp`` or a clamp of the logits
  inside the max costs a kernel split or a pass per logit.
  """

  shifted: jax.Array  # min(x - c, big - c): <= 0, 0 at a row max, -inf at -inf
  exps: jax.Array  # exp(shifted); on CPU's long rows in a loop of its own (_backend)
  row_max: jax.Array  # m, the raw row max (keepdims): +inf on a +inf row
  sum_exp: jax.Array  # sum of exps: >= 1 on a row with an entry, else 0
  big: float  # the input dtype's largest finite value

  @property
  def safe_sum_exp(self) -> jax.Array:
    # A max, not a select: 1/2 on an empty row (sum 0), whose entries are all 0 (or
    # -inf), the sum itself (>= 1) elsewhere. Not max(sum, 1): a sum of exactly 1 (one
    # class, or a row whose other entries underflow) would tie with it, and a tie
    # halves the derivative, so jax.hessian would be off there.
    return jnp.maximum(self.sum_exp, 0.5)

  def probs(self) -> jax.Array:
    return self.exps / self.safe_sum_exp

  def log_probs(self) -> jax.Array:
    # scale is 1 on every row but a +inf one (m = inf), where it is 1 + 2**127: there
    # every other logit, shifted to at most -ulp(big) (32 or more), overflows to -inf,
    # and the +inf entries' 0 stays 0. min(max(m - big, 0), 2**127) as two maxes (not a
    # clamp, not a select, which would split the kernel); a constant per row, so the
    # scale adds nothing to any derivative.
    scale = 1.0 - jnp.maximum(-jnp.maximum(self.row_max - self.big, 0.0), -(2.0**127))
    # (x - max) - log_sum: both differences small, so the result keeps an ulp of itself.
    return self.shifted * scale - jnp.log(self.safe_sum_exp)


@jax.custom_jvp
def _exp_in_own_loop(x: jax.Array, offset: jax.Array) -> jax.Array:
  """``exp(min(x - c, big - c))`` for ``c = offset``, as a loop XLA:CPU keeps to itself.

  The same values: a ``+inf`` logit only sits on a ``+inf`` row, where ``c = big`` and
  the capped exponential is ``exp(0) = 1``. The select keeps the ``exp`` out of
  XLA:CPU's reduction kernel, where it runs at half speed on long rows (``_backend``),
  and without the cap the loop is 5-12% shorter.
  """
  return jnp.where(x == jnp.inf, 1.0, jnp.exp(x - offset))


@_exp_in_own_loop.defjvp
def _exp_in_own_loop_jvp(primals, tangents):
  # Written out because autodiff of the select would multiply its unused branch,
  # exp(inf) = inf, by a zero cotangent (NaN in reverse-over-reverse). The derivative
  # is the capped form's: 0 at a +inf logit (the cap is a constant per row), the
  # exponential elsewhere (at a logit equal to finfo.max too, where the cap would tie
  # and halve it).
  x, offset = primals
  tx, toffset = tangents
  y = _exp_in_own_loop(x, offset)
  return y, jnp.where(x == jnp.inf, 0.0, y) * (tx - toffset)


def shift_rows(x: jax.Array, axes: tuple[int, ...], ct) -> ShiftedRows:
  """One max pass and one sum-of-exp pass over ``x`` (masked, in its own dtype), in ``ct``."""
  big = float(jnp.finfo(x.dtype).max)
  # The max in x's own dtype (exact), with nothing between it and the shift but per-row
  # arithmetic. The -inf start only matters for an axis of size 0.
  row_max = reduce_rows(functools.partial(jnp.max, initial=-jnp.inf), x, axes, keepdims=True)
  row_max = lax.stop_gradient(row_max.astype(ct))
  # Clamped to [-big, big] as two maxes: XLA rewrites min(max(m, -big), big) into a
  # clamp, which YNNPACK fuses into no kernel.
  offset = -jnp.maximum(-jnp.maximum(row_max, -big), -big)
  # Capped at big - c (a per-row number), not at 0: below big the cap is never
  # reached, so the derivative at the row max stays 1 (min splits it at a tie) and
  # reverse-over-reverse is exact; on a +inf row the cap is 0.
  xc = x.astype(ct)
  shifted = jnp.minimum(xc - offset, big - offset)
  if exponentials_in_own_loop(x.dtype, math.prod(x.shape[a] for a in axes)):
    exps = _exp_in_own_loop(xc, offset)
  else:
    exps = jnp.exp(shifted)
  sum_exp = reduce_rows(jnp.sum, exps, axes, keepdims=True)
  return ShiftedRows(shifted, exps, row_max, sum_exp, big)


def _prepare(x, axis, where, allow_empty=False):
  x = as_activation_input(x)
  # The result does not depend on the order of the axes: sort them so that (1, 2) and
  # (2, 1) share one compiled function.
  axes = tuple(sorted(canonical_axes(axis, x.ndim, allow_empty=allow_empty)))
  return x, axes, like_logits(as_mask(where, x.shape), x)


# ----------------------------------------------------------------------------- softmax


def _softmax_value(x, where, axes):
  ct = _dtypes.compute_dtype(x.dtype)
  return shift_rows(mask_logits(x, where), axes, ct).probs().astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _softmax(x, where, axes):
  return _softmax_value(x, where, axes)


def _softmax_fwd(x, where, axes):
  # Plain code, not _softmax itself: an outer jvp (jax.hessian) must see through it.
  y = _softmax_value(x, where, axes)
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

  The rule keeps one residual, the output. It is a ``jax.custom_vjp``: reverse mode,
  reverse-over-reverse and forward-over-reverse (``jax.hessian``, ``jax.jvp`` of
  ``jax.grad``) work; pure forward mode (``jax.jvp``, ``jax.jacfwd`` of the op
  itself) does not: use :func:`jaxactv.reference.softmax` for it.

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


def _log_softmax_value(x, where, axes):
  ct = _dtypes.compute_dtype(x.dtype)
  return shift_rows(mask_logits(x, where), axes, ct).log_probs().astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _log_softmax(x, where, axes):
  return _log_softmax_value(x, where, axes)


def _log_softmax_fwd(x, where, axes):
  # Plain code, not _log_softmax itself: an outer jvp (jax.hessian) must see through it.
  y = _log_softmax_value(x, where, axes)
  if reuse_forward_exponentials(x.dtype):
    # The backward rebuilds the forward pass from x with the very same expressions,
    # which XLA merges with the forward's: its exp(shifted) buffer serves both.
    return y, (x, where)
  return y, (y, where)


def _log_softmax_bwd(axes, res, g):
  r, where = res
  ct = _dtypes.compute_dtype(r.dtype)
  g = g.astype(ct)
  if where is not None:
    # A masked entry's output is the constant -inf: its cotangent goes nowhere.
    g = jnp.where(where, g, 0.0)
  if reuse_forward_exponentials(r.dtype):  # r is x
    x = mask_logits(r, where)
    rows = shift_rows(x, axes, ct)
    probs = rows.probs()
    # y == -inf, read off x: x == -inf, or x below +inf on a +inf row (a finite logit
    # equal to finfo.max counts as +inf there, as in the forward). One compare per
    # logit with a per-row bound, where recomputing y takes four operations.
    below_inf = np.nextafter(np.asarray(rows.big, ct), np.asarray(0, ct)).item()
    # min(m, -inf) is -inf, or NaN on a NaN row, whose gradient stays NaN everywhere.
    bound = jnp.where(rows.row_max == jnp.inf, below_inf, jnp.minimum(rows.row_max, -jnp.inf))
    neg_inf = x.astype(ct) <= bound
  else:  # r is y
    y = r.astype(ct)
    probs = jnp.exp(y)
    neg_inf = y == -jnp.inf
  # The row sum as a product with ones on CPU: the select below then fuses with the rest.
  dx = g - probs * row_sum(g, axes, r.dtype)
  # A -inf log-probability (a -inf logit, an empty row, a logit beaten by +inf) stays
  # -inf under any finite change of x: gradient 0. The select sits on the output, where
  # XLA fuses it; NaN rows stay NaN.
  return jnp.where(neg_inf, 0.0, dx).astype(r.dtype), None


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

  The rule keeps the output (on CPU the input instead, whose forward pass the
  backward rebuilds so that XLA reuses its exponentials; see ``jaxactv._backend``),
  and the caller's mask when given. Reverse mode and
  forward-over-reverse (``jax.hessian``) work on this ``jax.custom_vjp``; pure
  forward mode does not: use :func:`jaxactv.reference.log_softmax`.

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
  return a if keepdims or not axes else jnp.squeeze(a, axes)


def _kept(where: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
  """The entries that take part: ``where`` and, as in ``jax.nn``, a nonzero ``b``."""
  if b is None:
    return where
  nonzero = b != 0
  return nonzero if where is None else where & nonzero


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _logsumexp(x, b, where, log_count, axes, keepdims):
  return _logsumexp_fwd(x, b, where, log_count, axes, keepdims)[0]


def _logsumexp_fwd(x, b, where, log_count, axes, keepdims):
  ct = _dtypes.compute_dtype(x.dtype)
  xm = mask_logits(x.astype(ct), _kept(where, b))
  if b is None:
    n = normalize(xm, axes)
    row_max, offset, s = n.row_max, n.offset, n.sum_exp
  else:
    # normalize's two sweeps, with the sum weighted: S = sum_j b_j e^(x_j - c), signed.
    row_max = lax.stop_gradient(jnp.max(xm, axes, keepdims=True, initial=-jnp.inf))
    offset = row_offset(row_max)
    s = jnp.sum(jnp.exp(shifted_logits(xm, offset)) * b.astype(ct), axes, keepdims=True)
  sign = jnp.sign(s)
  # -inf on an empty row (-inf + log 0), +inf on a +inf row (inf + log k).
  lse = row_max + jnp.log(jnp.abs(s))
  if log_count is not None:
    lse = lse - log_count
  out = tuple(_squeeze(a, axes, keepdims).astype(x.dtype) for a in (lse, sign))
  # Residuals: x, b and the caller's mask (no copies) and two per-row numbers.
  return out, (x, b, where, offset, s)


def _logsumexp_bwd(axes, keepdims, res, cts):
  x, b, where, offset, s = res
  g = cts[0]  # the sign is piecewise constant: its cotangent is dropped
  ct = _dtypes.compute_dtype(x.dtype)
  e = jnp.exp(shifted_logits(mask_logits(x.astype(ct), _kept(where, b)), offset))
  # softmax-like weights e / s; a row whose sum is 0 (nothing to sum, or terms that
  # cancel exactly) has value -inf and gradient 0.
  probs = e / jnp.where(s == 0, 1.0, s)
  if b is not None:
    probs = jnp.where(s == 0, 0.0, probs)
  g = g.astype(ct) if keepdims else jnp.expand_dims(g.astype(ct), axes)
  gp = g * probs
  if b is None:
    return gp.astype(x.dtype), None, None, None
  dx = gp * b.astype(ct)
  db = sum_to_operand(gp, b)
  return dx.astype(x.dtype), db.astype(b.dtype), None, None


_logsumexp.defvjp(_logsumexp_fwd, _logsumexp_bwd)
_jit_logsumexp = jax.jit(_logsumexp, static_argnums=(4, 5))


def _is_complex(a) -> bool:
  return a is not None and jnp.issubdtype(jnp.result_type(a), jnp.complexfloating)


def logsumexp(
    a: ArrayLike,
    axis: Axis = None,
    b: ArrayLike | None = None,
    keepdims: bool = False,
    return_sign: bool = False,
    where: ArrayLike | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  r"""``log(sum(b * exp(a)))`` over ``axis``: ``jax.nn.logsumexp``, with a fused rule.

  .. math::
    \mathrm{LSE}(a) = m + \log \Big|\sum_j b_j e^{a_j - m}\Big|, \quad m = \max_j a_j,
    \qquad \frac{\partial\,\mathrm{LSE}}{\partial a_j} = \frac{b_j e^{a_j - m}}{S},
    \quad \frac{\partial\,\mathrm{LSE}}{\partial b_j} = \frac{e^{a_j - m}}{S}

  with :math:`S = \sum_j b_j e^{a_j - m}`. The signature, defaults and results are
  ``jax.nn.logsumexp``'s: ``axis=None`` reduces everything (0.1.0 reduced the last
  axis by default), ``b`` broadcasts to ``a`` and may hold zeros (those entries are
  left out, and get gradient 0, as in ``jax.nn``) and negative numbers; with
  ``return_sign=True`` the result is ``(log|S| + m, sign(S))``, otherwise a negative
  sum gives NaN. Complex inputs are handed to ``jax.nn.logsumexp``.

  Edge cases: masked and ``-inf`` entries contribute nothing and get gradient 0; a
  row with nothing to sum gives ``-inf`` (sign 0) with gradient 0, and so does a row
  whose weighted terms cancel exactly; a row with ``+inf`` gives ``+inf`` with
  gradient ``b_j / sum(b)`` over its ``+inf`` entries (``1/k`` without ``b``; jax.nn
  gives NaN); NaN poisons its own row only. bfloat16/float16 inputs are computed in
  float32 and returned in their dtype.

  The rule keeps its inputs ``a`` and ``b`` (and the mask, the caller's own arrays)
  and two per-row numbers; the backward pass recomputes ``exp(a - m)`` in one fused
  sweep. Reverse mode and forward-over-reverse (``jax.hessian``) work; for pure
  forward mode use :func:`jaxactv.reference.logsumexp`.

  Args:
    a: input array (integers are promoted to float, as in ``jax.nn``).
    axis: the axis, or a tuple (or list) of axes, to reduce; None for all.
    b: optional scale factors, broadcastable to ``a``.
    keepdims: keep the reduced axes with size 1.
    return_sign: return ``(result, sign)``, with ``result = log|S| + m``.
    where: optional boolean mask broadcastable to ``a``; ``False`` entries are left out.

  Returns:
    An array of ``a``'s dtype (``a`` and ``b``'s common dtype when ``b`` is given)
    with ``axis`` reduced, or the pair ``(result, sign)``.

  Examples:
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> print(f"{jaxactv.logsumexp(jnp.zeros((2, 3))):.4f}")  # axis=None: log 6
    1.7918
    >>> print(jaxactv.logsumexp(jnp.zeros((2, 3)), axis=-1))  # log 3 per row
    [1.0986 1.0986]
    >>> print(jaxactv.logsumexp(jnp.array([-jnp.inf, -jnp.inf])))  # nothing to sum
    -inf
    >>> b = jnp.array([1.0, -3.0])
    >>> lse, sign = jaxactv.logsumexp(jnp.zeros(2), b=b, return_sign=True)
    >>> print(f"{lse:.4f} {sign}")  # log|1 - 3| = log 2, and the sum is negative
    0.6931 -1.0
  """
  if _is_complex(a) or _is_complex(b):
    return jax.nn.logsumexp(a, axis, b, keepdims, return_sign, where)
  a, b = _lse_inputs(a, b)
  x, axes, where = _prepare(a, axis, where, allow_empty=True)
  lse, sign = _jit_logsumexp(x, b, where, None, axes, bool(keepdims))
  if return_sign:
    return lse, sign
  if b is not None:
    # As jax.nn: log of a negative sum is NaN. A select on the output only.
    lse = jnp.where(sign < 0, jnp.nan, lse)
  return lse


def _lse_inputs(a, b):
  a = as_activation_input(a, "a")
  if b is None:
    return a, None
  b = jnp.asarray(b)
  if not broadcasts_to(b.shape, a.shape):
    raise ValueError(f"b of shape {b.shape} does not broadcast to a of shape {a.shape}.")
  if b.dtype == jnp.bool_ or not jnp.issubdtype(b.dtype, jnp.floating):
    b = b.astype(a.dtype)
  dtype = a.dtype if b.dtype == a.dtype else jnp.result_type(a, b)
  return a.astype(dtype), b.astype(dtype)


def logmeanexp(
    x: ArrayLike, axis: Axis = None, where: ArrayLike | None = None, keepdims: bool = False
) -> jax.Array:
  r"""``log(mean(exp(x)))`` over ``axis``: ``jax.nn.logmeanexp``, with a fused rule.

  .. math::
    \mathrm{LME}(x) = \mathrm{LSE}(x) - \log n,
    \qquad \frac{\partial\,\mathrm{LME}}{\partial x} = \mathrm{softmax}(x)

  with :math:`n` the number of entries taking part (those ``where`` keeps). The
  signature and defaults are ``jax.nn.logmeanexp``'s. Edge cases as
  :func:`logsumexp`; deliberately unlike ``jax.nn`` (NaN), a row with nothing to
  average gives ``-inf`` (a mean over nothing is 0, as in the losses' reductions)
  with gradient 0. ``log n`` is subtracted in float32 before the result is rounded
  to a half-precision ``x``'s dtype.

  Args:
    x: input array.
    axis: the axis, or a tuple (or list) of axes, to reduce; None for all.
    where: optional boolean mask broadcastable to ``x``; ``False`` entries are left out.
    keepdims: keep the reduced axes with size 1.

  Returns:
    ``x``'s dtype, with ``axis`` reduced.

  Examples:
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> print(f"{jaxactv.logmeanexp(jnp.log(jnp.array([1.0, 3.0]))):.4f}")  # log 2
    0.6931
    >>> print(jaxactv.logmeanexp(jnp.zeros((2, 3)), axis=-1))  # log 1 per row
    [0. 0.]
    >>> nothing = jnp.array([False, False])
    >>> print(jaxactv.logmeanexp(jnp.zeros(2), where=nothing))  # jax.nn: NaN
    -inf
  """
  if _is_complex(x):
    return jax.nn.logmeanexp(x, axis, where, keepdims)
  x, axes, where = _prepare(x, axis, where, allow_empty=True)
  ct = _dtypes.compute_dtype(x.dtype)
  if where is None:
    count = jnp.asarray(math.prod(x.shape[d] for d in axes), ct)
  else:
    count = jnp.sum(jnp.broadcast_to(where, x.shape), axes, keepdims=True, dtype=ct)
  # An empty row: -inf - log(1) = -inf, no -inf - -inf.
  log_count = jnp.log(jnp.maximum(count, 1.0))
  return _jit_logsumexp(x, None, where, log_count, axes, bool(keepdims))[0]
