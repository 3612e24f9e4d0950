"""The public surface is exactly what __all__ says, and nothing private leaks."""

from __future__ import annotations

import jaxactv
import jaxactv.reference

ACTIVATIONS = {"log_sigmoid", "log_softmax", "logmeanexp", "logsumexp", "sigmoid", "softmax"}
LOSSES = {
    "entropy_from_logits",
    "kl_divergence_from_logits",
    "linear_log_probs",
    "linear_softmax_cross_entropy",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
}
EXPECTED = {"LinearCrossEntropyAux", "__version__", "reference"} | ACTIVATIONS | LOSSES
REFERENCE = ACTIVATIONS | LOSSES


def test_all_is_the_expected_surface():
  assert set(jaxactv.__all__) == EXPECTED


def test_every_public_name_exists():
  for name in jaxactv.__all__:
    assert hasattr(jaxactv, name), name


def test_no_unlisted_public_names():
  public = {n for n in dir(jaxactv) if not n.startswith("_")}
  assert public <= EXPECTED | {"reference"}, public - EXPECTED


def test_version_is_a_string():
  assert isinstance(jaxactv.__version__, str) and jaxactv.__version__.count(".") == 2


def test_reference_surface():
  assert set(jaxactv.reference.__all__) == REFERENCE
  for name in REFERENCE:
    assert callable(getattr(jaxactv.reference, name))


def test_py_typed_is_shipped():
  import pathlib

  assert (pathlib.Path(jaxactv.__file__).parent / "py.typed").exists()
