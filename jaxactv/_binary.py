"""Sigmoid losses for multi-label problems: binary cross-entropy and focal loss.

Every logit is its own yes/no question, so these losses are elementwise. Each is
one ``jax.custom_vjp`` whose forward pass is a single fused sweep and whose
backward pass writes the closed-form gradient (``sigmoid(x) - y`` for plain BCE)
instead of differentiating two ``log_sigmoid`` calls, which costs autodiff about
twice the work. Residuals are the caller's own arrays only.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxactv import _dtypes
from jaxactv._arith import as_one_buffer, sum_to_operand, times_allowing_inf
from jaxactv._reduction import reduce_losses
from jaxactv._sharding import like_logits
from jaxactv._sigmoid import stable_log_sigmoid, stable_sigmoid
from jaxactv._validation import (
    as_logits,
    as_mask,
    broadcasts_to,
    check_nonnegative,
    check_reduction,
    check_static_coefficient,
)


def _softplus_tail(x: jax.Array) -> jax.Array:
  # log1p(exp(-|x|)): the part of softplus(+-x) shared by both signs, never overflows.
  return jnp.log1p(jnp.exp(-jnp.abs(x)))


def _masked(a: jax.Array, where: jax.Array | None) -> jax.Array:
  # Select, not multiply by a zeroed cotangent: a masked NaN must give gradient 0.
  return a if where is None else jnp.where(where, a, 0.0)


def _prepare_labels(logits, labels, name="labels"):
  labels = jnp.asarray(labels)
  if not broadcasts_to(labels.shape, logits.shape):
    raise ValueError(
        f"{name} of shape {labels.shape} do not broadcast to logits of shape "
        f"{logits.shape}: a sigmoid loss takes one target in [0, 1] per logit (or an "
        "array that broadcasts to the logits, as in optax)."
    )
  if not jnp.issubdtype(labels.dtype, jnp.floating):
    labels = labels.astype(_dtypes.loss_dtype(logits.dtype))
  return like_logits(labels, logits)


def _broadcastable(value, logits, name):
  if value is None:
    return None
  value = jnp.asarray(value)
  try:
    shape = jnp.broadcast_shapes(value.shape, logits.shape)
  except ValueError:
    shape = None
  if shape != logits.shape:
    raise ValueError(
        f"{name} of shape {value.shape} does not broadcast to logits of shape {logits.shape}."
    )
  return like_logits(value, logits)


# -------------------------------------------------------------- binary cross-entropy


class _BceConfig(NamedTuple):
  label_smoothing: float


def _bce_parts(logits, labels, pos_weight, cfg, ct):
  x = logits.astype(ct)
  y = labels.astype(ct)
  if cfg.label_smoothing > 0:
    y = (1.0 - cfg.label_smoothing) * y + 0.5 * cfg.label_smoothing
  pos = y if pos_weight is None else pos_weight.astype(ct) * y
  return x, y, pos, 1.0 - y


def _bce_fwd(logits, labels, pos_weight, where, cfg):
  ct = _dtypes.loss_dtype(logits.dtype)
  x, _, pos, neg = _bce_parts(logits, labels, pos_weight, cfg, ct)
  # loss = pos * softplus(-x) + neg * softplus(x)
  #      = neg * relu(x) + pos * relu(-x) + (pos + neg) * log1p(exp(-|x|)),
  # exact at +-inf: a zero weight times an infinite relu is 0, not NaN.
  loss = (
      times_allowing_inf(neg, jnp.maximum(x, 0.0))
      + times_allowing_inf(pos, jnp.maximum(-x, 0.0))
      + (pos + neg) * _softplus_tail(x)
  )
  loss = as_one_buffer(loss) if where is None else jnp.where(where, loss, 0.0)
  return loss, (logits, labels, pos_weight, where)


def _bce_bwd(cfg, res, g):
  logits, labels, pos_weight, where = res
  ct = _dtypes.loss_dtype(logits.dtype)
  x, y, pos, neg = _bce_parts(logits, labels, pos_weight, cfg, ct)
  g = g.astype(ct)
  # d/dx = (pos + neg) sigmoid(x) - pos = neg sigmoid(x) - pos sigmoid(-x): sigmoid(x) - y
  # without pos_weight, written so that it keeps its precision when sigmoid(x) ~ y.
  dx = g * (neg * stable_sigmoid(x) - pos * stable_sigmoid(-x))
  # d/dy = (1 - eps) * (pos_weight * softplus(-x) - softplus(x)).
  tail = _softplus_tail(x)
  p_w = 1.0 if pos_weight is None else pos_weight.astype(ct)
  dy_pos = times_allowing_inf(p_w, jnp.maximum(-x, 0.0)) + p_w * tail
  # 0 * inf = 0 throughout: a zero cotangent (or smoothing of 1) at an infinite logit
  # gives 0, and no NaN is computed.
  dy = times_allowing_inf(g * (1.0 - cfg.label_smoothing), dy_pos - (jnp.maximum(x, 0.0) + tail))
  dpw = None
  if pos_weight is not None:
    # d/dp = y' softplus(-x), with the smoothed target y'.
    soft_neg = times_allowing_inf(y, jnp.maximum(-x, 0.0)) + y * tail
    dpw = sum_to_operand(_masked(times_allowing_inf(g, soft_neg), where), pos_weight)
    dpw = dpw.astype(pos_weight.dtype)
  dx = _masked(dx, where)
  # Labels that broadcast to the logits get their cotangent summed back to their shape.
  dy = sum_to_operand(_masked(dy, where), labels)
  return dx.astype(logits.dtype), dy.astype(labels.dtype), dpw, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _bce(logits, labels, pos_weight, where, cfg):
  return _bce_fwd(logits, labels, pos_weight, where, cfg)[0]


_bce.defvjp(_bce_fwd, _bce_bwd)


def sigmoid_binary_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    where: ArrayLike | None = None,
    pos_weight: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "none",
) -> jax.Array:
  r"""Sigmoid binary cross-entropy from logits: the multi-label loss.

  Each logit answers its own yes/no question (several classes may be right at
  once). With :math:`y' = (1 - \varepsilon) y + \varepsilon / 2` and PyTorch's
  ``pos_weight`` :math:`p`:

  .. math::
    \ell = -p\, y' \log \sigma(x) - (1 - y') \log (1 - \sigma(x)),
    \qquad \frac{\partial \ell}{\partial x} = (p y' + 1 - y')\, \sigma(x) - p y'

  which is ``sigmoid(x) - y`` without ``pos_weight``. The forward is one fused
  pass using ``log(1 - sigmoid(x)) = log_sigmoid(-x)``; the backward writes the
  closed form above. Gradients flow to ``logits``, ``labels`` (soft targets) and
  ``pos_weight``.

  Edge cases: exact at ``+-inf`` logits: loss 0 when the label agrees, ``inf``
  when it does not, gradient ``sigmoid(x) - y`` (optax and PyTorch give NaN).
  Masked elements give loss 0 and gradient 0; ``"mean"`` averages over the
  unmasked elements. bfloat16/float16 logits are computed in float32; the loss is
  float32 and gradients have their arguments' dtypes.

  Args:
    logits: floating logits of any shape.
    labels: targets in ``[0, 1]`` of ``logits``' shape or broadcastable to it, as in
      optax (booleans and integers are converted); their gradient comes back in
      their own shape.
    where: optional boolean mask broadcastable to ``logits``.
    pos_weight: optional weight of the positive term, broadcastable to
      ``logits`` (PyTorch: one per class, on the last axis).
    label_smoothing: :math:`\varepsilon \in [0, 1]`, pulling targets toward 1/2.
    reduction: ``"none"`` (per element), ``"mean"`` or ``"sum"``.

  Returns:
    float32 (float64 for float64 logits) losses of ``logits``' shape, or a scalar.

  Examples:
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> logits, labels = jnp.array([0.0, jnp.inf, jnp.inf]), jnp.array([1.0, 1.0, 0.0])
    >>> print(jaxactv.sigmoid_binary_cross_entropy(logits, labels))
    [0.6931 0.        inf]
    >>> bce_sum = lambda x: jaxactv.sigmoid_binary_cross_entropy(x, labels, reduction="sum")
    >>> print(jax.grad(bce_sum)(logits))  # sigmoid(x) - y; optax: NaN at +inf
    [-0.5  0.   1. ]
  """
  check_reduction(reduction)
  check_static_coefficient(label_smoothing, "label_smoothing", upper=1.0)
  logits = as_logits(logits)
  labels = _prepare_labels(logits, labels)
  pos_weight = _broadcastable(pos_weight, logits, "pos_weight")
  where = like_logits(as_mask(where, logits.shape), logits)
  losses = _bce(logits, labels, pos_weight, where, _BceConfig(float(label_smoothing)))
  weights = None if where is None else jnp.broadcast_to(where, logits.shape).astype(losses.dtype)
  return reduce_losses(losses, reduction, weights)


# ------------------------------------------------------------------------ focal loss


def _log_add_exp(a: jax.Array, b: jax.Array) -> jax.Array:
  # log(e^a + e^b) with a or b possibly -inf (log 0), and a gradient that stays finite.
  # Both -inf: the difference is taken between zeros, so no -inf - -inf = NaN appears.
  m = jnp.maximum(a, b)
  both = m == -jnp.inf
  diff = jnp.where(both, 0.0, a) - jnp.where(both, 0.0, b)
  return m + jnp.log1p(jnp.exp(-jnp.abs(diff)))


def _focal_terms(logits, labels, alpha, gamma, ct):
  """The pieces of the focal loss, all in log space so no power underflows."""
  x, y = logits.astype(ct), labels.astype(ct)
  log_p, log_q = stable_log_sigmoid(x), stable_log_sigmoid(-x)
  # 1 - p_t = y * sigmoid(-x) + (1 - y) * sigmoid(x), as a log: exact for hard labels.
  log_y = jnp.where(y > 0, jnp.log(jnp.where(y > 0, y, 1.0)), -jnp.inf)
  log_not_y = jnp.where(y < 1, jnp.log1p(-jnp.where(y < 1, y, 0.0)), -jnp.inf)
  log_u = _log_add_exp(log_y + log_q, log_not_y + log_p)
  ce = times_allowing_inf(y, -log_p) + times_allowing_inf(1.0 - y, -log_q)
  gamma = jnp.asarray(gamma, ct)
  alpha_t = 1.0 if alpha is None else alpha * y + (1.0 - alpha) * (1.0 - y)
  return x, y, log_p, log_q, log_u, ce, gamma, alpha_t


def _focal_fwd(logits, labels, alpha, gamma, where):
  ct = _dtypes.loss_dtype(logits.dtype)
  alpha_c = None if alpha is None else jnp.asarray(alpha).astype(ct)
  _, _, _, _, log_u, ce, gamma_c, alpha_t = _focal_terms(logits, labels, alpha_c, gamma, ct)
  loss = alpha_t * times_allowing_inf(jnp.exp(times_allowing_inf(gamma_c, log_u)), ce)
  loss = as_one_buffer(loss) if where is None else jnp.where(where, loss, 0.0)
  return loss, (logits, labels, alpha, gamma, where)


def _focal_bwd(res, g):
  logits, labels, alpha, gamma, where = res
  ct = _dtypes.loss_dtype(logits.dtype)
  alpha_c = None if alpha is None else jnp.asarray(alpha).astype(ct)
  x, y, log_p, log_q, log_u, ce, gamma_c, alpha_t = _focal_terms(
      logits, labels, alpha_c, gamma, ct
  )
  g = g.astype(ct)
  mul = times_allowing_inf  # 0 * inf = 0: the limits at infinite logits, and no NaN computed
  weight = jnp.exp(mul(gamma_c, log_u))  # (1 - p_t)^gamma
  # d(1 - p_t)/dx = (1 - 2y) p q, so d weight/dx = gamma (1 - 2y) u^(gamma-1) p q, taken as
  # one exp of a sum of logs: finite for every gamma >= 0 and finite x, where
  # u^(gamma - 1) alone would blow up. At an infinite logit p q = 0 and so is the
  # product (for gamma > 0; gamma = 0 has no weight to differentiate).
  finite = jnp.isfinite(x)
  lu, lp, lq = (jnp.where(finite, a, 0.0) for a in (log_u, log_p, log_q))
  log_dweight = jnp.where(finite, (gamma_c - 1.0) * lu + lp + lq, -jnp.inf)
  dweight = gamma_c * (1.0 - 2.0 * y) * jnp.exp(log_dweight)
  # sigmoid(x) - y as (1 - y) sigmoid(x) - y sigmoid(-x): no cancellation when it is tiny.
  residual = (1.0 - y) * jnp.exp(log_p) - y * jnp.exp(log_q)
  dx = mul(g * alpha_t, mul(dweight, ce) + weight * residual)
  # d/dy, d/dalpha, d/dgamma. At an infinite logit the loss is 0 or inf and has no
  # finite derivative in these: they are computed at a finite stand-in for x (so no
  # inf - inf or 0 * inf is ever formed) and set to 0 there.
  _, _, log_p, log_q, log_u, ce, _, _ = _focal_terms(
      jnp.where(finite, x, 0.0), labels, alpha_c, gamma, ct
  )
  weight = jnp.exp(gamma_c * log_u)
  du_dy = jnp.exp(log_q) - jnp.exp(log_p)  # d(1 - p_t)/dy = sigmoid(-x) - sigmoid(x)
  # u^(gamma - 1) may overflow for gamma < 1 where u underflows; it multiplies a ce of
  # exactly 0 there (a hard label the logit agrees with): 0 * inf = 0.
  dweight_dy = mul(gamma_c, jnp.exp((gamma_c - 1.0) * log_u)) * du_dy
  dce_dy = log_q - log_p  # = -x
  dalpha_t_dy = 0.0 if alpha_c is None else 2.0 * alpha_c - 1.0
  weight_ce = weight * ce
  dy = g * (alpha_t * (mul(dweight_dy, ce) + weight * dce_dy) + dalpha_t_dy * weight_ce)
  dy = jnp.where(finite, dy, 0.0)
  dalpha = dgamma = None
  if alpha is not None:
    dalpha_terms = jnp.where(finite, g * (2.0 * y - 1.0) * weight_ce, 0.0)
    dalpha = sum_to_operand(_masked(dalpha_terms, where), alpha)
    dalpha = dalpha.astype(jnp.result_type(alpha))
  dgamma_terms = jnp.where(finite, g * alpha_t * weight_ce * log_u, 0.0)
  dgamma = sum_to_operand(_masked(dgamma_terms, where), gamma)
  dgamma = dgamma.astype(jnp.result_type(gamma))
  dx = _masked(dx, where)
  dy = sum_to_operand(_masked(dy, where), labels)
  return dx.astype(logits.dtype), dy.astype(labels.dtype), dalpha, dgamma, None


@jax.custom_vjp
def _focal(logits, labels, alpha, gamma, where):
  return _focal_fwd(logits, labels, alpha, gamma, where)[0]


_focal.defvjp(_focal_fwd, _focal_bwd)


def sigmoid_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    alpha: ArrayLike | None = None,
    gamma: ArrayLike = 2.0,
    *,
    where: ArrayLike | None = None,
    reduction: str = "none",
) -> jax.Array:
  r"""Sigmoid focal loss (Lin et al., 2017), stable at extreme logits for any ``gamma``.

  .. math::
    \ell = \alpha_t (1 - p_t)^\gamma\, \mathrm{BCE}(x, y),\quad
    1 - p_t = y\,\sigma(-x) + (1 - y)\,\sigma(x),\quad
    \alpha_t = \alpha y + (1 - \alpha)(1 - y)

  ``(1 - p_t)^\gamma`` is computed as ``exp(gamma * log(1 - p_t))`` with
  ``log(1 - p_t)`` taken in log space, and the gradient's ``(1-p_t)^(gamma-1)``
  is merged with the ``sigmoid(x) sigmoid(-x)`` it multiplies, so gradients and
  (reverse-over-reverse) Hessians stay finite at extreme logits even for
  ``gamma < 1`` (optax issue 1267). ``alpha`` and ``gamma`` may be traced values
  and receive gradients.

  Edge cases: soft labels in ``[0, 1]`` are supported; masked elements give loss
  0 and gradient 0. At infinite logits the loss is 0 or ``inf`` as for BCE and the
  gradient in ``logits`` is its limit under ``0 * inf = 0`` (``alpha_t (sigmoid(x)
  - y)`` where the loss is infinite, 0 where it is 0); the gradients in ``labels``,
  ``alpha`` and ``gamma`` are 0 there (the loss has no finite derivative in them).
  No intermediate is NaN, so ``checkify.all_checks`` stays silent.

  Args:
    logits: floating logits of any shape.
    labels: targets in ``[0, 1]`` of ``logits``' shape or broadcastable to it.
    alpha: optional weight of the positive class in ``[0, 1]``; None for no
      weighting.
    gamma: focusing exponent, ``>= 0`` (2 in the paper).
    where: optional boolean mask broadcastable to ``logits``.
    reduction: ``"none"`` (per element), ``"mean"`` or ``"sum"``.

  Returns:
    float32 (float64 for float64 logits) losses of ``logits``' shape, or a scalar.

  Examples:
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> logits, labels = jnp.zeros(2), jnp.array([1.0, 0.0])
    >>> print(jaxactv.sigmoid_focal_loss(logits, labels, gamma=2.0))  # log 2 / 4
    [0.1733 0.1733]
    >>> print(jaxactv.sigmoid_focal_loss(logits, labels, alpha=0.25))
    [0.0433 0.13  ]
  """
  check_reduction(reduction)
  check_nonnegative(gamma, "gamma")
  if alpha is not None:
    check_nonnegative(alpha, "alpha")
    if not isinstance(alpha, jax.core.Tracer) and np.any(np.asarray(alpha) > 1):
      raise ValueError(f"alpha must lie in [0, 1]; got {alpha!r}.")
  logits = as_logits(logits)
  labels = _prepare_labels(logits, labels)
  alpha = _broadcastable(alpha, logits, "alpha")
  gamma = _broadcastable(gamma, logits, "gamma")
  where = like_logits(as_mask(where, logits.shape), logits)
  losses = _focal(logits, labels, alpha, gamma, where)
  weights = None if where is None else jnp.broadcast_to(where, logits.shape).astype(losses.dtype)
  return reduce_losses(losses, reduction, weights)
