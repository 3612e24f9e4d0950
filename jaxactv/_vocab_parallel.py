"""Vocabulary (class) parallelism: one softmax spread over the devices of a mesh axis.

Inside ``jax.shard_map``, each device along ``vocab_axis`` holds a contiguous
slice of the classes. A loss combines the per-device row maxima with ``pmax`` and
its per-device sums with a single ``psum``; the class slices are never gathered.
With ``vocab_axis=None`` every collective is the identity, so one code path
serves both cases.

Cotangents. A loss is replicated over the vocabulary axis while its gradient for
the class slices is not, and ``shard_map`` hands a replicated output's cotangent
to the devices in one of two ways. With ``check_vma=True`` (the default) every
device receives the whole cotangent and an input replicated over the axis must
get back a replicated cotangent: the partial ``dx`` of each shard is summed here.
With ``check_vma=False`` each device receives ``1/n`` of it and ``shard_map``
itself sums the cotangents of replicated inputs: the cotangent is summed here
first, and the partial ``dx`` is handed back as it is. Getting this wrong is off
by a factor of ``n``; the tests check both modes against the unsharded loss.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def _varying_axes(a: jax.Array) -> frozenset:
  """The mesh axes ``a`` varies over inside ``shard_map`` (empty when unchecked)."""
  aval = jax.typeof(a)
  vma: Any = getattr(aval, "vma", None)
  if vma is None:
    vma = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
  return frozenset(vma)


def vary_like(x: jax.Array, *operands: jax.Array | None) -> jax.Array:
  """``x`` typed as varying over every mesh axis any of ``operands`` varies over.

  A loop carry that starts as a constant (zeros, ``-inf``) but accumulates values
  built from the operands must have the type of those values from the first step:
  under ``check_vma=True`` on a ``(data, vocab)`` mesh, a ``dw`` accumulator varies
  over ``vocab`` (from ``w``) and over ``data`` (from the tokens). A no-op outside
  ``shard_map`` and under ``check_vma=False``, where nothing is typed as varying.
  """
  axes = frozenset().union(*(_varying_axes(o) for o in operands if o is not None))
  missing = tuple(sorted(axes - _varying_axes(x)))
  return lax.pcast(x, missing, to="varying") if missing else x


def cotangent_like(ct: jax.Array, primal: jax.Array) -> jax.Array:
  """The cotangent of ``primal`` from per-device partial sums ``ct``.

  Under ``check_vma=True`` an input that is replicated over a mesh axis (``w`` over
  ``data``, ``x`` over ``vocab``) must receive a cotangent replicated over it: the
  per-device partials are summed over exactly the axes ``ct`` varies over and
  ``primal`` does not. Under ``check_vma=False`` nothing is typed as varying and
  ``shard_map`` sums the cotangents of replicated inputs itself: a no-op.
  """
  extra = tuple(sorted(_varying_axes(ct) - _varying_axes(primal)))
  return lax.psum(ct, extra) if extra else ct


def _unknown_axis_message(axis) -> str:
  mesh = jax.sharding.get_abstract_mesh()
  manual = tuple(
      n for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
      if t == jax.sharding.AxisType.Manual
  )
  if manual:
    return (
        f"vocab_axis={axis!r} is not an axis of the enclosing jax.shard_map, whose mesh axes "
        f"are {manual}: name the axis the class dimension is split over."
    )
  return (
      f"vocab_axis={axis!r} names a mesh axis, but this loss runs outside jax.shard_map: "
      "call it inside jax.shard_map over a mesh with that axis, with the class dimension of "
      f"its operands sharded over it, e.g. jax.shard_map(f, mesh=mesh, in_specs=(P(None, "
      f"{axis!r}), P()), out_specs=P()). Outside shard_map leave vocab_axis=None: plain jit "
      "with NamedSharding inputs needs no flag."
  )


class VocabShards:
  """Collectives over ``axis`` (or no-ops when ``axis`` is None) for a class slice.

  ``sharded`` is an operand split over ``axis`` (the logits or the weights); its
  type tells whether ``shard_map`` checks replication (see the module docs).
  """

  def __init__(self, axis: str | None, local_classes: int, sharded: jax.Array | None = None):
    self.axis = axis
    self.local_classes = local_classes
    self.checked = sharded is not None and axis in _varying_axes(sharded)
    if axis is None:
      self.num_shards = 1
      self.offset: int | jax.Array = 0
    else:
      try:
        self.num_shards = lax.axis_size(axis)
        self.offset = lax.axis_index(axis) * local_classes
      except NameError as e:
        raise ValueError(_unknown_axis_message(axis)) from e

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

  def any_shard(self, flags: jax.Array) -> jax.Array:
    """A boolean that holds on any shard, on every shard."""
    if self.axis is None:
      return flags
    return lax.pmax(flags.astype(jnp.int32), self.axis) > 0

  def full_cotangent(self, g: jax.Array) -> jax.Array:
    """The whole cotangent of a replicated output, in either ``check_vma`` mode."""
    if self.axis is None or self.checked:
      return g
    return lax.psum(g, self.axis)

  def local_index(self, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each global class id as an index into this shard's slice, and whether it is here."""
    local = labels - self.offset
    here = (local >= 0) & (local < self.local_classes)
    return jnp.clip(local, 0, self.local_classes - 1), here
