"""KL divergence and entropy of softmax distributions, straight from logits.

Distillation and RL regularisers compare two categorical distributions that are
often close; the textbook ``sum(q * (log q - log p))`` then subtracts nearly equal
log-probabilities and loses every significant digit of a small divergence. Here,
with ``delta = x - t`` between the max-shifted logits (so a common offset of 1e6
costs no digits), ``mu = E_q[delta]`` and ``phi(z) = exp(z) - 1 - z >= 0``,

    KL(q || p) = log E_q[exp(delta)] - mu = E_q[phi(delta)] - psi(y),
    y = E_q[exp(delta)] - 1 = E_q[phi(delta)] + mu,   psi(y) = y - log1p(y) >= 0,

two sweeps after the row maxes: the sums of ``exp(t)``, ``exp(t) delta`` and
``exp(t) phi(delta)`` (``phi`` from its Taylor series near 0, so no term cancels), and
the sum of ``exp(x)`` for ``lse_x``. The difference of the two non-negative means
cancels only what the divergence is made of (``E_q[phi] ~ KL + mu^2 / 2``, ``psi ~
mu^2 / 2``), so a divergence of 1e-9 keeps its digits when ``mu`` is as small as the
spread of ``delta``. When it is not (``mu^2`` or ``mu`` dwarfs the divergence, as when
the prediction's max sits on a class the target barely allows), the bound on that
cancellation exceeds ``_KL_CANCELLATION_LIMIT`` epsilons and the batch takes a third
sweep centred at ``mu``: ``log1p(E_q[phi(delta - mu)])``, a mean of non-negative
terms. Classes outside the target's support add the prediction's mass there. Each op
is a ``jax.custom_vjp`` with the closed-form gradients ``dKL/dx = p - q``,
``dKL/dt = -q (delta - mu)`` and ``dH/dx = -p (log p + H)``; residuals are the inputs
and per-row numbers.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxactv import _dtypes
from jaxactv._arith import as_one_buffer, max_at_least, reduce_rows
from jaxactv._backend import soft_loss_in_separate_sweeps
from jaxactv._cross_entropy import safe_log_sum, shift_floor
from jaxactv._layout import to_class_layout
from jaxactv._reduction import reduce_losses
from jaxactv._sharding import like_logits
from jaxactv._softmax import mask_logits
from jaxactv._validation import Axis, as_logits, check_reduction


def _phi(z: jax.Array) -> jax.Array:
  """``exp(z) - 1 - z`` (>= 0), accurate near 0 where ``expm1(z) - z`` cancels."""
  small = jnp.abs(z) < 0.1
  zs = jnp.where(small, z, 0.0)
  # Horner form of z^2/2! + z^3/3! + ... + z^8/8!: truncation below 3e-13 relative.
  series = zs * zs * (1 / 2 + zs * (1 / 6 + zs * (1 / 24 + zs * (1 / 120 + zs * (
      1 / 720 + zs * (1 / 5040 + zs * (1 / 40320)))))))
  return jnp.where(small, series, jnp.expm1(z) - z)


def _row_max(x: jax.Array, big: float, floor: float | None = None) -> jax.Array:
  """The row max (keepdims, no gradient), at least ``floor`` (default ``-big``): a row
  with no finite logit is shifted by it and keeps its ``-inf`` entries, never ``-inf -
  -inf``. Two maxes in one program take different floors, or XLA shares the floor's
  logits-sized broadcast between them and writes it out."""
  floor = -big if floor is None else floor
  axes = (x.ndim - 1,)
  if x.shape[-1] > 1024:  # the soft-label loss's long-row form (_cross_entropy)
    return reduce_rows(max_at_least(floor), lax.stop_gradient(x), axes, True)
  return lax.stop_gradient(jnp.max(jnp.maximum(x, floor), -1, keepdims=True, initial=-jnp.inf))


def _shifted_log_ratio(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a - b`` for the max-shifted logits ``a = x - max x``, ``b = t - max t``, where both
  are finite, else 0.

  Shifted, the difference keeps its digits at any logit scale (``x - t`` at logits of
  1e6 would round at their ulp, 0.06). Taken between selected operands, so ``-inf -
  -inf`` is never computed (checkify). A class with target mass and ``x = -inf`` makes
  the divergence ``inf``, set separately.
  """
  ok = (a > -jnp.inf) & (b > -jnp.inf)
  return jnp.where(ok, a, 0.0) - jnp.where(ok, b, 0.0)


# ------------------------------------------------------------------------------ KL


# The largest bound on the two-sweep value's rounding error, in epsilons of the value,
# that a row may keep: a batch with any row above it takes the third sweep. Measured
# errors stay below a quarter of the bound, so a kept value is within ~32 epsilons.
_KL_CANCELLATION_LIMIT = 128.0


def _phi_series(z: jax.Array) -> jax.Array:
  """``exp(z) - 1 - z`` from its Taylor series, for ``|z| <= 1``: the terms up to ``z^n / n!``
  with ``1 / (n + 1)!`` below the dtype's epsilon (n = 10 in float32, 18 in float64)."""
  eps = float(jnp.finfo(z.dtype).eps)
  n = next(k for k in range(2, 40) if 1.0 / math.factorial(k + 1) < eps)
  acc = jnp.full_like(z, 1.0 / math.factorial(n))
  for k in range(n - 1, 1, -1):  # Horner: z^2 (1/2! + z (1/3! + ... z / n!))
    acc = 1.0 / math.factorial(k) + z * acc
  return z * z * acc


def _q_phi(e_t: jax.Array, e_x: jax.Array, delta: jax.Array) -> jax.Array:
  """``e_t * phi(delta)`` for ``e_t = exp(b)``, ``e_x = exp(a)``, ``delta = a - b``.

  From ``phi``'s Taylor series for ``|delta| < 1``; beyond it ``e_x - e_t (1 + delta)``,
  since ``e_t exp(delta) = e_x``: no third exponential, no overflow, and at most
  ``e / (e - 2)`` (two bits) of cancellation.
  """
  small = jnp.abs(delta) < 1.0
  series = e_t * _phi_series(jnp.where(small, delta, 0.0))
  return jnp.where(small, series, e_x - e_t * (1.0 + delta))


def _psi(y: jax.Array) -> jax.Array:
  """``y - log1p(y) >= 0`` for ``|y| <= 1/2``, to a few ulp where the difference cancels.

  With ``s = y / (2 + y)``, ``log1p(y) = 2 atanh(s)`` and ``y = 2s / (1 - s)``, so
  ``y - log1p(y) = 2s (s / (1 - s) - s^2/3 - s^4/5 - ...)``, ``|s| <= 1/3``: no term
  cancels, and seven of the series reach float64's rounding.
  """
  s = y / (2.0 + y)
  s2 = s * s
  tail = s2 * (1 / 3 + s2 * (1 / 5 + s2 * (1 / 7 + s2 * (1 / 9 + s2 * (
      1 / 11 + s2 * (1 / 13 + s2 * (1 / 15 + s2 * (1 / 17 + s2 / 19))))))))
  return 2.0 * s * (s / (1.0 - s) - tail)


def _kl_fwd(logits, target_logits, class_mask, counts):
  ct = _dtypes.loss_dtype(logits.dtype, target_logits.dtype)
  x = mask_logits(logits.astype(ct), class_mask)
  t = mask_logits(target_logits.astype(ct), class_mask)
  big = float(jnp.finfo(ct).max)
  sum_rows = functools.partial(reduce_rows, jnp.sum, axes=(x.ndim - 1,), keepdims=True)
  # Sweep 1: the row maxes. Sweep 2: S_x, S_t, E_q[delta] and E_q[phi(delta)], delta
  # taken between the shifted logits (centred at 0, not at mu = E_q[delta]). Each sum
  # takes its exponentials afresh from the logits, its shift spelled apart from the
  # others' (the same number but on a row whose max is -big, i.e. an empty one): XLA:CPU
  # then fuses the first two into their reductions and writes out only the other two's
  # terms, where shared exponentials were written out and read back by every sum (4096
  # x 1024 float32 forward: 1.7x optax -> 1.2x).
  max_x, max_t = _row_max(x, big), _row_max(t, big, float(shift_floor(ct)))
  sum_x, sum_t = sum_rows(jnp.exp(x - max_x)), sum_rows(jnp.exp(t - max_t))
  safe_t = jnp.maximum(sum_t, 1.0)  # >= 1 unless the target is empty
  log_sum_x, log_sum_t = jnp.log(jnp.maximum(sum_x, 1.0)), jnp.log(safe_t)
  a, b = x - jnp.maximum(max_x, -big), t - jnp.maximum(max_t, -big)
  # The select (a no-op: e_t * delta is 0 where e_t is) keeps the whole term in one loop.
  e_t = jnp.exp(b)
  mu = sum_rows(jnp.where(e_t > 0, e_t * _shifted_log_ratio(a, b), 0.0)) / safe_t
  floor = shift_floor(ct)  # just above -big: a third spelling
  a, b = x - jnp.maximum(max_x, floor), t - jnp.maximum(max_t, floor)
  e_x, e_t = jnp.exp(a), jnp.exp(b)
  # The target's support: exp(t - max t) > 0 in this precision. Outside it a class adds
  # its e_x, so that y = phi_0 + mu = S_x / S_t - 1. A class in it that the prediction
  # rules out (x = -inf) adds -inf: the divergence is infinite.
  support = e_t > 0
  terms = jnp.where(
      support, jnp.where(x == -jnp.inf, -jnp.inf, _q_phi(e_t, e_x, _shifted_log_ratio(a, b))), e_x
  )
  phi_0 = sum_rows(terms) / safe_t
  impossible = phi_0[..., 0] == -jnp.inf
  phi_0 = jnp.where(impossible[..., None], 0.0, phi_0)
  # S_x >= 1 (its max's term), so y >= 1 / S_t - 1: the floor only catches rounding.
  y = jnp.maximum(phi_0 + mu, 1.0 / safe_t - 1.0)
  # KL = log1p(y) - mu = phi_0 - psi(y), psi(y) = y - log1p(y) >= 0: a difference of
  # two non-negative numbers that cancels only what the divergence is made of (phi_0 ~
  # KL + mu^2 / 2, psi ~ mu^2 / 2 for small ones), with y's rounding entering through
  # psi'(y) = y / (1 + y). Their magnitudes over the value bound its relative error in
  # epsilons (measured errors stay below a quarter of the bound).
  near = jnp.abs(y) < 0.5
  log1p_y = jnp.log1p(y)
  psi = jnp.where(near, _psi(jnp.where(near, y, 0.0)), y - log1p_y)  # no cancellation
  kl = (phi_0 - psi)[..., 0]
  cancelled = phi_0 + psi + jnp.abs(y) / (1.0 + y) * (phi_0 + jnp.abs(mu))
  cancelled = (cancelled + jnp.where(near, 0.0, jnp.abs(y) + jnp.abs(log1p_y)))[..., 0]
  valid = counts & (sum_t[..., 0] > 0) & ~impossible
  rough = valid & ~(cancelled <= _KL_CANCELLATION_LIMIT * kl)
  # Rows whose divergence is small next to mu^2 (or to mu) take a third sweep centred
  # at mu, for the whole batch, only when some row needs it.
  def centred():
    kl_c, mu_c = _kl_centred(x, t, max_x, max_t, mu, safe_t, log_sum_x)
    return jnp.where(rough, kl_c, kl), jnp.where(rough[..., None], mu_c, mu)

  kl, mu = lax.cond(jnp.any(rough), centred, lambda: (kl, mu))
  kl = jnp.where(impossible, jnp.inf, kl)
  # A target with no mass (every logit -inf or masked) is no distribution: every class
  # has target probability 0 and contributes nothing, so the divergence is 0.
  kl = jnp.where(counts & (sum_t[..., 0] > 0), as_one_buffer(kl), 0.0)
  keep = counts[..., None] & (sum_t > 0)  # the examples whose gradients are not 0
  return kl, (logits, target_logits, class_mask, keep, max_x, max_t, log_sum_x, log_sum_t, mu)


def _kl_centred(x, t, max_x, max_t, mu, safe_t, log_sum_x):
  """The divergence as ``log1p(E_q[phi(z)])``, ``z = delta - mu``, and ``E_q[delta]`` with
  its rounding: every digit of a divergence however small next to ``mu``.

  Classes outside the target's support add ``-log(1 - p_out)``; once ``E_q[phi] >= 1``
  or ``p_out >= 1/2`` (KL >= log 2), the textbook ``lse_x - lse_t - E_q[delta]`` in the
  shifted logits, which then holds every digit that matters.
  """
  sum_rows = functools.partial(reduce_rows, jnp.sum, axes=(x.ndim - 1,), keepdims=True)
  a, b = x - max_x, t - max_t
  e_t = jnp.exp(b)
  support = (e_t > 0) & (x > -jnp.inf)
  q = e_t / safe_t
  log_q = b - jnp.log(safe_t)
  z = jnp.where(support, _shifted_log_ratio(a, b) - mu, 0.0)
  # E_q[z] is 0 up to rounding; keeping its rounding r makes the identities exact.
  r = sum_rows(jnp.where(support, q * z, 0.0))
  # q * phi(z), in log space where exp(z) alone would overflow (q tiny, z large); the
  # other branch's z is capped so that it never computes 0 * inf (checkify).
  terms = jnp.where(
      z > 50.0, jnp.exp(log_q + z) - q * (1.0 + z), q * _phi(jnp.minimum(z, 50.0))
  )
  phi_mean = sum_rows(jnp.where(support, terms, 0.0))
  p_out = sum_rows(jnp.where(e_t > 0, 0.0, jnp.exp(a - log_sum_x)))[..., 0]
  small = (phi_mean[..., 0] < 1.0) & (p_out < 0.5)
  kl_small = jnp.log1p(phi_mean + r)[..., 0] - r[..., 0] - jnp.log1p(-jnp.minimum(p_out, 0.5))
  kl_large = (log_sum_x - jnp.log(safe_t) - (mu + r))[..., 0]
  return jnp.where(small, kl_small, kl_large), mu + r


def _kl_bwd(res, g):
  logits, target_logits, class_mask, keep, max_x, max_t, log_sum_x, log_sum_t, mu = res
  ct = max_x.dtype
  x = mask_logits(logits.astype(ct), class_mask)
  t = mask_logits(target_logits.astype(ct), class_mask)
  g = g.astype(ct)[..., None]
  a, b = x - max_x, t - max_t
  p = jnp.exp(a - log_sum_x)
  e_t = jnp.exp(b)
  q = e_t * jnp.exp(-log_sum_t)
  dx = g * (p - q)
  # dKL/dt_j = q_j (log q_j - log p_j - KL) = -q_j (x_j - t_j - E_q[x - t])
  dt = jnp.where(e_t > 0, -g * q * (_shifted_log_ratio(a, b) - mu), 0.0)
  # Select, not multiply: a masked example full of NaN must get gradient 0; so does
  # a target with no mass, whose divergence is 0 whatever the logits.
  dx, dt = (jnp.where(keep, v, 0.0) for v in (dx, dt))
  return dx.astype(logits.dtype), dt.astype(target_logits.dtype), None, None


@jax.custom_vjp
def _kl(logits, target_logits, class_mask, counts):
  return _kl_fwd(logits, target_logits, class_mask, counts)[0]


_kl.defvjp(_kl_fwd, _kl_bwd)


def kl_divergence_from_logits(
    logits: ArrayLike,
    target_logits: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    reduction: str = "none",
) -> jax.Array:
  r"""``KL(softmax(target_logits) || softmax(logits))``, accurate even when tiny.

  .. math::
    \mathrm{KL}(q \,\|\, p) = \sum_j q_j (\log q_j - \log p_j),
    \quad q = \mathrm{softmax}(t),\ p = \mathrm{softmax}(x)

  the forward (distillation) direction, as ``optax.kl_divergence(log_softmax(x),
  softmax(t))``. It is computed as a difference of two non-negative means that
  cancels only the divergence's own size, or as ``log1p(E_q[phi(x - t - mu)])`` where
  that difference would cost more than about 32 epsilons (see the module docs), so
  divergences down to ~1e-12 keep their relative precision in float32 where the
  textbook formula returns rounding noise. Both arguments receive
  gradients: ``dKL/dx = p - q``, ``dKL/dt = -q (x - t - E_q[x - t])``.

  Edge cases: classes with target probability 0 (``-inf`` target logits or
  masked) contribute nothing; a class with target mass and a ``-inf`` logit makes
  the divergence ``inf``. Masked examples give 0, and so does a target with no mass
  (every target logit ``-inf``), with zero gradients. A ``+inf`` logit gives NaN (as
  for the cross-entropies, a loss does not guess the limit).

  Args:
    logits: the model's logits ``[..., num_classes]`` (the distribution ``p``).
    target_logits: the target's logits, same shape (the distribution ``q``).
    axis: the class axis, or a tuple of axes.
    where: optional boolean mask per logit or per example (as in optax).
    reduction: ``"none"`` (per example), ``"mean"`` or ``"sum"``.

  Returns:
    float32 (float64 for float64 inputs) divergences, >= 0.

  Examples:
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> target = jnp.log(jnp.array([0.25, 0.75]))  # KL((1/4, 3/4) || (1/2, 1/2))
    >>> print(f"{jaxactv.kl_divergence_from_logits(jnp.zeros(2), target):.4f}")
    0.1308
  """
  check_reduction(reduction)
  logits, target_logits = as_logits(logits), as_logits(target_logits, "target_logits")
  if logits.shape != target_logits.shape:
    raise ValueError(
        f"target_logits of shape {target_logits.shape} do not match logits of shape "
        f"{logits.shape}."
    )
  layout = to_class_layout(logits, axis, where)
  counts = layout.counted()
  targets = like_logits(to_class_layout(target_logits, axis, None).logits, layout.logits)
  kl = _kl(layout.logits, targets, layout.class_mask, counts)
  return reduce_losses(kl, reduction, counts.astype(kl.dtype))


# ------------------------------------------------------------------------- entropy


def _entropy_fwd(logits, class_mask, counts):
  ct = _dtypes.loss_dtype(logits.dtype)
  x = mask_logits(logits.astype(ct), class_mask)
  big = float(jnp.finfo(ct).max)
  floor = shift_floor(ct)
  axes = (x.ndim - 1,)
  # H = log S + sum_j e_j d_j / S, e_j = exp(-d_j), d_j = max - x_j >= 0 capped at
  # about big: non-negative terms (no cancellation), and a -inf or masked logit gives
  # e_j = 0 times a finite d_j, never 0 * inf. A row with no finite logit has S = 0 and
  # H = 0; a +inf logit makes its row NaN (inf - inf in the shift).
  if soft_loss_in_separate_sweeps(logits.dtype, x.shape[-1]):
    # As the soft-label loss on long float32 rows: sweeps that share no logits-sized
    # value, so XLA:CPU writes nothing out between them (_backend).
    row_max = _row_max(x, big)
    sum_exp = reduce_rows(jnp.sum, jnp.exp(x - row_max), axes, True)
    d = jnp.minimum(jnp.maximum(row_max, -big) - x, -floor)
    log_sum = safe_log_sum(sum_exp)
    h = log_sum + reduce_rows(jnp.sum, jnp.exp(-d) * d, axes, True) / jnp.maximum(sum_exp, 1.0)
  else:
    # One kernel, as jax.nn's softmax: the max, the shift, exp and both sums.
    row_max = _row_max(x, big)
    shifted = jnp.maximum(x - row_max, floor)
    e = jnp.exp(shifted)
    sum_exp = reduce_rows(jnp.sum, e, axes, True)
    log_sum = safe_log_sum(sum_exp)
    h = reduce_rows(jnp.sum, e / jnp.maximum(sum_exp, 1.0) * (log_sum - shifted), axes, True)
  lse = row_max + jnp.log(sum_exp)  # -inf on a row with no finite logit
  # as_one_buffer: XLA:CPU would otherwise merge the row sum into a caller's mean and
  # write logits-sized pieces out for it (as in the soft-label loss).
  h = jnp.where(counts, as_one_buffer(h[..., 0]), 0.0)
  return h, (logits, class_mask, counts, lse[..., 0], h)


def _entropy_bwd(res, g):
  logits, class_mask, counts, lse, h = res
  ct = lse.dtype
  x = mask_logits(logits.astype(ct), class_mask)
  g = jnp.where(counts, g.astype(ct), 0.0)[..., None]
  log_p = x - jnp.where(lse == -jnp.inf, 0.0, lse)[..., None]
  p = jnp.exp(log_p)
  # log p is -inf where p = 0: replaced before the product (no 0 * inf computed).
  log_p = jnp.where(p > 0, log_p, 0.0)
  dx = jnp.where(p > 0, -g * p * (log_p + h[..., None]), 0.0)
  return dx.astype(logits.dtype), None, None


@jax.custom_vjp
def _entropy(logits, class_mask, counts):
  return _entropy_fwd(logits, class_mask, counts)[0]


_entropy.defvjp(_entropy_fwd, _entropy_bwd)


def entropy_from_logits(
    logits: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    reduction: str = "none",
) -> jax.Array:
  r"""Shannon entropy (in nats) of ``softmax(logits)``, with a closed-form gradient.

  .. math::
    H = -\sum_j p_j \log p_j, \qquad \frac{\partial H}{\partial x_j} = -p_j(\log p_j + H)

  Edge cases: ``-inf`` and masked logits have ``p = 0`` and contribute nothing
  (``0 log 0 = 0``), with gradient 0; masked examples give 0. A ``+inf`` logit
  gives NaN.

  Args:
    logits: ``[..., num_classes]`` floating logits.
    axis: the class axis, or a tuple of axes.
    where: optional boolean mask per logit or per example.
    reduction: ``"none"`` (per example), ``"mean"`` or ``"sum"``.

  Returns:
    float32 (float64 for float64 logits) entropies in ``[0, log num_classes]``.

  Examples:
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> logits = jnp.array([[0.0, 0.0, 0.0, 0.0], [0.0, -jnp.inf, -jnp.inf, -jnp.inf]])
    >>> print(jaxactv.entropy_from_logits(logits))  # log 4; 0 log 0 = 0
    [1.3863 0.    ]
  """
  check_reduction(reduction)
  logits = as_logits(logits)
  layout = to_class_layout(logits, axis, where)
  counts = layout.counted()
  h = _entropy(layout.logits, layout.class_mask, counts)
  return reduce_losses(h, reduction, counts.astype(h.dtype))
