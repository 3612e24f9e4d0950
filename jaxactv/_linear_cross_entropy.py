"""Fused linear + softmax cross-entropy that never materialises the logits.

Language models and extreme multi-label classifiers spend most of their loss
memory on the ``[tokens, classes]`` logits. This op walks the tokens in chunks
with ``lax.scan`` (and, for very large vocabularies or hidden sizes, the classes in
slices within each chunk), so the largest arrays it ever holds are one
``[chunk, slice]`` block of logits and one ``[D, slice]`` slice of ``w``
(``jaxactv._linear_blocks`` holds the chunk rule and the machinery it shares with
``linear_log_probs``).

For ``reduction="mean"``/``"sum"`` the forward pass also computes ``dx``, ``dw`` and
``db`` (as Liger-Kernel does). Where a chunk's logits over the whole vocabulary fit
the kept-block budget, they are made by one matmul, held, and swept for the gradient
a slice at a time (so ``dz`` exists one slice at a time): the total work is the three
matmuls of the unfused ``x @ w`` + loss + autodiff, and the backward pass only scales
the gradients by the incoming cotangent. Otherwise, and for ``reduction="none"``
(whose per-token cotangents the forward pass does not know), each block is
recomputed for the gradient (four matmuls).

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
from jaxactv._backend import upcast_half_matmul_operands
from jaxactv._cross_entropy import check_concrete_labels, check_smoothing_and_z
from jaxactv._linear_blocks import (
    BLOCK_BYTES as BLOCK_BYTES,
)
from jaxactv._linear_blocks import (
    Chunks,
    LogitsSpec,
    Tokens,
    block_logits,
    chunk_sizes,
    classes_sharded,
    grad_accumulators,
    grad_sweep,
    is_label,
    kept_chunks,
    label_value,
    like_classes,
    like_tokens,
    over_slices,
    put_chunk,
    row_zeros,
    scan_chunks,
    take_chunk,
    token_shards,
)
from jaxactv._linear_blocks import (
    default_chunks as default_chunks,
)
from jaxactv._reduction import reduce_losses
from jaxactv._validation import as_bool, as_class_ids, check_reduction
from jaxactv._vocab_parallel import VocabShards, cotangent_like, vary_like


class LinearCrossEntropyAux(NamedTuple):
  """Per-token monitors of ``linear_softmax_cross_entropy(..., return_aux=True)``.

  They carry no gradient: they are computed in the same pass as the loss and held
  as constants (``lax.stop_gradient``); differentiate the loss itself.

  Attributes:
    lse: float32 ``[*labels.shape]``, the logsumexp of the final logits
      (``cap((x @ w + bias) / T)``), for every token, counted or not.
    argmax: int32 ``[*labels.shape]``, the predicted class as a global id (the
      lowest index on ties), for every token.
    z_loss: the z-loss term ``z_loss * lse**2`` alone, weighted and reduced like
      the loss (0 when ``z_loss=0``).
  """

  lse: jax.Array
  argmax: jax.Array
  z_loss: jax.Array


class _Config(NamedTuple):
  label_smoothing: float
  z_loss: float
  logits: LogitsSpec
  chunks: Chunks  # the forward pass alone, and every pass of "none"
  grad_chunks: Chunks  # the forward pass that computes the gradient too
  vocab_axis: str | None
  aux: bool  # also track each row's argmax
  x_dtype: np.dtype  # the gradients go back in the inputs' dtypes
  w_dtype: np.dtype
  b_dtype: np.dtype | None


class _Stats(NamedTuple):
  """Per-row statistics of one token chunk, over the whole (global) vocabulary."""

  row_max: jax.Array  # [rows]
  sum_exp: jax.Array  # sum of exp(z - row_max)
  z_label: jax.Array  # the label's final logit
  dist: jax.Array | None  # sum over classes of w_j (row_max - z_j): the smoothing sum
  w_label: jax.Array | None  # the label's class weight
  argmax: jax.Array | None  # global id of the largest logit


def _chunk_stats(xc, w, bias, cw, yc, cfg, chunks, shards, ct):
  """One sweep over the local vocabulary: running max, sum of exp, label logit, dist.

  Returns the statistics and, when ``chunks`` keeps the logits, that block of
  logits over the local vocabulary (for the gradient to reuse), else None.
  """
  local_idx, here = shards.local_index(yc)
  single = chunks.kept
  smooth = cfg.label_smoothing > 0

  def fold(carry, lo, w_k, cls_k):
    m, s, z_label, dist, seen, w_label, amax, _ = carry
    b_k, cw_k = cls_k
    z = block_logits(xc, w_k, b_k, cfg.logits, ct)
    block_max = jnp.max(z, -1)
    m_new = jnp.maximum(m, block_max)
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    # Rescale what was summed against the old max; exp(-inf - finite) = 0 at the start.
    s = s * jnp.exp(jnp.where(jnp.isfinite(m), m, shift) - shift)
    s = s + jnp.sum(jnp.exp(z - shift[:, None]), -1)
    if smooth:
      # sum_j w_j (m_new - z_j) = sum_j w_j (m_old - z_j) + (sum of w seen) (m_new - m_old)
      moved = jnp.where(jnp.isfinite(m), m_new - m, 0.0)
      below = m_new[:, None] - z
      if cw_k is None:
        dist = dist + lo * moved + jnp.sum(below, -1)
      else:
        dist = dist + seen * moved + jnp.sum(cw_k.astype(ct) * below, -1)
        seen = seen + jnp.sum(cw_k.astype(ct))
    z_label = z_label + label_value(z, lo, local_idx, here)
    if cw_k is not None:
      w_label = w_label + label_value(
          jnp.broadcast_to(cw_k.astype(ct), z.shape), lo, local_idx, here
      )
    if cfg.aux:
      # Strictly greater: on a tie the earlier (lower) class keeps the argmax.
      arg = lo + jnp.argmax(z, -1).astype(jnp.int32)
      amax = jnp.where(block_max > m, arg, amax)
    return m_new, s, z_label, dist, seen, w_label, amax, (z if single else None)

  zeros = row_zeros(xc, ct, w, bias, cw)
  weighted = cw is not None
  init = (
      zeros - jnp.inf, zeros, zeros,
      zeros if smooth else None,
      vary_like(jnp.zeros((), ct), cw) if smooth and weighted else None,
      zeros if weighted else None,
      row_zeros(xc, jnp.int32, w, bias, cw) if cfg.aux else None,
      None,
  )
  m, s, z_label, dist, _, w_label, amax, block = over_slices(
      w, (bias, cw), w.shape[1] if single else chunks.width, fold, init
  )
  if shards.axis is not None:
    m_all = shards.pmax(m)
    s = s * jnp.exp(m - m_all)
    if smooth:
      local_weight = w.shape[1] if cw is None else jnp.sum(cw.astype(ct))
      dist = dist + local_weight * (m_all - m)
    sums = shards.psum(tuple(a for a in (s, z_label, dist, w_label) if a is not None))
    s, z_label, sums = sums[0], sums[1], list(sums[2:])
    dist = sums.pop(0) if smooth else None
    w_label = sums.pop(0) if weighted else None
    if cfg.aux:
      # The lowest global id among the shards that hold the global max.
      big = jnp.iinfo(jnp.int32).max
      amax = lax.pmin(jnp.where(m == m_all, amax + shards.offset, big), shards.axis)
    m = m_all
  return _Stats(m, s, z_label, dist, w_label, amax), block


def _row_losses(stats: _Stats, cfg, num_classes, weight_total):
  """Per-row loss, lse, and the coefficient ``a`` of ``dz = g (a softmax - target)``."""
  log_sum = jnp.log(stats.sum_exp)
  lse = stats.row_max + log_sum
  eps, z = cfg.label_smoothing, cfg.z_loss
  w_y = 1.0 if stats.w_label is None else stats.w_label
  # -log p_label = log_sum - (z_label - max): small numbers, no cancellation.
  loss = (1.0 - eps) * w_y * (log_sum - (stats.z_label - stats.row_max))
  coef = (1.0 - eps) * w_y * jnp.ones_like(lse)
  if eps > 0:
    # (eps / K) sum_j w_j (lse - z_j) = (eps / K) (W log_sum + sum_j w_j (max - z_j))
    loss = loss + (eps / num_classes) * (weight_total * log_sum + stats.dist)
    coef = coef + (eps / num_classes) * weight_total
  if z > 0:
    loss = loss + z * jnp.square(lse)
    coef = coef + 2.0 * z * lse
  return loss, lse, coef


def _ce_dlogits(lse, coef, w_y, g, local_idx, here, cfg, num_classes):
  """``dlogits(z, lo, (bias_k, cw_k))``: ``g * d loss / d z`` for one block."""
  eps = cfg.label_smoothing

  def dlogits(z, lo, cls_k):
    cw_k = cls_k[1]
    dz = (g * coef)[:, None] * jnp.exp(z - lse[:, None])
    if eps > 0:
      spread = (g * (eps / num_classes))[:, None]
      dz = dz - (spread if cw_k is None else spread * cw_k.astype(dz.dtype))
    at_label = g * (1.0 - eps) * (1.0 if w_y is None else w_y)
    return dz - jnp.where(is_label(z, lo, local_idx, here), at_label[:, None], 0.0)

  return dlogits


def _weight_total(cw, shards, ct):
  """``sum_j w_j`` over the global vocabulary (``K`` without class weights)."""
  if cw is None:
    return shards.num_classes
  return shards.psum((jnp.sum(cw.astype(ct)),))[0]


def _scan(x2, w, bias, cw, labels, sc, cfg, with_grad, saved=None):
  """Walk the token chunks.

  Returns per-row ``(loss, lse, coef, w_label, argmax)`` (None where not tracked) and,
  with_grad, the partial ``(dx, dw, db)``. ``sc`` are the per-row cotangents: the
  token weights (0 where a row does not count, NaN where its label is out of range),
  times the caller's cotangents in the ``"none"`` backward. ``saved`` is the
  forward's per-row ``(lse, coef, w_label)`` for a backward pass that needs no
  statistics.
  """
  ct = _dtypes.compute_dtype(jnp.promote_types(x2.dtype, w.dtype))
  shards = VocabShards(cfg.vocab_axis, w.shape[1], sharded=w)
  num_classes = shards.num_classes
  weight_total = _weight_total(cw, shards, ct)
  # The forward pass that computes the gradient too keeps the logits where it can.
  chunks = cfg.grad_chunks if with_grad and saved is None else cfg.chunks
  tokens = Tokens.make(x2.shape[0], chunks.rows, token_shards(x2))
  x_cols = tokens.columns(x2)
  per_token = (labels, sc) if saved is None else (labels, sc, *saved)

  def body(carry, c, rows_in):
    yc, scc = rows_in[:2]
    xc = take_chunk(x_cols, c)
    if saved is None:
      stats, block = _chunk_stats(xc, w, bias, cw, yc, cfg, chunks, shards, ct)
      loss, lse, coef = _row_losses(stats, cfg, num_classes, weight_total)
      # 0 where the row does not count; NaN (from scc) where its label is out of range.
      # The product never meets a 0: an ignored row's loss may be inf (label smoothing
      # puts mass on a class whose bias is -inf), and inf * 0 would be a NaN, selected
      # away but reported by checkify.
      loss = jnp.where(scc == 0, 0.0, loss * jnp.where(scc == 0, 1.0, scc))
      w_label, amax = stats.w_label, stats.argmax
    else:
      lse, coef = rows_in[2:4]
      w_label = rows_in[4] if len(rows_in) > 4 else None
      loss, amax, block = None, None, None
    outs = (loss, lse, coef, w_label, amax)
    if not with_grad:
      return carry, outs
    dx_cols, acc = carry
    local_idx, here = shards.local_index(yc)
    dlogits = _ce_dlogits(lse, coef, w_label, scc, local_idx, here, cfg, num_classes)
    dxc, acc = grad_sweep(
        xc, w, (bias, cw), block, cfg.logits, chunks.width, dlogits, scc != 0, ct, acc
    )
    return (put_chunk(dx_cols, c, dxc), acc), outs

  init: Any = None
  if with_grad:
    # Without vocab shards a chunk's dx is whole once its sweep is done: keep it in x's
    # dtype. Partial sums over vocab shards stay in the compute dtype until summed.
    dx_dtype = x2.dtype if cfg.vocab_axis is None else ct
    dx_cols = vary_like(jnp.zeros_like(x_cols, dx_dtype), x_cols, w, bias, cw)
    init = (dx_cols, grad_accumulators(x_cols, w, bias, ct))
  carry, rows_out = scan_chunks(tokens, per_token, body, init)
  if not with_grad:
    return rows_out, None
  dx_cols, (dw, db) = carry
  # Per-device partials: each vocabulary shard holds part of each token's dx, each token
  # shard part of dw and db. The callers sum them (``_cotangents``) once scaled.
  return rows_out, (tokens.uncolumned(dx_cols), dw, db)


def _cotangents(partials, x2, w, bias, cfg):
  """``(dx, dw, db)`` from per-device partials, summed over the axes each input is
  replicated over (one psum each; none outside shard_map or with check_vma=False),
  in the inputs' dtypes."""
  dx, dw, db = partials
  dx = cotangent_like(dx, x2).astype(cfg.x_dtype)
  dw = cotangent_like(dw, w).astype(cfg.w_dtype)
  db = None if db is None else cotangent_like(db, bias).astype(cfg.b_dtype)
  return dx, dw, db


def _monitors(rows_out):
  """What the public function needs besides the loss: ``(lse, w_label, argmax)``."""
  _, lse, _, w_label, amax = rows_out
  return lse, w_label, amax


# --------------------------------------------------------------- the two custom_vjps
#
# Both return the loss and the per-row monitors (lse, label weight, argmax). The
# monitors carry no gradient: the caller stops it, and the rules ignore their cotangents.


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _summed(x2, w, bias, cw, labels, sc, cfg):
  rows_out, _ = _scan(x2, w, bias, cw, labels, sc, cfg, with_grad=False)
  return jnp.sum(rows_out[0]), _monitors(rows_out)


def _summed_fwd(x2, w, bias, cw, labels, sc, cfg):
  rows_out, grads = _scan(x2, w, bias, cw, labels, sc, cfg, with_grad=True)
  # Residuals: the partial dx, dw, db, the size of the inputs (not of the logits), and
  # the inputs themselves (no copies) for their types.
  return (jnp.sum(rows_out[0]), _monitors(rows_out)), (grads, x2, w, bias)


def _summed_bwd(cfg, res, cts):
  g = cts[0]
  (dx, dw, db), x2, w, bias = res
  g = VocabShards(cfg.vocab_axis, dw.shape[1], sharded=dw).full_cotangent(g.astype(dw.dtype))
  # Scale before summing over devices: on a (data, vocab) mesh each token shard has a
  # cotangent of its own.
  scaled = (g.astype(dx.dtype) * dx, g * dw, None if db is None else g * db)
  return (*_cotangents(scaled, x2, w, bias, cfg), None, None, None)


_summed.defvjp(_summed_fwd, _summed_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _per_token(x2, w, bias, cw, labels, sc, cfg):
  rows_out, _ = _scan(x2, w, bias, cw, labels, sc, cfg, with_grad=False)
  return rows_out[0], _monitors(rows_out)


def _per_token_fwd(x2, w, bias, cw, labels, sc, cfg):
  rows_out, _ = _scan(x2, w, bias, cw, labels, sc, cfg, with_grad=False)
  loss, lse, coef, w_label, _ = rows_out
  saved = (lse, coef) if w_label is None else (lse, coef, w_label)
  return (loss, _monitors(rows_out)), (x2, w, bias, cw, labels, sc, saved)


def _per_token_bwd(cfg, res, cts):
  x2, w, bias, cw, labels, sc, saved = res
  shards = VocabShards(cfg.vocab_axis, w.shape[1], sharded=w)
  sc = sc * shards.full_cotangent(cts[0].astype(sc.dtype))
  _, partials = _scan(x2, w, bias, cw, labels, sc, cfg, with_grad=True, saved=saved)
  return (*_cotangents(partials, x2, w, bias, cfg), None, None, None)


_per_token.defvjp(_per_token_fwd, _per_token_bwd)


# ----------------------------------------------------------------------- public


def linear_softmax_cross_entropy(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    where: ArrayLike | None = None,
    weights: ArrayLike | None = None,
    class_weights: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    return_aux: bool = False,
    chunk_size: int | tuple[int, int] | None = None,
    vocab_axis: str | None = None,
):
  r"""Softmax cross-entropy of ``x @ w (+ bias)`` without ever forming the logits.

  With logits :math:`z = \mathrm{cap}((x w + b) / T)` (``cap(u) = c tanh(u / c)``
  for ``logit_softcap=c``, Gemma 2's, else the identity), class weights
  :math:`c_j` (all 1 by default), smoothing :math:`\varepsilon` over the :math:`K`
  classes and :math:`\log p = \mathrm{log\_softmax}(z)`, token :math:`i` with label
  :math:`y` and weight :math:`u_i` (``weights``, 1 by default) has the loss

  .. math::
    \ell_i = u_i \Big[ (1 - \varepsilon)\, c_y (-\log p_y)
         + \frac{\varepsilon}{K} \sum_j c_j (-\log p_j)
         + z_{\mathrm{loss}} \cdot \mathrm{logsumexp}(z)^2 \Big]

  the same as ``softmax_cross_entropy_with_integer_labels(z, labels, ...)``
  (PyTorch's semantics for ``ignore_index``, ``label_smoothing`` and class
  ``weight``), but the ``[tokens, classes]`` logits exist only one
  ``[chunk, slice]`` block at a time. The gradient has the chain-rule factors of
  the temperature and of the cap (``1 - tanh^2``).

  Tokens that do not count (``where`` False, label ``ignore_index``, padding) get
  loss 0 and gradient 0, are left out of the mean, and NaN hidden states on them
  never reach ``dw``. ``reduction="mean"`` divides :math:`\sum_i \ell_i` over the
  counted tokens by :math:`\sum_i u_i c_{y_i}` over them (PyTorch's rule; the
  number of counted tokens without weights); a mean over zero total weight is 0.
  ``"none"`` returns each :math:`\ell_i` (0 where not counted). A label outside
  ``[0, K)`` that is not ``ignore_index`` raises ``ValueError`` when ``labels`` is
  concrete; under ``jit`` that token's loss and gradient are NaN.

  Work: for ``"mean"``/``"sum"`` the forward pass computes the gradients too, so
  value-and-grad costs the three matmuls of the unfused version when each chunk's
  logits over the whole vocabulary are kept for the gradient (the default wherever
  128 rows of them fit 64 MiB: up to 131072 classes); a forward pass alone (no
  differentiation) costs one. Slices whose logits are not kept, or ``"none"``,
  cost four under differentiation. Memory: ``O(chunk * slice + D * slice + chunk *
  D)`` for the blocks (``chunk * V`` when kept), plus ``dw`` in float32 and ``dx``
  (in ``x``'s dtype, float32 with ``vocab_axis``).

  Chunking (``chunk_size=None``, see ``jaxactv._linear_blocks``): a forward pass
  alone, and ``"none"``, use blocks of a fixed budget whatever ``D`` is
  (``default_chunks``): a ``[rows, slice]`` block of float32 logits and a
  ``[rows, D]`` chunk of ``x`` at most 16 MiB each, a ``[D, slice]`` slice of ``w``
  (and of ``dw``) at most 64 MiB in float32. The slice is the whole vocabulary when
  that allows 128 rows (512 on CPU, where the ``dw`` matmul wants the longer
  contraction: ``jaxactv._backend``; as many as there are tokens, if fewer), else
  the widest multiple of 128 classes that fits; the rows then fill the blocks, as a
  multiple of 8. The value-and-grad of ``"mean"``/``"sum"`` keeps each chunk's
  float32 logits (``kept_chunks``): as many rows as fit 64 MiB (and 16 MiB of
  ``x``), at most an eighth of the tokens but at least 128, swept for the gradient
  whole where the fixed rule would take one slice, else 1024 classes at a time on
  CPU (32768 elsewhere); where 128 rows do not fit, or for a half-precision input
  on CPU, it uses the fixed blocks too. An int ``chunk_size`` sets the rows (the slice
  stays the whole vocabulary, kept); a pair ``(rows, slice)`` sets both, for every
  pass (kept when the slice is the whole vocabulary). Chunks are strided columns of
  the tokens, so a token axis sharded over a mesh axis stays sharded: each device
  computes its own tokens. Tokens are padded to a whole number of chunks; a last,
  narrower slice is used as it is: no padded class ever enters a softmax.

  Args:
    x: ``[..., D]`` hidden states (any float dtype; bfloat16 is the usual case).
    w: ``[D, V]`` classifier weights (inside ``shard_map`` with ``vocab_axis``: this
      device's contiguous ``[D, V / shards]`` slice).
    labels: integer class ids of shape ``x.shape[:-1]`` (global ids; any integer
      dtype, narrower ones read as int32).
    bias: optional ``[V]`` bias (the local slice with ``vocab_axis``).
    where: optional boolean mask of ``labels``' shape: False tokens count for
      nothing (optax's ``where``, MaxText's segmentation mask).
    weights: optional float per-token weights of ``labels``' shape, constants
      (Levanter's ``weight``): the loss is :math:`\sum_i u_i \ell_i`.
    class_weights: optional ``[V]`` class weights, constants (the local slice with
      ``vocab_axis``).
    ignore_index: a label value whose tokens are ignored.
    label_smoothing: ``eps`` in ``[0, 1]``, spread uniformly over all ``V``
      classes (over the global vocabulary when sharded).
    z_loss: coefficient of the ``logsumexp**2`` auxiliary term.
    logit_softcap: ``c > 0`` or None, applied after the temperature.
    temperature: ``T > 0``, a static Python float.
    reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
    return_aux: also return a :class:`LinearCrossEntropyAux` of per-token
      monitors (logsumexp, argmax, the z-loss term), which carry no gradient.
    chunk_size: None, rows per chunk, or ``(rows, classes per slice)``.
    vocab_axis: inside ``jax.shard_map``, the mesh axis over which ``w``'s class
      dimension (and ``bias``, ``class_weights``) is split; row maxima are combined
      with ``pmax``, the sums with one ``psum``, ``dx`` with one ``psum``. Never
      gathered.

  Returns:
    float32 (float64 for float64 inputs) loss: a scalar, or ``x.shape[:-1]``; with
    ``return_aux``, ``(loss, aux)``.

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
  x, w, labels_in, labels, bias = _check_linear_inputs(x, w, labels, bias, "labels")
  logits = logits_spec(logit_softcap, temperature)
  if not isinstance(return_aux, bool):
    raise TypeError(f"return_aux must be a bool; got {return_aux!r}.")
  if ignore_index is not None and not isinstance(ignore_index, (int, np.integer)):
    raise TypeError(f"ignore_index must be an int or None; got {ignore_index!r}.")
  shards = VocabShards(vocab_axis, w.shape[1])  # outside shard_map, a vocab_axis fails here
  if class_weights is not None:
    class_weights = jnp.asarray(class_weights)
    if class_weights.shape != (w.shape[1],):
      raise ValueError(
          f"class_weights must have shape ({w.shape[1]},), one weight per class of w "
          f"{w.shape} (the local slice with vocab_axis); got {class_weights.shape}."
      )
  if vocab_axis is None:
    check_concrete_labels(labels_in, w.shape[1], ignore_index)

  num_tokens = math.prod(x.shape[:-1])
  rows, width = chunk_sizes(chunk_size, num_tokens, w.shape[1], w.shape[0])
  chunks = Chunks(rows, width, kept=width >= w.shape[1])
  x2 = x.reshape(num_tokens, x.shape[-1])
  ct = _dtypes.compute_dtype(jnp.promote_types(x.dtype, w.dtype))
  grad_chunks = chunks
  if chunk_size is None:
    half = any(upcast_half_matmul_operands(a.dtype) for a in (x, w))
    grad_chunks = kept_chunks(num_tokens, w.shape[1], w.shape[0], half_operands=half,
                              classes_split=classes_sharded(w))
  flat_labels = like_tokens(labels.reshape(num_tokens), x2)
  counts = token_mask(where, labels.shape, x2)
  if ignore_index is not None:
    counts = counts & (flat_labels != ignore_index)
  token_w = token_weights(weights, labels.shape, x2, ct)
  in_range = (flat_labels >= 0) & (flat_labels < shards.num_classes)
  # Out-of-range labels cannot raise under jit: that row's loss and gradient are NaN.
  sc = jnp.where(counts, jnp.where(in_range, token_w, jnp.nan), 0.0).astype(ct)
  cfg = _Config(
      float(label_smoothing), float(z_loss), logits, chunks, grad_chunks, vocab_axis,
      return_aux, x.dtype, w.dtype, None if bias is None else bias.dtype,
  )
  bias, class_weights = like_classes(bias, w), like_classes(class_weights, w)
  op = _per_token if reduction == "none" else _summed
  out, monitors = op(x2, w, bias, class_weights, flat_labels, sc, cfg)
  lse, w_label, amax = lax.stop_gradient(monitors)
  z_rows = None
  if return_aux:
    z_rows = jnp.where(sc == 0, 0.0, float(z_loss) * jnp.square(lse) * sc)
  if reduction == "none":
    loss = out.reshape(labels.shape)
    z_term = None if z_rows is None else z_rows.reshape(labels.shape)
  else:
    loss, z_term = out, None if z_rows is None else jnp.sum(z_rows)
    if reduction == "mean":
      counted = jnp.where(counts, token_w, 0.0)
      if w_label is not None:
        counted = counted * w_label
      denom = jnp.sum(counted).astype(out.dtype)[None]
      loss = reduce_losses(out[None], "mean", denom)
      if z_term is not None:
        z_term = reduce_losses(z_term[None], "mean", denom)
  if not return_aux:
    return loss
  assert z_term is not None  # computed whenever return_aux is set
  aux = LinearCrossEntropyAux(
      lse.reshape(labels.shape), amax.reshape(labels.shape).astype(jnp.int32), z_term
  )
  return loss, aux


# ------------------------------------------------------- checks shared with log-probs


def _check_linear_inputs(x, w, labels, bias, name):
  """``x``, ``w``, the ids (as given and as an array) and ``bias``, checked."""
  x, w = jnp.asarray(x), jnp.asarray(w)
  for arg, a in (("x", x), ("w", w)):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise TypeError(f"{arg} must be a floating array; got dtype {a.dtype}.")
  if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[0]:
    raise ValueError(
        f"x of shape {x.shape} and w of shape {w.shape} do not fit: x must be [..., D] "
        "and w [D, V] with the same D."
    )
  if not all(isinstance(d, (int, np.integer)) for d in (*x.shape, *w.shape)):
    raise NotImplementedError(
        f"x of shape {x.shape} and w of shape {w.shape}: the fused linear ops size their "
        "chunks from the numbers of tokens, hidden units and classes, which must be known "
        "when tracing; symbolic dimensions (jax.export's shape polymorphism) are not "
        "supported. Export at concrete shapes, or use the unfused loss on x @ w."
    )
  labels_in, labels = labels, as_class_ids(labels, f"{name} must be integer class ids; "
                                           "got dtype {dtype}.")
  if labels.shape != x.shape[:-1]:
    raise ValueError(
        f"{name} of shape {labels.shape} do not match x of shape {x.shape}: they must "
        f"have x's leading shape {x.shape[:-1]}."
    )
  if bias is not None:
    bias = jnp.asarray(bias)
    if bias.shape != (w.shape[1],):
      raise ValueError(f"bias must have shape ({w.shape[1]},) to match w {w.shape}; "
                       f"got {bias.shape}.")
  return x, w, labels_in, labels, bias


def logits_spec(logit_softcap, temperature) -> LogitsSpec:
  """The checked static ``(1 / temperature, logit_softcap)``."""
  if logit_softcap is not None:
    if (isinstance(logit_softcap, (jax.core.Tracer, bool))
        or not float(logit_softcap) > 0):
      raise ValueError(f"logit_softcap must be a positive Python float or None; "
                       f"got {logit_softcap!r}.")
    logit_softcap = float(logit_softcap)
  if (isinstance(temperature, (jax.core.Tracer, bool)) or np.ndim(temperature) != 0
      or not np.isfinite(float(temperature)) or not float(temperature) > 0):
    raise ValueError(
        f"temperature must be a positive, finite Python float (static); got {temperature!r}."
    )
  return LogitsSpec(1.0 / float(temperature), logit_softcap)


def token_mask(where, shape, x2) -> jax.Array:
  """``where`` (boolean, ``shape``) flattened and sharded like the tokens; all True if None."""
  if where is None:
    return like_tokens(jnp.ones((x2.shape[0],), bool), x2)
  where = as_bool(where)
  if where.shape != shape:
    raise ValueError(f"where of shape {where.shape} must have the labels' shape {shape}.")
  return like_tokens(where.reshape(-1), x2)


def token_weights(weights, shape, x2, ct):
  """Per-token ``weights`` (constants) flattened and sharded like the tokens; 1 if None."""
  if weights is None:
    return jnp.ones((), ct)
  weights = jnp.asarray(weights)
  if not jnp.issubdtype(weights.dtype, jnp.floating):
    raise TypeError(f"weights must be a floating array; got dtype {weights.dtype}.")
  if weights.shape != shape:
    raise ValueError(f"weights of shape {weights.shape} must have the labels' shape {shape}.")
  return like_tokens(lax.stop_gradient(weights).reshape(-1).astype(ct), x2)
