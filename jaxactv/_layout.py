"""The canonical layout every softmax loss works in: ``[*batch, num_classes]``.

Users may name any axis, or a tuple of axes, as the class axis (as in optax).
The losses move those axes to the end and flatten them into one, so each fused
kernel is written once, for a trailing class axis; a label is then a flat index
into the class block (``jnp.ravel_multi_index`` order over the axes *in the order
given*: ``axis=(2, 1)`` reads label ``i2 * n1 + i1``, as optax does). The move is free when
the class axes already trail; otherwise XLA transposes once.

``where`` follows optax: a mask with ``logits.ndim`` dimensions masks single
logits (classes left out of the softmax); a mask with the batch's rank masks
whole examples.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxactv._sharding import like_logits
from jaxactv._validation import Axis, as_bool, broadcasts_to, canonical_axes


class ClassLayout(NamedTuple):
  logits: jax.Array  # [*batch, K]
  class_mask: jax.Array | None  # bool [*batch or 1, K], broadcastable to logits, or None
  example_mask: jax.Array | None  # bool [*batch] (broadcast), or None
  batch_shape: tuple[int, ...]
  num_classes: int
  axes: tuple[int, ...] = ()  # the class axes of the caller's layout, in the given order

  def counted(self, any_shard=lambda kept: kept) -> jax.Array:
    """bool ``[*batch]``: the examples not masked out that keep at least one class.

    ``any_shard`` combines the per-example "some class kept" flags across the shards
    of a split class axis (see ``VocabShards.any_shard``).
    """
    counts = jnp.ones(self.batch_shape, bool)
    if self.example_mask is not None:
      counts &= self.example_mask
    if self.class_mask is not None:
      counts &= any_shard(jnp.any(self.class_mask, -1))
    return counts


def classes_last(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """``x`` with ``axes`` moved to the end in the given order and flattened into one.

  With ``axes = (2, 1)`` the flat class index is ``i2 * n1 + i1`` (optax's rule).
  """
  batch = tuple(d for d in range(x.ndim) if d not in axes)
  if batch + axes != tuple(range(x.ndim)):
    x = jnp.transpose(x, batch + axes)
  return x.reshape((*x.shape[: len(batch)], math.prod(x.shape[len(batch) :])))


def to_class_layout(logits: jax.Array, axis: Axis, where: ArrayLike | None) -> ClassLayout:
  axes = canonical_axes(axis, logits.ndim)
  batch_shape = tuple(n for d, n in enumerate(logits.shape) if d not in axes)
  num_classes = math.prod(logits.shape[d] for d in axes)
  class_mask = example_mask = None
  if where is not None:
    where = as_bool(where)
    if where.ndim == logits.ndim:
      if not broadcasts_to(where.shape, logits.shape):
        raise ValueError(
            f"where of shape {where.shape} does not broadcast to logits of shape {logits.shape}."
        )
      class_mask = broadcast_classes_last(where, logits.shape, axes)
    elif broadcasts_to(where.shape, batch_shape):
      example_mask = jnp.broadcast_to(where, batch_shape)
    else:
      raise ValueError(
          f"where of shape {where.shape} matches neither the logits {logits.shape} (a mask "
          f"per logit) nor the batch shape {batch_shape} (a mask per example)."
      )
  logits = classes_last(logits, axes)
  # On an Explicit mesh the masks are laid out like the logits (see _sharding.py).
  class_mask = like_logits(class_mask, logits)
  example_mask = like_logits(example_mask, logits, tuple(range(len(batch_shape))))
  return ClassLayout(logits, class_mask, example_mask, batch_shape, num_classes, axes)


def broadcast_classes_last(a: jax.Array, shape: tuple[int, ...], axes) -> jax.Array:
  """``a`` (broadcastable to ``shape``) in the class layout, broadcast on the class axes only.

  A mask or a label array shared by all examples stays that small (its batch axes
  keep size 1), and so does the residual a backward pass keeps.
  """
  a = a.reshape((1,) * (len(shape) - a.ndim) + a.shape)
  target = tuple(n if d in axes else a.shape[d] for d, n in enumerate(shape))
  return classes_last(jnp.broadcast_to(a, target), axes)
