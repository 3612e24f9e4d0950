"""Plain twins of jaxactv's ops, differentiated by ordinary JAX autodiff.

Every function here has the same signature and, on finite inputs, the same values
as its namesake in :mod:`jaxactv`, but is written as the textbook formula with no
custom gradient rule. Two uses:

* Pure forward-mode autodiff. A ``jax.custom_vjp`` rule cannot be pushed forward,
  so ``jax.jvp``, ``jax.jacfwd`` and ``jax.linearize`` of a jaxactv op itself raise
  (forward-over-reverse, ``jax.hessian`` and ``jax.jvp`` of ``jax.grad``, works on
  the fast ops). Call the twin instead:
  ``jax.jacfwd(jaxactv.reference.softmax)(x)``.
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

from jaxactv import _dtypes
from jaxactv._validation import Axis, canonical_axes, check_reduction

__all__ = [
    "entropy_from_logits",
    "kl_divergence_from_logits",
    "linear_log_probs",
    "linear_softmax_cross_entropy",
    "log_sigmoid",
    "log_softmax",
    "logmeanexp",
    "logsumexp",
    "sigmoid",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]


def _float(x: ArrayLike) -> jax.Array:
  x = jnp.asarray(x)
  return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))


def sigmoid(x: ArrayLike) -> jax.Array:
  """``1 / (1 + exp(-x))``, written so that neither branch overflows."""
  x = _float(x)
  e = jnp.exp(-jnp.abs(x))
  return jnp.where(x >= 0, 1 / (1 + e), e / (1 + e))


def log_sigmoid(x: ArrayLike) -> jax.Array:
  """``log(sigmoid(x)) = -log(1 + exp(-x))``, via ``jnp.logaddexp`` (stable, exact at 0)."""
  return -jnp.logaddexp(0.0, -_float(x))


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
    a: ArrayLike,
    axis: Axis = None,
    b: ArrayLike | None = None,
    keepdims: bool = False,
    return_sign: bool = False,
    where: ArrayLike | None = None,
):
  """``max + log|sum(b * exp(a - max))|`` over ``axis``; masked entries and ``b == 0`` left out."""
  x = _float(a)
  axes = canonical_axes(axis, x.ndim, allow_empty=True)
  keep = where
  if b is not None:
    b = jnp.asarray(b).astype(x.dtype)
    keep = b != 0 if where is None else jnp.asarray(where) & (b != 0)
  masked = x if keep is None else jnp.where(keep, x, -jnp.inf)
  m = lax.stop_gradient(jnp.max(masked, axes, keepdims=True, initial=-jnp.inf))
  m = jnp.where(jnp.isfinite(m), m, 0)
  e = jnp.exp(masked - m)
  s = jnp.sum(e if b is None else e * b, axes, keepdims=True)
  out, sign = m + jnp.log(jnp.abs(s)), jnp.sign(s)
  if not keepdims:
    out, sign = jnp.squeeze(out, axes), jnp.squeeze(sign, axes)
  if return_sign:
    return out, sign
  return out if b is None else jnp.where(sign < 0, jnp.nan, out)


def logmeanexp(
    x: ArrayLike, axis: Axis = None, where: ArrayLike | None = None, keepdims: bool = False
) -> jax.Array:
  """``logsumexp(x) - log(n)``, ``n`` the number of entries ``where`` keeps."""
  x = _float(x)
  axes = canonical_axes(axis, x.ndim, allow_empty=True)
  keep = jnp.ones(x.shape, bool) if where is None else jnp.broadcast_to(where, x.shape)
  n = jnp.sum(keep, axes, keepdims=keepdims).astype(x.dtype)
  return logsumexp(x, axis, keepdims=keepdims, where=where) - jnp.log(n)


# ------------------------------------------------------------------------ losses
#
# Textbook twins of the fused losses: log-probabilities first, then the formula.
# Masks, ignore_index, class weights, smoothing, z-loss and reductions follow the
# same rules as the fused ops (PyTorch's for weights, smoothing and ignore_index).


def _reduce(losses, reduction, weights):
  check_reduction(reduction)
  if reduction == "none":
    return losses
  if reduction == "sum":
    return jnp.sum(losses)
  denom = jnp.sum(weights)
  # A mean over no weight is 0 by definition (PyTorch: NaN).
  return jnp.where(denom == 0, 0.0, jnp.sum(losses) / jnp.where(denom == 0, 1.0, denom))


def _classes_last(a, axis):
  """``a`` with the class axes moved to the end (order kept) and flattened into one."""
  axes = canonical_axes(axis, a.ndim)
  a = jnp.moveaxis(a, axes, tuple(range(a.ndim - len(axes), a.ndim)))
  return a.reshape((*a.shape[: a.ndim - len(axes)], -1))


def _split_mask(logits, axis, where):
  """``(x, valid, counted)``: logits ``[*batch, K]``, the classes that take part
  (``[*batch, K]``), and the examples that count (``[*batch]``), from optax's ``where``:
  a per-logit mask has the logits' rank, a per-example mask the batch's."""
  x = _classes_last(logits, axis)
  valid = jnp.ones(x.shape, bool)
  counted = jnp.ones(x.shape[:-1], bool)
  if where is not None:
    where = jnp.asarray(where)
    if where.ndim == logits.ndim:
      valid = _classes_last(jnp.broadcast_to(where, logits.shape), axis)
    else:
      counted = jnp.broadcast_to(where, counted.shape)
  return x, valid, counted & jnp.any(valid, -1)


def _loss_float(x):
  x = jnp.asarray(x)
  return x.astype(_dtypes.compute_dtype(x.dtype))


def _class_ids(labels):
  """Integer labels, at least int32: in a narrower dtype the class count could wrap."""
  labels = jnp.asarray(labels)
  return labels.astype(jnp.int32) if labels.dtype.itemsize < 4 else labels


def softmax_cross_entropy_with_integer_labels(
    logits, labels, axis=-1, where=None, *, ignore_index=None, label_smoothing=0.0,
    class_weights=None, z_loss=0.0, reduction="none", vocab_axis=None, check_labels=False,
):
  """``-(1-eps) w_y log p_y - (eps/K) sum_j w_j log p_j + z lse^2``, unfused.

  ``check_labels`` is accepted for the fused op's signature and does nothing here.
  """
  del check_labels
  logits = _loss_float(logits)
  labels = _class_ids(labels)
  if vocab_axis is not None:  # gather the vocabulary: obviously right, never fast
    logits = lax.all_gather(logits, vocab_axis, axis=logits.ndim - 1, tiled=True)
    if class_weights is not None:
      class_weights = lax.all_gather(jnp.asarray(class_weights), vocab_axis, tiled=True)
  x, valid, counts = _split_mask(logits, axis, where)
  k = x.shape[-1]
  logp = log_softmax(x, where=valid)
  w = jnp.ones((k,), x.dtype) if class_weights is None else _loss_float(class_weights)
  safe = jnp.clip(labels, 0, k - 1)
  logp_y = jnp.take_along_axis(logp, safe[..., None], -1)[..., 0]
  w_y = w[safe]
  loss = -(1 - label_smoothing) * w_y * logp_y
  if label_smoothing:
    n_valid = jnp.sum(valid, -1)
    loss += -(label_smoothing / n_valid) * jnp.sum(jnp.where(valid, w * logp, 0.0), -1)
  if z_loss:
    loss += z_loss * logsumexp(x, -1, where=valid) ** 2
  if ignore_index is not None:
    counts &= labels != ignore_index
  in_range = (labels >= 0) & (labels < k)
  loss = jnp.where(counts, jnp.where(in_range, loss, jnp.nan), 0.0)
  return _reduce(loss, reduction, jnp.where(counts, w_y, 0.0))


def softmax_cross_entropy(
    logits, labels, axis=-1, where=None, *, label_smoothing=0.0, z_loss=0.0, reduction="none"
):
  """``-sum_j t_j log softmax(x)_j + z lse^2`` with ``t = (1-eps) y + eps/K``, unfused."""
  logits = _loss_float(logits)
  x, valid, counts = _split_mask(logits, axis, where)
  t = _classes_last(_loss_float(labels), axis)
  if label_smoothing:
    n_valid = jnp.sum(valid, -1, keepdims=True)
    t = (1 - label_smoothing) * t + label_smoothing / n_valid
  logp = log_softmax(x, where=valid)
  loss = -jnp.sum(jnp.where(valid, t * logp, 0.0), -1)
  if z_loss:
    loss += z_loss * logsumexp(x, -1, where=valid) ** 2
  loss = jnp.where(counts, loss, 0.0)
  return _reduce(loss, reduction, counts)


def sigmoid_binary_cross_entropy(
    logits, labels, *, where=None, pos_weight=None, label_smoothing=0.0, reduction="none"
):
  """``-p y log sigmoid(x) - (1 - y) log(1 - sigmoid(x))``, unfused."""
  x = _loss_float(logits)
  y = jnp.asarray(labels).astype(x.dtype)
  if label_smoothing:
    y = (1 - label_smoothing) * y + label_smoothing / 2
  p = 1.0 if pos_weight is None else jnp.asarray(pos_weight).astype(x.dtype)
  loss = -p * y * log_sigmoid(x) - (1 - y) * log_sigmoid(-x)
  mask = jnp.ones(x.shape, bool) if where is None else jnp.broadcast_to(where, x.shape)
  return _reduce(jnp.where(mask, loss, 0.0), reduction, mask)


def sigmoid_focal_loss(logits, labels, alpha=None, gamma=2.0, *, where=None, reduction="none"):
  """``alpha_t (1 - p_t)^gamma BCE(x, y)``, unfused."""
  x = _loss_float(logits)
  y = jnp.asarray(labels).astype(x.dtype)
  p = sigmoid(x)
  ce = sigmoid_binary_cross_entropy(x, y)
  one_minus_pt = y * (1 - p) + (1 - y) * p
  loss = one_minus_pt**gamma * ce
  if alpha is not None:
    loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
  mask = jnp.ones(x.shape, bool) if where is None else jnp.broadcast_to(where, x.shape)
  return _reduce(jnp.where(mask, loss, 0.0), reduction, mask)


def kl_divergence_from_logits(logits, target_logits, axis=-1, where=None, *, reduction="none"):
  """``sum_j q_j (log q_j - log p_j)`` with ``q = softmax(t)``, ``p = softmax(x)``, unfused."""
  x, valid, counts = _split_mask(_loss_float(logits), axis, where)
  t = _classes_last(_loss_float(target_logits), axis)
  logq, logp = log_softmax(t, where=valid), log_softmax(x, where=valid)
  q = jnp.exp(logq)
  kl = jnp.sum(jnp.where(valid & (q > 0), q * (logq - logp), 0.0), -1)
  return _reduce(jnp.where(counts, kl, 0.0), reduction, counts)


def entropy_from_logits(logits, axis=-1, where=None, *, reduction="none"):
  """``-sum_j p_j log p_j`` with ``p = softmax(x)``, unfused."""
  x, valid, counts = _split_mask(_loss_float(logits), axis, where)
  logp = log_softmax(x, where=valid)
  h = -jnp.sum(jnp.where(valid & (logp > -jnp.inf), jnp.exp(logp) * logp, 0.0), -1)
  return _reduce(jnp.where(counts, h, 0.0), reduction, counts)


def _linear_logits(x, w, bias, temperature, logit_softcap, vocab_axis):
  """``cap((x @ w + bias) / T)`` in full, in float32 (float64 for float64 inputs)."""
  x, w = jnp.asarray(x), jnp.asarray(w)
  ct = jnp.promote_types(jnp.promote_types(x.dtype, w.dtype), jnp.float32)
  if vocab_axis is not None:  # gather the vocabulary: obviously right, never fast
    w = lax.all_gather(w, vocab_axis, axis=1, tiled=True)
    if bias is not None:
      bias = lax.all_gather(jnp.asarray(bias), vocab_axis, tiled=True)
  logits = jnp.einsum("...d,dv->...v", x, w, preferred_element_type=ct)
  if bias is not None:
    logits = logits + jnp.asarray(bias).astype(ct)
  logits = logits / temperature
  if logit_softcap is not None:
    logits = logit_softcap * jnp.tanh(logits / logit_softcap)
  return logits


def linear_softmax_cross_entropy(
    x, w, labels, *, bias=None, where=None, weights=None, class_weights=None,
    ignore_index=None, label_smoothing=0.0, z_loss=0.0, logit_softcap=None, temperature=1.0,
    reduction="mean", return_aux=False, chunk_size=None, vocab_axis=None,
):
  """``cap((x @ w + bias) / T)``, then the integer-label cross-entropy: the unfused version.

  Token ``weights`` multiply each loss; the mean divides by the summed
  ``weights * class_weights[label]`` of the counted tokens. ``chunk_size`` is
  accepted and ignored: the twin forms all the logits at once.
  """
  del chunk_size
  logits = _linear_logits(x, w, bias, temperature, logit_softcap, vocab_axis)
  labels = _class_ids(labels)
  k = logits.shape[-1]
  if class_weights is None:
    cw = jnp.ones((k,), logits.dtype)
  else:
    cw = jnp.asarray(class_weights).astype(logits.dtype)
    if vocab_axis is not None:
      cw = lax.all_gather(cw, vocab_axis, tiled=True)
  logp = log_softmax(logits)
  safe = jnp.clip(labels, 0, k - 1)
  w_y = cw[safe]
  loss = -(1 - label_smoothing) * w_y * jnp.take_along_axis(logp, safe[..., None], -1)[..., 0]
  loss = loss - (label_smoothing / k) * jnp.sum(cw * logp, -1)
  lse = logsumexp(logits, -1)
  z_term = z_loss * lse**2
  counts = jnp.ones(labels.shape, bool)
  if where is not None:
    counts = counts & jnp.asarray(where)
  if ignore_index is not None:
    counts = counts & (labels != ignore_index)
  u = jnp.ones((), logits.dtype) if weights is None else jnp.asarray(weights, logits.dtype)
  in_range = (labels >= 0) & (labels < k)
  loss = jnp.where(counts, jnp.where(in_range, u * (loss + z_term), jnp.nan), 0.0)
  denom = jnp.where(counts, u * w_y, 0.0)
  out = _reduce(loss, reduction, denom)
  if not return_aux:
    return out
  from jaxactv._linear_cross_entropy import LinearCrossEntropyAux

  z_term = _reduce(jnp.where(counts, u * z_term, 0.0), reduction, denom)
  aux = LinearCrossEntropyAux(lse, jnp.argmax(logits, -1).astype(jnp.int32), z_term)
  return out, lax.stop_gradient(aux)


def linear_log_probs(
    x, w, tokens, *, bias=None, temperature=1.0, logit_softcap=None, where=None,
    return_entropy=False, chunk_size=None, vocab_axis=None,
):
  """``log_softmax(cap((x @ w + bias) / T))[token]`` (and the entropy), unfused."""
  del chunk_size
  logits = _linear_logits(x, w, bias, temperature, logit_softcap, vocab_axis)
  tokens = _class_ids(tokens)
  k = logits.shape[-1]
  logp = log_softmax(logits)
  safe = jnp.clip(tokens, 0, k - 1)
  out = jnp.take_along_axis(logp, safe[..., None], -1)[..., 0]
  ent = -jnp.sum(jnp.exp(logp) * logp, -1)
  keep = jnp.ones(tokens.shape, bool) if where is None else jnp.asarray(where)
  bad = (tokens < 0) | (tokens >= k)
  fix = lambda a: jnp.where(keep, jnp.where(bad, jnp.nan, a), 0.0)
  if return_entropy:
    return fix(out), fix(ent)
  return fix(out)
