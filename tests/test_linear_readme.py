"""The README's two snippets for the fused linear ops run, and the policy-gradient step's
gradient equals that of the same code on the unfused jax.nn computation."""

from __future__ import annotations

import pathlib
import re
import types

import jax
import jax.numpy as jnp
import numpy as np

import jaxactv

README = pathlib.Path(__file__).parent.parent / "README.md"


def _snippet(name):
  text = README.read_text()
  match = re.search(rf"<!-- snippet: {name} -->\s*```python\n(.*?)```", text, re.S)
  assert match, f"README snippet {name!r} not found"
  return match.group(1)


def _unfused_log_probs(x, w, tokens, *, temperature=1.0, where=None, return_entropy=False):
  logp = jax.nn.log_softmax(jnp.einsum("...d,dv->...v", x, w) / temperature)
  lp = jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
  ent = -jnp.sum(jnp.exp(logp) * logp, -1)
  if where is not None:
    lp, ent = jnp.where(where, lp, 0.0), jnp.where(where, ent, 0.0)
  return (lp, ent) if return_entropy else lp


def _inputs(b=2, s=9, d=16, v=301):
  rng = np.random.default_rng(4)
  f32 = lambda *shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(np.float32)
  tokens = rng.integers(0, v, (b, s)).astype(np.int32)
  mask = rng.random((b, s)) > 0.2
  return {
      "w": f32(d, v, scale=0.3), "hidden": f32(b, s, d), "tokens": tokens,
      # Old log-probs near the current ones, so that some ratios fall outside the clip.
      "old_log_probs": (np.log(1 / v) + 0.3 * rng.standard_normal((b, s))).astype(np.float32),
      "advantages": f32(b, s), "mask": mask,
      "ref_hidden": f32(b, s, d), "ref_w": f32(d, v, scale=0.3),
  }


def test_policy_gradient_snippet_matches_the_unfused_version():
  code = _snippet("policy-gradient")
  grads = {}
  for name, module in (
      ("fused", jaxactv),
      ("unfused", types.SimpleNamespace(linear_log_probs=_unfused_log_probs)),
  ):
    scope = {"jax": jax, "jnp": jnp, "jaxactv": module, **_inputs()}
    exec(code, scope)
    grads[name] = scope["grads"]
  for g, r in zip(grads["fused"], grads["unfused"], strict=True):
    np.testing.assert_allclose(g, r, rtol=0, atol=1e-4 * np.abs(np.asarray(r)).max())
    assert np.abs(np.asarray(r)).max() > 0


def test_masked_lm_snippet_runs():
  inputs = _inputs()
  scope = {
      "jax": jax, "jnp": jnp, "jaxactv": jaxactv, "hidden": inputs["hidden"],
      "w_out": inputs["w"], "targets": inputs["tokens"], "loss_mask": inputs["mask"],
  }
  exec(_snippet("masked-lm"), scope)
  logits = np.einsum("bsd,dv->bsv", inputs["hidden"].astype(np.float64), inputs["w"])
  hit = (logits.argmax(-1) == inputs["tokens"]) & inputs["mask"]
  np.testing.assert_allclose(scope["accuracy"], hit.sum() / inputs["mask"].sum(), rtol=1e-6)
  assert np.isfinite(scope["loss"])
