"""Blocks of ``x @ w`` for the fused linear losses: the chunk rule, the token layout,
the class slices and the gradient sweep they share.

``linear_softmax_cross_entropy`` and ``linear_log_probs`` walk the tokens in chunks
with ``lax.scan`` and, within a chunk, the classes in slices, so that no array of
``[tokens, classes]`` elements ever exists. What differs between them is what they
sum over a chunk's logits (their statistics) and the gradient with respect to the
logits; everything else lives here.

Token layout. The ``N`` tokens (padded to ``rows * chunks``) are viewed as
``[rows, chunks]``, token ``r * chunks + c`` in row ``r`` of chunk ``c``: chunk
``c`` is a strided column of the tokens, not a contiguous run. A token axis split
over a mesh axis (plain ``jit`` on a batch sharded over ``"data"``) keeps its
sharding on the ``rows`` dimension, so each device computes its own tokens in every
chunk and nothing is gathered; the chunk index is never a sharded dimension.

Sharding types. Under plain ``jit`` on meshes with ``AxisType.Explicit`` axes, JAX
refuses to guess the output sharding of a matmul that contracts a sharded
dimension (``dw = x^T dz`` over tokens split over ``"data"``, ``dx = dz w^T`` over
classes split over ``"vocab"``): ``matmul`` names it, that of the accumulator the
result goes into. Label logits on such blocks are picked with a masked sum rather
than a gather, which needs no sharding of its own (elsewhere, a gather).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxactv._backend import (
    kept_sweep_width,
    min_chunk_rows,
    transpose_dw_operand,
    upcast_half_matmul_operands,
)
from jaxactv._vocab_parallel import vary_like

# The chunk rule (chunk_size=None). Every block the loop makes takes at most these many
# bytes in float32: a [rows, slice] block of logits and a [rows, D] chunk of x (or dx)
# BLOCK_BYTES; a [D, slice] slice of w (or of dw) SLICE_BYTES. 16 MiB blocks keep the
# value-and-grad at <= 1/8 of the unfused temp memory from V = 32768 (D = 256) up.
# A chunk has at least min_chunk_rows() rows (jaxactv._backend) where the tokens allow.
BLOCK_BYTES = 16 * 2**20
SLICE_BYTES = 64 * 2**20
# A value-and-grad that computes the gradient in its forward pass (kept_chunks) holds one
# chunk's logits over the whole vocabulary: at most KEPT_BYTES in float32, and at most
# an eighth of all the logits where there are enough tokens for KEPT_MIN_ROWS per chunk.
KEPT_BYTES = 64 * 2**20
KEPT_MIN_ROWS = 128


class Chunks(NamedTuple):
  """How a loop walks the logits: ``rows`` tokens per chunk, ``width`` classes per
  slice; ``kept``: each chunk's whole-vocabulary block of logits is made at once and
  held for the gradient, which then sweeps it ``width`` classes at a time (always so
  when ``width`` is the whole vocabulary)."""

  rows: int
  width: int
  kept: bool


def default_chunks(
    num_tokens: int, local_classes: int, hidden: int, min_rows: int | None = None
) -> tuple[int, int]:
  """``(rows, slice_width)`` for ``chunk_size=None``.

  The slice is the whole (local) vocabulary when both ``min_rows`` rows of it fit in
  ``BLOCK_BYTES`` and ``hidden`` rows of it in ``SLICE_BYTES`` (float32); otherwise
  the widest multiple of 128 classes for which both hold. Rows then fill
  ``BLOCK_BYTES`` for the logits and for the ``[rows, hidden]`` chunk of ``x``, as a
  multiple of 8, at most the number of tokens (rounded up to 8). ``min_rows``
  defaults to the backend's (``_backend.min_chunk_rows``); with fewer tokens than
  that, the slice is as wide as the tokens allow.
  """
  padded_tokens = max(8, -(-num_tokens // 8) * 8)
  min_rows = min(min_chunk_rows() if min_rows is None else min_rows, padded_tokens)
  most = min(BLOCK_BYTES // (4 * min_rows), SLICE_BYTES // (4 * hidden))
  width = local_classes if local_classes <= most else max(128, most // 128 * 128)
  rows = min(BLOCK_BYTES // (4 * width), BLOCK_BYTES // (4 * hidden))
  rows = max(8, rows // 8 * 8)
  rows = min(rows, padded_tokens)
  return rows, width


def kept_chunks(
    num_tokens: int, classes: int, hidden: int, half_operands: bool = False,
    classes_split: bool = False,
) -> Chunks:
  """The chunks of a value-and-grad that keeps each chunk's logits (``chunk_size=None``).

  Computing the gradient in the forward pass needs a chunk's logits over the whole
  (local) vocabulary at once: their logsumexp comes before any ``dz``. Held for the
  gradient, they cost one matmul less than recomputing them (three, as the unfused
  ``x @ w`` + loss + autodiff). The rows are the most whose float32 block fits
  ``KEPT_BYTES`` and (for the ``[rows, hidden]`` chunk of ``x``) ``BLOCK_BYTES``,
  capped at an eighth of the tokens (rounded up to 8) but never below
  ``KEPT_MIN_ROWS``: from ``8 * KEPT_MIN_ROWS`` tokens up, the kept block holds at
  most an eighth of all the logits (a batch of fewer tokens, whose logits are small
  anyway, has chunks of ``KEPT_MIN_ROWS`` rows, or one chunk).

  Where ``default_chunks`` takes the whole vocabulary as one slice, the gradient
  sweeps the kept block whole too, as before (``sweeps_whole``); wider vocabularies
  are swept ``_backend.kept_sweep_width()`` classes at a time, so that ``dz`` and
  ``dw``'s share exist one small slice at a time. Under plain ``jit`` on an ``Auto``
  mesh, whose shardings the trace cannot see, slices of a vocab-split ``w`` make XLA
  gather it, so this keeps the vocabulary from which that happens where it was. With
  ``classes_split`` (``w``'s classes split over an ``Explicit`` mesh axis, as typed)
  each device sweeps its block whole: slices would not line up with the shards.

  When ``KEPT_MIN_ROWS`` rows do not fit, or with ``half_operands`` (a half-precision
  input whose matmuls XLA:CPU runs in float32, ``_backend``: one matmul over all of
  ``w`` would convert all of it, or round it to half precision where that copy
  exceeds ``SLICE_BYTES``), the rule falls back to ``default_chunks``, whose slices
  recompute their logits in the backward pass.
  """
  padded_tokens = max(8, -(-num_tokens // 8) * 8)
  least = min(KEPT_MIN_ROWS, padded_tokens)
  fits = min(KEPT_BYTES // (4 * classes), BLOCK_BYTES // (4 * hidden)) // 8 * 8
  if fits < least or half_operands:
    rows, width = default_chunks(num_tokens, classes, hidden)
    return Chunks(rows, width, kept=width >= classes)
  eighth = -(-padded_tokens // 64) * 8
  rows = min(fits, max(least, eighth), padded_tokens)
  whole = classes_split or sweeps_whole(num_tokens, classes, hidden)
  return Chunks(rows, classes if whole else min(kept_sweep_width(), classes), kept=True)


def sweeps_whole(num_tokens: int, classes: int, hidden: int) -> bool:
  """Whether ``default_chunks`` takes the whole vocabulary as one slice."""
  return default_chunks(num_tokens, classes, hidden)[1] >= classes


def chunk_sizes(chunk_size, num_tokens: int, classes: int, hidden: int) -> tuple[int, int]:
  """``(rows, slice_width)`` from the user's ``chunk_size`` (checked) or the rule."""
  if chunk_size is None:
    return default_chunks(num_tokens, classes, hidden)
  if isinstance(chunk_size, (int, np.integer)) and not isinstance(chunk_size, bool):
    rows, width = int(chunk_size), classes
  elif (
      isinstance(chunk_size, tuple)
      and len(chunk_size) == 2
      and all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in chunk_size)
  ):
    rows, width = (int(c) for c in chunk_size)
  else:
    raise TypeError(f"chunk_size must be None, an int or a pair of ints; got {chunk_size!r}.")
  if rows < 1 or width < 1:
    raise ValueError(f"chunk_size must be >= 1 (rows and classes); got {chunk_size!r}.")
  return rows, min(width, classes)


# -------------------------------------------------------------------- sharding types


def explicit_sharding(a: jax.Array):
  """``a``'s sharding when it lives on a mesh with ``Explicit`` axes, else None."""
  sharding = getattr(jax.typeof(a), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  types = getattr(mesh, "axis_types", ()) or ()
  if any(t == jax.sharding.AxisType.Explicit for t in types):
    return sharding
  return None


def token_shards(x2: jax.Array) -> int:
  """Over how many devices the token axis of ``x2`` (``[N, D]``) is split, as typed."""
  sharding = explicit_sharding(x2)
  if sharding is None or not sharding.spec or sharding.spec[0] is None:
    return 1
  names = sharding.spec[0]
  names = names if isinstance(names, tuple) else (names,)
  return math.prod(sharding.mesh.shape[n] for n in names)


def classes_sharded(w: jax.Array) -> bool:
  """Whether the class axis of ``w`` (``[D, V]``) is split over a mesh axis, as typed."""
  sharding = explicit_sharding(w)
  return sharding is not None and len(sharding.spec) > 1 and sharding.spec[1] is not None


def like_tokens(a: jax.Array, x2: jax.Array) -> jax.Array:
  """A per-token array ``[N]`` sharded as the tokens of ``x2`` (labels, masks, weights)."""
  sharding = explicit_sharding(x2)
  return a if sharding is None else _resharded(a, sharding, sharding.spec[:1])


def like_classes(a: jax.Array | None, w: jax.Array) -> jax.Array | None:
  """A per-class array ``[V]`` sharded as the classes of ``w`` (bias, class weights)."""
  sharding = explicit_sharding(w)
  if a is None or sharding is None:
    return a
  return _resharded(a, sharding, sharding.spec[1:2])


def _resharded(a, like, spec):
  spec = jax.sharding.PartitionSpec(*spec)
  if explicit_sharding(a) is not None and jax.typeof(a).sharding.spec == spec:
    return a
  return jax.sharding.reshard(a, jax.sharding.NamedSharding(like.mesh, spec))


def matmul(a, b, contract, ct, like=None):
  """``a . b`` contracting the given axes, accumulated (and returned) in ``ct``.

  ``like``: an array whose sharding the result takes under explicit sharding.
  """
  out = None if like is None else explicit_sharding(like)
  half = [t.dtype for t in (a, b) if jnp.dtype(t.dtype).itemsize < 4]
  if half and upcast_half_matmul_operands(half[0]):
    # Both in float32 (exact: see _backend) when the converted copies stay within the
    # slice budget; a bigger operand (a whole w passed as one slice by an explicit
    # chunk_size) stays in half precision, and so does its partner, rather than be
    # copied whole in float32 outside the token loop.
    fits = max(a.size, b.size) * 4 <= SLICE_BYTES
    a, b = (t.astype(ct if fits else half[0]) for t in (a, b))
  return lax.dot_general(
      a, b, (contract, ((), ())), preferred_element_type=ct, out_sharding=out
  )


# ------------------------------------------------------------------------ logits


class LogitsSpec(NamedTuple):
  """How a block of logits is made from ``x @ w + bias``: ``cap(. / T)``."""

  inv_temperature: float  # 1 / T
  softcap: float | None


def block_logits(xc, w_k, b_k, spec: LogitsSpec, ct):
  """The logits of one ``[rows, slice]`` block, in the compute dtype ``ct``."""
  z = matmul(xc, w_k, ((1,), (0,)), ct)
  if b_k is not None:
    z = z + b_k.astype(ct)
  if spec.inv_temperature != 1.0:
    z = z * spec.inv_temperature
  if spec.softcap is not None:
    z = spec.softcap * jnp.tanh(z / spec.softcap)
  return z


def through_logits(dz, z, spec: LogitsSpec):
  """The cotangent of ``x @ w + bias`` from that of the final logits ``z``."""
  if spec.softcap is not None:
    # d/du [c tanh(u / c)] = 1 - tanh^2 = 1 - (z / c)^2
    dz = dz * (1.0 - jnp.square(z / spec.softcap))
  if spec.inv_temperature != 1.0:
    dz = dz * spec.inv_temperature
  return dz


def is_label(z, lo, local_idx, here):
  """``[rows, slice]`` mask: column ``j`` of the block starting at class ``lo`` is row
  ``r``'s label (``local_idx[r] - lo == j``) and that label is on this shard.

  Class ids are compared as int32 (the block's columns), whatever the labels' dtype:
  int64 labels under x64 then pass strict dtype promotion too.
  """
  cols = lo + lax.broadcasted_iota(jnp.int32, (1, z.shape[1]), 1)
  return (cols == local_idx[:, None].astype(jnp.int32)) & here[:, None]


def label_value(z, lo, local_idx, here):
  """``z[r, local_idx[r] - lo]`` where that class is in this block (and here), else 0.

  A gather of one entry per row where the block is a plain (or shard_map-local)
  array; XLA:CPU would write the masked block of the alternative out in full before
  summing it, one more pass over the logits. Under explicit sharding types the
  masked sum, which needs no sharding rule of its own.
  """
  if explicit_sharding(z) is not None:
    return jnp.sum(jnp.where(is_label(z, lo, local_idx, here), z, 0.0), -1)
  j = local_idx.astype(jnp.int32) - lo
  inside = here & (j >= 0) & (j < z.shape[1])
  picked = jnp.take_along_axis(z, jnp.clip(j, 0, z.shape[1] - 1)[:, None], axis=1)
  return jnp.where(inside, picked[:, 0], 0.0)


def over_slices(w, per_class, width, body, carry):
  """Fold ``body(carry, lo, w_slice, per_class_slices)`` over the class slices of ``w``.

  ``per_class`` is a tuple of ``[V]`` arrays or None (bias, class weights), sliced
  alongside ``w``. The full-width slices go through a ``fori_loop`` with dynamic
  slices, so XLA cannot hoist them out of the token loop as one copy of ``w``; a
  narrower last slice follows, statically. With one slice, ``w`` itself is the slice.
  """
  classes = w.shape[1]
  if width >= classes:
    return body(carry, 0, w, per_class)
  full = classes // width

  def step(k, c):
    lo, w_k = pinned(k * width, w)
    w_k = lax.dynamic_slice_in_dim(w_k, lo, width, axis=1)
    cls_k = tuple(None if a is None else lax.dynamic_slice_in_dim(a, lo, width)
                  for a in per_class)
    return body(c, lo, w_k, cls_k)

  carry = lax.fori_loop(0, full, step, carry)
  lo = full * width
  if lo < classes:
    cls_k = tuple(None if a is None else a[lo:] for a in per_class)
    start, w_last = pinned(jnp.int32(lo), w)
    carry = body(carry, lo, lax.dynamic_slice_in_dim(w_last, start, classes - lo, 1), cls_k)
  return carry


def row_zeros(xc, dtype, *operands):
  """Zeros, one per row of the chunk ``xc``, typed (sharding, vma) like its rows."""
  return vary_like(jnp.zeros_like(xc[:, 0], dtype), xc, *operands)


# ------------------------------------------------------------------ token layout


class Tokens(NamedTuple):
  """``num`` tokens in ``chunks`` strided chunks of ``rows`` (see the module docs)."""

  num: int
  rows: int
  chunks: int

  @staticmethod
  def make(num: int, rows: int, shards: int = 1) -> Tokens:
    rows = -(-rows // shards) * shards  # each token shard gets the same rows per chunk
    chunks = max(1, -(-num // rows))
    rows = min(rows, -(-num // (chunks * shards)) * shards)  # as few padded tokens as can be
    # No tokens: one chunk of padding (whose rows count for nothing), not a division by 0.
    rows = max(rows, shards)
    return Tokens(num, rows, max(1, -(-num // rows)))

  def columns(self, a: jax.Array) -> jax.Array:
    """``a`` (``[N, ...]``) padded and viewed as ``[rows, chunks, ...]``."""
    pad = self.rows * self.chunks - self.num
    if pad:
      a = jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1))
    return a.reshape((self.rows, self.chunks, *a.shape[1:]))

  def chunked(self, a: jax.Array) -> jax.Array:
    """A per-token ``[N]`` array as ``[chunks, rows]``, for ``lax.scan`` to walk."""
    return jnp.swapaxes(self.columns(a), 0, 1)

  def unchunked(self, a: jax.Array) -> jax.Array:
    """The inverse of ``chunked`` for per-row outputs ``[chunks, rows, ...]``."""
    a = jnp.swapaxes(a, 0, 1)
    return a.reshape((self.rows * self.chunks, *a.shape[2:]))[: self.num]

  def uncolumned(self, a: jax.Array) -> jax.Array:
    """The inverse of ``columns``: ``[rows, chunks, ...]`` back to ``[N, ...]``."""
    return a.reshape((self.rows * self.chunks, *a.shape[2:]))[: self.num]


def scan_chunks(tokens: Tokens, per_token, body, init):
  """``lax.scan`` over the chunks: ``body(carry, c, rows) -> (carry, row_outputs)``.

  ``per_token`` are ``[N]`` arrays, handed to ``body`` as this chunk's ``[rows]``;
  ``c`` is the chunk's index (for ``lax.dynamic_index_in_dim(x_cols, c, 1)``). The
  row outputs come back as ``[N]`` arrays.
  """
  xs = (jnp.arange(tokens.chunks), *[tokens.chunked(a) for a in per_token])
  carry, outs = lax.scan(lambda carry, inp: body(carry, inp[0], inp[1:]), init, xs)
  return carry, jax.tree.map(tokens.unchunked, outs)


def take_chunk(cols: jax.Array, c) -> jax.Array:
  """Chunk ``c`` of ``cols`` (``[rows, chunks, ...]``): ``[rows, ...]``."""
  c, cols = pinned(c, cols)
  return lax.dynamic_index_in_dim(cols, c, 1, keepdims=False)


def pinned(index, a: jax.Array):
  """``(index, a)`` as they are, behind an optimisation barrier, for ``a[index]``.

  XLA:CPU computes half-precision slices in float32: ``slice(w)`` inside a loop
  becomes ``slice(convert(w))``, and the convert of the loop-invariant ``w`` is
  hoisted out of the loop: a float32 copy of all of ``w`` (2 GiB at D = 4096,
  V = 131072), and of ``x``. Tied to the loop's index by the barrier, ``a`` is no
  longer invariant, and only the slice taken is converted. Free elsewhere.
  """
  return lax.optimization_barrier((index, a))


def put_chunk(cols: jax.Array, c, value: jax.Array) -> jax.Array:
  return lax.dynamic_update_index_in_dim(cols, value.astype(cols.dtype), c, 1)


# ------------------------------------------------------------------ the gradient


def grad_sweep(
    xc, w, per_class, block, spec: LogitsSpec, width: int,
    dlogits: Callable, rows_count, ct, acc,
):
  """One chunk's ``(dx_chunk, (dw, db))``: ``acc = (dw, db)`` plus this chunk's share.

  ``dlogits(z, lo, per_class_slices)`` is the cotangent of the final logits of the
  block starting at class ``lo``. ``block`` is the chunk's logits over the whole
  (local) vocabulary when the forward pass kept them, swept ``width`` classes at a
  time (each slice's ``dz`` and ``dw`` share exist only for that slice), else None and
  each ``width``-wide block is recomputed. ``per_class[0]`` is the bias.
  ``rows_count`` marks the rows with a nonzero cotangent: the others may hold NaN
  hidden states, and as zeros they add nothing to ``dw`` (0 * NaN would add NaN to
  every weight); their ``dz`` is selected to 0 for the same reason. ``dx_chunk`` is
  this shard's partial sum over its classes.
  """
  # The matmuls take their operands in the inputs' dtype (bf16 runs at bf16 speed) and
  # accumulate in the compute dtype; where they are converted anyway (CPU), the
  # logits' cotangent stays unrounded.
  md = jnp.promote_types(xc.dtype, w.dtype)
  md = ct if upcast_half_matmul_operands(md) else md
  x_counted = jnp.where(rows_count[:, None], xc, 0).astype(md)
  if transpose_dw_operand():
    x_t, dw_contract = lax.optimization_barrier(x_counted.T), ((1,), (0,))
  else:
    x_t, dw_contract = x_counted, ((0,), (0,))

  def fold(carry, lo, w_k, cls_k):
    dx, dw, db = carry
    if block is None:
      z = block_logits(xc, w_k, cls_k[0], spec, ct)
    elif w_k.shape[1] == block.shape[1]:
      z = block
    else:
      z = lax.dynamic_slice_in_dim(block, lo, w_k.shape[1], axis=1)
    dz = through_logits(dlogits(z, lo, cls_k), z, spec)
    dz = jnp.where(rows_count[:, None], dz, 0.0)
    dz_m = dz.astype(md)
    dx = dx + matmul(dz_m, w_k, ((1,), (1,)), ct, like=dx)
    dw_k = matmul(x_t, dz_m, dw_contract, ct, like=w_k)
    dw = lax.dynamic_update_slice_in_dim(
        dw, lax.dynamic_slice_in_dim(dw, lo, dw_k.shape[1], axis=1) + dw_k, lo, axis=1
    )
    if db is not None:
      db_k = jnp.sum(dz, 0)
      db = lax.dynamic_update_slice_in_dim(
          db, lax.dynamic_slice_in_dim(db, lo, db_k.shape[0]) + db_k, lo, axis=0
      )
    return dx, dw, db

  dx = vary_like(jnp.zeros_like(xc, ct), xc, w, per_class[0])
  dx, dw, db = over_slices(w, per_class, width, fold, (dx, *acc))
  return dx, (dw, db)


def grad_accumulators(x_cols, w, bias, ct):
  """Zero ``(dw, db)`` in ``ct``, typed like ``w``/``bias`` and varying like the tokens."""
  dw = vary_like(jnp.zeros_like(w, ct), x_cols, w, bias)
  db = None if bias is None else vary_like(jnp.zeros_like(bias, ct), x_cols, w, bias)
  return dw, db
