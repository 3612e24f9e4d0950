"""Trace-time argument checks shared by every public op.

Each check looks only at shapes, dtypes and static options, never at array
values, so it runs once while tracing and costs nothing under ``jit``. Errors
name the offending argument, what it was, and what was expected.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

Axis = int | Sequence[int] | None

REDUCTIONS = ("none", "mean", "sum")


def as_activation_input(x: ArrayLike, name: str = "x") -> jax.Array:
  """``x`` as a floating array; integers and booleans are promoted like ``jax.nn`` does."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    raise TypeError(f"{name} must be a real floating array; got dtype {x.dtype}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.result_type(float))
  return x


def as_logits(x: ArrayLike, name: str = "logits") -> jax.Array:
  """``x`` as a floating array; integer, boolean or complex logits are an error."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"{name} must be a floating array (bfloat16, float16, float32 or float64); "
        f"got dtype {x.dtype}."
    )
  return x


def as_class_ids(labels: ArrayLike, message: str) -> jax.Array:
  """``labels`` as an integer array, widened to int32 from a narrower integer dtype.

  The ops compare each label with the class count and with class indices made in
  the labels' own dtype: in uint8 or int8 a count of 300 would wrap to 44, and a
  label of 200 would read as out of range (a NaN loss). int32 holds every value of
  the narrower dtypes, and any class count, exactly. ``message`` (with ``{dtype}``)
  is the error for labels that are not integers.
  """
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(message.format(dtype=labels.dtype))
  if labels.dtype.itemsize < 4:
    labels = labels.astype(jnp.int32)
  return labels


def canonical_axes(
    axis: Axis, ndim: int, name: str = "axis", allow_empty: bool = False
) -> tuple[int, ...]:
  """``axis`` (an int, a sequence of ints, or None for all) as non-negative ints, in order.

  The order is the caller's, as in optax: where several class axes are flattened
  into one, ``axis=(2, 1)`` makes the flat class index ``i2 * n1 + i1``. Negative
  axes count from the end; an axis named twice is an error. ``allow_empty`` admits
  ``()`` (and ``None`` on a rank-0 array), a reduction over no axis at all.
  """
  if axis is None:
    axis = tuple(range(ndim))
  axes = (axis,) if isinstance(axis, (int, np.integer)) else axis
  if not isinstance(axes, Sequence) or isinstance(axes, str) or not all(
      isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axes
  ):
    raise TypeError(f"{name} must be an int, a tuple of ints or None; got {axis!r}.")
  if len(axes) == 0 and not allow_empty:
    raise ValueError(f"{name} must name at least one axis; got {axis!r}.")
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
          f"{name}={axis!r} is out of range for an array of rank {ndim}: each axis must lie "
          f"in [{-ndim}, {ndim})."
      )
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{name}={axis!r} repeats an axis.")
  return tuple(out)


def as_mask(
    where: ArrayLike | None, shape: tuple[int, ...], name: str = "where"
) -> jax.Array | None:
  """A boolean mask broadcastable to ``shape`` (returned unbroadcast), or None."""
  if where is None:
    return None
  where = as_bool(where, name)
  if not broadcasts_to(where.shape, shape):
    raise ValueError(f"{name} of shape {where.shape} does not broadcast to shape {shape}.")
  return where


def as_bool(where: ArrayLike, name: str = "where") -> jax.Array:
  where = jnp.asarray(where)
  if where.dtype != jnp.bool_:
    raise TypeError(f"{name} must be a boolean mask; got dtype {where.dtype}.")
  return where


def broadcasts_to(src: tuple[int, ...], dst: tuple[int, ...]) -> bool:
  """Whether an array of shape ``src`` broadcasts to exactly ``dst``."""
  if len(src) > len(dst):
    return False
  return all(s in (1, d) for s, d in zip(src[::-1], dst[::-1], strict=False))


def check_reduction(reduction: str) -> str:
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}.")
  return reduction


def check_static_coefficient(value, name: str, upper: float | None = None) -> None:
  """A static (Python) float option in ``[0, upper]``: label_smoothing, z_loss."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f"{name} is a static option: pass a Python float, not a traced value.")
  check_nonnegative(value, name)
  if upper is not None and value > upper:
    raise ValueError(f"{name} must lie in [0, {upper:g}]; got {value!r}.")


def check_nonnegative(value, name: str) -> None:
  """``value`` >= 0 when it is a concrete number; traced values are accepted as they are."""
  if isinstance(value, jax.core.Tracer):
    return
  arr = np.asarray(value)
  if arr.dtype.kind not in "fiub":
    raise TypeError(f"{name} must be a real number; got {value!r}.")
  if np.any(np.isnan(arr)) or np.any(arr < 0):
    raise ValueError(f"{name} must be >= 0; got {value!r}.")
