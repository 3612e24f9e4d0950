"""Softmax cross-entropy from logits, fused: integer labels and soft labels.

Both losses are one ``jax.custom_vjp`` each. The forward pass sweeps the logits
for the row max and then for one fused sum of everything the loss needs (for soft
labels at up to 1024 classes XLA:CPU runs the max, the shift and the exponential as
one kernel, as it does optax's; above that three sweeps that share nothing, see
``_backend.soft_loss_in_separate_sweeps``), and the backward pass makes one sweep
that writes the closed-form gradient

    d loss / d logits = g * (a * softmax(logits) - target),

with ``a`` a number per example and ``target`` the (smoothed, weighted) label
distribution. Residuals are the caller's own arrays (logits, labels, masks,
weights) and a few numbers per example; nothing else the size of the logits is
kept. (A class axis that is not trailing is moved there first: that transpose is
a copy, and it is what the rule keeps.) On XLA:CPU (every logits dtype) the
compiler itself keeps the forward's exponentials for the backward: see
``_backend.py``. On CPU a row of more than 32768 logits is reduced a piece at a time
(``_arith.reduce_rows``).

Numbers are computed in float32 (float64 for float64 logits); the loss comes back
in that dtype and the gradient in the logits' dtype.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import checkify
from jax.typing import ArrayLike

from jaxactv import _dtypes
from jaxactv._arith import (
    as_one_buffer,
    max_at_least,
    reduce_rows,
    sum_to_operand,
    times_allowing_inf,
)
from jaxactv._backend import reuse_forward_exponentials, soft_loss_in_separate_sweeps
from jaxactv._layout import broadcast_classes_last, to_class_layout
from jaxactv._reduction import reduce_losses
from jaxactv._sharding import (
    class_axis_is_split,
    explicit_spec,
    like_logits,
    same_layout_as,
    take,
    whole,
)
from jaxactv._softmax import mask_logits
from jaxactv._validation import (
    Axis,
    as_class_ids,
    as_logits,
    broadcasts_to,
    check_reduction,
    check_static_coefficient,
)
from jaxactv._vocab_parallel import VocabShards, cotangent_like


def distance_below_max(x: jax.Array, offset: jax.Array) -> jax.Array:
  """``max - x`` per logit, in ``[0, inf]``: ``-log`` of the logit's share of the max."""
  return jnp.maximum(offset - x, 0.0)


def safe_log_sum(sum_exp: jax.Array) -> jax.Array:
  """``log(sum_exp)``, and 0 on a row with no finite logit (``sum_exp = 0``).

  Such a row's loss is then ``inf`` (the target's ``-inf`` logits) or 0 (no target
  mass), never ``-inf + inf``: no NaN is computed, so ``checkify`` stays silent.
  Every other row's sum is at least 1 (its max logit contributes ``exp(0)``), so a
  max with 1 does it: arithmetic, which XLA:CPU fuses into the loss's kernel, where a
  select on the row sum splits it (optax's loss at 4096 x 1024 is one kernel). The
  price: a sum of exactly 1 (a confident row) ties with the 1, and a tie halves the
  derivative that ``jax.hessian`` takes through this (the arithmetic alternatives,
  ``log(max(sum, 1/2)) * (sum > 0)``, split that kernel: 1.2x -> 1.9x optax).
  """
  return jnp.log(jnp.maximum(sum_exp, 1.0))


def finite_offset(row_max: jax.Array) -> jax.Array:
  """The row max as the shift for ``exp``; 0 where it is not finite.

  A row with no finite max (all ``-inf``, masked) then sums to 0; a ``+inf`` row
  sums to ``+inf`` and its loss is ``inf`` or NaN: the limit would depend on how
  many logits are infinite, which a loss does not try to guess.
  """
  return jnp.where(jnp.isfinite(row_max), row_max, 0.0)


def scaled_probs(x, offset, sum_exp, scale, logits_dtype, floor=None):
  """``scale * softmax(x)`` in a backward pass, from the forward's per-row numbers.

  On CPU this is the forward's own ``exp(x - offset)`` (XLA reuses it; ``floor`` is
  the forward's floor on ``x - offset``, if it had one, so that the expression is the
  very same) times a per-row factor; elsewhere ``exp((x - offset) - log_sum)``, which
  XLA recomputes in the gradient's loop rather than keep a logits-sized buffer (see
  ``_backend``). Both differences are small numbers: ``exp(x - lse)`` would round
  ``lse`` at the scale of the max (at logits of 1e4 a float32 probability was off by
  5e-4 of the largest). An empty row (``sum_exp = 0``) gives 0.
  """
  shifted = x - offset if floor is None else jnp.maximum(x - offset, floor)
  if reuse_forward_exponentials(logits_dtype):
    # max with 1/2, not 1: a sum of exactly 1 would tie, which halves the derivative
    # (jax.hessian); an empty row's exponentials are all 0 either way.
    return jnp.exp(shifted) * (scale / jnp.maximum(sum_exp, 0.5))
  return jnp.exp(shifted - safe_log_sum(sum_exp)) * scale


# ------------------------------------------------------------------ integer labels


class _IntConfig(NamedTuple):
  label_smoothing: float
  z_loss: float
  vocab_axis: str | None


def _int_fwd(logits, labels, class_mask, class_weights, counts, cfg):
  ct = _dtypes.loss_dtype(logits.dtype)
  shards = VocabShards(cfg.vocab_axis, logits.shape[-1])
  eps, z = cfg.label_smoothing, cfg.z_loss
  x = mask_logits(logits.astype(ct), class_mask)
  # The max in the logits' own dtype (exact), read straight from them: for half
  # precision, XLA:CPU then needs no float32 copy before this pass.
  row_max = reduce_rows(
      functools.partial(jnp.max, initial=-jnp.inf), mask_logits(logits, class_mask), (x.ndim - 1,),
      keepdims=True,
  )
  row_max = shards.pmax(row_max.astype(ct))
  offset = finite_offset(row_max)
  local_idx, here = shards.local_index(labels)
  x_label = pick_class(x, local_idx)
  parts = {
      "sum_exp": reduce_rows(jnp.sum, jnp.exp(x - offset), (x.ndim - 1,)),
      "x_label": jnp.where(here, x_label, 0.0),
  }
  if class_weights is not None:
    w = class_weights.astype(ct)
    parts["w_label"] = jnp.where(here, take(w, local_idx), 0.0)
  if eps > 0:
    w_row = jnp.ones((), ct) if class_weights is None else w
    d = distance_below_max(x, offset)
    if class_mask is not None:
      d = jnp.where(class_mask, d, 0.0)
    wd = d if class_weights is None else times_allowing_inf(w_row, d)
    parts["w_dist"] = jnp.sum(wd, -1)
    if class_mask is not None:
      parts["n_valid"] = jnp.sum(class_mask, -1, dtype=ct)
      parts["w_total"] = jnp.sum(jnp.where(class_mask, w_row, 0.0), -1)
    elif class_weights is not None:
      parts["w_total"] = jnp.broadcast_to(jnp.sum(w), labels.shape)
  parts = dict(zip(parts, shards.psum(tuple(parts.values())), strict=True))

  row_max, offset, sum_exp = row_max[..., 0], offset[..., 0], parts["sum_exp"]
  log_sum = safe_log_sum(sum_exp)
  lse = row_max + log_sum  # -inf on a row with no finite logit
  # -log p_label = log_sum - (x_label - max): small numbers, no cancellation; inf at a
  # -inf label logit (also on a row with no finite logit, whose log_sum is taken as 0).
  nll = log_sum - (parts["x_label"] - offset)
  w_label = parts.get("w_label", jnp.ones((), ct))
  loss = times_allowing_inf((1.0 - eps) * w_label, nll)
  coef = (1.0 - eps) * w_label
  if eps > 0:
    n_valid = parts.get("n_valid", shards.num_classes)
    w_total = parts.get("w_total", n_valid)
    # A row with every class masked out has n_valid = 0: it does not count, and 1
    # keeps the division by zero out of the graph.
    spread = eps / (jnp.maximum(n_valid, 1.0) if "n_valid" in parts else n_valid)
    loss = loss + spread * (w_total * log_sum + parts["w_dist"])
    coef = coef + spread * w_total
  else:
    spread = 0.0
  if z > 0:
    loss = loss + z * jnp.square(lse)
    coef = coef + 2.0 * z * lse
  # A row with no finite logit has softmax 0: its coefficient is moot, and 0 keeps
  # -inf * 0 out of the backward pass.
  coef = jnp.where(sum_exp == 0, 0.0, coef)
  in_range = (labels >= 0) & (labels < shards.num_classes)
  # Out-of-range labels cannot raise under jit: that example's loss (and gradient)
  # is NaN, never a silently wrapped class. Selects, not products: under checkify the
  # only error is the label check's (see check_traced_labels).
  scale = jnp.where(counts, jnp.where(in_range, 1.0, jnp.nan), 0.0).astype(ct)
  loss = jnp.where(scale == 1, loss, scale)
  coef, spread = (jnp.broadcast_to(a, loss.shape).astype(ct) for a in (coef, spread))
  res = (logits, labels, class_mask, class_weights, offset, sum_exp, coef, spread, scale)
  if class_weights is not None:
    res += (nll,)
  return loss, res


def _int_bwd(cfg, res, g):
  logits, labels, class_mask, class_weights, offset, sum_exp, coef, spread, scale = res[:9]
  ct = coef.dtype
  shards = VocabShards(cfg.vocab_axis, logits.shape[-1], sharded=logits)
  x = mask_logits(logits.astype(ct), class_mask)
  w = None if class_weights is None else class_weights.astype(ct)
  # g where the example counts, 0 where it does not, NaN for an out-of-range label.
  g = jnp.where(scale == 1, shards.full_cotangent(g.astype(ct)), scale)
  dx = scaled_probs(
      x, offset[..., None], sum_exp[..., None], (g * coef)[..., None], logits.dtype
  )
  if cfg.label_smoothing > 0:
    spread_w = spread[..., None] * (1.0 if w is None else w)
    if class_mask is not None:
      spread_w = jnp.where(class_mask, spread_w, 0.0)
    dx = dx - g[..., None] * spread_w
  # Select, not multiply: an ignored or masked row full of NaN must get gradient 0.
  dx = jnp.where((scale != 0)[..., None], dx, 0.0)
  # The label's own term touches one logit per example.
  local_idx, here = shards.local_index(labels)
  w_label = 1.0 if w is None else take(w, local_idx)
  at_label = jnp.where(here, g * (1.0 - cfg.label_smoothing) * w_label, 0.0)
  dx = _subtract_at(dx, local_idx, at_label, in_place=dx.dtype == logits.dtype)
  dw = None
  if class_weights is not None:
    dw = _class_weights_cotangent(
        cfg, x, class_mask, offset, sum_exp, g, spread, local_idx, here, res[9], class_weights
    )
    dw = dw.astype(class_weights.dtype)
  return dx.astype(logits.dtype), None, None, dw, None


def _class_weights_cotangent(
    cfg, x, class_mask, offset, sum_exp, g, spread, local_idx, here, nll, class_weights
):
  r"""``d loss / d w_j = (1 - eps) [j = y] nll_y + spread [j valid] nll_j``, summed.

  ``nll_j = log_sum + (max - x_j)`` is ``-log p_j``. The label term is a scatter of one
  number per example into ``[K]``; the smoothing term, present only with
  ``label_smoothing``, is one more sweep over the logits, summed over the batch.
  ``0 * inf = 0``: an example that does not count (``g = 0``) adds nothing even where
  its ``nll`` is infinite.
  """
  k = x.shape[-1]
  batch = tuple(range(x.ndim - 1))
  label_term = jnp.where(here, times_allowing_inf(g * (1.0 - cfg.label_smoothing), nll), 0.0)
  if explicit_spec(x) is not None:
    # Sharded logits (an Explicit mesh): the scatter as a compare summed over the batch.
    dw = jnp.sum(jnp.where(_is_index(x, local_idx), label_term[..., None], 0.0), batch)
  else:
    dw = jnp.zeros((k,), g.dtype).at[local_idx.reshape(-1)].add(
        label_term.reshape(-1), mode="promise_in_bounds"
    )
  if cfg.label_smoothing > 0:
    nll_j = safe_log_sum(sum_exp)[..., None] + distance_below_max(x, offset[..., None])
    terms = times_allowing_inf((g * spread)[..., None], nll_j)
    if class_mask is not None:
      terms = jnp.where(class_mask, terms, 0.0)  # a masked class takes no part
    dw = dw + jnp.sum(terms, batch)
  # Summed over the token shards the weights are replicated over (shard_map), in the
  # weights' own layout (Explicit meshes).
  return same_layout_as(cotangent_like(dw, class_weights), class_weights)


def pick_class(x: jax.Array, index: jax.Array) -> jax.Array:
  """``x[..., index]``: one class per example, ``index`` already in range."""
  if class_axis_is_split(x):
    # Classes split over devices (an Explicit mesh): a compare fused into the sweep
    # and an all-reduce of one number per example, not a gather across devices.
    return jnp.sum(jnp.where(_is_index(x, index), x, 0.0), -1)
  return jnp.take_along_axis(x, index[..., None], -1)[..., 0]


def _is_index(x: jax.Array, index: jax.Array) -> jax.Array:
  return jax.lax.broadcasted_iota(index.dtype, x.shape, x.ndim - 1) == index[..., None]


def _subtract_at(
    dx: jax.Array, index: jax.Array, values: jax.Array, in_place: bool = True
) -> jax.Array:
  """``dx[..., index] -= values`` for one class index per example.

  ``in_place``: a scatter of N numbers into ``dx``, which updates the gradient's own
  buffer. Otherwise (``dx`` is still to be rounded to half-precision logits, and the
  scatter would sit between the gradient's loop and the rounding, one more pass over
  a float32 buffer) a compare with the class index, which fuses into that loop.
  """
  if class_axis_is_split(dx) or not in_place:
    return dx - jnp.where(_is_index(dx, index), values[..., None], 0.0)
  flat = dx.reshape(-1, dx.shape[-1])
  rows = jnp.arange(flat.shape[0])
  flat = flat.at[rows, index.reshape(-1)].add(-values.reshape(-1), mode="promise_in_bounds")
  return flat.reshape(dx.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _int_ce(logits, labels, class_mask, class_weights, counts, cfg):
  return _int_fwd(logits, labels, class_mask, class_weights, counts, cfg)[0]


_int_ce.defvjp(_int_fwd, _int_bwd)


def check_concrete_labels(labels, num_classes: int, ignore_index: int | None) -> None:
  """Raise on an out-of-range label when the labels are known (not traced)."""
  if isinstance(labels, jax.core.Tracer):
    return
  values = np.asarray(labels)
  bad = (values < 0) | (values >= num_classes)
  if ignore_index is not None:
    bad &= values != ignore_index
  if bad.any():
    first = values[bad].flat[0]
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    ignore = "" if ignore_index is None else f" or ignore_index={ignore_index}"
    raise ValueError(
        f"labels{list(where)} = {first} is not a class id: with {num_classes} classes a "
        f"label must lie in [0, {num_classes}){ignore}."
    )


def check_traced_labels(labels, num_classes: int, ignore_index: int | None) -> None:
  """Under ``checkify``, an error naming the first out-of-range label; else nothing.

  ``checkify.debug_check`` is dropped from the computation unless the caller wraps
  it in ``checkify.checkify``, but its error effect stays on the jaxpr and costs the
  enclosing ``jit`` its fast dispatch: callers ask for it (``check_labels=True``).
  Concrete labels were already checked in Python (``check_concrete_labels``).
  """
  if not isinstance(labels, jax.core.Tracer) or labels.size == 0:
    return
  # One flat index needs the labels in one piece on an Explicit mesh; like everything
  # feeding the check, the gather is dead code (and dropped) outside checkify.
  labels = whole(labels)
  bad = (labels < 0) | (labels >= num_classes)
  if ignore_index is not None:
    bad &= labels != ignore_index
  first = jnp.argmax(bad.reshape(-1))
  ignore = "" if ignore_index is None else f" or ignore_index={ignore_index}"
  checkify.debug_check(
      ~jnp.any(bad),
      "labels (flattened) [{index}] = {label} is not a class id: with "
      f"{num_classes} classes a label must lie in [0, {num_classes}){ignore}.",
      index=first,
      label=labels.reshape(-1)[first],
  )


def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    class_weights: ArrayLike | None = None,
    z_loss: float = 0.0,
    reduction: str = "none",
    vocab_axis: str | None = None,
    check_labels: bool = False,
) -> jax.Array:
  r"""Softmax cross-entropy with integer class labels, fused, with PyTorch's options.

  For an example with logits :math:`x`, label :math:`y`, class weights :math:`w`
  (all 1 by default), smoothing :math:`\varepsilon` over :math:`K` classes and
  :math:`\log p = \mathrm{log\_softmax}(x)`:

  .. math::
    \ell = (1 - \varepsilon)\, w_y (-\log p_y)
         + \frac{\varepsilon}{K} \sum_j w_j (-\log p_j)
         + z \cdot \mathrm{logsumexp}(x)^2

  and the gradient is the closed form ``g * (a * softmax(x) - target)``.
  ``reduction="mean"`` divides the sum by the summed :math:`w_y` of the examples
  that count (PyTorch's ``weight`` rule; the count of examples without weights);
  ignored or masked examples give loss 0 and gradient 0, and a mean over no
  example is 0.

  Edge cases: a ``-inf`` logit with no target mass contributes nothing; a ``-inf``
  (or masked) logit carrying target mass gives loss ``inf``. A label outside
  ``[0, K)`` that is not ``ignore_index`` raises ``ValueError`` when ``labels``
  is concrete; under ``jit`` no exception can be raised, so that example's loss
  and gradient are NaN (``take_along_axis`` would silently clamp it). For a real
  error under ``jit``, pass ``check_labels=True`` and wrap the call in
  ``jax.experimental.checkify.checkify`` (any ``errors=``, e.g.
  ``checkify.all_checks``): it then raises an error naming the label and the number
  of classes. On every other input (``-inf`` logits and rows, masks, ignored
  examples, zero weights, empty batches) ``checkify.all_checks`` stays silent,
  value and gradient: no intermediate is NaN. (A ``+inf`` logit gives ``inf`` or
  NaN, as the module docs say.)

  Args:
    logits: ``[..., num_classes]`` floating logits (bfloat16/float16 are computed
      in float32 without a float32 copy where XLA can fuse the cast).
    labels: integer class ids (any integer dtype: narrower ones are read as int32),
      shaped like ``logits`` without the class axis (or axes); with a tuple ``axis``
      a label is a flat index into those axes.
    axis: the class axis, or a tuple of axes.
    where: optional boolean mask, either per logit (``logits``' rank: classes left
      out of the softmax) or per example (the batch's rank: examples left out).
    ignore_index: a label value whose examples are ignored (PyTorch uses -100).
    label_smoothing: :math:`\varepsilon \in [0, 1]`, spread over the classes
      (over the unmasked ones when ``where`` masks logits).
    class_weights: optional ``[num_classes]`` weights (PyTorch's ``weight``). They
      are differentiable: ``d loss / d w_j`` is the true derivative, including the
      ``"mean"`` denominator (PyTorch refuses this gradient).
    z_loss: coefficient of PaLM's auxiliary ``logsumexp(x)**2`` term.
    reduction: ``"none"`` (per example), ``"mean"`` or ``"sum"``.
    vocab_axis: inside ``jax.shard_map``, the mesh axis over which the class axis
      of ``logits`` (and of ``class_weights``) is split in contiguous slices;
      ``labels`` hold global class ids. The max and the sums are combined with
      collectives over that axis and the result equals the unsharded loss.
    check_labels: add a ``checkify.debug_check`` of the labels, for
      ``checkify.checkify`` to report an out-of-range label under ``jit``. Off by
      default: any checkify check, even one that is dropped, gives the traced
      program an error effect, and a ``jit`` with effects loses its fast dispatch
      (0.05-0.3 ms per call on CPU: this loss ran 1.11x optax's time with the check,
      1.00x without, at 512 x 8192).

  Returns:
    float32 (float64 for float64 logits) losses of the batch shape, or a scalar.

  Examples:
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> logits, labels = jnp.zeros((2, 4)), jnp.array([3, -100])
    >>> loss = jaxactv.softmax_cross_entropy_with_integer_labels
    >>> print(loss(logits, labels, ignore_index=-100))  # log 4, ignored
    [1.3863 0.    ]
    >>> print(f"{loss(logits, labels, ignore_index=-100, reduction='mean'):.4f}")
    1.3863
  """
  check_reduction(reduction)
  check_smoothing_and_z(label_smoothing, z_loss)
  logits = as_logits(logits)
  labels_in = labels
  labels = as_class_ids(
      labels,
      "labels must be integer class ids for softmax_cross_entropy_with_integer_labels; "
      "got dtype {dtype}. For one-hot or soft labels use softmax_cross_entropy.",
  )
  if ignore_index is not None and not isinstance(ignore_index, (int, np.integer)):
    raise TypeError(f"ignore_index must be an int or None; got {ignore_index!r}.")
  layout = to_class_layout(logits, axis, where)
  if labels.shape != layout.batch_shape:
    raise ValueError(
        f"labels of shape {labels.shape} do not match logits of shape {logits.shape}: "
        f"with the class axis {axis!r} removed the labels must have shape "
        f"{layout.batch_shape}."
    )
  if vocab_axis is not None and not isinstance(axis, (int, np.integer)):
    raise ValueError(f"vocab_axis needs a single class axis; got axis={axis!r}.")
  if class_weights is not None:
    class_weights = jnp.asarray(class_weights)
    if not jnp.issubdtype(class_weights.dtype, jnp.floating):
      class_weights = class_weights.astype(_dtypes.loss_dtype(logits.dtype))
    if class_weights.shape != (layout.num_classes,):
      raise ValueError(
          f"class_weights must have shape ({layout.num_classes},), one weight per class of "
          f"logits of shape {logits.shape}; got shape {class_weights.shape}."
      )
  shards_classes = layout.num_classes if vocab_axis is None else None
  if shards_classes is not None:
    check_concrete_labels(labels_in, shards_classes, ignore_index)
  if check_labels:
    check_traced_labels(
        labels, VocabShards(vocab_axis, layout.logits.shape[-1]).num_classes, ignore_index
    )

  if labels.size == 0:
    # An empty batch: nothing to gather or scatter (checkify's index checks cannot
    # take an empty gather). The losses are an empty array, their sum and mean 0.
    losses = jnp.zeros(labels.shape, _dtypes.loss_dtype(logits.dtype))
    return reduce_losses(losses, reduction)
  labels = like_logits(labels, layout.logits, tuple(range(labels.ndim)))
  if class_weights is not None:
    # One weight per class, gathered by label: kept whole on every device (it is small).
    class_weights = whole(class_weights)
  counts = layout.counted(VocabShards(vocab_axis, layout.logits.shape[-1]).any_shard)
  if ignore_index is not None:
    counts &= labels != ignore_index
  cfg = _IntConfig(float(label_smoothing), float(z_loss), vocab_axis)
  losses = _int_ce(layout.logits, labels, layout.class_mask, class_weights, counts, cfg)
  weights = None
  if reduction == "mean":
    ct = losses.dtype
    weights = counts.astype(ct)
    if class_weights is not None:
      shards = VocabShards(vocab_axis, layout.logits.shape[-1])
      local_idx, here = shards.local_index(labels)
      w_label = jnp.where(here, take(class_weights.astype(ct), local_idx), 0.0)
      weights = weights * shards.psum((w_label,))[0]
  return reduce_losses(losses, reduction, weights)


# --------------------------------------------------------------------- soft labels


class _SoftConfig(NamedTuple):
  label_smoothing: float
  z_loss: float


def _targets(labels, class_mask, eps, ct):
  """``(1 - eps) * labels + eps / K`` over the classes left by the mask (0 elsewhere)."""
  t = labels.astype(ct)
  if class_mask is not None:
    t = jnp.where(class_mask, t, 0.0)
  if eps > 0:
    valid = 1.0 if class_mask is None else class_mask.astype(ct)
    # A row with every class masked has n_valid = 0 and does not count; 1 keeps the
    # division by zero out of the graph.
    n_valid = (
        t.shape[-1] if class_mask is None
        else jnp.maximum(jnp.sum(valid, -1, keepdims=True), 1.0)
    )
    t = (1.0 - eps) * t + (eps / n_valid) * valid
  return t


def shift_floor(ct) -> float:
  """The soft-label loss's floor on ``x - max``: the float just above ``-finfo.max``.

  Not ``-finfo.max`` itself, the floor of the row max: XLA would merge the two
  constants' logits-sized broadcasts into one and write it out (16 MiB at 512 x 8192).
  """
  big = np.finfo(ct).max
  return float(np.nextafter(-big, np.asarray(0, big.dtype)))


def _sum_allowing_inf(t: jax.Array, d: jax.Array) -> jax.Array:
  """``sum_j t_j d_j`` over the last axis for ``d`` capped at ``big``, with ``0 * inf = 0``.

  Each term is ``t_j ((max - x_j) + log_sum)``: non-negative, small numbers, no rounding
  at the scale of the max. The distance of a ``-inf`` logit is capped at about ``big``,
  the largest float (the forward floors the shifted logits), so a zero target
  there adds 0, and any target mass above ``2**-64`` there makes the row's sum
  ``M = big * 2**-64`` or more (1.8e19 in float32, 9.7e288 in float64), which reads as
  ``inf``, as it should (and ``-M`` or less, from a negative mass, ``-inf``). Arithmetic
  and selects per row, after the sum: a select per logit (``where(t == 0, 0, t * d)``)
  would keep XLA:CPU from fusing the sum with the shift. The price: a row whose loss
  is ``M`` or more is ``inf``, and a mass of at most ``2**-64`` on a ``-inf`` logit
  adds ``mass * big`` (less than ``M``), not ``inf``.
  """
  big = jnp.finfo(d.dtype).max
  total = reduce_rows(jnp.sum, t * d, (d.ndim - 1,))
  # A negative mass (not a probability) on a -inf logit reads as -inf, its limit.
  m = big * 2.0**-64
  return jnp.where(total >= m, jnp.inf, jnp.where(total <= -m, -jnp.inf, total))


def _soft_fwd(logits, labels, class_mask, counts, cfg):
  ct = _dtypes.loss_dtype(logits.dtype)
  eps, z = cfg.label_smoothing, cfg.z_loss
  x = mask_logits(logits.astype(ct), class_mask)
  t = _targets(labels, class_mask, eps, ct)
  big = jnp.finfo(ct).max
  floor = shift_floor(ct)
  if soft_loss_in_separate_sweeps(logits.dtype, x.shape[-1]):
    # Three sweeps that share no logits-sized value: the max, the sum of exp(x - m)
    # and the loss's sum. m is the max over x and -big (the reduction's initial
    # value), so a row with no finite logit has exp(-inf) = 0 terms, never -inf - -inf;
    # the loss's shift max(m, -big) is the same number, spelled apart so that XLA does
    # not write x - m out for both sweeps to read.
    row_max = reduce_rows(max_at_least(float(-big)), lax.stop_gradient(x), (x.ndim - 1,), True)
    sum_exp = reduce_rows(jnp.sum, jnp.exp(x - row_max), (x.ndim - 1,), True)
    offset = jnp.maximum(row_max, -big)
    distance = jnp.minimum(offset - x, -floor)  # max - x, capped at about big
    log_sum = safe_log_sum(sum_exp)
    loss = _sum_allowing_inf(t, log_sum + distance)
  else:
    # The shift: the row max, or -big on a row with no finite logit (whose logits stay
    # -inf after it, never -inf - -inf).
    if jnp.dtype(logits.dtype).itemsize < 4:
      # Half precision: the max in the logits' own dtype (exact), read straight from
      # them and floored per row, as optax's loss does; a max of the float32 copy
      # floored per logit fused with the shift into a kernel that ran 1.2-1.3x
      # optax's max and shift (bfloat16, 1024-131072 classes).
      row_max = reduce_rows(
          functools.partial(jnp.max, initial=-jnp.inf),
          lax.stop_gradient(mask_logits(logits, class_mask)), (x.ndim - 1,), True)
      row_max = offset = jnp.maximum(row_max.astype(ct), -big)
    else:
      # The floor sits inside the reduction and the max feeds the shift directly:
      # XLA:CPU then fuses max, shift and exp into one kernel (a per-row select in
      # between splits it into passes that write the logits out).
      row_max = offset = jnp.max(jnp.maximum(x, -big), -1, keepdims=True, initial=-jnp.inf)
    # Floored inside that kernel: a -inf logit's distance below the max is then about
    # big, not inf, and the loss's own sum needs no cap per logit.
    shifted = jnp.maximum(x - offset, floor)
    sum_exp = reduce_rows(jnp.sum, jnp.exp(shifted), (x.ndim - 1,), True)
    log_sum = safe_log_sum(sum_exp)
    loss = _sum_allowing_inf(t, log_sum - shifted)
  sum_exp, log_sum = sum_exp[..., 0], log_sum[..., 0]
  if z > 0:
    loss = loss + z * jnp.square(offset[..., 0] + log_sum)
  # as_one_buffer (a select on one number per example) keeps XLA from merging these
  # row sums into a caller's sum over the batch, which XLA:CPU does by writing out
  # logits-sized broadcasts of the per-row numbers (5x slower).
  loss = jnp.where(counts, as_one_buffer(loss), 0.0)
  return loss, (logits, labels, class_mask, counts, row_max[..., 0], sum_exp)


def _soft_bwd(cfg, res, g):
  logits, labels, class_mask, counts, offset, sum_exp = res
  ct = offset.dtype
  eps, z = cfg.label_smoothing, cfg.z_loss
  x = mask_logits(logits.astype(ct), class_mask)
  g = g.astype(ct)[..., None]
  offset, sum_exp = offset[..., None], sum_exp[..., None]
  t = _targets(labels, class_mask, eps, ct)
  # d loss / d x = coef * softmax(x) - t, coef = sum(t) (+ 2 z lse). Summed here, not in
  # the forward: XLA:CPU then folds the sum into the gradient's own pass over t.
  coef = reduce_rows(jnp.sum, t, (t.ndim - 1,), keepdims=True)
  if z > 0:
    coef = coef + 2.0 * z * (offset + safe_log_sum(sum_exp))
  # A row with no finite logit has softmax 0: its coefficient is moot (0, not -inf).
  coef = jnp.where(sum_exp == 0, 0.0, coef)
  # The forward's own exponential (the floor only where its sweeps are fused).
  apart = soft_loss_in_separate_sweeps(logits.dtype, x.shape[-1])
  floor = None if apart else shift_floor(ct)
  probs = scaled_probs(x, offset, sum_exp, g * coef, logits.dtype, floor=floor)
  dlogits = probs - g * t
  # d loss / d label_j = (1 - eps) * (lse - x_j): +inf at a -inf logit, 0 where masked.
  nll = safe_log_sum(sum_exp) + distance_below_max(x, offset)
  dlabels = times_allowing_inf((1.0 - eps) * g, nll)
  # Select, not multiply: a masked example full of NaN must get gradient 0.
  keep = counts[..., None] if class_mask is None else counts[..., None] & class_mask
  dlogits = jnp.where(counts[..., None], dlogits, 0.0)
  # Labels that broadcast to the logits get their cotangent summed back to their shape.
  dlabels = sum_to_operand(jnp.where(keep, dlabels, 0.0), labels)
  return dlogits.astype(logits.dtype), dlabels.astype(labels.dtype), None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _soft_ce(logits, labels, class_mask, counts, cfg):
  return _soft_fwd(logits, labels, class_mask, counts, cfg)[0]


_soft_ce.defvjp(_soft_fwd, _soft_bwd)


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "none",
) -> jax.Array:
  r"""Softmax cross-entropy against soft (or one-hot) labels, fused.

  With target :math:`t = (1 - \varepsilon)\, y + \varepsilon / K` (``y`` the labels,
  :math:`K` the number of classes left by ``where``):

  .. math::
    \ell = -\sum_j t_j \log \mathrm{softmax}(x)_j + z \cdot \mathrm{logsumexp}(x)^2

  computed as :math:`T \log\sum_j e^{x_j - m} + \sum_j t_j (m - x_j)` with
  :math:`T = \sum_j t_j`, so every term is non-negative. Labels need not sum to 1.
  The gradient is differentiable with respect to both arguments (distillation):
  ``d/dlogits = g * ((T + 2 z lse) softmax(x) - t)`` and
  ``d/dlabels = g * (1 - eps) * (lse - x)``.

  Edge cases: a ``-inf`` logit with zero target mass contributes nothing
  (``0 * log 0 = 0``) and gets a finite gradient; one carrying target mass gives
  loss ``inf`` (for a mass above ``2**-64``; a smaller one adds ``mass * finfo.max``
  instead). A loss of ``finfo.max / 2**64`` or more (1.8e19 in float32) is returned as
  ``inf``: the price of computing ``0 * log 0`` in one fused sweep on XLA:CPU.
  Classes masked out by ``where`` are left out, and so is any label mass on them (as
  in optax); examples masked out give loss 0 and gradient 0. A ``+inf`` logit gives
  NaN in its row (loss and gradients). bfloat16/float16 logits are computed in
  float32; the loss is float32 and each gradient has its argument's dtype.

  Args:
    logits: ``[..., num_classes]`` floating logits.
    labels: target probabilities (or one-hot rows), of ``logits``' shape or any shape
      that broadcasts to it (``[num_classes]``: one target for every example), as
      in optax; their gradient comes back in their own shape.
    axis: the class axis, or a tuple of axes.
    where: optional boolean mask per logit (``logits``' rank) or per example.
    label_smoothing: :math:`\varepsilon \in [0, 1]`.
    z_loss: coefficient of the ``logsumexp(x)**2`` auxiliary term.
    reduction: ``"none"`` (per example), ``"mean"`` (over the examples that count)
      or ``"sum"``.

  Returns:
    float32 (float64 for float64 logits) losses of the batch shape, or a scalar.

  Examples:
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> logits = jnp.array([[0.0, 0.0], [0.0, -jnp.inf]])
    >>> labels = jnp.array([[0.5, 0.5], [1.0, 0.0]])
    >>> print(jaxactv.softmax_cross_entropy(logits, labels))  # log 2, 0 log 0
    [0.6931 0.    ]
  """
  check_reduction(reduction)
  check_smoothing_and_z(label_smoothing, z_loss)
  logits = as_logits(logits)
  labels = jnp.asarray(labels)
  if not broadcasts_to(labels.shape, logits.shape):
    raise ValueError(
        f"labels of shape {labels.shape} do not broadcast to logits of shape "
        f"{logits.shape}: softmax_cross_entropy takes one target probability per logit "
        "(a shape like (num_classes,) is shared by every example). For class ids use "
        "softmax_cross_entropy_with_integer_labels."
    )
  if not jnp.issubdtype(labels.dtype, jnp.floating):
    labels = labels.astype(_dtypes.loss_dtype(logits.dtype))
  layout = to_class_layout(logits, axis, where)
  if label_smoothing > 0 and layout.logits.shape[-1] == 0:
    raise ValueError(
        f"label_smoothing={label_smoothing} spreads mass over the classes, but logits of "
        f"shape {logits.shape} have none along axis={axis}."
    )
  counts = layout.counted()
  # Broadcast on the class axes only: labels shared by the batch stay that small.
  labels_last = like_logits(broadcast_classes_last(labels, logits.shape, layout.axes),
                            layout.logits)
  cfg = _SoftConfig(float(label_smoothing), float(z_loss))
  losses = _soft_ce(layout.logits, labels_last, layout.class_mask, counts, cfg)
  return reduce_losses(losses, reduction, counts.astype(losses.dtype))


def check_smoothing_and_z(label_smoothing, z_loss) -> None:
  check_static_coefficient(label_smoothing, "label_smoothing", upper=1.0)
  check_static_coefficient(z_loss, "z_loss")
