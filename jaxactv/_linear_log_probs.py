"""Fused per-token log-probabilities (and entropies) of ``softmax(x @ w + bias)``.

Policy-gradient trainers (PPO, GRPO) need, for every sampled token, the
log-probability of that token under the policy at a temperature, and often the
entropy of the token's distribution, both differentiable under whatever per-token
loss follows. ``linear_log_probs`` computes them from the hidden states without
the ``[tokens, vocab]`` logits, walking the same chunks and slices as
``linear_softmax_cross_entropy`` (``jaxactv._linear_blocks``).

Forward, per row, one sweep over the classes keeps three online sums against the
running max ``m``: ``s = sum_j e^{z_j - m}``, ``s1 = sum_j e^{z_j - m} (z_j - m)``
and the token's logit ``z_t``. Then ``lse = m + log s``, ``log p_t = (z_t - m) -
log s`` and ``H = log s - s1 / s`` (two non-negative terms). The backward pass
recomputes each block and applies

    d/dz_j = g_lp ([j = t] - p_j) - g_H p_j (log p_j + H),

so a value-and-grad costs four matmuls; a forward pass alone, one.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxactv import _dtypes
from jaxactv._cross_entropy import check_concrete_labels
from jaxactv._linear_blocks import (
    LogitsSpec,
    Tokens,
    block_logits,
    chunk_sizes,
    grad_accumulators,
    grad_sweep,
    is_label,
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
from jaxactv._linear_cross_entropy import _check_linear_inputs, logits_spec, token_mask
from jaxactv._vocab_parallel import VocabShards, cotangent_like, vary_like


class _Config(NamedTuple):
  logits: LogitsSpec
  rows: int
  slice_width: int
  vocab_axis: str | None
  entropy: bool
  x_dtype: np.dtype
  w_dtype: np.dtype
  b_dtype: np.dtype | None


def _chunk_stats(xc, w, bias, tc, cfg, shards, ct):
  """Per row: ``(lse, log p_token, entropy or None)`` over the whole vocabulary."""
  local_idx, here = shards.local_index(tc)

  def fold(carry, lo, w_k, cls_k):
    m, s, s1, z_tok = carry
    z = block_logits(xc, w_k, cls_k[0], cfg.logits, ct)
    m_new = jnp.maximum(m, jnp.max(z, -1))
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    old = jnp.where(jnp.isfinite(m), m, shift)
    # Rescale the sums taken against the old max: e^{z - old} = a e^{z - shift}.
    a = jnp.exp(old - shift)
    if s1 is not None:
      s1 = a * (s1 + (old - shift) * s)
    s = a * s
    d = z - shift[:, None]
    e = jnp.exp(d)
    s = s + jnp.sum(e, -1)
    if s1 is not None:
      s1 = s1 + jnp.sum(jnp.where(e > 0, e * d, 0.0), -1)  # 0 * -inf is 0 here
    return m_new, s, s1, z_tok + label_value(z, lo, local_idx, here)

  zeros = row_zeros(xc, ct, w, bias)
  init = (zeros - jnp.inf, zeros, zeros if cfg.entropy else None, zeros)
  m, s, s1, z_tok = over_slices(w, (bias,), cfg.slice_width, fold, init)
  if shards.axis is not None:
    m_all = shards.pmax(m)
    a = jnp.exp(m - m_all)
    if s1 is not None:
      s1 = a * (s1 + (m - m_all) * s)
    s = a * s
    sums = shards.psum(tuple(t for t in (s, z_tok, s1) if t is not None))
    s, z_tok = sums[:2]
    s1 = sums[2] if s1 is not None else None
    m = m_all
  log_sum = jnp.log(s)
  log_p = (z_tok - m) - log_sum
  ent = None if s1 is None else log_sum - s1 / s
  return m + log_sum, log_p, ent


def _lp_dlogits(lse, ent, g_lp, g_ent, local_idx, here):
  """``dlogits(z, lo, cls_k)`` for per-row cotangents of ``log p_t`` and ``H``."""

  def dlogits(z, lo, cls_k):
    del cls_k
    log_p = z - lse[:, None]
    p = jnp.exp(log_p)
    inner = g_lp[:, None] if g_ent is None else g_lp[:, None] + g_ent[:, None] * (
        log_p + ent[:, None]
    )
    return jnp.where(is_label(z, lo, local_idx, here), g_lp[:, None], 0.0) - p * inner

  return dlogits


def _scan(x2, w, bias, tokens_ids, sc, cfg, saved=None, g=None):
  """Forward (``saved`` None): per-row ``(log_p, entropy, lse)``, 0 / NaN by ``sc``.

  Backward: ``saved = (lse, entropy)`` and ``g = (g_lp, g_ent)`` the per-row
  cotangents (already scaled by ``sc``); returns the partial ``(dx, dw, db)``.
  """
  ct = _dtypes.compute_dtype(jnp.promote_types(x2.dtype, w.dtype))
  shards = VocabShards(cfg.vocab_axis, w.shape[1], sharded=w)
  tokens = Tokens.make(x2.shape[0], cfg.rows, token_shards(x2))
  x_cols = tokens.columns(x2)

  if saved is None:

    def body(carry, c, rows_in):
      tc, scc = rows_in
      lse, log_p, ent = _chunk_stats(take_chunk(x_cols, c), w, bias, tc, cfg, shards, ct)
      masked = lambda a: None if a is None else jnp.where(scc == 0, 0.0, a * scc)
      return carry, (masked(log_p), masked(ent), lse)

    _, outs = scan_chunks(tokens, (tokens_ids, sc), body, None)
    return outs

  per_token = (tokens_ids, *saved, *g)
  per_token = tuple(a for a in per_token if a is not None)

  def grad_body(carry, c, rows_in):
    tc, lse = rows_in[:2]
    ent = rows_in[2] if cfg.entropy else None
    g_lp = rows_in[3 if cfg.entropy else 2]
    g_ent = rows_in[4] if cfg.entropy else None
    xc = take_chunk(x_cols, c)
    local_idx, here = shards.local_index(tc)
    count = g_lp != 0 if g_ent is None else (g_lp != 0) | (g_ent != 0)
    dlogits = _lp_dlogits(lse, ent, g_lp, g_ent, local_idx, here)
    dx_cols, acc = carry
    dxc, acc = grad_sweep(
        xc, w, (bias,), None, cfg.logits, cfg.slice_width, dlogits, count, ct, acc
    )
    return (put_chunk(dx_cols, c, dxc), acc), ()

  dx_dtype = x2.dtype if cfg.vocab_axis is None else ct
  dx_cols = vary_like(jnp.zeros_like(x_cols, dx_dtype), x_cols, w, bias)
  init = (dx_cols, grad_accumulators(x_cols, w, bias, ct))
  (dx_cols, (dw, db)), _ = scan_chunks(tokens, per_token, grad_body, init)
  return tokens.uncolumned(dx_cols), dw, db


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _log_probs(x2, w, bias, tokens_ids, sc, cfg):
  log_p, ent, _ = _scan(x2, w, bias, tokens_ids, sc, cfg)
  return log_p, ent


def _log_probs_fwd(x2, w, bias, tokens_ids, sc, cfg):
  log_p, ent, lse = _scan(x2, w, bias, tokens_ids, sc, cfg)
  # Residuals: the inputs (no copies) and two numbers per token.
  return (log_p, ent), (x2, w, bias, tokens_ids, sc, lse, ent)


def _log_probs_bwd(cfg, res, cts):
  x2, w, bias, tokens_ids, sc, lse, ent = res
  shards = VocabShards(cfg.vocab_axis, w.shape[1], sharded=w)
  # Select, not multiply: a masked token's cotangent is 0 even where sc is 0 and g NaN.
  scaled = lambda g: None if g is None else jnp.where(
      sc == 0, 0.0, sc * shards.full_cotangent(g.astype(sc.dtype))
  )
  g_lp, g_ent = cts
  g_lp = jnp.zeros_like(sc) if g_lp is None else scaled(g_lp)
  g_ent = None if not cfg.entropy else (jnp.zeros_like(sc) if g_ent is None else scaled(g_ent))
  saved = (lse, ent if cfg.entropy else None)
  dx, dw, db = _scan(x2, w, bias, tokens_ids, sc, cfg, saved=saved, g=(g_lp, g_ent))
  dx = cotangent_like(dx, x2).astype(cfg.x_dtype)
  dw = cotangent_like(dw, w).astype(cfg.w_dtype)
  db = None if db is None else cotangent_like(db, bias).astype(cfg.b_dtype)
  return dx, dw, db, None, None


_log_probs.defvjp(_log_probs_fwd, _log_probs_bwd)


def linear_log_probs(
    x: ArrayLike,
    w: ArrayLike,
    tokens: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
    where: ArrayLike | None = None,
    return_entropy: bool = False,
    chunk_size: int | tuple[int, int] | None = None,
    vocab_axis: str | None = None,
):
  r"""Log-probability of each token under ``softmax(cap((x @ w + bias) / T))``, fused.

  With logits :math:`z = \mathrm{cap}((x w + b) / T)` (``cap(u) = c tanh(u / c)``
  for ``logit_softcap=c``, else the identity) and :math:`p = \mathrm{softmax}(z)`,
  token :math:`i` with id :math:`t` gets

  .. math::
    \log p_t = z_t - \mathrm{logsumexp}(z), \qquad H = -\sum_j p_j \log p_j

  computed without the ``[tokens, vocab]`` logits: chunks of tokens, slices of
  classes, as ``linear_softmax_cross_entropy`` (same chunk rule and ``chunk_size``).
  Both outputs are differentiable with respect to ``x``, ``w`` and ``bias`` under
  any per-token cotangents (a ``jax.custom_vjp`` whose backward pass recomputes
  each block: four matmuls for value and gradient, one for the value alone):

  .. math::
    \frac{\partial \log p_t}{\partial z_j} = [j = t] - p_j, \qquad
    \frac{\partial H}{\partial z_j} = -p_j (\log p_j + H)

  times the chain-rule factors of the cap and the temperature.

  Edge cases: tokens with ``where`` False give 0 for both outputs and gradient 0
  (NaN hidden states on them never reach ``dw``). A token id outside ``[0, V)``
  raises ``ValueError`` when ``tokens`` is concrete; under ``jit`` both outputs of
  that token, and their gradients, are NaN.

  Args:
    x: ``[..., D]`` hidden states (bfloat16 or float32).
    w: ``[D, V]`` weights (with ``vocab_axis``, this device's ``[D, V / shards]``).
    tokens: integer ids of shape ``x.shape[:-1]`` (global ids), e.g. the sampled
      tokens.
    bias: optional ``[V]`` bias (the local slice with ``vocab_axis``).
    temperature: ``T > 0``, a static Python float (the sampler's temperature).
    logit_softcap: ``c > 0`` or None, applied after the temperature.
    where: optional boolean mask of ``tokens``' shape.
    return_entropy: also return each token's entropy.
    chunk_size: None, rows per chunk, or ``(rows, classes per slice)``.
    vocab_axis: inside ``jax.shard_map``, the mesh axis over which ``w``'s classes
      are split; the entropy is that of the global distribution.

  Returns:
    float32 (float64 for float64 inputs) ``log_probs`` of ``tokens``' shape, or
    ``(log_probs, entropy)`` with ``return_entropy=True``.

  Examples:
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> x, w = jnp.ones((3, 2)), jnp.zeros((2, 4))  # all logits 0: p = 1/4 everywhere
    >>> tokens = jnp.array([0, 3, 1])
    >>> log_p, entropy = jaxactv.linear_log_probs(x, w, tokens, return_entropy=True)
    >>> print(log_p)  # -log 4
    [-1.3863 -1.3863 -1.3863]
    >>> print(entropy)  # log 4
    [1.3863 1.3863 1.3863]
    >>> mask = jnp.array([True, False, True])  # the second token does not count
    >>> print(jaxactv.linear_log_probs(x, w, tokens, where=mask))
    [-1.3863  0.     -1.3863]
  """
  x, w, tokens_in, tokens, bias = _check_linear_inputs(x, w, tokens, bias, "tokens")
  spec = logits_spec(logit_softcap, temperature)
  if not isinstance(return_entropy, bool):
    raise TypeError(f"return_entropy must be a bool; got {return_entropy!r}.")
  shards = VocabShards(vocab_axis, w.shape[1])
  if vocab_axis is None:
    check_concrete_labels(tokens_in, w.shape[1], None)
  num_tokens = math.prod(x.shape[:-1])
  rows, width = chunk_sizes(chunk_size, num_tokens, w.shape[1], w.shape[0])
  x2 = x.reshape(num_tokens, x.shape[-1])
  ct = _dtypes.compute_dtype(jnp.promote_types(x.dtype, w.dtype))
  flat = like_tokens(tokens.reshape(num_tokens), x2)
  counts = token_mask(where, tokens.shape, x2)
  in_range = (flat >= 0) & (flat < shards.num_classes)
  sc = jnp.where(counts, jnp.where(in_range, 1.0, jnp.nan), 0.0).astype(ct)
  cfg = _Config(
      spec, rows, width, vocab_axis, return_entropy,
      x.dtype, w.dtype, None if bias is None else bias.dtype,
  )
  log_p, ent = _log_probs(x2, w, like_classes(bias, w), flat, sc, cfg)
  log_p = log_p.reshape(tokens.shape)
  if not return_entropy:
    return log_p
  return log_p, ent.reshape(tokens.shape)
