"""The fused linear cross-entropy's three targets, measured side by side in one run.

    python benchmarks/linear_targets.py

1. Memory: value_and_grad w.r.t. (x, w) at N=8192, D=512, V=32768, float32: XLA's
   temp bytes (compiled.memory_analysis()) against the unfused x @ w + optax.
2. Time on this machine at N=2048, D=256, V=32768, float32: interleaved medians.
3. Accuracy: the loss and gradients against the unfused float32 computation, and
   bfloat16 inputs against float32 on the same bfloat16 values.

It prints ratios; it asserts nothing (the tests check correctness, not speed).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxactv


def fused(x, w, y):
  return jaxactv.linear_softmax_cross_entropy(x, w, y)


def unfused(x, w, y):
  logits = jnp.einsum("nd,dv->nv", x, w, preferred_element_type=jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def temp_bytes(f, *shapes):
  grad = jax.jit(jax.value_and_grad(f, (0, 1)))
  return grad.lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def interleaved_medians(fa, fb, args, rounds=7):
  jax.block_until_ready(fa(*args))
  jax.block_until_ready(fb(*args))
  times = ([], [])
  for r in range(rounds):
    order = (0, 1) if r % 2 == 0 else (1, 0)
    for k in order:
      f = (fa, fb)[k]
      t = time.perf_counter()
      jax.block_until_ready(f(*args))
      times[k].append(time.perf_counter() - t)
  return [1e3 * float(np.median(t)) for t in times]


def problem(n, d, v, dtype=jnp.float32, seed=0):
  kx, kw, ky = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (n, d), dtype)
  w = (jax.random.normal(kw, (d, v)) / np.sqrt(d)).astype(dtype)
  y = jax.random.randint(ky, (n,), 0, v)
  return x, w, y


def main():
  print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind})")
  n, d, v = 8192, 512, 32768
  shapes = (
      jax.ShapeDtypeStruct((n, d), jnp.float32),
      jax.ShapeDtypeStruct((d, v), jnp.float32),
      jax.ShapeDtypeStruct((n,), jnp.int32),
  )
  ours, theirs = temp_bytes(fused, *shapes), temp_bytes(unfused, *shapes)
  print(
      f"memory  N={n} D={d} V={v} f32 value_and_grad temp: fused {ours / 2**20:.1f} MiB, "
      f"unfused {theirs / 2**20:.1f} MiB, ratio {ours / theirs:.3f} (target <= 0.125)"
  )

  n, d, v = 2048, 256, 32768
  x, w, y = problem(n, d, v)
  vg = lambda f: jax.jit(jax.value_and_grad(f, (0, 1)))
  a, b = interleaved_medians(vg(fused), vg(unfused), (x, w, y))
  print(
      f"time    N={n} D={d} V={v} f32 value_and_grad: fused {a:.0f} ms, unfused {b:.0f} ms, "
      f"ratio {a / b:.2f} (target <= 1.15)"
  )

  (lf, (dxf, dwf)), (lu, (dxu, dwu)) = vg(fused)(x, w, y), vg(unfused)(x, w, y)
  rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
  print(
      f"accuracy f32: loss rel {abs(float(lf - lu)) / abs(float(lu)):.1e} (target 1e-5), "
      f"dx {rel(dxf, dxu):.1e}, dw {rel(dwf, dwu):.1e} (target 1e-4)"
  )
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  lb = jax.jit(fused)(xb, wb, y)
  l32 = jax.jit(unfused)(xb.astype(jnp.float32), wb.astype(jnp.float32), y)
  print(
      f"accuracy bf16 inputs: loss rel to float32 on the same values "
      f"{abs(float(lb - l32)) / abs(float(l32)):.1e} (target 1e-4)"
  )


if __name__ == "__main__":
  main()
