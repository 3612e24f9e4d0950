"""jaxactv: exact, fused, memory-lean activations and classification losses for JAX.

Every op is a ``jax.custom_vjp`` whose gradient is written by hand: exact, cheap in
memory and safe at infinities, masks and half precision. Plain autodiff twins for
forward-mode use and for testing live in :mod:`jaxactv.reference`.
"""

from jaxactv import reference as reference
from jaxactv._sigmoid import log_sigmoid as log_sigmoid
from jaxactv._sigmoid import sigmoid as sigmoid
from jaxactv._softmax import log_softmax as log_softmax
from jaxactv._softmax import logsumexp as logsumexp
from jaxactv._softmax import softmax as softmax

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "log_sigmoid",
    "log_softmax",
    "logsumexp",
    "reference",
    "sigmoid",
    "softmax",
]
