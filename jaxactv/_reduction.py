"""How per-example losses become the number a user asked for.

``reduction="none"`` returns the per-example losses. ``"sum"`` adds them.
``"mean"`` divides that sum by the total *weight* of the examples that count:
their number, or, with class weights, the sum of the weights of their target
classes (PyTorch's rule). Ignored and masked examples weigh 0. When the weights
sum to 0 (nothing counts, or every counted target's class weight is 0), the mean
is 0 and so is its gradient, where PyTorch returns NaN.

The denominator is differentiated like the rest: with class weights it depends on
them, and ``d mean / d w`` is the true derivative (PyTorch refuses to differentiate
with respect to ``weight``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reduce_losses(
    losses: jax.Array, reduction: str, weights: jax.Array | None = None
) -> jax.Array:
  """Reduce per-example ``losses`` (0 wherever an example does not count).

  Args:
    losses: per-example losses, already 0 for examples that do not count.
    reduction: "none", "mean" or "sum".
    weights: the mean's per-example denominators, same shape as ``losses``; None
      means every example counts once.
  """
  if reduction == "none":
    return losses
  total = jnp.sum(losses)
  if reduction == "sum":
    return total
  denom = jnp.asarray(losses.size, losses.dtype) if weights is None else jnp.sum(weights)
  denom = denom.astype(losses.dtype)
  # Both operands selected: with no weight, even an infinite total (and its gradient)
  # gives 0, and no 0 * inf is formed in the backward pass.
  empty = denom == 0
  return jnp.where(empty, 0.0, jnp.where(empty, 0.0, total) / jnp.where(empty, 1.0, denom))

