"""jaxactv: exact, fused, memory-lean activations and classification losses for JAX.

Every op is a ``jax.custom_vjp`` whose gradient is written by hand: exact, cheap in
memory and safe at infinities, masks and half precision. Reverse mode and
forward-over-reverse (``jax.hessian``) work on every op; plain autodiff twins for
pure forward mode and for testing live in :mod:`jaxactv.reference`.
"""

from jaxactv import reference as reference
from jaxactv._binary import sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy
from jaxactv._binary import sigmoid_focal_loss as sigmoid_focal_loss
from jaxactv._cross_entropy import softmax_cross_entropy as softmax_cross_entropy
from jaxactv._cross_entropy import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)
from jaxactv._divergence import entropy_from_logits as entropy_from_logits
from jaxactv._divergence import kl_divergence_from_logits as kl_divergence_from_logits
from jaxactv._linear_cross_entropy import LinearCrossEntropyAux as LinearCrossEntropyAux
from jaxactv._linear_cross_entropy import (
    linear_softmax_cross_entropy as linear_softmax_cross_entropy,
)
from jaxactv._linear_log_probs import linear_log_probs as linear_log_probs
from jaxactv._sigmoid import log_sigmoid as log_sigmoid
from jaxactv._sigmoid import sigmoid as sigmoid
from jaxactv._softmax import log_softmax as log_softmax
from jaxactv._softmax import logmeanexp as logmeanexp
from jaxactv._softmax import logsumexp as logsumexp
from jaxactv._softmax import softmax as softmax

__version__ = "0.2.0"

__all__ = [
    "LinearCrossEntropyAux",
    "__version__",
    "entropy_from_logits",
    "kl_divergence_from_logits",
    "linear_log_probs",
    "linear_softmax_cross_entropy",
    "log_sigmoid",
    "log_softmax",
    "logmeanexp",
    "logsumexp",
    "reference",
    "sigmoid",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]
