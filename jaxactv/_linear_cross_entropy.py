"""Fused linear + softmax cross-entropy that never materialises the logits.

Language models and extreme multi-label classifiers spend most of their loss
memory on the ``[tokens, classes]`` logits. This op walks the tokens in chunks
with ``lax.scan`` (and, for very large vocabularies, the classes in slices within
each chunk), so the largest array it ever holds is one ``[chunk, slice]`` block.

For ``reduction="mean"``/``"sum"`` the forward pass also computes ``dx``, ``dw`` and
``db`` (as Liger-Kernel does): the total work is the three matmuls of the unfused
``x @ w`` + loss + autodiff, not four, and the backward pass only scales them by
the incoming cotangent. For ``reduction="none"`` the per-token cotangents are not
known in the forward pass, so the backward recomputes each block (four matmuls).

Accumulation is in float32 for every input dtype (float64 for float64 inputs):
the matmuls ask for float32 results, ``dw`` is summed across chunks in float32,
and the gradients are cast to the inputs' dtypes at the very end.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxactv import _dtypes
from jaxactv._cross_entropy import check_concrete_labels, check_smoothing_and_z
from jaxactv._reduction import reduce_losses
from jaxactv._validation import check_reduction
from jaxactv._vocab_parallel import VocabShards

# The chunk rule: a [rows, slice] float32 block of logits takes at most this many
# bytes; slices are the whole (local) vocabulary unless 128 rows of it would not fit.
BLOCK_BYTES = 32 * 2**20
MIN_ROWS = 128


class _Config(NamedTuple):
  label_smoothing: float
  z_loss: float
  softcap: float | None
  rows: int  # tokens per chunk
  slice_width: int  # classes per slice
  vocab_axis: str | None
  x_dtype: np.dtype  # the gradients go back in the inputs' dtypes
  w_dtype: np.dtype
  b_dtype: np.dtype | None


def default_chunks(num_tokens: int, local_classes: int) -> tuple[int, int]:
  """``(rows, slice_width)`` for ``chunk_size=None``.

  The slice is the whole local vocabulary when ``MIN_ROWS`` rows of it fit in
  ``BLOCK_BYTES`` of float32 (up to 65536 classes), else the widest multiple of 128
  classes that does. Rows then fill the block, as a multiple of 8, at most the
  number of tokens (rounded up to 8).
  """
  per_row = 4 * local_classes
  if MIN_ROWS * per_row <= BLOCK_BYTES:
    width = local_classes
  else:
    width = max(128, (BLOCK_BYTES // (4 * MIN_ROWS)) // 128 * 128)
  rows = max(8, (BLOCK_BYTES // (4 * width)) // 8 * 8)
  rows = min(rows, max(8, -(-num_tokens // 8) * 8))
  return rows, width


def _matmul(a, b, contract, ct):
  """``a . b`` contracting the given axes, accumulated (and returned) in ``ct``."""
  return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=ct)


class _Stats(NamedTuple):
  """Per-row statistics of one token chunk, over the whole (global) vocabulary."""

  row_max: jax.Array  # [rows]
  sum_exp: jax.Array  # sum of exp(z - row_max)
  z_label: jax.Array  # the label's (soft-capped) logit
  dist: jax.Array  # sum over classes of (row_max - z): the smoothing term's raw sum


def _over_slices(w, bias, width, body, carry):
  """Fold ``body(carry, lo, w_slice, bias_slice)`` over the class slices of ``w``.

  The full-width slices go through a ``fori_loop`` with dynamic slices, so XLA
  cannot hoist them out of the token loop as one copy of ``w``; a narrower last
  slice follows, statically. With one slice, ``w`` itself is the slice.
  """
  classes = w.shape[1]
  if width >= classes:
    return body(carry, 0, w, bias)
  full = classes // width

  def step(k, c):
    lo = k * width
    w_k = lax.dynamic_slice_in_dim(w, lo, width, axis=1)
    b_k = None if bias is None else lax.dynamic_slice_in_dim(bias, lo, width)
    return body(c, lo, w_k, b_k)

  carry = lax.fori_loop(0, full, step, carry)
  lo = full * width
  if lo < classes:
    carry = body(carry, lo, w[:, lo:], None if bias is None else bias[lo:])
  return carry


def _block_logits(xc, w_k, b_k, cfg, ct):
  """Soft-capped logits of one ``[rows, slice]`` block, in the compute dtype."""
  z = _matmul(xc, w_k, ((1,), (0,)), ct)
  if b_k is not None:
    z = z + b_k.astype(ct)
  if cfg.softcap is not None:
    z = cfg.softcap * jnp.tanh(z / cfg.softcap)
  return z


def _chunk_stats(xc, w, bias, yc, cfg, shards, ct):
  """One sweep over the local vocabulary: running max, sum of exp, label logit, dist.

  Returns the statistics and, when the vocabulary is one slice, that block of
  logits (for the gradient to reuse), else None.
  """
  local_idx, here = shards.local_index(yc)
  rows = xc.shape[0]
  single = cfg.slice_width >= w.shape[1]

  def fold(carry, lo, w_k, b_k):
    m, s, z_label, dist, _ = carry
    z = _block_logits(xc, w_k, b_k, cfg, ct)
    width = w_k.shape[1]
    m_new = jnp.maximum(m, jnp.max(z, -1))
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    # Rescale what was summed against the old max; exp(-inf - finite) = 0 at the start.
    s = s * jnp.exp(jnp.where(jnp.isfinite(m), m, shift) - shift)
    s = s + jnp.sum(jnp.exp(z - shift[:, None]), -1)
    if cfg.label_smoothing > 0:
      # sum_j (m_new - z_j) = sum_j (m_old - z_j) + seen * (m_new - m_old); seen = lo
      moved = jnp.where(jnp.isfinite(m), m_new - m, 0.0)
      dist = dist + lo * moved + jnp.sum(m_new[:, None] - z, -1)
    in_block = here & (local_idx >= lo) & (local_idx < lo + width)
    picked = jnp.take_along_axis(z, jnp.clip(local_idx - lo, 0, width - 1)[:, None], -1)
    z_label = jnp.where(in_block, picked[:, 0], z_label)
    return m_new, s, z_label, dist, (z if single else None)

  zeros = shards.varying(jnp.zeros((rows,), ct))
  init = (shards.varying(jnp.full((rows,), -jnp.inf, ct)), zeros, zeros, zeros, None)
  m, s, z_label, dist, block = _over_slices(w, bias, cfg.slice_width, fold, init)
  if shards.axis is not None:
    m_all = shards.pmax(m)
    s = s * jnp.exp(m - m_all)
    dist = dist + w.shape[1] * (m_all - m)
    s, z_label, dist = shards.psum((s, z_label, dist))
    m = m_all
  return _Stats(m, s, z_label, dist), block


def _row_losses(stats: _Stats, cfg, num_classes):
  """Per-row loss and the coefficient ``a`` of ``dz = g (a softmax - target)``."""
  log_sum = jnp.log(stats.sum_exp)
  lse = stats.row_max + log_sum
  eps, z = cfg.label_smoothing, cfg.z_loss
  loss = (1.0 - eps) * (log_sum - (stats.z_label - stats.row_max))
  if eps > 0:
    loss = loss + (eps / num_classes) * (num_classes * log_sum + stats.dist)
  coef = jnp.ones_like(lse)
  if z > 0:
    loss = loss + z * jnp.square(lse)
    coef = coef + 2.0 * z * lse
  return loss, lse, coef


def _block_dlogits(z, lse, coef, g, local_idx, here, lo, cfg, num_classes):
  """``g * d loss / d logits`` for one block starting at class ``lo``, through the cap."""
  eps = cfg.label_smoothing
  dz = (g * coef)[:, None] * jnp.exp(z - lse[:, None])
  if eps > 0:
    dz = dz - (g * (eps / num_classes))[:, None]
  is_label = (lo + jnp.arange(z.shape[1]) == local_idx[:, None]) & here[:, None]
  dz = dz - jnp.where(is_label, (g * (1.0 - eps))[:, None], 0.0)
  if cfg.softcap is not None:
    # d/dl [c tanh(l / c)] = 1 - tanh^2 = 1 - (z / c)^2
    dz = dz * (1.0 - jnp.square(z / cfg.softcap))
  # Select, not multiply: an ignored token with NaN hidden states must add nothing.
  return jnp.where((g != 0)[:, None], dz, 0.0)


def _chunk_grads(xc, w, bias, yc, lse, coef, g, block, cfg, shards, ct, num_classes, acc):
  """Add one token chunk's gradient to ``acc = (dw, db)``; return ``(dx_chunk, acc)``.

  ``g`` are the row cotangents; ``block`` the forward's logits when it kept them
  (one slice), else None and each block is recomputed. ``dx_chunk`` is this
  shard's partial sum over its classes.
  """
  local_idx, here = shards.local_index(yc)
  md = jnp.promote_types(xc.dtype, w.dtype)
  # Rows that do not count (ignored tokens, padding) may hold NaN hidden states: as
  # zeros they add nothing to dw (0 * NaN would add NaN to every weight).
  x_counted = jnp.where((g != 0)[:, None], xc, 0).astype(md)

  def fold(carry, lo, w_k, b_k):
    dx, dw, db = carry
    z = block if block is not None else _block_logits(xc, w_k, b_k, cfg, ct)
    dz = _block_dlogits(z, lse, coef, g, local_idx, here, lo, cfg, num_classes)
    # The matmuls take their operands in the inputs' dtype (bf16 runs at bf16 speed)
    # and accumulate in the compute dtype.
    dz_m = dz.astype(md)
    dx = dx + _matmul(dz_m, w_k, ((1,), (1,)), ct)
    dw_k = _matmul(x_counted, dz_m, ((0,), (0,)), ct)
    dw = lax.dynamic_update_slice_in_dim(
        dw, lax.dynamic_slice_in_dim(dw, lo, dw_k.shape[1], axis=1) + dw_k, lo, axis=1
    )
    if db is not None:
      db_k = jnp.sum(dz, 0)
      db = lax.dynamic_update_slice_in_dim(
          db, lax.dynamic_slice_in_dim(db, lo, db_k.shape[0]) + db_k, lo, axis=0
      )
    return dx, dw, db

  dx = shards.varying(jnp.zeros(xc.shape, ct))
  dx, dw, db = _over_slices(w, bias, cfg.slice_width, fold, (dx, *acc))
  return dx, (dw, db)


def _scan_chunks(x2, w, bias, labels, counts, cfg, with_grad, g_rows=None, saved=None):
  """Walk the token chunks. Returns per-row (loss, lse, coef) and, with_grad, (dx, dw, db).

  ``g_rows`` are per-row cotangents (the ``"none"`` backward); without them the
  gradient is that of the plain sum of the counted rows' losses. ``saved`` is the
  forward's per-row ``(lse, coef)`` for a backward pass that needs no statistics.
  """
  ct = _dtypes.compute_dtype(jnp.promote_types(x2.dtype, w.dtype))
  shards = VocabShards(cfg.vocab_axis, w.shape[1], sharded=w)
  num_classes = shards.num_classes
  rows = cfg.rows
  chunks = x2.shape[0] // rows
  split = lambda a: a.reshape((chunks, rows, *a.shape[1:]))
  in_range = (labels >= 0) & (labels < num_classes)
  # Out-of-range labels cannot raise under jit: that row's loss and gradient are NaN.
  scale = jnp.where(counts, jnp.where(in_range, 1.0, jnp.nan), 0.0).astype(ct)
  if g_rows is not None:
    scale = scale * shards.full_cotangent(g_rows.astype(ct))
  xs = [split(x2), split(labels), split(scale)]
  if saved is not None:
    xs += [split(saved[0]), split(saved[1])]

  def body(carry, inputs):
    xc, yc, sc = inputs[:3]
    if saved is None:
      stats, block = _chunk_stats(xc, w, bias, yc, cfg, shards, ct)
      loss, lse, coef = _row_losses(stats, cfg, num_classes)
      # 0 where the row does not count; NaN (from sc) where its label is out of range.
      loss = jnp.where(sc == 0, 0.0, jnp.where(jnp.isnan(sc), jnp.nan, loss))
    else:
      lse, coef = inputs[3:]
      loss, block = jnp.zeros_like(lse), None
    if not with_grad:
      return carry, (loss, lse, coef)
    dx, carry = _chunk_grads(
        xc, w, bias, yc, lse, coef, sc, block, cfg, shards, ct, num_classes, carry
    )
    return carry, (loss, lse, coef, dx)

  init: Any = None
  if with_grad:
    # zeros_like keeps the operands' sharding type inside shard_map.
    init = (jnp.zeros_like(w, ct), None if bias is None else jnp.zeros_like(bias, ct))
  carry, outs = lax.scan(body, init, tuple(xs))
  flat = [o.reshape((-1, *o.shape[2:])) for o in outs]
  if not with_grad:
    return tuple(flat), None
  # Every vocabulary shard holds part of each token's dx: at most one psum for all.
  dx = shards.replicated_cotangent(flat[3])
  return tuple(flat[:3]), (dx, *carry)


# --------------------------------------------------------------- the two custom_vjps


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _summed(x2, w, bias, labels, counts, cfg):
  (loss, _, _), _ = _scan_chunks(x2, w, bias, labels, counts, cfg, with_grad=False)
  return jnp.sum(loss)


def _summed_fwd(x2, w, bias, labels, counts, cfg):
  (loss, _, _), grads = _scan_chunks(x2, w, bias, labels, counts, cfg, with_grad=True)
  # Residuals: dx, dw, db, the size of the inputs (not of the logits).
  return jnp.sum(loss), grads


def _summed_bwd(cfg, grads, g):
  dx, dw, db = grads
  g = VocabShards(cfg.vocab_axis, dw.shape[1], sharded=dw).full_cotangent(g.astype(dx.dtype))
  db = None if db is None else (g * db).astype(cfg.b_dtype)
  return (g * dx).astype(cfg.x_dtype), (g * dw).astype(cfg.w_dtype), db, None, None


_summed.defvjp(_summed_fwd, _summed_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _per_token(x2, w, bias, labels, counts, cfg):
  (loss, _, _), _ = _scan_chunks(x2, w, bias, labels, counts, cfg, with_grad=False)
  return loss


def _per_token_fwd(x2, w, bias, labels, counts, cfg):
  (loss, lse, coef), _ = _scan_chunks(x2, w, bias, labels, counts, cfg, with_grad=False)
  return loss, (x2, w, bias, labels, counts, lse, coef)


def _per_token_bwd(cfg, res, g):
  x2, w, bias, labels, counts, lse, coef = res
  _, (dx, dw, db) = _scan_chunks(
      x2, w, bias, labels, counts, cfg, with_grad=True, g_rows=g, saved=(lse, coef)
  )
  db = None if db is None else db.astype(cfg.b_dtype)
  return dx.astype(cfg.x_dtype), dw.astype(cfg.w_dtype), db, None, None


_per_token.defvjp(_per_token_fwd, _per_token_bwd)


# ----------------------------------------------------------------------- public


def linear_softmax_cross_entropy(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: str = "mean",
    chunk_size: int | tuple[int, int] | None = None,
    vocab_axis: str | None = None,
) -> jax.Array:
  r"""Softmax cross-entropy of ``x @ w (+ bias)`` without ever forming the logits.

  Equal to ``softmax_cross_entropy_with_integer_labels(x @ w + bias, labels, ...)``
  (PyTorch's semantics for ``ignore_index`` and ``label_smoothing``; ``z_loss``
  adds ``z * logsumexp**2``), but the ``[tokens, classes]`` logits exist only one
  ``[chunk, slice]`` block at a time. ``logit_softcap=c`` applies Gemma 2's
  ``c * tanh(logits / c)`` before the softmax, with its chain-rule factor
  ``1 - tanh^2`` in the gradient.

  Work: for ``"mean"``/``"sum"`` the forward pass computes the gradients too, so
  value-and-grad costs the three matmuls of the unfused version; a forward pass
  alone (no differentiation) costs one. ``"none"`` costs four under
  differentiation. Memory: ``O(chunk * slice)`` for the blocks, plus ``dw`` in
  float32 and ``dx``.

  Chunking (``chunk_size=None``): a block of float32 logits takes at most
  ``BLOCK_BYTES`` (32 MiB). The slice is the whole vocabulary when 128 rows of it
  fit (up to 65536 classes), otherwise the widest multiple of 128 classes that
  does; the rows then fill the block, as a multiple of 8. An int ``chunk_size``
  sets the rows (the slice stays the whole vocabulary); a pair ``(rows, slice)``
  sets both. Tokens are padded to a whole number of chunks; padded rows count for
  nothing. A last, narrower slice is used as it is: no padded class ever enters a
  softmax.

  Args:
    x: ``[..., D]`` hidden states (any float dtype; bfloat16 is the usual case).
    w: ``[D, V]`` classifier weights (inside ``shard_map`` with ``vocab_axis``: this
      device's contiguous ``[D, V / shards]`` slice).
    labels: integer class ids of shape ``x.shape[:-1]`` (global ids).
    bias: optional ``[V]`` bias (the local slice with ``vocab_axis``).
    ignore_index: a label value whose tokens are ignored (loss 0, no gradient,
      left out of the mean).
    label_smoothing: ``eps`` in ``[0, 1]``, spread uniformly over all ``V``
      classes (over the global vocabulary when sharded).
    z_loss: coefficient of the ``logsumexp**2`` auxiliary term.
    logit_softcap: ``c > 0`` or None.
    reduction: ``"mean"`` (default, over the counted tokens), ``"sum"`` or
      ``"none"``.
    chunk_size: None, rows per chunk, or ``(rows, classes per slice)``.
    vocab_axis: inside ``jax.shard_map``, the mesh axis over which ``w``'s class
      dimension (and ``bias``) is split; row maxima are combined with ``pmax``, the
      sums with one ``psum``, ``dx`` with one ``psum``. Never gathered.

  Returns:
    float32 (float64 for float64 inputs) loss: a scalar, or ``x.shape[:-1]``.

  Examples:
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> x, w = jnp.ones((3, 2)), jnp.zeros((2, 4))  # all logits 0: each loss is log 4
    >>> labels = jnp.array([0, 3, -100])
    >>> loss = jaxactv.linear_softmax_cross_entropy(x, w, labels, ignore_index=-100)
    >>> print(f"{loss:.4f}")  # the mean over the two counted tokens
    1.3863
  """
  check_reduction(reduction)
  check_smoothing_and_z(label_smoothing, z_loss)
  x, w = jnp.asarray(x), jnp.asarray(w)
  for name, a in (("x", x), ("w", w)):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise TypeError(f"{name} must be a floating array; got dtype {a.dtype}.")
  if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[0]:
    raise ValueError(
        f"x of shape {x.shape} and w of shape {w.shape} do not fit: x must be [..., D] "
        "and w [D, V] with the same D."
    )
  labels_in, labels = labels, jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integer class ids; got dtype {labels.dtype}.")
  if labels.shape != x.shape[:-1]:
    raise ValueError(
        f"labels of shape {labels.shape} do not match x of shape {x.shape}: they must "
        f"have x's leading shape {x.shape[:-1]}."
    )
  if bias is not None:
    bias = jnp.asarray(bias)
    if bias.shape != (w.shape[1],):
      raise ValueError(f"bias must have shape ({w.shape[1]},) to match w {w.shape}; "
                       f"got {bias.shape}.")
  if logit_softcap is not None:
    if isinstance(logit_softcap, jax.core.Tracer) or not float(logit_softcap) > 0:
      raise ValueError(f"logit_softcap must be a positive Python float or None; "
                       f"got {logit_softcap!r}.")
    logit_softcap = float(logit_softcap)
  VocabShards(vocab_axis, w.shape[1])  # outside shard_map, a vocab_axis fails here, clearly
  if vocab_axis is None:
    check_concrete_labels(labels_in, w.shape[1], ignore_index)

  num_tokens = math.prod(x.shape[:-1])
  rows, width = _chunk_sizes(chunk_size, num_tokens, w.shape[1])
  x2 = x.reshape(num_tokens, x.shape[-1])
  flat_labels = labels.reshape(num_tokens)
  counts = jnp.ones((num_tokens,), bool) if ignore_index is None else flat_labels != ignore_index
  pad = -num_tokens % rows
  if pad:
    x2 = jnp.pad(x2, ((0, pad), (0, 0)))
    flat_labels = jnp.pad(flat_labels, (0, pad))
    counts = jnp.pad(counts, (0, pad))
  cfg = _Config(
      float(label_smoothing), float(z_loss), logit_softcap, rows, width, vocab_axis,
      x.dtype, w.dtype, None if bias is None else bias.dtype,
  )
  if reduction == "none":
    losses = _per_token(x2, w, bias, flat_labels, counts, cfg)
    return losses[:num_tokens].reshape(x.shape[:-1])
  total = _summed(x2, w, bias, flat_labels, counts, cfg)
  if reduction == "sum":
    return total
  return reduce_losses(total[None], "mean", jnp.sum(counts)[None].astype(total.dtype))


def _chunk_sizes(chunk_size, num_tokens: int, classes: int) -> tuple[int, int]:
  if chunk_size is None:
    return default_chunks(num_tokens, classes)
  if isinstance(chunk_size, (int, np.integer)) and not isinstance(chunk_size, bool):
    rows, width = int(chunk_size), classes
  elif (
      isinstance(chunk_size, tuple)
      and len(chunk_size) == 2
      and all(isinstance(c, (int, np.integer)) for c in chunk_size)
  ):
    rows, width = (int(c) for c in chunk_size)
  else:
    raise TypeError(f"chunk_size must be None, an int or a pair of ints; got {chunk_size!r}.")
  if rows < 1 or width < 1:
    raise ValueError(f"chunk_size must be >= 1 (rows and classes); got {chunk_size!r}.")
  return rows, min(width, classes)
