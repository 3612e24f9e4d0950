"""Sharding in types: what an op does on a mesh whose axes are ``Explicit``.

``jax.make_mesh`` makes ``Explicit`` axes by default. An array's sharding is then
part of its type, and an operation whose output sharding is ambiguous raises
``ShardingTypeError`` rather than guess. Two things in jaxactv's ops are
ambiguous there, and each has one answer here:

* An auxiliary array (labels, masks, weights, targets) laid out differently from
  the logits it is combined with, typically replicated while the logits are
  split: it is resharded to the logits' layout at the op's entry, outside the
  ``custom_vjp`` (:func:`like_logits`). A replicated input is a local slice away
  from any layout, so this costs no communication, and autodiff transposes the
  reshard for the gradient.
* Picking, or updating, one class per example of class-split logits: a gather or
  scatter across devices. Spelled as a compare against the class index, fused into
  the sweep over the logits, it is local and the reduction over the classes is an
  all-reduce of one number per example (:func:`class_axis_is_split`).

On ``Auto`` meshes, under ``jax.shard_map`` and on one device nothing is typed as
sharded and every function here is the identity.
"""

from __future__ import annotations

from typing import overload

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P


def explicit_spec(a: jax.Array) -> tuple | None:
  """``a``'s partition spec, one entry per dimension, when ``a`` is typed as sharded."""
  sharding = getattr(jax.typeof(a), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  explicit = any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))
  if sharding is None or mesh is None or not explicit:
    return None
  spec = tuple(sharding.spec) + (None,) * (a.ndim - len(sharding.spec))
  return spec if any(s is not None for s in spec) else None


def class_axis_is_split(logits: jax.Array) -> bool:
  """Whether the last (class) axis of ``logits`` is typed as split over devices."""
  spec = explicit_spec(logits)
  return spec is not None and logits.ndim > 0 and spec[-1] is not None


def like_logits(a: jax.Array | None, logits: jax.Array, dims: tuple[int, ...] | None = None):
  """``a`` resharded so each of its dimensions is split like the logits' dimension it
  stands for; a no-op unless ``logits`` is typed as sharded.

  ``dims[i]`` is the logits' dimension that ``a``'s dimension ``i`` broadcasts
  against (default: right-aligned, as in NumPy broadcasting). Dimensions of size 1
  stay whole.
  """
  if a is None:
    return None
  spec = explicit_spec(logits)
  if spec is None:
    return a
  if dims is None:
    dims = tuple(range(logits.ndim - a.ndim, logits.ndim))
  want = tuple(
      None if a.shape[i] == 1 or a.shape[i] != logits.shape[d] else spec[d]
      for i, d in enumerate(dims)
  )
  if explicit_spec(a) == want or (explicit_spec(a) is None and not any(want)):
    return a
  mesh = jax.typeof(logits).sharding.mesh
  return jax.sharding.reshard(a, NamedSharding(mesh, P(*want)))


@overload
def whole(a: None) -> None: ...
@overload
def whole(a: jax.Array) -> jax.Array: ...
def whole(a):
  """``a`` replicated on every device if it is typed as split (a small array, such as
  one weight per class, that is gathered by label)."""
  if a is None or explicit_spec(a) is None:
    return a
  return jax.sharding.reshard(a, NamedSharding(jax.typeof(a).sharding.mesh, P()))


def take(table: jax.Array, index: jax.Array) -> jax.Array:
  """``table[index]`` for a whole (replicated) ``table``, laid out like ``index``."""
  spec = explicit_spec(index)
  if spec is None:
    return table[index]
  out = NamedSharding(jax.typeof(index).sharding.mesh, P(*spec))
  return table.at[index].get(out_sharding=out, mode="promise_in_bounds")


def same_layout_as(a: jax.Array, like: jax.Array) -> jax.Array:
  """``a`` laid out as ``like`` (same shape) when either is typed as sharded."""
  if explicit_spec(a) == explicit_spec(like):
    return a
  return jax.sharding.reshard(a, jax.typeof(like).sharding)
