"""Smoke test of the main example, examples/train_digits.py.

A tiny run (a few steps per model) must write metrics.json with the documented keys
and the four plots; bad flags must end with one line on stderr, not a traceback.
The numbers themselves are not checked here: a few steps do not train anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"
PLOTS = ("training_curves.png", "multilabel_examples.png", "per_count.png", "activations.png")


def example_command(*args: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # conftest asks for 8 host devices; the example needs one
  return {"args": [sys.executable, str(SCRIPT), *args], "env": env, "text": True,
          "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}


def run_example(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(**example_command(*args), timeout=120, check=False)


def test_tiny_run_writes_metrics_and_plots(tmp_path):
  out = tmp_path / "digits"
  result = run_example("--steps", "4", "--batch-size", "32", "--seed", "1", "--out", str(out))
  assert result.returncode == 0, result.stderr
  assert "Traceback" not in result.stderr

  metrics = json.loads((out / "metrics.json").read_text())
  assert isinstance(metrics["multiclass"]["test_accuracy"], float)
  assert 0.0 <= metrics["multiclass"]["test_accuracy"] <= 1.0
  for kind in ("sigmoid_bce", "softmax_ce"):
    entry = metrics["multilabel"][kind]
    for key in ("exact_match", "micro_f1"):
      assert isinstance(entry[key], float), (kind, key)
      assert 0.0 <= entry[key] <= 1.0
      assert 0.0 <= entry["at_0.5"][key] <= 1.0
      for k in ("1", "2", "3"):
        assert 0.0 <= entry["by_count"][k]["tuned"][key] <= 1.0
        assert 0.0 <= entry["by_count"][k]["at_0.5"][key] <= 1.0
    assert 0.0 < entry["threshold"] < 1.0
  # Softmax probabilities sum to 1, so at 0.5 at most one digit can be called, trained
  # or not.
  assert metrics["multilabel"]["softmax_ce"]["at_0.5"]["max_digits_called"] <= 1

  for name in PLOTS:
    data = (out / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", name
    assert len(data) > 20_000, (name, len(data))


def test_bad_flags_end_in_one_line_errors(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  never = str(tmp_path / "never")
  cases = [
      (("--steps", "0", "--out", never), ("--steps must be >= 1",)),
      (("--steps", "many", "--out", never), ("--steps",)),
      (("--steps", "1", "--out", str(blocker / "digits")),
       ("cannot write to", str(blocker / "digits"))),
  ]
  # Started together: each pays for importing jax, matplotlib and scikit-learn.
  procs = [subprocess.Popen(**example_command(*flags)) for flags, _ in cases]
  for proc, (flags, fragments) in zip(procs, cases, strict=True):
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0, flags
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, (flags, stderr)
    assert lines[0].startswith("train_digits.py: error:"), lines[0]
    for fragment in fragments:
      assert fragment in lines[0], (flags, lines[0])
  assert not (tmp_path / "never").exists()
