"""Smoke test of examples/train_tiny_lm.py, the language model trained with the fused loss.

One tiny run (3 steps, 50 kB of corpus, a 512-token vocabulary) trains the model three
ways in one process: fused on one device, unfused (``x @ w`` + optax's cross-entropy) and
fused on a (data=2, vocab=4) mesh of 8 host devices. The unfused run is the independent
reference: its per-step losses must match the fused ones to float32 rounding, and so must
the sharded run's. Bad flags must end in one line on stderr, not a traceback.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_tiny_lm.py"
TINY = ("--steps", "3", "--corpus-mb", "0.05", "--vocab-size", "512", "--seq-len", "32",
        "--d-model", "32", "--heads", "2", "--batch-size", "8")


def example_command(*args: str) -> dict:
  # The jaxactv next to this test, not whichever one is installed.
  path = os.pathsep.join(filter(None, [str(SCRIPT.parents[1]), os.environ.get("PYTHONPATH")]))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
  env.pop("XLA_FLAGS", None)  # the script asks for its own host devices with --devices
  return {"args": [sys.executable, str(SCRIPT), *args], "env": env, "text": True,
          "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}


def test_tiny_run_fused_unfused_and_sharded_agree(tmp_path):
  out = tmp_path / "tiny_lm"
  # Memory: compiled only, at a shape where the [tokens, V] logits (16384 x 16384 float32,
  # 1 GiB) dwarf everything else in the step.
  command = example_command(*TINY, "--compare-unfused", "--devices", "8", "--memory-tokens",
                            "16384", "--memory-vocabs", "16384", "--out", str(out))
  command["env"]["JAX_LOG_COMPILES"] = "1"  # each compile logged on stderr
  result = subprocess.run(**command, timeout=600, check=False)
  assert result.returncode == 0, result.stderr
  assert "Traceback" not in result.stderr
  # One train step compile per run (fused, unfused, sharded) and per loss of the compiled-only
  # memory row: a step that compiles again when its outputs come back (optimizer state on
  # other devices than the step returns it on) would add one.
  assert result.stderr.count("Compiling jit(train_step)") == 3 + 2, result.stderr[-3000:]

  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["config"]["vocab_size"] == 512
  runs = metrics["runs"]
  assert set(runs) == {"fused", "unfused", "fused_sharded"}
  fused = np.asarray(runs["fused"]["losses"])
  assert fused.shape == (3,) and np.all(np.isfinite(fused))
  # An untrained model over 512 classes starts near log(512) = 6.24.
  assert abs(fused[0] - math.log(512)) < 0.5, fused
  for name in ("unfused", "fused_sharded"):
    other = np.asarray(runs[name]["losses"])
    np.testing.assert_allclose(other, fused, rtol=0, atol=1e-4, err_msg=name)
    # Next-token accuracy from return_aux's argmax against argmax(x @ w): a near-tie may
    # flip one of the 256 tokens of a step, no more.
    np.testing.assert_allclose(runs[name]["accuracies"], runs["fused"]["accuracies"], rtol=0,
                               atol=1.5 / 256, err_msg=name)
    assert runs[name]["max_abs_loss_diff_vs_fused"] == pytest.approx(
        np.max(np.abs(other - fused)), abs=1e-6)
  assert runs["fused_sharded"]["mesh"] == {"data": 2, "vocab": 4}
  # At the same weights the fused and unfused losses differ by float32 rounding only.
  assert 0.0 <= runs["unfused"]["max_abs_loss_diff_same_params"] <= 1e-5

  held = metrics["heldout"]
  assert held["tokens"] > 0 and np.isfinite(held["loss"])
  assert held["perplexity"] == pytest.approx(math.exp(held["loss"]), rel=1e-5)
  assert 0.0 <= held["accuracy"] <= 1.0
  assert [s["prompt"] for s in metrics["samples"]] == ["def", "import", "class", "    return"]
  for sample in metrics["samples"]:
    assert sample["text"].startswith(sample["prompt"])

  (row,) = metrics["memory"]["vocab_sweep"]
  assert (row["tokens"], row["vocab"]) == (16384, 16384)
  logits_bytes = 16384 * 16384 * 4
  assert row["unfused_temp_bytes"] >= logits_bytes  # it holds the logits at least once
  assert row["fused_temp_bytes"] < logits_bytes / 4  # the fused step holds blocks of them
  assert metrics["memory"]["example"]["tokens"] == 8 * 32

  for name in ("loss_curves.png", "memory_vs_vocab.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_bad_flags_end_in_one_line_errors(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  never = str(tmp_path / "never")
  cases = [
      (("--devices", "3", "--out", never), ("--devices 3", "(data, vocab) mesh")),
      (("--steps", "0", "--out", never), ("--steps must be >= 1",)),
      (("--vocab-size", "many", "--out", never), ("--vocab-size",)),
      (("--out", str(blocker / "lm")), ("cannot write to", str(blocker / "lm"))),
  ]
  # Started together: each pays for importing jax.
  procs = [subprocess.Popen(**example_command(*flags)) for flags, _ in cases]
  for proc, (flags, fragments) in zip(procs, cases, strict=True):
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, (flags, stderr)
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, (flags, stderr)
    assert lines[0].startswith("train_tiny_lm.py: error:"), lines[0]
    for fragment in fragments:
      assert fragment in lines[0], (flags, lines[0])
  assert not (tmp_path / "never").exists()
