"""Vocabulary (class) parallelism: one softmax spread over the devices of a mesh axis.

Inside ``jax.shard_map``, each device along ``vocab_axis`` holds a contiguous
slice of the classes. A loss combines the per-device row maxima with ``pmax`` and
its per-device sums with a single ``psum``; the class slices are never gathered.
With ``vocab_axis=None`` every collective is the identity, so one code path
serves both cases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


class VocabShards:
  """Collectives over ``axis`` (or no-ops when ``axis`` is None) for a class slice."""

  def __init__(self, axis: str | None, local_classes: int):
    self.axis = axis
    self.local_classes = local_classes
    if axis is None:
      self.num_shards = 1
      self.offset = 0
    else:
      try:
        self.num_shards = lax.axis_size(axis)
        self.offset = lax.axis_index(axis) * local_classes
      except NameError as e:
        raise ValueError(
            f"vocab_axis={axis!r} names a mesh axis, so this loss must run inside "
            "jax.shard_map over a mesh with that axis, with the class dimension of its "
            f"operands sharded over it, e.g. jax.shard_map(f, mesh=mesh, in_specs=(P(None, "
            f"{axis!r}), P()), out_specs=P()). Outside shard_map, leave vocab_axis=None "
            "(plain jit with NamedSharding inputs needs no flag)."
        ) from e

  @property
  def num_classes(self) -> int:
    return self.local_classes * self.num_shards

  def pmax(self, x: jax.Array) -> jax.Array:
    return x if self.axis is None else lax.pmax(x, self.axis)

  def psum(self, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """Sum each array over the shards, in one collective for all of them."""
    if self.axis is None:
      return xs
    stacked = lax.psum(jnp.stack(jnp.broadcast_arrays(*xs)), self.axis)
    return tuple(stacked[i] for i in range(len(xs)))

  def local_index(self, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each global class id as an index into this shard's slice, and whether it is here."""
    local = labels - self.offset
    here = (local >= 0) & (local < self.local_classes)
    return jnp.clip(local, 0, self.local_classes - 1), here
