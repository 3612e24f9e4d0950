"""A short tour of jaxactv's activations on the numbers every tutorial uses.

Run it with `make demo` (or `python examples/activations_tour.py` inside .venv).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxactv


def main() -> None:
  np.set_printoptions(precision=4, suppress=False)
  x = jnp.array([2.0, 3.0, 5.0, 6.0])
  print("sigmoid([2, 3, 5, 6])         =", np.asarray(jaxactv.sigmoid(x)))

  logits = jnp.array([2.0, 1.0, 0.1])
  print("softmax([2, 1, 0.1])          =", np.asarray(jaxactv.softmax(logits)), "(sums to 1)")

  a, b = 1.3, -0.4
  print(
      f"softmax([a, b])[0] = {float(jaxactv.softmax(jnp.array([a, b]))[0]):.6f}"
      f"  sigmoid(a - b) = {float(jaxactv.sigmoid(a - b)):.6f}  (the 2-class identity)"
  )

  print("\nGradients in the tails of the sigmoid (float32):")
  for t in (17.0, 30.0, 80.0):
    ours = float(jax.grad(jaxactv.sigmoid)(t))
    peer = float(jax.grad(jax.nn.sigmoid)(t))
    exact = float(np.exp(-np.float64(t)) / (1 + np.exp(-np.float64(t))) ** 2)
    print(f"  x = {t:4.0f}: jaxactv {ours:.4e}   jax.nn {peer:.4e}   exact {exact:.4e}")

  print("\nA +inf logit: the limit, not NaN")
  row = jnp.array([jnp.inf, 1.0, jnp.inf])
  print("  jaxactv.softmax:", np.asarray(jaxactv.softmax(row)))
  print("  jax.nn.softmax: ", np.asarray(jax.nn.softmax(row)))

  print("\nA fully masked row: zeros and a zero gradient, not NaN")
  mask = jnp.array([False, False, False])
  grad = jax.grad(lambda z: jaxactv.softmax(z, where=mask).sum())(logits)
  probs = jaxactv.softmax(logits, where=mask)
  print("  softmax:", np.asarray(probs), " gradient:", np.asarray(grad))


if __name__ == "__main__":
  main()
