"""Helpers shared by the loss tests: float64 views, the spec's reductions, one-jit vjps.

Nothing here calls jaxactv: these are the independent side of the comparisons.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("none", "mean", "sum")


def f64(a):
  """Any array (bfloat16 and float16 included) as float64 NumPy, exactly."""
  return np.asarray(a).astype(np.float64)


def canon_axes(axis, ndim):
  axis = (axis,) if isinstance(axis, int) else axis
  return tuple(sorted(a % ndim for a in axis))


def reduce_like_spec(per_example, reduction, weights):
  """The spec's reductions, written out: a mean over zero total weight is 0."""
  if reduction == "none":
    return per_example
  total = jnp.sum(per_example)
  if reduction == "sum":
    return total
  denom = jnp.sum(weights)
  return jnp.where(denom == 0, 0.0, total / jnp.where(denom == 0, 1.0, denom))


def all_reductions(make, args, cts, extra=()):
  """({reduction: value}, one vjp w.r.t. ``args``) of ``make(reduction)(*args, *extra)``.

  The three reductions share one backward pass: each gets its own cotangent and the vjp
  is their sum, so an error in any one gradient shows. ``extra`` (labels, masks,
  weights) are jit arguments rather than constants for XLA to fold. One jit.
  """

  @jax.jit
  def run(args, extra, cts):
    values, pull = jax.vjp(lambda *a: {r: make(r)(*a, *extra) for r in REDUCTIONS}, *args)
    return values, pull(cts)

  return run(tuple(jnp.asarray(a) for a in args), tuple(jnp.asarray(a) for a in extra),
             {r: jnp.asarray(c) for r, c in cts.items()})


def jaxprs_in_params(params):
  # The Jaxprs and ClosedJaxprs among an equation's params (scan, pjit, custom_vjp
  # bodies), as jax.extend.core.jaxprs_in_params, which jax 0.9.0 and older lack.
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(v, "eqns"):
        yield v
      elif hasattr(getattr(v, "jaxpr", None), "eqns"):
        yield v.jaxpr


def all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jaxprs_in_params(eqn.params):
      yield from all_eqns(sub)
