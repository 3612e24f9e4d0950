"""The one place jaxactv looks at the backend: a speed trade-off, never a numeric one.

A softmax backward needs ``exp(x - max)`` again. Written as the forward's very
expression, XLA keeps the forward's exponentials alive and reuses them (a
logits-sized float32 buffer); written differently (``exp(x - lse)``) it recomputes
them inside the gradient's single loop. Accelerators are bound by memory, so the
recomputation is free and saves a buffer plus two passes over it (for bfloat16
logits, more than half the traffic). XLA:CPU is bound by the exponential itself and
runs the recomputing form up to 1.5x slower than optax at float32, 1.05-1.15x at
bfloat16 (integer labels), where the reusing form ran 0.6-0.8x: once the label's
term fuses into the gradient's loop (``_cross_entropy._subtract_at``), the kept
float32 buffer costs less than the second exponential even for half-precision
logits. Both forms give the same numbers to rounding.

log_softmax makes the same choice with its residual: it keeps its output ``y`` and
takes ``exp(y)`` in the backward (accelerators), or keeps its input ``x`` and
rebuilds the forward pass from it with the same expressions, which XLA merges with
the forward's (CPU, float32 fwd+bwd: 1.2-1.5x -> 1.02-1.17x ``jax.nn``, geometric
mean 1.06x, in the full sweep with freed buffers reused). Each keeps one
logits-sized array, but where the caller keeps ``y`` too (a loss on it that needs it
in its own backward), the CPU form holds both ``x`` and ``y``. The two agree to
rounding except at a finite logit whose log-probability overflows to ``-inf`` (float16
``[60000, -10000]``): kept ``y`` reads that as a ``-inf`` logit (gradient 0), rebuilt
from ``x`` it gets its true gradient, ``g``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reuse_forward_exponentials(logits_dtype) -> bool:
  """True on CPU (reuse the forward's ``exp``), else False (recompute it)."""
  del logits_dtype  # every dtype, since the label's term fused into the loop
  return jax.default_backend() == "cpu"


def keep_sigmoid_of_minus_abs(input_dtype) -> bool:
  """True for half-precision inputs on CPU: the sigmoid rule keeps ``sigmoid(-|x|)``.

  The sigmoid's exact gradient needs ``s = sigmoid(-|x|)``, an exponential. Kept from
  the forward pass (a float32 array), the backward is two multiplies: bfloat16
  forward + backward then ran in about half of ``jax.nn``'s time on XLA:CPU, where
  recomputing the exponential ran at 0.95-1.0x. For float32 inputs XLA:CPU writes the
  kept ``s`` out and reads it back twice (it does not feed one producer to two loops),
  which ran slower than the second exponential. Accelerators are bound by memory:
  recomputing is free there, and the rule keeps only ``x``.
  """
  return jax.default_backend() == "cpu" and jnp.dtype(input_dtype).itemsize < 4


def row_sum_as_matvec(logits_dtype) -> bool:
  """True on CPU, for float32/64 logits: a cotangent's row sum is a product with ones.

  log_softmax's backward is ``where(y == -inf, 0, g - softmax(x) * sum(g))``. XLA:CPU
  fuses the arithmetic after ``sum(g)`` into its (YNNPACK) reduction kernel but not
  the select, so it writes ``g - softmax(x) * sum(g)`` out, reads it back and
  recomputes the select's operand: one logits-sized buffer and two passes more than needed.
  Summed as ``g @ ones``, the row sum is a dot that nothing fuses into, and the whole
  gradient is one loop (fwd+bwd at 4096 x 1024 float32: 1.29x -> 1.05x ``jax.nn``).
  Accelerators fuse the select, and reduce faster than they multiply by ones. The
  cotangent of bfloat16 logits (upcast to float32 first) is another program, which
  the dot slowed by up to 1.3x.
  """
  return jax.default_backend() == "cpu" and jnp.dtype(logits_dtype).itemsize >= 4


def exponentials_in_own_loop(logits_dtype, row_size: int) -> bool:
  """True on CPU for float32/64 rows of more than 1024 logits: ``exp`` gets a loop of its own.

  softmax's and log_softmax's forward pass is a max, ``exp`` of the shifted logits and
  their row sum. Up to 1024 logits per row XLA:CPU runs all of it as one YNNPACK kernel
  (as it does ``jax.nn``'s), the fastest form there. Above that it splits the pass, and
  the ``exp`` lands inside YNNPACK's reduction kernel, which evaluates it at about half
  the speed of an XLA loop: at 32 x 131072 float32 the fused sum of ``exp`` took 2.4 ms
  where the loop writing ``exp`` out took 1.3 ms and a sum of that 0.5 ms. A select
  that changes no value (``_softmax._exp_in_own_loop``) keeps YNNPACK from taking the
  ``exp``: the exponentials are written out once and summed, and softmax divides that
  same buffer. Forward at 8192-131072 classes, float32 (a sweep before, two after):
  log_softmax 1.16-1.21x ``jax.nn`` -> 0.90-1.05x, softmax 1.12-1.22x -> 0.97-1.15x.
  At 1024 the select would split the single kernel (2x).
  Half-precision rows keep the fused form, which already runs at 0.7-0.9x. Accelerators
  fuse the whole pass either way.
  """
  return (
      jax.default_backend() == "cpu" and jnp.dtype(logits_dtype).itemsize >= 4
      and row_size > 1024
  )


def soft_loss_in_separate_sweeps(logits_dtype, row_size: int) -> bool:
  """True on CPU for float32/64 rows of more than 1024 logits: the soft-label loss's
  three sweeps share no logits-sized value (``_cross_entropy._soft_fwd``).

  The loss needs the row max, the sum of ``exp(x - max)`` and ``sum(t * (lse - x))``.
  Up to 1024 logits per row XLA:CPU fuses max, shift and exponential into one YNNPACK
  kernel, as it does optax's. Above that it writes the shifted logits out for the
  other two sweeps to read; spelled so that nothing is shared, each sweep reads the
  logits afresh and nothing is written: forward at 2048-32768 classes went from
  1.1-1.2x optax to 0.85-0.9x. Half-precision logits pay for a float32 conversion in
  every sweep and keep the shared form, with the max taken in their own dtype (the
  three sweeps ran 1.15-1.2x optax). Accelerators fuse the sweeps either way.
  """
  return (
      jax.default_backend() == "cpu" and jnp.dtype(logits_dtype).itemsize >= 4
      and row_size > 1024
  )


def long_row_piece(row_size: int) -> int | None:
  """On CPU, the piece length a row of more than 32768 values is reduced in, else None.

  YNNPACK, which runs XLA:CPU's row reductions, slows down once a row outgrows
  32768 float32 values: at 32 x 131072 float32 a row sum of ``exp(x - m)`` took
  2.5 ms and a max 0.44 ms, where the same data as 512 rows of 8192 took 1.5 ms and
  0.27 ms (128 x 32768 runs at the short rows' speed). So a long row is reduced in
  pieces, the partial results behind an optimisation barrier (XLA would merge the two
  reductions back into one) and then reduced across the pieces
  (``_arith.reduce_rows``). The piece is the largest divisor of the row length
  between 2048 and 16384; a length with none is reduced whole. Accelerators reduce
  long rows at full speed.
  """
  if jax.default_backend() != "cpu" or row_size <= 32768:
    return None
  return next((p for p in range(16384, 2047, -1) if row_size % p == 0), None)


# The fused linear ops (jaxactv._linear_blocks). Measured on a 2-core AMD EPYC (AVX2, no
# native bfloat16), jax 0.10.2, N x D x V = 1024 x 256 x 131072 and 2048 x 256 x 32768,
# value and gradient: the three forms below took the bfloat16 loss from 1.13-1.39x to
# 0.81-0.83x the unfused x @ w + optax, and the float32 one from 1.01-1.09x to
# 0.60-0.85x (benchmarks/results/ at 1f04766, glibc's default allocator; with freed
# buffers reused the unfused loss runs faster, see benchmarks/README.md). Like every
# choice here, they follow the backend that traces the program: jax.export for another
# platform keeps the tracing one's.


def upcast_half_matmul_operands(operand_dtype) -> bool:
  """True for half-precision matmul operands on CPU: convert them to float32 first.

  XLA:CPU runs a bfloat16 x bfloat16 dot accumulated in float32
  (``preferred_element_type``) about 2x slower than the float32 dot of the same
  operands converted. The conversion is exact, and so is every product (of two 8- or
  11-bit significands) in float32, so only the summation order may differ. The
  converts stay inside the token loop, on one slice of ``w`` at a time, and only
  where that float32 slice fits the slice budget (``_linear_blocks.matmul``).
  Accelerators run the mixed-precision dot natively.
  """
  return jax.default_backend() == "cpu" and jnp.dtype(operand_dtype).itemsize < 4


def transpose_dw_operand() -> bool:
  """True on CPU: ``dw = x^T dz`` takes ``x^T`` (``[D, rows]``) as a buffer of its own.

  XLA:CPU runs a dot that contracts the leading axes of both operands about 4x slower
  than the same dot with the small operand transposed first (behind an optimisation
  barrier, or XLA folds the transpose back into the dot). Accelerators' matmuls take
  either layout at one speed.
  """
  return jax.default_backend() == "cpu"


def kept_sweep_width() -> int:
  """Classes per slice of the gradient's sweep over a kept block: 1024 on CPU, else 32768.

  When the forward pass of the fused linear loss keeps a chunk's logits, its gradient
  walks them a slice at a time: each slice's ``dz`` feeds ``dx += dz w_k^T`` and
  ``dw_k += x^T dz``, and only the slice's ``dz`` and ``dw`` share exist. On CPU
  narrow slices keep those, and the slice of ``w``, in cache: value-and-grad at
  1024 x 256 x 131072 float32 ran 0.98-1.11x the unfused loss with 512-2048
  classes per slice, 1.16x with 4096 and 1.25x with 16384. Accelerators want wider
  matmuls; 32768, their whole-vocabulary slice before kept blocks, is not measured.
  """
  return 1024 if jax.default_backend() == "cpu" else 32768


def min_chunk_rows() -> int:
  """The fewest token rows per chunk in the default chunk rule: 512 on CPU, else 128.

  On CPU more rows give the ``dw`` matmul a longer contraction: 512 x 8192 blocks ran
  0.6-0.9x the unfused loss where 128 x 32768 ran 0.75-1.09x, at less memory, though
  the narrower slices make the backward recompute the logits. On accelerators 128
  rows already fill the matmul units, and a whole-vocabulary slice saves that
  recomputation.
  """
  return 512 if jax.default_backend() == "cpu" else 128
